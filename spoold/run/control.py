"""What users ask of a job from outside the daemon: cancel it, or run it again.

Both work through the spool alone, so they work with the daemon stopped, on another host of a
shared spool, and across a daemon restart. A pending job is cancelled here and now: the
claim rename decides between this and a worker, exactly one wins. A running job belongs to
the worker that claimed it: it gets a request (running/<id>/cancel), which that worker picks
up within a poll interval and acts on by ending the job's whole process group.

A request, once written, wins: the job ends ``cancelled``, never retried (``retry:``) nor
requeued (``on_interrupt: requeue``). If its worker is gone (spoold was killed, or stopped while
the job ran), recovery ends it cancelled when spoold next looks: at its restart, or when
another host takes the claim over. ``spoold retry`` runs it again.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spoold.core.clock import Clock, rfc3339
from spoold.core.errors import InvalidTransition, JobNotFound, SpooldError, SpoolError
from spoold.core.job import JobStatus
from spoold.core.joblog import JobLog
from spoold.core.procfs import process_start_time
from spoold.core.spool import JobDir, Spool
from spoold.core.states import JobState, state_phrase
from spoold.out.outbox import Callbacks, CallbackTarget
from spoold.run.ledger import FROM_JOB_FILE, FromJobFile, JobLedger, Listener, StateChange

# A job can move while we act on it (claimed, finished); a few looks settle where it is.
_LOOKS = 5


def cancel_reason(request: Mapping[str, Any]) -> str:
    """What status.json says of a cancel request (running/<id>/cancel): its reason, or who."""
    return str(request.get("reason") or f"cancelled by {request.get('by') or 'a user'}")


def cancel_words(request: Mapping[str, Any]) -> str:
    """A cancel request for spoold's own log: ``cancelled by WHO`` and its reason, if any."""
    who = f"cancelled by {request.get('by') or 'a user'}"
    return f"{who}: {request['reason']}" if request.get("reason") else who


@dataclass(frozen=True)
class CancelOutcome:
    """What ``cancel`` did: ``job`` is where the job is now."""

    job: JobDir
    cancelled: bool  # True: it ended here; False: a request waits for its worker
    state: JobState


@dataclass(frozen=True)
class Retried:
    """What ``retry`` did: ``job`` is where it put the job (a worker may have claimed it
    since), ``status`` what it recorded there: what a caller answers with, not a read of
    status.json, which a worker that claimed the job before the retry wrote its own still
    shows as it ended (seen under load: a retry answered "cancelled")."""

    job: JobDir
    status: JobStatus


class JobControl:
    """Cancel and retry, as ``spoold cancel`` and ``spoold retry`` do them."""

    def __init__(
        self,
        spool: Spool,
        clock: Clock,
        *,
        who: str,
        callbacks: Callbacks | None = None,
        listeners: Iterable[Listener] = (),
    ) -> None:
        """``listeners``: told of each job it ends or puts back (the metrics); not of the claim
        that keeps a worker from starting a pending job being cancelled, which starts nothing."""
        self._spool = spool
        told = tuple(listeners)

        def tell(change: StateChange) -> None:
            if change.after is not JobState.RUNNING:
                for listener in told:
                    listener(change)

        self._ledger = JobLedger(spool, callbacks, listeners=(tell,) if told else ())
        self._callbacks = callbacks
        self._clock = clock
        self._who = who  # who asks, for the log and status.json: "root on host1"

    def cancel(self, job_id: str, reason: str | None = None) -> CancelOutcome:
        """End a pending job now, or ask the worker of a running job to end it.

        ``reason``: what status.json and the log say (default: who cancelled it).
        """
        for _ in range(_LOOKS):
            job = self._not_a_schedule(self._spool.jobs.get(job_id))
            if job.directory == "pending":
                claimed = self._ledger.claim(job_id)  # so that no worker starts it
                if claimed is None:
                    continue  # a worker was faster: it runs now
                ended = self._end_unstarted(claimed, reason)
                return CancelOutcome(ended, True, JobState.CANCELLED)
            if job.directory == "running":
                request = {"by": self._who, "at": rfc3339(self._clock.now()), "reason": reason}
                try:
                    self._spool.jobs.request_cancel(job, request)
                except FileNotFoundError:
                    continue  # it finished meanwhile
                return CancelOutcome(job, False, JobState.RUNNING)
            state = JobState(self._spool.jobs.read_status(job)["state"])
            return CancelOutcome(job, False, state)
        raise SpoolError(f"job {job_id} kept moving; try again")

    def retry(self, job_id: str) -> Retried:
        """Put a failed or cancelled job back into pending/ for one more attempt."""
        job = self._not_a_schedule(self._spool.jobs.get(job_id))
        status = JobStatus.from_dict(self._spool.jobs.read_status(job))
        if job.directory != "failed" or status.state not in (JobState.FAILED, JobState.CANCELLED):
            raise InvalidTransition(
                f"job {job_id} {state_phrase(status.state)}: only a failed or cancelled job "
                "runs again"
            )
        status.state = JobState.PENDING
        status.finished_at = status.exit_code = status.error = status.next_attempt_at = None
        # Opened before the move, written after it: the handle follows the directory, which a
        # worker may claim from pending/ the moment it is there.
        moved_on = JobNotFound(f"job {job_id} moved meanwhile (retried, or purged); try again")
        try:
            handle = self._spool.jobs.open_log(job)
        except FileNotFoundError:
            raise moved_on from None
        with handle:
            # Its callback's target read here, not by the move: a retry that lost the race to
            # another (five at once) found job.yaml gone and logged "no retrying callback"
            # before it could say that the job had moved.
            target = self._retry_target(job, status, moved_on)
            try:
                pending = self._ledger.move(
                    job, JobState.PENDING, status, event="retrying", target=target
                )
            except FileNotFoundError:
                if Path(job.location).is_dir():
                    raise  # not the move's own job: something else is missing
                raise moved_on from None
            JobLog(handle, self._clock).info(
                f"retry requested by {self._who}: attempt {len(status.attempts) + 1} follows"
            )
        return Retried(pending, status)

    def _retry_target(
        self, job: JobDir, status: JobStatus, moved_on: JobNotFound
    ) -> CallbackTarget | FromJobFile | None:
        """Where the retry's ``retrying`` event goes, from the job's job.yaml; ``moved_on``
        if the job left failed/ meanwhile. A file that cannot be used is left to the move,
        which says what is wrong with it."""
        if self._callbacks is None:
            return None
        from spoold.core.documents import load_document  # noqa: PLC0415 - YAML: only a retry

        try:
            data = self._spool.jobs.read_job_file(job, sha256=status.sha256)
            document = load_document(data, "job.yaml")
        except FileNotFoundError:
            if not Path(job.location).is_dir():
                raise moved_on from None
            return FROM_JOB_FILE
        except (SpooldError, OSError, ValueError):
            return FROM_JOB_FILE
        return self._callbacks.target_of(job.job_id, document)

    @staticmethod
    def _not_a_schedule(job: JobDir) -> JobDir:
        if job.directory == "scheduled":
            raise InvalidTransition(
                f"{job.job_id} is a schedule: `spoold unschedule {job.job_id}` removes it, and "
                f"its runs ({job.job_id}@<time>) are cancelled or retried one by one"
            )
        return job

    def worker_gone(self, job: JobDir, host: str) -> bool:
        """Whether the spoold that runs ``job`` on ``host`` (this host) is gone: killed, or
        stopped. Its cancel request then waits for spoold's next start there, which ends the
        job cancelled. False while it lives, and for a job another host runs."""
        lease = self._spool.jobs.read_lease(job)
        if lease is None or lease.get("host") != host:
            return False
        pid, start = lease.get("pid"), lease.get("pid_start")
        return not (isinstance(pid, int) and start is not None and process_start_time(pid) == start)

    def daemon_runs(self, host: str) -> bool:
        """Whether a spoold daemon serves this spool on ``host`` (this host) now."""
        found = self._spool.host_lock.daemon_on(host)
        return found is not None and process_start_time(found[0]) == found[1]

    def wake_daemon(self, host: str) -> bool:
        """Ask the daemon on ``host`` to look at pending/ now (SIGUSR1); False if none runs."""
        found = self._spool.host_lock.daemon_on(host)
        if found is None:
            return False
        pid, start = found
        if process_start_time(pid) != start:  # the lock outlived it, and the pid was reused
            return False
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGUSR1)
            return True
        return False

    def _end_unstarted(self, job: JobDir, reason: str | None) -> JobDir:
        try:
            status = JobStatus.from_dict(self._spool.jobs.read_status(job))
        except (JobNotFound, ValueError, OSError):
            raise SpoolError(f"job {job.job_id} has no readable status.json") from None
        if reason is None:
            waited = f"attempt {len(status.attempts) + 1}" if status.attempts else "it"
            reason = f"cancelled by {self._who} before {waited} started"
        status.end_attempt(self._clock.now(), JobState.CANCELLED, None, reason)
        status.next_attempt_at = None
        with self._spool.jobs.open_log(job) as handle:
            JobLog(handle, self._clock).error(reason)
        return self._ledger.move(job, JobState.CANCELLED, status)
