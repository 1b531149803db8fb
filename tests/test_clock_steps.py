"""A step of the wall clock (NTP, a VM resumed) while spoold works: durations come from the
monotonic clock and retry waits run on it; the stamps keep saying when. Plus status.json's
``worker`` after an adoption."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from spoold.executors.base import ExecResult, Executor, RunContext
from spoold.executors.local import LocalExecutor

from spoold.core.clock import parse_rfc3339, rfc3339
from spoold.core.config import Config
from spoold.core.job import Attempt, JobStatus
from spoold.core.spool import JobDir, Spool
from spoold.core.states import JobState
from spoold.core.usage import Usage
from spoold.intake.incoming import Accepted, Intake
from spoold.intake.validation import job_validator
from spoold.run.due import DueJobs, scheduled_wait
from spoold.run.registry import ExecutorRegistry
from spoold.run.worker import JobRunner
from tests.harness import wait_for

LOGGER = logging.getLogger("spoold.test.clock_steps")
HOUR, DAY = 3600.0, 86400.0
T = datetime(2026, 12, 7, 2, 0, 0, 123456, tzinfo=UTC)


class SteppingClock:
    """A fake clock whose wall time can jump (``step``) while its monotonic time does not, as
    a real NTP step does; ``advance`` moves both, as time passing does."""

    def __init__(self, start: datetime = T) -> None:
        self._now = start
        self._monotonic = 1000.0
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def monotonic(self) -> float:
        with self._lock:
            return self._monotonic

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += timedelta(seconds=seconds)
            self._monotonic += seconds

    def step(self, seconds: float) -> None:
        with self._lock:
            self._now += timedelta(seconds=seconds)


# -- the model: an attempt's duration -------------------------------------------------------


def test_an_attempt_keeps_its_stamps_and_takes_its_duration_from_the_monotonic_clock() -> None:
    status = JobStatus("j", JobState.PENDING, "local", None, rfc3339(T), None)
    status.begin_attempt(T, "w1")
    ended = T + timedelta(seconds=8) - timedelta(seconds=HOUR)  # stepped back 1 h meanwhile
    usage = Usage(wall_seconds=8.2, cpu_user_seconds=0.1, source="kernel")
    status.end_attempt(ended, JobState.FAILED, -15, "timed out after 8s", usage=usage, took=8.0)
    [attempt] = status.attempts
    assert (attempt.started_at, attempt.finished_at) == (rfc3339(T), rfc3339(ended)), "when"
    assert attempt.usage is not None and attempt.usage.wall_seconds == 8.0, "how long"
    assert attempt.seconds() == 8.0


def test_an_adopted_attempt_whose_stamps_run_backwards_shows_what_the_supervisor_measured() -> None:
    status = JobStatus("j", JobState.PENDING, "local", None, rfc3339(T), None)
    status.begin_attempt(T, "old")  # another process's start: no monotonic time of it here
    ended = T - timedelta(seconds=HOUR)
    status.end_attempt(ended, JobState.SUCCEEDED, 0, None, usage=Usage(wall_seconds=9.0))
    assert status.attempts[0].usage == Usage(wall_seconds=9.0), "never 0, never negative"
    # No usage at all: the duration is unknown, not a negative number.
    bare = Attempt(1, rfc3339(T), finished_at=rfc3339(ended))
    assert bare.seconds() is None
    # Stamps that run forwards still count where nothing measured the attempt.
    status = JobStatus("k", JobState.PENDING, "local", None, rfc3339(T), None)
    status.begin_attempt(T, "old")
    status.end_attempt(T + timedelta(seconds=5), JobState.SUCCEEDED, 0, None,
                       usage=Usage(wall_seconds=4.5))  # fmt: skip
    assert status.attempts[0].seconds() == 5.0


# -- the worker: what it records and logs ---------------------------------------------------


class SteppedExecutor(Executor):
    """Its work takes 9 s, during which the wall clock is stepped by ``STEP``."""

    name = "stepped"
    schema_resource = "local.schema.json"
    clock: SteppingClock
    step = -HOUR

    def execute(self, ctx: RunContext) -> ExecResult:
        self.clock.advance(4)
        self.clock.step(self.step)
        self.clock.advance(5)
        return ExecResult(exit_code=1, error="exit code 1")


class Parts:
    """A spool, intake and runner on one SteppingClock, with ``SteppedExecutor``."""

    def __init__(self, tmp_path: Path, *, worker_id: str = "w1", **config: Any) -> None:
        self.spool = Spool(tmp_path / "spool")
        self.spool.init()
        self.clock = SteppingClock()
        SteppedExecutor.clock = self.clock
        registry = ExecutorRegistry({"local": LocalExecutor, "stepped": SteppedExecutor})
        self.registry = registry
        self.config = Config(spool=self.spool.root, hostname="here", worker_id=worker_id,
                             kill_grace=0.5, **config)  # fmt: skip
        self.intake = Intake(self.spool, job_validator(registry), self.clock,
                             max_file_size=self.config.max_file_size, settle_time=0,
                             on_accepted=lambda job, document: None, logger=LOGGER)  # fmt: skip
        self.due = DueJobs(self.clock)
        self.runner = self.runner_for(worker_id)

    def runner_for(self, worker_id: str) -> JobRunner:
        config = Config(spool=self.spool.root, hostname="here", worker_id=worker_id,
                        kill_grace=0.5)  # fmt: skip
        return JobRunner(self.spool, self.registry, config, self.clock, LOGGER,
                         draw=lambda: 0.0, on_deferred=self.due.add)  # fmt: skip

    def submit(self, document: dict[str, Any]) -> str:
        (self.spool.dir("incoming") / "j.yaml").write_text(yaml.safe_dump(document))
        outcome = self.intake.offer("j.yaml", complete=True)
        assert isinstance(outcome, Accepted), outcome
        return outcome.job.job_id

    def attempt(self, job_id: str) -> tuple[str, dict[str, Any]]:
        claimed = self.runner.claim(job_id)
        assert claimed is not None
        final = self.runner.run(claimed)
        assert final is not None
        return final.directory, self.spool.jobs.read_status(final)


@pytest.mark.parametrize("step", [-HOUR, DAY])
def test_a_wall_clock_step_during_an_attempt_changes_its_stamps_not_its_duration(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, step: float
) -> None:
    parts = Parts(tmp_path)
    SteppedExecutor.step = step
    job_id = parts.submit({"job_id": "s1", "executor": "stepped", "product": {"commands": "x"}})
    with caplog.at_level(logging.INFO, logger=LOGGER.name):
        directory, status = parts.attempt(job_id)
    assert directory == "failed"
    [attempt] = status["attempts"]
    took = parse_rfc3339(attempt["finished_at"]) - parse_rfc3339(attempt["started_at"])
    assert took.total_seconds() == pytest.approx(9 + step), "the stamps say when, as they were"
    assert attempt["usage"]["wall_seconds"] == pytest.approx(9.0), "the duration: 9 s"
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("job s1 ")]
    assert any("(exit 1, 9.0 s, attempt 1)" in line for line in said), said


# -- retry waits ----------------------------------------------------------------------------


def test_a_retry_wait_runs_on_the_monotonic_clock_in_the_process_that_scheduled_it(
    tmp_path: Path,
) -> None:
    parts = Parts(tmp_path)
    SteppedExecutor.step = 0.0
    document = {"job_id": "r1", "executor": "stepped", "product": {"commands": "x"},
                "retries": 2, "backoff": "10s"}  # fmt: skip
    job_id = parts.submit(document)
    directory, status = parts.attempt(job_id)
    assert directory == "pending" and job_id in parts.due
    due = parse_rfc3339(status["next_attempt_at"]).timestamp()
    assert parts.due.due_at(job_id) == due, "status.json's due time, as written"
    parts.clock.step(-HOUR)  # set back: the wait is not an hour longer
    parts.clock.advance(9.9)
    assert parts.due.pop_due() == []
    parts.clock.advance(0.1)
    assert parts.due.pop_due() == [job_id], "due after its 10 s backoff, not 1 h 10 s"

    directory, status = parts.attempt(job_id)
    assert directory == "pending"
    parts.clock.step(DAY)  # set forward: the backoff is not cut short
    assert parts.due.pop_due() == []
    parts.clock.advance(9.9)
    assert parts.due.pop_due() == []
    parts.clock.advance(0.1)
    assert parts.due.pop_due() == [job_id]


def test_a_due_time_read_once_after_a_step_back_waits_at_most_what_was_scheduled() -> None:
    clock = SteppingClock()
    due = DueJobs(clock)
    # Written before a step back of 1 h: status.json's stamps, as a restarted daemon reads them.
    written: dict[str, Any] = {
        "submitted_at": rfc3339(T - timedelta(seconds=100)),
        "attempts": [
            {
                "number": 1,
                "started_at": rfc3339(T - timedelta(seconds=30)),
                "finished_at": rfc3339(T),
            }
        ],
        "next_attempt_at": rfc3339(T + timedelta(seconds=60)),
    }
    assert scheduled_wait(written) == 60.0
    clock.step(-HOUR)
    when = parse_rfc3339(written["next_attempt_at"]).timestamp()
    due.add("j", when, longest=scheduled_wait(written))
    wake = due.next_due()
    assert wake is not None and wake == pytest.approx(clock.now().timestamp() + 60)
    clock.advance(59)
    assert due.pop_due() == []
    clock.advance(1)
    assert due.pop_due() == ["j"]
    # A run a schedule made waits from its submission; an unknown stamp gives no bound.
    assert scheduled_wait({"submitted_at": rfc3339(T), "attempts": [],
                           "next_attempt_at": rfc3339(T + timedelta(seconds=3))}) == 3.0  # fmt: skip
    assert scheduled_wait({"next_attempt_at": rfc3339(T)}) is None


def test_a_due_time_already_past_is_due_at_once_and_one_added_again_replaces_it() -> None:
    clock = SteppingClock()
    due = DueJobs(clock)
    now = clock.now().timestamp()
    due.add("past", now - 5)
    due.add("later", now + 10)
    due.add("later", now + 20)  # rescheduled (`spoold retry`, a new failure)
    assert due.pop_due() == ["past"]
    clock.advance(10)
    assert due.pop_due() == []
    assert due.due_at("later") == now + 20
    clock.advance(10)
    assert due.pop_due() == ["later"] and len(due) == 0 and due.next_due() is None


def test_without_a_clock_the_wall_clock_times_given_decide() -> None:
    due = DueJobs()
    due.add("j", 100.0)
    assert due.next_due() == 100.0
    assert due.pop_due(99.0) == [] and due.pop_due(100.0) == ["j"]
    with pytest.raises(TypeError):
        due.pop_due()


# -- adoption: status.json's worker ---------------------------------------------------------


def test_an_adopted_job_names_its_adopting_worker_in_status_json(tmp_path: Path) -> None:
    parts = Parts(tmp_path, worker_id="vm-17319")
    mark = tmp_path / "go"
    command = f"echo waiting; until [ -e {mark} ]; do sleep 0.05; done; echo released"
    document = {"job_id": "sleep1", "executor": "local", "on_interrupt": "requeue",
                "product": {"commands": command}}  # fmt: skip
    job_id = parts.submit(document)
    first = parts.runner
    claimed = first.claim(job_id)
    assert claimed is not None
    left: list[object] = []
    ended: list[object] = []
    runner = threading.Thread(target=lambda: left.append(first.run(claimed)), daemon=True)
    runner.start()
    try:
        wait_for(lambda: "INFO waiting" in claimed.log_path.read_text(), what="the job to run")
        assert parts.spool.jobs.read_status(claimed)["worker"] == "vm-17319"
        first.detach_all()  # the first worker stops: its job goes on, for another to adopt
        runner.join(30)
        assert not runner.is_alive() and left == [None]

        second = parts.runner_for("vm-11005")
        adopted = second.adopt(job_id)
        assert adopted is not None
        finisher = threading.Thread(target=lambda: ended.append(second.run(adopted)), daemon=True)
        finisher.start()
        wait_for(lambda: "adopted" in adopted.log_path.read_text(), what="the adoption")
        wait_for(lambda: parts.spool.jobs.read_status(adopted)["worker"] == "vm-11005",
                 what="status.json to name the adopting worker while the job runs")  # fmt: skip
        assert "INFO released" not in adopted.log_path.read_text()
    finally:
        mark.touch()
        runner.join(30)
        if "finisher" in locals():
            finisher.join(30)
    [final] = ended
    assert isinstance(final, JobDir)
    status = parts.spool.jobs.read_status(final)
    assert (status["state"], status["worker"]) == ("succeeded", "vm-11005")
    assert len(status["attempts"]) == 1
    wall = status["attempts"][0]["usage"]["wall_seconds"]
    assert wall is not None and wall >= 0
