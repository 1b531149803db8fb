"""Intake: a complete file in incoming/ becomes a pending job or a rejected one, never lost."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spoold.core.clock import Clock, rfc3339
from spoold.core.errors import (
    CallbackError,
    DuplicateJob,
    IncomingMissing,
    JobBusy,
    SpooldError,
    ValidationIssue,
)
from spoold.core.job import JobStatus
from spoold.core.joblog import format_line
from spoold.core.outage import Outage
from spoold.core.policy import Policy, Submitter
from spoold.core.sightings import Sightings
from spoold.core.spool import FileSignature, JobDir, Prepared, Spool, StageLeft, TakenFile
from spoold.core.units import format_duration
from spoold.intake.admission import Admission, Admitted, Refused, display_name, file_problem
from spoold.intake.policy_check import secret_references, shared_writer_problem
from spoold.intake.redaction import Redaction
from spoold.intake.validation import JobValidator
from spoold.out.outbox import Callbacks, numbered
from spoold.run import observed
from spoold.run.ledger import JobLedger
from spoold.run.observed import Observation
from spoold.schedule.triggers import schedule_status

_FIRST_RETRY, _LAST_RETRY = 1.0, 60.0
#: Files judged together before one durable commit: more than a flood's burst is rare.
GROUP = 64
#: Names reported by the watcher that may wait for intake: sixteen groups, a second's work.
NAMES_HELD = 1024
#: Stages made ahead while intake waits (``Stages.make_ready``): a small burst's worth.
READY_STAGES = 4
#: How long after a file that came alone they are made: its job starts meanwhile (~3.5 ms
#: from hand-off to the job's shell here). Made at once, their creates took a core from that
#: start: 2 cores, the worker's claim and its supervisor's start beside them (pickup p50
#: 0.75-0.88x with this wait, measured).
READY_AFTER = 0.01
#: Alone: intake had taken no file for this long before. In a stream (files closer than a
#: start and the wait), stages made later would meet the next files' starts instead, or not
#: be made before the stream ends: they are made at once, as before.
ALONE_AFTER = 0.015
_ROOM_WAIT = 0.2  # seconds between looks at whether intake stopped, while a name waits for room

_NOT_A_FILE = {
    "symlink": "is a symbolic link; spoold takes only regular files (copy the file itself)",
    "directory": "is a directory; drop job files, one per job",
    "fifo": "is a named pipe, not a regular file",
    "socket": "is a socket, not a regular file",
    "device": "is a device node, not a regular file",
    "other": "is not a regular file",
    "unreadable": "cannot be read by spoold (check its owner and mode)",
}


@dataclass(frozen=True)
class Accepted:
    """A file that became a pending job."""

    job: JobDir


@dataclass(frozen=True)
class Rejected:
    """A file that was refused, with the directory that keeps it and why."""

    path: Path
    reason: dict[str, Any]


@dataclass(frozen=True)
class _Judged:
    """A file taken and admitted, not yet placed."""

    taken: TakenFile
    admitted: Admitted
    submitter: Submitter
    retry: tuple[float, float] | None = None  # its backoff, when its intake had failed before

    @property
    def placing(self) -> tuple[TakenFile, Admitted, Submitter]:
        return self.taken, self.admitted, self.submitter


@dataclass(frozen=True)
class _Record:
    """What an admitted file's job starts with."""

    taken: TakenFile
    admitted: Admitted
    submitter: Submitter
    status: JobStatus | None  # a job's; None for a schedule
    schedule: dict[str, Any]  # a schedule's record (its status.json)
    line: str  # the first line of its log
    verb: str  # what the daemon's log says was done with it


@dataclass(frozen=True)
class _Staged:
    """An admitted file's job directory written in its stage: to be settled and placed."""

    record: _Record
    prepared: Prepared
    retry: tuple[float, float] | None
    #: The ``accepted`` change its stage's status was numbered for (``outbox.numbered``).
    change: str | None = None

    @property
    def taken(self) -> TakenFile:
        return self.record.taken


class QuietFiles:
    """Which files in incoming/ have been left alone for ``period`` seconds, by this host's clock.

    On a shared filesystem the writer is on another host and its mtimes come from another
    clock: a skew of minutes would take a file in the middle of its upload, or hold it back
    for as long. So a file counts as quiet once its inode, size, mtime and ctime have stayed
    the same for ``period`` seconds of our own monotonic clock, however old its mtime says it is.
    """

    def __init__(self, clock: Clock, period: float) -> None:
        self._clock = clock
        self._period = period
        self._seen: dict[str, tuple[FileSignature, float]] = {}  # name -> (signature, since)
        self._lock = threading.Lock()

    def __call__(self, name: str, signature: FileSignature) -> bool:
        now = self._clock.monotonic()
        with self._lock:
            seen = self._seen.get(name)
            if seen is None or seen[0] != signature:
                self._seen[name] = (signature, now)
                return self._period <= 0
            return now - seen[1] >= self._period

    def forget(self, name: str) -> None:
        with self._lock:
            self._seen.pop(name, None)

    def names(self) -> set[str]:
        """The files something is known of."""
        with self._lock:
            return set(self._seen)

    def forget_all(self, names: set[str]) -> None:
        """Drop what is known of files no longer in incoming/."""
        with self._lock:
            for gone in names:
                self._seen.pop(gone, None)


class Intake:
    """Decides what becomes of each file taken from incoming/."""

    def __init__(
        self,
        spool: Spool,
        validator: JobValidator,
        clock: Clock,
        *,
        max_file_size: int,
        settle_time: float,
        on_accepted: Callable[[JobDir, dict[str, Any]], None],
        logger: logging.Logger,
        allowed_run_as: tuple[str, ...] = (),
        on_scheduled: Callable[[list[tuple[JobDir, dict[str, Any]]]], None] = lambda placed: None,
        callbacks: Callbacks | None = None,
        policy: Policy | None = None,
        on_observed: Callable[[Observation], None] | None = None,
        lease_timeout: float = 60.0,
    ) -> None:
        """``on_observed`` hears of each job accepted, with its pickup latency (the metrics').
        ``lease_timeout``: how long a job id's reservation must name nothing under way, at
        this host's looks, before it is given up (``_give_up_if_idle``)."""
        self._spool = spool
        self._policy = policy
        self._callbacks = callbacks
        listeners = () if on_observed is None else (observed.listener(on_observed, clock),)
        self._ledger = JobLedger(spool, callbacks, listeners=listeners, logger=logger)
        self._on_scheduled = on_scheduled
        # What validate and submit ask too: the same file gets the same answer everywhere.
        self._admission = Admission(
            validator,
            max_file_size=max_file_size,
            allowed_run_as=allowed_run_as,
            callback_target=None if callbacks is None else callbacks.target,
            policy=policy,
        )
        self._clock = clock
        self._max_size = max_file_size
        self._settle = settle_time
        self._on_accepted = on_accepted
        self._log = logger
        # name -> (monotonic time of the next try, delay after that): files whose intake failed
        # (a full disk) go back to incoming/, and their own rename back must not retry at once.
        self._backoff: dict[str, tuple[float, float]] = {}
        self._backoff_lock = threading.Lock()  # intake runs on several threads
        # stage -> what a failed intake could not give back from it (see _failed).
        self._unreleased: dict[str, TakenFile] = {}
        self._quiet = QuietFiles(clock, settle_time)
        # job id -> the token of its reservation, seen naming nothing under way (under
        # _backoff_lock): how long it has stood so, by this host's clock.
        self._idle: Sightings[str] = Sightings()
        self._lease_timeout = lease_timeout
        self._missing = False  # incoming/ was not there at the last sweep (said once)
        # The submitted files their private copies replaced (TakenFile.spent): removed here at
        # once, or handed to whoever asked for them (``spent_files``: IntakeThread's remover).
        self._spent: queue.SimpleQueue[str | None] | None = None

    def spent_files(self) -> queue.SimpleQueue[str | None]:
        """From now on each submitted file that a private copy replaced is put here, for the
        caller to remove (``remove_spent``) off intake's path, instead of being removed at once."""
        if self._spent is None:
            self._spent = queue.SimpleQueue()
        return self._spent

    def remove_spent(self, path: str) -> None:
        try:
            self._spool.stages.remove_spent(path)
        except OSError as exc:  # nothing reads it: the next start removes it
            self._log.debug("could not remove %s yet: %s", path, exc)

    def drop_ready(self) -> None:
        """Remove the stages made ahead and not used (intake has stopped)."""
        self._spool.stages.drop_ready()

    def make_ready(self, enough: Callable[[], bool]) -> None:
        """Make stages ahead for the next files, until ``enough()`` (see Stages.make_ready)."""
        try:
            self._spool.stages.make_ready(READY_STAGES, enough=enough)
        except OSError as exc:  # a full disk: files are taken into stages made then, as before
            self._log.debug("could not make a stage ahead: %s", exc)

    def offer(
        self, name: str, *, complete: bool, remote_writers: bool = False
    ) -> Accepted | Rejected | None:
        """Take one file if it is complete; ``complete`` when the watcher saw it closed or renamed in.

        ``remote_writers`` (shared filesystems): open writers elsewhere are invisible, so a
        file seen by a scan must also have been quiet for the settle time.
        """
        return self.offer_all([name], complete=complete, remote_writers=remote_writers)[0]

    def offer_all(
        self, names: Sequence[str], *, complete: bool, remote_writers: bool = False
    ) -> list[Accepted | Rejected | None]:
        """``offer`` for several files at once, as a group commit: each admitted file's job
        directory is written in its stage, then all are made durable together (one syncfs
        where that is safe), then each is placed, then pending/ is fsynced once for all
        where no delivery waits on it. Every durability rule holds per job; only the
        fsyncs are shared. One outcome per name, in order."""
        outcomes: list[Accepted | Rejected | None] = [None] * len(names)
        judged: list[tuple[int, _Judged]] = []
        # The user database is asked once per owner and group (glibc reads /etc/passwd at each
        # lookup: six system calls), and again for the next: a user renamed since is seen.
        owners: dict[int, Submitter] = {}
        for index, name in enumerate(names):
            result = self._take(
                name, complete=complete, remote_writers=remote_writers, owners=owners
            )
            if isinstance(result, _Judged):
                judged.append((index, result))
            else:
                outcomes[index] = result
        if len(judged) == 1:  # alone: no fsync to share
            index, item = judged[0]
            outcomes[index] = self._guarded(item, lambda: self._place(*item.placing))
        elif judged:
            waiting = dict(judged)
            try:
                self._place_together(judged, outcomes, waiting)
            except Exception as exc:  # spoold's own failure: the files still staged go back
                for item in waiting.values():
                    self._failed(item.taken.name, item.taken, exc, item.retry)
                raise
        return outcomes

    def _guarded(self, item: _Judged, place: Callable[[], Accepted]) -> Accepted | Rejected | None:
        """``place`` an admitted file: a taken id rejects it, a failure puts it back."""
        try:
            outcome: Accepted | Rejected = place()
        except Refused as duplicate:
            outcome = self._refuse(item.taken, duplicate, item.submitter)
        except Exception as exc:  # a full disk or an I/O error: never lose the file
            self._failed(item.taken.name, item.taken, exc, item.retry)
            return None
        self._recovered(item)
        return outcome

    def _place_together(
        self,
        judged: list[tuple[int, _Judged]],
        outcomes: list[Accepted | Rejected | None],
        waiting: dict[int, _Judged],
    ) -> None:
        """Stage, settle and place admitted files together; ``waiting``: those still in their
        stages, for the caller to give back should this fail on its own."""
        staged: list[tuple[int, _Staged]] = []
        for index, admitted in judged:
            # Outside the file's own handling: an error here is spoold's, for the whole group.
            delivers = self._delivers_accepted(admitted.admitted)
            try:
                staged.append((index, self._stage(admitted, delivers=delivers)))
            except Exception as exc:
                del waiting[index]
                self._failed(admitted.taken.name, admitted.taken, exc, admitted.retry)
        try:
            self._spool.stages.settle([one.prepared for _, one in staged])
        except Exception as exc:  # a full disk, an I/O error: all go back to incoming/
            for index, one in staged:
                del waiting[index]
                self._failed(one.taken.name, one.taken, exc, one.retry)
            return
        placed: list[tuple[_Staged, JobDir]] = []
        unsynced = 0
        for index, item in staged:
            # A delivery is committed as its job is placed: its directory is synced first.
            alone = self._delivers_accepted(item.record.admitted)
            del waiting[index]  # whatever happens to it next, it is dealt with here
            try:
                job = self._enter(item, sync=alone)
            except Refused as duplicate:
                outcomes[index] = self._refuse(item.taken, duplicate, item.record.submitter)
                self._recovered(item)
            except Exception as exc:
                self._failed(item.taken.name, item.taken, exc, item.retry)
            else:
                placed.append((item, job))
                unsynced += not alone
                outcomes[index] = Accepted(job)
        schedules = []
        for one, job in placed:
            self._recovered(one)
            if (schedule := self._announce(one.record, job)) is not None:
                schedules.append(schedule)
        # Jobs are handed on before this fsync. A worker's claim fsyncs running/ before its
        # job starts, so a power loss finds no job started that is not durably claimed, and
        # no state the other order could not leave (either way, a claim's rename out of
        # pending/ may be written back before running/ is synced). The worker's wake-up
        # meets the fsync (~0.2 ms here) instead of following it.
        if unsynced:
            self._sync_placed(unsynced, schedules=bool(schedules))
        self._hand_on(schedules)

    def _take(
        self, name: str, *, complete: bool, remote_writers: bool, owners: dict[int, Submitter]
    ) -> _Judged | Rejected | None:
        """A file out of incoming/ and judged: rejected, or admitted (``_Judged``); None if
        it is not taken (not complete, gone, or its intake failed and it went back)."""
        with self._backoff_lock:
            retry = self._backoff.get(name)
        if retry is not None and self._clock.monotonic() < retry[0]:
            return None
        taken = None
        try:
            taken = self._spool.stages.take_incoming(
                name,
                now=self._clock.now().timestamp(),
                max_size=self._max_size,
                settle=0.0 if complete else self._settle,
                quiet=self._quiet if remote_writers and not complete else None,
            )
            if taken is None:
                return None
            if taken.spent is not None:
                if self._spent is None:
                    self.remove_spent(taken.spent)
                else:
                    self._spent.put(taken.spent)
            self._quiet.forget(name)
            judged = self._judge(taken, owners)
        except StageLeft as left:  # the take itself failed, and may have left the file staged
            cause = left.__cause__
            self._failed(name, left.taken, cause if isinstance(cause, Exception) else left, retry)
            return None
        except Exception as exc:  # a full disk or an I/O error: never lose the file
            self._failed(name, taken, exc, retry)
            return None
        if isinstance(judged, Rejected):
            if retry is not None:
                with self._backoff_lock:
                    self._backoff.pop(name, None)
            return judged
        return _Judged(taken, *judged, retry=retry)

    def _failed(
        self,
        name: str,
        taken: TakenFile | None,
        exc: Exception,
        retry: tuple[float, float] | None,
    ) -> None:
        """A file whose intake failed goes back to incoming/, tried again after a backoff.

        Should that fail too (a shared mount cut off), its stage is released again at each
        sweep until it is: no file waits in a stage for the next start.
        """
        if taken is not None:
            self._release(taken)
        busy = isinstance(exc, JobBusy)  # another host's change, decided within moments
        if isinstance(exc, JobBusy) and exc.held_id and self._give_up_if_idle(exc.held_id):
            retry = None  # tried again as soon as a file newly failed
        delay = min((retry or (0.0, _FIRST_RETRY))[1], _LAST_RETRY)
        with self._backoff_lock:
            self._backoff[name] = (self._clock.monotonic() + delay, delay * 2)
        self._log.log(
            logging.WARNING if busy else logging.ERROR,
            "intake of %s %s; it stays in incoming/, next try in %s",
            display_name(name), f"waits: {exc}" if busy else f"failed ({exc})",
            format_duration(delay),
        )  # fmt: skip

    def _give_up_if_idle(self, job_id: str) -> bool:
        """Give up ``job_id``'s reservation if it has named nothing under way (no job, no file
        being placed, no removal: ``Stages.idle_reservation``) for a lease at this host's
        looks; whether it was. Left so by a placing whose own undo failed (its host cut off)
        or by a job removed by hand, it would hold every file of that id back for good; a
        lease, as for a host, is far longer than any look can miss a job moving on."""
        try:
            token = self._spool.stages.idle_reservation(job_id)
        except OSError:  # the spool cannot be read now: the next try looks again
            return False
        with self._backoff_lock:
            if token is None:
                self._idle.forget(job_id)
                return False
            stood = self._idle.unchanged_for(job_id, token, self._clock.monotonic())
            if stood < self._lease_timeout:
                return False
            self._idle.forget(job_id)
        try:
            self._spool.reservations.unreserve(job_id, token)
        except OSError:
            return False
        self._log.warning(
            "gave up job id %r's reservation (%s): for %s it named no job, no file being "
            "accepted and no removal (left by a host cut off while placing it, or by a job "
            "removed by hand)", job_id, token, format_duration(stood),
        )  # fmt: skip
        return True

    def _release(self, taken: TakenFile) -> None:
        """Give a staged file back to incoming/; kept for the next sweep if that failed."""
        try:
            self._spool.stages.release(taken)
        except Exception as exc:
            with self._backoff_lock:
                self._unreleased[str(taken.stage)] = taken
            self._log.error(
                "could not give %s back to incoming/ (%s); tried again at the next scan",
                display_name(taken.name), exc,
            )  # fmt: skip
            return
        with self._backoff_lock:
            self._unreleased.pop(str(taken.stage), None)

    def _recovered(self, item: _Judged | _Staged) -> None:
        """A file whose intake had failed before was taken now: no backoff left for it, nor
        any watch on its id's reservation."""
        if item.retry is not None:
            admitted = item.admitted if isinstance(item, _Judged) else item.record.admitted
            with self._backoff_lock:
                self._backoff.pop(item.taken.name, None)
                self._idle.forget(admitted.job_id)

    def sweep(self, *, remote_writers: bool = False) -> int:
        """Offer every file in incoming/; return how many were taken."""
        with self._backoff_lock:
            unreleased = list(self._unreleased.values())
        for left in unreleased:
            self._release(left)
        # What is known of files (a backoff, a quiet period) goes with a file not met. Here
        # the names are read group by group, not held all at once (a flood's are thousands);
        # a shared filesystem's are listed first, as its directory may change under a reader
        # in ways a local one's does not (an NFS cookie gone stale), and each waiting file
        # is remembered there anyway (QuietFiles).
        with self._backoff_lock:
            waiting = set(self._backoff)
        watched = self._quiet.names()
        met: set[str] = set()
        taken = 0
        stages = self._spool.stages
        try:
            names = iter(stages.list_incoming()) if remote_writers else stages.incoming_names()
            while group := list(itertools.islice(names, GROUP)):
                met.update(name for name in group if name in waiting or name in watched)
                outcomes = self.offer_all(group, complete=False, remote_writers=remote_writers)
                taken += sum(outcome is not None for outcome in outcomes)
        except IncomingMissing as exc:
            # Said once, not with a traceback at each scan (every poll_interval meanwhile).
            if not self._missing:
                self._log.error("%s: files are taken again once it is there", exc)
            self._missing = True
            return taken
        if self._missing:
            self._log.warning("incoming/ is there again: its files are taken")
            self._missing = False
        with self._backoff_lock:
            for gone in waiting - met:
                self._backoff.pop(gone, None)
        self._quiet.forget_all(watched - met)
        return taken

    def decide(self, taken: TakenFile) -> Accepted | Rejected:
        """Validate a staged file and accept or reject it."""
        judged = self._judge(taken, {})
        if isinstance(judged, Rejected):
            return judged
        try:
            return self._place(taken, *judged)
        except Refused as duplicate:
            return self._refuse(taken, duplicate, judged[1])

    def _judge(
        self, taken: TakenFile, owners: dict[int, Submitter]
    ) -> Rejected | tuple[Admitted, Submitter]:
        """Validate a staged file: rejected (it is in rejected/ now), or admitted and by whom;
        ``owners``: the submitters of the uids looked up already, added to."""
        problem = self._precheck(taken)
        if problem is not None:
            return self._reject(taken, *problem)
        assert taken.data is not None
        name = taken.name  # _precheck made sure it shows as itself: display_name() is a no-op
        now = self._clock.now()
        # The owner of the bytes read; a file spoold staged itself (`spoold exec`) has its caller.
        owner = taken.owner
        if owner is None:
            submitter = Submitter.caller()
        else:
            submitter = owners.get(owner.uid) or Submitter.of_uid(owner.uid)
            owners[owner.uid] = submitter
        # Without a policy every submitter may do the same: who wrote the file changes nothing.
        if self._policy is not None and owner is not None:
            why = shared_writer_problem(owner, submitter)
            if why is not None:
                issue = ValidationIssue(why, "")
                return self._reject(taken, "not_allowed", why, [issue], submitter=submitter)
        try:
            admitted = self._admission.admit(taken.data, name, now=now, submitter=submitter)
        except Refused as refused:
            return self._refuse(taken, refused, submitter)
        except OSError:
            raise  # the disk, the secrets: it may pass; the file is tried again
        except Exception as exc:  # a file spoold's checks fail on: rejected, never tried forever
            self._log.exception("judging %s failed", display_name(taken.name))
            why = f"spoold could not judge the file ({type(exc).__name__}: {exc}); a bug in spoold"
            return self._reject(taken, "internal", why, [ValidationIssue(why, "")],
                                submitter=submitter)  # fmt: skip
        return admitted, submitter

    def submit(
        self,
        data: bytes,
        name: str,
        submitter: Submitter,
        job_id: str | None = None,
        *,
        dry_run: bool = False,
    ) -> str:
        """A job file handed over directly (the HTTP API): admitted as the same file dropped by
        ``submitter`` would be, and placed as intake places one; its job id.

        Refused, and nothing written, if it is not admitted (code ``duplicate``: the job id is
        taken). ``job_id``: the id for a file that names none. ``dry_run``: admit only.
        """
        now = self._clock.now()
        try:
            admitted = self._admission.admit(
                data, name, now=now, spool=self._spool, submitter=submitter, job_id=job_id
            )
            if dry_run:
                return admitted.job_id
            taken = self._spool.stages.stage_data(name, data)
            try:
                accepted = self._place(taken, admitted, submitter)
            except BaseException:
                self._spool.stages.discard(taken)
                raise
        except JobBusy as busy:  # the client tries again; a reservation of nothing is let go
            if busy.held_id:
                self._give_up_if_idle(busy.held_id)
            raise
        self._spool.stages.handed_over(accepted.job)
        return admitted.job_id

    def _place(self, taken: TakenFile, admitted: Admitted, submitter: Submitter) -> Accepted:
        """Into pending/ (or scheduled/) with its status, on its own; Refused if its job id
        is taken (the file is left in its stage for the caller)."""
        record = self._record(taken, admitted, submitter)
        job_id, stages = admitted.job_id, self._spool.stages
        status = record.status
        # A job is handed on before pending/ is fsynced (see _place_together); a schedule,
        # or a job whose ``accepted`` delivery is committed as it is placed, is synced first.
        sync = status is None or self._delivers_accepted(admitted)
        try:
            if status is None:
                job = stages.accept(taken, job_id, record.schedule, record.line, schedule=True)
            else:
                job = self._ledger.enter(
                    status, admitted.callback,
                    lambda: stages.accept(taken, job_id, status.to_dict(), record.line, sync=sync),
                    arrived=taken.arrived,
                )  # fmt: skip
        except DuplicateJob as exc:  # the rename into pending/ settles it, with no window
            assert taken.data is not None
            raise self._admission.duplicate(taken.data, admitted.document, str(exc)) from None
        if (schedule := self._announce(record, job)) is not None:
            self._hand_on([schedule])
        if not sync:
            self._sync_placed(1, schedules=False)
        return Accepted(job)

    def _delivers_accepted(self, admitted: Admitted) -> bool:
        """Whether the job has an ``accepted`` delivery, committed as the job is placed."""
        return self._callbacks is not None and self._callbacks.delivers(
            admitted.callback, "accepted"
        )

    def _sync_placed(self, count: int, *, schedules: bool) -> None:
        """The one fsync of pending/ (and scheduled/) for ``count`` placed without theirs."""
        try:
            self._spool.stages.sync_placed(schedules=schedules)
        except OSError as exc:  # placed all the same: they run, and say so
            self._log.error("fsync after accepting %d job(s) failed: %s", count, exc)

    def _record(self, taken: TakenFile, admitted: Admitted, submitter: Submitter) -> _Record:
        """What an admitted file's job starts with: its status (or a schedule's record) and
        the first line of its log."""
        assert taken.data is not None
        name, now = taken.name, self._clock.now()
        document, job_id, spec = admitted.document, admitted.job_id, admitted.spec
        sha256 = hashlib.sha256(taken.data).hexdigest()
        if "schedule" not in document:
            status = JobStatus.accepted(
                spec, source=name, now=now, sha256=sha256, submitter=submitter
            )
            line = format_line(rfc3339(now), "INFO", f"spoold: accepted {name} as {job_id}")
            return _Record(taken, admitted, submitter, status, {}, line, "accepted")
        # Its runs are the submitter's: the scheduler copies ``submitter`` into each one.
        # A schedule replaces only a schedule: a job's id is refused as the stage is placed.
        existing = self._spool.jobs.find(job_id, among=("scheduled",))
        previous = None
        if existing is not None:
            with contextlib.suppress(OSError, SpooldError, ValueError):
                previous = self._spool.jobs.read_status(existing)
        record = schedule_status(document, job_id=job_id, source=name, now=now,
                                 sha256=sha256, previous=previous)  # fmt: skip
        record.update(submitter.status_fields())
        verb = "replaced the schedule" if existing is not None else "scheduled"
        line = format_line(rfc3339(now), "INFO", f"spoold: {verb} {job_id} from {name}")
        return _Record(taken, admitted, submitter, None, record, line, verb)

    def _stage(self, item: _Judged, *, delivers: bool) -> _Staged:
        """An admitted file's job directory written in its stage (not yet durable). A job
        whose ``accepted`` is delivered (``delivers``) gets its status as that change will
        leave it: made durable with the stage, before the delivery is prepared
        (``Stages.settle``)."""
        record = self._record(item.taken, item.admitted, item.submitter)
        change, status = None, record.schedule
        if record.status is not None:
            status = record.status.to_dict()
            if delivers:
                change, status = numbered(record.status)
        prepared = self._spool.stages.prepare(
            item.taken, item.admitted.job_id, status, record.line, schedule=record.status is None
        )
        return _Staged(record, prepared, item.retry, change)

    def _enter(self, item: _Staged, *, sync: bool) -> JobDir:
        """Place a settled stage: a job through the ledger, its ``accepted`` delivery prepared
        before and committed after; a schedule into scheduled/ (replacing one of that id).
        Refused if its job id is taken."""
        taken, status = item.record.taken, item.record.status
        stages = self._spool.stages
        try:
            if status is None:
                return stages.place(item.prepared, sync=sync)
            # The status in the stage is numbered for this change already (``_stage``).
            return self._ledger.enter(
                status, item.record.admitted.callback,
                lambda: stages.place(item.prepared, sync=sync),
                arrived=taken.arrived, change=item.change,
            )  # fmt: skip
        except DuplicateJob as exc:  # the rename into pending/ settles it, with no window
            assert taken.data is not None
            raise self._admission.duplicate(
                taken.data, item.record.admitted.document, str(exc)
            ) from None

    def _announce(self, item: _Record, job: JobDir) -> tuple[JobDir, dict[str, Any]] | None:
        """Say a placed job or schedule, and hand a job on to the workers; a schedule is
        returned with the status.json intake wrote, for ``_hand_on``."""
        name, job_id = item.taken.name, job.job_id
        if item.status is None:
            self._log.info("%s %s from %s", item.verb, job_id, name)
            return job, item.schedule
        self._log.info("accepted %s as %s (%s, from %s)", name, job_id,
                       item.admitted.spec.executor, item.submitter.name)  # fmt: skip
        try:
            self._on_accepted(job, item.admitted.document)
        except Exception:  # the job is in pending/ already: a scan will queue it
            self._log.exception("queueing job %s failed; the next scan queues it", job_id)
        return None

    def _hand_on(self, schedules: list[tuple[JobDir, dict[str, Any]]]) -> None:
        """The schedules placed together, to the scheduler in one go."""
        if not schedules:
            return
        try:
            self._on_scheduled(schedules)
        except Exception:  # they are in scheduled/ already: a scan registers them
            names = ", ".join(job.job_id for job, _ in schedules)
            self._log.exception("registering schedule(s) %s failed; the next scan does it", names)

    def _precheck(self, taken: TakenFile) -> tuple[str, str] | None:
        if display_name(taken.name) != taken.name:
            # Such a name would break log lines, or name no file once shown as text.
            return "file_name", "the file name has control characters or is not UTF-8"
        if taken.kind != "file":
            return "not_a_file", f"{display_name(taken.name)} {_NOT_A_FILE[taken.kind]}"
        if taken.links > 1:
            # Its other name stays writable by whoever made the link, and its owner (the
            # submitter spoold records) need not be who dropped it.
            return "hard_link", (
                f"{display_name(taken.name)} is a hard link ({taken.links} names for one file); "
                "spoold takes only files with one name (copy the file itself)"
            )
        size = taken.size if taken.data is None else len(taken.data)
        return file_problem(taken.name, size, self._max_size)

    def _refuse(self, taken: TakenFile, refused: Refused, submitter: Submitter) -> Rejected:
        return self._reject(
            taken, refused.code, refused.reason, refused.issues, document=refused.document,
            submitter=submitter,
        )  # fmt: skip

    def _reject(
        self,
        taken: TakenFile,
        code: str,
        reason: str,
        issues: list[ValidationIssue] | None = None,
        *,
        document: dict[str, Any] | None = None,
        submitter: Submitter | None = None,
    ) -> Rejected:
        # Refused worded its own already; what intake words itself (an exception's text) too.
        hide = Redaction(document)
        reason = hide.text(reason)
        record: dict[str, Any] = {
            "file": display_name(taken.name),
            "rejected_at": rfc3339(self._clock.now()),
            "code": code,
            "reason": reason,
            "errors": [i.to_dict() for i in hide.issues(issues or ())],
            "size": taken.size,
        }
        if submitter is not None:
            record.update(submitter.status_fields())
        job_id = None if document is None else document.get("job_id")
        with self._announce_rejection(taken, record, document, job_id, submitter):
            path = self._spool.stages.reject(taken, record)
        self._log.warning("rejected %s: %s", display_name(taken.name), reason)
        return Rejected(path, record)

    def _announce_rejection(
        self, taken: TakenFile, record: dict[str, Any], document: dict[str, Any] | None,
        job_id: Any, submitter: Submitter | None,
    ) -> Any:  # fmt: skip
        """The ``rejected`` event goes where the file asked, if it got that far and its
        submitter may use what its callback and notifications name; else to the default."""
        if self._callbacks is None:
            return contextlib.nullcontext()
        if document is not None and (why := self._not_theirs(document, submitter)):
            self._log.warning("rejection of %s: %s; the default callback is told", record["file"],
                              why)  # fmt: skip
            document = None
        target = None
        for candidate in (document, None) if document is not None else (None,):
            try:
                target = self._callbacks.target(candidate)
                break
            except CallbackError as exc:  # its words may quote the URL it could not use
                self._log.error("rejection of %s: %s", record["file"],
                                Redaction(candidate).text(str(exc)))  # fmt: skip
        stage = str(taken.stage)
        ident = str(job_id) if isinstance(job_id, str | int) else None
        return self._callbacks.announce_rejection(target, stage, record, ident)

    def _not_theirs(self, document: dict[str, Any], submitter: Submitter | None) -> str | None:
        """Why a rejected file's own callback and notifications are not used: a secret in them
        that its submitter may not use (a signature under it, sent where the file asks, would
        hand out what the policy keeps), or a submitter not known; None if they may be."""
        if self._policy is None:
            return None
        if submitter is None:
            return "its submitter is not known"
        rules = self._policy.rules_of(submitter)
        if rules is None:
            return None
        asked = {key: document[key] for key in ("callback", "notify") if key in document}
        for name, _ in secret_references(asked):
            if not rules.allows("secrets", name):
                return f"its callback uses secret {name!r}, which {submitter.name} may not use"
        return None


class IntakeThread:
    """Runs intake, fed by the watcher and by periodic sweeps.

    The files that arrived while it judged others are taken together (``Intake.offer_all``):
    their fsyncs are shared. On a local filesystem one thread: each of the ~40 system calls of
    a file hands the GIL to a waiting thread and back (~170 futex calls a file with three
    threads, measured), which cost more CPU than the overlap of their fsyncs won. On a shared
    one (``remote_writers``: NFS, sshfs) each call is a round trip to the server, and three
    threads, each taking its own files (sweeps side by side), keep three in flight: one thread
    there took a thousand jobs over three hosts three times as long.

    At most ``names_held`` names reported by the watcher wait here: past that ``arrived``
    waits, and the rest wait in the kernel's inotify queue (``max_queued_events``; past that
    an overflow, and a sweep). A flood of any size then holds a bounded number here, where
    every name it kept was the daemon's memory until intake caught up.
    """

    _SWEEP = object()
    #: On the remover's queue, where every other item is a path: intake took a group of files
    #: (make stages ahead while it has nothing to do, ``ready_after`` later if the group
    #: before was ``alone_after`` or more earlier); make them at once (the start).
    _MAKE_READY = ""
    _MAKE_READY_NOW = "/"
    _STOP = object()

    def __init__(
        self,
        intake: Intake,
        logger: logging.Logger,
        *,
        clock: Clock,
        remote_writers: bool,
        names_held: int = NAMES_HELD,
        ready_after: float = READY_AFTER,
        alone_after: float = ALONE_AFTER,
    ) -> None:
        self._intake = intake
        self._log = logger
        self._clock = clock
        self._ready_after = ready_after
        self._alone_after = alone_after
        self._outage = Outage(logger, "intake")
        self._remote_writers = remote_writers
        self._queue: queue.SimpleQueue[str | object] = queue.SimpleQueue()
        self._room = threading.Semaphore(names_held)
        self._closing = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, name=f"spoold-intake-{n}", daemon=True)
            for n in range(3 if remote_writers else 1)
        ]
        # Removing a file can wait on the disk (see Stages._put_in_place): not on intake's path.
        self._spent = intake.spent_files()
        self._remover = threading.Thread(
            target=self._remove_spent, name="spoold-intake-spent", daemon=True
        )

    def start(self) -> None:
        self._spent.put(self._MAKE_READY_NOW)  # once recovery has cleared tmp/: for the first files
        for thread in self._threads:
            thread.start()
        self._remover.start()

    def arrived(self, name: str) -> None:
        """The watcher saw ``name`` closed after writing or renamed into incoming/; waits
        while ``names_held`` names wait already. Once intake stops, a name is let go: its
        file stays in incoming/ for the next start's sweep."""
        while not self._room.acquire(timeout=_ROOM_WAIT):
            if self._closing.is_set():
                return
        if self._closing.is_set():
            self._room.release()
            return
        self._queue.put(name)

    def request_sweep(self) -> None:
        self._queue.put(self._SWEEP)

    def stop(self, timeout: float = 10.0) -> None:
        self._closing.set()
        for _ in self._threads:
            self._queue.put(self._STOP)
        for thread in self._threads:
            if thread.ident is not None:  # the daemon may stop before it started them
                thread.join(timeout)
        if self._remover.ident is not None:  # the daemon may stop before it started it
            self._spent.put(None)  # after what intake left: each is removed before it stops
            self._remover.join(timeout)
        self._intake.drop_ready()

    def _remove_spent(self) -> None:
        """Off intake's path: removes the submitted files that private copies replaced as
        they come, and makes stages ahead while intake has nothing to do (``enough``): after
        files that came alone (none taken in the ``alone_after`` before), ``ready_after``
        later, so that the job just handed on starts undisturbed; in a stream at once.

        At the daemon's own priority. At the lowest (nice 19) a pickup's p90 and p99 were 1.7x
        and 1.9x those of the code before, side by side on a busy machine: preempted while
        making a stage in tmp/, it can hold tmp/'s lock, which intake's next rename through
        tmp/ then waits for."""
        due: float | None = None  # when to make stages ahead
        asked: float | None = None  # when intake last took files
        while True:
            try:
                wait = None if due is None else max(due - self._clock.monotonic(), 0.0)
                item = self._spent.get(timeout=wait)
            except queue.Empty:
                item = self._MAKE_READY_NOW
            if item is None:
                return
            if item == self._MAKE_READY:
                now = self._clock.monotonic()
                alone = asked is None or now - asked >= self._alone_after
                asked = now
                if alone:
                    due = now + self._ready_after if due is None else due
                    continue
                # In a stream, made later they would meet the next files' starts instead.
                item = self._MAKE_READY_NOW
            if item == self._MAKE_READY_NOW:
                due = None
                self._intake.make_ready(enough=lambda: not self._queue.empty())
            else:
                self._intake.remove_spent(item)

    def _loop(self) -> None:
        while True:
            names: list[str] = []
            item = self._queue.get()
            # What arrived meanwhile joins it, up to a group; a sweep or a stop ends the group.
            while isinstance(item, str):
                names.append(item)
                self._room.release()
                if len(names) >= GROUP:
                    item = None
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    item = None
            if names:
                # e.g. incoming/ unreadable: intake must go on
                self._outage.call(functools.partial(self._intake.offer_all, names, complete=True),
                                  "intake failed; the next scan tries again")  # fmt: skip
            if item is self._STOP:
                return
            if item is self._SWEEP:
                self._outage.call(
                    functools.partial(self._intake.sweep, remote_writers=self._remote_writers),
                    "intake failed; the next scan tries again",
                )
            # Stages for the next files, once intake has nothing to do: said after every group
            # (not only when none waits, as seen from here), so that the remover knows each
            # moment intake took files, to tell a file that came alone from a stream.
            self._spent.put(self._MAKE_READY)
