"""After a crash or on another host's death: every job in running/ resumes or ends as its policy says.

A claim of this host is judged by the process table (is the worker that holds it alive?). A
claim of another host is judged by its lease's counter (``beat``, with its host and claim
generation), watched by this host's own monotonic clock (spoold.core.sightings): stale once it
has not changed for ``lease_timeout``, however the two hosts' clocks differ. A stale claim is
taken over: fenced first (one host wins; see spoold.core.spool.jobs), its log rotated away
from the old owner, then ended or requeued as its ``on_interrupt`` says, and its log and
status say who took it over from whom.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from spoold.core.clock import Clock, rfc3339
from spoold.core.config import Config
from spoold.core.documents import load_document
from spoold.core.errors import InvalidJobFile, JobNotFound, SpoolError
from spoold.core.job import JobSpec, JobStatus
from spoold.core.joblog import JobLog
from spoold.core.procfs import process_start_time, this_machine
from spoold.core.sightings import Sightings
from spoold.core.spool import JobDir, Spool
from spoold.core.spool.jobs import claim_marks, generations
from spoold.core.states import JobState
from spoold.executors.base import Executor, RunningJobs
from spoold.out.outbox import Callbacks
from spoold.run.control import cancel_reason, cancel_words
from spoold.run.ledger import JobLedger, Listener
from spoold.run.process import end_left_running


@dataclass(frozen=True)
class Verdict:
    """Whether a running job's worker is gone, and why."""

    gone: bool
    why: str = ""
    #: The claim generation to fence to take it over, and whose it was, as judged (not as
    #: read again later: a host that fenced it meanwhile must win, not be taken from).
    fence: int = 0
    owner: str = ""
    #: Judged by its beat: another host's claim, or one of this host id on another machine.
    elsewhere: bool = False


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
        self._machine = this_machine()
        #: Each running job's lease as last seen, and since when (this host's monotonic clock).
        self._leases: Sightings[str] = Sightings()
        #: Whether another host's record says its daemon stopped (HostBeat.said_stopped):
        #: its claims are its own until it starts again or is forgotten. None: none did.
        self.host_stopped: Callable[[str], bool] | None = None
        #: How long another host's daemon has run, as this host saw it (HostBeat.up_for).
        self.host_up_for: Callable[[str], float | None] | None = None
        self._kept_for: set[str] = set()  # jobs said to be left to their stopped host
        #: Takes over a job whose worker on this host is gone, since this boot (the daemon's
        #: workers), given its lease and status.json as read here: True if it did. None: such
        #: jobs end or requeue as their on_interrupt says.
        self.adopter: Callable[[JobDir, dict[str, Any], dict[str, Any]], bool] | None = None

    def judge(self, job: JobDir, *, own_runs: frozenset[str]) -> Verdict:
        """Decide about one job in running/. ``own_runs``: ids this process runs right now."""
        if job.job_id in own_runs:
            return Verdict(False)
        lease = self._spool.jobs.read_lease(job)
        now = self._clock.monotonic()
        owner = str((lease or {}).get("host") or "")
        where = "" if lease is None else self._machine.relation(lease)
        if lease is not None and owner == self._config.host_id and where != "elsewhere":
            # Same host: the process table is the truth, not the heartbeat. The daemon and
            # its worker process must both live (the worker dies with the daemon, but not
            # necessarily before a restarted daemon looks). (A lease of this host id written
            # on another machine is another host's, judged by its beat below: two hosts
            # given one id must not end each other's jobs.)
            worker = f"worker {lease.get('worker')} (pid {lease.get('pid')} on {owner})"
            fence = _to_fence(lease, generations(job.location))
            if where == "before":
                return Verdict(True, f"{worker} is gone (it ran before a reboot)", fence, owner)
            if not _alive(lease.get("pid"), lease.get("pid_start")):
                return Verdict(True, f"{worker} is gone", fence, owner)
            if "worker_pid" in lease and not _alive(
                lease.get("worker_pid"), lease.get("worker_pid_start")
            ):
                why = f"{worker} lost its worker process {lease['worker_pid']}"
                return Verdict(True, why, fence, owner)
            return Verdict(False)
        # Claimed a moment ago and not leased yet, or another host's: only whether the claim
        # moves (its lease's counter, and the fences made in it), by this host's clock. (A
        # lease of an older spoold has no beat; its heartbeat text changes as a counter would.)
        # The beat its supervisor keeps (``kept.*``) moves too while the owner's daemon is
        # stopped and the job runs on there: a claim that still runs is not taken over.
        fenced, kept = claim_marks(job.location)
        lease = lease or {}
        seen = (owner, lease.get("generation"), lease.get("beat"), lease.get("heartbeat"),
                max(fenced, default=0), kept)  # fmt: skip
        still = self._leases.unchanged_for(job.job_id, seen, now)
        if still < self._config.lease_timeout:
            return Verdict(False)
        if owner and self.host_stopped is not None and self.host_stopped(owner):
            # A stop leaves the jobs running for the host's next start to adopt (a container,
            # a remote process: nothing there keeps the beat while no daemon runs). Taken over,
            # they would run twice. A host retired for good is forgotten (spoold hosts --forget).
            if job.job_id not in self._kept_for:
                self._kept_for.add(job.job_id)
                self._logger.info(
                    "job %s: left to host %s, which said it stopped: its next start adopts it "
                    "(spoold hosts --forget %s if it is retired)", job.job_id, owner, owner,
                )  # fmt: skip
            return Verdict(False)
        if (
            owner
            and self.host_up_for is not None
            and ((up := self.host_up_for(owner)) is not None and up < self._config.lease_timeout)
        ):
            return Verdict(False)  # started again: its adoption of the job renews the lease
        if not lease:
            why = f"claimed and never leased for {still:.0f}s"
        else:
            why = (f"host {owner}'s lease (generation {lease.get('generation')}, beat "
                   f"{lease.get('beat')}) unchanged for {still:.0f}s")  # fmt: skip
        return Verdict(True, why, _to_fence(lease, fenced), owner, elsewhere=True)

    def reap(self, *, own_runs: frozenset[str] = frozenset()) -> list[JobDir]:
        """End or requeue every running job whose worker is gone; return where they went."""
        moved = []
        running = self._spool.jobs.list_jobs("running")
        self._leases.keep_only(job.job_id for job in running)
        self._kept_for.intersection_update(job.job_id for job in running)
        for job in running:
            try:
                verdict = self.judge(job, own_runs=own_runs)
                gone = verdict.gone and not self._adopted(job, verdict.why)
                if gone and (taken := self._take_over(job, verdict)) is not None:
                    moved.append(self._interrupt(*taken, own=not verdict.elsewhere))
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
        if lease is None or lease.get("host") != self._config.host_id:
            return False
        if self._machine.boot_id is None or self._machine.relation(lease) != "here":
            return False
        document = self._spool.jobs.read_status(job)
        status = JobStatus.from_dict(document)
        if status.state.is_terminal:
            return False  # recorded: only its move is missing, which _interrupt completes
        if status.attempts and status.attempts[-1].finished_at is not None:
            return False  # its attempt had ended: nothing of it runs to go on with
        if not self.adopter(job, lease, document):
            return False
        self._logger.warning("recovery: job %s handed over to go on (%s)", job.job_id, why)
        return True

    def sweep_executors(self) -> None:
        """Let every executor remove what jobs no longer running left behind (containers)."""
        self._swept = True
        holders: dict[str, str | None] = {}
        for job in self._spool.jobs.list_jobs("running"):
            holders[job.job_id] = None  # no lease (yet): no holder known
            with contextlib.suppress(OSError, ValueError):
                host = (self._spool.jobs.read_lease(job) or {}).get("host")
                holders[job.job_id] = host if isinstance(host, str) and host else None
        running = RunningJobs(holders)
        for executor in self._executors:
            try:
                executor.recover(self._spool.root, running, self._logger)
            except Exception:  # one executor's clean-up must not stop recovery
                self._logger.exception(
                    "recovery of %s jobs failed; tried again later", executor.name
                )

    def _take_over(self, job: JobDir, verdict: Verdict) -> tuple[JobDir, str] | None:
        """Fence the claim judged gone, for this host; the job under the new claim, and why
        (with who took it over from whom), or None if another host fenced it first."""
        fenced, owner, me = verdict.fence, verdict.owner, self._config.host_id
        why = verdict.why
        record = {"by": me, "from": owner or None, "at": rfc3339(self._clock.now()), "why": why}
        if not self._spool.jobs.fence(job, fenced, record):
            self._logger.info("job %s: another host is taking it over (%s)", job.job_id, why)
            return None
        job = job._replace(generation=fenced + 1)
        if owner == me and not verdict.elsewhere:
            return job, why
        # Its old owner may wake and append to the log it holds open: not to this one.
        self._spool.jobs.rotate_log(job, fenced)
        # Ours now: if this host stops half-way, the next judge sees this lease stand still.
        taker = {"worker": self._config.worker_id, "host": me, "hostname": self._config.hostname,
                 "generation": fenced + 1, "beat": 0, "takeover": True}  # fmt: skip
        self._spool.jobs.write_lease(job, taker)
        # A claim never leased names no host: whoever renamed it into running/ is not known.
        whose = f"from host {owner}" if owner else "from a host that never leased it"
        return job, (f"taken over by host {me} {whose} (claim generation {fenced} -> "
                     f"{fenced + 1}): {why}")  # fmt: skip

    def _interrupt(self, job: JobDir, why: str, *, own: bool = True) -> JobDir:
        """``own``: the claim was this host's (not one judged by its beat: another host's)."""
        self._kill_leftovers(job, own=own)
        status = JobStatus.from_dict(self._spool.jobs.read_status(job))
        if self._callbacks is not None:  # the dead worker's last event, if its change was made
            self._callbacks.settle_job(
                job.job_id, status.callback_sequence, status.callback_delivery
            )
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
        elif (ended := self._ended_command(job, status)) is not None:
            # Its command ran to its end (its supervisor recorded it) while no daemon of its
            # host watched: requeued, it would run twice. What followed the end here (hooks,
            # artifacts) did not happen: the job fails, saying so; a retry runs it again.
            state = JobState.FAILED
            error = (f"interrupted: {why}; its command had ended ({ended}) before its outcome "
                     "was recorded: not run again")  # fmt: skip
            line = f"{error}; failed"
            told = f"job {job.job_id} failed: {error} ({which})"
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
        status.generation = job.generation or status.generation
        with self._spool.jobs.open_log(job) as handle:
            JobLog(handle, self._clock).error(line)
        moved = self._ledger.move(job, state, status)
        self._logger.warning("%s", told)
        return moved

    def _ended_command(self, job: JobDir, status: JobStatus) -> str | None:
        """How the last attempt's own command ended, in words, if its supervisor recorded
        its end (unit ``<attempt>``); None if it did not, if it was cut short (its supervisor
        stopped: a system shutdown), or if the job has no attempt."""
        if not status.attempts:
            return None
        _, ended = self._spool.jobs.read_unit(job, str(status.attempts[-1].number))
        if ended is None or ended.get("interrupted"):
            return None
        code = ended.get("exit_code")
        return "exit code " + str(code) if isinstance(code, int) else "no exit code"

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

    def _kill_leftovers(self, job: JobDir, *, own: bool = True) -> None:
        """A job's processes can outlive a killed daemon; they must not outlive its recovery.
        ``own``: the claim was this host's, so the cgroups its units' records name are this
        host's (another host's may name one on a machine both share: not this one's to end)."""
        lease = self._spool.jobs.read_lease(job)
        if lease is not None and lease.get("host") != self._config.host_id:
            return  # another host's processes are out of reach
        lease = lease or {}
        worker, worker_start = lease.get("worker_pid"), lease.get("worker_pid_start")
        if isinstance(worker, int) and _alive(worker, worker_start):
            # Its daemon is gone, and so must it be before the job moves on.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(worker, signal.SIGKILL)
        # Its first process by the lease (a pid that names another process now is left
        # alone), and those no lease names, by their environment: spawned just before a
        # crash, gone from the group, or a hook's or a step's.
        pid, start = lease.get("job_pid"), lease.get("job_pid_start")
        first = [(pid, start)] if isinstance(pid, int) and isinstance(start, int) else []
        units = self._spool.jobs.unended_units(job) if own else []
        cgroups = [unit["cgroup"] for unit in units if isinstance(unit.get("cgroup"), str)]
        killed = end_left_running(f"SPOOLD_JOB_DIR={job.location}", first, cgroups)
        if killed:
            self._logger.warning("killed %d leftover process(es) of job %s", killed, job.job_id)


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


def _to_fence(lease: dict[str, Any], fenced: list[int]) -> int:
    """The generation a takeover fences: the lease's, or, when a taker fenced that one and
    stopped before it wrote its own lease, the taker's (one above the highest fenced)."""
    held = lease.get("generation")
    return max(held if isinstance(held, int) else 0, max(fenced, default=0) + 1)
