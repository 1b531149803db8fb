"""A host cut off from a shared spool ends the jobs another host would run again, before that
host may take them over (SPEC section 11: nothing accepted is run twice by accident).

The supervisor of such a job (``on_interrupt: requeue``) looks at its claim every
``heartbeat_interval``. Once the spool has been out of reach while the claim's beat was last
seen moving ``CutOff.after`` ago, and the host's record last showed another host that could
take the job over, it ends the job's processes; the job is then recorded as interrupted (if the
spool comes back first) or by its taker. Here the supervisor's watch (``_Keeper``) is driven
by hand, with a clock the test moves; on real sshfs, see tests/test_hosts_shared.py.
"""

from __future__ import annotations

import io
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from spoold.core.joblog import JobLog
from spoold.core.spool import JobDir
from spoold.core.spool.hosts import others_may_take_over
from spoold.run.launcher import CutOff, _Keeper
from tests.fakes import FakeClock

INTERVAL = 1.0
AFTER = 3.0


class Watch:
    """A running job's directory, its host's record, and a supervisor's watch over its claim."""

    def __init__(self, root: Path, view: dict[str, dict[str, str]] | None) -> None:
        self.location = root / "running" / "j"
        self.location.mkdir(parents=True)
        self.beat = 1
        self._lease()
        self.record = root / "hosts" / "h1"
        self.record.parent.mkdir()
        if view is not None:
            self.record.write_text(json.dumps({"host": "h1", "beat": 7, "view": view}))
        self.clock = FakeClock()
        self.cancel = threading.Event()
        self.output = io.BytesIO()
        self.worker, self.reply = socket.socketpair()  # the worker stays: nothing to read
        self.keeper = _Keeper(
            JobDir("j", "running", str(self.location), 1), self.reply, INTERVAL,
            cancel=self.cancel, log=JobLog(self.output, self.clock), clock=self.clock,
            cut_off=CutOff(AFTER, str(self.record), 6.0),
        )  # fmt: skip

    def _lease(self) -> None:
        (self.location / "lease").write_text(json.dumps({"generation": 1, "beat": self.beat}))

    def renew(self) -> None:
        """The worker beats: the lease's beat one higher."""
        self.beat += 1
        self._lease()

    def cut(self) -> None:
        """Every read of the job's directory fails now (ENOTDIR stands in for EIO)."""
        os.rename(self.location, f"{self.location}.away")
        self.location.write_text("")

    def mend(self) -> None:
        self.location.unlink()
        os.rename(f"{self.location}.away", self.location)

    def look(self) -> None:
        """One interval on, and the supervisor's turn."""
        self.clock.advance(INTERVAL)
        self.keeper(self.clock.monotonic())

    def log(self) -> str:
        return self.output.getvalue().decode()

    def close(self) -> None:
        self.worker.close()
        self.reply.close()


@pytest.fixture
def watch(tmp_path: Path) -> Iterator[Watch]:
    found = Watch(tmp_path, {"h2": {"state": "alive"}})
    yield found
    found.close()


def test_a_cut_off_supervisor_ends_its_job_once_the_claim_could_be_taken_over(
    watch: Watch,
) -> None:
    watch.look()  # the first look sees the beat: renewed now
    watch.cut()
    for _ in range(int(AFTER) - 1):
        watch.look()
        assert not watch.cancel.is_set(), "ended before its claim could be taken over"
    watch.look()
    assert watch.cancel.is_set() and watch.keeper.fenced
    assert watch.keeper.cut_off is not None
    assert (
        "out of reach" in watch.keeper.cut_off and "last seen moving 3s ago" in watch.keeper.cut_off
    )
    assert "this host's copy of it ends first" in watch.log(), watch.log()


def test_the_wait_counts_from_the_last_beat_seen_moving_not_from_the_last_look(
    watch: Watch,
) -> None:
    """A beat that stood still while the spool could still be read (the worker frozen) counts:
    the taker's clock ran from when it first saw that beat, not from the cut."""
    watch.look()
    watch.look()  # read, the beat unchanged: no renewal
    watch.look()
    watch.cut()
    watch.look()
    assert watch.cancel.is_set(), "the wait began again at the last look that read the claim"


def test_each_beat_seen_moving_starts_the_wait_again(watch: Watch) -> None:
    for _ in range(5):
        watch.renew()
        watch.look()
    watch.cut()
    watch.look()
    watch.look()
    assert not watch.cancel.is_set()
    watch.mend()
    watch.renew()
    watch.look()  # back, and renewed: a new start
    watch.cut()
    watch.look()
    watch.look()
    assert not watch.cancel.is_set()
    watch.look()
    assert watch.cancel.is_set()


@pytest.mark.parametrize(
    "view",
    [{}, {"h2": {"state": "gone"}}],
    ids=["alone", "the-other-said-it-stopped"],
)
def test_a_host_no_other_can_take_over_from_runs_its_job_on_through_a_cut(
    tmp_path: Path, view: dict[str, dict[str, str]]
) -> None:
    """On a spool no other host serves (or only ones that said they stopped), nothing would
    run the job again: it runs on, and is recorded once the spool is back."""
    watch = Watch(tmp_path, view)
    try:
        watch.look()
        watch.cut()
        for _ in range(20):
            watch.look()
        assert not watch.cancel.is_set() and watch.keeper.cut_off is None
    finally:
        watch.close()


def test_a_stale_host_may_come_back_and_take_over(tmp_path: Path) -> None:
    record = tmp_path / "h1"
    record.write_text(json.dumps({"view": {"h2": {"state": "gone"}, "h3": {"state": "stale"}}}))
    assert others_may_take_over(str(record))
    record.write_text(json.dumps({"view": {"h2": {"state": "gone"}}}))
    assert not others_may_take_over(str(record))
    record.unlink()  # no record yet: no view to go by
    assert others_may_take_over(str(record))


def test_without_a_cut_off_a_supervisor_waits_for_the_spool_however_long(tmp_path: Path) -> None:
    """A job its taker would not run again (``on_interrupt: fail``): it runs on."""
    watch = Watch(tmp_path, {"h2": {"state": "alive"}})
    try:
        watch.keeper = _Keeper(
            JobDir("j", "running", str(watch.location), 1), watch.reply, INTERVAL,
            cancel=watch.cancel, log=JobLog(watch.output, watch.clock), clock=watch.clock,
        )  # fmt: skip
        watch.look()
        watch.cut()
        for _ in range(20):
            watch.look()
        assert not watch.cancel.is_set()
    finally:
        watch.close()
