"""``spoold exec``: one job run now, in the foreground, through the daemon's own intake, claim
and runner, so that the job is in the spool afterwards like any other."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from spoold.core.clock import parse_rfc3339
from spoold.core.config import Config
from spoold.core.documents import load_document
from spoold.core.errors import SpooldError, SpoolError, ValidationIssue
from spoold.core.states import JobState
from spoold.face.views import ended_text, printable
from spoold.intake.incoming import Accepted, Intake
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
    spool.init()
    runner = parts.runner()
    intake = Intake(
        spool,
        parts.validator(),
        clock,
        max_file_size=config.max_file_size,
        settle_time=0.0,
        on_accepted=lambda job, document: runner.remember(job.job_id, document),
        logger=parts.logger,
        allowed_run_as=config.allowed_run_as,
        callbacks=parts.callbacks,
        policy=config.policy,
    )
    outcome = intake.decide(spool.stages.stage_file(path, max_size=config.max_file_size))
    if not isinstance(outcome, Accepted):
        errors = outcome.reason["errors"] or [{"message": outcome.reason["reason"], "path": ""}]
        for error in errors:
            print(printable(ValidationIssue(**error).format(str(path))), file=sys.stderr)
        # Not in the FILE: form: the lines above are exactly validate's.
        print(printable(f"rejected into {outcome.path}"), file=sys.stderr)
        return 1
    job_id = outcome.job.job_id
    # The worker processes' lease heartbeat, on a thread: `spoold cancel` works on a job run
    # by `spoold exec` too.
    with parts.heartbeat(runner).in_background(clock):
        while True:
            job = runner.claim(job_id)
            if job is None:
                raise SpoolError(f"job {job_id} was claimed by a running daemon")
            final = runner.run(job, slot=f"exec-{os.getpid()}", tee=sys.stdout)
            if final is None or final.directory != "pending":
                break
            # A retry: wait here for it, in the foreground, as the daemon would in the background.
            due = spool.jobs.read_status(final).get("next_attempt_at")
            if not isinstance(due, str):
                break
            time.sleep(max(parse_rfc3339(due).timestamp() - clock.now().timestamp(), 0.0))
    if final is None:
        print(f"{path}: job {job_id}: its outcome could not be recorded (see above)",
              file=sys.stderr)  # fmt: skip
        return 1
    status = spool.jobs.read_status(final)
    print(f"{path}: {ended_text(status)} ({final.path})", file=sys.stderr)
    return 0 if status["state"] == JobState.SUCCEEDED.value else 1
