"""What ``spoold hosts`` and ``spoold status`` say of the hosts sharing a spool when the command
runs where no daemon runs: whose view is believed (only one no other believed view calls stale
or gone, the newest first), a host's own record as the evidence of itself, and a waiting job's
reasons that count another host's daemon (SPEC section 11)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

from spoold.core.config import Config
from spoold.core.spool import Spool
from spoold.face.views import daemon_text, hosts_rows, waiting_reasons
from spoold.run.hostbeat import HostBeat
from tests.fakes import FakeClock
from tests.harness import run_cli

LOG = logging.getLogger("spoold.test")
T = datetime(2026, 12, 6, 23, 0, 0, tzinfo=UTC)
LEASE_TIMEOUT = 3.0


def _spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.init()
    return spool


def _config(spool: Spool, host: str) -> Config:
    return Config(spool=spool.root, runner_id=host, hostname="vm", worker_id=f"{host}-1",
                  lease_timeout=LEASE_TIMEOUT, heartbeat_interval=1.0)  # fmt: skip


def _beat(spool: Spool, host: str, clock: FakeClock,
          running: Callable[[], Iterable[str]] = list) -> HostBeat:  # fmt: skip
    return HostBeat(spool, _config(spool, host), clock, LOG, running=running)


def _run(clock: FakeClock, seconds: int, *beats: HostBeat) -> None:
    """``seconds`` of beats, one a second each, as daemons that live that long."""
    for _ in range(seconds):
        clock.advance(1.0)
        for beat in beats:
            beat.tick(clock.monotonic())


def _rows(spool: Spool, host: str = "hC") -> dict[str, dict[str, object]]:
    return {row["host"]: row for row in hosts_rows(spool, _config(spool, host))}


def test_a_host_killed_long_ago_vouches_for_nobody(tmp_path: Path) -> None:
    """The probe: hA killed (kill -9) about 5 minutes before hB, hB 15 s before ``RUNNER_ID=hC
    spoold hosts``. hA's last record still says hB alive and hA runs long3, long4."""
    spool = _spool(tmp_path)
    clock = FakeClock(T)
    a = _beat(spool, "hA", clock, running=lambda: ["long3", "long4"])
    b = _beat(spool, "hB", clock)
    _run(clock, 5, a, b)
    _run(clock, 300, b)  # hA was killed: only hB beats, and finds hA stale
    clock.advance(15)  # hB killed too
    rows = _rows(spool)
    # hA's view (hB alive) is not taken: the newest record is hB's own, and hB's view says hA
    # stale. That hB died 15 s ago no command without a clock that watched can know.
    assert rows["hB"]["seen_by"] == "hB", rows["hB"]
    assert (rows["hA"]["state"], rows["hA"]["seen_by"]) == ("stale", "hB"), rows["hA"]
    assert rows["hA"]["running"] == ["long3", "long4"]
    assert rows["hA"]["running_as_of"] == spool.hosts.read("hA")["beat"]  # type: ignore[index]
    assert rows["hB"]["running_as_of"] is None


def test_spoold_hosts_dates_the_jobs_of_a_host_that_is_not_alive(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    clock = FakeClock(T)
    a = _beat(spool, "hA", clock, running=lambda: ["long3", "long4"])
    b = _beat(spool, "hB", clock)
    _run(clock, 5, a, b)
    _run(clock, 30, b)  # hA killed: hB finds it stale
    shown = run_cli(spool.root, "hosts", env={"RUNNER_ID": "hC"})
    assert shown.returncode == 0, shown.stderr
    line = next(line for line in shown.stdout.splitlines() if line[1:].startswith("hA "))
    beat = spool.hosts.read("hA")["beat"]  # type: ignore[index]
    assert f"runs 2 as of beat {beat}: long3, long4" in line, line
    line = next(line for line in shown.stdout.splitlines() if line[1:].startswith("hB "))
    assert "as of beat" not in line, line


def test_the_one_live_daemon_is_shown_by_its_own_record(tmp_path: Path) -> None:
    """A single daemon (hB) and a host gone long ago: from hC, hB is alive by its own record,
    not ``unknown ... no daemon's view``."""
    spool = _spool(tmp_path)
    clock = FakeClock(T)
    a, b = _beat(spool, "hA", clock), _beat(spool, "hB", clock)
    _run(clock, 3, a, b)
    a.stopped()
    _run(clock, 10, b)
    rows = _rows(spool)
    assert (rows["hB"]["state"], rows["hB"]["seen_by"]) == ("alive", "hB"), rows["hB"]
    assert rows["hA"]["state"] == "gone"
    only = _spool(tmp_path / "alone")
    _run(clock, 2, _beat(only, "hB", clock))
    assert (_rows(only)["hB"]["state"], _rows(only)["hB"]["seen_by"]) == ("alive", "hB")


def test_of_two_live_daemons_the_newest_view_is_taken_and_a_stale_observer_is_not(
    tmp_path: Path,
) -> None:
    """Three daemons; hA frozen past the lease: the others call it stale, and its view (all
    alive, as it last looked) is taken for nothing."""
    spool = _spool(tmp_path)
    clock = FakeClock(T)
    a, b, d = (_beat(spool, host, clock) for host in ("hA", "hB", "hD"))
    _run(clock, 3, a, b, d)
    _run(clock, 10, b, d)  # hA frozen
    rows = _rows(spool)
    assert rows["hA"]["state"] == "stale" and rows["hA"]["seen_by"] in ("hB", "hD")
    assert {rows["hB"]["state"], rows["hD"]["state"]} == {"alive"}
    assert "hA" not in {rows["hB"]["seen_by"], rows["hD"]["seen_by"]}


def test_a_daemon_restarted_is_newer_than_the_view_of_its_last_run(tmp_path: Path) -> None:
    """A restart counts beats from 0 again: a view that saw beat 40 of the old run has not
    seen the new run, however low its beat."""
    spool = _spool(tmp_path)
    clock = FakeClock(T)
    a, b = _beat(spool, "hA", clock), _beat(spool, "hB", clock)
    _run(clock, 40, a, b)
    _run(clock, 10, a)  # hB killed; hA finds it stale
    b2 = _beat(spool, "hB", clock)  # hB's daemon started again; hA killed meanwhile
    _run(clock, 2, b2)
    rows = _rows(spool)
    assert (rows["hB"]["state"], rows["hB"]["seen_by"]) == ("alive", "hB"), rows["hB"]
    assert rows["hA"]["seen_by"] == "hB" and rows["hA"]["state"] == "alive"  # hB's 2 s look


def test_this_hosts_record_without_its_daemon_is_not_alive(tmp_path: Path) -> None:
    """hC's daemon was killed (its record not stopped, its lock free): on hC, the command
    knows better than any view."""
    spool = _spool(tmp_path)
    clock = FakeClock(T)
    c, b = _beat(spool, "hC", clock), _beat(spool, "hB", clock)
    _run(clock, 3, c, b)  # hC wrote last in each round: its record is the newest
    rows = _rows(spool, "hC")
    assert (rows["hC"]["state"], rows["hC"]["seen_by"]) == ("stale", "hC"), rows["hC"]
    assert (rows["hB"]["state"], rows["hB"]["seen_by"]) == ("alive", "hB"), rows["hB"]


def test_a_waiting_job_counts_another_hosts_daemon_and_names_hosts_by_id(tmp_path: Path) -> None:
    """The probe: ``spoold status ID`` on hC (host name vm) said ``waits: for a daemon: none
    runs on vm`` and ``daemon: none: no spoold runs on hC`` while hB served the spool."""
    spool = _spool(tmp_path)
    config = _config(spool, "hC")
    status = {"job_id": "j", "state": "pending", "executor": "local"}
    assert "for a daemon: none runs on hC for this spool" in "\n".join(
        waiting_reasons(spool, config, status)
    )
    assert daemon_text(spool, config).startswith("none: no spoold runs on hC")
    clock = FakeClock(T)
    _run(clock, 2, _beat(spool, "hB", clock))
    reasons = waiting_reasons(spool, config, status)
    assert not any("daemon" in reason for reason in reasons), reasons
    assert not any(" vm " in reason for reason in reasons), reasons
    assert daemon_text(spool, config) == "none on hC; served by host hB (alive, by its own record)"
