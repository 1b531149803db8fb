"""``spoold exec``: one job run now, in the foreground, through the daemon's own intake, claim
and runner, so that the job is in the spool afterwards like any other."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from spoold.core.clock import parse_rfc3339
from spoold.core.config import Config
from spoold.core.documents import load_document
from spoold.core.errors import SpooldError, SpoolError, ValidationIssue
from spoold.core.spool import JobDir, Spool
from spoold.core.states import JobState
from spoold.core.wakeup import Wakeup
from spoold.face.access import caller
from spoold.face.views import ended_text, issue_line, printable
from spoold.intake.incoming import Accepted, Intake
from spoold.run.control import JobControl
from spoold.wiring import Parts


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
    parts = Parts.build(config)
    spool, clock = parts.spool, parts.clock
    spool.init()  # refuses a directory that is no spool, or one across filesystems
    runner = parts.runner()
    run_as: list[Any] = []

    def accepted(job: JobDir, document: dict[str, Any]) -> None:
        runner.remember(job.job_id, document)
        run_as.append(document.get("run_as"))

    intake = Intake(
        spool,
        parts.validator(),
        clock,
        max_file_size=config.max_file_size,
        settle_time=0.0,
        on_accepted=accepted,
        logger=parts.logger,
        allowed_run_as=config.allowed_run_as,
        callbacks=parts.callbacks,
        policy=config.policy,
        lease_timeout=config.lease_timeout,
    )
    outcome = intake.decide(spool.stages.stage_file(path, max_size=config.max_file_size))
    if not isinstance(outcome, Accepted):
        errors = outcome.reason["errors"] or [{"message": outcome.reason["reason"], "path": ""}]
        for error in errors:
            print(issue_line(path, ValidationIssue(**error)), file=sys.stderr)
        # Not in the FILE: form: the lines above are exactly validate's.
        print(printable(f"rejected into {outcome.path}"), file=sys.stderr)
        return 1
    job_id = outcome.job.job_id
    slot = f"exec-{os.getpid()}"
    if not any(run_as):
        _beside_a_daemon(spool, config, job_id, runner.job_user(slot))
    stopping = _Interrupt(job_id, JobControl(spool, clock, who=caller(config.hostname),
                                             callbacks=parts.callbacks))  # fmt: skip
    # The worker processes' lease heartbeat, on a thread: `spoold cancel` works on a job run
    # by `spoold exec` too, and so does Ctrl-C (a cancel request of its own, below).
    with parts.heartbeat(runner).in_background(clock), stopping.installed():
        while True:
            job = runner.claim(job_id)
            if job is None:
                if stopping.signal is not None:
                    break  # cancelled while it waited for its next attempt
                raise SpoolError(f"job {job_id} was claimed by a running daemon")
            final = runner.run(job, slot=slot, tee=sys.stdout)
            if final is None or final.directory != "pending" or stopping.signal is not None:
                break
            # A retry: wait here for it, in the foreground, as the daemon would in the background.
            due = spool.jobs.read_status(final).get("next_attempt_at")
            if not isinstance(due, str):
                break
            if stopping.wait(max(parse_rfc3339(due).timestamp() - clock.now().timestamp(), 0.0)):
                stopping.cancel_now()  # pending: ended here and now, as `spoold cancel` would
                break
    if stopping.signal is not None:
        return _interrupted(path, spool, job_id, stopping.signal)
    if final is None:
        print(f"{path}: job {job_id}: its outcome could not be recorded (see above)",
              file=sys.stderr)  # fmt: skip
        return 1
    status = spool.jobs.read_status(final)
    print(f"{path}: {ended_text(status)} ({final.path})", file=sys.stderr)
    return 0 if status["state"] == JobState.SUCCEEDED.value else 1


def _beside_a_daemon(spool: Spool, config: Config, job_id: str, user: str | None) -> None:
    """Say so where the job runs beside a daemon on this spool as the user of one of its
    worker slots (there is no other to take): that slot's jobs and this one may reach each
    other's processes and work dir (SPEC 13), unless it goes to the daemon instead."""
    holder = spool.host_lock.daemon_on(config.host_id)
    if holder is None or user is None:
        return
    print(printable(
        f"spoold exec: a daemon runs on this spool (pid {holder[0]}): job {job_id} runs as "
        f"{user}, as the jobs of one of its worker slots do, and each may reach the other's "
        "processes and work dir; `spoold submit` runs it in a slot of the daemon's own"
    ), file=sys.stderr)  # fmt: skip


#: What an interrupted ``spoold exec`` exits with, as a shell's Ctrl-C does (128 + SIGINT).
EXIT_INTERRUPTED = 130


class _Interrupt:
    """SIGINT and SIGTERM while ``spoold exec`` runs its job: the job is cancelled as
    ``spoold cancel`` would (a request its runner acts on within ``poll_interval``: SIGTERM,
    ``kill_grace``, SIGKILL, recorded cancelled), and exec waits for that end. Before, a
    KeyboardInterrupt left the job running under its supervisor, in running/ for ever.

    The request is written on a thread of its own, not in the handler: the handler runs
    between two bytecodes of the main thread, which may hold a lock the write needs. A second
    signal gives up waiting (KeyboardInterrupt); the request stands."""

    def __init__(self, job_id: str, control: JobControl) -> None:
        self._job_id = job_id
        self._control = control
        self._came = Wakeup()  # set by the handler while this thread may wait on it
        self.signal: int | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # a test's thread: signals are not its to take
            return
        before = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for number, handler in before.items():
                signal.signal(number, handler)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt  # asked twice: stop waiting; the cancel request stands
        self.signal = signum
        self._came.set()
        name = signal.Signals(signum).name
        print(f"spoold: {name}: cancelling job {self._job_id} (again to stop waiting)",
              file=sys.stderr)  # fmt: skip
        threading.Thread(target=self._request, name="exec-cancel", daemon=True).start()

    def _request(self) -> None:
        try:
            self.cancel_now()
        except (SpooldError, OSError) as exc:  # it ended meanwhile, or the spool failed
            print(f"spoold: job {self._job_id}: cancel not requested: {exc}", file=sys.stderr)

    def cancel_now(self) -> None:
        """Cancel the job: a pending one ends here; a running one gets a request."""
        assert self.signal is not None
        name = signal.Signals(self.signal).name
        self._control.cancel(self._job_id, reason=f"spoold exec was interrupted ({name})")

    def wait(self, seconds: float) -> bool:
        """Sleep ``seconds``, or less if a signal comes; whether one came."""
        return self._came.wait(seconds)


def _interrupted(path: Path, spool: Spool, job_id: str, signum: int) -> int:
    """What an interrupted exec says: how its job ended (cancelled, or ended before the
    cancel reached it), and where it is; 130."""
    name = signal.Signals(signum).name
    job = spool.jobs.find(job_id)
    if job is None or job.directory in ("pending", "running"):
        where = "its state is unknown" if job is None else f"it is still in {job.directory}/"
        print(f"{path}: interrupted ({name}): job {job_id} was asked to stop; {where} "
              f"(`spoold status {job_id}`)", file=sys.stderr)  # fmt: skip
        return EXIT_INTERRUPTED
    status = spool.jobs.read_status(job)
    print(f"{path}: interrupted ({name}): {ended_text(status)} ({job.path})", file=sys.stderr)
    return EXIT_INTERRUPTED
