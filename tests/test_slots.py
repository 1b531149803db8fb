"""A worker process's slots: one thread each, which records a job's end while its next job
starts (spoold.run.worker.WorkerPool)."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar, cast

import pytest
from spoold.executors.base import ExecResult, Executor, RunContext

from spoold.core.clock import SystemClock
from spoold.core.config import Config
from spoold.core.joblog import JobLog
from spoold.core.secrets import Masker
from spoold.core.spool import Spool
from spoold.core.spool.jobs import JobDir
from spoold.run.launcher import Launcher, Supervised
from spoold.run.registry import ExecutorRegistry
from spoold.run.worker import JobRunner, Outcome, WorkerPool

LOGGER = logging.getLogger("spoold.test")


class _Runner:
    """What WorkerPool asks of a JobRunner, writing down what it was asked, in order.

    A job named ``quiet-*`` ends before any unit starts (a secret missing, say): its attempt
    never calls ``meanwhile``."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.recorded = threading.Condition()
        self.dropped = False

    def claim(self, job_id: str) -> JobDir:
        return JobDir(job_id, "running", f"/nonexistent/{job_id}")

    adopt = claim

    def attempt(
        self, job: JobDir, *, slot: str, meanwhile: Callable[[], None] | None = None
    ) -> Outcome:
        self.events.append(f"start {job.job_id}")
        if meanwhile is not None and not job.job_id.startswith("quiet-"):
            meanwhile()  # its unit has been asked for
        self.events.append(f"end {job.job_id}")
        return cast(Outcome, job.job_id)

    def record(self, outcome: Outcome) -> None:
        with self.recorded:
            self.events.append(f"record {outcome}")
            self.recorded.notify_all()

    def make_ahead(self, jobs: int) -> None:
        with self.recorded:
            self.events.append("ahead")
            self.recorded.notify_all()

    def drop_ahead(self) -> None:
        self.dropped = True

    def detach_all(self) -> int:
        return 0

    def interrupt_all(self) -> int:
        return 0

    def jobs(self) -> list[str]:
        """What it was asked about jobs, in order (not when it made ahead)."""
        with self.recorded:
            return [event for event in self.events if event != "ahead"]

    def wait_recorded(self, job_id: str) -> None:
        with self.recorded:
            assert self.recorded.wait_for(lambda: f"record {job_id}" in self.events, 30.0), (
                self.events
            )


@pytest.fixture
def slot() -> Iterator[tuple[WorkerPool, _Runner]]:
    runner = _Runner()
    pool = WorkerPool(cast(JobRunner, runner), ["0"], LOGGER, on_done=lambda job_id: None,
                      clock=SystemClock())  # fmt: skip
    yield pool, runner
    pool.stop(5.0, SystemClock())


def test_a_slot_records_an_end_while_its_next_job_starts_and_at_once_when_none_waits(
    slot: tuple[WorkerPool, _Runner],
) -> None:
    """It makes ahead for the next starts then too, and whenever it waits; a stop drops that."""
    pool, runner = slot
    for job_id in ("a", "b"):
        pool.submit(job_id)
    pool.start()
    with runner.recorded:
        assert runner.recorded.wait_for(lambda: runner.events.count("ahead") == 3, 30.0)
    assert runner.events == [
        "start a", "ahead", "end a",
        "start b", "record a", "ahead", "end b",
        "record b", "ahead",
    ]  # fmt: skip
    pool.submit("c")  # nothing after it: its end is recorded at once
    runner.wait_recorded("c")
    assert runner.jobs()[6:] == ["start c", "end c", "record c"]
    pool.stop(5.0, SystemClock())
    assert runner.dropped


def test_an_attempt_that_started_no_unit_records_the_last_end_before_its_own(
    slot: tuple[WorkerPool, _Runner],
) -> None:
    pool, runner = slot
    for job_id in ("a", "quiet-b", "c"):
        pool.submit(job_id)
    pool.start()
    runner.wait_recorded("c")
    assert runner.jobs() == [
        "start a", "end a",
        "start quiet-b", "end quiet-b", "record a",
        "start c", "record quiet-b", "end c",
        "record c",
    ]  # fmt: skip


def test_a_slot_adopting_a_unit_records_its_last_end_before_it_waits(tmp_path: Path) -> None:
    """An adopted unit may run on for hours: the end the slot holds is not kept waiting."""
    spool = Spool(tmp_path / "spool")
    spool.init()
    location = spool.dir("running") / "j"
    (location / "units").mkdir(parents=True)
    (location / "units" / "1").write_text(json.dumps({"pid": 1, "started_at": "then"}))
    (location / "units" / "1.end").write_text(json.dumps({"exit_code": 0}))
    calls: list[str] = []
    processes = Supervised(
        Launcher(), spool.jobs, JobDir("j", "running", str(location)), masker=Masker(),
        log_limit=None, host="h", resume=True, meanwhile=lambda: calls.append("meanwhile"),
    )  # fmt: skip
    log = JobLog(io.BytesIO(), SystemClock())
    ended = processes.run(
        ["true"], key="1", cwd=tmp_path, env={}, log=log, clock=SystemClock(), timeout=None,
        kill_grace=1.0, cancel=threading.Event(), detach=threading.Event(),
    )  # fmt: skip
    assert ended.exit_code == 0, "the outcome as recorded"
    assert calls == ["meanwhile"]


class _Elsewhere(Executor):
    """Work that runs without a supervisor (as a container does), for as long as it takes."""

    name = "elsewhere"
    schema_resource = "none.schema.json"
    seen: ClassVar[list[str]] = []

    def execute(self, ctx: RunContext) -> ExecResult:
        self.seen.append("execute")
        return ExecResult(exit_code=0)


def test_a_unit_without_a_supervisor_records_the_slots_last_end_before_it_runs(
    tmp_path: Path,
) -> None:
    """Such a unit may run for hours in the slot's own thread: the end the slot holds is
    recorded first, not when the unit is over."""
    spool = Spool(tmp_path / "spool")
    spool.init()
    (spool.dir("incoming") / "e.yaml").write_text("job_id: e\nexecutor: elsewhere\nproduct: {}\n")
    taken = spool.stages.take_incoming("e.yaml", now=time.time(), max_size=1 << 20)
    assert taken is not None
    spool.stages.accept(taken, "e", {"job_id": "e", "state": "pending"}, "accepted\n")
    config = Config(spool=spool.root, workdir=tmp_path / "work", hostname="here", worker_id="w")
    launcher = Launcher()
    try:
        runner = JobRunner(spool, ExecutorRegistry({"elsewhere": _Elsewhere}), config,
                           SystemClock(), LOGGER, launcher=launcher)  # fmt: skip
        job = runner.claim("e")
        assert job is not None
        _Elsewhere.seen.clear()
        outcome = runner.attempt(job, meanwhile=lambda: _Elsewhere.seen.append("meanwhile"))
        assert outcome is not None
        assert _Elsewhere.seen == ["meanwhile", "execute"]
        final = runner.record(outcome)
        assert final is not None and final.directory == "done", final
    finally:
        launcher.close()
