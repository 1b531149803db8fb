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

Thousands of schedules (issue 23): intake hands over the one schedule it placed (``accept``),
which is read and registered alone. A round (``sync``: the daemon's scan, or SIGUSR1) lists
scheduled/ and stats each schedule's directory; a schedule is read only when that stamp
(inode, mtime, ctime) differs from the one taken before its last read, which is what any host's
``spoold unschedule``, replacing definition or request file (made or removed in the directory)
changes. A stamp has the filesystem's timestamp granularity (a kernel tick, a second over
SFTP): a change made within that of a read could leave it as it was, so a stamp counts as read
only once a read followed it by ``SETTLE`` seconds (``sighting``); until then the schedule is
read at every round. The first round reads every schedule: what was missed while down fires
there, before APScheduler starts (``start``), so that it takes them all in one go.

The wall clock may step (NTP setting a clock that was wrong, an admin, a host resumed from
suspend). APScheduler sleeps until its next firing as the wall clock reckons it, so a step back
of an hour would hold every schedule for an hour: its sleep is bounded (``WAKE``), and at each
wake-up the wall clock's advance is compared with the monotonic clock's (``check_clock``). A
step (more than ``STEP`` apart) is logged, and every schedule is looked at again at once: a
``last_fired`` a step back left in the future is the clock's error (``triggers.believable``),
and firings a step forward passed over are said to be that, not missed while spoold was down.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import STATE_RUNNING
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.date import DateTrigger

from spoold.core.clock import Clock, parse_rfc3339, rfc3339
from spoold.core.documents import load_document
from spoold.core.errors import DuplicateJob, JobBusy, JobNotFound, SpooldError
from spoold.core.job import JobSpec, JobStatus
from spoold.core.joblog import JobLog, format_line
from spoold.core.spool import JobDir, Spool
from spoold.core.spool.fs import LIST_EVERY, SETTLE, DirStamp, Relist, sighting
from spoold.core.spool.jobs import ScheduleRequests
from spoold.core.units import format_duration
from spoold.out.outbox import Callbacks
from spoold.run.dispatch import JobMeta
from spoold.run.ledger import JobLedger, Listener
from spoold.schedule.triggers import (
    DOWN,
    NOTES_KEPT,
    Plan,
    ScheduleSpec,
    believable,
    jitter_delay,
    next_fire_times,
    plan,
    run_id,
    skip_while_paused,
)

_RUNS_KEPT = 20  # in a schedule's status.json
#: A firing that met its run being made by another host (JobBusy) fires again this many seconds
#: later, twice as late each time up to the last: a host frozen or lost inside a firing is found
#: stale within a lease, and its change decided, well before then.
_AGAIN_FIRST, _AGAIN_LAST = 1.0, 60.0
_AGAIN = "~again."  # APScheduler's id of such a firing: <job id>~again.<n> (no job id has "~")
#: APScheduler sleeps this long at most, so that a step of the wall clock is seen within it.
WAKE = 2.0
#: The wall clock and the monotonic clock may part by this much between two looks before it
#: counts as a step (NTP slews at most 0.5 ms a second; a step is a second or more).
STEP = 1.0
_STEPS_KEPT = 10


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


@dataclass(slots=True)
class _Known:
    """What the scheduler last read of one schedule in scheduled/."""

    definition: str | None  # registered: sha256 and acceptance time; None: none is (or gone)
    stamp: DirStamp  # its directory's, taken before that read
    since: float  # (monotonic) when that stamp was first seen
    settled: bool  # the read came late enough after the stamp: unread until the stamp changes


class _Step(NamedTuple):
    """A step of the wall clock seen while up: where it landed, and by how many seconds."""

    at: datetime
    by: float

    def __str__(self) -> str:
        way = "forward" if self.by > 0 else "back"
        return (
            f"passed over when the wall clock stepped {way} by {format_duration(abs(self.by))} "
            f"at {rfc3339(self.at)} (spoold was up)"
        )


class _Wakeful(BackgroundScheduler):  # type: ignore[misc]  # APScheduler 3 ships no types
    """APScheduler's thread, its sleep bounded by ``WAKE`` and ``before`` called at each
    wake-up: its own sleep, reckoned on the wall clock, would outlast a step back of it."""

    def __init__(self, before: Callable[[], None], **options: Any) -> None:
        super().__init__(**options)
        self._before = before

    def _process_jobs(self) -> float:
        self._before()
        wait: float | None = super()._process_jobs()
        return WAKE if wait is None else min(wait, WAKE)


class _Firing:
    """What APScheduler calls at a schedule's firings: ``fire``, its signature taken once.
    APScheduler checks the arguments of every job added with ``inspect.signature``, which for
    a bound method took a third of an ``add_job``; an object's own ``__signature__`` is
    taken as it is."""

    __slots__ = ("__signature__", "_fire")

    def __init__(self, fire: Callable[[str], None]) -> None:
        self._fire = fire
        self.__signature__ = inspect.signature(fire)

    def __call__(self, job_id: str) -> None:
        self._fire(job_id)


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
        settle: float = SETTLE,
        wall_time: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``queue`` hands a run to the workers, ``defer`` makes it wait (jitter), ``cancel``
        ends a run (``overlap: replace``); ``on_fired`` hears, for each run a firing makes, how
        many seconds after the firing's moment it was made (``spoold_schedule_lag_seconds``);
        ``listeners``: told of each run made (the metrics count it accepted). ``settle``,
        ``wall_time`` and ``monotonic``: when a directory's stamp stands for it (``sighting``);
        the host's real clocks, as the filesystem's timestamps follow them (not ``clock``)."""
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
        self._aps = _Wakeful(self._check_clock_safely, timezone=UTC)
        #: The two clocks at the last look (``check_clock``), and the steps seen since start.
        self._clocks: tuple[datetime, float] | None = None
        self._steps: list[_Step] = []
        self._firing = _Firing(self.fire)
        self._known: dict[str, _Known] = {}  # by job id: each schedule of scheduled/ looked at
        #: Whether scheduled/ must be listed again (its own stamp: ``sync``).
        self._relist = Relist(
            lambda: spool.jobs.directory_stamp("scheduled"), settle=settle, every=LIST_EVERY
        )
        self._scheduled = str(spool.dir("scheduled"))
        self._settle = settle
        self._wall = wall_time
        self._monotonic = monotonic
        self._lock = threading.RLock()  # firings and registrations, one at a time
        #: By job id: a firing to come again (JobBusy), its delay and its APScheduler job's id.
        self._again: dict[str, tuple[float, str]] = {}
        self._agains = itertools.count()

    def start(self) -> None:
        """Register every schedule, firing what was missed while down, then start APScheduler:
        handed them before it runs, it takes thousands in one go, not one wake-up each."""
        self.sync()
        self._clocks = (self._clock.now(), self._clock.monotonic())
        self._aps.start()

    def check_clock(self) -> _Step | None:
        """Whether the wall clock stepped since the last look (APScheduler's thread looks at
        each wake-up, every ``WAKE`` seconds at most): its advance against the monotonic
        clock's. After a step every schedule fires at once, where ``plan`` decides from its
        record: a step back leaves APScheduler's next firings an hour late, say, and the
        ``last_fired`` of some in the future."""
        with self._lock:
            return self._check_clock()

    def _check_clock(self) -> _Step | None:
        wall, mono = self._clock.now(), self._clock.monotonic()
        before, self._clocks = self._clocks, (wall, mono)
        if before is None:
            return None
        by = (wall - before[0]).total_seconds() - (mono - before[1])
        if abs(by) <= STEP:
            return None
        step = _Step(wall, by)
        self._steps = [*self._steps, step][-_STEPS_KEPT:]
        self._logger.warning(
            "the wall clock moved %+.3fs apart from the monotonic clock (a step of the "
            "clock, or the host suspended): every schedule is looked at again now",
            by,
        )
        for job_id, known in self._known.items():
            if known.definition is not None and self._aps.get_job(job_id) is not None:
                self._aps.modify_job(job_id, next_run_time=wall)
        return step

    def _check_clock_safely(self) -> None:
        """``check_clock`` from APScheduler's thread, unless the lock is held: ``stop`` holds
        it while it waits for that thread to end, and a sync may hold it a while; the clocks'
        advance since the last look is there to be seen at the next wake-up."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            self._check_clock()
        except Exception:  # APScheduler's thread must go on
            self._logger.exception("the look at the clocks failed")
        finally:
            self._lock.release()

    def stop(self) -> None:
        with self._lock:  # not while a group of registrations holds APScheduler paused
            if self._aps.running:  # the daemon may stop before it started
                self._aps.shutdown(wait=False)

    def sync(self) -> None:
        """A round: register what scheduled/ holds anew (a definition replaced, on any host),
        drop what it no longer holds (``spoold unschedule`` on any host), act on what users
        asked of a schedule (pause, resume, run now). One listing and one stat per schedule;
        only the schedules whose stamp changed since their last read (or may yet hide a change)
        are read. The first round reads them all, and fires what was missed while down.

        When scheduled/'s own stamp is as it was, and settled, and so is every schedule's, the
        round stops there: a schedule placed or removed renames a directory in scheduled/, and a
        request changes its stamp too (``Jobs.request_pause`` and the others), so nothing was
        asked since. One stat, not one a schedule (10,000 schedules cost 0.23 % of a core at
        rest, a listing and 10,000 stats every ``rescan_interval``). Every ``LIST_EVERY``-th
        round lists all the same: a request written by a spoold that did not change that stamp
        (an older one, on another host sharing the spool) waits that long at most."""
        with self._lock:
            wall, now = self._wall(), self._monotonic()  # before the stats: see sighting
            if not all(known.settled for known in self._known.values()):
                self._relist.forget()  # one may yet hide a change its stamp does not show
            if not self._relist.needed(wall=wall, now=now):
                return
            stamps = self._spool.jobs.entry_stamps("scheduled")
            for job_id in [job_id for job_id in self._known if job_id not in stamps]:
                if self._known[job_id].definition is not None:
                    self._logger.info("schedule %s removed", job_id)
                self._unregister(job_id)
            changed = [
                (job_id, stamp)
                for job_id, stamp in stamps.items()
                if (known := self._known.get(job_id)) is None
                or not known.settled
                or known.stamp != stamp
            ]
            with self._one_wakeup(len(changed)):  # schedules placed by another host, say
                for job_id, stamp in changed:
                    self._look(job_id, stamp, wall=wall, now=now)
            self._relist.listed()

    def accept(self, placed: Sequence[tuple[JobDir, Mapping[str, Any] | None]]) -> None:
        """Register the schedules intake just placed in scheduled/ together (new, or their
        definition replaced), and only them: one stat each, and one read unless its status,
        the status.json intake wrote, is given. What was asked of one in the moment since (a
        pause from another host) is its next round's: a directory stamped so lately is read
        again then (``sighting``)."""
        with self._lock:
            wall, now = self._wall(), self._monotonic()
            with self._one_wakeup(len(placed)):
                for job, status in placed:
                    stamp = self._spool.jobs.stamp_of(job)
                    if stamp is not None:  # else unscheduled meanwhile: nothing to register
                        self._look(job.job_id, stamp, wall=wall, now=now, placed=status)

    @contextlib.contextmanager
    def _one_wakeup(self, looks: int) -> Iterator[None]:
        """Around ``looks`` schedules looked at (the lock held): APScheduler wakes its thread
        for every job added to it while it runs, so for more than one it is paused, and wakes
        once after (~60 µs of CPU a schedule less, measured with 3,000). What fell due
        meanwhile fires then."""
        hold = looks > 1 and self._aps.state == STATE_RUNNING
        if hold:
            self._aps.pause()
        try:
            yield
        finally:
            if hold:
                self._aps.resume()

    def registered(self) -> dict[str, str]:
        """The schedules registered with APScheduler: job id -> their definition's sha256 and
        acceptance time."""
        with self._lock:
            return {j: k.definition for j, k in self._known.items() if k.definition is not None}

    def _look(
        self, job_id: str, stamp: DirStamp, *, wall: float, now: float,
        placed: Mapping[str, Any] | None = None,
    ) -> None:  # fmt: skip
        """Read one schedule, its directory stamped ``stamp`` (taken at or after ``wall`` and
        ``now``): register its definition if it is new here (what was missed fires there, and
        what was asked is done there too), else act on what was asked of it, if anything.
        ``placed``: its status as intake just wrote it, neither read nor asked of again."""
        known = self._known.get(job_id)
        since, ready = sighting(stamp, known, wall=wall, now=now, settle=self._settle)
        entry = _Known(
            definition=None if known is None else known.definition, stamp=stamp, since=since,
            settled=ready,
        )  # fmt: skip
        self._known[job_id] = entry
        schedule = JobDir(job_id, "scheduled", f"{self._scheduled}/{job_id}")
        try:
            status = dict(placed) if placed is not None else self._spool.jobs.read_status(schedule)
        except JobNotFound:
            entry.settled = False  # gone since its stat: the next round's listing drops it
            return
        except (OSError, ValueError) as exc:
            entry.settled = False  # read again at the next round
            self._logger.error("schedule %s cannot be loaded: %s", job_id, exc)
            return
        try:
            definition = f"{status.get('sha256')} {status.get('accepted_at')}"
            if entry.definition != definition:
                spec, trigger = self._load(schedule, status)
                self._aps.add_job(
                    self._firing, trigger=trigger, args=[job_id], id=job_id, replace_existing=True,
                    misfire_grace_time=None, coalesce=True, max_instances=1,
                )  # fmt: skip
                entry.definition = definition
                self._logger.info("schedule %s registered (%s)", job_id, _describe(spec))
                # What was missed, if anything; a schedule just placed has no request yet.
                asked = None if placed is None else ScheduleRequests(None, None, [])
                self._fire_loaded(schedule, status, spec, trigger, asked=asked)
            elif _asked(asked := self._spool.jobs.schedule_requests(schedule), status):
                self._fire_loaded(schedule, status, *self._load(schedule, status), asked=asked)
        except JobBusy as exc:  # hosts started together, catching up on the same firings
            self._fire_again(job_id, exc)
        except (OSError, SpooldError, ValueError) as exc:
            entry.settled = False  # read again at the next round
            self._logger.error("schedule %s cannot be loaded: %s", job_id, exc)

    def fire(self, job_id: str) -> None:
        """Make the runs due now for one schedule (APScheduler calls this at each firing)."""
        with self._lock:
            try:
                self._fire(job_id)
            except JobBusy as exc:  # another host firing the same moment: it may yet fail
                self._fire_again(job_id, exc)
            except (OSError, SpooldError, ValueError) as exc:  # its job file changed, a full disk
                self._logger.error("schedule %s cannot fire: %s", job_id, exc)
            except Exception:  # a schedule's failure must not stop the scheduler
                self._logger.exception("schedule %s failed to fire", job_id)
            else:
                self._forget_again(job_id)

    def _fire_again(self, job_id: str, exc: JobBusy) -> None:
        """A firing (or a registration's catch-up) that met its run being made by another
        host: that host may yet fail (frozen, then found stale; lost), so fire again soon, as
        APScheduler would, until the run is made by either. Debug only: on a shared spool
        every host fires every schedule, and another one making the run is the normal case."""
        before = self._again.get(job_id)
        delay = _AGAIN_FIRST if before is None else min(before[0] * 2, _AGAIN_LAST)
        self._forget_again(job_id)
        when = self._clock.now() + timedelta(seconds=delay)
        added = self._aps.add_job(
            self._firing, trigger=DateTrigger(run_date=when), args=[job_id],
            id=f"{job_id}{_AGAIN}{next(self._agains)}", misfire_grace_time=None,
        )  # fmt: skip
        self._again[job_id] = (delay, added.id)
        self._logger.debug(
            "schedule %s: %s; fired again in %s", job_id, exc, format_duration(delay)
        )

    def _forget_again(self, job_id: str) -> None:
        """No firing again (its run made, or its schedule gone); its backoff starts anew."""
        left = self._again.pop(job_id, None)
        if left is not None:
            # Gone already if it is the one running: APScheduler drops a date job once it
            # has handed it on, under the lock remove_job takes too.
            with contextlib.suppress(JobLookupError):
                self._aps.remove_job(left[1])

    def _load(
        self, schedule: JobDir, status: Mapping[str, Any]
    ) -> tuple[ScheduleSpec, BaseTrigger]:
        """A schedule's ``schedule:`` read, and its trigger: from the copy intake recorded in
        its status (the job file is read, and checked, only to make a run: ``_document``)."""
        value = status.get("schedule")
        if value is None:  # recorded by a spoold that kept no copy
            value = self._document(schedule, status)["schedule"]
        spec = ScheduleSpec.from_document(value)
        # The same anchor as plan()'s: an ``every:`` definition counts from its acceptance, so
        # APScheduler wakes spoold at the very firings plan() makes (not a period later).
        return spec, spec.trigger(parse_rfc3339(status["accepted_at"]))

    def _document(self, schedule: JobDir, status: Mapping[str, Any]) -> dict[str, Any]:
        """A schedule's job document: the file its status recorded (JobFileChanged if not)."""
        data = self._spool.jobs.read_job_file(schedule, sha256=status.get("sha256"))
        document: dict[str, Any] = load_document(data, "job.yaml")
        return document

    def _unregister(self, job_id: str) -> None:
        self._known.pop(job_id, None)
        self._forget_again(job_id)
        if self._aps.get_job(job_id) is not None:
            self._aps.remove_job(job_id)

    def _fire(self, job_id: str) -> None:
        schedule = self._spool.jobs.find(job_id)
        if schedule is None or schedule.directory != "scheduled":
            self._unregister(job_id)
            return
        status = self._spool.jobs.read_status(schedule)
        self._fire_loaded(schedule, status, *self._load(schedule, status))

    def _fire_loaded(
        self, schedule: JobDir, status: dict[str, Any], spec: ScheduleSpec, trigger: BaseTrigger,
        *, asked: ScheduleRequests | None = None,
    ) -> None:  # fmt: skip
        """Make the runs due now of a schedule read (and what was asked of it, read if not
        given); record them, and what changed, in its status.json, then queue them. Its job
        file is read only for runs to make."""
        job_id = schedule.job_id
        if asked is None:
            asked = self._spool.jobs.schedule_requests(schedule)
        read = dict(status)  # every change below replaces a key's value: a shallow copy tells
        now = self._clock.now()
        recorded = status.get("last_fired")
        since = parse_rfc3339(status["accepted_at"])
        # A firing of an earlier definition (dropped again under the same id) is not this
        # one's; one recorded in the future is the wall clock's error (``believable``).
        last = None if recorded is None else parse_rfc3339(recorded)
        notes: _Notes = []
        last, since, doubt = believable(spec, last, since, now)
        if doubt is not None:
            notes.append(doubt)
        last = self._follow_pause(spec, trigger, status, asked, last=last, since=since, now=now,
                                  notes=notes)  # fmt: skip
        fire: tuple[datetime, ...] = ()
        if asked.paused is not None:
            decided = skip_while_paused(spec, trigger, last=last, since=since, now=now)
            if decided.last is not None and decided.skipped:
                notes.append(_skips(asked.paused, decided))
        else:
            decided = plan(spec, trigger, last=last, since=since, now=now,
                           why=self._missed(last or since))  # fmt: skip
            notes.extend(decided.notes)
            fire = decided.fire
        document = self._document(schedule, status) if fire or asked.run_now else {}
        made = [
            made_run
            for moment in fire
            if (made_run := self._run(schedule, document, spec, status, moment, notes=notes))
        ]
        made += self._runs_now(schedule, document, spec, status, asked, notes=notes)
        if (newest := decided.last or last) is not None:
            status["last_fired"] = rfc3339(newest)
        coming = [] if asked.paused else next_fire_times(spec, trigger, now, last=newest)
        status["next_fire_times"] = [rfc3339(t) for t in coming]
        self._note(schedule, status, notes)
        if status != read:  # nothing made, noted or changed (a registration): nothing to record
            self._spool.jobs.write_status(schedule, status, durable=True)  # before queueing
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

    def _missed(self, after: datetime) -> str:
        """Why firings after ``after`` were missed: the newest step forward of the wall clock
        since then, seen while up, else spoold was down."""
        for step in reversed(self._steps):
            if step.by > 0 and step.at - timedelta(seconds=step.by) >= after:
                return str(step)
        return DOWN

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
