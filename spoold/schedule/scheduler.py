"""The daemon's schedules: APScheduler 3.x wakes spoold at each firing; spoold records it.

Every firing becomes a run ``<job_id>@<UTC time>`` in pending/, made before the schedule's
status.json records it and before it is queued. A crash before the record leaves the run, whose
name the next look recognises (it is never made twice); a crash after it leaves a pending run,
which the restart queues (it is never lost). What APScheduler calls is only a wake-up: which
firings are due, and what a restart does about the missed ones, ``spoold.schedule.triggers`` decides
from the schedule's own record, so a slow or repeated call changes nothing.

Users steer a schedule through files in its directory, which its faces write
(``spoold.face.schedules``) and this scheduler alone acts on; it alone writes status.json:

- ``paused`` (who, since when): while it is there, firings make no runs; each is dealt with
  (``last_fired`` moves on) and counted in one note per pause, so none is caught up once the
  mark is gone. It is looked at on every firing: a pause holds from the next firing on, on every
  host, woken or not. ``resumed`` (who, when) tells the next look who ended the pause and when,
  so that firings a downtime hid are told apart: those before the resume were paused ones.
- ``run-now.<UTC time>``: one run, named by the time it was asked for (as a firing is named by
  its time), made at the next sync (a face wakes the daemon, SIGUSR1) with the overlap rules of
  a firing; made, recorded, then the request removed: a request seen again after a crash finds
  its run made (the name) or recorded (``runs``), and makes none.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger

from spoold.core.clock import Clock, parse_rfc3339, rfc3339
from spoold.core.documents import load_document
from spoold.core.errors import DuplicateJob, SpooldError
from spoold.core.job import JobSpec, JobStatus
from spoold.core.joblog import JobLog, format_line
from spoold.core.spool import JobDir, Spool
from spoold.core.spool.jobs import ScheduleRequests
from spoold.out.outbox import Callbacks
from spoold.run.dispatch import JobMeta
from spoold.run.ledger import JobLedger, Listener
from spoold.schedule.triggers import (
    NOTES_KEPT,
    Plan,
    ScheduleSpec,
    jitter_delay,
    next_fire_times,
    plan,
    run_id,
    skip_while_paused,
)

_RUNS_KEPT = 20  # in a schedule's status.json


class _Made(NamedTuple):
    """A run made: its id, meta, when it is due, and (a firing's) how late it was made."""

    run: str
    meta: JobMeta
    due: datetime
    lag: float | None  # seconds from the firing's moment to the run's making; None: a run now


class _Skips(NamedTuple):
    """Firings skipped in one look at a paused schedule, for its one note per pause."""

    paused_at: str
    paused_by: str
    skipped: int
    newest: datetime
    said: str  # for the log: which firings, this time


#: What one look notes, in order: words, or firings skipped while paused.
_Notes = list[str | _Skips]


class Scheduler:
    """Keeps APScheduler's jobs in line with scheduled/ and makes the runs of each firing."""

    def __init__(
        self,
        spool: Spool,
        clock: Clock,
        logger: logging.Logger,
        *,
        queue: Callable[[str, dict[str, Any], JobMeta], object],
        defer: Callable[[str, float], None],
        cancel: Callable[[str, str], None],
        draw: Callable[[], float] = random.random,
        callbacks: Callbacks | None = None,
        on_fired: Callable[[float], None] | None = None,
        listeners: Iterable[Listener] = (),
    ) -> None:
        """``queue`` hands a run to the workers, ``defer`` makes it wait (jitter), ``cancel``
        ends a run (``overlap: replace``); ``on_fired`` hears, for each run a firing makes, how
        many seconds after the firing's moment it was made (``spoold_schedule_lag_seconds``);
        ``listeners``: told of each run made (the metrics count it accepted)."""
        self._spool = spool
        self._callbacks = callbacks
        self._ledger = JobLedger(spool, callbacks, listeners=listeners, logger=logger)
        self._clock = clock
        self._logger = logger
        self._queue = queue
        self._defer = defer
        self._cancel = cancel
        self._draw = draw
        self._on_fired = on_fired
        self._aps = BackgroundScheduler(timezone=UTC)
        self._registered: dict[str, str] = {}  # job id -> sha256 of the definition
        self._lock = threading.RLock()  # firings and registrations, one at a time

    def start(self) -> None:
        self._aps.start()
        self.sync()

    def stop(self) -> None:
        if self._aps.running:  # the daemon may stop before it started
            self._aps.shutdown(wait=False)

    def sync(self) -> None:
        """Register what scheduled/ holds and drop what it no longer does; fire what is due,
        and act on what users asked of a schedule (pause, resume, run now)."""
        with self._lock:
            present = {job.job_id: job for job in self._spool.jobs.list_jobs("scheduled")}
            for job_id in set(self._registered) - set(present):
                self._unregister(job_id)
                self._logger.info("schedule %s removed", job_id)
            for job_id, job in present.items():
                try:
                    status = self._spool.jobs.read_status(job)
                    sha = str(status.get("sha256"))
                    if self._registered.get(job_id) != sha:
                        self._register(job, sha)  # fires: what was asked is done there too
                    elif _asked(self._spool.jobs.schedule_requests(job), status):
                        self._fire(job_id)
                except (OSError, SpooldError, ValueError) as exc:
                    self._logger.error("schedule %s cannot be loaded: %s", job_id, exc)

    def fire(self, job_id: str) -> None:
        """Make the runs due now for one schedule (APScheduler calls this at each firing)."""
        with self._lock:
            try:
                self._fire(job_id)
            except Exception:  # a schedule's failure must not stop the scheduler
                self._logger.exception("schedule %s failed to fire", job_id)

    def _load(
        self, schedule: JobDir
    ) -> tuple[dict[str, Any], ScheduleSpec, dict[str, Any], BaseTrigger]:
        """A schedule's job document, its ``schedule:`` read, its status, its trigger."""
        status = self._spool.jobs.read_status(schedule)
        data = self._spool.jobs.read_job_file(schedule, sha256=status.get("sha256"))
        document = load_document(data, "job.yaml")
        spec = ScheduleSpec.from_document(document["schedule"])
        # The same anchor as plan()'s: an ``every:`` definition counts from its acceptance, so
        # APScheduler wakes spoold at the very firings plan() makes (not a period later).
        return document, spec, status, spec.trigger(parse_rfc3339(status["accepted_at"]))

    def _register(self, job: JobDir, sha: str) -> None:
        _, spec, _, trigger = self._load(job)
        self._aps.add_job(
            self.fire, trigger=trigger, args=[job.job_id], id=job.job_id, replace_existing=True,
            misfire_grace_time=None, coalesce=True, max_instances=1,
        )  # fmt: skip
        self._registered[job.job_id] = sha
        self._logger.info("schedule %s registered (%s)", job.job_id, _describe(spec))
        self._fire(job.job_id)  # what was missed while down, or nothing

    def _unregister(self, job_id: str) -> None:
        self._registered.pop(job_id, None)
        if self._aps.get_job(job_id) is not None:
            self._aps.remove_job(job_id)

    def _fire(self, job_id: str) -> None:
        schedule = self._spool.jobs.find(job_id)
        if schedule is None or schedule.directory != "scheduled":
            self._unregister(job_id)
            return
        document, spec, status, trigger = self._load(schedule)
        asked = self._spool.jobs.schedule_requests(schedule)
        now = self._clock.now()
        recorded = status.get("last_fired")
        since = parse_rfc3339(status["accepted_at"])
        # A firing of an earlier definition (dropped again under the same id) is not this one's.
        last = None if recorded is None else parse_rfc3339(recorded)
        last = None if last is None or last < since else last
        notes: _Notes = []
        last = self._follow_pause(spec, trigger, status, asked, last=last, since=since, now=now,
                                  notes=notes)  # fmt: skip
        made: list[_Made] = []
        if asked.paused is not None:
            decided = skip_while_paused(spec, trigger, last=last, since=since, now=now)
            if decided.last is not None and decided.skipped:
                notes.append(_skips(asked.paused, decided))
        else:
            decided = plan(spec, trigger, last=last, since=since, now=now)
            notes.extend(decided.notes)
            made = [
                made_run
                for moment in decided.fire
                if (made_run := self._run(schedule, document, spec, status, moment, notes=notes))
            ]
        made += self._runs_now(schedule, document, spec, status, asked, notes=notes)
        if (newest := decided.last or last) is not None:
            status["last_fired"] = rfc3339(newest)
        coming = [] if asked.paused else next_fire_times(spec, trigger, now, last=newest)
        status["next_fire_times"] = [rfc3339(t) for t in coming]
        self._note(schedule, status, notes)
        self._spool.jobs.write_status(schedule, status, durable=True)  # the record, before queueing
        for name, _, _ in asked.run_now:  # made and recorded: done
            self._spool.jobs.drop_schedule_request(schedule, name)
        if _spent(asked):
            self._spool.jobs.drop_schedule_request(schedule, "resumed")
        for run, meta, due, lag in made:
            if lag is not None and self._on_fired is not None:
                try:
                    self._on_fired(lag)
                except Exception:  # a metric must not cost a run
                    self._logger.exception("schedule %s: on_fired failed", job_id)
            if due > now:
                self._defer(run, due.timestamp())
            else:
                self._queue(run, document, meta)

    def _follow_pause(
        self, spec: ScheduleSpec, trigger: BaseTrigger, status: dict[str, Any],
        asked: ScheduleRequests, *, last: datetime | None, since: datetime, now: datetime,
        notes: _Notes,
    ) -> datetime | None:  # fmt: skip
        """Bring status.json's ``paused`` in line with the mark; return the newest firing dealt
        with, which a resume seen late moves on past the firings its pause covered."""
        paused = asked.paused
        if paused is not None:
            if not status.get("paused") or status.get("paused_at") != paused.get("at"):
                status.update(paused=True, paused_at=paused.get("at"), paused_by=paused.get("by"))
                notes.append(
                    f"paused by {paused.get('by')} at {paused.get('at')}: its firings make no "
                    "runs until it is resumed (a run now still runs)"
                )
            return last
        if not status.get("paused"):
            status.setdefault("paused", False)
            return last
        # Resumed since the last look. Firings up to the resume were paused ones, even those a
        # downtime hid; only those after it are the catch-up's to decide.
        ended = {"at": status.get("paused_at"), "by": status.get("paused_by")}
        resumed = asked.resumed if _ends(asked.resumed, ended) else None
        skipped = 0
        if resumed is not None:
            until = min(parse_rfc3339(str(resumed["at"])), now)
            before = skip_while_paused(spec, trigger, last=last, since=since, now=until)
            if before.last is not None and before.skipped:
                notes.append(_skips(ended, before))
                last, skipped = before.last, before.skipped
        status.update(paused=False, paused_at=None, paused_by=None)
        who = f"by {resumed.get('by')} at {resumed.get('at')}" if resumed else "(its mark removed)"
        seen = f"; {skipped} more firing(s) skipped while paused" if skipped else ""
        notes.append(
            f"resumed {who}, paused since {ended['at']} by {ended['by']}{seen}: its next firings "
            "run; those while paused are not caught up"
        )
        return last

    def _runs_now(
        self, schedule: JobDir, document: dict[str, Any], spec: ScheduleSpec,
        status: dict[str, Any], asked: ScheduleRequests, *, notes: _Notes,
    ) -> list[_Made]:  # fmt: skip
        """The runs asked for now (``run-now.<time>``), each made once."""
        made = []
        for _, run, request in asked.run_now:
            recorded = {str(entry.get("run_id")) for entry in status.get("runs", [])}
            if run in recorded:
                continue  # made and recorded before a crash kept the request from going
            moment = datetime.strptime(run.partition("@")[2], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
            found = self._run(schedule, document, spec, status, moment, notes=notes,
                              request=request)  # fmt: skip
            if found is not None:
                made.append(found)
        return made

    def _run(
        self,
        schedule: JobDir,
        document: dict[str, Any],
        spec: ScheduleSpec,
        status: dict[str, Any],
        moment: datetime,
        *,
        notes: _Notes,
        request: Mapping[str, Any] | None = None,
    ) -> _Made | None:
        """Make the run of one firing, or of a run now (``request``: who asked, when); None
        when not to make it."""
        job_id, run = schedule.job_id, run_id(schedule.job_id, moment)
        going = [r for r in _recent(status) if self._going(r)]
        when = rfc3339(moment)
        what = (
            f"firing at {when}"
            if request is None
            else f"run now asked for by {request.get('by')} at {request.get('at')}"
        )
        if going and spec.overlap == "skip":
            notes.append(f"{what} skipped: run {going[-1]} is still going (overlap: skip)")
            return None
        if going and spec.overlap == "replace":
            for old in going:
                self._cancel(old, f"replaced by the {what} (overlap: replace)")
        concurrency = document.get("concurrency")
        if spec.overlap in ("queue", "replace"):  # one run at a time, in firing order
            concurrency = {"key": f"schedule:{job_id}", "limit": 1, "strategy": "queue"}
        made_at = self._clock.now()
        run_status = JobStatus.accepted(
            JobSpec.from_document(document, run), source=f"scheduled/{job_id}", now=made_at,
            sha256=status.get("sha256"),
        )  # fmt: skip
        run_status.schedule = job_id
        run_status.concurrency = concurrency
        # A firing is the schedule's file run again: its submitter's, whose policy admitted it.
        run_status.submitter = status.get("submitter")
        run_status.submitter_uid = status.get("submitter_uid")
        due = made_at  # a run now is wanted now: no jitter
        if request is None:
            due = moment + timedelta(seconds=jitter_delay(spec, self._draw()))
        if due > self._clock.now():
            run_status.next_attempt_at = rfc3339(due)
        said = f"firing at {when} of schedule {job_id}" if request is None else (
            f"run now of schedule {job_id}, asked for by {request.get('by')} at {request.get('at')}"
        )  # fmt: skip
        line = format_line(rfc3339(self._clock.now()), "INFO", f"spoold: {said}")
        entry: dict[str, Any] = {"run_id": run, "fired_at": when}
        if request is not None:
            entry["requested_by"] = request.get("by")
        try:
            target = None if self._callbacks is None else self._callbacks.target_of(run, document)
            self._ledger.enter(
                run_status, target,
                lambda: self._spool.stages.create_run(schedule, run, run_status.to_dict(), line),
            )  # fmt: skip
        except DuplicateJob:
            # Made before a crash that kept it from being recorded: not again. A run now is
            # recorded still (its request goes once recorded), unless a firing of that very
            # second made the run, which then serves both.
            if request is not None:  # not recorded yet: _runs_now looked
                status["runs"] = [*status.get("runs", []), entry][-_RUNS_KEPT:]
            return None
        status["runs"] = [*status.get("runs", []), entry][-_RUNS_KEPT:]
        meta = JobMeta.from_document({**document, "concurrency": concurrency})
        lag = None if request is not None else (made_at - moment).total_seconds()
        return _Made(run, meta, due, lag)

    def _going(self, run: str) -> bool:
        found = self._spool.jobs.find(run)
        return found is not None and found.directory in ("pending", "running")

    def _note(self, schedule: JobDir, status: dict[str, Any], notes: _Notes) -> None:
        """What was caught up or skipped: in the schedule's status.json and its log. Firings
        skipped while paused make one note per pause, counted on as the pause lasts."""
        if not notes:
            return
        stamp = rfc3339(self._clock.now())
        kept = list(status.get("notes", []))
        for note in notes:
            if isinstance(note, str):
                kept.append({"at": stamp, "what": note})
                continue
            same = bool(kept) and kept[-1].get("paused_at") == note.paused_at
            count = note.skipped + (int(kept[-1].get("skipped", 0)) if same else 0)
            entry = {
                "at": stamp,
                "what": f"skipped {count} firing(s) while paused (by {note.paused_by} since "
                f"{note.paused_at}), the newest at {rfc3339(note.newest)}",
                "paused_at": note.paused_at,
                "skipped": count,
            }
            kept[-1 if same else len(kept) :] = [entry]
        status["notes"] = kept[-NOTES_KEPT:]
        said = [note if isinstance(note, str) else note.said for note in notes]
        with self._spool.jobs.open_log(schedule) as handle:
            log = JobLog(handle, self._clock)
            for line in said:
                log.info(line)
        for line in said:
            self._logger.info("schedule %s: %s", schedule.job_id, line)


def _asked(asked: ScheduleRequests, status: Mapping[str, Any]) -> bool:
    """Whether a schedule's requests differ from what its status.json has taken in."""
    if asked.run_now or _spent(asked):
        return True
    if asked.paused is None:
        return bool(status.get("paused"))
    return not status.get("paused") or status.get("paused_at") != asked.paused.get("at")


def _spent(asked: ScheduleRequests) -> bool:
    """Whether a resume's record is there to be noted and removed: not while its face is
    between writing it and removing the pause it ends (then it is noted at the next look)."""
    if asked.resumed is None:
        return False
    return asked.paused is None or not _ends(asked.resumed, asked.paused)


def _ends(resumed: Mapping[str, Any] | None, paused: Mapping[str, Any]) -> bool:
    """Whether a resume's record is of the pause ``paused`` (not of an older one)."""
    return resumed is not None and isinstance(resumed.get("at"), str) and (
        (resumed.get("paused") or {}).get("at") == paused.get("at")
    )  # fmt: skip


def _skips(paused: Mapping[str, Any], decided: Plan) -> _Skips:
    """The firings ``decided`` skipped while ``paused`` (``skip_while_paused``), as noted."""
    assert decided.last is not None
    said = "; ".join(decided.notes)
    return _Skips(str(paused.get("at")), str(paused.get("by")), decided.skipped, decided.last, said)


def _recent(status: dict[str, Any]) -> list[str]:
    return [str(entry["run_id"]) for entry in status.get("runs", [])[-5:]]


def _describe(spec: ScheduleSpec) -> str:
    what = f"cron {spec.cron!r}" if spec.cron else f"every {spec.every:g}s"
    return f"{what} in {spec.timezone}, catch_up: {spec.catch_up}, overlap: {spec.overlap}"
