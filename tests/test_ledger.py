"""The one gate for a change of a job's state (spoold.run.ledger): every move checked against
states.TRANSITIONS before anything is written, its delivery prepared before and committed after
(dropped if the change fails), the listeners told; and no other code moves a job."""

from __future__ import annotations

import ast
import errno
import logging
import os
from pathlib import Path

import pytest

from spoold.core.errors import InvalidTransition, SpoolError
from spoold.core.job import JobStatus
from spoold.core.spool import JobDir, Spool
from spoold.core.states import TRANSITIONS, JobState
from spoold.out.outbox import CallbackTarget
from spoold.run.ledger import JobLedger, StateChange
from tests.fakes import FakeClock
from tests.test_outbox import callbacks, status

ROOT = Path(__file__).resolve().parent.parent
TARGET = CallbackTarget("http://127.0.0.1:9/hook", "s3cret", None)
#: A job's state as its directory shows it, and where a job in each state is made for a test.
DIRECTORY = {JobState.PENDING: "pending", JobState.RUNNING: "running",
             JobState.SUCCEEDED: "done", JobState.FAILED: "failed"}  # fmt: skip


def _spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.init()
    return spool


def _job_in(spool: Spool, job_id: str, state: JobState) -> JobDir:
    """A job directory in ``state``'s directory, with a status.json, as the stores leave one."""
    where = spool.dir(DIRECTORY[state]) / job_id
    where.mkdir()
    (where / "status.json").write_text(f'{{"job_id": "{job_id}", "state": "{state.value}"}}')
    (where / "log").write_text("")
    return JobDir(job_id, DIRECTORY[state], str(where))


@pytest.mark.parametrize("before", list(DIRECTORY))
@pytest.mark.parametrize(
    "after", [s for s in JobState if s not in (JobState.REJECTED, JobState.RUNNING)]
)
def test_every_move_is_checked_against_the_table_before_anything_is_written(
    tmp_path: Path, before: JobState, after: JobState
) -> None:
    spool = _spool(tmp_path)
    clock = FakeClock()
    ledger = JobLedger(spool, callbacks(spool, clock))
    job = _job_in(spool, "j1", before)
    new = status("j1", after)
    if after not in TRANSITIONS[before]:
        with pytest.raises(InvalidTransition):
            ledger.move(job, after, new, target=TARGET)
        assert Path(job.location, "status.json").read_text().find(before.value) > 0
        assert spool.jobs.find("j1") == job and spool.deliveries.names() == []
        assert new.callback_sequence == 0
        return
    moved = ledger.move(job, after, new, target=TARGET)
    assert moved.directory == after.directory and spool.jobs.find("j1") == moved
    assert spool.jobs.read_status(moved)["callback_sequence"] == 1
    assert [n for n in spool.deliveries.names() if n.startswith("j1~")] == ["j1~00000001.json"]


def test_a_change_that_fails_unrecorded_drops_its_delivery_and_tells_no_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = _spool(tmp_path)
    told: list[StateChange] = []
    ledger = JobLedger(spool, callbacks(spool, FakeClock()), listeners=[told.append])
    job = _job_in(spool, "j2", JobState.RUNNING)
    new = status("j2", JobState.SUCCEEDED)

    def disk_full(*args: object, **kwargs: object) -> JobDir:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(spool.jobs, "finish", disk_full)  # before its status is written
    with pytest.raises(OSError):
        ledger.move(job, JobState.SUCCEEDED, new, target=TARGET)
    assert spool.deliveries.names() == [] and new.callback_sequence == 0 and told == []


def test_a_change_that_fails_after_its_status_was_written_keeps_its_delivery(
    tmp_path: Path,
) -> None:
    """Its status records the outcome: whoever completes the move (a retry, a takeover)
    announces nothing more, so the delivery made for it stands. Listeners hear nothing: the
    move was not made."""
    spool = _spool(tmp_path)
    told: list[StateChange] = []
    ledger = JobLedger(spool, callbacks(spool, FakeClock()), listeners=[told.append])
    job = _job_in(spool, "j2", JobState.RUNNING)
    _job_in(spool, "j2", JobState.SUCCEEDED)  # in the way: the rename cannot be made
    new = status("j2", JobState.SUCCEEDED)
    with pytest.raises(SpoolError):
        ledger.move(job, JobState.SUCCEEDED, new, target=TARGET)
    assert spool.jobs.read_status(job)["callback_delivery"] == new.callback_delivery
    assert spool.deliveries.names() == ["j2~00000001.json"] and new.callback_sequence == 1
    assert told == []


def test_listeners_hear_every_change_and_one_that_fails_is_logged_not_felt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = _spool(tmp_path)
    told: list[StateChange] = []

    def broken(change: StateChange) -> None:
        raise RuntimeError("listener broke")

    ledger = JobLedger(spool, None, listeners=[broken, told.append])
    job = _job_in(spool, "j3", JobState.PENDING)
    with caplog.at_level(logging.ERROR, logger="spoold"):
        claimed = ledger.claim("j3")
        assert claimed is not None and ledger.claim("j3") is None  # one winner
        done = ledger.move(claimed, JobState.SUCCEEDED, status("j3", JobState.SUCCEEDED))
    assert [(c.before, c.after, c.job) for c in told] == [
        (JobState.PENDING, JobState.RUNNING, claimed),
        (JobState.RUNNING, JobState.SUCCEEDED, done),
    ]
    assert job.directory == "pending"
    assert caplog.text.count("unexpected failure in a listener of job j3") == 2


def test_a_new_job_enters_pending_with_its_accepted_event_and_nowhere_else(
    tmp_path: Path,
) -> None:
    spool = _spool(tmp_path)
    ledger = JobLedger(spool, callbacks(spool, FakeClock()))
    placed: list[str] = []

    def place() -> JobDir:
        placed.append("j4")
        return _job_in(spool, "j4", JobState.PENDING)

    with pytest.raises(InvalidTransition, match="a new job enters pending, not running"):
        ledger.enter(status("j4", JobState.RUNNING), TARGET, place)
    assert placed == [] and spool.deliveries.names() == []
    new: JobStatus = status("j4")
    job = ledger.enter(new, TARGET, place)
    assert job.directory == "pending" and new.callback_sequence == 1
    assert spool.deliveries.names() == ["j4~00000001.json"]


def test_no_code_but_the_ledger_moves_a_job() -> None:
    """Every caller goes through the gate: the stores' moving methods are called from the
    ledger alone, or in the placement it is handed (``enter(..., lambda: ...)``); a schedule's
    definition (``accept(..., schedule=True)``) is no job and has no state to change."""
    moving = {"finish", "requeue", "claim", "accept", "create_run"}
    callers = []
    for path in sorted((ROOT / "spoold").rglob("*.py")):
        if path.name == "ledger.py" or "spool" in path.relative_to(ROOT / "spoold").parts[:2]:
            continue
        tree = ast.parse(path.read_text())
        handed = {
            id(inner)
            for call in ast.walk(tree)
            if isinstance(call, ast.Call) and getattr(call.func, "attr", None) == "enter"
            for argument in call.args
            if isinstance(argument, ast.Lambda)
            for inner in ast.walk(argument)
        }
        for node in ast.walk(tree):
            if id(node) in handed or any(
                k.arg == "schedule" for k in getattr(node, "keywords", ())
            ):
                continue
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in moving
                and isinstance(node.func.value, ast.Attribute)
                and node.func.value.attr in ("jobs", "stages")
            ):
                callers.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.func.attr}(")
    assert callers == [], callers
