"""``spoold exec``: one job run now, in the foreground, through the daemon's own intake, claim
and runner, so that the job is in the spool afterwards like any other."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from spoold.clock import SystemClock, parse_rfc3339
from spoold.config import Config
from spoold.daemon import job_validator
from spoold.documents import ValidationIssue, load_document
from spoold.errors import SpooldError, SpoolError
from spoold.intake import Accepted, Intake
from spoold.logs import configure_logging
from spoold.logtap import LogTap
from spoold.outbox import callbacks_for
from spoold.plugins import ExecutorRegistry
from spoold.secrets import Masker, SecretStore
from spoold.spool import Spool
from spoold.states import JobState
from spoold.views import ended_text
from spoold.worker import JobRunner


def has_schedule(data: bytes, name: str) -> bool:
    """Whether a job file has a ``schedule:`` (exec runs one job, never a schedule)."""
    try:
        document = load_document(data, name)
    except (SpooldError, ValueError):
        return False  # intake reports what is wrong with it
    return isinstance(document, dict) and "schedule" in document


def run_once(path: Path, config: Config) -> int:
    """Take ``path`` in as intake would, run the job here, retries too; 0 if it succeeded.

    A refusal is printed as ``spoold validate`` prints it.
    """
    spool = Spool(config.spool, durable=config.durable)
    spool.init()
    clock = SystemClock()
    masker = Masker()
    logger = configure_logging(config, masker)
    registry = ExecutorRegistry.from_entry_points()
    callbacks = callbacks_for(config, spool, clock, logger)
    runner = JobRunner(spool, registry, config, clock, logger,
                       secrets=SecretStore(config.secrets_dir), masker=masker,
                       tap=LogTap.open(config.log_socket), callbacks=callbacks)  # fmt: skip
    intake = Intake(
        spool,
        job_validator(registry),
        clock,
        max_file_size=config.max_file_size,
        settle_time=0.0,
        on_accepted=lambda job, document: runner.remember(job.job_id, document),
        logger=logger,
        allowed_run_as=config.allowed_run_as,
        callbacks=callbacks,
    )
    outcome = intake.process(spool.stage_file(path, max_size=config.max_file_size))
    if not isinstance(outcome, Accepted):
        errors = outcome.reason["errors"] or [{"message": outcome.reason["reason"], "path": ""}]
        for error in errors:
            print(ValidationIssue(**error).format(str(path)), file=sys.stderr)
        # Not in the FILE: form: the lines above are exactly validate's.
        print(f"rejected into {outcome.path}", file=sys.stderr)
        return 1
    job_id = outcome.job.job_id
    beat = _Heartbeat(runner, config.heartbeat_interval, config.poll_interval)
    try:
        while True:
            job = runner.claim(job_id)
            if job is None:
                raise SpoolError(f"job {job_id} was claimed by a running daemon")
            final = runner.run(job, slot=f"exec-{os.getpid()}", tee=sys.stdout)
            if final is None or final.directory != "pending":
                break
            # A retry: wait here for it, in the foreground, as the daemon would in the background.
            due = spool.read_status(final).get("next_attempt_at")
            if not isinstance(due, str):
                break
            time.sleep(max(parse_rfc3339(due).timestamp() - clock.now().timestamp(), 0.0))
    finally:
        beat.stop()
    if final is None:
        print(f"{path}: job {job_id}: its outcome could not be recorded (see above)",
              file=sys.stderr)  # fmt: skip
        return 1
    status = spool.read_status(final)
    print(f"{path}: {ended_text(status)} ({final.path})", file=sys.stderr)
    return 0 if status["state"] == JobState.SUCCEEDED.value else 1


class _Heartbeat:
    """Renews leases and looks for cancel requests while ``spoold exec`` runs a job."""

    def __init__(self, runner: JobRunner, every: float, look: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(runner, every, look), daemon=True)
        self._thread.start()

    def _loop(self, runner: JobRunner, every: float, look: float) -> None:
        next_beat = time.monotonic() + every
        while not self._stop.wait(min(look, every)):
            runner.check_cancels()  # `spoold cancel` works on a job run by `spoold exec` too
            if time.monotonic() >= next_beat:
                runner.renew_leases()
                next_beat = time.monotonic() + every

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
