"""When schedules fire, with times passed in: cron, time zones and DST, catch-up, jitter."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from spoold.core.units import MAX_DURATION
from spoold.schedule.triggers import (
    CATCH_UP_LIMIT,
    Plan,
    ScheduleSpec,
    believable,
    jitter_delay,
    next_fire_times,
    plan,
    problem,
    run_id,
)

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
BERLIN = ZoneInfo("Europe/Berlin")


def _times(value: str | dict[str, Any], after: datetime, count: int) -> list[datetime]:
    """The firings from ``after`` on (``after`` itself included) of a schedule made then."""
    spec = ScheduleSpec.from_document(value)
    return next_fire_times(spec, spec.trigger(after), after - timedelta(microseconds=1), count)


def test_cron_weekdays_count_from_sunday_as_cron_does() -> None:
    monday_to_friday = _times("0 9 * * 1-5", NOW, 6)  # NOW is a Sunday
    assert [t.strftime("%a") for t in monday_to_friday] == [
        "Mon",
        "Tue",
        "Wed",
        "Thu",
        "Fri",
        "Mon",
    ]
    assert {t.strftime("%a") for t in _times("0 9 * * 0", NOW, 3)} == {"Sun"}
    assert {t.strftime("%a") for t in _times("0 9 * * 7", NOW, 3)} == {"Sun"}
    assert [t.strftime("%a") for t in _times("0 9 * * */3", NOW, 3)] == ["Wed", "Sat", "Sun"]


def test_a_daily_job_fires_once_on_both_clock_change_days() -> None:
    daily = {"cron": "30 2 * * *", "timezone": "Europe/Berlin"}
    spring = _times(daily, datetime(2026, 3, 28, 12, tzinfo=UTC), 2)
    assert [t.astimezone(BERLIN).date().day for t in spring] == [29, 30]
    autumn = _times(daily, datetime(2026, 10, 24, 12, tzinfo=UTC), 2)
    assert [t.astimezone(BERLIN).date().day for t in autumn] == [25, 26], "02:30 comes twice"


def test_an_hourly_job_fires_at_each_wall_clock_hour_once_through_the_changes() -> None:
    hourly = {"cron": "0 * * * *", "timezone": "Europe/Berlin"}
    autumn = _times(hourly, datetime(2026, 10, 24, 22, 0, tzinfo=UTC), 30)  # 00:00 local
    on_that_day = [t.astimezone(BERLIN) for t in autumn if t.astimezone(BERLIN).day == 25]
    assert [t.hour for t in on_that_day] == list(range(24)), "02:00 once on a 25-hour day"
    spring = _times(hourly, datetime(2026, 3, 28, 23, 0, tzinfo=UTC), 5)  # 00:00 local
    assert [t.astimezone(BERLIN).hour for t in spring] == [0, 1, 3, 4, 5], "02:00 never comes"
    assert len(set(autumn)) == len(autumn) and sorted(autumn) == autumn


def test_the_next_firings_are_strictly_after_now_even_when_one_falls_on_it() -> None:
    """A firing due this very moment, after an older ``last`` (the daemon has yet to make it;
    a face shows the next firings meanwhile), is not one of the next: those come after it."""
    spec = ScheduleSpec.from_document("0 * * * *")
    trigger = spec.trigger(NOW - timedelta(days=1))
    hour = timedelta(hours=1)
    assert next_fire_times(spec, trigger, NOW, 2, last=NOW - hour) == [NOW + hour, NOW + 2 * hour]
    assert next_fire_times(spec, trigger, NOW - timedelta(microseconds=1), 1,
                           last=NOW - hour) == [NOW]  # fmt: skip


def _plan(value: dict[str, Any], *, last: datetime | None, now: datetime):  # type: ignore[no-untyped-def]
    spec = ScheduleSpec.from_document(value)
    since = datetime(2026, 11, 1, tzinfo=UTC)
    return plan(spec, spec.trigger(since), last=last, since=since, now=now)


@pytest.mark.parametrize(("catch_up", "runs"), [("skip", 0), ("once", 1), ("all", 72)])
def test_catch_up_after_three_days_down(catch_up: str, runs: int) -> None:
    down_since = NOW - timedelta(days=3)
    decided = _plan(
        {"every": "1h", "catch_up": catch_up}, last=down_since, now=NOW + timedelta(minutes=5)
    )
    assert len(decided.fire) == runs
    assert decided.last == NOW, "the newest firing is dealt with, run or not"
    [note] = decided.notes
    assert "72 firing(s) missed while spoold was down" in note or "72 firing" in note
    assert "2026-11-19T13:00:00Z to 2026-11-22T12:00:00Z" in note
    if runs == 1:
        assert decided.fire == (NOW,), "the newest missed firing is the one run"


def test_a_firing_due_a_moment_ago_is_on_time_not_missed() -> None:
    decided = _plan({"every": "1h", "catch_up": "skip"}, last=NOW - timedelta(hours=1),
                    now=NOW + timedelta(seconds=20))  # fmt: skip
    assert decided.fire == (NOW,) and decided.notes == ()


def test_catch_up_all_is_bounded() -> None:
    decided = _plan({"every": "1m", "catch_up": "all"}, last=NOW - timedelta(days=30), now=NOW)
    assert len([t for t in decided.fire if (NOW - t).total_seconds() > 60]) == CATCH_UP_LIMIT
    assert "older ones dropped" in decided.notes[0]


def test_catch_up_all_keeps_the_newest_missed_firings_and_drops_the_older() -> None:
    decided = _plan({"every": "1m", "catch_up": "all"}, last=NOW - timedelta(days=30), now=NOW)
    # The 1000 newest missed (12:00 less 2 to 1001 minutes), then the two on time (12:00 less
    # one minute, and 12:00 itself), oldest first.
    expected = tuple(NOW - timedelta(minutes=n) for n in range(CATCH_UP_LIMIT + 1, -1, -1))
    assert decided.fire == expected
    assert decided.last == NOW


def test_a_last_firing_recorded_less_than_a_period_ahead_is_believed() -> None:
    """Hosts sharing a spool have clocks a little apart: a firing another host recorded a few
    seconds ahead of this host's now is no step of the wall clock (a minute at most, README)."""
    spec = ScheduleSpec.from_document("0 * * * *")
    since = NOW - timedelta(days=1)
    now = NOW - timedelta(seconds=40)  # the firing at 12:00, recorded by a host 40 s ahead
    assert believable(spec, NOW, since, now) == (NOW, since, None)
    decided = plan(spec, spec.trigger(since), last=NOW, since=since, now=now)
    assert decided == Plan((), (), NOW), "nothing fires again, the record stays where it was"
    later, _, doubt = believable(spec, NOW, since, NOW - timedelta(seconds=61))
    assert doubt is not None and "later than now" in doubt and later != NOW


@pytest.mark.parametrize("draw", [0.0, 0.5, 0.999999])
def test_jitter_stays_within_its_bounds(draw: float) -> None:
    spec = ScheduleSpec.from_document({"every": "1h", "jitter": "30s"})
    assert 0 <= jitter_delay(spec, draw) < 30


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("0 0 31 2 *", "never fires"),
        ("61 * * * *", "higher than the maximum value (59)"),
        ("0 9 * * 8", "not a weekday"),
        ({"cron": "* * * * *", "timezone": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
        (
            {"cron": "* * * * *", "window": {"start": "2020-01-01", "end": "2020-02-01"}},
            "never fires",
        ),
        ({"every": "500ms"}, "at least 1s"),
        ({"every": "1h", "window": {"start": "next tuesday"}}, "is no date or time"),
    ],
)
def test_schedules_that_cannot_work_are_named(value: str | dict[str, Any], words: str) -> None:
    found = problem(value, NOW)
    assert found is not None and words in found


def test_a_schedule_whose_first_firing_lies_past_the_horizon_is_refused_with_its_date() -> None:
    """Valid means a firing within the longest ``every:`` (10 years) and cron's rarest date
    (29 February on a Monday, 28 years) from now: one that far ahead is accepted, one a second
    further is refused (a window opening in some far year is a mistake), saying when it would
    first fire and how far ahead is too far, not that it never fires; a window in the past does
    never fire, and says so."""
    horizon = timedelta(seconds=MAX_DURATION) + timedelta(days=366 * 29)
    found: dict[timedelta, str | None] = {}
    for ahead in (horizon, horizon + timedelta(seconds=1)):
        value = {"every": "1h", "window": {"start": (NOW + ahead).isoformat()}}
        assert _times(value, NOW, 1) == [NOW + ahead], "the window's start is its first firing"
        found[ahead] = problem(value, NOW)
    assert found == {
        horizon: None,
        horizon + timedelta(seconds=1): (
            "it would first fire at 2065-12-11T12:00:01Z, more than 14264d (39 years) ahead, "
            "later than a schedule's first firing may be"
        ),
    }
    past = {"every": "1h", "window": {"start": "2020-01-01", "end": "2020-02-01"}}
    assert problem(past, NOW) == "it never fires: its window ended at 2020-02-01T00:00:00Z"


#: What the README quotes, each refusal of a schedule that can never fire or fires too late.
REFUSED: dict[str, str | dict[str, Any]] = {
    "far": {"every": "1h", "window": {"start": "2080-01-01T00:00:00Z"}},
    "past": {"every": "1h", "window": {"start": "2020-01-01", "end": "2020-02-01"}},
    "no date": "0 0 31 2 *",
    "none in the window": {
        "cron": "0 0 * * *",
        "window": {"start": "2027-01-05T01:00:00Z", "end": "2027-01-05T02:00:00Z"},
    },
    "none in the hours": {"cron": "0 12 * * *", "window": {"start": "08:00", "end": "09:00"}},
}


def test_the_readme_quotes_the_refusals_as_they_are_said() -> None:
    readme = " ".join((Path(__file__).resolve().parent.parent / "README.md").read_text().split())
    for value in REFUSED.values():
        said = problem(value, NOW)
        assert said is not None and f"`{said}`" in readme, said


@pytest.mark.parametrize(
    ("value", "said"),
    [
        (REFUSED["no date"], "it never fires: the date it names does not exist"),
        ("0 0 31 4,6,9,11 *", "it never fires: the date it names does not exist"),
        (REFUSED["past"], "it never fires: its window ended at 2020-02-01T00:00:00Z"),
        (
            REFUSED["none in the window"],
            "it never fires: no firing falls in its window "
            "(2027-01-05T01:00:00Z to 2027-01-05T02:00:00Z)",
        ),
        (  # open now, NOW is 12:00: the next midnight comes after it closed
            {"cron": "0 0 * * *", "window": {"start": "2026-11-01", "end": "2026-11-22T23:00Z"}},
            "it never fires: no firing falls in the rest of its window (until "
            "2026-11-22T23:00:00Z)",
        ),
        (
            {"every": "1h", "window": {"start": "2027-01-02", "end": "2027-01-01"}},
            "it never fires: its window ends (2027-01-01T00:00:00Z) before it starts "
            "(2027-01-02T00:00:00Z)",
        ),
        (
            REFUSED["none in the hours"],
            "it never fires: no firing falls in its window (08:00 to 09:00 each day, UTC)",
        ),
        (
            {"cron": "0 12 * * *", "window": {"start": "22:00", "end": "02:00"}},
            "it never fires: no firing falls in its window (22:00 to 02:00 each day, UTC)",
        ),
        (  # 12:30 is no time the spring change skips in Berlin (02:00 to 03:00 is)
            {
                "cron": "30 12 * * *",
                "timezone": "Europe/Berlin",
                "window": {"start": "13:00", "end": "14:00"},
            },
            "it never fires: no firing falls in its window (13:00 to 14:00 each day, "
            "Europe/Berlin)",
        ),
        (  # made at NOW, 12:00: it fires at 12:00 every other day
            {"every": "48h", "window": {"start": "13:00", "end": "14:00"}},
            "it never fires: no firing falls in its window (13:00 to 14:00 each day, UTC)",
        ),
        (  # its grid moves a second a day: 08:00 is 72,000 days ahead, past what spoold looks at
            {"every": "86401s", "window": {"start": "08:00", "end": "08:00:01"}},
            "it never fires: no firing falls in its window (08:00 to 08:00:01 each day, UTC) "
            "in its next 1000 openings",
        ),
    ],
)
def test_a_schedule_that_never_fires_says_why(value: str | dict[str, Any], said: str) -> None:
    """A date that does not exist, a window in the past, one that ends before it starts, or
    one no firing falls in (dates, or times of each day): each is said as it is."""
    assert problem(value, NOW) == said


@pytest.mark.parametrize(
    ("value", "first"),
    [
        (  # one midnight in its window
            {
                "cron": "0 0 * * *",
                "window": {"start": "2027-01-04T23:30:00Z", "end": "2027-01-05T00:30:00Z"},
            },
            datetime(2027, 1, 5, tzinfo=UTC),
        ),
        (
            {"cron": "0 1 * * *", "window": {"start": "22:00", "end": "02:00"}},
            datetime(2026, 11, 23, 1, tzinfo=UTC),
        ),
        (  # 02:30 fires at 03:30 on the day the spring change skips it, and only then
            {
                "cron": "30 2 * * *",
                "timezone": "Europe/Berlin",
                "window": {"start": "03:00", "end": "04:00"},
            },
            datetime(2027, 3, 28, 1, 30, tzinfo=UTC),
        ),
        (  # every 7h meets every hour of the day in time
            {"every": "7h", "window": {"start": "08:00", "end": "09:00"}},
            datetime(2026, 11, 28, 8, tzinfo=UTC),
        ),
        (  # 12:00 UTC is 13:00 in Berlin's winter and 14:00 in its summer
            {
                "every": "24h",
                "timezone": "Europe/Berlin",
                "window": {"start": "14:00", "end": "14:30"},
            },
            datetime(2027, 3, 28, 12, tzinfo=UTC),
        ),
    ],
)
def test_a_schedule_that_fires_in_its_window_however_rarely_is_accepted(
    value: dict[str, Any], first: datetime
) -> None:
    assert problem(value, NOW) is None
    assert _times(value, NOW, 1) == [first]


def test_a_window_limits_when_a_schedule_fires() -> None:
    value = {"every": "1h", "window": {"start": "2026-12-01T08:00", "end": "2026-12-01T10:30"},
             "timezone": "Europe/Berlin"}  # fmt: skip
    fired = _times(value, NOW, 10)
    assert [t.astimezone(BERLIN).strftime("%d %H:%M") for t in fired] == [
        "01 08:00",
        "01 09:00",
        "01 10:00",
    ]


def test_a_run_is_named_by_its_firing_in_utc() -> None:
    assert (
        run_id("nightly", datetime(2026, 11, 22, 3, 0, tzinfo=BERLIN)) == "nightly@20261122T020000Z"
    )


def test_a_daily_window_keeps_firings_within_those_hours() -> None:
    value = {
        "every": "1h",
        "window": {"start": "10:30", "end": "17:00"},
        "timezone": "Europe/Berlin",
    }
    fired = _times(value, NOW, 8)  # made at 13:00 local: every hour from then on
    assert [t.astimezone(BERLIN).strftime("%d %H:%M") for t in fired][:7] == [
        "22 14:00", "22 15:00", "22 16:00", "23 11:00", "23 12:00", "23 13:00", "23 14:00",
    ]  # fmt: skip
    night = {"cron": "0 * * * *", "window": {"start": "22:00", "end": "02:00"}}
    assert [t.hour for t in _times(night, NOW, 5)] == [22, 23, 0, 1, 22]
