"""The composition root: builds every part explicitly, then runs the daemon's loop."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from spoold.clock import Clock, SystemClock
from spoold.config import Config
from spoold.intake import Intake, IntakeThread
from spoold.plugins import ExecutorRegistry
from spoold.recovery import Recovery
from spoold.spool import JobDir, Spool
from spoold.validation import JobValidator, compose_job_schema, load_base_schema
from spoold.watcher import InotifyWatcher, resolve_watch_mode
from spoold.worker import JobRunner, WorkerPool


def job_validator(registry: ExecutorRegistry) -> JobValidator:
    """The validator for job files, knowing every installed executor."""
    return JobValidator(compose_job_schema(load_base_schema(), registry.schemas()))


def configure_logging(config: Config) -> logging.Logger:
    """spoold's own log: standard error (journald under systemd), and logdir/spoold.log if set."""
    logger = logging.getLogger("spoold")
    logger.setLevel(config.log_level.upper())
    logger.propagate = False
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if config.logdir is not None:
        config.logdir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(config.logdir / "spoold.log"))
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger


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
    runner: JobRunner
    pool: WorkerPool
    intake_thread: IntakeThread
    recovery: Recovery
    watch_mode: str

    @classmethod
    def build(cls, config: Config, *, clock: Clock | None = None) -> Daemon:
        """Build every part from the config: the one place that knows how they fit."""
        clock = clock or SystemClock()
        logger = configure_logging(config)
        spool = Spool(config.spool, durable=config.durable)
        spool.check()
        registry = ExecutorRegistry.from_entry_points()
        runner = JobRunner(spool, registry, config, clock, logger)
        pool = WorkerPool(runner, config.workers, logger)
        watch_mode = resolve_watch_mode(config.watch, spool.dir("incoming"))

        def queue_job(job: JobDir, document: dict[str, Any]) -> None:
            runner.remember(job.job_id, document)
            pool.submit(job.job_id)

        intake = Intake(
            spool,
            job_validator(registry),
            clock,
            max_file_size=config.max_file_size,
            settle_time=config.settle_time,
            on_accepted=queue_job,
            logger=logger,
        )
        intake_thread = IntakeThread(intake, logger, remote_writers=watch_mode == "poll")
        recovery = Recovery(spool, config, clock, logger)
        return cls(config, clock, logger, spool, runner, pool, intake_thread, recovery, watch_mode)

    def run(self, stop: threading.Event | None = None) -> int:
        """Run until SIGTERM/SIGINT (or ``stop`` is set); return the process exit code."""
        stop = stop or threading.Event()
        self._install_signals(stop)
        lock = self.spool.lock_host(self.config.hostname)
        watcher: InotifyWatcher | None = None
        try:
            self._recover()
            self.pool.start()
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
                "spoold running on %s: %d worker(s), watching by %s",
                self.spool.root, self.config.workers, self.watch_mode,
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
            self.pool.stop(self.config.shutdown_grace, self.clock)
            lock.close()
            self.logger.info("stopped")
        return 0

    def _loop(self, stop: threading.Event) -> None:
        """Periodic duties: scans that back up the watcher, heartbeats, lost-claim recovery."""
        scan_every = (
            self.config.poll_interval if self.watch_mode == "poll" else self.config.rescan_interval
        )
        heartbeat_every = self.config.heartbeat_interval
        now = self.clock.monotonic()
        next_scan, next_heartbeat = now + scan_every, now + heartbeat_every
        while not stop.wait(max(min(next_scan, next_heartbeat) - self.clock.monotonic(), 0.0)):
            now = self.clock.monotonic()
            if now >= next_heartbeat:
                self._duty(self.runner.renew_leases)
                self._duty(self.runner.retry_finishing)
                next_heartbeat = now + heartbeat_every
            if now >= next_scan:
                self.intake_thread.request_sweep()
                self._duty(self._queue_pending)
                self._duty(lambda: self.recovery.reap(own_runs=frozenset(self.runner.active_ids())))
                next_scan = now + scan_every

    def _duty(self, duty: Callable[[], object]) -> None:
        """Run one periodic duty; its failure is logged and the daemon goes on."""
        try:
            duty()
        except Exception:
            self.logger.exception("unexpected failure in a periodic duty; retrying next time")

    def _recover(self) -> None:
        for line in self.spool.recover_stages():
            self.logger.warning("recovery: %s", line)
        self.recovery.repair_pending()
        for job in self.recovery.reap():
            self.logger.warning("recovery: job %s is now in %s/", job.job_id, job.directory)
        self._queue_pending()

    def _queue_pending(self) -> None:
        for job in self.spool.list_jobs("pending"):
            self.pool.submit(job.job_id)

    def _install_signals(self, stop: threading.Event) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def request_stop(signum: int, _frame: FrameType | None) -> None:
            self.logger.info("received %s", signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        # A lease-break notice (SIGIO) would kill the process by default; leases are only
        # held for microseconds, but the default must never apply.
        signal.signal(signal.SIGIO, signal.SIG_IGN)


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
