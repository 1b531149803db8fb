"""`every:` on time (issue 16): a run is made at its firing, and status shows the real firings.

The scheduler is driven with a FakeClock: APScheduler's part is only to call ``fire`` at the
times its trigger names, so the tests ask that trigger, as APScheduler does, and call ``fire``
then. One real-daemon test measures the lag between a firing and its run.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import json
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml
from apscheduler.triggers.interval import IntervalTrigger

from spoold.core.clock import parse_rfc3339, rfc3339
from spoold.core.secrets import SecretStore
from spoold.core.spool import Spool
from spoold.intake.incoming import Accepted, Intake, Rejected
from spoold.intake.validation import JobValidator, job_validator
from spoold.out.outbox import Callbacks, CallbackTarget
from spoold.run.dispatch import JobMeta
from spoold.run.registry import ExecutorRegistry
from spoold.schedule.scheduler import Scheduler
from spoold.schedule.triggers import EveryTrigger, ScheduleSpec, next_fire_times, plan
from tests.fakes import FakeClock
from tests.harness import DaemonProcess, drop, job_state, local_job, wait_for, write_config

#: Dropped at a time with a fraction of a second, as real drops are.
T = datetime(2026, 11, 22, 10, 2, 47, 160000, tzinfo=UTC)
SECRET = "s3cret"


class Dropping:
    """What a bench of a spool, its intake and a scheduler does with schedule files."""

    spool: Spool
    intake: Intake
    queued: list[str]

    def _queue(self, run: str, document: dict[str, Any], meta: JobMeta) -> None:
        self.queued.append(run)

    def drop(self, job_id: str, schedule: dict[str, Any]) -> None:
        path = self.spool.dir("incoming") / f"{job_id}.yaml"
        path.write_text(yaml.safe_dump(local_job(job_id, "true", schedule=schedule)))
        assert isinstance(self.intake.offer(path.name, complete=True), Accepted)

    def status(self, job_id: str) -> dict[str, Any]:
        return dict(self.spool.jobs.read_status(self.spool.jobs.get(job_id)))


class Bench(Dropping):
    """A spool, intake and the scheduler on one FakeClock; what the scheduler queued."""

    def __init__(
        self, root: Path, clock: FakeClock, *, callback: str | None = None,
        draw: Callable[[], float] = lambda: 0.0,
    ) -> None:  # fmt: skip
        """``callback``: every run's events go there (signed by ``SECRET``); ``draw``: the
        scheduler's jitter source."""
        self.spool = Spool(root)
        self.spool.init()
        self.clock = clock
        self.queued: list[str] = []
        self.deferred: list[tuple[str, float]] = []
        logger = logging.getLogger("spoold.test")
        callbacks = None
        if callback is not None:
            callbacks = Callbacks(self.spool, clock, SecretStore(None), logger=logger,
                                  default_url=callback, default_secret=SECRET)  # fmt: skip
        self.scheduler = Scheduler(
            self.spool, clock, logger, queue=self._queue,
            defer=lambda run, when: self.deferred.append((run, when)),
            cancel=lambda run, why: None, draw=draw, callbacks=callbacks,
        )  # fmt: skip
        # Registered for real, but paused: the test, not the wall clock, decides when it fires.
        self.aps = self.scheduler._aps  # to ask it what it was given
        self.aps.start(paused=True)
        self.intake = Intake(
            self.spool, schedule_validator(), clock,
            max_file_size=1 << 20, settle_time=0.0, on_accepted=lambda job, document: None,
            logger=logger, on_scheduled=lambda placed: self.scheduler.sync(),
        )  # fmt: skip

    def next_firings(self, job_id: str) -> list[datetime]:
        return [parse_rfc3339(t) for t in self.status(job_id)["next_fire_times"]]

    def fired(self, job_id: str) -> list[datetime]:
        return [parse_rfc3339(run["fired_at"]) for run in self.status(job_id).get("runs", [])]

    def wake_ups(self, job_id: str, count: int) -> list[datetime]:
        """When APScheduler calls ``fire``: its trigger asked as APScheduler asks it (first
        without a previous firing, then after each one), from the schedule's registration."""
        trigger = self.aps.get_job(job_id).trigger
        times = [trigger.get_next_fire_time(None, self.clock.now())]
        while len(times) < count:
            times.append(trigger.get_next_fire_time(times[-1], times[-1]))
        return times

    def at(self, moment: datetime, job_id: str) -> None:
        """Move the clock to ``moment`` and wake the scheduler there, as APScheduler would."""
        self.clock.advance((moment - self.clock.now()).total_seconds())
        self.scheduler.fire(job_id)


@functools.cache
def schedule_validator() -> JobValidator:
    return job_validator(ExecutorRegistry.from_entry_points())


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    made = Bench(tmp_path / "spool", FakeClock(T))
    yield made
    made.scheduler.stop()


def test_every_20s_makes_its_run_at_its_firing_not_a_period_later(bench: Bench) -> None:
    bench.drop("tick", {"every": "20s"})
    period = timedelta(seconds=20)
    shown = bench.next_firings("tick")
    assert shown == [T + period, T + 2 * period, T + 3 * period], "sub-second part included"
    assert bench.wake_ups("tick", 3) == shown, "APScheduler wakes spoold at those firings"

    bench.at(T + period - timedelta(milliseconds=1), "tick")
    assert bench.queued == [], "not a moment early"
    bench.at(T + period, "tick")
    [run] = bench.queued
    assert run == "tick@20261122T100307Z"
    assert bench.fired("tick") == [T + period]
    run_status = bench.status(run)
    assert parse_rfc3339(run_status["submitted_at"]) == T + period, "made at its firing"
    assert run_status["schedule"] == "tick"


def test_what_apscheduler_calls_is_the_schedulers_fire(bench: Bench) -> None:
    """APScheduler is handed a callable with ``fire``'s signature (it checks a job's arguments
    against it), and calling it as APScheduler does makes the firing's run."""
    bench.drop("tick", {"every": "20s"})
    job = bench.aps.get_job("tick")
    assert inspect.signature(job.func) == inspect.signature(bench.scheduler.fire)
    bench.clock.advance(20)
    job.func(*job.args, **job.kwargs)
    assert bench.queued == ["tick@20261122T100307Z"]


@pytest.mark.parametrize("where", ["pending", "done"])
def test_a_schedule_never_replaces_a_job_of_its_id(bench: Bench, where: str) -> None:
    """Intake looks for the schedule it replaces in scheduled/ alone; a job's id, wherever the
    job is, refuses the schedule as its stage is placed."""
    path = bench.spool.dir("incoming") / "taken.yaml"
    path.write_text(yaml.safe_dump(local_job("taken", "true")))
    assert isinstance(bench.intake.offer(path.name, complete=True), Accepted)
    if where == "done":
        (bench.spool.dir("pending") / "taken").rename(bench.spool.dir("done") / "taken")
    path.write_text(yaml.safe_dump(local_job("taken", "true", schedule={"every": "20s"})))
    refused = bench.intake.offer(path.name, complete=True)
    assert isinstance(refused, Rejected)
    assert refused.reason["code"] == "duplicate"
    assert f"already exists in {where}/" in refused.reason["reason"]
    assert bench.spool.jobs.get("taken").directory == where
    assert bench.aps.get_job("taken") is None


def _made_meanwhile_by(bench: Bench, run: str, hook: str) -> str:
    """Another host (``a``) making ``run``: its first delivery prepared, not committed."""
    other = Callbacks(Spool(bench.spool.root, host="a"), bench.clock, SecretStore(None),
                      logger=logging.getLogger("spoold.test"), host="a")  # fmt: skip
    return other._prepare(CallbackTarget(hook, SECRET, None), run, 1, {"event": "accepted"},
                          {"job": run}, exclusive=True)  # fmt: skip


def _fired_again(bench: Bench, job_id: str) -> list[datetime]:
    """When the firings again that the scheduler gave APScheduler will come."""
    return [job.next_run_time for job in bench.aps.get_jobs() if job.id.startswith(f"{job_id}~")]


def test_a_run_another_host_is_making_is_made_here_soon_after_that_host_fails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Hosts sharing a spool all fire each schedule; one run's first delivery, made
    exclusively, picks who makes it. A firing that meets that delivery only prepared (another
    host making the run, which may yet fail: a stale host's late change) is not taken for the
    run made: it fires again a second later, then two, and so on, until the run is made by
    either host (at the latest, once that host is found stale and its change dropped)."""
    hook = "http://127.0.0.1:9/hook"
    bench = Bench(tmp_path / "spool", FakeClock(T), callback=hook)
    try:
        bench.drop("tick", {"every": "20s", "overlap": "allow"})
        first = T + timedelta(seconds=20)
        run = f"tick@{first:%Y%m%dT%H%M%S}Z"
        late = _made_meanwhile_by(bench, run, hook)
        with caplog.at_level(logging.DEBUG, logger="spoold.test"):
            bench.at(first, "tick")
            assert bench.queued == [] and bench.fired("tick") == []
            assert _fired_again(bench, "tick") == [first + timedelta(seconds=1)]
            bench.at(first + timedelta(seconds=1), "tick")  # still under way
            assert _fired_again(bench, "tick") == [first + timedelta(seconds=3)]
        assert "fired again in 1s" in caplog.text and "fired again in 2s" in caplog.text
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        bench.spool.deliveries.remove(late)  # that host's change failed
        bench.at(first + timedelta(seconds=3), "tick")
        assert bench.queued == [run] and bench.fired("tick") == [first]
        assert _fired_again(bench, "tick") == []
        bench.at(first + timedelta(seconds=20), "tick")
        assert bench.queued == [run, f"tick@{first + timedelta(seconds=20):%Y%m%dT%H%M%S}Z"]
    finally:
        bench.scheduler.stop()


def test_a_start_catching_up_on_a_run_another_host_is_making_leaves_it_to_that_host(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Hosts started together catch up on the same missed firing as they register the
    schedule: the one that meets the run being made fires again soon, and logs no error."""
    hook = "http://127.0.0.1:9/hook"
    bench = Bench(tmp_path / "spool", FakeClock(T), callback=hook)
    bench.drop("beat", {"every": "20s", "overlap": "allow"})
    bench.scheduler.stop()
    bench.clock.advance(65)  # down: +20, +40 and +60 due, +60 on time at the next start
    run = "beat@20261122T100347Z"
    late = _made_meanwhile_by(bench, run, hook)
    again = Bench(tmp_path / "spool", bench.clock, callback=hook)
    try:
        with caplog.at_level(logging.DEBUG, logger="spoold.test"):
            again.scheduler.sync()
        assert again.queued == [] and "fired again in 1s" in caplog.text
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        [when] = _fired_again(again, "beat")
        again.spool.deliveries.remove(late)  # that host's change failed
        again.at(when, "beat")
        assert again.queued == [run]
    finally:
        again.scheduler.stop()


def test_a_schedule_and_its_runs_keep_its_labels_and_description(bench: Bench) -> None:
    """What `spoold status` and `list --label` show, kept where a submitter may read it."""
    path = bench.spool.dir("incoming") / "tagged.yaml"
    path.write_text(yaml.safe_dump(local_job(
        "tagged", "true", schedule={"every": "20s"}, labels={"team": "ops"},
        description="a tick",
    )))  # fmt: skip
    assert isinstance(bench.intake.offer(path.name, complete=True), Accepted)
    bench.at(bench.next_firings("tagged")[0], "tagged")
    [run] = bench.queued
    for status in (bench.status("tagged"), bench.status(run)):
        assert (status["labels"], status["description"]) == ({"team": "ops"}, "a tick"), status


def test_the_next_firings_status_shows_are_the_firings_recorded_afterwards(bench: Bench) -> None:
    bench.drop("beat", {"every": "7s", "overlap": "allow"})
    promised = bench.next_firings("beat")
    for moment in promised:
        bench.at(moment, "beat")
        made = bench.queued[-1]
        assert parse_rfc3339(bench.status(made)["submitted_at"]) == moment
    assert bench.fired("beat") == promised
    assert bench.status("beat")["last_fired"] == rfc3339(promised[-1])
    assert bench.next_firings("beat")[0] == promised[-1] + timedelta(seconds=7)
    assert len(bench.queued) == 3


def test_a_restart_keeps_the_grid_and_catches_up_on_it(bench: Bench, tmp_path: Path) -> None:
    bench.drop("beat", {"every": "20s", "catch_up": "once", "overlap": "allow"})
    bench.at(T + timedelta(seconds=20), "beat")
    # Down for 45 s: the firings at +40 and +60 are missed; a new daemon starts at +65.
    bench.clock.advance(45)
    again = Bench(tmp_path / "spool", bench.clock)
    try:
        again.scheduler.sync()
        assert again.queued == ["beat@20261122T100347Z"], "the newest missed firing, once"
        assert again.fired("beat")[-1] == T + timedelta(seconds=60)
        assert again.next_firings("beat")[0] == T + timedelta(seconds=80)
        assert again.wake_ups("beat", 1) == [T + timedelta(seconds=80)]
    finally:
        again.scheduler.stop()


def test_a_replaced_definition_counts_from_its_own_acceptance(bench: Bench) -> None:
    bench.drop("beat", {"every": "20s"})
    bench.at(T + timedelta(seconds=20), "beat")
    bench.clock.advance(5.5)
    replaced_at = bench.clock.now()
    bench.drop("beat", {"every": "1m"})
    assert bench.next_firings("beat")[0] == replaced_at + timedelta(minutes=1)
    assert bench.wake_ups("beat", 1) == [replaced_at + timedelta(minutes=1)]
    bench.at(T + timedelta(seconds=40), "beat")
    assert len(bench.queued) == 1, "the old definition's firing is gone with it"


def test_a_replaced_cron_definition_does_not_catch_up_on_firings_before_it(
    tmp_path: Path,
) -> None:
    """The history stays (``last_fired`` of the definition replaced), but the new definition's
    firings count from its acceptance: none before it is missed or caught up."""
    bench = Bench(tmp_path / "spool", FakeClock(datetime(2026, 11, 22, 10, 59, 30, tzinfo=UTC)))
    try:
        bench.drop("report", {"cron": "0 * * * *", "overlap": "allow"})
        eleven = datetime(2026, 11, 22, 11, 0, tzinfo=UTC)
        bench.at(eleven, "report")
        assert bench.queued == ["report@20261122T110000Z"]
        bench.clock.advance(40 * 60 + 30)  # 11:40:30
        bench.drop("report", {"cron": "*/5 * * * *", "catch_up": "once", "overlap": "allow"})
        assert bench.status("report")["last_fired"] == rfc3339(eleven), "the history stays"
        assert bench.queued == ["report@20261122T110000Z"], "no firing of 11:05 to 11:40"
        notes = [str(note["what"]) for note in bench.status("report")["notes"]]
        assert not any("caught up" in note or "skipped" in note for note in notes), notes
        first = datetime(2026, 11, 22, 11, 45, tzinfo=UTC)
        assert bench.next_firings("report")[0] == first
        bench.at(first, "report")
        assert bench.queued[1:] == ["report@20261122T114500Z"]
    finally:
        bench.scheduler.stop()


@pytest.mark.parametrize("overlap", ["queue", "replace"])
def test_runs_of_queue_and_replace_run_one_at_a_time(bench: Bench, overlap: str) -> None:
    """``replace`` cancels the run still going, and its own run waits for that one to end (a
    cancel takes SIGTERM and kill_grace): the runs share a concurrency key of limit 1."""
    bench.drop("one", {"every": "20s", "overlap": overlap})
    bench.at(T + timedelta(seconds=20), "one")
    [run] = bench.queued
    assert bench.status(run)["concurrency"] == {
        "key": "schedule:one", "limit": 1, "strategy": "queue",
    }  # fmt: skip


def test_jitter_holds_a_run_back_after_its_firing(tmp_path: Path) -> None:
    bench = Bench(tmp_path / "spool", FakeClock(T), draw=lambda: 0.5)
    try:
        bench.drop("spread", {"every": "20s", "jitter": "10s"})
        firing = T + timedelta(seconds=20)
        bench.at(firing, "spread")
        due = firing + timedelta(seconds=5)  # half of the jitter
        assert bench.queued == [], "made at its firing, but not queued before its jitter"
        assert bench.deferred == [("spread@20261122T100307Z", due.timestamp())]
        status = bench.status("spread@20261122T100307Z")
        assert status["next_attempt_at"] == rfc3339(due)
    finally:
        bench.scheduler.stop()


def test_a_cron_firing_just_made_is_not_shown_as_the_next_one(tmp_path: Path) -> None:
    bench = Bench(tmp_path / "spool", FakeClock(datetime(2026, 11, 22, 11, 59, 30, tzinfo=UTC)))
    try:
        bench.drop("hourly", {"cron": "0 * * * *"})
        noon = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
        bench.at(noon, "hourly")
        assert bench.fired("hourly") == [noon]
        assert bench.status(bench.queued[0])["submitted_at"] == rfc3339(noon)
        assert bench.next_firings("hourly")[0] == noon + timedelta(hours=1)
    finally:
        bench.scheduler.stop()


def test_the_every_trigger_is_exact_where_apschedulers_drifts() -> None:
    start = datetime(2026, 11, 22, 10, 2, 47, 160001, tzinfo=UTC)
    period = timedelta(seconds=7.3)
    ours = EveryTrigger(period, start=start, end=None)
    theirs = IntervalTrigger(seconds=7.3, start_date=start, timezone=UTC)
    moment, drifted = start, 0
    for k in range(1, 20_000):
        found = ours.get_next_fire_time(moment, moment)
        assert found == start + k * period
        moment = found
        drifted += theirs.get_next_fire_time(None, moment) != moment
    assert drifted, "float seconds: APScheduler's own grid misses some by a microsecond"
    later = start + 5 * period + timedelta(microseconds=1)
    assert ours.get_next_fire_time(None, later) == start + 6 * period
    assert ours.get_next_fire_time(None, start + 5 * period) == start + 5 * period
    assert ours.get_next_fire_time(start + 5 * period, later) == start + 6 * period


def test_every_counts_elapsed_time_through_the_autumn_clock_change() -> None:
    spec = ScheduleSpec.from_document({"every": "1h", "timezone": "Europe/Berlin"})
    since = datetime(2026, 10, 24, 22, 0, tzinfo=UTC)  # 00:00 local, the 25-hour day
    trigger = spec.trigger(since)
    day = next_fire_times(spec, trigger, since, 25)
    assert [b - a for a, b in itertools.pairwise(day)] == [timedelta(hours=1)] * 24
    local = [t.astimezone(ZoneInfo("Europe/Berlin")).strftime("%H:%M") for t in day]
    assert local.count("02:00") == 2, "the repeated hour fires twice: one hour apart each time"
    decided = plan(spec, trigger, last=None, since=since, now=day[-1])
    assert decided.fire[-1] == day[-1] and decided.notes  # caught up: the rest count as missed


def test_a_window_start_is_a_firing_and_the_grid_starts_there() -> None:
    spec = ScheduleSpec.from_document({"every": "90m", "window": {"start": "2026-12-01T08:00Z"}})
    anchor = datetime(2026, 11, 22, 12, 0, 0, 500000, tzinfo=UTC)
    times = next_fire_times(spec, spec.trigger(anchor), anchor, 3)
    first = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
    assert times == [first, first + timedelta(minutes=90), first + timedelta(minutes=180)]


# -- the real daemon -------------------------------------------------------------------------------

#: Generous (measured 1-6 ms on the 2-core test machine) for a loaded machine, and still half
#: of PERIOD: a run made a whole period late (as it was) fails.
LAG_BOUND = 2.0
PERIOD = 4


@pytest.mark.daemon
def test_the_daemon_makes_each_run_within_moments_of_its_firing(
    spool_dir: Path, tmp_path: Path
) -> None:
    daemon = DaemonProcess(spool_dir, write_config(tmp_path / "config.yaml", spool_dir))
    daemon.start()
    try:
        every = {"every": f"{PERIOD}s"}
        drop(spool_dir, "soon.yaml", local_job("soon", "true", schedule=every))
        status_file = spool_dir / "scheduled" / "soon" / "status.json"

        def schedule() -> dict[str, Any]:
            try:
                return dict(json.loads(status_file.read_text()))
            except (FileNotFoundError, ValueError):
                return {}

        # Read first after the first firing, or before: what it promises comes either way.
        promised = wait_for(lambda: schedule().get("next_fire_times"),
                            what="the schedule's next firings")  # fmt: skip

        def fired() -> list[str]:
            return [run["fired_at"] for run in schedule().get("runs", [])]

        last = parse_rfc3339(promised[-1])
        wait_for(lambda: fired() and parse_rfc3339(fired()[-1]) >= last,
                 what="runs up to the last firing promised")  # fmt: skip
    finally:
        daemon.kill()
    assert promised[0] in fired(), (promised, fired())
    first = fired().index(promised[0])
    runs = schedule()["runs"][first : first + len(promised)]
    assert [run["fired_at"] for run in runs] == promised, "the firings status promised"
    lags = []
    for run in runs:
        found = job_state(spool_dir, run["run_id"])
        assert found is not None, run
        submitted = parse_rfc3339(found[1]["submitted_at"])
        lags.append((submitted - parse_rfc3339(run["fired_at"])).total_seconds())
    assert all(0 <= lag < LAG_BOUND for lag in lags), f"lags {lags} (a period is {PERIOD} s)"
