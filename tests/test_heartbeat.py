"""The lease heartbeat of every process that runs jobs (worker processes, `spoold exec`), on a
clock the test moves: what is due when, and a background thread that stops with its block."""

from __future__ import annotations

import threading

from spoold.run.heartbeat import LeaseHeartbeat
from tests.fakes import FakeClock


class Runner:
    """Counts what the heartbeat asks of a JobRunner."""

    def __init__(self) -> None:
        self.looks = self.renewals = self.retries = 0

    def check_cancels(self) -> int:
        self.looks += 1
        return 0

    def renew_leases(self) -> None:
        self.renewals += 1

    def retry_finishing(self) -> list[str]:
        self.retries += 1
        return []

    @property
    def counts(self) -> tuple[int, int, int]:
        return self.looks, self.renewals, self.retries


def test_cancels_are_looked_for_every_look_and_leases_renewed_every_beat() -> None:
    runner = Runner()
    # Times a float holds exactly: the sums are exact too.
    beat = LeaseHeartbeat(runner, every=0.5, look=0.25, now=1000.0)
    assert beat.tick(1000.125) == 1000.25 and runner.counts == (0, 0, 0), "nothing due yet"
    assert beat.tick(1000.25) == 1000.5 and runner.counts == (1, 0, 0)
    assert beat.tick(1000.5) == 1000.75 and runner.counts == (2, 1, 1), "renewed, and retried"
    assert beat.tick(1000.625) == 1000.75 and runner.counts == (2, 1, 1)
    beat.restart(1002.0)  # idle meanwhile: both periods count from now
    assert beat.next_due == 1002.25
    assert beat.tick(1002.125) == 1002.25 and runner.counts == (2, 1, 1)


def test_in_the_background_it_stops_with_its_block() -> None:
    clock = FakeClock()
    runner = Runner()
    beat = LeaseHeartbeat(runner, every=3600.0, look=3600.0, now=clock.monotonic())
    with beat.in_background(clock):
        assert any(t.name == "spoold-heartbeat" for t in threading.enumerate())
    assert not any(t.name == "spoold-heartbeat" for t in threading.enumerate())
    assert runner.counts == (0, 0, 0)
