"""Round 30: wall-clock steps, the clock changes of daylight saving time, long periods, and
many schedules due at once.

Times are passed in (the pure triggers) or come from a clock the test moves (the scheduler),
never from the wall clock: a step of the wall clock is a clock whose ``now`` moves and whose
``monotonic`` does not.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from apscheduler.triggers.date import DateTrigger

from spoold.core.clock import parse_rfc3339
from spoold.schedule.scheduler import WAKE
from spoold.schedule.triggers import ScheduleSpec, next_fire_times, plan, problem
from tests.fakes import FakeClock
from tests.test_schedule_timing import Bench

BERLIN = "Europe/Berlin"


def _day(value: dict[str, Any], day: date) -> list[datetime]:
    """The firings, in local time, whose local date is ``day`` (the schedule made days before)."""
    zone = ZoneInfo(value.get("timezone", "UTC"))
    begin = datetime.combine(day - timedelta(days=2), datetime.min.time(), tzinfo=zone)
    spec = ScheduleSpec.from_document(value)
    trigger = spec.trigger(begin.astimezone(UTC))
    fired = next_fire_times(spec, trigger, begin.astimezone(UTC), 400)
    assert fired == sorted(set(fired)), "in order, each instant once"
    return [t.astimezone(zone) for t in fired if t.astimezone(zone).date() == day]


def _walls(fired: list[datetime]) -> list[str]:
    return [t.strftime("%H:%M%z") for t in fired]


# -- 2. autumn: a wall-clock time the change repeats fires once ---------------------------------


@pytest.mark.parametrize(
    ("cron", "runs"),
    [("*/15 * * * *", 96), ("0,30 * * * *", 48), ("0 * * * *", 24), ("*/30 2 * * *", 2),
     ("15,45 2 * * *", 2), ("30 2 * * *", 1)],
)  # fmt: skip
def test_each_wall_clock_time_of_the_repeated_hour_fires_once(cron: str, runs: int) -> None:
    fired = _day({"cron": cron, "timezone": BERLIN}, date(2026, 10, 25))
    assert len(fired) == runs
    walls = [t.strftime("%H:%M") for t in fired]
    assert len(set(walls)) == len(walls), f"a wall-clock time fired twice: {_walls(fired)}"


def test_the_repeated_hour_fires_at_its_first_pass() -> None:
    fired = _day({"cron": "*/30 2 * * *", "timezone": BERLIN}, date(2026, 10, 25))
    assert _walls(fired) == ["02:00+0200", "02:30+0200"]


def test_the_repeated_hour_fires_once_in_catch_up_too() -> None:
    spec = ScheduleSpec.from_document({"cron": "*/15 * * * *", "timezone": BERLIN})
    since = datetime(2026, 10, 24, 22, tzinfo=UTC)  # midnight in Berlin
    decided = plan(spec, spec.trigger(since), last=since, since=since,
                   now=datetime(2026, 10, 25, 23, tzinfo=UTC))  # fmt: skip
    # 96 wall-clock times in the day; the last, 00:00 the next day, is on time, not missed.
    assert "caught up 95 firing(s)" in decided.notes[0]


# -- 3. spring: a wall-clock time the change skips fires once, shifted by the gap ---------------


@pytest.mark.parametrize(
    ("cron", "zone", "day", "walls"),
    [
        ("30 0 * * *", "America/Santiago", date(2026, 9, 6), ["01:30-0300"]),
        ("0 0 * * *", "Africa/Cairo", date(2026, 4, 24), ["01:00+0300"]),
        ("0 0 * * *", "America/Havana", date(2026, 3, 8), ["01:00-0400"]),
        ("15,45 2 * * *", BERLIN, date(2027, 3, 28), ["03:15+0200", "03:45+0200"]),
        ("*/30 2 * * *", BERLIN, date(2027, 3, 28), ["03:00+0200", "03:30+0200"]),
        ("30 2 * * *", BERLIN, date(2027, 3, 28), ["03:30+0200"]),
        # Shifted onto a firing time: once.
        ("0 2-3 * * *", BERLIN, date(2027, 3, 28), ["03:00+0200"]),
        ("*/30 2-3 * * *", BERLIN, date(2027, 3, 28), ["03:00+0200", "03:30+0200"]),
        (
            "0 * * * *",
            BERLIN,
            date(2027, 3, 28),
            [f"{h:02}:00{'+0100' if h < 2 else '+0200'}" for h in range(24) if h != 2],
        ),
    ],
)
def test_a_skipped_wall_clock_time_fires_once_shifted_by_the_gap(
    cron: str, zone: str, day: date, walls: list[str]
) -> None:
    fired = _day({"cron": cron, "timezone": zone}, day)
    if cron.startswith("0 * "):
        fired = [t for t in fired if t.minute == 0]
    assert _walls(fired) == walls


def _transitions(zone: ZoneInfo, year: int) -> list[tuple[datetime, timedelta]]:
    """The instants (UTC, to the hour) where ``zone``'s offset changes in ``year``, and by how much."""
    found = []
    moment = datetime(year, 1, 1, tzinfo=UTC)
    step = timedelta(hours=1)
    before = moment.astimezone(zone).utcoffset()
    while moment.year == year:
        moment += step
        offset = moment.astimezone(zone).utcoffset()
        if offset != before:
            assert offset is not None and before is not None
            found.append((moment, offset - before))
        before = offset
    return found


@pytest.mark.parametrize(
    "zone", ["Europe/Berlin", "America/Santiago", "America/Havana", "Africa/Cairo",
             "Australia/Lord_Howe", "America/New_York", "Pacific/Auckland"],
)  # fmt: skip
@pytest.mark.parametrize("year", [2026, 2027, 2028])
def test_every_wall_clock_time_fires_once_through_each_change(zone: str, year: int) -> None:
    """Each minute of a quarter-hour grid, on the days of each clock change: a time that exists
    fires once, at its first pass; a skipped one once, shifted by the gap, unless the shifted
    time is a firing time itself."""
    tz = ZoneInfo(zone)
    for instant, change in _transitions(tz, year):
        day = instant.astimezone(tz).date()
        fired = _day({"cron": "*/15 * * * *", "timezone": zone}, day)
        walls = [t.strftime("%H:%M") for t in fired]
        assert len(set(walls)) == len(walls), (zone, day, _walls(fired))
        expected: set[str] = set()
        for k in range(96):
            naive = datetime.combine(day, datetime.min.time()) + timedelta(minutes=15 * k)
            local = naive.replace(tzinfo=tz).astimezone(UTC).astimezone(tz)
            if local.date() == day:
                expected.add(local.strftime("%H:%M"))
        assert set(walls) == expected, (zone, day, change)


# -- 4. a period up to the longest duration accepted ---------------------------------------------


@pytest.mark.parametrize("every", ["3650d", "3000d", "315360000"])
def test_a_period_of_up_to_ten_years_is_accepted(every: str) -> None:
    assert problem({"every": every}, datetime(2026, 11, 22, tzinfo=UTC)) is None


def test_a_period_past_ten_years_is_refused_for_that_reason() -> None:
    found = problem({"every": "99999d"}, datetime(2026, 11, 22, tzinfo=UTC))
    assert found == "every: must be at most 315360000 seconds, 10 years"


def test_validate_says_a_period_past_ten_years_once_where_it_is(tmp_path: Path) -> None:
    """Seen: `every: 99999d` refused twice, once at schedule and once at schedule.every."""
    from tests.harness import run_cli  # noqa: PLC0415

    spool = tmp_path / "spool"
    assert run_cli(spool, "init").returncode == 0
    job = tmp_path / "big.yaml"
    job.write_text('job_id: big\nexecutor: local\nproduct: {commands: "true"}\n'
                   "schedule: {every: 99999d}\n")  # fmt: skip
    shown = run_cli(spool, "validate", str(job))
    lines = [line for line in shown.stderr.splitlines() if line.startswith(str(job))]
    assert len(lines) == 1 and "schedule.every: must be at most 315360000 seconds" in lines[0]


# -- 1. a step of the wall clock -----------------------------------------------------------------

T = datetime(2026, 11, 22, 10, 2, 47, 160000, tzinfo=UTC)


class SteppingClock(FakeClock):
    """A FakeClock whose wall clock may step while its monotonic clock goes on."""

    def step(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)


@pytest.fixture
def stepping(tmp_path: Path) -> Iterator[Bench]:
    made = Bench(tmp_path / "spool", SteppingClock(T))
    made.scheduler.check_clock()  # the first look: where both clocks stand
    yield made
    made.scheduler.stop()


def _notes(bench: Bench, job_id: str) -> list[str]:
    return [str(note["what"]) for note in bench.status(job_id)["notes"]]


def _step(bench: Bench, seconds: float) -> None:
    clock = bench.clock
    assert isinstance(clock, SteppingClock)
    clock.step(seconds)
    step = bench.scheduler.check_clock()
    assert step is not None and step.by == pytest.approx(seconds)


def test_a_step_back_of_the_wall_clock_keeps_every_firing(stepping: Bench) -> None:
    bench = stepping
    bench.drop("tick", {"every": "5s", "overlap": "allow"})
    for k in (1, 2, 3):
        bench.at(T + timedelta(seconds=5 * k), "tick")
    assert len(bench.queued) == 3
    _step(bench, -3600)
    # APScheduler's next firing was an hour away on the wall clock: it fires now instead.
    assert bench.aps.get_job("tick").next_run_time == bench.clock.now()
    bench.scheduler.fire("tick")
    notes = _notes(bench, "tick")
    assert "is 1h later than now" in notes[-1] and "stepped back" in notes[-1]
    coming = bench.next_firings("tick")
    assert coming[0] - bench.clock.now() <= timedelta(seconds=5), "it fires on, 5s apart"
    for moment in coming:
        bench.at(moment, "tick")
    assert len(bench.queued) == 7, "the firing at the step, then each one after it"
    assert not any("spoold was down" in note for note in _notes(bench, "tick"))
    assert sum("later than now" in note for note in _notes(bench, "tick")) == 1, "said once"


def test_a_step_forward_and_back_is_no_downtime_and_leaves_no_firing_a_day_ahead(
    stepping: Bench, tmp_path: Path
) -> None:
    bench = stepping
    bench.drop("tick", {"every": "5s", "overlap": "allow"})
    bench.at(T + timedelta(seconds=5), "tick")
    _step(bench, 86400)
    bench.scheduler.fire("tick")
    [note] = [n for n in _notes(bench, "tick") if "caught up" in n]
    assert "spoold was down" not in note
    assert "passed over when the wall clock stepped forward by 1d" in note
    assert parse_rfc3339(bench.status("tick")["last_fired"]) > T + timedelta(hours=23)

    _step(bench, -86400)  # NTP puts it right
    bench.scheduler.fire("tick")
    assert "later than now" in _notes(bench, "tick")[-1]
    assert bench.next_firings("tick")[0] - bench.clock.now() <= timedelta(seconds=5)


def test_a_last_firing_a_wrong_clock_recorded_is_believed_no_more_after_a_restart(
    stepping: Bench,
) -> None:
    """A daemon that ran a while with its clock a day ahead (a bad RTC) recorded firings a day
    ahead; started again with the clock right (kill -9 first), it fires on from now."""
    bench = stepping
    bench.drop("tick", {"every": "5s", "overlap": "allow"})
    bench.clock._now += timedelta(days=1)  # as it was running
    bench.scheduler.fire("tick")
    assert parse_rfc3339(bench.status("tick")["last_fired"]) > T + timedelta(hours=23)
    bench.scheduler.stop()
    bench.clock._now -= timedelta(days=1)  # set right while down
    again = Bench(bench.spool.root, bench.clock)
    try:
        again.scheduler.sync()  # the first round of the restart
        assert "later than now" in _notes(again, "tick")[-1]
        assert again.next_firings("tick")[0] - again.clock.now() <= timedelta(seconds=5)
    finally:
        again.scheduler.stop()


def test_firings_missed_after_a_step_back_are_not_said_to_be_the_steps(stepping: Bench) -> None:
    """A step back passes over no firing: firings missed after one (APScheduler held up for
    hours, both clocks going on) are not noted as passed over by that step."""
    bench = stepping
    bench.drop("hourly", {"every": "1h", "catch_up": "once", "overlap": "allow"})
    bench.at(T + timedelta(hours=1), "hourly")
    _step(bench, -30)
    bench.clock.advance(2.5 * 3600)  # no step: both clocks went on
    assert bench.scheduler.check_clock() is None
    bench.scheduler.fire("hourly")
    [note] = [n for n in _notes(bench, "hourly") if "caught up" in n]
    assert "stepped back" not in note and "passed over" not in note, note


def test_no_step_no_look(stepping: Bench) -> None:
    clock = stepping.clock
    assert isinstance(clock, SteppingClock)
    clock.advance(3600)  # both clocks: time went by
    assert stepping.scheduler.check_clock() is None
    clock.step(0.5)  # a correction within what NTP slews in a while
    assert stepping.scheduler.check_clock() is None


def test_apschedulers_sleep_is_bounded_and_each_wake_up_looks_at_the_clocks(
    tmp_path: Path,
) -> None:
    """The thread sleeps ``WAKE`` seconds at most, whatever the next firing; each wake-up sees a
    step of the wall clock (a step back of an hour held every schedule for an hour)."""
    clock = SteppingClock(T)
    bench = Bench(tmp_path / "spool", clock)
    seen = threading.Event()
    looked = bench.scheduler._check_clock

    def look() -> Any:
        step = looked()
        if step is not None:
            seen.set()
        return step

    bench.scheduler._check_clock = look  # type: ignore[method-assign]
    try:
        bench.aps.add_job(print, trigger=DateTrigger(datetime.now(UTC) + timedelta(hours=1)),
                          id="far")  # fmt: skip
        bench.aps.resume()
        assert bench.aps._process_jobs() <= WAKE
        clock.step(-3600)
        assert seen.wait(timeout=4 * WAKE + 10), "a wake-up within WAKE saw the step"
    finally:
        bench.scheduler.stop()
