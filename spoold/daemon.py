"""The composition root: builds every part explicitly, then runs the daemon's loop."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from spoold.clock import Clock, SystemClock, parse_rfc3339, rfc3339
from spoold.config import Config
from spoold.control import JobControl
from spoold.dispatch import JobMeta
from spoold.due import DueJobs
from spoold.errors import SpooldError, SpoolError
from spoold.intake import Intake, IntakeThread
from spoold.logs import configure_logging
from spoold.outbox import Callbacks, callbacks_for
from spoold.plugins import ExecutorRegistry
from spoold.pool import WorkerProcesses
from spoold.recovery import Recovery
from spoold.retention import STATES, Retention
from spoold.scheduler import Scheduler
from spoold.sender import Sender
from spoold.spool import JobDir, Spool
from spoold.validation import JobValidator, load_base_schema
from spoold.watcher import InotifyWatcher, resolve_watch_mode


def job_validator(registry: ExecutorRegistry) -> JobValidator:
    """The validator for job files, knowing every installed executor."""
    checks = {name: registry.get(name).validate for name in registry.names()}
    return JobValidator.for_executors(load_base_schema(), registry.schemas(), checks=checks)


def sd_notify(message: str, env: dict[str, str] | None = None) -> None:
    """Tell systemd (Type=notify) about readiness; does nothing outside systemd."""
    address = (env if env is not None else os.environ).get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError:
            pass  # systemd went away; nothing to tell


@dataclass
class Daemon:
    """Every part of a running spoold, wired together."""

    config: Config
    clock: Clock
    logger: logging.Logger
    spool: Spool
    workers: WorkerProcesses
    intake_thread: IntakeThread
    recovery: Recovery
    watch_mode: str
    #: Set to wake the loop early: a worker process died, a retry was scheduled, or the
    #: daemon is stopping.
    attention: threading.Event
    #: Pending jobs waiting for a later attempt, handed to the workers once due.
    due: DueJobs
    #: The schedules in scheduled/, firing into pending/.
    scheduler: Scheduler
    #: Writes the deliveries of the state changes made in this process into outbox/.
    callbacks: Callbacks
    #: Posts what is in outbox/.
    sender: Sender
    #: Set (SIGUSR1) to look at incoming/ and pending/ now rather than at the next scan.
    rescan: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def build(cls, config: Config, *, clock: Clock | None = None) -> Daemon:
        """Build every part from the config: the one place that knows how they fit."""
        clock = clock or SystemClock()
        logger = configure_logging(config)
        spool = Spool(config.spool, durable=config.durable)
        spool.check()
        if problems := spool.unsafe_permissions():
            # A job written into pending/ by someone else would run unvalidated, as spoold.
            raise SpoolError("refusing to run: others could write jobs; " + "; ".join(problems))
        registry = ExecutorRegistry.from_entry_points()
        attention = threading.Event()
        due = DueJobs()

        def defer(job_id: str, when: float) -> None:
            due.add(job_id, when)
            attention.set()  # the loop's next wake-up may have to come sooner

        outbox_changed = threading.Event()
        callbacks = callbacks_for(config, spool, clock, logger, wake=outbox_changed.set)
        sender = Sender(spool, callbacks, clock, config.callbacks, logger,
                        poll_interval=config.poll_interval, wake=outbox_changed)  # fmt: skip
        control = JobControl(spool, clock, who=f"spoold on {config.hostname}", callbacks=callbacks)

        def cancel(job_id: str, why: str) -> None:
            try:
                control.cancel(job_id, reason=why)
                logger.info("job %s cancelled: %s", job_id, why)
            except SpooldError as exc:  # it moved on (ran, or was cancelled): nothing to undo
                logger.warning("job %s could not be cancelled (%s): %s", job_id, why, exc)

        workers = WorkerProcesses(
            config,
            logger,
            processes=config.worker_processes or os.cpu_count() or 1,
            on_lost=attention.set,
            on_deferred=defer,
            on_cancel=cancel,
        )
        watch_mode = resolve_watch_mode(config.watch, spool.dir("incoming"))

        def queue_job(job: JobDir, document: dict[str, Any]) -> None:
            workers.submit(job.job_id, document)

        scheduler = Scheduler(
            spool, clock, logger, defer=defer, cancel=cancel,
            queue=workers.submit, callbacks=callbacks,
        )  # fmt: skip

        intake = Intake(
            spool,
            job_validator(registry),
            clock,
            max_file_size=config.max_file_size,
            settle_time=config.settle_time,
            on_accepted=queue_job,
            logger=logger,
            allowed_run_as=config.allowed_run_as,
            on_scheduled=lambda job: scheduler.sync(),
            callbacks=callbacks,
        )
        intake_thread = IntakeThread(intake, logger, remote_writers=watch_mode == "poll")
        executors = [registry.get(name) for name in registry.names()]
        recovery = Recovery(spool, config, clock, logger, callbacks=callbacks, executors=executors)
        return cls(
            config, clock, logger, spool, workers, intake_thread, recovery, watch_mode, attention,
            due, scheduler, callbacks, sender,
        )  # fmt: skip

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; return the process exit code."""
        stop = threading.Event()
        self._install_signals(stop)
        lock = self.spool.lock_host(self.config.hostname)
        watcher: InotifyWatcher | None = None
        try:
            self._recover()
            self.sender.start()
            self.workers.start()
            self.scheduler.start()  # after the workers: what was missed may be queued at once
            self.intake_thread.start()
            if self.watch_mode == "inotify":
                watcher = InotifyWatcher(
                    self.spool.dir("incoming"),
                    self.intake_thread.arrived,
                    self.intake_thread.request_sweep,
                    self.logger,
                )
                watcher.start()
            self.intake_thread.request_sweep()
            self.logger.info(
                "spoold running on %s: %d worker(s) in %d process(es), watching by %s",
                self.spool.root, self.config.workers, self.workers.processes, self.watch_mode,
            )  # fmt: skip
            sd_notify("READY=1")
            self._loop(stop)
        finally:
            sd_notify("STOPPING=1")
            self.logger.info(
                "stopping: no new jobs; running jobs get %ss", self.config.shutdown_grace
            )
            if watcher is not None:
                watcher.stop()
            self.intake_thread.stop()
            self.scheduler.stop()
            self.workers.stop(self.config.shutdown_grace)
            self.sender.stop()
            lock.close()
            self.logger.info("stopped")
        return 0

    def _loop(self, stop: threading.Event) -> None:
        """Periodic duties: scans that back up the watcher, lost-claim recovery, dead workers.

        Leases are kept alive by the worker processes that hold them.
        """
        scan_every = (
            self.config.poll_interval if self.watch_mode == "poll" else self.config.rescan_interval
        )
        next_scan = self.clock.monotonic() + scan_every
        next_retention = self.clock.monotonic()  # once at start, then hourly
        while not stop.is_set():
            wait = min(next_scan, next_retention) - self.clock.monotonic()
            if (due := self.due.next_due()) is not None:
                wait = min(wait, due - self.clock.now().timestamp())
            self.attention.wait(max(wait, 0.0))
            self.attention.clear()
            if stop.is_set():
                return
            if self.workers.lost_any():
                self._duty(self._replace_workers)
            for job_id in self.due.pop_due(self.clock.now().timestamp()):
                self.workers.submit(job_id, meta=self._meta(job_id))
            now = self.clock.monotonic()
            if self.rescan.is_set():
                self.rescan.clear()
                next_scan = now  # at once, as if its time had come
            if now >= next_retention:
                self._duty(self.apply_retention)
                next_retention = now + RETENTION_EVERY
            if now >= next_scan:
                self.intake_thread.request_sweep()
                self._duty(self.scheduler.sync)  # `spoold unschedule` on any host
                self._duty(self._queue_pending)
                self._duty(lambda: self.recovery.reap(own_runs=self.workers.in_flight()))
                next_scan = now + scan_every

    def apply_retention(self, retention: Retention | None = None) -> int:
        """Remove the finished jobs ``retention`` (the config's) says to; return how many."""
        removed = apply_retention(self.spool, retention or self.config.retention, self.clock)
        if removed:
            self.logger.info("retention: removed %d finished job(s)", removed)
        return removed

    def _meta(self, job_id: str) -> JobMeta:
        """A pending job's priority and concurrency, as its status.json kept them."""
        return JobMeta.from_document(self._pending_status(self.spool.find(job_id)))

    def _pending_status(self, job: JobDir | None) -> dict[str, Any]:
        """A pending job's status.json; {} if it is gone or unreadable (its worker finds out)."""
        if job is None:
            return {}
        try:
            return self.spool.read_status(job)
        except (OSError, SpooldError, ValueError):
            return {}

    def _replace_workers(self) -> None:
        lost = self.workers.replace_dead()
        self._reap()  # their leases name a dead pid now: those jobs end or requeue at once
        if lost:
            self._queue_pending()

    def _duty(self, duty: Callable[[], object]) -> None:
        """Run one periodic duty; its failure is logged and the daemon goes on."""
        try:
            duty()
        except Exception:
            self.logger.exception("unexpected failure in a periodic duty; retrying next time")

    def _recover(self) -> None:
        self.spool.sync_tree()
        # Before the stages: a prepared rejection is decided by whether its stage is one.
        made, dropped = self.callbacks.settle_all()
        if made or dropped:
            self.logger.warning(
                "recovery: %d callback(s) of changes made before a crash queued, %d of "
                "changes not made dropped", made, dropped,
            )  # fmt: skip
        for line in self.spool.recover_stages():
            self.logger.warning("recovery: %s", line)
        self.recovery.repair_pending()
        self._reap()
        self._queue_pending()

    def _reap(self) -> None:
        for job in self.recovery.reap(own_runs=self.workers.in_flight()):
            self.logger.warning("recovery: job %s is now in %s/", job.job_id, job.directory)

    def _queue_pending(self) -> None:
        """Hand the workers every pending job they do not hold, unless it waits for a retry."""
        now = self.clock.now().timestamp()
        for job in self.spool.list_jobs("pending"):
            if job.job_id in self.due or self.workers.holds(job.job_id):
                continue
            status = self._pending_status(job)
            due = status.get("next_attempt_at")
            when = parse_rfc3339(due).timestamp() if isinstance(due, str) else None
            if when is not None and when > now:
                self.due.add(job.job_id, when)
                self.logger.info(
                    "job %s waits for its next attempt, due at %s",
                    job.job_id, rfc3339(datetime.fromtimestamp(when, UTC)),
                )  # fmt: skip
            else:
                self.workers.submit(job.job_id, meta=JobMeta.from_document(status))

    def _install_signals(self, stop: threading.Event) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def request_stop(signum: int, _frame: FrameType | None) -> None:
            self.logger.info("received %s", signal.Signals(signum).name)
            stop.set()
            self.attention.set()

        def request_rescan(signum: int, _frame: FrameType | None) -> None:
            self.rescan.set()  # `spoold retry` put a job back into pending/
            self.attention.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGUSR1, request_rescan)
        # A lease-break notice (SIGIO) would kill the process by default; leases are only
        # held for microseconds, but the default must never apply.
        signal.signal(signal.SIGIO, signal.SIG_IGN)


#: How often the retention rules are applied (also once at start).
RETENTION_EVERY = 3600.0


def apply_retention(spool: Spool, retention: Retention, clock: Clock) -> int:
    """Remove the finished jobs ``retention`` says to; return how many were removed."""
    if not retention.active:
        return 0
    removed = 0
    now = clock.now().timestamp()
    for state in STATES:
        entered = spool.entered_times(state)
        jobs = {job.job_id: job for job, _ in entered}

        def executor_of(job_id: str, jobs: dict[str, JobDir] = jobs) -> str | None:
            try:
                found = spool.read_status(jobs[job_id])
            except (OSError, SpooldError, ValueError):
                return None
            return str(found.get("executor") or "") or None

        ages = [(job.job_id, when) for job, when in entered]
        for job_id in retention.expired(state, ages, now, executor_of):
            with contextlib.suppress(FileNotFoundError):
                spool.purge(jobs[job_id])
                removed += 1
    return removed


def detach(pidfile: Path | None) -> None:
    """Become a background daemon (``spoold run --daemon``) with python-daemon."""
    import daemon  # noqa: PLC0415 - only --daemon needs it
    import daemon.pidfile  # noqa: PLC0415

    context = daemon.DaemonContext(
        working_directory=str(Path.cwd()),
        umask=0o027,
        pidfile=daemon.pidfile.TimeoutPIDLockFile(str(pidfile)) if pidfile else None,
        stderr=None,
    )
    context.open()
