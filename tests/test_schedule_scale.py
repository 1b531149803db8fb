"""Schedules by the thousand (issue 23): what registering one, and a round, read.

Intake hands the scheduler the one schedule it placed (``Scheduler.accept``): that one is read,
and no other. A round (``Scheduler.sync``) lists scheduled/ and stats each schedule's directory,
and reads only those whose stamp changed since their last read, or may still hide a change
(``SETTLE``): what ``spoold unschedule``, a definition replaced or a request file from any host
changes. The spool's job store is spied on to count what is read; the scheduler's clocks for
its stamps are the test's: ``wall_time`` an hour ahead (``old_wall``) makes every directory old, so
that its stamp stands for it at once, the epoch (``new_wall``) every one new, so that only SETTLE
seconds of its ``monotonic`` clock, which moves only when the test moves it, settle it. APScheduler is
registered for real but paused, as in test_schedule_control (the test, not the wall clock,
fires); where it is started for real, the schedules' firings are years ahead.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from apscheduler.schedulers.base import STATE_RUNNING

from spoold.core.clock import parse_rfc3339, rfc3339
from spoold.core.spool import JobDir, Spool
from spoold.core.spool.fs import LIST_EVERY, SETTLE
from spoold.core.spool.jobs import DirStamp
from spoold.face.schedules import pause, resume, run_now
from spoold.intake.incoming import Accepted, Intake
from spoold.schedule.scheduler import Scheduler
from spoold.schedule.triggers import EveryTrigger
from tests.daemon_bench import TickedDaemon
from tests.fakes import FakeClock
from tests.harness import local_job, run_cli, wait_for, write_config
from tests.test_schedule_timing import Dropping, schedule_validator

#: Dropped at a time with a fraction of a second, as real drops are.
T = datetime(2026, 11, 22, 10, 2, 47, 160000, tzinfo=UTC)
#: Years ahead of the real clock: APScheduler, started for real, waits for these firings.
FAR = datetime(2040, 1, 1, 9, 0, 0, 250000, tzinfo=UTC)
EVERY_MINUTE = {"every": "60s"}
ALICE = "alice on host2"
#: The job store's methods counted (the first argument names the job read or written).
SPIED = ("read_status", "read_job_file", "schedule_requests", "write_status")


def old_wall() -> float:
    """A wall clock to which every directory is an hour old at least."""
    return time.time() + 3600


def new_wall() -> float:
    """A wall clock to which every directory is new (made after it)."""
    return 0.0


class Reads:
    """What goes through a spool's job store, counted by method and job id."""

    def __init__(self, spool: Spool) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        for name in SPIED:
            setattr(spool.jobs, name, self._counting(name, getattr(spool.jobs, name)))

    def _counting(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def counted(job: JobDir, *args: Any, **kwargs: Any) -> Any:
            self.counts[name, job.job_id] += 1
            return method(job, *args, **kwargs)

        return counted

    def of(self, name: str) -> dict[str, int]:
        """Job id -> calls of ``name`` since the last ``clear``."""
        return {job_id: n for (method, job_id), n in self.counts.items() if method == name}

    def jobs(self) -> set[str]:
        """Every job id anything was read or written for since the last ``clear``."""
        return {job_id for _, job_id in self.counts}

    def clear(self) -> None:
        self.counts.clear()


class Bench(Dropping):
    """A spool, intake handing each schedule to ``Scheduler.accept``, and the scheduler, on one
    FakeClock; its stamps' clocks the test's (``wall``: old_wall or new_wall)."""

    def __init__(
        self, root: Path, *, wall: Callable[[], float], start: datetime = T, durable: bool = True
    ) -> None:
        self.root = root
        self.spool = Spool(root, durable=durable)
        self.spool.init()
        self.clock = FakeClock(start)
        self.elapsed = 0.0  # the scheduler's monotonic clock, for its stamps
        self.queued: list[str] = []
        self.said: list[str] = []
        self.logger = logging.getLogger(f"spoold.test.scale.{id(self)}")
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(_Said(self.said))
        self.wall = wall
        self.scheduler = self.new_scheduler()
        self.aps = self.scheduler._aps  # to ask it what it holds
        self.aps.start(paused=True)
        self.intake = Intake(
            self.spool, schedule_validator(), self.clock,
            max_file_size=1 << 20, settle_time=0.0, on_accepted=lambda job, document: None,
            logger=self.logger, on_scheduled=self.scheduler.accept,
        )  # fmt: skip
        self.reads = Reads(self.spool)

    def new_scheduler(self) -> Scheduler:
        return Scheduler(
            self.spool, self.clock, self.logger, queue=self._queue,
            defer=lambda run, when: None, cancel=lambda run, why: None, draw=lambda: 0.0,
            wall_time=self.wall, monotonic=lambda: self.elapsed,
        )  # fmt: skip

    def period(self, job_id: str) -> timedelta:
        """The period of the trigger APScheduler holds for ``job_id``."""
        job = self.aps.get_job(job_id)
        assert job is not None, f"APScheduler holds no {job_id}"
        assert isinstance(job.trigger, EveryTrigger)
        return job.trigger.period

    def directory(self, job_id: str) -> Path:
        return self.spool.dir("scheduled") / job_id


class _Said(logging.Handler):
    def __init__(self, said: list[str]) -> None:
        super().__init__(logging.INFO)
        self.said = said

    def emit(self, record: logging.LogRecord) -> None:
        self.said.append(record.getMessage())


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    made = Bench(tmp_path / "spool", wall=old_wall)
    yield made
    made.scheduler.stop()


def _after_a_tick(directory: Path) -> None:
    """Wait until the filesystem stamps a change later than ``directory``'s stamp (a schedule's
    directory, or one of the spool's own, such as scheduled/): a request made then changes it.
    (One made within that tick may not, where timestamps are coarse: what SETTLE guards
    against, and old_wall sets aside.)"""
    stamp = max(directory.stat().st_mtime_ns, directory.stat().st_ctime_ns)
    spool = directory.parent if (directory.parent / "tmp").is_dir() else directory.parent.parent
    probe = spool / "tmp" / "tick-probe"

    def later() -> bool:
        probe.touch()
        return probe.stat().st_mtime_ns > stamp

    wait_for(later, bound=10, what="the filesystem's clock to pass a directory's stamp")


# -- one schedule accepted: that one read -----------------------------------------------------


def test_a_schedule_accepted_is_registered_alone_from_what_intake_recorded(bench: Bench) -> None:
    for i in range(40):
        bench.drop(f"other-{i:02d}", EVERY_MINUTE)
    bench.reads.clear()
    bench.drop("new", EVERY_MINUTE)
    assert bench.reads.jobs() <= {"new"}, "no other schedule read"
    # Registered from the status intake wrote and handed over: not read back, nor asked of
    # (a request made in the moment since is the next round's: SETTLE).
    assert bench.reads.of("read_status") == {} and bench.reads.of("schedule_requests") == {}
    assert bench.reads.of("read_job_file") == {}, "nothing to run: its definition from status"
    assert bench.reads.of("write_status") == {}, "intake recorded its next firings already"
    assert "new" in bench.scheduler.registered() and bench.period("new") == timedelta(minutes=1)
    assert "schedule new registered (every 60s in UTC, catch_up: once, overlap: skip)" in bench.said
    shown = [parse_rfc3339(t) for t in bench.status("new")["next_fire_times"]]
    assert shown == [T + timedelta(minutes=k) for k in (1, 2, 3)]
    assert bench.status("new")["paused"] is False


def test_a_definition_replaced_is_registered_again_alone(bench: Bench) -> None:
    for i in range(10):
        bench.drop(f"other-{i:02d}", EVERY_MINUTE)
    bench.drop("beat", {"every": "20s"})
    before = bench.scheduler.registered()["beat"]
    bench.clock.advance(5.5)
    bench.reads.clear()
    bench.drop("beat", {"every": "30s"})
    assert bench.reads.jobs() == {"beat"}
    assert bench.reads.of("read_status") == {"beat": 1}, "intake's (its history) alone"
    assert bench.period("beat") == timedelta(seconds=30)
    assert bench.scheduler.registered()["beat"] != before
    bench.reads.clear()
    bench.scheduler.sync()
    assert bench.reads.jobs() == set(), "registered once: the round finds nothing new"


def test_the_same_file_dropped_again_counts_from_its_new_acceptance(bench: Bench) -> None:
    """Same sha256, new ``accepted_at``: ``every:`` counts from it, and APScheduler with it."""
    bench.drop("beat", {"every": "20s"})
    bench.clock.advance(7.25)
    again = bench.clock.now()
    bench.drop("beat", {"every": "20s"})
    job = bench.aps.get_job("beat")
    assert job is not None and job.trigger.start == again + timedelta(seconds=20)


# -- a round: what changed, from any host -----------------------------------------------------


def test_a_round_reads_no_schedule_while_none_changed(bench: Bench) -> None:
    for i in range(30):
        bench.drop(f"s-{i:02d}", EVERY_MINUTE)
    bench.reads.clear()
    for _ in range(3):
        bench.scheduler.sync()
    assert bench.reads.jobs() == set()
    assert len(bench.scheduler.registered()) == 30


def test_a_schedule_removed_by_another_host_is_unregistered_at_the_next_round(
    bench: Bench,
) -> None:
    for i in range(20):
        bench.drop(f"s-{i:02d}", EVERY_MINUTE)
    Spool(bench.root, host="h2").jobs.unschedule("s-05")  # no daemon of this host woken
    bench.reads.clear()
    bench.scheduler.sync()
    assert "s-05" not in bench.scheduler.registered()
    assert bench.aps.get_job("s-05") is None, "APScheduler wakes spoold for it no more"
    assert "schedule s-05 removed" in bench.said
    assert bench.reads.jobs() == set(), "found missing from the listing: nothing read"
    assert len(bench.scheduler.registered()) == 19


def test_a_definition_replaced_on_another_host_is_registered_at_the_next_round(
    bench: Bench, tmp_path: Path
) -> None:
    for i in range(10):
        bench.drop(f"s-{i:02d}", EVERY_MINUTE)
    bench.drop("beat", {"every": "20s"})
    other = Bench(tmp_path / "spool", wall=old_wall)  # host 2's intake, and its own scheduler
    try:
        other.drop("beat", {"every": "45s"})
    finally:
        other.scheduler.stop()
    bench.reads.clear()
    bench.scheduler.sync()
    assert bench.reads.jobs() == {"beat"}, "its directory is a new one: only it is read"
    assert bench.period("beat") == timedelta(seconds=45)


def test_requests_from_another_host_are_acted_on_at_the_next_round_reading_only_theirs(
    bench: Bench,
) -> None:
    for i in range(20):
        bench.drop(f"s-{i:02d}", EVERY_MINUTE)
    bench.drop("beat", {"every": "20s", "overlap": "allow"})
    other = Spool(bench.root, host="h2")  # a face on another host: no daemon here woken

    _after_a_tick(bench.directory("beat"))
    pause(other, "beat", who=ALICE, now=bench.clock.now())
    bench.reads.clear()
    bench.scheduler.sync()
    assert bench.reads.jobs() == {"beat"}, "only the schedule whose directory changed"
    status = bench.status("beat")
    assert (status["paused"], status["paused_by"], status["next_fire_times"]) == (True, ALICE, [])

    bench.scheduler.sync()  # its own write changed the stamp: read once more, then no more
    bench.reads.clear()
    bench.scheduler.sync()
    assert bench.reads.jobs() == set()

    _after_a_tick(bench.directory("beat"))
    bench.clock.advance(3)
    run = run_now(other, "beat", who=ALICE, now=bench.clock.now())
    bench.reads.clear()
    bench.scheduler.sync()
    assert bench.queued == [run], "a run now, paused or not"
    assert bench.reads.jobs() == {"beat"}
    assert bench.reads.of("read_job_file") == {"beat": 2}, "for the run: its document, its copy"

    _after_a_tick(bench.directory("beat"))
    resume(other, "beat", who=ALICE, now=bench.clock.now())
    bench.scheduler.sync()
    assert bench.status("beat")["paused"] is False
    assert not (bench.directory("beat") / "resumed").exists(), "noted, then removed"


def test_a_request_a_coarse_timestamp_hides_is_acted_on_at_the_next_round(tmp_path: Path) -> None:
    """Made within the filesystem's tick of the last read, a request may leave the directory's
    stamp as it was (here forced so, as a coarse clock would): a stamp is taken for read only
    once a read came SETTLE seconds after it was first seen, so the next round reads it."""
    bench = Bench(tmp_path / "spool", wall=new_wall)
    try:
        bench.drop("beat", {"every": "20s"})
        hidden: dict[str, DirStamp] = {}
        listing = bench.spool.jobs.entry_stamps

        def coarse(directory: str) -> dict[str, DirStamp]:
            return {**listing(directory), **hidden}

        setattr(bench.spool.jobs, "entry_stamps", coarse)  # noqa: B010 - a spy on the instance
        stamp = bench.spool.jobs.stamp_of(bench.spool.jobs.get("beat"))
        assert stamp is not None
        hidden["beat"] = stamp
        pause(Spool(bench.root), "beat", who=ALICE, now=bench.clock.now())
        bench.scheduler.sync()
        assert bench.status("beat")["paused"] is True

        # Its own write, hidden too. Read at each round until a read comes SETTLE after the
        # stamp was first seen; then no more until it changes.
        bench.scheduler.sync()
        bench.elapsed += SETTLE
        bench.reads.clear()
        bench.scheduler.sync()
        assert bench.reads.of("read_status") == {"beat": 1}, "the read that settles it"
        bench.reads.clear()
        bench.scheduler.sync()
        assert bench.reads.jobs() == set()
    finally:
        bench.scheduler.stop()


# -- thousands --------------------------------------------------------------------------------


def test_2000_schedules_are_registered_with_a_bounded_number_of_reads(tmp_path: Path) -> None:
    bench = Bench(tmp_path / "spool", wall=new_wall, durable=False)
    try:
        count = 2000
        for i in range(count):
            bench.drop(f"s-{i:04d}", EVERY_MINUTE)
        assert len(bench.scheduler.registered()) == count
        assert len(bench.aps.get_jobs()) == count
        assert bench.reads.of("read_status") == {}, "registered from what intake wrote"
        assert bench.reads.of("read_job_file") == {} and bench.reads.of("write_status") == {}

        # New directories: their stamps stand for them once a read came SETTLE after them.
        bench.reads.clear()
        bench.scheduler.sync()
        bench.elapsed += SETTLE
        bench.scheduler.sync()
        reads = bench.reads.of("read_status")
        assert len(reads) == count and set(reads.values()) == {2}, "twice more each, at most"
        bench.reads.clear()
        for _ in range(3):
            bench.scheduler.sync()
        assert bench.reads.jobs() == set(), "then none while nothing changes"
    finally:
        bench.scheduler.stop()


def test_schedules_placed_together_wake_apscheduler_once(bench: Bench) -> None:
    """A running APScheduler wakes its thread for every job added (~60 µs of CPU each, and
    10,000 schedules dropped at once came to over 10 s): a group intake placed together is
    registered with it paused, and it wakes once after; one placed alone, once too."""
    woken = _count_wakeups(bench)
    names = []
    for i in range(20):
        names.append(f"g-{i:02d}.yaml")
        document = local_job(f"g-{i:02d}", "true", schedule=EVERY_MINUTE)
        (bench.spool.dir("incoming") / names[-1]).write_text(yaml.safe_dump(document))
    outcomes = bench.intake.offer_all(names, complete=True)
    assert all(isinstance(outcome, Accepted) for outcome in outcomes)
    assert len(woken) == 1, "one wake-up for the group"
    assert bench.aps.state == STATE_RUNNING, "and running again"
    assert sorted(job.id for job in bench.aps.get_jobs()) == [f"g-{i:02d}" for i in range(20)]
    assert bench.period("g-07") == timedelta(minutes=1)
    bench.drop("alone", EVERY_MINUTE)
    assert len(woken) == 2 and bench.aps.state == STATE_RUNNING


def test_schedules_another_host_placed_wake_apscheduler_once_at_the_next_round(
    bench: Bench, tmp_path: Path
) -> None:
    """The same for a round that finds schedules placed by another host (intake there)."""
    woken = _count_wakeups(bench)
    other = Bench(tmp_path / "spool", wall=old_wall)
    try:
        for i in range(15):
            other.drop(f"h2-{i:02d}", EVERY_MINUTE)
    finally:
        other.scheduler.stop()
    bench.scheduler.sync()
    assert len(woken) == 1, "one wake-up for the round"
    assert bench.aps.state == STATE_RUNNING
    assert sorted(job.id for job in bench.aps.get_jobs()) == [f"h2-{i:02d}" for i in range(15)]


def _count_wakeups(bench: Bench) -> list[bool]:
    """Run the bench's APScheduler, and count its wake-ups from now on."""
    bench.aps.resume()
    woken: list[bool] = []
    wake = bench.aps.wakeup

    def counted() -> None:
        woken.append(True)
        wake()

    bench.aps.wakeup = counted
    return woken


def test_a_start_reads_each_schedule_once_fires_what_was_missed_then_runs_apscheduler(
    tmp_path: Path,
) -> None:
    first = Bench(tmp_path / "spool", wall=old_wall, start=FAR)
    for i in range(5):
        first.drop(f"s-{i}", {"every": "1h", "catch_up": "once"})
    first.scheduler.stop()
    first.clock.advance(3 * 3600 + 120)  # down for three firings of each
    restarted = Bench(tmp_path / "spool", wall=old_wall, start=first.clock.now())
    restarted.scheduler.stop()  # the bench's own, paused; this one starts as the daemon's does
    scheduler = restarted.new_scheduler()
    try:
        scheduler.start()
        assert scheduler._aps.running and len(scheduler._aps.get_jobs()) == 5
        assert restarted.reads.of("read_status") == {f"s-{i}": 1 for i in range(5)}
        assert sorted(restarted.queued) == [
            f"s-{i}@{(FAR + timedelta(hours=3)).strftime('%Y%m%dT%H%M%SZ')}" for i in range(5)
        ], "the newest missed firing of each, once"
        notes = [n["what"] for n in restarted.status("s-0")["notes"]]
        assert any(n.startswith("caught up 3 firing(s) missed") for n in notes), notes
        assert restarted.status("s-0")["last_fired"] == rfc3339(FAR + timedelta(hours=3))
    finally:
        scheduler.stop()


# -- the daemon's wiring ----------------------------------------------------------------------


def test_the_daemons_intake_registers_the_schedule_it_accepts_alone(
    spool_dir: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "config.yaml", spool_dir, logdir=str(tmp_path / "log"),
                          heartbeat_interval="10s", lease_timeout="30s")  # fmt: skip
    clock = FakeClock(T)
    ticked = TickedDaemon(spool_dir, config, clock)
    try:
        ticked.tick()  # the first round: the first scan comes a rescan_interval later
        for i in range(15):
            ticked.drop(f"s-{i:02d}.yaml", local_job(f"s-{i:02d}", "true", schedule=EVERY_MINUTE))
        reads = Reads(ticked.daemon.spool)
        ticked.drop("new.yaml", local_job("new", "true", schedule=EVERY_MINUTE))
        assert reads.jobs() <= {"new"}, "the others are not read"
        assert ticked.registered("new")
        assert "schedule new registered" in ticked.log()

        assert run_cli(spool_dir, "unschedule", "s-03").returncode == 0
        clock.advance(1.0)  # no daemon to wake: the next scan (rescan_interval 1s)
        ticked.tick()
        assert not ticked.registered("s-03") and "schedule s-03 removed" in ticked.log()
    finally:
        ticked.close()


def test_a_directory_stamp_changes_with_each_request_and_a_replaced_definition(
    bench: Bench,
) -> None:
    """What the round relies on, on this filesystem: a request made or removed, status.json
    rewritten, and a new directory under the same name each give another stamp."""
    bench.drop("beat", {"every": "20s"})
    stamps = [bench.spool.jobs.entry_stamps("scheduled")["beat"]]
    other = Spool(bench.root)
    for change in (
        lambda: pause(other, "beat", who=ALICE),
        lambda: resume(other, "beat", who=ALICE),
        lambda: os.unlink(bench.directory("beat") / "resumed"),
        lambda: bench.drop("beat", {"every": "30s"}),
    ):
        _after_a_tick(bench.directory("beat"))
        change()
        stamps.append(bench.spool.jobs.entry_stamps("scheduled")["beat"])
    assert len(set(stamps)) == len(stamps), stamps
    assert stamps[-1][0] != stamps[0][0], "a replaced definition is a new directory"


# -- a round with nothing asked: one stat ---------------------------------------------------


class Listings:
    """How many times a round listed scheduled/ (``Jobs.entry_stamps``)."""

    def __init__(self, spool: Spool) -> None:
        self.count = 0
        listing = spool.jobs.entry_stamps

        def counted(directory: str) -> dict[str, DirStamp]:
            self.count += 1
            return listing(directory)

        setattr(spool.jobs, "entry_stamps", counted)  # noqa: B010 - a spy on the instance


def test_a_round_with_nothing_asked_lists_no_schedule(bench: Bench) -> None:
    """10,000 schedules cost 0.23 % of a core at rest when each round listed scheduled/ and
    stat'ed every schedule's directory; scheduled/'s own stamp tells when nothing was placed,
    removed or asked since the last listing."""
    for i in range(30):
        bench.drop(f"s-{i:02d}", EVERY_MINUTE)
    listings = Listings(bench.spool)
    bench.scheduler.sync()  # placed since the last round: listed
    assert listings.count == 1
    bench.reads.clear()
    for _ in range(5):
        bench.scheduler.sync()
    assert listings.count == 1, "nothing placed, removed or asked: scheduled/ alone stat'ed"
    assert bench.reads.jobs() == set()


def test_a_request_after_quiet_rounds_is_acted_on_at_the_next_round(bench: Bench) -> None:
    for i in range(10):
        bench.drop(f"s-{i:02d}", EVERY_MINUTE)
    bench.drop("beat", {"every": "20s", "overlap": "allow"})
    listings = Listings(bench.spool)
    for _ in range(3):
        bench.scheduler.sync()
    quiet = listings.count
    other = Spool(bench.root, host="h2")  # a face on another host

    _after_a_tick(bench.spool.dir("scheduled"))
    pause(other, "beat", who=ALICE, now=bench.clock.now())
    bench.reads.clear()
    bench.scheduler.sync()
    assert listings.count == quiet + 1
    assert bench.reads.jobs() == {"beat"}, "only the schedule whose directory changed"
    assert bench.status("beat")["paused"] is True

    for asked in (run_now, resume):
        for _ in range(2):
            bench.scheduler.sync()  # quiet again
        _after_a_tick(bench.spool.dir("scheduled"))
        bench.clock.advance(3)
        asked(other, "beat", who=ALICE, now=bench.clock.now())
        bench.scheduler.sync()
    assert len(bench.queued) == 1, "the run asked for, made at the round after it"
    assert bench.status("beat")["paused"] is False


def test_a_request_that_left_scheduled_alone_is_acted_on_within_list_every_rounds(
    bench: Bench,
) -> None:
    """A spoold that does not change scheduled/'s stamp (an older one sharing the spool) is
    heard all the same: every LIST_EVERY-th round lists scheduled/."""
    bench.drop("beat", {"every": "20s"})
    bench.scheduler.sync()
    listings = Listings(bench.spool)
    _after_a_tick(bench.directory("beat"))
    old = Spool(bench.root, host="old")
    setattr(old.jobs, "_requested", lambda: None)  # noqa: B010 - as a spoold before it did
    pause(old, "beat", who=ALICE, now=bench.clock.now())
    rounds = 0
    while not bench.status("beat")["paused"]:
        assert rounds < LIST_EVERY, f"not heard after {rounds} rounds"
        bench.scheduler.sync()
        rounds += 1
    assert listings.count == 1
    assert rounds > 1, "not heard at the first round: scheduled/ looked untouched"
