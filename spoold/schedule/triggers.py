"""Recurring jobs (``schedule:``): when they fire, and what a restart does about missed firings.

Pure: times come in, decisions come out; the daemon's scheduler (``spoold.schedule.scheduler``) acts on
them. Fire times come from APScheduler 3.x triggers. Some things are added on top:

- cron as cron reads it (``cron_trigger``): weekdays count from Sunday (0 or 7), names and
  steps as cron takes them, and a day of the month and a weekday both given fire on either
  (``0 0 13 * 5``: every Friday and every 13th), where APScheduler needs both.
- cron reads the wall clock (``WallCronTrigger``): each wall-clock time it names fires once. A
  time the autumn change repeats fires at its first pass (``*/15 * * * *`` has 96 runs on that
  25-hour day, an hourly job 24); a time the spring change skips fires once, shifted by the
  gap (02:15 and 02:45 at 03:15 and 03:45 in Europe/Berlin; a daily 00:00 where the gap is at
  midnight at 01:00), unless the shifted time is a firing time itself (then it is that one).
- A firing is named by its nominal time (``<job_id>@20261122T153000Z``): a firing that was
  recorded can be recognised after any crash, so none is lost and none repeated.
- ``every:`` fires on one exact grid (``EveryTrigger``), from when its definition was accepted:
  APScheduler wakes spoold at each firing, which is made then and there, and status.json's
  ``next_fire_times`` are the very times that will be fired, sub-second part included.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger

from spoold.core.clock import parse_rfc3339, rfc3339
from spoold.core.job import labels_and_description
from spoold.core.units import MAX_DURATION, format_duration, parse_duration

#: A firing this late (or one period, if shorter) is on time (a busy daemon), not missed.
ON_TIME = 60.0
#: ``catch_up: all`` starts at most this many runs at once; the rest are recorded as dropped.
CATCH_UP_LIMIT = 1000
#: How far ahead a schedule must fire at least once to be valid (31 February never comes): past
#: the longest ``every:`` accepted, and past cron's rarest date (29 February on a Monday, 28 years).
_HORIZON = timedelta(seconds=MAX_DURATION) + timedelta(days=366 * 29)
#: The horizon as a refusal says it: ``14264d (39 years)``.
_HORIZON_SAID = f"{format_duration(_HORIZON.total_seconds())} ({int(_HORIZON.days / 365.25)} years)"
_TICK = timedelta(microseconds=1)
_DAY = timedelta(days=1)
_WEEK = timedelta(days=7)
_NEVER = "it never fires"
#: Wall-clock times a look at one firing may pass over: those of a spring gap (a day at most,
#: every minute of it) and of the hour the autumn change repeats.
_GAP_LOOK = 3000
_WINDOW_JUMPS = 1000
_TIME_OF_DAY = re.compile(r"^\d{1,2}:\d{2}(:\d{2})?$")


def run_id(job_id: str, fire_time: datetime) -> str:
    """The id of the run a firing creates: the schedule's id and the firing's UTC time."""
    return f"{job_id}@{fire_time.astimezone(UTC).strftime('%Y%m%dT%H%M%SZ')}"


class EveryTrigger(BaseTrigger):  # type: ignore[misc]  # APScheduler 3 ships no types
    """``every:``: firings at ``start + k x period`` (k = 0, 1, ...), up to ``end``.

    One grid for everyone: APScheduler wakes spoold at these times, ``plan`` fires them and
    ``next_fire_times`` shows them, so a run is made at its firing and status shows the times
    that will be used. Unlike APScheduler's IntervalTrigger it counts in whole microseconds
    (no float drift), and the firing after ``previous`` is the next point of the grid (not
    ``previous + period``: a firing off the grid, recorded by an older spoold, leads back to it).
    """

    __slots__ = ("back", "end", "period", "start")

    def __init__(
        self, period: timedelta, *, start: datetime, end: datetime | None, back: bool = False
    ) -> None:
        """``back``: the grid goes on before ``start`` too (a start that is no window's, but
        when the definition was accepted: a step back of the wall clock may go before it)."""
        if period <= timedelta(0):
            raise ValueError("every: must be longer than 0s")
        self.period = period
        self.start = start.astimezone(UTC)
        self.end = None if end is None else end.astimezone(UTC)
        self.back = back

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        """The first firing after ``previous_fire_time`` or, without one, at or after ``now``."""
        if previous_fire_time is not None:
            return self._first_from(previous_fire_time.astimezone(UTC) + _TICK)
        return self._first_from(now.astimezone(UTC))

    def _first_from(self, moment: datetime) -> datetime | None:
        steps = -((self.start - moment) // self.period)  # ceil
        if steps < 0 and (not self.back or steps == -1):
            steps = 0  # the grid's point at the acceptance itself is no firing
        fire = self.start + steps * self.period
        return None if self.end is not None and fire > self.end else fire

    def __str__(self) -> str:
        return f"every {self.period.total_seconds():g}s from {self.start.isoformat()}"


@dataclass(frozen=True)
class ScheduleSpec:
    """A job file's ``schedule:``, read."""

    cron: str | None = None
    every: float | None = None
    timezone: str = "UTC"
    jitter: float = 0.0
    start: datetime | None = None
    end: datetime | None = None
    #: ``window`` as times of day (``{start: "08:00", end: "18:00"}``): firings only in it.
    daily: tuple[time, time] | None = None
    catch_up: str = "once"
    overlap: str = "skip"

    @classmethod
    def from_document(cls, value: str | Mapping[str, Any]) -> ScheduleSpec:
        """From a validated ``schedule:``; ValueError for what the schema cannot check."""
        if isinstance(value, str):
            return cls(cron=value.strip())
        zone = _zone(str(value.get("timezone", "UTC")))
        window = value.get("window") or {}
        every = value.get("every")
        daily = _daily(window)
        return cls(
            cron=value["cron"].strip() if value.get("cron") else None,
            every=None if every is None else parse_duration(every),
            timezone=zone.key,
            jitter=parse_duration(value.get("jitter", 0)),
            start=None if daily else _moment(window.get("start"), zone, "window.start"),
            end=None if daily else _moment(window.get("end"), zone, "window.end"),
            daily=daily,
            catch_up=str(value.get("catch_up", "once")),
            overlap=str(value.get("overlap", "skip")),
        )

    def trigger(self, anchor: datetime) -> BaseTrigger:
        """The APScheduler trigger; ``anchor`` is when an ``every:`` schedule counts from (its
        first firing is one period later, or at ``window.start``)."""
        if self.every is not None:
            if self.every < 1:  # a run is named by its firing's second
                raise ValueError("every: must be at least 1s")
            if self.every > MAX_DURATION:  # a date past the calendar's end: OverflowError
                raise ValueError(f"every: must be at most {MAX_DURATION} seconds, 10 years")
            period = timedelta(seconds=self.every)
            start = self.start or anchor + period
            return EveryTrigger(period, start=start, end=self.end, back=self.start is None)
        assert self.cron is not None
        return cron_trigger(self.cron, timezone=self.timezone, start=self.start, end=self.end)


def problem(value: str | Mapping[str, Any], now: datetime) -> str | None:
    """Why a ``schedule:`` cannot work, in words (None if it can): one that never fires says
    why (a date that does not exist, a window in the past or ending before it starts, a window
    no firing falls in), and one whose first firing lies past the horizon (a window opening in
    some far year) says when that is. Bounded: what a look at the firings one by one would take
    long to find (30 February, a daily window the times named miss) is decided from the fields;
    the look then passes over at most ``_WINDOW_JUMPS`` firings outside a daily window, as the
    scheduler's does (``_next``)."""
    try:
        spec = ScheduleSpec.from_document(value)
        trigger = spec.trigger(now)
        if (never := _never(spec, now)) is not None:
            return never
        first = trigger.get_next_fire_time(None, now)
        if spec.daily and first is not None and _outside_daily(spec, first) is not None:
            if not _may_fire_in_daily(spec, spec.daily, trigger, now):
                return f"{_NEVER}: no firing falls in its window ({_said_daily(spec, spec.daily)})"
            first = _next(spec, trigger, None, first)  # the first in it, as the scheduler's look
        if first is not None and first - now > _HORIZON:  # shown here: its UTC may overflow
            return (
                f"it would first fire at {_show(first)}, more than {_HORIZON_SAID} ahead, later "
                "than a schedule's first firing may be"
            )
    except ValueError as exc:
        return str(exc)
    except OverflowError:  # a time past what a date can say: no file may stop intake so
        return "it names a time past the year 9999"
    return None if first is not None else _none_found(spec, now)


def _never(spec: ScheduleSpec, now: datetime) -> str | None:
    """Why a schedule never fires, where its date or window of dates says so at once."""
    if spec.cron is not None and not _names_a_date(spec.cron):
        return f"{_NEVER}: the date it names does not exist"
    if spec.start is not None and spec.end is not None and spec.end < spec.start:
        return (
            f"{_NEVER}: its window ends ({_show(spec.end)}) before it starts ({_show(spec.start)})"
        )
    if spec.end is not None and spec.end < now:
        return f"{_NEVER}: its window ended at {_show(spec.end)}"
    return None


def _none_found(spec: ScheduleSpec, now: datetime) -> str:
    """Why the look for a first firing found none, the date named and the window not past."""
    if spec.daily is not None:  # a firing may fall in it, but not within the look's jumps
        return (
            f"{_NEVER}: no firing falls in its window ({_said_daily(spec, spec.daily)}) in its "
            f"next {_WINDOW_JUMPS} openings"
        )
    if spec.end is None:  # not expected: a date exists, and nothing ends the firings
        return _NEVER
    if spec.start is not None and spec.start >= now:
        return f"{_NEVER}: no firing falls in its window ({_show(spec.start)} to {_show(spec.end)})"
    return f"{_NEVER}: no firing falls in the rest of its window (until {_show(spec.end)})"


def _said_daily(spec: ScheduleSpec, daily: tuple[time, time]) -> str:
    start, end = (t.strftime("%H:%M:%S" if t.second else "%H:%M") for t in daily)
    return f"{start} to {end} each day, {spec.timezone}"


def _names_a_date(expression: str) -> bool:
    """Whether a cron's day and month fields name a date some year has (not 31 February). A
    weekday given with them is a date in every month (cron's either); one given with a day
    that starts with ``*`` meets it within 28 years. APScheduler would look up to the year 9999."""
    _, _, day, _, weekday = expression.split()
    if day.startswith("*") or not weekday.startswith("*"):
        return True
    return _some_date(CronTrigger(**_cron_fields(expression), timezone=UTC))


def _may_fire_in_daily(
    spec: ScheduleSpec, daily: tuple[time, time], trigger: BaseTrigger, now: datetime
) -> bool:
    """Whether a firing may fall in a daily window at all, decided from the fields: for cron,
    a time of day it names is in the window, or one a spring gap of the zone shifts into it;
    for ``every:``, a point of its grid is, at one of the UTC offsets the zone takes. (Not
    when: that is for the look at the firings.)"""
    offsets, gaps = _wall_clock(spec.timezone, now.year)
    day = _DAY // _TICK
    opens, closes = (
        timedelta(hours=t.hour, minutes=t.minute, seconds=t.second) // _TICK for t in daily
    )
    spans = [(opens, closes)] if opens < closes else [(opens, day), (0, closes)]
    if isinstance(trigger, EveryTrigger):  # start + k x period meets start + j x gcd(period, day)
        step = math.gcd(trigger.period // _TICK, day)
        points = ((_of_day(trigger.start) + offset) // _TICK % step for offset in offsets)
        return any(low + (point - low) % step < high for point in points for low, high in spans)
    assert spec.cron is not None
    fields = _cron_fields(spec.cron)
    times = CronTrigger(minute=fields["minute"], hour=fields["hour"], timezone=UTC)  # each day
    midnight = datetime(2000, 1, 1, tzinfo=UTC)
    for low, high in spans:
        found = times.get_next_fire_time(None, midnight + low * _TICK)
        if found is not None and found < midnight + high * _TICK:
            return True
    for begins, length in gaps:  # a time in a gap fires shifted by it (02:30 at 03:30)
        found = times.get_next_fire_time(None, midnight + begins)
        while found is not None and found < midnight + begins + length:
            shifted = _of_day(found + length) // _TICK
            if any(low <= shifted < high for low, high in spans):
                return True
            found = times.get_next_fire_time(None, found + _TICK)
    return False


def _of_day(moment: datetime) -> timedelta:
    """How far into its day ``moment`` is, on its own clock."""
    return moment - moment.replace(hour=0, minute=0, second=0, microsecond=0)


@lru_cache(maxsize=1024)
def _wall_clock(
    zone_key: str, year: int
) -> tuple[frozenset[timedelta], frozenset[tuple[timedelta, timedelta]]]:
    """A zone's UTC offsets and spring gaps (how far into the day each begins, how long it is)
    from the start of ``year`` over the horizon, seen week by week (no zone changes its offset
    twice in a week) and each change found to the second: a few ms, once a zone and year."""
    zone = ZoneInfo(zone_key)
    moment = datetime(year, 1, 1, tzinfo=UTC)
    offset = _offset(moment, zone)
    offsets, gaps = {offset}, set()
    for _ in range((_HORIZON + _DAY * 366) // _WEEK):
        later = moment + _WEEK
        if (new := _offset(later, zone)) != offset:
            low, high = 0, int(_WEEK.total_seconds())  # offset at low, new at high
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (
                    (middle, high)
                    if _offset(moment + timedelta(seconds=middle), zone) == offset
                    else (low, middle)
                )
            if new > offset:  # the wall clock jumps from the old offset's time on
                gaps.add((_of_day(moment + timedelta(seconds=high) + offset), new - offset))
            offsets.add(new)
        moment, offset = later, new
    return frozenset(offsets), frozenset(gaps)


def _offset(moment: datetime, zone: ZoneInfo) -> timedelta:
    offset = moment.astimezone(zone).utcoffset()
    assert offset is not None
    return offset


@dataclass(frozen=True)
class Plan:
    """What to do now: the firings to run, and what was decided about the others."""

    fire: tuple[datetime, ...]
    notes: tuple[str, ...]
    last: datetime | None  # the newest firing dealt with, run or not
    skipped: int = 0  # firings skipped because the schedule is paused (``skip_while_paused``)


#: Missed firings, in a note, when nothing else is known: the daemon was not running.
DOWN = "missed while spoold was down"


def grace(spec: ScheduleSpec) -> float:
    """Seconds a firing may be late and still be on time: a period, a minute at most."""
    return min(ON_TIME, spec.every) if spec.every else ON_TIME


def believable(
    spec: ScheduleSpec, last: datetime | None, since: datetime, now: datetime
) -> tuple[datetime | None, datetime, str | None]:
    """``last`` (the newest firing recorded) and ``since`` (when the definition was accepted),
    or, when one lies later than ``now`` by more than ``grace``, the clock's error taken for
    what it is: a firing is recorded once it is due, so the wall clock stepped back since (or
    was ahead then, a bad RTC that NTP set right). Then the schedule counts from ``now`` less
    that grace (a firing due this moment still fires), and the note says so; the record written
    after it is believable again (said once). A firing recorded before ``since`` was one of an
    earlier definition dropped under the same id, unless ``since`` itself is in the future
    (the wall clock stepped back to before it)."""
    slack = timedelta(seconds=grace(spec))
    if last is not None and last < since <= now + slack:
        last = None
    newest = since if last is None else last
    if newest <= now + slack:
        return last, since, None
    what = "accepted at" if last is None else "the last firing recorded,"
    ahead = format_duration((newest - now).total_seconds())
    note = (
        f"{what} {_show(newest)}, is {ahead} later than now ({_show(now)}): the wall clock "
        "stepped back, or was ahead then; firings count from now"
    )
    moment = now - timedelta(seconds=grace(spec))
    return moment, min(since, moment), note


def plan(
    spec: ScheduleSpec, trigger: BaseTrigger, *, last: datetime | None, since: datetime,
    now: datetime, why: str = DOWN,
) -> Plan:  # fmt: skip
    """The firings due at ``now``: after ``last`` (the newest dealt with) or, never fired,
    after ``since`` (when the schedule was made). A firing more than ``grace`` seconds late
    was missed: ``catch_up`` decides, and the notes say what happened; ``why`` says why
    (spoold was down, unless its scheduler saw the wall clock step).
    """
    due, count = _due(spec, trigger, last or since, now)
    if not due:
        return Plan((), (), last)
    # Late by less than a period (a minute at most) is on time; later than that was missed.
    on_time = [t for t in due if (now - t).total_seconds() <= grace(spec)]
    missed = due[: len(due) - len(on_time)]
    fire, notes = list(on_time), []
    if missed:
        total = count - len(on_time)
        first = _show(missed[0]) if total == len(missed) else f"{total - len(missed)} earlier, "
        span = f"{first}{' to ' if first[-1] != ' ' else ''}{_show(missed[-1])}"
        if total == 1:
            span = _show(missed[0])
        if spec.catch_up == "skip":
            notes.append(f"skipped {total} firing(s) {why} ({span})")
        elif spec.catch_up == "once":
            if not on_time:  # an on-time firing already is the one run
                fire.insert(0, missed[-1])
            notes.append(
                f"caught up {total} firing(s) {why} ({span}) with one run (catch_up: once)"
            )
        else:
            kept = missed[-CATCH_UP_LIMIT:]
            fire[:0] = kept
            dropped = total - len(kept)
            notes.append(
                f"caught up {len(kept)} firing(s) {why} ({span}), "
                "one run each (catch_up: all)"
                + (f"; {dropped} older ones dropped (at most {CATCH_UP_LIMIT})" if dropped else "")
            )
    return Plan(tuple(fire), tuple(notes), due[-1])


def skip_while_paused(
    spec: ScheduleSpec, trigger: BaseTrigger, *, last: datetime | None, since: datetime,
    now: datetime,
) -> Plan:  # fmt: skip
    """While a schedule is paused: every firing due at ``now`` (after ``last``, or ``since``) is
    skipped, on time or missed, and dealt with: none is caught up once it is resumed."""
    due, count = _due(spec, trigger, last or since, now)
    if not due:
        return Plan((), (), last)
    span = _show(due[0]) if count == 1 else f"{count} from {_show(due[0])} to {_show(due[-1])}"
    if count > len(due):  # a long pause of a frequent schedule: only the newest are kept
        span = f"{count}, the newest {_show(due[-1])}"
    note = f"firing(s) skipped while paused: {span}"
    return Plan((), (note,), due[-1], skipped=count)


def next_fire_times(
    spec: ScheduleSpec, trigger: BaseTrigger, after: datetime, count: int = 3,
    *, last: datetime | None = None,
) -> list[datetime]:  # fmt: skip
    """The next ``count`` firings strictly after ``after`` (fewer if the schedule ends): the
    times ``plan`` will fire. ``last``: the newest firing dealt with (its wall-clock time,
    repeated by the autumn change, does not fire again)."""
    times: list[datetime] = []
    previous = last
    moment = after + _TICK if last is None else last
    for _ in range(_WINDOW_JUMPS + count):
        if len(times) == count:
            break
        found = _next(spec, trigger, previous, moment)
        if found is None:
            break
        if found > after:
            times.append(found)
        previous = moment = found
    return times


def jitter_delay(spec: ScheduleSpec, draw: float) -> float:
    """How long a run waits after its firing: ``draw`` in [0, 1) spread over the jitter."""
    return spec.jitter * draw


def _due(
    spec: ScheduleSpec, trigger: BaseTrigger, after: datetime, now: datetime
) -> tuple[list[datetime], int]:
    """The firings in (after, now], oldest first, at most the newest 2 x CATCH_UP_LIMIT of
    them (a long downtime of a frequent schedule), and how many there were in all."""
    times: list[datetime] = []
    count = 0
    previous: datetime | None = after
    while (moment := _next(spec, trigger, previous, previous or after)) is not None:
        if moment > now:
            break
        times.append(moment)
        count += 1
        if len(times) > CATCH_UP_LIMIT * 2:
            del times[:CATCH_UP_LIMIT]
        previous = moment
    return times, count


def _next(
    spec: ScheduleSpec, trigger: BaseTrigger, previous: datetime | None, now: datetime
) -> datetime | None:
    """The trigger's next firing after ``previous``, in a daily window if there is one."""
    previous = None if previous is None else previous.astimezone(UTC)
    moment: datetime | None = trigger.get_next_fire_time(previous, now.astimezone(UTC))
    for _ in range(_WINDOW_JUMPS):
        if moment is None:
            return None
        if previous is not None and moment <= previous:  # a trigger of an older spoold's kind
            moment = trigger.get_next_fire_time(None, previous + _TICK)
        elif (opens := _outside_daily(spec, moment)) is not None:
            moment = trigger.get_next_fire_time(None, opens)  # the next firing in the window
        else:
            return moment
    return None  # a window no firing ever falls into


def _outside_daily(spec: ScheduleSpec, moment: datetime) -> datetime | None:
    """When a daily window next opens, if ``moment`` is outside it (None: it is inside)."""
    if spec.daily is None:
        return None
    zone = ZoneInfo(spec.timezone)
    local = moment.astimezone(zone)
    start, end = spec.daily
    now = local.time().replace(tzinfo=None)
    inside = start <= now < end if start < end else (now >= start or now < end)  # over midnight
    if inside:
        return None
    day = local.date() if now < start else local.date() + timedelta(days=1)
    return datetime.combine(day, start, tzinfo=zone).astimezone(UTC)


def _daily(window: Mapping[str, Any]) -> tuple[time, time] | None:
    """A window given as times of day ("08:00"), or None when it is given as dates."""
    kinds = {key: _TIME_OF_DAY.match(str(window[key])) for key in ("start", "end") if key in window}
    if not kinds or not any(kinds.values()):
        return None
    if not all(kinds.values()) or len(kinds) != 2:
        raise ValueError("window: times of day need both start and end, e.g. 08:00 and 18:00")
    start, end = (time.fromisoformat(str(window[key]).zfill(5)) for key in ("start", "end"))
    if start == end:
        raise ValueError("window: start and end are the same time")
    return start, end


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"timezone: unknown time zone {name!r} (e.g. Europe/Berlin, UTC)"
        ) from None


def _moment(value: Any, zone: ZoneInfo, where: str) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        raise ValueError(f"{where}: {value!r} is no date or time (e.g. 2026-12-01T08:00)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=zone)


def cron_trigger(
    expression: str, *, timezone: str, start: datetime | None = None, end: datetime | None = None
) -> BaseTrigger:
    """A 5-field cron expression's trigger, with cron's day rule: when both the day of the month
    and the weekday are restricted, a day matches if either does (Vixie/ISC cron, POSIX), where
    APScheduler 3 requires both. A field counts as unrestricted when it starts with ``*`` (so
    ``*/2`` too, as in Vixie cron): then only the other one counts. The union is an OrTrigger
    of the two; one of them that never fires (30 February) is left out, as APScheduler would
    look for it up to the year 9999 at every call."""
    fields = _cron_fields(expression)
    _, _, day, _, weekday = expression.split()  # as written: "*/2" is a star to cron

    def cron(**days: str) -> CronTrigger:
        return CronTrigger(**{**fields, **days}, timezone=UTC)  # on wall-clock times: see below

    wall: BaseTrigger
    if day.startswith("*") or weekday.startswith("*"):
        wall = cron()
    else:
        by_weekday = cron(day="*")  # a month has every weekday: it may fire
        by_day = cron(day_of_week="*")
        wall = OrTrigger([by_day, by_weekday]) if _some_date(by_day) else by_weekday
    return WallCronTrigger(wall, ZoneInfo(timezone), start=start, end=end)


class WallCronTrigger(BaseTrigger):  # type: ignore[misc]  # APScheduler 3 ships no types
    """cron on a zone's wall clock: each wall-clock time the cron names fires once.

    ``wall`` finds the wall-clock times (naive times, handed to it as if UTC: a clock without
    changes); each becomes an instant as zoneinfo reads a naive time with ``fold=0``: a time the
    autumn change repeats at its first pass, a time the spring change skips with the offset
    before the gap, which is that time shifted by the gap (02:15 is 03:15 in Europe/Berlin).
    Two times that become one instant fire once. APScheduler 3's CronTrigger in the zone
    instead fired the repeated times twice and lost the skipped ones but the first.
    """

    __slots__ = ("end", "start", "wall", "zone")

    def __init__(
        self, wall: BaseTrigger, zone: ZoneInfo, *, start: datetime | None, end: datetime | None
    ) -> None:
        self.wall = wall
        self.zone = zone
        self.start = None if start is None else start.astimezone(UTC)
        self.end = None if end is None else end.astimezone(UTC)

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        """The first firing after ``previous_fire_time`` or, without one, at or after ``now``."""
        after = (
            now.astimezone(UTC)
            if previous_fire_time is None
            else previous_fire_time.astimezone(UTC) + _TICK
        )
        if self.start is not None and after < self.start:
            after = self.start
        found = self._first_from(after)
        return None if found is None or (self.end is not None and found > self.end) else found

    def _first_from(self, after: datetime) -> datetime | None:
        """The earliest instant at or after ``after`` of a wall-clock time the cron names.

        Instants grow with wall-clock times, but for the times in a spring gap, which land on
        those just after it: the look starts one gap early when a gap ended within a day, and
        ends at the first time outside a gap that is late enough (no later one is earlier).
        """
        zone = self.zone
        local = after.astimezone(zone)
        offset, day_before = local.utcoffset(), (after - _DAY).astimezone(zone).utcoffset()
        assert offset is not None and day_before is not None
        gap = max(offset - day_before, timedelta(0))
        moment = self.wall.get_next_fire_time(None, local.replace(tzinfo=UTC) - gap)
        best: datetime | None = None
        for _ in range(_GAP_LOOK):
            if moment is None:
                break
            naive = moment.replace(tzinfo=zone)
            instant = naive.astimezone(UTC)
            skipped = instant.astimezone(zone).replace(tzinfo=UTC) != moment
            if instant >= after and (best is None or instant < best):
                best = instant
            if best is not None and not skipped and instant >= after:
                return best
            moment = self.wall.get_next_fire_time(None, moment + _TICK)
        return best

    def __str__(self) -> str:
        return f"cron {self.wall} on the wall clock of {self.zone.key}"


def _some_date(trigger: CronTrigger) -> bool:
    """Whether a trigger's month and day fields name a date that exists (not 30 February),
    in any of the 28 years from 2024: every calendar (leap year, first weekday) is among them,
    for the APScheduler extensions that depend on it ("5th fri")."""
    fields = {field.name: field for field in trigger.fields}
    month, day = fields["month"], fields["day"]
    months = [n for n in range(1, 13) if month.get_next_value(datetime(2024, n, 1)) == n]
    return any(
        day.get_next_value(datetime(year, n, 1)) is not None
        for n in months
        for year in range(2024, 2024 + 28)
    )


def _cron_fields(expression: str) -> dict[str, str]:
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"{expression!r} is not 5 cron fields (minute hour day month weekday)")
    minute, hour, day, month, weekday = fields
    return {"minute": minute, "hour": hour, "day": day, "month": _months(month),
            "day_of_week": _weekdays(weekday)}  # fmt: skip


def _months(field: str) -> str:
    """cron's month field in APScheduler's words: names (jan-dec) as numbers, as APScheduler 3
    ignores a step after names ("jan-dec/3" would be every month)."""
    return _NAME.sub(
        lambda name: str(_named(name[0], _MONTHS, "month (1-12 or jan-dec)") + 1), field
    )


def _weekdays(field: str) -> str:
    """cron's weekday field in APScheduler's words: cron counts from Sunday (0 and 7),
    APScheduler 3 from Monday, so "1-5" must become mon-fri, not tue-sat; names, ranges of
    them (sun-tue, sat-sun) and steps (*/2, mon-fri/2) are read here too."""
    if field == "*":
        return field
    days: set[int] = set()
    for part in field.split(","):
        span, slash, step_text = part.partition("/")
        step = int(step_text) if step_text.isdigit() else 1
        if span == "*":
            first, last = 0, 6
        elif "-" in span:
            first_text, last_text = span.split("-", 1)
            first, last = _weekday(first_text), _weekday(last_text)
            if last == 0 and first > 0 and not last_text.isdigit():
                last = 7  # a range of names that ends on Sunday (sat-sun): 6-7
        else:
            first = last = _weekday(span)
        if last < first or step < 1 or (slash and not step_text.isdigit()):
            raise ValueError(f"weekday field {field!r} is not valid")
        days.update(day % 7 for day in range(first, last + 1, step))
    return ",".join(_DAYS[day][:3] for day in sorted(days))


def _weekday(text: str) -> int:
    if text.isdigit():
        if 0 <= int(text) <= 7:
            return int(text)
        raise ValueError(f"{text!r} is not a weekday (0-7 or sun-sat)")
    return _named(text, _DAYS, "weekday (0-7 or sun-sat)")


def _named(text: str, names: tuple[str, ...], what: str) -> int:
    """Where a name is in ``names``: its first three letters, as in cron, or more of it."""
    word = text.lower()
    for index, name in enumerate(names):
        if len(word) >= 3 and name.startswith(word):
            return index
    raise ValueError(f"{text!r} is not a {what}")


_DAYS = ("sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday")
_MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august",
           "september", "october", "november", "december")  # fmt: skip
_NAME = re.compile(r"[A-Za-z]+")


def _show(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


#: A schedule's status.json keeps this many notes (the newest).
NOTES_KEPT = 50


def _first_firings(value: str | Mapping[str, Any], accepted: datetime) -> list[str]:
    """The firings a schedule accepted at ``accepted`` shows first: those after that moment,
    as the scheduler's look at it computes them (``next_fire_times``)."""
    try:
        spec = ScheduleSpec.from_document(value)
        return [rfc3339(t) for t in next_fire_times(spec, spec.trigger(accepted), accepted)]
    except ValueError:  # admitted, so not expected: the scheduler says why when it looks
        return []


def schedule_status(
    spec_document: dict[str, Any], *, job_id: str, source: str, now: datetime, sha256: str,
    previous: dict[str, Any] | None,
) -> dict[str, Any]:  # fmt: skip
    """A schedule's status.json as intake writes it; a replaced definition keeps its history."""
    previous = previous or {}
    replaced = ["definition replaced"] if previous else []
    if previous.get("paused"):
        # The pause belonged to the definition replaced (its mark went with its directory).
        replaced = [
            f"definition replaced while paused (by {previous.get('paused_by')} since "
            f"{previous.get('paused_at')}): the new definition is not paused"
        ]
    accepted_at = rfc3339(now)
    return {
        "job_id": job_id,
        "state": "scheduled",
        "executor": spec_document.get("executor"),
        "type": spec_document.get("type"),
        "schedule": spec_document["schedule"],
        **labels_and_description(spec_document),
        "source": source,
        "sha256": sha256,
        "submitted_at": previous.get("submitted_at") or accepted_at,
        "accepted_at": accepted_at,
        "last_fired": previous.get("last_fired"),
        # What the scheduler's first look at it records: left to it, that look would write
        # status.json again (durably) for each schedule registered.
        "next_fire_times": _first_firings(spec_document["schedule"], parse_rfc3339(accepted_at)),
        "paused": False,
        "runs": previous.get("runs", []),
        "notes": [
            *previous.get("notes", []),
            *({"at": rfc3339(now), "what": note} for note in replaced),
        ][-NOTES_KEPT:],
    }
