"""Schedules as the faces show and steer them: ``spoold schedule list|run|pause|resume`` and
``/api/v1/schedules`` call these, and show what they return.

Nothing here reaches into a daemon: each action is a request written into the schedule's
directory (``Jobs.request_pause`` and the rest), which works with the daemon stopped, from
another host of a shared spool and across restarts. The daemon's scheduler acts on it at its
next sync (``wake_daemon`` asks for that at once, SIGUSR1) and alone writes the schedule's
status.json. A pause holds from the next firing on even unwoken: every firing looks for it.

Errors: ``JobNotFound`` (the API's 404) for an id that names no schedule, a job's id too;
``InvalidTransition`` (409) for a run now that its overlap rule would skip; ``NotAllowed``
(403) where this user may not look into or write the spool.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.triggers.base import BaseTrigger

from spoold.core.clock import SystemClock, parse_rfc3339, rfc3339
from spoold.core.documents import load_document
from spoold.core.errors import InvalidTransition, JobNotFound, SpooldError
from spoold.core.spool import JobDir, Spool
from spoold.face.access import (
    NotAllowed,
    hidden_directories,
    locate,
    permission_problem,
    read_status,
    refusal,
)
from spoold.run.control import JobControl
from spoold.schedule.triggers import ScheduleSpec, next_fire_times, run_id

#: How many next firings a row shows: the next five, however far ahead (up to the schedule's
#: own end), from the definition itself, so that they are right with the daemon down too.
NEXT_SHOWN = 5
#: How many runs a row shows, newest first, each with where it is now.
LAST_RUNS_SHOWN = 5

_STATE_OF = {"pending": "pending", "running": "running", "done": "succeeded"}


def schedule_rows(spool: Spool, *, now: datetime | None = None) -> list[dict[str, Any]]:
    """Every schedule as ``GET /api/v1/schedules`` shows it (``schedule_row``), the soonest
    firing first; paused ones, and those that never fire again, last, by id."""
    if hidden_directories(spool, ("scheduled",)):
        raise NotAllowed(f"cannot list schedules: {refusal(spool, ['scheduled'])}")
    moment = now or datetime.now(UTC)
    rows = []
    for job in spool.jobs.list_jobs("scheduled"):
        try:
            rows.append(_row(spool, job, moment))
        except (SpooldError, OSError, ValueError):
            continue  # unscheduled (or replaced) while we looked, or one we may not read
    rows.sort(key=_soonest_first)
    return rows


def _soonest_first(row: dict[str, Any]) -> tuple[int, str, str]:
    coming = row["next_fire_times"]
    return (0, coming[0], row["job_id"]) if coming else (1, "", row["job_id"])


def schedule_row(spool: Spool, job_id: str, *, now: datetime | None = None) -> dict[str, Any]:
    """One schedule: its status.json (as ``spoold status ID --json``) and, from the spool as it
    is now, ``paused`` (with ``paused_at``, ``paused_by``), ``next_fire_times`` (the next
    ``NEXT_SHOWN``; none while paused), ``last_runs`` (``LAST_RUNS_SHOWN``, newest first, each
    with its state: pending, running, succeeded, failed, cancelled, or gone once purged) and
    ``run_now_asked`` (runs asked for that the daemon has not made yet). Its ``notes`` say what
    was caught up or skipped (missed while down, overlapping, paused)."""
    return _row(spool, _schedule(spool, job_id), now or datetime.now(UTC))


def run_now(spool: Spool, job_id: str, *, who: str, now: datetime | None = None) -> str:
    """Ask for one run of a schedule now, paused or not; return the id it has: ``<id>@<now's
    UTC second>``, named as a firing is, or the first second after it that names no run yet:
    each request is a run of its own (three asked for in one second were one, each told it
    was asked for). The daemon makes it at its next sync, applying the schedule's overlap
    rule as for a firing; ``InvalidTransition`` at once when that rule would skip it
    (``overlap: skip`` and a run still going), or when the next minute's seconds all name a
    run already."""
    moment = now or datetime.now(UTC)
    schedule = _schedule(spool, job_id)
    status = read_status(spool, schedule)
    going = [r for r in _newest_runs(status, 5) if _where(spool, r) in ("pending", "running")]
    if going and _spec(spool, schedule, status).overlap == "skip":
        raise InvalidTransition(
            f"schedule {job_id}: run {going[-1]} is still going and its overlap rule (skip) "
            "would skip a run now; try again once it has ended"
        )
    for ahead in range(RUN_NOW_SECONDS):
        run = run_id(job_id, moment + timedelta(seconds=ahead))
        if spool.jobs.find(run) is not None:
            continue  # a firing's, or one asked for before and made
        record = {"by": who, "at": rfc3339(moment), "run_id": run}
        with _asking(job_id):
            if spool.jobs.request_run_now(schedule, run, record):  # False: asked for already
                return run
    raise InvalidTransition(
        f"schedule {job_id}: {RUN_NOW_SECONDS} runs were asked for in the last minute, one a "
        "second; try again in a moment"
    )


#: How many seconds ahead of the asking a run asked for may be named, one run each.
RUN_NOW_SECONDS = 60


def pause(spool: Spool, job_id: str, *, who: str, now: datetime | None = None) -> dict[str, Any]:
    """Pause a schedule: its firings make no runs until it is resumed, and are not caught up
    then. ``{"job_id", "paused": True, "paused_at", "paused_by", "changed"}``; ``changed`` is
    False when it was paused already (then ``paused_at``/``paused_by`` are that pause's)."""
    schedule = _schedule(spool, job_id)
    record = {"by": who, "at": rfc3339(now or datetime.now(UTC))}
    with _asking(job_id):
        before = spool.jobs.request_pause(schedule, record)
    held = record if before is None else before
    return {"job_id": job_id, "paused": True, "paused_at": held.get("at"),
            "paused_by": held.get("by"), "changed": before is None}  # fmt: skip


def resume(spool: Spool, job_id: str, *, who: str, now: datetime | None = None) -> dict[str, Any]:
    """Resume a paused schedule: its next firing runs; those while paused are not caught up.
    ``{"job_id", "paused": False, "resumed_at", "resumed_by", "was_paused", "changed"}``;
    ``changed`` is False when it was not paused (``was_paused``: the pause that ended, or
    None)."""
    schedule = _schedule(spool, job_id)
    record = {"by": who, "at": rfc3339(now or datetime.now(UTC))}
    with _asking(job_id):
        ended = spool.jobs.request_resume(schedule, record)
    return {"job_id": job_id, "paused": False, "resumed_at": record["at"],
            "resumed_by": who, "was_paused": ended, "changed": ended is not None}  # fmt: skip


def firings_within(spool: Spool, job_id: str, *, now: datetime, hours: int = 24) -> list[float]:
    """The firings of a schedule in the next ``hours`` (Unix times; at most 1500), as its
    scheduler will make them: the web page's timeline."""
    job = _schedule(spool, job_id)
    status = read_status(spool, job)
    try:
        spec = _spec(spool, job, status)
        trigger = spec.trigger(parse_rfc3339(status["accepted_at"]))
    except (SpooldError, OSError, ValueError, KeyError):
        return []
    end = now.timestamp() + hours * 3600
    return [t.timestamp() for t in next_fire_times(spec, trigger, now, 1500)
            if t.timestamp() <= end]  # fmt: skip


@contextlib.contextmanager
def _asking(job_id: str) -> Iterator[None]:
    """A request written into a schedule's directory: said as the CLI and the API say it."""
    try:
        yield
    except FileNotFoundError:
        raise JobNotFound(f"schedule {job_id!r} was removed meanwhile") from None
    except PermissionError as exc:
        raise NotAllowed(permission_problem(exc)) from None


def wake_daemon(spool: Spool, host: str) -> bool:
    """Ask the daemon on ``host`` to sync its schedules now (SIGUSR1: its next round scans, and
    a scan syncs them); False if none runs there (it acts when it starts, or another host of a
    shared spool at its next scan)."""
    return JobControl(spool, SystemClock(), who="spoold").wake_daemon(host)


# -- reading ----------------------------------------------------------------------------------


def _schedule(spool: Spool, job_id: str) -> JobDir:
    """The schedule ``job_id``; JobNotFound when no schedule has that id (a job's included)."""
    job = locate(spool, job_id)
    if job.directory == "scheduled":
        return job
    name, _, _ = job_id.partition("@")
    what = f"a run of schedule {name}" if name != job_id else "a job"
    raise JobNotFound(f"{job_id} is {what} (in {job.directory}/), not a schedule")


def _row(spool: Spool, job: JobDir, now: datetime) -> dict[str, Any]:
    status = read_status(spool, job)
    asked = spool.jobs.schedule_requests(job)
    row = dict(status)
    paused = asked.paused
    row["paused"] = paused is not None
    row["paused_at"] = None if paused is None else paused.get("at")
    row["paused_by"] = None if paused is None else paused.get("by")
    row["next_fire_times"] = [] if paused is not None else _next_firings(spool, job, status, now)
    row["last_runs"] = [_run_entry(spool, entry)
                        for entry in reversed(status.get("runs", [])[-LAST_RUNS_SHOWN:])]  # fmt: skip
    row["run_now_asked"] = [
        {"run_id": run, "by": record.get("by"), "at": record.get("at")}
        for _, run, record in asked.run_now
    ]
    return row


def _next_firings(spool: Spool, job: JobDir, status: dict[str, Any], now: datetime) -> list[str]:
    """The next firings after ``now``, as the daemon's scheduler will make them."""
    try:
        spec = _spec(spool, job, status)
        since = parse_rfc3339(status["accepted_at"])
        trigger = spec.trigger(since)
    except (SpooldError, OSError, ValueError, KeyError):
        # Unreadable to this user, or broken: what the scheduler last said, if still ahead.
        return [t for t in status.get("next_fire_times") or [] if parse_rfc3339(t) > now]
    recorded = status.get("last_fired")
    last = None if recorded is None else parse_rfc3339(recorded)
    if last is not None and (last < since or _missed_since(spec, trigger, last, now)):
        # An older definition's, or firings were missed since (the daemon is down): the
        # newest dealt with only matters to a wall-clock time the autumn change repeats.
        last = None
    return [rfc3339(t) for t in next_fire_times(spec, trigger, now, NEXT_SHOWN, last=last)]


def _missed_since(spec: ScheduleSpec, trigger: BaseTrigger, last: datetime, now: datetime) -> bool:
    """Whether a firing after ``last`` is due already (or none comes at all)."""
    following = next_fire_times(spec, trigger, last, 1, last=last)
    return not following or following[0] < now


def _spec(spool: Spool, job: JobDir, status: dict[str, Any]) -> ScheduleSpec:
    data = spool.jobs.read_job_file(job, sha256=status.get("sha256"))
    return ScheduleSpec.from_document(load_document(data, "job.yaml")["schedule"])


def _run_entry(spool: Spool, entry: dict[str, Any]) -> dict[str, Any]:
    """One of a schedule's runs with its state: where it is (a few stats), and for one in
    failed/ its status.json's word (failed or cancelled)."""
    run = str(entry.get("run_id"))
    where = _where(spool, run)
    state = "gone" if where is None else _STATE_OF.get(where)
    if state is None and where is not None:
        try:
            state = str(spool.jobs.read_status(spool.jobs.get(run)).get("state"))
        except (SpooldError, OSError):
            state = "failed"  # moved on (retried) while we looked, or unreadable
    shown = {"run_id": run, "fired_at": entry.get("fired_at"), "state": state}
    if entry.get("requested_by"):
        shown["requested_by"] = entry["requested_by"]
    return shown


def _where(spool: Spool, run: str) -> str | None:
    found = spool.jobs.find(run)
    return None if found is None else found.directory


def _newest_runs(status: dict[str, Any], count: int) -> list[str]:
    return [str(entry.get("run_id")) for entry in status.get("runs", [])[-count:]]
