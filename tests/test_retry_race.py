"""`spoold retry`, the API's and the page's retry racing the daemon, which may claim the job
the moment it is back in pending/ (its rescan, a wake): seen as a 500 from the page's retry
once in a loaded suite."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from spoold.core.errors import JobNotFound
from spoold.core.spool import JobDir, Spool
from spoold.intake.incoming import Accepted, Intake
from spoold.intake.validation import job_validator
from spoold.run.control import JobControl
from spoold.run.registry import ExecutorRegistry
from tests.fakes import FakeClock

LOG = logging.getLogger("test-retry-race")


def _failed_job(spool: Spool, clock: FakeClock, tmp_path: Path, job_id: str) -> None:
    """``job_id`` accepted, then cancelled before it ran: in failed/, as a retry finds it."""
    intake = Intake(spool, job_validator(ExecutorRegistry.from_entry_points()), clock,
                    max_file_size=1 << 20, settle_time=0.0, on_accepted=lambda job, doc: None,
                    logger=LOG)  # fmt: skip
    path = tmp_path / f"{job_id}.yaml"
    path.write_text(f"job_id: {job_id}\nexecutor: local\nproduct: {{commands: 'true'}}\n")
    assert isinstance(intake.decide(spool.stages.stage_file(path, max_size=1 << 20)), Accepted)
    assert JobControl(spool, clock, who="tester").cancel(job_id).cancelled
    assert spool.jobs.get(job_id).directory == "failed"


def test_a_retried_job_claimed_the_moment_it_is_pending_is_retried_all_the_same(
    spool: Spool, clock: FakeClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retry moves the job into pending/ and then writes its status and a log line there;
    a worker that claims it in between has moved the directory on. That is the retry working,
    not an error: the job runs its next attempt, and its log says who asked for it."""
    _failed_job(spool, clock, tmp_path, "r1")
    move = spool.jobs._move

    def moved_then_claimed(job: JobDir, directory: str) -> JobDir:
        moved = move(job, directory)
        if directory == "pending":
            assert spool.jobs.claim("r1") is not None  # a worker, the moment it is there
        return moved

    monkeypatch.setattr(spool.jobs, "_move", moved_then_claimed)
    retried = JobControl(spool, clock, who="tester").retry("r1")
    job = spool.jobs.get("r1")
    assert job.directory == "running"
    # What the API answers with is what the retry recorded, not status.json now, which
    # still says how the job ended until its worker writes its own (seen: "cancelled").
    assert spool.jobs.read_status(job)["state"] == "cancelled"
    assert retried.status.to_dict()["state"] == "pending"
    log = (Path(job.location) / "log").read_text()
    assert "retry requested by tester: attempt 1 follows" in log, log
    leftovers = [p.name for p in Path(job.location).iterdir() if p.name.startswith(".")]
    assert leftovers == [], "no half-written status left in the job's directory"


def test_a_retry_that_finds_the_job_moved_on_says_so(
    spool: Spool, clock: FakeClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another retry (or a purge) moved the job between the look and the retry's own move:
    'moved meanwhile', an answer (404 from the API), not a server error."""
    _failed_job(spool, clock, tmp_path, "r2")
    read = spool.jobs.read_status

    def read_then_retried_elsewhere(job: JobDir) -> dict[str, object]:
        status = read(job)
        monkeypatch.setattr(spool.jobs, "read_status", read)
        JobControl(spool, clock, who="someone else").retry("r2")
        return status

    monkeypatch.setattr(spool.jobs, "read_status", read_then_retried_elsewhere)
    with pytest.raises(JobNotFound, match="moved meanwhile"):
        JobControl(spool, clock, who="tester").retry("r2")
    assert spool.jobs.get("r2").directory == "pending"


def test_a_retry_whose_job_moves_on_as_it_moves_it_says_so(
    spool: Spool, clock: FakeClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same between the retry's opening of the log and its move."""
    _failed_job(spool, clock, tmp_path, "r3")
    move = spool.jobs._move

    def retried_elsewhere_first(job: JobDir, directory: str) -> JobDir:
        monkeypatch.setattr(spool.jobs, "_move", move)
        JobControl(spool, clock, who="someone else").retry("r3")
        return move(job, directory)

    monkeypatch.setattr(spool.jobs, "_move", retried_elsewhere_first)
    with pytest.raises(JobNotFound, match="moved meanwhile"):
        JobControl(spool, clock, who="tester").retry("r3")
    assert spool.jobs.get("r3").directory == "pending"
    log = (Path(spool.jobs.get("r3").location) / "log").read_text()
    assert log.count("retry requested") == 1, log
