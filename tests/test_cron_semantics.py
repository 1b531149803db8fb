"""cron's day rule: a day of the month and a weekday, both given, fire on either (as cron does).

Vixie/ISC cron and POSIX: when neither field is ``*`` a day matches if either does; a field
that starts with ``*`` (``*/2`` too) leaves the other alone. Times are passed in (the pure
triggers) or come from a FakeClock (the scheduler), never from the wall clock.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml

from spoold.intake.incoming import Rejected
from spoold.schedule.triggers import ScheduleSpec, next_fire_times, plan, problem
from tests.fakes import FakeClock
from tests.harness import local_job
from tests.test_schedule_timing import Bench

NOW = datetime(2027, 8, 1, tzinfo=UTC)  # a Sunday, at midnight
BERLIN = ZoneInfo("Europe/Berlin")
AUCKLAND = ZoneInfo("Pacific/Auckland")
#: From NOW on: the Fridays and the 13ths of August and September 2027 (13 August is both).
FRIDAYS_AND_13THS = [
    date(2027, 8, 6),
    date(2027, 8, 13),
    date(2027, 8, 20),
    date(2027, 8, 27),
    date(2027, 9, 3),
    date(2027, 9, 10),
    date(2027, 9, 13),  # a Monday
    date(2027, 9, 17),
]


def _times(value: str | dict[str, Any], after: datetime, count: int) -> list[datetime]:
    """The firings from ``after`` on of a schedule made then."""
    spec = ScheduleSpec.from_document(value)
    return next_fire_times(spec, spec.trigger(after), after - timedelta(microseconds=1), count)


def _days(value: str | dict[str, Any], after: datetime = NOW, count: int = 8) -> list[date]:
    return [t.date() for t in _times(value, after, count)]


def _at_midnight(*days: date) -> list[datetime]:
    return [datetime.combine(day, datetime.min.time(), tzinfo=UTC) for day in days]


def test_a_day_of_month_and_a_weekday_fire_on_either_in_order() -> None:
    fired = _times("0 0 13 * 5", NOW, 8)
    assert fired == _at_midnight(*FRIDAYS_AND_13THS), "every Friday and every 13th, once each"
    assert problem("0 0 13 * 5", NOW) is None


def test_30_february_or_a_monday_fires_on_the_mondays_of_february() -> None:
    assert problem("0 0 30 2 1", NOW) is None, "cron runs it on every Monday in February"
    assert _days("0 0 30 2 1", count=5) == [
        date(2028, 2, 7),
        date(2028, 2, 14),
        date(2028, 2, 21),
        date(2028, 2, 28),
        date(2029, 2, 5),
    ]


def test_a_day_that_never_comes_with_a_weekday_restricted_elsewhere_fires_on_that_weekday() -> None:
    """The first of the two that can fire at all: 31 April never comes, its Sundays do."""
    assert _days("0 0 31 4 sun", count=3) == [date(2028, 4, 2), date(2028, 4, 9), date(2028, 4, 16)]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0 0 * * 5", [date(2027, 8, 6), date(2027, 8, 13), date(2027, 8, 20)]),
        ("0 0 13 * *", [date(2027, 8, 13), date(2027, 9, 13), date(2027, 10, 13)]),
        # A field starting with "*" counts as "*", steps too (Vixie cron's DOM_STAR/DOW_STAR):
        # odd days that are Fridays; 13ths that are Sundays, Tuesdays, Thursdays or Saturdays.
        ("0 0 */2 * 5", [date(2027, 8, 13), date(2027, 8, 27), date(2027, 9, 3)]),
        ("0 0 13 * */2", [date(2027, 11, 13), date(2028, 1, 13), date(2028, 2, 13)]),
    ],
)
def test_a_star_in_one_of_the_fields_leaves_the_other_alone(
    value: str, expected: list[date]
) -> None:
    assert _days(value, count=3) == expected


def test_the_day_rule_in_a_time_zone() -> None:
    """09:00 in Auckland (UTC+12 in winter) is the evening before in UTC: the days are local."""
    fired = _times({"cron": "0 9 13 * fri", "timezone": "Pacific/Auckland"}, NOW, 4)
    local = [t.astimezone(AUCKLAND) for t in fired]
    assert [t.strftime("%a %d %H:%M") for t in local] == [
        "Fri 06 09:00",
        "Fri 13 09:00",
        "Fri 20 09:00",
        "Fri 27 09:00",
    ]
    assert [t.astimezone(UTC).strftime("%a %d %H:%M") for t in fired] == [
        "Thu 05 21:00",
        "Thu 12 21:00",
        "Thu 19 21:00",
        "Thu 26 21:00",
    ]


def test_a_day_both_fields_match_fires_once_through_the_autumn_change() -> None:
    """25 October 2026 is a Sunday and the day Berlin repeats 02:00-03:00: 02:30 fires once."""
    value = {"cron": "30 2 25 10 0", "timezone": "Europe/Berlin"}
    fired = _times(value, datetime(2026, 10, 1, tzinfo=UTC), 6)
    assert [t.astimezone(BERLIN).strftime("%Y-%m-%d %H:%M") for t in fired] == [
        "2026-10-04 02:30",
        "2026-10-11 02:30",
        "2026-10-18 02:30",
        "2026-10-25 02:30",
        "2027-10-03 02:30",
        "2027-10-10 02:30",
    ]


def test_firings_missed_while_down_are_those_of_either_field() -> None:
    spec = ScheduleSpec.from_document({"cron": "0 0 13 * 5", "catch_up": "all"})
    since = NOW - timedelta(days=30)
    decided = plan(
        spec, spec.trigger(since), last=NOW, since=since, now=datetime(2027, 9, 14, tzinfo=UTC)
    )
    assert list(decided.fire) == _at_midnight(*FRIDAYS_AND_13THS[:7])
    assert decided.last == _at_midnight(date(2027, 9, 13))[0]
    [note] = decided.notes
    assert "caught up 7 firing(s)" in note


@pytest.mark.parametrize(
    "value",
    [
        "0 0 30 2 *",
        "0 0 31 4,6,9,11 *",
        {"cron": "0 0 30 2 1", "window": {"start": "2020-01-01", "end": "2020-02-01"}},
    ],
)
def test_what_truly_never_fires_is_still_refused(value: str | dict[str, Any]) -> None:
    found = problem(value, NOW)
    assert found is not None and "never fires" in found


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0 0 * * 7", [date(2027, 8, 1), date(2027, 8, 8), date(2027, 8, 15)]),
        ("0 0 * * SUN-TUE", [date(2027, 8, 1), date(2027, 8, 2), date(2027, 8, 3)]),
        ("0 0 * * sat-sun", [date(2027, 8, 1), date(2027, 8, 7), date(2027, 8, 8)]),
        ("0 0 * * Mon-Fri/2", [date(2027, 8, 2), date(2027, 8, 4), date(2027, 8, 6)]),
        ("0 0 * * 5-7", [date(2027, 8, 1), date(2027, 8, 6), date(2027, 8, 7)]),
        ("0 0 1 jan-dec/3 *", [date(2027, 10, 1), date(2028, 1, 1), date(2028, 4, 1)]),
        ("0 0 1 */4 *", [date(2027, 9, 1), date(2028, 1, 1), date(2028, 5, 1)]),
        ("0 0 1 FEB,aug *", [date(2027, 8, 1), date(2028, 2, 1), date(2028, 8, 1)]),
    ],
)
def test_weekday_and_month_names_ranges_and_steps_as_in_cron(
    value: str, expected: list[date]
) -> None:
    assert _days(value, count=3) == expected


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    made = Bench(tmp_path / "spool", FakeClock(NOW))
    yield made
    made.scheduler.stop()


def test_the_scheduler_fires_a_friday_and_a_13th_in_order(bench: Bench) -> None:
    bench.drop("friday13", {"cron": "0 0 13 * 5", "overlap": "allow"})  # its runs never run
    expected = _at_midnight(*FRIDAYS_AND_13THS)
    assert bench.next_firings("friday13") == expected[:3], "status shows the next firings"
    assert bench.wake_ups("friday13", 7) == expected[:7], "APScheduler wakes spoold at them"
    for moment in expected[:7]:
        bench.at(moment, "friday13")
    assert sorted(bench.fired("friday13")) == expected[:7]
    assert bench.queued == [f"friday13@{day:%Y%m%d}T000000Z" for day in FRIDAYS_AND_13THS[:7]]
    assert bench.next_firings("friday13") == expected[7:8] + _at_midnight(
        date(2027, 9, 24), date(2027, 10, 1)
    )


def test_intake_takes_30_february_or_monday_and_refuses_30_february(bench: Bench) -> None:
    bench.drop("feb-mondays", {"cron": "0 0 30 2 1"})
    assert bench.next_firings("feb-mondays") == _at_midnight(
        date(2028, 2, 7), date(2028, 2, 14), date(2028, 2, 21)
    )
    path = bench.spool.dir("incoming") / "feb-30.yaml"
    path.write_text(yaml.safe_dump(local_job("feb-30", "true", schedule="0 0 30 2 *")))
    refused = bench.intake.offer(path.name, complete=True)
    assert isinstance(refused, Rejected)
    assert "never fires" in refused.reason["reason"]
