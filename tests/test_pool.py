"""How the daemon spreads its workers over worker processes (the processes themselves are
driven for real in test_daemon_chaos and test_daemon_intake)."""

from __future__ import annotations

import marshal
from multiprocessing import Pipe

import pytest

from spoold.core.errors import WorkerProcessError
from spoold.run.pool import (
    Done,
    Leaving,
    Ready,
    RunJob,
    Stop,
    plan_slots,
    receive_message,
    send_message,
)


@pytest.mark.parametrize(
    ("workers", "processes", "plan"),
    [
        (2, 2, [("0",), ("1",)]),
        (1, 4, [("0",)]),  # never a process without a slot
        (5, 2, [("0", "2", "4"), ("1", "3")]),
        (3, 1, [("0", "1", "2")]),
    ],
)
def test_slots_are_spread_round_robin(
    workers: int, processes: int, plan: list[tuple[str, ...]]
) -> None:
    assert plan_slots(workers, processes) == plan
    slots = [slot for group in plan for slot in group]
    assert sorted(slots, key=int) == [str(n) for n in range(workers)], "each slot once"


def test_messages_cross_intact() -> None:
    ours, theirs = Pipe()
    document = {"job_id": "a", "product": {"commands": ["x", "y"]}, "retries": 2, "on": True}
    for message in (RunJob("a", document), RunJob("b"), Stop(2.5), Ready(), Leaving(), Done("a")):
        send_message(ours, message)
        assert receive_message(theirs) == message


def test_a_document_marshal_cannot_take_goes_without_it() -> None:
    ours, theirs = Pipe()
    send_message(ours, RunJob("a", {"odd": object()}))
    assert receive_message(theirs) == RunJob("a", None)  # the worker reads job.yaml itself


def test_junk_on_the_wire_is_an_error_not_a_crash() -> None:
    ours, theirs = Pipe()
    for junk in (b"\xff\x00garbage", marshal.dumps(("launch", "missiles"))):
        ours.send_bytes(junk)
        with pytest.raises(WorkerProcessError):
            receive_message(theirs)
    ours.close()
    with pytest.raises(EOFError):
        receive_message(theirs)
