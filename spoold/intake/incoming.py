"""Intake: a complete file in incoming/ becomes a pending job or a rejected one, never lost."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spoold.core.clock import Clock, rfc3339
from spoold.core.errors import CallbackError, DuplicateJob, SpooldError, ValidationIssue
from spoold.core.job import JobStatus
from spoold.core.joblog import format_line
from spoold.core.outage import Outage
from spoold.core.policy import Policy, Submitter
from spoold.core.spool import FileSignature, JobDir, Spool, TakenFile
from spoold.core.units import format_duration
from spoold.intake.admission import Admission, Admitted, Refused, display_name, file_problem
from spoold.intake.policy_check import shared_writer_problem
from spoold.intake.validation import JobValidator
from spoold.out.outbox import Callbacks
from spoold.run import observed
from spoold.run.ledger import JobLedger
from spoold.run.observed import Observation
from spoold.schedule.triggers import schedule_status

_FIRST_RETRY, _LAST_RETRY = 1.0, 60.0

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

    def keep_only(self, names: set[str]) -> None:
        """Drop what is known of files no longer in incoming/."""
        with self._lock:
            for gone in self._seen.keys() - names:
                del self._seen[gone]


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
        on_scheduled: Callable[[JobDir], None] = lambda job: None,
        callbacks: Callbacks | None = None,
        policy: Policy | None = None,
        on_observed: Callable[[Observation], None] | None = None,
    ) -> None:
        """``on_observed`` hears of each job accepted, with its pickup latency (the metrics')."""
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
        self._quiet = QuietFiles(clock, settle_time)

    def offer(
        self, name: str, *, complete: bool, remote_writers: bool = False
    ) -> Accepted | Rejected | None:
        """Take one file if it is complete; ``complete`` when the watcher saw it closed or renamed in.

        ``remote_writers`` (shared filesystems): open writers elsewhere are invisible, so a
        file seen by a scan must also have been quiet for the settle time.
        """
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
            if taken is not None:
                self._quiet.forget(name)
            outcome = None if taken is None else self.decide(taken)
        except Exception as exc:  # a full disk or an I/O error: never lose the file
            if taken is not None:
                self._spool.stages.release(taken)
            delay = min((retry or (0.0, _FIRST_RETRY))[1], _LAST_RETRY)
            with self._backoff_lock:
                self._backoff[name] = (self._clock.monotonic() + delay, delay * 2)
            self._log.error(
                "intake of %s failed (%s); it stays in incoming/, next try in %s",
                display_name(name), exc, format_duration(delay),
            )  # fmt: skip
            return None
        if outcome is not None and retry is not None:
            with self._backoff_lock:
                self._backoff.pop(name, None)
        return outcome

    def sweep(self, *, remote_writers: bool = False) -> int:
        """Offer every file in incoming/; return how many were taken."""
        names = self._spool.stages.list_incoming()
        present = set(names)
        with self._backoff_lock:
            for gone in self._backoff.keys() - present:
                del self._backoff[gone]
        self._quiet.keep_only(present)
        taken = 0
        for name in names:
            if self.offer(name, complete=False, remote_writers=remote_writers) is not None:
                taken += 1
        return taken

    def decide(self, taken: TakenFile) -> Accepted | Rejected:
        """Validate a staged file and accept or reject it."""
        problem = self._precheck(taken)
        if problem is not None:
            return self._reject(taken, *problem)
        assert taken.data is not None
        name = taken.name  # _precheck made sure it shows as itself: display_name() is a no-op
        now = self._clock.now()
        # The owner of the bytes read; a file spoold staged itself (`spoold exec`) has its caller.
        owner = taken.owner
        submitter = Submitter.caller() if owner is None else Submitter.of_uid(owner.uid)
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
        try:
            return self._place(taken, admitted, submitter)
        except Refused as duplicate:
            return self._refuse(taken, duplicate, submitter)

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
        self._spool.stages.handed_over(accepted.job)
        return admitted.job_id

    def _place(self, taken: TakenFile, admitted: Admitted, submitter: Submitter) -> Accepted:
        """Into pending/ (or scheduled/) with its status; Refused if its job id is taken."""
        assert taken.data is not None
        name, now = taken.name, self._clock.now()
        document, job_id, spec = admitted.document, admitted.job_id, admitted.spec
        sha256 = hashlib.sha256(taken.data).hexdigest()
        if "schedule" in document:
            return self._accept_schedule(taken, document, job_id, sha256, submitter)
        status = JobStatus.accepted(spec, source=name, now=now, sha256=sha256, submitter=submitter)
        line = format_line(rfc3339(now), "INFO", f"spoold: accepted {name} as {job_id}")
        try:
            job = self._ledger.enter(
                status, admitted.callback,
                lambda: self._spool.stages.accept(taken, job_id, status.to_dict(), line),
                arrived=taken.arrived,
            )  # fmt: skip
        except DuplicateJob as exc:  # the rename into pending/ settles it, with no window
            raise self._admission.duplicate(taken.data, document, str(exc)) from None
        self._log.info("accepted %s as %s (%s, from %s)", name, job_id, spec.executor,
                       submitter.name)  # fmt: skip
        try:
            self._on_accepted(job, document)
        except Exception:  # the job is in pending/ already: a scan will queue it
            self._log.exception("queueing job %s failed; the next scan queues it", job_id)
        return Accepted(job)

    def _accept_schedule(
        self,
        taken: TakenFile,
        document: dict[str, Any],
        job_id: str,
        sha256: str,
        submitter: Submitter,
    ) -> Accepted:
        """Into scheduled/<job_id>, replacing a schedule of that id (its history kept).

        Its runs are the submitter's: the scheduler copies ``submitter`` into each one.
        """
        now = self._clock.now()
        existing = self._spool.jobs.find(job_id)
        previous = None
        if existing is not None and existing.directory == "scheduled":
            with contextlib.suppress(OSError, SpooldError, ValueError):
                previous = self._spool.jobs.read_status(existing)
        status = schedule_status(document, job_id=job_id, source=taken.name, now=now,
                                 sha256=sha256, previous=previous)  # fmt: skip
        status.update(submitter.status_fields())
        verb = "replaced the schedule" if existing is not None else "scheduled"
        line = format_line(rfc3339(now), "INFO", f"spoold: {verb} {job_id} from {taken.name}")
        try:
            job = self._spool.stages.accept(taken, job_id, status, line, schedule=True)
        except DuplicateJob as exc:
            assert taken.data is not None
            raise self._admission.duplicate(taken.data, document, str(exc)) from None
        self._log.info("%s %s from %s", verb, job_id, taken.name)
        try:
            self._on_scheduled(job)
        except Exception:  # it is in scheduled/ already: a scan registers it
            self._log.exception("registering schedule %s failed; the next scan does it", job_id)
        return Accepted(job)

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
        record: dict[str, Any] = {
            "file": display_name(taken.name),
            "rejected_at": rfc3339(self._clock.now()),
            "code": code,
            "reason": reason,
            "errors": [i.to_dict() for i in issues or ()],
            "size": taken.size,
        }
        if submitter is not None:
            record.update(submitter.status_fields())
        job_id = None if document is None else document.get("job_id")
        with self._announce_rejection(taken, record, document, job_id):
            path = self._spool.stages.reject(taken, record)
        self._log.warning("rejected %s: %s", display_name(taken.name), reason)
        return Rejected(path, record)

    def _announce_rejection(
        self, taken: TakenFile, record: dict[str, Any], document: dict[str, Any] | None,
        job_id: Any,
    ) -> Any:  # fmt: skip
        """The ``rejected`` event goes where the file asked, if it got that far; else the default."""
        if self._callbacks is None:
            return contextlib.nullcontext()
        target = None
        for candidate in (document, None) if document is not None else (None,):
            try:
                target = self._callbacks.target(candidate)
                break
            except CallbackError as exc:
                self._log.error("rejection of %s: %s", record["file"], exc)
        stage = str(taken.stage)
        ident = str(job_id) if isinstance(job_id, str | int) else None
        return self._callbacks.announce_rejection(target, stage, record, ident)


class IntakeThread:
    """Runs intake on a few threads, fed by the watcher and by periodic sweeps.

    Files are independent: the rename out of incoming/ decides who takes a file, and the
    no-replace rename into pending/ settles two files naming one job id. Several threads let
    the fsyncs of one file overlap the parsing of the next.
    """

    _SWEEP = object()
    _STOP = object()

    def __init__(
        self, intake: Intake, logger: logging.Logger, *, remote_writers: bool, threads: int = 3
    ) -> None:
        self._intake = intake
        self._log = logger
        self._outage = Outage(logger, "intake")
        self._remote_writers = remote_writers
        self._queue: queue.SimpleQueue[str | object] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._loop, name=f"spoold-intake-{n}", daemon=True)
            for n in range(threads)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def arrived(self, name: str) -> None:
        """The watcher saw ``name`` closed after writing or renamed into incoming/."""
        self._queue.put(name)

    def request_sweep(self) -> None:
        self._queue.put(self._SWEEP)

    def stop(self, timeout: float = 10.0) -> None:
        for _ in self._threads:
            self._queue.put(self._STOP)
        for thread in self._threads:
            thread.join(timeout)

    def _loop(self) -> None:
        while (item := self._queue.get()) is not self._STOP:
            # e.g. incoming/ unreadable: intake must go on
            self._outage.call(functools.partial(self._take, item),
                              "intake failed; the next scan tries again")  # fmt: skip

    def _take(self, item: str | object) -> None:
        if item is self._SWEEP:
            self._intake.sweep(remote_writers=self._remote_writers)
        elif isinstance(item, str):
            self._intake.offer(item, complete=True)
