"""Runs claimed jobs: one attempt each, artifacts collected, the outcome recorded, within the limits."""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import hashlib
import logging
import os
import pwd
import random
import re
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

from spoold.core.clock import Clock, parse_rfc3339, rfc3339
from spoold.core.config import Config
from spoold.core.documents import load_document, units_of
from spoold.core.errors import (
    ExecutorError,
    JobDetached,
    JobFenced,
    JobFileChanged,
    SecretError,
)
from spoold.core.job import (
    ArtifactSpec,
    Attempt,
    JobSpec,
    JobStatus,
    interpolate,
    refer_to_secrets,
    secret_variable,
)
from spoold.core.joblog import JobLog
from spoold.core.outage import Outage, is_outage
from spoold.core.procfs import process_start_time, this_machine
from spoold.core.secrets import SHORT_SECRET, Masker, SecretStore, is_secret_field
from spoold.core.spool import JobDir, Spool
from spoold.core.spool.hosts import others_may_take_over
from spoold.core.spool.jobs import generations
from spoold.core.states import JobState
from spoold.core.units import format_duration
from spoold.core.usage import StepUsage, Usage
from spoold.executors.base import ExecResult, Executor, RunContext, resumed
from spoold.out.outbox import Callbacks, CallbackTarget
from spoold.run.control import cancel_reason, cancel_words
from spoold.run.executor_slots import ExecutorSlots, LocalSlots
from spoold.run.hooks import HookRunner
from spoold.run.lane import Lane, SharedLook
from spoold.run.launcher import (
    ArtifactsLeft,
    Chore,
    CutOff,
    Launcher,
    LauncherError,
    Leftovers,
    Supervised,
)
from spoold.run.ledger import JobLedger, Listener
from spoold.run.log_socket import LogTap
from spoold.run.process import RunAs
from spoold.run.registry import ExecutorRegistry
from spoold.run.steps import StepsRun

_DOCUMENT_CACHE = 10_000
#: A job's PATH when spoold has none (systemd's default).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: What a job gets of the daemon's environment besides PATH: how to speak and what time it is.
PASSED_ENV = ("LANG", "LANGUAGE", "LC_*", "TZ")
#: The daemon's own service (systemd's socket and watchdog, its credentials, its journal
#: stream): never passed on by a pattern of ``pass_env``, only when named there as it is.
DAEMON_ONLY_ENV = (
    "NOTIFY_SOCKET", "WATCHDOG_*", "LISTEN_*", "CREDENTIALS_DIRECTORY", "INVOCATION_ID",
    "JOURNAL_STREAM", "SYSTEMD_EXEC_PID", "MAINPID", "MANAGERPID",
)  # fmt: skip
#: The least wait before a job whose start could not be recorded (a full disk) is tried again.
NOT_STARTED_WAIT = 10.0


@dataclass
class ActiveRun:
    """A job this process is running now, with its lease and its stop switch."""

    job: JobDir
    lease: dict[str, Any]
    cancel: threading.Event = field(default_factory=threading.Event)
    interrupted: bool = False
    #: Masks this job's secrets in its log and status.json.
    masker: Masker = field(default_factory=Masker)
    #: The secrets read for this attempt: each file is read once, and hooks, variables and
    #: commands all see the same value.
    secrets: dict[str, str] = field(default_factory=dict)
    #: Why ``cancel`` was set by a user's request (``spoold cancel``): for status.json.
    cancel_reason: str | None = None
    #: That request (running/<id>/cancel): who asked, when, why.
    cancel_request: dict[str, Any] | None = None
    #: How many attempts its ``retry:`` allows in all, once its spec is read (for the log).
    attempts_allowed: int = 1
    leased: bool = False
    #: An outcome its worker could not record (a full disk), for ``retry_finishing``.
    outcome: tuple[JobState, JobStatus] | None = None
    #: Held while the lease is written or the job moved, so neither undoes the other.
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Where its events go (``callback:`` or the config's default), once its spec is read.
    callback: CallbackTarget | None = None
    #: Taken over from a worker that is gone (``JobRunner.adopt``): its attempt goes on.
    resume: bool = False
    #: spoold stops and leaves the job running for the next daemon (``RunContext.detach``).
    detach: threading.Event = field(default_factory=threading.Event)
    #: The attempt's work dir, and who its processes run as (None: spoold's own user).
    workdir: Path | None = None
    user: RunAs | None = None
    #: The job user whose leftovers in the shared directories are removed after the attempt,
    #: and how those directories were as it began (``Lane.sweeps``).
    leftovers: tuple[RunAs, SharedLook] | None = None
    #: Another host took the claim over (JobFenced): the job's processes here are ended
    #: and nothing more is written for it.
    fenced: bool = False
    #: For a job another host would run again once it took it over (``on_interrupt:
    #: requeue``): when this process ends it, its lease not renewed (``renew_leases``).
    cut_off: CutOff | None = None
    #: When its lease was last written, on the clock's monotonic time (None: not yet).
    renewed: float | None = None
    #: Why it was interrupted, where this process ended it itself (the spool out of reach).
    why: str | None = None
    #: Work its slot does once this attempt's first unit has been asked for, while it starts
    #: (``WorkerPool``: the slot's previous job is recorded then).
    meanwhile: Callable[[], None] | None = None
    #: The short secret values spoold's log warned of for this attempt (each once).
    short_warned: set[str] = field(default_factory=set)
    #: When its attempt began, on the clock's monotonic time: None for an attempt adopted from
    #: a worker that is gone, whose start this process did not see.
    began: float | None = None
    #: How long its attempt took, on that monotonic time, once it ended (None: not measured).
    took: float | None = None


@dataclass(frozen=True)
class Outcome:
    """An attempt that ended, waiting to be recorded."""

    run: ActiveRun
    state: JobState
    status: JobStatus
    log: JobLog


class JobRunner:
    """Runs one claimed job to its end: the code path shared by the daemon and ``spoold exec``."""

    def __init__(
        self,
        spool: Spool,
        registry: ExecutorRegistry,
        config: Config,
        clock: Clock,
        logger: logging.Logger,
        *,
        daemon_pid: int | None = None,
        draw: Callable[[], float] = random.random,
        on_deferred: Callable[[str, float], None] | None = None,
        secrets: SecretStore | None = None,
        masker: Masker | None = None,
        tap: LogTap | None = None,
        callbacks: Callbacks | None = None,
        launcher: Launcher | None = None,
        lane: Lane | None = None,
        listeners: Iterable[Listener] = (),
        slots: ExecutorSlots | None = None,
    ) -> None:
        """``daemon_pid``: the daemon whose worker process this is (None: this process runs alone).

        ``masker``: where every secret read is also registered (spoold's own log masks it).
        ``launcher`` starts the jobs' supervisors (this process's if not given); ``lane``
        says who jobs run as and where they work (the config's if not given). ``listeners``
        hear of each change of state this runner makes (spoold.run.ledger: the metrics').
        ``slots``: where the steps of its jobs take their executors' slots (counted by this
        runner if not given: a worker process's are the main process's to count).
        """
        self._spool = spool
        self._registry = registry
        self._config = config
        self._clock = clock
        self._logger = logger
        self._draw = draw  # the jitter of retry waits
        self._secrets = secrets or SecretStore(None)
        self._tap = tap  # RUNNER_LOG_SOCKET
        self._callbacks = callbacks
        self._ledger = JobLedger(spool, callbacks, listeners=listeners, logger=logger)
        self._masker = masker if masker is not None else Masker()
        #: Whether this host's record last showed a host that may take its jobs over.
        self._takers = True
        # Hears of each job moved back to pending/ to wait for a retry, with when it is due.
        self._on_deferred = on_deferred
        self._active: dict[str, ActiveRun] = {}
        self._lock = threading.Lock()
        # A claim is the daemon's and, inside it, a worker process's: it dies with either.
        me = {"pid": os.getpid(), "pid_start": process_start_time(os.getpid())}
        self._owner = me
        if daemon_pid is not None:
            daemon = {"pid": daemon_pid, "pid_start": process_start_time(daemon_pid)}
            self._owner = {**daemon, "worker_pid": me["pid"], "worker_pid_start": me["pid_start"]}
        # Built once: a plain dict copies much faster per job.
        self._environ = job_base_environment(os.environ, config.pass_env)
        self._slots = slots if slots is not None else LocalSlots(config.executor_limits)
        self._accounts: dict[int, tuple[str, str, str] | None] = {}  # uid: name, home, shell
        # Documents intake parsed, so that a job is not parsed again to run (bounded).
        self._documents: dict[str, dict[str, Any]] = {}
        self._launcher = launcher if launcher is not None else Launcher.shared()
        self._lane = lane if lane is not None else Lane.from_config(config, spool.jobs.work_root)
        self._machine = this_machine().fields()
        # Work dirs made ahead (``make_ahead``), where this process makes them itself (root).
        self._workdirs = self._lane.spares(config.host_id) if self._launcher.chores_here else None

    def make_ahead(self, jobs: int) -> None:
        """Make ahead what the starts of the next ``jobs`` jobs would create on their way (a
        slot that waits): their status.json "started", lease and work dir become renames."""
        try:
            self._spool.jobs.spares.fill(2 * jobs)
            if self._workdirs is not None:
                self._workdirs.fill(jobs)
        except OSError as exc:  # a full disk: each is made when needed, as before
            self._logger.debug("could not make spares ahead: %s", exc)

    def drop_ahead(self) -> None:
        """Remove what ``make_ahead`` made and no job took (the process stops)."""
        self._spool.jobs.spares.drop()
        if self._workdirs is not None:
            self._workdirs.drop()

    def job_user(self, slot: str) -> str | None:
        """The name of the user a job in worker slot ``slot`` runs as without ``run_as``
        (None: spoold's own user)."""
        return self._lane.job_user(slot)

    def remember(self, job_id: str, document: dict[str, Any]) -> None:
        """Keep the document intake validated for a job about to be queued."""
        with self._lock:
            if len(self._documents) >= _DOCUMENT_CACHE:
                self._documents.pop(next(iter(self._documents)))
            self._documents[job_id] = document

    def new_lease(self, generation: int | None = None) -> dict[str, Any]:
        """The claim a worker of this process writes into running/<id>/lease.

        ``host`` and ``generation`` name the claim; ``beat``, one higher at each renewal, is
        what other hosts watch by their own clocks (``heartbeat`` is for people only).
        """
        now = rfc3339(self._clock.now())
        return {
            "worker": self._config.worker_id,
            "host": self._config.host_id,
            "hostname": self._config.hostname,
            "generation": generation,
            "beat": 0,
            **self._owner,
            "claimed_at": now,
            "heartbeat": now,
            # A lease from another boot names no process that could still run: the job's
            # on_interrupt decides, rather than an adoption; one from another machine (under
            # this host id) is judged by its beat, never by this process table (see Recovery).
            **self._machine,
            "job_pid": None,
            "job_pid_start": None,
        }

    def claim(self, job_id: str) -> JobDir | None:
        """Claim a pending job for this process; None if another worker was faster."""
        job = self._ledger.claim(job_id)
        if job is not None:
            with self._lock:
                self._active[job_id] = ActiveRun(job, self.new_lease(job.generation))
        return job

    def adopt(self, job_id: str) -> JobDir | None:
        """Take over a running job whose worker is gone; None if it is not in running/."""
        job = self._spool.jobs.find(job_id)
        if job is None or job.directory != JobState.RUNNING.directory:
            return None
        # Its claim goes on here, under the generation it had (its worker on this host is
        # gone, the process table says so): fenced like it if another host takes it over.
        held = (self._spool.jobs.read_lease(job) or {}).get("generation")
        generation = (
            held if isinstance(held, int) else max(generations(job.location), default=0) + 1
        )
        job = job._replace(generation=generation)
        with self._lock:
            self._active[job_id] = ActiveRun(job, self.new_lease(generation), resume=True)
        return job

    def detach_all(self) -> int:
        """spoold stops: leave every running job that can outlive it running; return how many."""
        with self._lock:
            runs = list(self._active.values())
        for run in runs:
            run.detach.set()
        return len(runs)

    def renew_leases(self) -> None:
        """Heartbeat: rewrite the lease of every job this process runs."""
        with self._lock:
            runs = list(self._active.values())
        stamp = rfc3339(self._clock.now())
        self._look_for_takers(runs)
        for run in runs:
            with run.lock:
                if not run.leased:
                    continue  # the lease is written once the work starts
                # Also while an outcome waits to be recorded: the claim is still ours.
                run.lease["heartbeat"] = stamp
                run.lease["beat"] = int(run.lease.get("beat") or 0) + 1
                try:
                    self._spool.jobs.write_lease(run.job, run.lease)
                    run.renewed = self._clock.monotonic()
                except JobFenced as exc:
                    self._fenced(run, exc)
                except FileNotFoundError:
                    pass  # finished since the snapshot
                except OSError as exc:  # a full disk: the old lease stands, the job goes on
                    self._logger.warning("cannot renew the lease of %s: %s", run.job.job_id, exc)
                    self._out_of_reach(run, exc)

    def _look_for_takers(self, runs: list[ActiveRun]) -> None:
        """Whether this host's record shows another host that may take its jobs over, read
        while a job that one would run again runs here; kept as last read when it cannot be."""
        held = next((run.cut_off for run in runs if run.cut_off is not None), None)
        if held is not None:
            with contextlib.suppress(OSError):
                self._takers = others_may_take_over(held.host_record)

    def _out_of_reach(self, run: ActiveRun, exc: OSError) -> None:
        """Its lease could not be renewed: once it has stood still for ``CutOff.after``, a
        host that may take the job over would soon find it stale and run the job again; its
        run here ends first, as its supervisor ends a unit of processes (``_Keeper``). For
        the units that run in this process (the API executors, docker, ssh), which have none,
        this is all that ends them; the job is then interrupted (``on_interrupt``)."""
        if run.cut_off is None or run.renewed is None or run.cancel.is_set() or not self._takers:
            return
        still = self._clock.monotonic() - run.renewed
        run.why = run.cut_off.why(still, f"its lease not renewed for {still:.0f}s")
        if run.why is None:
            return
        run.interrupted = True
        self._logger.warning("job %s: %s (%s): this host's copy of it ends first",
                             run.job.job_id, run.why, exc.strerror or exc)  # fmt: skip
        run.cancel.set()

    def _fenced(self, run: ActiveRun, exc: JobFenced) -> None:
        """Another host took the job over: end its processes here; write nothing for it."""
        if not run.fenced:
            run.fenced = True
            self._logger.warning("%s: its processes here are ended; nothing more is written "
                                 "for it from this host", exc)  # fmt: skip
        run.cancel.set()

    def _drop_fenced(self, run: ActiveRun, exc: JobFenced) -> None:
        """Forget a job another host took over, as if it had never been claimed here."""
        run.fenced = True
        with self._lock:
            self._active.pop(run.job.job_id, None)
        self._logger.warning("%s: this host's copy of it ended, recording nothing", exc)

    def check_cancels(self) -> int:
        """Act on the cancel requests made for jobs this process runs; return how many."""
        with self._lock:
            runs = [run for run in self._active.values() if not run.cancel.is_set()]
        found = 0
        for run in runs:
            request = self._spool.jobs.cancel_request(run.job)
            if request is not None:
                _take_cancel(run, request)
                run.cancel.set()
                found += 1
        return found

    def _cancel_asked(self, run: ActiveRun) -> str | None:
        """Why the job is to end cancelled, if a cancel was asked for: seen while it ran, or
        there now (asked as it ended, or while spoold was stopping it). None if none was."""
        if run.cancel_request is None:
            try:
                request = self._spool.jobs.cancel_request(run.job)
            except OSError as exc:
                if not is_outage(exc):
                    raise
                # A shared spool cut off as the job ended: its outcome is not lost to it (it
                # is recorded once the spool is back); a cancel asked meanwhile, seen then.
                request = None
            if request is not None:
                _take_cancel(run, request)
        return run.cancel_reason if run.cancel_request is not None else None

    def interrupt_all(self) -> int:
        """Stop every running job because spoold is stopping; return how many."""
        with self._lock:
            runs = list(self._active.values())
        for run in runs:
            run.interrupted = True
            run.cancel.set()
        return len(runs)

    def active_ids(self) -> list[str]:
        """The jobs this process runs now."""
        with self._lock:
            return list(self._active)

    def run(self, job: JobDir, *, slot: str = "0", tee: IO[str] | None = None) -> JobDir | None:
        """Run a job claimed by ``claim()`` and record its outcome; return where it ended up.

        None when the outcome is known but could not be recorded yet (a full disk): the job
        stays claimed, and ``retry_finishing()`` records it once it can.
        """
        outcome = self.attempt(job, slot=slot, tee=tee)
        return None if outcome is None else self.record(outcome)

    def attempt(
        self,
        job: JobDir,
        *,
        slot: str = "0",
        tee: IO[str] | None = None,
        meanwhile: Callable[[], None] | None = None,
    ) -> Outcome | None:
        """Run one attempt of a claimed job in work slot ``slot``; the outcome is not recorded
        yet. None: spoold stops and left the job running, in running/, for the next daemon.

        ``meanwhile`` is called once the attempt's first unit has been asked for (its process
        starts in its supervisor meanwhile), or before a unit that runs here; maybe more than
        once, from any thread of the attempt, maybe never (no unit ran)."""
        with self._lock:
            run = self._active[job.job_id]
        run.meanwhile = meanwhile
        log = JobLog(
            self._spool.jobs.open_log(job), self._clock, tee=tee, mask=run.masker.mask_text,
            limit=self._config.max_log_size,
            tap=None if self._tap is None else functools.partial(self._tap.send, job.job_id),
        )  # fmt: skip
        status = JobStatus.from_dict(self._spool.jobs.read_status(job))
        try:
            state = self._run(run, status, log, slot)
        except JobDetached:
            log.info("spoold stops: the job goes on, and the next daemon adopts it")
            log.close()
            with self._lock:
                self._active.pop(job.job_id, None)
            self._logger.info("job %s left running for the next daemon", job.job_id)
            return None
        except JobFenced as exc:
            log.close()
            self._drop_fenced(run, exc)
            return None
        except JobFileChanged as exc:  # not the validated file: nothing of it runs, ever
            self._logger.error("%s", exc)
            log.error(str(exc))
            state = JobState.FAILED
            status.end_attempt(self._clock.now(), state, None, str(exc), took=self._took(run))
        except Exception as exc:  # spoold's own failure must still end the job somewhere
            self._logger.exception("job %s failed inside spoold", job.job_id)
            log.error(f"internal error: {exc!r}")
            state = JobState.FAILED
            status.end_attempt(self._clock.now(), state, None, f"internal error: {exc!r}",
                               took=self._took(run))  # fmt: skip
        return Outcome(run, state, status, log)

    def _took(self, run: ActiveRun) -> float | None:
        """How long ``run``'s attempt has taken, by the monotonic clock: a step of the wall
        clock (NTP) while it ran changes its stamps, never its duration. None for an adopted
        attempt (its start was another process's). Kept on ``run`` for spoold's own log, which
        may be written later (a full disk)."""
        if run.began is not None:
            run.took = max(self._clock.monotonic() - run.began, 0.0)
        return run.took

    def record(self, outcome: Outcome) -> JobDir | None:
        """Write an attempt's outcome and move the job to done/, failed/ or back to pending/."""
        log, status = outcome.log, outcome.status
        log.summarize()
        if self._spool.durable:
            log.sync()  # through the open handle: cheaper than by path in finish()
        log.close()
        if log.lost_lines:
            status.log_lines_lost += log.lost_lines
            self._logger.error(
                "job %s: %d log line(s) lost (%s)", outcome.run.job.job_id, log.lost_lines,
                log.first_error,
            )  # fmt: skip
        return self._finish(outcome.run, outcome.state, status)

    def retry_finishing(self) -> list[JobDir]:
        """Record the outcomes that could not be recorded before; return the jobs moved."""
        with self._lock:
            waiting = [run for run in self._active.values() if run.outcome is not None]
        moved = []
        for run in waiting:
            assert run.outcome is not None
            if (final := self._finish(run, *run.outcome, retry=True)) is not None:
                moved.append(final)
        return moved

    def _finish(
        self, run: ActiveRun, state: JobState, status: JobStatus, *, retry: bool = False
    ) -> JobDir | None:
        synced = True
        if state is JobState.PENDING and (reason := self._cancel_asked(run)) is not None:
            # Asked after the attempt's outcome was decided: no retry, no requeue all the same.
            state, synced = self._cancel_instead(run, status, reason), False
        with run.lock:
            try:
                final = self._ledger.move(
                    run.job, state, status, target=run.callback,
                    mask=functools.partial(_masked, run.masker), log_synced=synced,
                    retry=retry,
                )  # fmt: skip
            except JobFenced as exc:
                self._drop_fenced(run, exc)
                return None
            except OSError as exc:
                # Only now is the outcome handed to retry_finishing: never two finishers.
                run.outcome = (state, status)
                self._logger.error(
                    "job %s ended %s but cannot be moved yet (%s); retrying",
                    run.job.job_id, state.value, exc,
                )  # fmt: skip
                return None
            run.leased = False  # moved: its lease went with the claim; no renewal after this
        with self._lock:
            self._active.pop(run.job.job_id, None)
        self._log_end(run, state, status)
        if state is JobState.PENDING and status.next_attempt_at and self._on_deferred:
            self._on_deferred(run.job.job_id, parse_rfc3339(status.next_attempt_at).timestamp())
        return final

    def _cancel_instead(self, run: ActiveRun, status: JobStatus, reason: str) -> JobState:
        """End as cancelled a job whose attempt sent it back to pending/ (a retry, a requeue)."""
        status.state = JobState.CANCELLED
        status.error, status.next_attempt_at = reason, None
        status.finished_at = status.attempts[-1].finished_at if status.attempts else None
        status.finished_at = status.finished_at or rfc3339(self._clock.now())
        with self._spool.jobs.open_log(run.job) as handle:
            JobLog(handle, self._clock, mask=run.masker.mask_text).error(
                f"{reason}: the job ends cancelled, with no further attempt"
            )
        return JobState.CANCELLED

    def _log_end(self, run: ActiveRun, state: JobState, status: JobStatus) -> None:
        """spoold's own log line for a job that ended, or whose attempt did (a retry follows)."""
        job_id, allowed = run.job.job_id, run.attempts_allowed
        attempt = status.attempts[-1] if status.attempts else None
        if attempt is not None and state is not JobState.PENDING:
            # None began (its job file was not the one validated): not an earlier attempt's.
            attempt = attempt if attempt.finished_at == status.finished_at else None
        number = 0 if attempt is None else attempt.number
        facts = _facts(status.exit_code, attempt, run.took)
        retryable = " (retryable)" if attempt is not None and attempt.retryable else ""
        # Masked by the job's own masker too: the literal values of its secret-named fields
        # (an api_token written into the file) are known to it alone, and an error may echo
        # them (a vendor's error page quoting the request).
        error = None if status.error is None else run.masker.mask_text(status.error)
        if state is JobState.PENDING and status.next_attempt_at:
            self._logger.warning(
                "job %s attempt %s %s%s (%s); retry: attempt %s due at %s", job_id,
                _of(number, allowed), _ended(JobState.FAILED, error, status.exit_code),
                retryable, facts or "no exit code", _of(number + 1, allowed),
                status.next_attempt_at,
            )  # fmt: skip
            return
        which = f"attempt {_of(number, allowed)}" if number else ""
        facts = ", ".join(filter(None, [facts, which]))
        if state is JobState.PENDING:
            self._logger.warning(
                "job %s interrupted (%s); back to pending (on_interrupt: requeue)", job_id, facts
            )
        elif state is JobState.SUCCEEDED:
            self._logger.info("job %s succeeded (%s)", job_id, facts)
        else:
            if state is JobState.CANCELLED and run.cancel_request is not None:
                error = cancel_words(run.cancel_request)  # who, and why if said
            self._logger.warning(
                "job %s %s%s (%s)", job_id, _ended(state, error, status.exit_code), retryable, facts
            )

    def _run(self, run: ActiveRun, status: JobStatus, log: JobLog, slot: str) -> JobState:
        job = run.job
        spec = self._load_spec(job, status)
        self._learn_secrets(run, spec.document)
        if self._callbacks is not None:
            run.callback = self._callbacks.target_of(spec.job_id, spec.document)
        run.attempts_allowed = spec.retry.attempts
        last = status.attempts[-1] if status.attempts else None
        if run.resume and last is not None and last.finished_at is None:
            attempt = last
            self._adopted(run, status, log)
        else:
            run.resume = False  # its attempt had ended (or none began): a new one starts
            attempt = status.begin_attempt(self._clock.now(), self._config.worker_id)
            run.began = self._clock.monotonic()
            status.generation = job.generation or 0
            if attempt.number > 1:
                self._logger.info(
                    "job %s attempt %s started (a retry)", job.job_id,
                    _of(attempt.number, run.attempts_allowed),
                )  # fmt: skip
            # Before anything of the job starts: every start must show in attempts, whatever
            # happens next. Not fsynced: after a power loss, recovery follows on_interrupt.
            with self._announce(run, "started", status):
                self._spool.jobs.write_status(job, _masked(run.masker, status.to_dict()))
            log.info(
                f"attempt {attempt.number} started on {self._config.hostname} by "
                f"{self._config.worker_id} ({spec.executor}{'/' + spec.type if spec.type else ''})"
            )
        workdir = run.workdir or self._lane.workdir_for(job.job_id, attempt.number)
        with run.lock:
            # Before anything of the attempt starts: what it starts, a next daemon adopts.
            run.workdir, run.lease["workdir"] = workdir, str(workdir)
            # And its job user: an adoption keeps it (``_adopted``), whichever slot adopts it.
            run.lease.setdefault("job_user", self._lane.job_user(slot))
            self._spool.jobs.write_lease(job, run.lease, first=not run.resume)
            run.leased, run.renewed = True, self._clock.monotonic()
            run.cut_off = self._cut_off() if spec.on_interrupt == "requeue" else None
        detached = False
        try:
            return self._execute(run, spec, status, log, workdir=workdir, slot=slot)
        except JobDetached:
            detached = True
            raise
        finally:
            if not detached:  # only declared artifacts are kept
                self._chore(run, Chore("remove", run.user, str(workdir)), log)
                self._remove_leftovers(run, log)

    def _remove_leftovers(self, run: ActiveRun, log: JobLog) -> None:
        """Remove what the attempt's job user made in the shared directories (SPEC 13: the
        next job of its slot, the same user, must not find it), and say so in its log."""
        if run.leftovers is None:
            return
        user, look = run.leftovers
        run.leftovers = None
        if not (changed := look.changed()):
            return  # the usual case: three stats, and no look inside
        chore = Chore("leftovers", user, ", ".join(changed), sweep=changed, since=look.since)
        found = self._chore(run, chore, log)
        if not isinstance(found, Leftovers) or not found.number:
            return
        more = found.number - len(found.names)
        what = ", ".join(found.names) + (f" and {more} more" if more else "")
        if found.busy is None:
            log.info(f"removed what the job left outside its work dir, as {user.name}: {what}")
        else:
            log.info(
                f"kept what the job left outside its work dir ({what}): {user.name} runs "
                f"another process (pid {found.busy}), which it may be of"
            )

    def _adopted(self, run: ActiveRun, status: JobStatus, log: JobLog) -> None:
        """Take over an attempt whose worker is gone: its work dir, status.json's ``worker``
        (this one's from now on, as the lease's), and a word in both logs."""
        number = status.attempts[-1].number
        old = self._spool.jobs.read_lease(run.job) or {}
        if isinstance(old.get("workdir"), str):
            run.workdir = Path(old["workdir"])
        # The user it runs as is the one it ran as, not this slot's: its work dir and its
        # processes are that user's. A lease of an older spoold names none: its work dir's
        # owner does, if a job user; else this slot's user it is (``_run``).
        if "job_user" in old:
            run.lease["job_user"] = old["job_user"]
        elif run.workdir is not None and (owner := self._lane.job_user_of(run.workdir)):
            run.lease["job_user"] = owner
        # Its process goes on: the new lease names it, for an end should its supervisor die.
        run.lease.update(job_pid=old.get("job_pid"), job_pid_start=old.get("job_pid_start"))
        gone = f"{old.get('worker')} (pid {old.get('pid')} on {old.get('host')})"
        log.info(
            f"attempt {number} adopted on {self._config.hostname} by {self._config.worker_id}: "
            f"its worker {gone} is gone; what it started goes on"
        )
        self._logger.warning("job %s adopted: attempt %s goes on (its worker %s is gone)",
                             run.job.job_id, number, gone)  # fmt: skip
        status.worker = self._config.worker_id
        try:
            self._spool.jobs.write_status(run.job, _masked(run.masker, status.to_dict()))
        except OSError as exc:  # a full disk: the job goes on; its end writes the worker too
            self._logger.warning("job %s: cannot record its adoption in status.json: %s",
                                 run.job.job_id, exc)  # fmt: skip

    def _cut_off(self) -> CutOff:
        """When a supervisor cut off from the spool ends a job another host would run again.

        That host finds the claim stale once its beat has stood still for ``lease_timeout``
        by its own clock, counted from when it first saw that beat: at the earliest when it
        was written. The supervisor sees a beat up to one interval after it was written, and
        looks once an interval; then SIGTERM, and SIGKILL ``kill_grace`` after; one interval
        more for the taker's own start. What is left of the lease for that, and no less than
        one interval (a lease too short for it: the unit ends as soon as it can)."""
        config = self._config
        beat = config.heartbeat_interval
        after = max(config.lease_timeout - 3 * beat - config.kill_grace, beat)
        record = self._spool.hosts.path(config.host_id)
        return CutOff(after, record, config.lease_timeout)

    def _chore(self, run: ActiveRun, chore: Chore, log: JobLog) -> Any:
        """Do file work on the job's work dir as its user; a failure is the job's error."""
        try:
            return self._launcher.chore(chore)
        except LauncherError as exc:
            log.error(str(exc))
            if chore.kind in ("remove", "leftovers"):  # after the job: its outcome stands
                self._logger.error("job %s: %s", run.job.job_id, exc)
                return None
            raise ExecutorError(str(exc)) from None

    def _announce(self, run: ActiveRun, event: str, status: JobStatus) -> Any:
        self._spool.jobs.check_fence(run.job)  # before its delivery is prepared
        if self._callbacks is None:
            return contextlib.nullcontext()
        mask = functools.partial(_masked, run.masker)
        return self._callbacks.announce(run.callback, event, status, mask)

    def _execute(
        self, run: ActiveRun, spec: JobSpec, status: JobStatus, log: JobLog, *, workdir: Path,
        slot: str,
    ) -> JobState:  # fmt: skip
        job = run.job
        attempt = status.attempts[-1]
        hooks: HookRunner | None = None
        processes = Supervised(
            self._launcher, self._spool.jobs, job, masker=run.masker,
            log_limit=self._config.max_log_size, host=self._config.hostname, resume=run.resume,
            log_socket=self._config.log_socket, meanwhile=run.meanwhile,
            beat_interval=self._config.heartbeat_interval, cut_off=run.cut_off,
        )  # fmt: skip
        try:
            job_user = run.lease.get("job_user", self._lane.job_user(slot))
            run_as = self._with_home(self._lane.user_named(job_user, spec.run_as), workdir)
            # The work dir is the job user's own for a job of processes here; spoold's,
            # readable by the hooks, for one whose executor brings files back from elsewhere.
            # Whoever owns it removes it, and opens the artifacts in it.
            local = self._registry.get(spec.executor).supervised if not spec.steps else True
            run.user = run_as if local else None
            if spec.run_as is None and run_as is not None and self._lane.sweeps(slot, run_as):
                # Before anything of the attempt runs (its hooks too, whatever its executor).
                run.leftovers = (run_as, _shared_look(run, attempt))
            spare = None if run.resume or self._workdirs is None else self._workdirs.take()
            mode = 0o700 if local else 0o755
            self._chore(run, Chore("mkdir", run.user, str(workdir), mode=mode, spare=spare), log)
            own = {name: self._fill(run, value, {}) for name, value in spec.variables.items()}
            env, _ = self._environment(job, workdir, attempt.number, own, run_as)
            hooks = self._hooks(run, spec, env, workdir=workdir, log=log, run_as=run_as,
                                processes=processes, attempt=attempt.number)  # fmt: skip
        except (SecretError, ExecutorError) as exc:
            log.error(str(exc))
            result = ExecResult(exit_code=None, error=str(exc))
        else:
            tries: dict[str, int] = {}
            unit = functools.partial(
                self._run_unit, run, workdir=workdir, run_as=run_as, attempt=attempt.number,
                processes=processes, job_key=status.identity,
            )  # fmt: skip

            step_usage = StepUsage(attempt.number, status.steps)

            def step_unit(step_id: str, step: JobSpec, section: JobLog) -> ExecResult:
                with run.lock:  # one thread per step: each step's tries are its own
                    tries[step_id] = tries.get(step_id, 0) + 1
                    key = f"{attempt.number}.{step_id}.{tries[step_id]}"
                ended = unit(step, section, key=key, step_id=step_id)
                step_usage.add(step_id, ended.usage)  # this step's entry, from its one thread
                return ended

            steps = None if not spec.steps else StepsRun(
                spec, previous=status.steps, log=log, clock=self._clock, cancel=run.cancel,
                parallel=self._config.workers, executor_limits=self._config.executor_limits,
                slots=self._slots, draw=self._draw, run_unit=step_unit,
                on_change=lambda records: self._steps_changed(run, status,
                                                            step_usage.onto(records)),
                adopted_from=attempt.started_at if run.resume else None,
                interrupted=lambda: run.interrupted,
            )  # fmt: skip
            if not hooks.run("pre_run", state="running", exit_code=None):
                result = ExecResult(exit_code=None, error="the pre_run hook failed")
                if steps is not None:  # every step says it did not run, and why
                    steps.not_run("the pre_run hook failed")
            elif steps is not None:
                result = dataclasses.replace(steps.run(), usage=step_usage.total())
            else:
                result = unit(spec, log, key=str(attempt.number))
            hooks.run("post_run", state="running", exit_code=result.exit_code)
        if result.interrupted:
            run.interrupted = True
        declared = spec.artifacts + tuple(
            ArtifactSpec(path=item["path"], type=item.get("type", "file"))
            for step in spec.steps
            for item in step.get("artifacts") or ()
        )
        status.artifacts = self._collect(run, workdir, declared, log)
        status.result = dict(result.result)
        state, error = self._outcome(run, spec, result)
        now = self._clock.now()
        # Ended while no daemon watched (adopted): its end as recorded, not this adoption's.
        ended = processes.ended_unwatched() or result.ended_at or now
        took = self._took(run) if ended is now else None
        if state is JobState.PENDING:
            log.error(f"{error}; the job goes back to pending (on_interrupt: requeue)")
        else:
            code = "" if result.exit_code is None else f" (exit code {result.exit_code})"
            (log.info if state is JobState.SUCCEEDED else log.error)(
                f"attempt {attempt.number} {_ended(state, error, result.exit_code)}{code}"
            )
        retry = spec.retry
        # The executor's word on its own failure, not on spoold's stop that ended the job.
        retryable = state is JobState.FAILED and not run.interrupted and result.retryable
        # Nothing of it ran (a full disk kept its start from being recorded): tried again
        # later, whatever its retries, as intake retries a file it could not take.
        not_started = state is JobState.FAILED and result.not_started
        if not_started or (
            state is JobState.FAILED and retry.should_retry(attempt.number, result.exit_code)
        ):
            wait = retry.delay(attempt.number, self._draw)
            if not_started:
                wait = max(wait, NOT_STARTED_WAIT)
            due = now + timedelta(seconds=wait)
            status.end_attempt(ended, JobState.PENDING, result.exit_code, error,
                               retryable=retryable, usage=result.usage, took=took)  # fmt: skip
            status.next_attempt_at = rfc3339(due)
            if not_started:
                log.info(f"it did not start: tried again in {format_duration(wait)}, at "
                         f"{status.next_attempt_at}")  # fmt: skip
                return JobState.PENDING
            log.info(
                f"retrying in {format_duration(wait)}: attempt {attempt.number + 1} of "
                f"{retry.attempts} is due at {status.next_attempt_at}"
            )
            return JobState.PENDING
        status.end_attempt(ended, state, result.exit_code, error, retryable=retryable,
                           usage=result.usage, took=took)  # fmt: skip
        if hooks is not None and state is not JobState.PENDING:  # the job's end, not an attempt's
            final = "on_success" if state is JobState.SUCCEEDED else "on_failure"
            hooks.run(final, state=state.value, exit_code=result.exit_code)
        return state

    def _run_unit(
        self,
        run: ActiveRun,
        unit: JobSpec,
        log: JobLog,
        *,
        key: str,
        workdir: Path,
        run_as: RunAs | None,
        attempt: int,
        processes: Supervised,
        job_key: str,
        step_id: str | None = None,
    ) -> ExecResult:
        """Run one executor once (the job's own, or one step's try) as unit ``key``."""
        job = run.job

        def on_start(pid: int | None) -> None:
            if pid is None or run.lease.get("job_pid") is not None:
                return  # an earlier step's: the claim is the job's, not a step's
            with run.lock:
                run.lease.update(job_pid=pid, job_pid_start=process_start_time(pid))

        try:
            executor = self._registry.create(unit.executor)
            product, env, job_env = self._resolve(
                run, unit, executor.script_fields, workdir, attempt, run_as=run_as
            )
        except (SecretError, ExecutorError) as exc:
            log.error(str(exc))
            return ExecResult(exit_code=None, error=str(exc))
        if step_id is not None:
            env["SPOOLD_STEP_ID"] = job_env["SPOOLD_STEP_ID"] = step_id
        ctx = RunContext(
            job_id=job.job_id,
            executor=unit.executor,
            type=unit.type,
            product=product,
            workdir=workdir,
            env=env,
            log=log,
            clock=self._clock,
            timeout=unit.timeout,
            kill_grace=self._config.kill_grace,
            cancel=run.cancel,
            before_script=self._config.global_before_script,
            on_start=on_start,
            limits=unit.limits,
            run_as=run_as,
            artifacts=unit.artifacts,
            job_env=job_env,
            settings=self._config.executor_settings.get(unit.executor, {}),
            unit_key=key,
            host=self._config.host_id,
            job_key=job_key,
            resume=run.resume,
            detach=run.detach,
            processes=processes,
            read_log=functools.partial(self._spool.jobs.read_log, job),
            secrets=dict(run.secrets),
        )
        if executor.supervised:  # its supervisor records the unit, and finds it again
            result = executor.run(ctx)
        else:
            if run.meanwhile is not None:  # it may run for long, here: nothing waits for it
                run.meanwhile()
            result = self._recorded(run, executor, ctx)
        if result.detached:
            raise JobDetached(f"unit {key} left running")
        return result

    def _recorded(self, run: ActiveRun, executor: Executor, ctx: RunContext) -> ExecResult:
        """Run a unit of an executor without a supervisor, recording its start and end, so
        that a next daemon neither runs it twice nor loses how it ended."""
        jobs, key = self._spool.jobs, ctx.unit_key
        begun, ended = jobs.read_unit(run.job, key) if run.resume else (None, None)
        if ended is not None:
            ctx.log.info(f"{executor.name} unit {key} had ended: its outcome is taken as recorded")
            return dataclasses.replace(_result_of(ended), usage=Usage.from_dict(ended.get("usage")),
                                       ended_at=_recorded_end(ended))  # fmt: skip
        if begun is not None and not executor.resumable:
            ctx.log.error(
                f"the {executor.name} work of unit {key} was under way when its worker was "
                "lost, and cannot be resumed"
            )
            return ExecResult(None, "interrupted while it ran", interrupted=True)
        if begun is None:
            jobs.begin_unit(run.job, key, {"executor": executor.name,
                                           "started_at": rfc3339(self._clock.now())})  # fmt: skip
        result = executor.run(dataclasses.replace(ctx, resume=begun is not None))
        if begun is not None:  # its wall time from its start, not from this adoption
            result = _not_below(resumed(result, begun, self._clock.now()), result.usage)
        if not result.detached:
            usage = None if result.usage is None else result.usage.to_dict()
            # What the executor said masked, as in status.json: the submitter's group reads
            # units/ too. Read back on adoption, masked it is what status.json shows anyway.
            record = _error_masked(run.masker, {**_record_of(result), "usage": usage})
            record["result"] = run.masker.mask_data(record["result"])
            # When it ended, for a daemon that adopts the job before its end is recorded.
            record["finished_at"] = rfc3339(result.ended_at or self._clock.now())
            try:
                jobs.end_unit(run.job, key, record)
            except OSError as exc:
                if not is_outage(exc):
                    raise
                # A shared spool cut off as the unit ended: its outcome is the attempt's all
                # the same, recorded with the job once the spool is back. The record is for a
                # next daemon's adoption; without it one finds the unit begun, and its
                # on_interrupt decides, as for a unit cut short.
        return result

    def _steps_changed(self, run: ActiveRun, status: JobStatus, steps: dict[str, Any]) -> None:
        """A step started or ended: status.json says so (not fsynced, like the running state)."""
        status.steps = steps
        self._spool.jobs.write_status(run.job, _masked(run.masker, status.to_dict()))

    def _hooks(
        self,
        run: ActiveRun,
        spec: JobSpec,
        env: dict[str, str],
        *,
        workdir: Path,
        log: JobLog,
        run_as: RunAs | None,
        processes: Supervised,
        attempt: int,
    ) -> HookRunner:
        """The job's hooks, with secrets reaching them as they reach its commands."""
        used: set[str] = set()
        commands = {name: refer_to_secrets(value, used) for name, value in spec.hooks.items()}
        env = {**env, **{secret_variable(name): self._secret(run, name) for name in used}}
        # The job's cancel ends a hook as it ends the job's own processes.
        return HookRunner(commands, env, workdir, log, self._clock, self._config.kill_grace,
                          spec.timeout, run_as, processes, attempt, run.detach,
                          cancel=run.cancel)  # fmt: skip

    def _outcome(
        self, run: ActiveRun, spec: JobSpec, result: ExecResult
    ) -> tuple[JobState, str | None]:
        if not result.succeeded and (reason := self._cancel_asked(run)) is not None:
            # A cancel, once asked for, wins over on_interrupt: requeue and over retries,
            # whatever the job did on its SIGTERM (exit 0 before it came is a success).
            return JobState.CANCELLED, reason
        if run.interrupted:
            why = run.why or (result.error if result.interrupted else None)
            if spec.on_interrupt == "requeue":
                return JobState.PENDING, f"interrupted: {why or 'spoold stopped'}"
            return JobState.FAILED, f"interrupted: {why or 'spoold stopped while the job ran'}"
        if result.succeeded:
            return JobState.SUCCEEDED, None
        if result.cancelled:
            return JobState.CANCELLED, run.cancel_reason or result.error
        return JobState.FAILED, result.failure

    def _load_spec(self, job: JobDir, status: JobStatus) -> JobSpec:
        with self._lock:
            document = self._documents.pop(job.job_id, None)
        if document is None:
            data = self._spool.jobs.read_job_file(job, sha256=status.sha256)
            document = load_document(data, status.source or "job.yaml")
        return JobSpec.from_document(document, job.job_id)

    def _collect(
        self, run: ActiveRun, workdir: Path, declared: tuple[ArtifactSpec, ...], log: JobLog
    ) -> list[dict[str, Any]]:
        """Copy the declared artifacts into artifacts/, each opened by the job's own user
        (never anything outside the work dir, never through a link), no more files opened
        than ``limits.max_artifacts``; what was left out said in one line."""
        if not declared:
            return []
        patterns = tuple((spec.path, spec.type) for spec in declared)
        collected = []
        store = self._spool.jobs.artifact_store(run.job, max_count=self._config.max_artifacts,
                                                max_size=self._config.max_artifacts_size)  # fmt: skip
        chore = Chore("artifacts", run.user, str(workdir), patterns,
                      max_files=self._config.max_artifacts)  # fmt: skip
        try:
            for found in self._launcher.artifacts(chore):
                if isinstance(found, str):
                    log.error(found)
                    continue
                if isinstance(found, ArtifactsLeft):
                    store.left_by_walk(found.reason, found.number, found.names, more=found.more,
                                       what=found.what)  # fmt: skip
                    continue
                relative, fd = found
                with open(fd, "rb") as source:
                    stored = store.store(relative, source)
                if stored is not None:
                    collected.append({"path": relative, "size": stored.stat().st_size,
                                      "sha256": _sha256(stored)})  # fmt: skip
        except (LauncherError, OSError) as exc:
            log.error(f"artifacts: {exc}")
        if (left_out := store.left_out()) is not None:
            log.error(left_out)
        if collected:
            log.info(f"kept {len(collected)} artifact(s)")
        return collected

    def _resolve(
        self,
        run: ActiveRun,
        spec: JobSpec,
        scripts: tuple[str, ...],
        workdir: Path,
        attempt: int,
        *,
        run_as: RunAs | None,
    ) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
        """The product with variables and secrets filled in, the job's environment on this
        host, and the part of it that is the job's own (for a container or another host).

        Secrets are read now, at run time, and masked from here on. Fields that are programs
        (``scripts``) get references instead of values: see ``refer_to_secrets``.
        """
        own = {name: self._fill(run, value, {}) for name, value in spec.variables.items()}
        env, variables = self._environment(run.job, workdir, attempt, own, run_as)
        used: set[str] = set()
        product = {
            key: refer_to_secrets(value, used)
            if key in scripts
            else self._fill(run, value, variables)
            for key, value in spec.product.items()
        }
        # As filled in, with what only now is known (the attempt, the work dir): masked too.
        self._learn_filled(run, product, "product")
        secrets = {secret_variable(name): self._secret(run, name) for name in sorted(used)}
        env.update(secrets)
        return product, env, {**variables, **secrets}

    def _fill(self, run: ActiveRun, value: Any, variables: dict[str, str]) -> Any:
        """``value`` with variables and secrets filled in (for fields that are not programs)."""
        return interpolate(value, variables, functools.partial(self._secret, run))

    def _secret(self, run: ActiveRun, name: str) -> str:
        """Read a secret for a job, masked from now on in its log and in spoold's own."""
        if (value := run.secrets.get(name)) is None:
            value = run.secrets[name] = self._secrets.read(name)
            run.masker.add(value)
            self._masker.add(value)
            self._warn_if_short(run, f"secret {name!r}", value)
        return value

    def _learn_secrets(self, run: ActiveRun, document: Mapping[str, Any]) -> None:
        """Mask the values of the job file's secret-named fields, wherever they are (products,
        steps, ``callback``, ``notify``, ``variables``): as written, and as ``${NAME}`` and
        ``${secret:NAME}`` fill them in, with the job's variables (a step's over them).

        Before anything of the job runs or is written: a field whose value comes from a
        variable (``api_token: ${TOK}``) is masked like one written out.
        """
        job_variables = self._filled_variables(run, document.get("variables"), {})
        for path, unit in units_of(document):  # the job, then each step (its own over the job's)
            own = self._filled_variables(run, unit.get("variables"), {}) if path else {}
            where = "".join(f"{part}." for part in path)  # "" or "steps.3."
            self._learn(run, unit, {**job_variables, **own}, where)

    def _filled_variables(
        self, run: ActiveRun, block: Any, variables: Mapping[str, str]
    ) -> dict[str, str]:
        """A ``variables:`` mapping filled in as ``_resolve`` fills it; one that cannot be
        (its secret unreadable: the attempt fails on it later) is left as written."""
        if not isinstance(block, Mapping):
            return {}
        filled = {}
        for name, value in block.items():
            text = value if isinstance(value, str) else str(value)
            filled[str(name)] = str(self._filled(run, text, variables))
        return filled

    def _filled(self, run: ActiveRun, text: str, variables: Mapping[str, str]) -> str:
        if "${" not in text:
            return text
        try:
            return str(interpolate(text, variables, functools.partial(self._secret, run)))
        except SecretError:  # said when the field is used, as the attempt's error
            return text

    def _learn(
        self,
        run: ActiveRun,
        data: Any,
        variables: Mapping[str, str],
        where: str,
        *,
        top: bool = True,
    ) -> None:
        """``_learn_secrets`` for ``data``, found at ``where`` (a job or a step, if ``top``)."""
        if not isinstance(data, Mapping):
            return
        for key, value in data.items():
            if top and key == "steps":
                continue  # each step with its own variables (``_learn_secrets``)
            name = f"{where}{key}"
            # A variable's value is filled in without the others, as it is for the job.
            among = {} if top and key == "variables" else variables
            if isinstance(key, str) and is_secret_field(key):
                for text in _strings(value):
                    self._learn_value(run, name, text)
                    self._learn_value(run, name, self._filled(run, text, among))
            elif isinstance(value, Mapping):
                self._learn(run, value, among, name + ".", top=False)
            elif isinstance(value, list | tuple):
                for index, item in enumerate(value):
                    self._learn(run, item, among, f"{name}.{index}.", top=False)

    def _learn_filled(self, run: ActiveRun, data: Any, where: str) -> None:
        """Mask the secret-named fields' values of ``data``, already filled in."""
        if isinstance(data, Mapping):
            for key, value in data.items():
                name = f"{where}.{key}"
                if isinstance(key, str) and is_secret_field(key):
                    for text in _strings(value):
                        self._learn_value(run, name, text)
                else:
                    self._learn_filled(run, value, name)
        elif isinstance(data, list | tuple):
            for index, item in enumerate(data):
                self._learn_filled(run, item, f"{where}.{index}")

    def _learn_value(self, run: ActiveRun, field_name: str, value: str) -> None:
        run.masker.add(value)
        if value.strip():
            self._warn_if_short(run, f"the value of {field_name}", value)

    def _warn_if_short(self, run: ActiveRun, what: str, value: str) -> None:
        """Say once per attempt and value that a secret is so short its masking gives it
        away; ``what`` names it (never the value)."""
        if len(value) >= SHORT_SECRET or value in run.short_warned:
            return
        run.short_warned.add(value)
        self._logger.warning(
            "job %s: %s is shorter than %d characters: it is masked as *** wherever it "
            "appears, inside other words too, so the text around each *** can tell what it "
            "is; use a longer secret", run.job.job_id, what, SHORT_SECRET,
        )  # fmt: skip

    def _with_home(self, run_as: RunAs | None, workdir: Path) -> RunAs | None:
        """The job's user with the HOME its processes get (``_account``)."""
        if run_as is None:
            return None
        home = self._account(run_as.uid, workdir)[1]
        return run_as if home == run_as.home else run_as._replace(home=home)

    def _account(self, uid: int, workdir: Path) -> tuple[str | None, str, str]:
        """The name, HOME and SHELL of the job's user ``uid``, from its passwd entry.

        HOME is the work dir when the account's home does not exist (a system account's
        ``/nonexistent``): a tool that keeps files in ~ then keeps them in the job's own
        place, removed with it, never in ``/`` or another job's.
        """
        if uid not in self._accounts:
            try:
                entry = pwd.getpwuid(uid)
            except KeyError:  # no passwd entry (an arbitrary uid in a container)
                self._accounts[uid] = None
            else:
                self._accounts[uid] = (entry.pw_name, entry.pw_dir, entry.pw_shell or "/bin/sh")
        account = self._accounts[uid]
        if account is None:
            return None, str(workdir), "/bin/sh"
        name, home, shell = account
        return name, home if home and Path(home).is_dir() else str(workdir), shell

    def _environment(
        self,
        job: JobDir,
        workdir: Path,
        attempt: int,
        own: dict[str, str],
        run_as: RunAs | None,
    ) -> tuple[dict[str, str], dict[str, str]]:
        """The environment of the job's processes on this host, and the part of it that is
        the job's own (its variables and spoold's about it).

        Not the daemon's: its PATH, locale and time zone, what the config's ``pass_env``
        names, and its user's HOME, USER, LOGNAME and SHELL; nothing else of the daemon's
        environment (credentials, systemd's socket) reaches a job.
        """
        builtins = {
            "JOB_ID": job.job_id,
            "SPOOLD_JOB_ID": job.job_id,
            "SPOOLD_ATTEMPT": str(attempt),
            "SPOOLD_JOB_DIR": job.location,
            "RUNNER_ID": self._config.worker_id,
            "RUNNER_HOSTNAME": self._config.hostname,
            "RUNNER_WORKDIR": str(workdir),
        }
        variables = {**builtins, **own}
        name, home, shell = self._account(os.geteuid() if run_as is None else run_as.uid, workdir)
        user = {"HOME": home, "SHELL": shell}
        if name is not None:
            user.update(USER=name, LOGNAME=name)
        return {**self._environ, **user, **variables}, variables


def job_base_environment(environ: Mapping[str, str], pass_env: Sequence[str]) -> dict[str, str]:
    """What every job gets of the daemon's environment ``environ``: PATH, ``PASSED_ENV``, and
    what the config's ``pass_env`` names (names or shell patterns; a pattern never passes
    ``DAEMON_ONLY_ENV``, a name does)."""
    env = {"PATH": environ.get("PATH") or DEFAULT_PATH}
    for name, value in environ.items():
        matches = functools.partial(fnmatch.fnmatchcase, name)
        if name in pass_env or (
            any(map(matches, (*PASSED_ENV, *pass_env))) and not any(map(matches, DAEMON_ONLY_ENV))
        ):
            env[name] = value
    return env


def _strings(value: Any) -> Iterable[str]:
    """The strings in ``value``, at any depth."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


def _take_cancel(run: ActiveRun, request: dict[str, Any]) -> None:
    run.cancel_request = request
    run.cancel_reason = cancel_reason(request)


def _ended(state: JobState, error: str | None, exit_code: int | None) -> str:
    """How an attempt or a job ended, in words: ``failed: timeout of 5s``, ``failed``.

    No doubled words: the caller adds the exit code, so the error's own mention of it is left
    out (``step b failed: exit code 4`` reads ``failed: step b failed``).
    """
    if state is JobState.SUCCEEDED:
        return "succeeded"
    if error is not None and exit_code is not None:
        error = re.sub(rf"(: )?\bexit code {exit_code}\b", "", error, count=1).strip() or None
    if error is None:
        return state.value
    if error.startswith(state.value):  # "cancelled by root on host1"
        return error
    return f"{state.value}: {error}"


def _facts(exit_code: int | None, attempt: Attempt | None, took: float | None) -> str:
    """``exit 3, 0.4 s``: what there is of an attempt's exit code and duration (``took``, as
    its worker measured it, else the attempt's own ``seconds``)."""
    facts = [] if exit_code is None else [f"exit {exit_code}"]
    if attempt is not None and attempt.finished_at is not None:
        seconds = took if took is not None else attempt.seconds()
        if seconds is not None:
            facts.append(f"{seconds:.1f} s" if seconds < 60 else format_duration(seconds))
    return ", ".join(facts)


def _not_below(result: ExecResult, measured: Usage | None) -> ExecResult:
    """A resumed unit's wall time, from a start another process stamped, is never less than
    what this process measured of it since the adoption (monotonic): less, and the wall
    clock stepped back between the two stamps."""
    usage, own = result.usage, None if measured is None else measured.wall_seconds
    if usage is None or own is None or (usage.wall_seconds or 0.0) >= own:
        return result
    return dataclasses.replace(result, usage=usage._replace(wall_seconds=own))


def _of(number: int, allowed: int) -> str:
    """``2 of 3`` while within what ``retry:`` allows, ``4`` beyond it (``spoold retry``)."""
    return f"{number} of {allowed}" if allowed > 1 and number <= allowed else str(number)


#: status.json's fields that are spoold's own words (ids, states, times, counts, digests),
#: read back as they are: never masked, where a short secret ("s") made "state" "***tate".
_OWN_FIELDS = frozenset({
    "job_id", "state", "executor", "type", "submitted_at", "started_at", "finished_at",
    "exit_code", "worker", "submitter", "submitter_uid", "sha256", "schedule",
    "log_lines_lost", "next_attempt_at", "priority", "concurrency", "callback_sequence",
    "callback_delivery", "generation",
})  # fmt: skip


def _shared_look(run: ActiveRun, attempt: Attempt) -> SharedLook:
    """The shared directories as the attempt began, or for one adopted, since its start."""
    if run.resume and attempt.started_at:
        return SharedLook.since_start(int(parse_rfc3339(attempt.started_at).timestamp() * 1e9))
    return SharedLook.look()


def _masked(masker: Masker, status: dict[str, Any]) -> dict[str, Any]:
    """status.json (or what a callback or notice is made of) as it may be written: no
    secret value in what a job, its executor or its submitter said (``error``s, ``result``,
    ``labels``, ``description``, ``artifacts``, ``source``, a log's tail), no secret-named
    field's value; spoold's own names and values as they are (``_OWN_FIELDS``, the attempts'
    and steps' records but their errors).

    spoold writes every field but ``result`` itself, and puts no secret into any: with no
    secret known and nothing from an executor, there is nothing to mask (the common case,
    and walking the document for nothing cost more than the rest of writing it).
    """
    if not masker and not status.get("result"):
        return status
    masked: dict[str, Any] = {}
    for name, value in status.items():
        if name in _OWN_FIELDS:
            masked[name] = value
        elif name == "attempts" and isinstance(value, list):
            masked[name] = [_error_masked(masker, attempt) for attempt in value]
        elif name == "steps" and isinstance(value, dict):
            masked[name] = {step: _error_masked(masker, record) for step, record in value.items()}
        else:
            masked[name] = masker.mask_data(value)
    return masked


def _error_masked(masker: Masker, record: Any) -> Any:
    """An attempt's or a step's record, its ``error`` masked: the rest is spoold's."""
    if not isinstance(record, dict) or not isinstance(record.get("error"), str):
        return record
    return {**record, "error": masker.mask_text(record["error"])}


def _record_of(result: ExecResult) -> dict[str, Any]:
    """A unit's end as its record keeps it (``_result_of`` reads it back)."""
    return {
        "exit_code": result.exit_code, "error": result.error, "timed_out": result.timed_out,
        "cancelled": result.cancelled, "result": result.result, "retryable": result.retryable,
        "interrupted": result.interrupted,
    }  # fmt: skip


def _recorded_end(record: dict[str, Any]) -> datetime | None:
    """When a unit ended, as its end record says; None if it does not say (an older one)."""
    try:
        return parse_rfc3339(str(record.get("finished_at")))
    except ValueError:
        return None


def _result_of(record: dict[str, Any]) -> ExecResult:
    code = record.get("exit_code")
    return ExecResult(
        code if isinstance(code, int) else None,
        record.get("error") if isinstance(record.get("error"), str) else None,
        timed_out=record.get("timed_out") is True,
        cancelled=record.get("cancelled") is True,
        result=dict(record.get("result") or {}),
        retryable=record.get("retryable") is True,
        interrupted=record.get("interrupted") is True,
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class WorkerPool:
    """Threads that claim jobs and run them, one per work slot.

    A slot records a job's outcome (fsync of status and log, the rename, a directory fsync)
    while its next job starts: once that job's first unit has been asked for, its process
    starts in its supervisor, on the other core, and the slot writes the record meanwhile; when
    no job waits, at once. One thread does both: a thread of its own for the records handed the
    interpreter lock back and forth with the slot at every system call (~42 futex calls a job,
    measured; ~4 now). ``on_done`` hears of every job a slot is done with, whatever became of it.
    """

    def __init__(
        self,
        runner: JobRunner,
        slots: Sequence[str],
        logger: logging.Logger,
        on_done: Callable[[str], None],
        clock: Clock,
    ) -> None:
        self._runner = runner
        self._logger = logger
        self._on_done = on_done
        self._clock = clock
        self._idle_since = clock.monotonic()  # when the last job here ended
        self._outage = Outage(logger, "worker slots")
        self._queue: deque[str] = deque()  # a deque, not a queue: revoke() takes jobs back
        self._known: set[str] = set()  # queued or running
        self._adopting: set[str] = set()  # of those, the ones to adopt rather than claim
        # Whose job user each slot's is while a job runs as it: a job runs as a free one, its
        # own slot's first; an adopted one keeps the one it ran as (the daemon names it).
        self._slot_names = tuple(slots)
        self._user_taken: dict[str, str] = {}  # slot whose user a job runs as -> the job
        self._user_given: dict[str, str] = {}  # an adoption's user's slot, as the daemon said
        self._cond = threading.Condition()  # guards the queue and the sets and maps above
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(
                target=self._loop, args=(slot,), name=f"spoold-slot-{slot}", daemon=True
            )
            for slot in slots
        ]

    @property
    def idle_since(self) -> float | None:
        """When its last job ended (``clock.monotonic``); None while one is queued or runs."""
        with self._cond:
            return None if self._known else self._idle_since

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, job_id: str, *, adopt: bool = False, slot: str | None = None) -> bool:
        """Queue a pending job (``adopt``: a running one whose worker is gone) unless it is
        queued or running already; ``slot``: the slot whose job user it runs as, if the
        daemon says (an adoption's, or a job's beside slots kept for adoptions)."""
        with self._cond:
            if job_id in self._known or self._stopping.is_set():
                return False
            self._known.add(job_id)
            if adopt:
                self._adopting.add(job_id)
            if slot is not None:
                self._user_given[job_id] = slot
            self._queue.append(job_id)
            self._cond.notify()
        return True

    def revoke(self) -> list[str]:
        """Take back the queued jobs no slot has started; return their ids."""
        with self._cond:
            taken = list(self._queue)
            self._queue.clear()
            self._known.difference_update(taken)
            for job_id in taken:
                self._user_given.pop(job_id, None)
        return taken

    def stop(self, grace: float, clock: Clock) -> None:
        """Take no more jobs; leave running ones that can outlive spoold running for the next
        daemon; let the others finish for ``grace`` seconds, then interrupt them. Each slot
        records its last outcome before it ends."""
        self._stopping.set()
        with self._cond:
            self._queue.clear()  # not started: they stay in pending/
            self._cond.notify_all()
        self._runner.detach_all()
        end = clock.monotonic() + grace
        for thread in self._threads:
            thread.join(max(end - clock.monotonic(), 0.0))
        if any(t.is_alive() for t in self._threads):
            count = self._runner.interrupt_all()
            self._logger.warning("interrupting %d running job(s) after %ss", count, grace)
            for thread in self._threads:
                thread.join()
        self._runner.drop_ahead()

    def _next(self, ended: _Unrecorded) -> str | None:
        """The next job to start; when none is queued, the last outcome is recorded first,
        then what the next jobs' starts would create is made ahead."""
        made = False
        while True:
            with self._cond:
                if self._stopping.is_set():
                    return None
                if self._queue:
                    return self._queue.popleft()
                if made and not ended.waiting:
                    self._cond.wait()
                    continue
            # Not under the lock: submit() must not wait for either.
            if ended.waiting:
                ended.record()
            else:
                self._runner.make_ahead(len(self._threads))
                made = True

    def _meanwhile(self, ended: _Unrecorded) -> None:
        """While a job's process starts: record the slot's last outcome, make ahead."""
        ended.record()
        self._runner.make_ahead(len(self._threads))

    def _loop(self, slot: str) -> None:
        ended = _Unrecorded(self._runner, self._logger)
        try:
            while (job_id := self._next(ended)) is not None:
                try:
                    # A spool error on one job must not end the worker; a shared spool cut
                    # off (EIO) is said once, not for each job handed over meanwhile: those
                    # wait in pending/ for a scan once it is back.
                    self._outage.call(functools.partial(self._work_on, job_id, slot, ended),
                                      f"worker failed on job {job_id}")  # fmt: skip
                finally:
                    with self._cond:
                        self._known.discard(job_id)
                        self._adopting.discard(job_id)
                        if not self._known:
                            self._idle_since = self._clock.monotonic()
                    self._on_done(job_id)
        finally:
            ended.record()

    def _work_on(self, job_id: str, slot: str, ended: _Unrecorded) -> None:
        adopt = job_id in self._adopting
        job = self._runner.adopt(job_id) if adopt else self._runner.claim(job_id)
        if job is None:
            return
        user = self._take_user(job_id, slot, adopt=adopt)
        try:
            outcome = self._runner.attempt(
                job, slot=user or slot, meanwhile=functools.partial(self._meanwhile, ended)
            )
        finally:
            with self._cond:
                if user is not None and self._user_taken.get(user) == job_id:
                    del self._user_taken[user]
        ended.record()  # if no unit of this attempt started, the last one's is still here
        if outcome is not None:
            ended.hold(outcome)

    def _take_user(self, job_id: str, slot: str, *, adopt: bool) -> str | None:
        """The slot whose job user a job runs as: the one the daemon named (an adoption's,
        or one it did not keep for an adoption); an adoption it named none for goes on as
        its lease says (None); else ``slot``'s own if no adopted job runs as it, or another
        free one (the adopted job's slot's)."""
        with self._cond:
            if job_id in self._user_given or adopt:
                user = self._user_given.pop(job_id, None)
            elif slot not in self._user_taken:
                user = slot
            else:
                user = next((s for s in self._slot_names if s not in self._user_taken), slot)
            if user is not None:
                self._user_taken[user] = job_id
            return user


class _Unrecorded:
    """The one outcome a slot has not recorded yet."""

    def __init__(self, runner: JobRunner, logger: logging.Logger) -> None:
        self._runner = runner
        self._logger = logger
        self._outcome: Outcome | None = None
        self._lock = threading.Lock()  # record() may come from an attempt's step threads

    @property
    def waiting(self) -> bool:
        return self._outcome is not None

    def hold(self, outcome: Outcome) -> None:
        with self._lock:
            assert self._outcome is None, "the last outcome is recorded before the next is held"
            self._outcome = outcome

    def record(self) -> None:
        """Record the outcome held, if any (each is recorded once, by whoever comes first)."""
        with self._lock:
            outcome, self._outcome = self._outcome, None
        if outcome is None:
            return
        try:
            self._runner.record(outcome)
        except Exception:  # retry_finishing picks up what was not recorded
            self._logger.exception("recording job %s failed", outcome.run.job.job_id)
