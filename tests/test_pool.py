"""How the daemon spreads its workers over worker processes (the processes themselves are
driven for real in test_daemon_chaos and test_daemon_intake)."""

from __future__ import annotations

import pytest

from spoold.pool import plan_slots


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
