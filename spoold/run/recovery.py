"""After a crash or on another host's death: every job in running/ resumes or ends as its policy says."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from spoold.core.clock import Clock, parse_rfc3339
from spoold.core.config import Config
from spoold.core.documents import load_document
from spoold.core.errors import InvalidJobFile, JobNotFound, SpoolError
from spoold.core.job import JobSpec, JobStatus
from spoold.core.joblog import JobLog
from spoold.core.procfs import (
    boot_id,
    group_members,
    process_start_time,
    processes_with_environment,
)
from spoold.core.spool import JobDir, Spool
from spoold.core.states import JobState
from spoold.executors.base import Executor
from spoold.out.outbox import Callbacks
from spoold.run.control import cancel_reason, cancel_words
from spoold.run.ledger import JobLedger, Listener


@dataclass(frozen=True)
class Verdict:
    """Whether a running job's worker is gone, and why."""

    gone: bool
    why: str = ""


class Recovery:
    """Finds running jobs whose worker is gone and ends or requeues them."""

    def __init__(
        self, spool: Spool, config: Config, clock: Clock, logger: logging.Logger,
        *, callbacks: Callbacks | None = None, executors: Iterable[type[Executor]] = (),
        listeners: Iterable[Listener] = (),
    ) -> None:  # fmt: skip
        """``executors``: whose ``recover`` removes what jobs left outside this host's processes;
        ``listeners``: told of each job it ends or requeues (the metrics)."""
        self._spool = spool
        self._executors = tuple(executors)
        self._swept = False
        self._callbacks = callbacks
        self._ledger = JobLedger(spool, callbacks, listeners=listeners, logger=logger)
        self._config = config
        self._clock = clock
        self._logger = logger
        self._boot = boot_id()
        #: Takes over a job whose worker on this host is gone, since this boot (the daemon's
        #: workers): True if it did. None: such jobs end or requeue as their on_interrupt says.
        self.adopter: Callable[[JobDir], bool] | None = None

    def judge(self, job: JobDir, *, own_runs: frozenset[str]) -> Verdict:
        """Decide about one job in running/. ``own_runs``: ids this process runs right now."""
        if job.job_id in own_runs:
            return Verdict(False)
        lease = self._spool.jobs.read_lease(job)
        now = self._clock.now().timestamp()
        if lease is None:
            # Claimed a moment ago, or its worker died between the rename and the lease.
            age = now - self._spool.jobs.entered_at(job)
            if age > self._config.lease_timeout:
                return Verdict(True, f"claimed {age:.0f}s ago and never leased")
            return Verdict(False)
        worker = f"worker {lease.get('worker')} (pid {lease.get('pid')} on {lease.get('host')})"
        if lease.get("host") == self._config.hostname:
            # Same host: the process table is the truth, not the heartbeat. The daemon and
            # its worker process must both live (the worker dies with the daemon, but not
            # necessarily before a restarted daemon looks).
            if not _alive(lease.get("pid"), lease.get("pid_start")):
                return Verdict(True, f"{worker} is gone")
            if "worker_pid" in lease and not _alive(
                lease.get("worker_pid"), lease.get("worker_pid_start")
            ):
                return Verdict(True, f"{worker} lost its worker process {lease['worker_pid']}")
            return Verdict(False)
        heartbeat = parse_rfc3339(str(lease.get("heartbeat"))).timestamp()
        if now - heartbeat > self._config.lease_timeout:
            return Verdict(True, f"{worker} sent no heartbeat for {now - heartbeat:.0f}s")
        return Verdict(False)

    def reap(self, *, own_runs: frozenset[str] = frozenset()) -> list[JobDir]:
        """End or requeue every running job whose worker is gone; return where they went."""
        moved = []
        for job in self._spool.jobs.list_jobs("running"):
            try:
                verdict = self.judge(job, own_runs=own_runs)
                if verdict.gone and not self._adopted(job, verdict.why):
                    moved.append(self._interrupt(job, verdict.why))
            except FileNotFoundError:
                continue  # finished or taken over while we looked
            except (SpoolError, OSError, ValueError) as exc:
                self._logger.error("cannot recover job %s: %s", job.job_id, exc)
        if moved or not self._swept:
            self.sweep_executors()
        return moved

    def _adopted(self, job: JobDir, why: str) -> bool:
        """Whether the job was handed over to go on, rather than ended or requeued.

        Only on the host that ran it, and only since the boot it began in: its supervisors,
        containers and remote processes may still run, and the records of those that ended
        are still there. After a reboot nothing of it runs: its on_interrupt decides.
        """
        if self.adopter is None:
            return False
        lease = self._spool.jobs.read_lease(job)
        if lease is None or lease.get("host") != self._config.hostname:
            return False
        if self._boot is None or lease.get("boot_id") != self._boot:
            return False
        status = JobStatus.from_dict(self._spool.jobs.read_status(job))
        if status.state.is_terminal:
            return False  # recorded: only its move is missing, which _interrupt completes
        if status.attempts and status.attempts[-1].finished_at is not None:
            return False  # its attempt had ended: nothing of it runs to go on with
        if not self.adopter(job):
            return False
        self._logger.warning("recovery: job %s handed over to go on (%s)", job.job_id, why)
        return True

    def sweep_executors(self) -> None:
        """Let every executor remove what jobs no longer running left behind (containers)."""
        self._swept = True
        running = {job.job_id for job in self._spool.jobs.list_jobs("running")}
        for executor in self._executors:
            try:
                executor.recover(self._spool.root, running, self._logger)
            except Exception:  # one executor's clean-up must not stop recovery
                self._logger.exception(
                    "recovery of %s jobs failed; tried again later", executor.name
                )

    def _interrupt(self, job: JobDir, why: str) -> JobDir:
        self._kill_leftovers(job)
        status = JobStatus.from_dict(self._spool.jobs.read_status(job))
        if self._callbacks is not None:  # the dead worker's last event, if its change was made
            self._callbacks.settle_job(job.job_id, status.callback_sequence)
        if status.state.is_terminal:
            # The outcome was recorded before the worker died: the move is all that is
            # missing. Running it again would run a finished job twice. (A status that is not
            # terminal proves nothing: "running" is not fsynced, so the policy decides.)
            self._logger.warning(
                "job %s: completing its move to %s/ (%s)", job.job_id, status.state.directory, why
            )
            return self._ledger.move(job, status.state, status, announce=False)
        request = self._spool.jobs.cancel_request(job)
        which = f"attempt {status.attempts[-1].number}" if status.attempts else "no attempt"
        if request is not None:
            # A cancel, once asked for, wins over on_interrupt: requeue (and over retries):
            # the job ends cancelled, though its worker died before it could act on it.
            state, error = JobState.CANCELLED, cancel_reason(request)
            line = f"{error}, and {why}: the job ends cancelled"
            told = f"job {job.job_id} {cancel_words(request)} ({which}; recovered: {why})"
        elif _on_interrupt(self._spool, job, status) == "requeue":
            state, error = JobState.PENDING, f"interrupted: {why}"
            line = f"{error}; requeued (on_interrupt: requeue)"
            told = f"job {job.job_id} interrupted ({which}; {why}); back to pending " + (
                "(on_interrupt: requeue)"
            )
        else:
            state, error = JobState.FAILED, f"interrupted: {why}"
            line = f"{error}; failed"
            told = f"job {job.job_id} failed: {error} ({which})"
        status.end_attempt(self._clock.now(), state, None, error)
        status.next_attempt_at = None
        with self._spool.jobs.open_log(job) as handle:
            JobLog(handle, self._clock).error(line)
        moved = self._ledger.move(job, state, status)
        self._logger.warning("%s", told)
        return moved

    def repair_pending(self) -> list[str]:
        """Rebuild the status.json of pending jobs that lost it (it is not fsynced at accept)."""
        repaired = []
        for job in self._spool.jobs.list_jobs("pending"):
            try:
                self._spool.jobs.read_status(job)
                continue
            except (JobNotFound, ValueError):
                pass
            try:
                data = self._spool.jobs.read_job_file(
                    job, sha256=None
                )  # its record is what was lost
                spec = JobSpec.from_document(load_document(data, "job.yaml"), job.job_id)
            except (OSError, InvalidJobFile, AttributeError, ValueError) as exc:
                self._logger.error("pending job %s is unreadable: %s", job.job_id, exc)
                continue
            when = datetime.fromtimestamp(self._spool.jobs.entered_at(job), UTC)
            digest = hashlib.sha256(data).hexdigest()
            status = JobStatus.accepted(spec, source=None, now=when, sha256=digest)
            self._spool.jobs.write_status(job, status.to_dict(), durable=True)
            repaired.append(job.job_id)
            self._logger.warning("rebuilt the lost status of pending job %s", job.job_id)
        return repaired

    def _kill_leftovers(self, job: JobDir) -> None:
        """A job's processes can outlive a killed daemon; they must not outlive its recovery."""
        lease = self._spool.jobs.read_lease(job)
        if lease is not None and lease.get("host") != self._config.hostname:
            return  # another host's processes are out of reach
        lease = lease or {}
        worker, worker_start = lease.get("worker_pid"), lease.get("worker_pid_start")
        if isinstance(worker, int) and _alive(worker, worker_start):
            # Its daemon is gone, and so must it be before the job moves on.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(worker, signal.SIGKILL)
        pid, start = lease.get("job_pid"), lease.get("job_pid_start")
        members = set()
        if isinstance(pid, int):
            members.update(group_members(pid, int(start) if start is not None else None))
        # Also those no lease names: spawned just before a crash, or gone from the group.
        members.update(processes_with_environment(f"SPOOLD_JOB_DIR={job.location}"))
        members.discard(os.getpid())
        for member in sorted(members):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(member, signal.SIGKILL)
        if members:
            self._logger.warning(
                "killed %d leftover process(es) of job %s", len(members), job.job_id
            )


def _alive(pid: object, start: object) -> bool:
    """Whether ``pid`` is still the process that started at ``start`` (not a reused pid)."""
    return isinstance(pid, int) and start is not None and process_start_time(pid) == start


def _on_interrupt(spool: Spool, job: JobDir, status: JobStatus) -> str:
    try:
        data = spool.jobs.read_job_file(job, sha256=status.sha256)
        document = load_document(data, status.source or "job.yaml")
    except (OSError, InvalidJobFile, SpoolError):  # JobFileChanged: never run again
        return "fail"
    return str(document.get("on_interrupt", "fail")) if isinstance(document, dict) else "fail"
