"""The daemon's schedules: APScheduler 3.x wakes spoold at each firing; spoold records it.

Every firing becomes a run ``<job_id>@<UTC time>`` in pending/, made before the schedule's
status.json records it and before it is queued. A crash before the record leaves the run, whose
name the next look recognises (it is never made twice); a crash after it leaves a pending run,
which the restart queues (it is never lost). What APScheduler calls is only a wake-up: which
firings are due, and what a restart does about the missed ones, ``spoold.schedule.triggers`` decides
from the schedule's own record, so a slow or repeated call changes nothing.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger

from spoold.core.clock import Clock, parse_rfc3339, rfc3339
from spoold.core.documents import load_document
from spoold.core.errors import DuplicateJob, SpooldError
from spoold.core.job import JobSpec, JobStatus
from spoold.core.joblog import JobLog, format_line
from spoold.core.spool import JobDir, Spool
from spoold.out.outbox import Callbacks
from spoold.run.dispatch import JobMeta
from spoold.run.ledger import JobLedger
from spoold.schedule.triggers import (
    NOTES_KEPT,
    ScheduleSpec,
    jitter_delay,
    next_fire_times,
    plan,
    run_id,
)

_RUNS_KEPT = 20  # in a schedule's status.json


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
    ) -> None:
        """``queue`` hands a run to the workers, ``defer`` makes it wait (jitter), ``cancel``
        ends a run (``overlap: replace``)."""
        self._spool = spool
        self._callbacks = callbacks
        self._ledger = JobLedger(spool, callbacks, logger=logger)
        self._clock = clock
        self._logger = logger
        self._queue = queue
        self._defer = defer
        self._cancel = cancel
        self._draw = draw
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
        """Register what scheduled/ holds and drop what it no longer does; fire what is due."""
        with self._lock:
            present = {job.job_id: job for job in self._spool.jobs.list_jobs("scheduled")}
            for job_id in set(self._registered) - set(present):
                self._unregister(job_id)
                self._logger.info("schedule %s removed", job_id)
            for job_id, job in present.items():
                try:
                    sha = str(self._spool.jobs.read_status(job).get("sha256"))
                    if self._registered.get(job_id) != sha:
                        self._register(job, sha)
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
        now = self._clock.now()
        recorded = status.get("last_fired")
        since = parse_rfc3339(status["accepted_at"])
        # A firing of an earlier definition (dropped again under the same id) is not this one's.
        last = None if recorded is None else parse_rfc3339(recorded)
        last = None if last is None or last < since else last
        decided = plan(spec, trigger, last=last, since=since, now=now)
        notes = list(decided.notes)
        made = [
            made_run
            for moment in decided.fire
            if (made_run := self._run(schedule, document, spec, status, moment, notes=notes))
        ]
        if decided.last is not None:
            status["last_fired"] = rfc3339(decided.last)
        coming = next_fire_times(spec, trigger, now, last=decided.last or last)
        status["next_fire_times"] = [rfc3339(t) for t in coming]
        self._note(schedule, status, notes)
        self._spool.jobs.write_status(schedule, status, durable=True)  # the record, before queueing
        for run, meta, due in made:
            if due > now:
                self._defer(run, due.timestamp())
            else:
                self._queue(run, document, meta)

    def _run(
        self,
        schedule: JobDir,
        document: dict[str, Any],
        spec: ScheduleSpec,
        status: dict[str, Any],
        moment: datetime,
        *,
        notes: list[str],
    ) -> tuple[str, JobMeta, datetime] | None:
        """Make the run of one firing: (its id, meta, when due); None when not to make it."""
        job_id, run = schedule.job_id, run_id(schedule.job_id, moment)
        going = [r for r in _recent(status) if self._going(r)]
        when = rfc3339(moment)
        if going and spec.overlap == "skip":
            notes.append(
                f"firing at {when} skipped: run {going[-1]} is still going (overlap: skip)"
            )
            return None
        if going and spec.overlap == "replace":
            for old in going:
                self._cancel(old, f"replaced by the firing at {when} (overlap: replace)")
        concurrency = document.get("concurrency")
        if spec.overlap in ("queue", "replace"):  # one run at a time, in firing order
            concurrency = {"key": f"schedule:{job_id}", "limit": 1, "strategy": "queue"}
        run_status = JobStatus.accepted(
            JobSpec.from_document(document, run), source=f"scheduled/{job_id}", now=self._clock.now(),
            sha256=status.get("sha256"),
        )  # fmt: skip
        run_status.schedule = job_id
        run_status.concurrency = concurrency
        # A firing is the schedule's file run again: its submitter's, whose policy admitted it.
        run_status.submitter = status.get("submitter")
        run_status.submitter_uid = status.get("submitter_uid")
        due = moment + timedelta(seconds=jitter_delay(spec, self._draw()))
        if due > self._clock.now():
            run_status.next_attempt_at = rfc3339(due)
        line = format_line(
            rfc3339(self._clock.now()), "INFO", f"spoold: firing at {when} of schedule {job_id}"
        )
        try:
            target = None if self._callbacks is None else self._callbacks.target_of(run, document)
            self._ledger.enter(
                run_status, target,
                lambda: self._spool.stages.create_run(schedule, run, run_status.to_dict(), line),
            )  # fmt: skip
        except DuplicateJob:
            return None  # made before a crash that kept it from being recorded: not again
        status["runs"] = [*status.get("runs", []), {"run_id": run, "fired_at": when}][-_RUNS_KEPT:]
        meta = JobMeta.from_document({**document, "concurrency": concurrency})
        return run, meta, due

    def _going(self, run: str) -> bool:
        found = self._spool.jobs.find(run)
        return found is not None and found.directory in ("pending", "running")

    def _note(self, schedule: JobDir, status: dict[str, Any], notes: list[str]) -> None:
        """What was caught up or skipped: in the schedule's status.json and its log."""
        if not notes:
            return
        stamp = rfc3339(self._clock.now())
        kept = [*status.get("notes", []), *({"at": stamp, "what": n} for n in notes)]
        status["notes"] = kept[-NOTES_KEPT:]
        with self._spool.jobs.open_log(schedule) as handle:
            log = JobLog(handle, self._clock)
            for note in notes:
                log.info(note)
        for note in notes:
            self._logger.info("schedule %s: %s", schedule.job_id, note)


def _recent(status: dict[str, Any]) -> list[str]:
    return [str(entry["run_id"]) for entry in status.get("runs", [])[-5:]]


def _describe(spec: ScheduleSpec) -> str:
    what = f"cron {spec.cron!r}" if spec.cron else f"every {spec.every:g}s"
    return f"{what} in {spec.timezone}, catch_up: {spec.catch_up}, overlap: {spec.overlap}"
