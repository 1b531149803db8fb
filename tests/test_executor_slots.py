"""``limits.executors`` across jobs: steps count with every job the daemon runs.

Found by reading the last round's closing note: a limit of one ``local`` (as a vendor's rate
limit is set) let two jobs' steps run side by side, one each, since each job counted its steps
alone; and a job with steps held a slot of its own executor while its steps held theirs. Now
each try of a step takes a slot of its executor from the same count as dispatch's jobs, and a
job with steps takes none. The steps hold on until the test lets them go (tests.test_steps_round31's
marks), so that steps allowed to overlap would be seen doing so; no sleep stands in for an order.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import pytest
from spoold.executors.base import ExecResult

from spoold.core.clock import SystemClock, rfc3339
from spoold.core.job import JobSpec
from spoold.core.joblog import JobLog
from spoold.run.dispatch import DispatchQueue, JobMeta
from spoold.run.executor_slots import LocalSlots
from spoold.run.pool import (
    SlotFreed,
    SlotGranted,
    SlotWanted,
    Stepping,
    receive_message,
    send_message,
)
from spoold.run.steps import StepsRun
from tests.harness import (
    StartDaemon,
    daemon_starter,
    drop,
    job_state,
    run_cli,
    wait_finished,
    wait_for,
)
from tests.test_steps_round31 import (
    BOUND,
    _assert_no_overlap,
    _held_step,
    _marks,
    _release_one_at_a_time,
    _shell_unit,
    _spans,
)

LOCAL = JobMeta("local")


# -- 1. dispatch counts steps' slots with its jobs ---------------------------------------------


def test_a_step_has_a_slot_while_its_executor_is_under_its_limit_and_waits_in_turn_after() -> None:
    queue = DispatchQueue({"local": 1})
    assert queue.want_slot((0, 1, "a"), "local")
    assert not queue.want_slot((0, 1, "b"), "local")
    assert not queue.want_slot((1, 2, "c"), "local")
    assert queue.granted() == []  # the one slot is a's
    queue.free_slot((0, 1, "a"))
    assert queue.granted() == [(0, 1, "b")]  # in the order they asked
    queue.free_slot((0, 1, "b"))
    assert queue.granted() == [(1, 2, "c")]
    assert queue.want_slot((0, 1, "d"), "docker")  # no limit: never counted


def test_a_step_asking_while_others_wait_queues_behind_them_even_with_a_slot_free() -> None:
    """Between a slot's release and ``granted`` (the pool frees under its lock, then grants
    in another turn of it), a step that asks meanwhile must not take the slot ahead of the
    steps that waited for it: they go first, in the order they asked."""
    queue = DispatchQueue({"local": 1})
    assert queue.want_slot((0, 1, "a"), "local")
    assert not queue.want_slot((0, 1, "b"), "local")
    queue.free_slot((0, 1, "a"))  # one slot free, b still waiting: granted() not yet called
    assert not queue.want_slot((1, 2, "late"), "local"), "it jumped the line"
    assert queue.granted() == [(0, 1, "b")]
    queue.free_slot((0, 1, "b"))
    assert queue.granted() == [(1, 2, "late")]


def test_a_job_of_an_executor_waits_behind_its_steps_and_its_steps_behind_its_jobs() -> None:
    queue = DispatchQueue({"local": 1})
    queue.add("plain", LOCAL)
    assert queue.take() == ("plain", None)
    assert not queue.want_slot((0, 1, "step"), "local")  # the job holds the slot
    queue.add("next", LOCAL)
    queue.finished("plain")
    assert queue.take() is None  # the step that waits goes first: it holds a worker slot
    assert queue.granted() == [(0, 1, "step")]
    queue.free_slot((0, 1, "step"))
    assert queue.take() == ("next", None)


def test_a_step_that_stops_waiting_leaves_the_line() -> None:
    queue = DispatchQueue({"local": 1})
    assert queue.want_slot((0, 1, "a"), "local")
    assert not queue.want_slot((0, 1, "b"), "local")
    queue.free_slot((0, 1, "b"))  # cancelled while it waited
    queue.add("plain", LOCAL)
    queue.free_slot((0, 1, "a"))
    assert queue.granted() == []
    assert queue.take() == ("plain", None)


def test_a_job_with_steps_holds_no_slot_of_its_executor() -> None:
    queue = DispatchQueue({"local": 1})
    # From its document: it has steps.
    assert JobMeta.from_document({"executor": "local", "steps": [{"id": "a"}]}).executor == ""
    # From a status.json written before its steps ever ran: it says nothing of them, and
    # counts as a local job until its worker says its steps start.
    queue.add("stepped", JobMeta.from_document({"executor": "local", "steps": {}}))
    assert queue.take() == ("stepped", None)
    assert not queue.want_slot((0, 1, "its-step"), "local")
    queue.stepping("stepped")
    assert queue.granted() == [(0, 1, "its-step")]
    queue.free_slot((0, 1, "its-step"))
    queue.finished("stepped")
    queue.add("plain", LOCAL)
    assert queue.take() == ("plain", None)  # nothing counted twice, nothing left over


def test_a_step_that_runs_already_is_counted_past_the_limit() -> None:
    queue = DispatchQueue({"local": 1})
    assert queue.want_slot((0, 1, "a"), "local")
    assert queue.want_slot((0, 1, "adopted"), "local", running=True)
    queue.free_slot((0, 1, "a"))
    queue.add("plain", LOCAL)
    assert queue.take() is None  # the adopted step still runs
    queue.free_slot((0, 1, "adopted"))
    assert queue.take() == ("plain", None)


def test_the_slots_of_a_worker_process_that_died_are_freed() -> None:
    queue = DispatchQueue({"local": 1})
    assert queue.want_slot((0, 100, "a"), "local")
    assert not queue.want_slot((0, 100, "b"), "local")
    assert not queue.want_slot((1, 200, "c"), "local")
    queue.free_slots(0, 100)  # its replacement has another pid
    assert queue.granted() == [(1, 200, "c")]


def test_the_slot_messages_go_between_processes_as_they_were_sent() -> None:
    from multiprocessing import Pipe  # noqa: PLC0415

    ours, theirs = Pipe()
    for message in (Stepping("job"), SlotWanted("7", "local", True), SlotFreed("7"),
                    SlotGranted("7")):  # fmt: skip
        send_message(ours, message)
        assert receive_message(theirs) == message


# -- 2. two jobs' steps in one process -----------------------------------------------------------


def _steps_run(
    job_id: str,
    steps: list[dict[str, Any]],
    slots: LocalSlots,
    *,
    log: io.BytesIO | None = None,
    cancel: threading.Event | None = None,
    previous: dict[str, Any] | None = None,
    adopted_from: str | None = None,
) -> StepsRun:
    """A job's steps run with ``slots`` under ``limits.executors: {local: 1}``; its timeout
    bounds what a wait for a slot that never comes would be: a failure, not a hang."""
    return StepsRun(
        JobSpec.from_document({"executor": "local", "steps": steps, "timeout": BOUND}, job_id),
        previous=previous or {}, run_unit=_shell_unit,
        log=JobLog(log or io.BytesIO(), SystemClock()), clock=SystemClock(),
        cancel=cancel or threading.Event(), parallel=4, executor_limits={"local": 1},
        slots=slots, on_change=lambda records: None, draw=lambda: 0.0, adopted_from=adopted_from,
    )  # fmt: skip


def test_two_jobs_steps_share_their_executors_slots(tmp_path: Path) -> None:
    marks = _marks(tmp_path)
    slots = LocalSlots({"local": 1})
    runs = [
        _steps_run("one", [_held_step("a", marks), _held_step("b", marks)], slots),
        _steps_run("two", [_held_step("c", marks), _held_step("d", marks)], slots),
    ]
    outcomes: list[ExecResult] = []
    threads = [threading.Thread(target=lambda r=run: outcomes.append(r.run()), daemon=True)
               for run in runs]  # fmt: skip
    for thread in threads:
        thread.start()
    order = _release_one_at_a_time(marks, ["a", "b", "c", "d"])
    for thread in threads:
        thread.join(BOUND)
    assert len(outcomes) == 2 and all(outcome.succeeded for outcome in outcomes), outcomes
    _assert_no_overlap(_spans(marks, order))


def test_a_step_cancelled_while_it_waits_for_a_slot_does_not_run(tmp_path: Path) -> None:
    marks = _marks(tmp_path)
    slots = LocalSlots({"local": 1})
    held = slots.claim("local")  # another job's step holds the one slot
    assert held.granted.is_set()
    cancel = threading.Event()
    log = io.BytesIO()
    run = _steps_run("j", [_held_step("a", marks)], slots, log=log, cancel=cancel)
    outcome: list[ExecResult] = []
    thread = threading.Thread(target=lambda: outcome.append(run.run()), daemon=True)
    thread.start()
    wait_for(lambda: b"waits for a local slot" in log.getvalue(), bound=BOUND, what="the wait")
    cancel.set()
    thread.join(BOUND)
    assert outcome and outcome[0].cancelled, outcome
    assert not (marks / "a.began").exists()
    held.give_back()
    assert slots.claim("local").granted.is_set()  # the cancelled step left the line


def test_a_step_that_ran_when_its_worker_went_goes_on_without_waiting_for_a_slot(
    tmp_path: Path,
) -> None:
    """Adopted, it runs already: it takes its slot back at once, past the limit."""
    marks = _marks(tmp_path)
    slots = LocalSlots({"local": 1})
    held = slots.claim("local")  # a step of another job took the slot while no daemon ran
    log = io.BytesIO()
    step = {**_held_step("a", marks), "product": {"commands": "true"}}
    run = _steps_run("j", [step], slots, log=log, previous={"a": {"state": "running"}},
                     adopted_from=rfc3339(SystemClock().now()))  # fmt: skip
    assert run.run().succeeded
    assert b"waits for" not in log.getvalue()
    held.give_back()


# -- 3. the daemon: steps of jobs in different worker processes ------------------------------


@pytest.fixture
def start_daemon(spool_dir: Path, tmp_path: Path) -> Any:
    yield from daemon_starter(spool_dir, tmp_path / "config.yaml")


def test_the_daemon_runs_one_local_step_or_job_at_a_time_under_limits_executors_local_1(
    spool_dir: Path, tmp_path: Path, start_daemon: StartDaemon
) -> None:
    marks = _marks(tmp_path)
    config = start_daemon(workers=3, worker_processes=3, limits={"executors": {"local": 1}}).config
    # One job names its steps' executor on each step, the other once for all of them.
    drop(spool_dir, "one.yaml", {"job_id": "one", "steps": [
        {**_held_step(step, marks), "executor": "local"} for step in ("a", "b")
    ]})  # fmt: skip
    drop(spool_dir, "two.yaml", {"job_id": "two", "executor": "local", "steps": [
        _held_step(step, marks) for step in ("c", "d")
    ]})  # fmt: skip
    wait_for(lambda: list(marks.glob("*.began")), bound=BOUND, what="a step to begin")
    plain = _held_step("e", marks)
    drop(spool_dir, "plain.yaml", {"job_id": "plain", "executor": "local",
                                   "product": plain["product"]})  # fmt: skip
    wait_for(lambda: (job_state(spool_dir, "plain") or ("",))[0] == "pending", bound=BOUND,
             what="the plain job accepted")  # fmt: skip
    # Why it waits, as `spoold status` tells: the slot a step holds.
    shown = run_cli(spool_dir, "status", "plain", "--config", str(config)).stdout
    assert "for a local slot: 1 running, limits.executors: 1" in shown, shown
    order = _release_one_at_a_time(marks, ["a", "b", "c", "d", "e"])
    for job_id in ("one", "two", "plain"):
        assert wait_finished(spool_dir, job_id)[0] == "done"
    _assert_no_overlap(_spans(marks, order))
