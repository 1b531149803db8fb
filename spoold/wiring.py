"""One way to wire: the parts every spoold process is built of, from one Config and one Clock.

The daemon (spoold.daemon), each of its worker processes (``serve_worker_process`` below) and
``spoold exec`` (spoold.oneshot) take their log, spool, executors, secrets, callbacks,
validator, job runner and lease heartbeat from ``Parts``; none builds one of those beside it.
Part of the composition root, and no heavier than a worker process needs: what only the daemon
runs (intake, watcher, scheduler, sender) is wired in spoold.daemon.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from spoold.core.clock import Clock, SystemClock
from spoold.core.config import Config
from spoold.core.own_log import configure_logging
from spoold.core.procfs import name_process
from spoold.core.secrets import Masker, SecretStore
from spoold.core.spool import Spool
from spoold.out.outbox import Callbacks, callbacks_for
from spoold.run import observed
from spoold.run.executor_slots import ExecutorSlots
from spoold.run.heartbeat import LeaseHeartbeat
from spoold.run.launcher import Launcher
from spoold.run.log_socket import LogTap
from spoold.run.observed import Observation
from spoold.run.pool import LinkedSlots, ParentLink, receive_setup, serve_jobs
from spoold.run.registry import ExecutorRegistry
from spoold.run.worker import JobRunner, WorkerPool

if TYPE_CHECKING:
    from spoold.intake.validation import JobValidator


@dataclass
class Parts:
    """What a spoold process is built of; ``build`` is the one place that knows how they fit."""

    config: Config
    clock: Clock
    logger: logging.Logger
    #: Every secret this process reads: its own log masks them too.
    masker: Masker
    secrets: SecretStore
    spool: Spool
    registry: ExecutorRegistry
    #: Writes the deliveries of the state changes made in this process into outbox/.
    callbacks: Callbacks

    @classmethod
    def build(
        cls,
        config: Config,
        clock: Clock | None = None,
        *,
        wake: Callable[[str], None] | None = None,
        executors: Iterable[tuple[str, str]] = (),
    ) -> Parts:
        """Configure the log and build the parts; ``wake`` hears of each name in outbox/ a
        delivery written here changed.
        ``executors``: the executors, each imported when first used (a worker process's:
        ``Setup.executors``); none: every entry point's, loaded and checked now."""
        clock = clock or SystemClock()
        masker = Masker()
        executors = tuple(executors)
        # Said once, by the main process: a worker process's would repeat it at each start.
        logger = configure_logging(config, masker, warn=not executors)
        spool = Spool(config.spool, durable=config.durable, host=config.host_id)
        registry = (
            ExecutorRegistry({}, executors) if executors else ExecutorRegistry.from_entry_points()
        )
        callbacks = callbacks_for(config, spool, clock, logger, wake=wake)
        secrets = SecretStore(config.secrets_dir)
        return cls(config, clock, logger, masker, secrets, spool, registry, callbacks)

    def validator(self) -> JobValidator:
        """The validator of job files, knowing every installed executor."""
        # Here, not at the top: a worker process never validates (jsonschema takes ~0.1 s).
        from spoold.intake.validation import job_validator  # noqa: PLC0415

        return job_validator(self.registry)

    def runner(
        self,
        *,
        daemon_pid: int | None = None,
        on_deferred: Callable[[str, float], None] | None = None,
        observe: Callable[[Observation], None] | None = None,
        slots: ExecutorSlots | None = None,
    ) -> JobRunner:
        """The job runner of this process (``daemon_pid``: the daemon's, in a worker process);
        ``observe`` hears of each change of state it makes (the metrics'); ``slots``: where
        its jobs' steps take their executors' slots (this process counts them if not given)."""
        listeners = () if observe is None else (observed.listener(observe, self.clock),)
        return JobRunner(
            self.spool, self.registry, self.config, self.clock, self.logger,
            daemon_pid=daemon_pid, on_deferred=on_deferred, secrets=self.secrets,
            masker=self.masker, tap=LogTap.open(self.config.log_socket), callbacks=self.callbacks,
            listeners=listeners, slots=slots,
        )  # fmt: skip

    def heartbeat(self, runner: JobRunner) -> LeaseHeartbeat:
        """The lease heartbeat of the jobs ``runner`` claims, from the config's intervals."""
        return LeaseHeartbeat(
            runner,
            every=self.config.heartbeat_interval,
            look=self.config.poll_interval,
            now=self.clock.monotonic(),
            logger=self.logger,
        )


#: What the daemon's worker processes run (spoold.run.pool.WorkerProcesses starts them).
WORKER_ENTRY = "spoold.wiring:serve_worker_process"


def serve_worker_process(fd: int) -> None:
    """The composition root of a worker process: ``fd`` is its end of the daemon's socket pair."""
    name_process("spoold-worker")  # in ps -o comm and top, before its threads take the name on
    received = receive_setup(fd)
    if received is None:
        return
    conn, setup = received
    parent = ParentLink(conn)
    told = parent.told if setup.tell else None
    parts = Parts.build(setup.config, executors=setup.executors, wake=told)
    if setup.launcher is not None:
        Launcher.share(socket.socket(fileno=setup.launcher))
    Launcher.shared().start()  # before Ready: the first job does not wait for a new Python
    observe = parent.observed if setup.observe else None
    slots = LinkedSlots(parent, setup.config.executor_limits)
    runner = parts.runner(
        daemon_pid=setup.parent, on_deferred=parent.deferred, observe=observe, slots=slots
    )
    pool = WorkerPool(runner, setup.slots, parts.logger, on_done=parent.done, clock=parts.clock)
    heartbeat = parts.heartbeat(runner)
    serve_jobs(
        conn, parent, runner, pool, heartbeat, launcher=Launcher.shared(), slots=slots,
        config=parts.config, clock=parts.clock, linger=setup.linger,
    )  # fmt: skip
