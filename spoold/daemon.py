"""The daemon: builds its parts (those every spoold process has come from spoold.wiring),
then runs its loop, whose rounds (``Daemon.tick``) take the time they run at."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from spoold.core.clock import Clock, SystemClock, parse_rfc3339, rfc3339
from spoold.core.config import Config, changed_keys, load_config
from spoold.core.errors import ConfigError, SpooldError, SpoolError
from spoold.core.outage import Outage
from spoold.core.own_log import _log_file, reopen_logging
from spoold.core.procfs import started_at, this_machine
from spoold.core.retention import Retention, apply_retention
from spoold.core.spool import DirectoryCount, JobDir, Spool
from spoold.core.spool.fs import SETTLE
from spoold.core.wakeup import Wakeup
from spoold.intake.incoming import Intake, IntakeThread
from spoold.intake.watcher import ChangeWatch, InotifyWatcher, resolve_watch_mode
from spoold.out.notify import Notifier
from spoold.out.outbox import Callbacks
from spoold.out.sender import Sender
from spoold.run.control import JobControl
from spoold.run.dispatch import JobMeta
from spoold.run.due import DueJobs, scheduled_wait
from spoold.run.hostbeat import HostBeat
from spoold.run.lane import Lane
from spoold.run.observed import listener as observed_listener
from spoold.run.pool import WorkerProcesses
from spoold.run.process import remove_empty_run_cgroups
from spoold.run.recovery import Recovery
from spoold.schedule.scheduler import Scheduler
from spoold.wiring import WORKER_ENTRY, Parts

if TYPE_CHECKING:
    from spoold.face.api.server import ApiServer
    from spoold.face.catalogue import Catalogue
    from spoold.face.metrics import Metrics
    from spoold.run.ledger import Listener
    from spoold.run.observed import Observation


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


#: STATUS= is sent at most this often (seconds) while the daemon runs, and only on a change.
STATUS_EVERY = 2.0


class Systemd:
    """What spoold tells systemd (Type=notify): readiness, status lines and watchdog pings.

    Does nothing outside systemd (no NOTIFY_SOCKET). Pings go at half of WATCHDOG_USEC, and only
    from the daemon's loop: a loop that hangs stops pinging, and systemd restarts spoold.
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._env = dict(os.environ if env is None else env)
        self.watchdog_interval = _watchdog_interval(self._env)
        self._next_ping = 0.0
        self._status = ""
        self._status_sent = float("-inf")

    def notify(self, message: str) -> None:
        """Send one notification (``READY=1``, ``STOPPING=1``, ...)."""
        sd_notify(message, self._env)

    def status(self, text: str, now: float, *, force: bool = False) -> bool:
        """``STATUS=text`` if it changed, at most every STATUS_EVERY seconds unless ``force``.

        A forced line (a phase: recovering, waiting for a host record, stopping) does not count
        against the next line: the loop's first report replaces "recovering" at once.
        Returns whether it was new (and sent, if systemd listens).
        """
        if text == self._status or (not force and now < self._status_sent + STATUS_EVERY):
            return False
        self._status = text
        if not force:
            self._status_sent = now
        self.notify(f"STATUS={text}")
        return True

    def ping(self, now: float) -> None:
        """``WATCHDOG=1`` if the watchdog is on and half its interval has passed."""
        if self.watchdog_interval is not None and now >= self._next_ping:
            self.notify("WATCHDOG=1")
            self._next_ping = now + self.watchdog_interval

    def next_wake(self, now: float) -> float:
        """Seconds until the loop must run again for the next ping (inf without a watchdog)."""
        if self.watchdog_interval is None:
            return float("inf")
        return max(self._next_ping - now, 0.0)


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of WATCHDOG_USEC in seconds, if the watchdog is meant for this process."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 1e6 / 2


def lock_holder(spool: Spool, host: str) -> str:
    """Who holds the daemon lock of ``spool`` on ``host``: pid and since when, as far as known."""
    holder = spool.host_lock.daemon_on(host)
    if holder is None:
        return f"another spoold on {host} already runs on {spool.root}"
    pid, ticks = holder
    since = started_at(ticks)
    when = f", running since {rfc3339(since)}" if since is not None else ""
    return f"another spoold on {host} already runs on {spool.root}: pid {pid}{when}"


#: The config keys a SIGHUP applies at once; every other key needs a restart.
RELOADABLE = ("log_level", "poll_interval", "rescan_interval", "retention", "shutdown_grace")


class Workers(Protocol):
    """What the daemon asks of its workers: WorkerProcesses, or a test's double in process."""

    @property
    def processes(self) -> int: ...

    def start(self) -> None: ...

    def stop(self, grace: float) -> None: ...

    def submit(
        self,
        job_id: str,
        document: dict[str, Any] | None = None,
        meta: JobMeta | None = None,
        *,
        adopt: bool = False,
        user: str | None = None,
    ) -> bool: ...

    def holds(self, job_id: str) -> bool: ...

    def held(self) -> frozenset[str]: ...

    def in_flight(self) -> frozenset[str]: ...

    def lost_any(self) -> bool: ...

    def replace_dead(self) -> list[str]: ...


@runtime_checkable
class ClaimHolder(Protocol):
    """Workers that count the claims a previous daemon left running against their limits
    (WorkerProcesses; a test's double that models no limits has nothing to count)."""

    def hold_claims(
        self, claims: Mapping[str, JobMeta], users: Mapping[str, str | None] | None = None
    ) -> None: ...

    def held_claims(self) -> frozenset[str]: ...


class MakeWorkers(Protocol):
    """Builds the daemon's workers from its parts, with what they tell the daemon."""

    def __call__(
        self,
        parts: Parts,
        *,
        on_lost: Callable[[], None],
        on_deferred: Callable[[str, float], None],
        on_cancel: Callable[[str, str], None],
        on_observed: Callable[[Observation], None] | None = None,
        on_started: Callable[[], None] | None = None,
        on_told: Callable[[str], None] | None = None,
    ) -> Workers: ...


def worker_processes(
    parts: Parts,
    *,
    on_lost: Callable[[], None],
    on_deferred: Callable[[str, float], None],
    on_cancel: Callable[[str, str], None],
    on_observed: Callable[[Observation], None] | None = None,
    on_started: Callable[[], None] | None = None,
    on_told: Callable[[str], None] | None = None,
) -> WorkerProcesses:
    """The daemon's workers: processes of their own, each built by ``WORKER_ENTRY``."""
    config = parts.config
    return WorkerProcesses(
        config,
        parts.logger,
        processes=config.worker_processes or os.cpu_count() or 1,
        entry=WORKER_ENTRY,
        clock=parts.clock,
        on_lost=on_lost,
        on_deferred=on_deferred,
        on_cancel=on_cancel,
        on_observed=on_observed,
        on_started=on_started,
        on_told=on_told,
        executors=parts.registry.references(),
    )


def stop_words(grace: float, held: Sequence[str] | None, running: int) -> str:
    """What a stopping daemon says it does with its jobs: ``held``, the executors whose jobs
    cannot outlive it and get ``grace`` (None: not known); other jobs go on for its next start."""
    if not running:
        return "stopping: no new jobs; none running"
    others = "the others go on for the next start"
    if held is None:
        said = f"jobs that cannot outlive spoold get {grace:g}s, {others}"
    elif not held:
        said = "running jobs go on for the next start"
    else:
        names = held[0] if len(held) == 1 else ", ".join(held[:-1]) + " and " + held[-1]
        executors = "executor" if len(held) == 1 else "executors"
        said = f"jobs of the {names} {executors} get {grace:g}s, {others}"
    return f"stopping: no new jobs; {said}"


@dataclass
class Daemon:
    """Every part of a running spoold, wired together."""

    config: Config
    clock: Clock
    logger: logging.Logger
    spool: Spool
    workers: Workers
    intake_thread: IntakeThread
    recovery: Recovery
    watch_mode: str
    #: Set to wake the loop early: a worker process died, a retry was scheduled, or the
    #: daemon is stopping (a signal: ``Wakeup``, which a handler may set).
    attention: Wakeup
    #: Pending jobs waiting for a later attempt, handed to the workers once due.
    due: DueJobs
    #: The schedules in scheduled/, firing into pending/.
    scheduler: Scheduler
    #: Writes the deliveries of the state changes made in this process into outbox/.
    callbacks: Callbacks
    #: Posts what is in outbox/.
    sender: Sender
    #: Takes files in from incoming/ (on the intake threads, or a test's own).
    intake: Intake
    #: Sends the notifications in outbox/ (mail, chat), folded per target and window.
    notifier: Notifier | None = None
    #: Set (SIGUSR1) to look at incoming/ and pending/ now rather than at the next scan.
    rescan: Wakeup = field(default_factory=Wakeup)
    #: Set (SIGHUP) to read the config file again.
    reload: Wakeup = field(default_factory=Wakeup)
    #: Readiness, status and watchdog pings for systemd.
    systemd: Systemd = field(default_factory=Systemd)
    #: This host's heartbeat in hosts/, and its view of the other hosts sharing the spool.
    hostbeat: HostBeat | None = None
    #: What ``run`` returns: 2 when it stopped for another daemon serving as this host.
    exit_code: int = 0
    #: Whether it was started with ``--daemon``: a reload then checks what ``check_detach`` does.
    detached: bool = False
    #: The HTTP API, when the config enables it (``api:``), and what it reads of the changes.
    api: ApiServer | None = None
    seen: _Seen | None = None
    #: The executors whose jobs cannot outlive the daemon, which a stop gives
    #: ``shutdown_grace``; other jobs go on for the next start. None: not known.
    held_at_stop: tuple[str, ...] | None = None
    #: When ``tick`` scans, applies retention and reports status next (monotonic; None until
    #: the first round).
    _next_scan: float | None = field(default=None, init=False, repr=False)
    _next_retention: float = field(default=0.0, init=False, repr=False)
    _next_sweep: float = field(default=0.0, init=False, repr=False)
    #: The executors' periodic sweep under way, if any (``_sweep_executors``).
    sweeping: threading.Thread | None = field(default=None, init=False, repr=False)
    _next_status: float = field(default=0.0, init=False, repr=False)
    _outage: Outage = field(init=False, repr=False)
    #: pending/'s count for the status line, listed again only when it may have changed.
    _pending_count: DirectoryCount = field(init=False, repr=False)
    #: The inotify watches of incoming/ and outbox/ (None while polled, or before ``run``).
    _incoming_watch: InotifyWatcher | None = field(default=None, init=False, repr=False)
    _outbox_watch: ChangeWatch | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._outage = Outage(self.logger, "periodic duties")
        self._pending_count = DirectoryCount(self.spool, "pending", settle=SETTLE)

    @classmethod
    def build(
        cls,
        config: Config,
        *,
        clock: Clock | None = None,
        make_workers: MakeWorkers = worker_processes,
    ) -> Daemon:
        """Build the daemon from the config: the parts every process has (spoold.wiring), and
        those only the daemon runs. ``make_workers``: its worker processes, unless a test's."""
        notices_changed = threading.Event()

        def outbox_written(name: str) -> None:
            # By name, as outbox/'s watch tells it: a spool that is polled (no watch) would
            # otherwise hold a delivery committed here until the sender's next poll.
            sender.changed(name)
            notices_changed.set()

        parts = Parts.build(config, clock or SystemClock(), wake=outbox_written)
        clock, logger, spool, callbacks = parts.clock, parts.logger, parts.spool, parts.callbacks
        check_spool(spool)
        if reserved := spool.reservations.ensure():
            logger.info("reserved the ids of %d existing job(s) in %s", reserved, spool.dir("ids"))
        # Here, once: a job user that does not exist stops spoold at start, not each job.
        lane = Lane.from_config(config, spool.jobs.work_root)
        for note in lane.notes:
            logger.warning("%s", note)
        lane.sweep_spares(config.host_id)  # work dirs made ahead by worker processes now gone
        attention = Wakeup()
        due = DueJobs(clock)

        def defer(job_id: str, when: float) -> None:
            due.add(job_id, when)
            attention.set()  # the loop's next wake-up may have to come sooner

        sender = Sender(spool, callbacks, clock, config.callbacks, logger,
                        poll_interval=config.poll_interval)  # fmt: skip
        # Kept only where they can be read: a daemon without the API counts nothing.
        seen = _Seen.build(config, spool, clock, logger) if config.api is not None else None
        metrics = None if seen is None else seen.metrics
        observed = None if seen is None else seen.observe
        notifier = Notifier(
            spool, callbacks, clock, settings=config.notify, sending=config.callbacks,
            secrets=parts.secrets, logger=logger, poll_interval=config.poll_interval, wake=notices_changed,
            on_folded=None if metrics is None else metrics.notifications_folded,
        )  # fmt: skip
        told = () if seen is None else seen.listeners(clock)
        control = JobControl(spool, clock, who=f"spoold on {config.hostname}",
                             callbacks=callbacks, listeners=told)  # fmt: skip

        def cancel(job_id: str, why: str) -> None:
            try:
                control.cancel(job_id, reason=why)
                logger.info("job %s cancelled: %s", job_id, why)
            except SpooldError as exc:  # it moved on (ran, or was cancelled): nothing to undo
                logger.warning("job %s could not be cancelled (%s): %s", job_id, why, exc)

        watch_mode = resolve_watch_mode(config.watch, spool.dir("incoming"))
        workers = make_workers(
            parts, on_lost=attention.set, on_deferred=defer, on_cancel=cancel,
            on_observed=observed,
            on_started=None if metrics is None else metrics.worker_process_started,
            # Where outbox/ is polled, as the commits of this process are (``outbox_written``).
            on_told=outbox_written if watch_mode == "poll" else None,
        )  # fmt: skip

        def queue_job(job: JobDir, document: dict[str, Any]) -> None:
            workers.submit(job.job_id, document)

        scheduler = Scheduler(
            spool, clock, logger, defer=defer, cancel=cancel,
            queue=workers.submit, callbacks=callbacks,
            on_fired=None if metrics is None else metrics.schedule_fired, listeners=told,
        )  # fmt: skip

        intake = Intake(
            spool,
            parts.validator(),
            clock,
            max_file_size=config.max_file_size,
            settle_time=config.settle_time,
            on_accepted=queue_job,
            logger=logger,
            allowed_run_as=config.allowed_run_as,
            on_scheduled=scheduler.accept,  # those schedules alone: no pass over the others
            callbacks=callbacks,
            policy=config.policy,
            on_observed=observed,
            lease_timeout=config.lease_timeout,
        )
        intake_thread = IntakeThread(
            intake, logger, clock=clock, remote_writers=watch_mode == "poll"
        )
        executors = [parts.registry.get(name) for name in parts.registry.names()]
        recovery = Recovery(spool, config, clock, logger, callbacks=callbacks,
                            executors=executors, listeners=told)  # fmt: skip
        daemon = cls(
            config, clock, logger, spool, workers, intake_thread, recovery, watch_mode, attention,
            due, scheduler, callbacks, sender, intake,
        )  # fmt: skip
        recovery.adopter = daemon.adopt
        daemon.held_at_stop = tuple(
            executor.name for executor in executors
            if not (executor.supervised or executor.resumable)
        )  # fmt: skip
        from spoold import __version__  # noqa: PLC0415

        daemon.hostbeat = HostBeat(spool, config, clock, logger, running=workers.in_flight,
                                   version=__version__)  # fmt: skip
        sender.host_state = daemon.hostbeat.state_of
        recovery.host_stopped = daemon.hostbeat.said_stopped
        recovery.host_up_for = daemon.hostbeat.up_for
        daemon.notifier, notifier.host_state = notifier, daemon.hostbeat.state_of
        if seen is not None:
            daemon.seen, daemon.api = seen, daemon.build_api(seen)
        return daemon

    def build_api(self, seen: _Seen) -> ApiServer:
        """The HTTP API's server (``api:`` in the config), over this daemon's spool and intake;
        started by ``run``. Imported only here: FastAPI costs a daemon without the API nothing."""
        from spoold import __version__  # noqa: PLC0415
        from spoold.face.api import ApiContext, build_app  # noqa: PLC0415
        from spoold.face.api.server import ApiServer  # noqa: PLC0415

        assert self.config.api is not None

        def wake() -> None:
            self.rescan.set()
            self.attention.set()

        context = ApiContext(
            config=self.config, spool=self.spool, clock=self.clock, logger=self.logger,
            submit=self.intake.submit, wake=wake, catalogue=seen.catalogue, metrics=seen.metrics,
            listeners=seen.listeners(self.clock),
            callbacks=self.callbacks, version=__version__,
        )  # fmt: skip
        return ApiServer(build_app(context), self.config.api, self.logger)

    def adopt(self, job: JobDir, lease: dict[str, Any], status: dict[str, Any]) -> bool:
        """Hand a running job whose worker is gone to the workers, to go on with its attempt
        (``lease`` and ``status``: as recovery read them)."""
        if self.workers.holds(job.job_id):
            return True
        user = lease.get("job_user")  # it goes on as the user it ran as: its workers keep it
        return self.workers.submit(
            job.job_id, meta=JobMeta.from_document(status), adopt=True,
            user=user if isinstance(user, str) else None,
        )  # fmt: skip

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; return the process exit code."""
        try:
            lock = self.spool.host_lock.acquire(self.config.host_id)
        except SpoolError:
            self.logger.error("refusing to run: %s", lock_holder(self.spool, self.config.host_id))
            return 2
        stop = Wakeup()  # set by a signal handler while this thread may wait on it
        self._install_signals(stop)
        if self.hostbeat is not None and not self._own_record(stop):
            lock.close()
            return 2
        try:
            self.systemd.status("recovering", self.clock.monotonic(), force=True)
            self.recover()
            self.sender.start()
            if self.notifier is not None:
                self.notifier.start()
            self.workers.start()
            self.scheduler.start()  # after the workers: what was missed may be queued at once
            self.intake_thread.start()
            if self.watch_mode == "inotify":
                self._incoming_watch = InotifyWatcher(
                    self.spool.dir("incoming"),
                    self.intake_thread.arrived,
                    self.intake_thread.request_sweep,
                    self._incoming_unwatched,
                    self.logger,
                )
                self._incoming_watch.start()
                self._outbox_watch = ChangeWatch(self.spool.dir("outbox"), self._outbox_changed,
                                                 self._outbox_unwatched, self.logger)  # fmt: skip
                self._outbox_watch.start()
                self._pace_outbox()
            self.intake_thread.request_sweep()
            if self.api is not None:
                try:
                    self.api.start()
                except ConfigError as exc:  # detached, the log is all that says it
                    self.logger.error("refusing to run: %s", exc)
                    raise
            self.logger.info(
                "spoold running on %s: %d worker(s) in %d process(es), watching by %s",
                self.spool.root, self.config.workers, self.workers.processes, self.watch_mode,
            )  # fmt: skip
            self.systemd.notify("READY=1")
            self._loop(stop)
        finally:
            said = stop_words(
                self.config.shutdown_grace, self.held_at_stop, len(self.workers.in_flight())
            )
            self.systemd.notify(f"STOPPING=1\nSTATUS={said}")
            self.logger.info("%s", said)
            if self.api is not None:
                self.api.stop()
            # Intake first: a watcher waiting for room in its backlog is let go at once.
            self.intake_thread.stop()
            for watch in (self._incoming_watch, self._outbox_watch):
                if watch is not None:
                    watch.stop()
            self.scheduler.stop()
            self.workers.stop(self.config.shutdown_grace)
            self.sender.stop()
            if self.notifier is not None:
                self.notifier.stop()
            if self.hostbeat is not None:
                self.hostbeat.stopped()
            lock.close()
            self.logger.info("stopped")
        return self.exit_code

    def _own_record(self, stop: Wakeup) -> bool:
        """This host's first beat, before anything it writes names it; False if another
        daemon serves as this host (or ``stop`` came while this one waited to know)."""
        assert self.hostbeat is not None
        self.hostbeat.tick(self.clock.monotonic())
        if self.hostbeat.waiting:
            wait = self.config.lease_timeout + self.config.heartbeat_interval
            self.systemd.notify(f"EXTEND_TIMEOUT_USEC={int((wait + 30) * 1e6)}")
            self.systemd.status(f"waiting up to {wait:g}s: hosts/{self.config.host_id} was "
                                "written on another machine", self.clock.monotonic(),
                                force=True)  # fmt: skip
        while self.hostbeat.waiting and not stop.is_set():
            stop.wait(max(self.hostbeat.next_due - self.clock.monotonic(), 0.0))
            self.systemd.ping(self.clock.monotonic())
            self.hostbeat.tick(self.clock.monotonic())
        if self.hostbeat.taken is not None:
            self.logger.error("refusing to run: %s", self.hostbeat.taken)
            return False
        return not stop.is_set()

    def _outbox_changed(self, name: str | None) -> None:
        """outbox/'s watch saw ``name`` come or go (None: it lost track): a delivery or a
        notification a worker process, the CLI or another daemon committed goes out now."""
        self.sender.changed(name)
        if self.notifier is not None:
            self.notifier.changed(name)

    def _incoming_unwatched(self) -> None:
        """incoming/'s watch was lost (the watcher's thread): scans every ``poll_interval``
        from now until ``_rewatch`` watches it again."""
        self.rescan.set()
        self.attention.set()

    def _outbox_unwatched(self) -> None:
        self._pace_outbox()

    def _rewatch(self) -> None:
        """A lost watch taken up again once its directory is back (made anew, mounted again);
        what came meanwhile is looked for at once."""
        incoming, outbox = self._incoming_watch, self._outbox_watch
        if incoming is not None and not incoming.watching and incoming.rewatch():
            self.rescan.set()  # and scans every rescan_interval again after it
        if outbox is not None and not outbox.watching and outbox.rewatch():
            self._pace_outbox()
            self._outbox_changed(None)

    def _pace_outbox(self) -> None:
        """The senders of outbox/ look every ``poll_interval``; while it is watched and holds
        nothing of theirs, every ``rescan_interval`` (the config's, as it is now)."""
        watched = self._outbox_watch is not None and self._outbox_watch.watching
        rest = self.config.rescan_interval if watched else None
        self.sender.pace(self.config.poll_interval, rest)
        if self.notifier is not None:
            self.notifier.pace(self.config.poll_interval, rest)

    def _loop(self, stop: Wakeup) -> None:
        """The waiting: until the next round is due or something asks for attention (a worker
        process died, a retry was scheduled, a signal came), then the round (``tick``)."""
        while not stop.is_set():
            wake_at = self.tick(self.clock.monotonic())
            if self.hostbeat is not None and self.hostbeat.taken is not None:
                self.logger.error("stopping: %s", self.hostbeat.taken)
                self.exit_code = 2
                return
            self.attention.wait(max(wake_at - self.clock.monotonic(), 0.0))
            self.attention.clear()

    def tick(self, now: float) -> float:
        """One round of the periodic duties at ``now`` (the clock's monotonic time); return when
        the next round is due, on that same clock.

        In order: the watchdog ping; the status line (every STATUS_EVERY); the config read again
        if asked (SIGHUP); dead worker processes replaced; a lost watch taken up again once its
        directory is back; the retries that are due by the clock's wall time handed to the
        workers; retention (at the first round, then hourly); the executors' leftovers (every
        SWEEP_EVERY); a scan when its time has come or one was asked for (SIGUSR1, a watch lost
        or taken up again): a sweep of incoming/ that backs up the watcher, the schedules
        synced, pending jobs queued, lost claims reaped.
        Leases are kept alive by the worker processes that hold them. Does not wait; whoever
        calls it (``_loop``, or a test with a fake clock) decides when the next round runs.
        """
        if self._next_scan is None:  # the first round: retention and status now, a scan later
            self._next_scan = now + self._scan_every()
            self._next_retention = self._next_status = now
            self._next_sweep = now + SWEEP_EVERY  # recovery swept at the start
        self.systemd.ping(now)
        if now >= self._next_status:
            self._duty(lambda: self._report_status(now))
            self._next_status = now + STATUS_EVERY
        if self.reload.is_set():
            self.reload.clear()
            self._duty(self.reload_config)
            self._next_scan = min(self._next_scan, now + self._scan_every())
        if self.workers.lost_any():
            self._duty(self._replace_workers)
        if not all(w.watching for w in (self._incoming_watch, self._outbox_watch) if w):
            self._duty(self._rewatch)
        for job_id in self.due.pop_due():
            self.workers.submit(job_id, meta=self._meta(job_id))
        asked = self.rescan.is_set()
        if asked:
            self.rescan.clear()
            self._next_scan = now  # at once, as if its time had come
        if now >= self._next_retention:
            self._duty(self.apply_retention)
            self._next_retention = now + RETENTION_EVERY
        if now >= self._next_sweep:
            self._sweep_executors()
            self._next_sweep = now + SWEEP_EVERY
        if self.hostbeat is not None and now >= self.hostbeat.next_due:
            self._duty(lambda: self.hostbeat.tick(now) if self.hostbeat else None)
        if now >= self._next_scan:
            self.intake_thread.request_sweep()
            self._duty(self.scheduler.sync)  # any host: unschedule, replace, requests (stats)
            self._duty(lambda: self._queue_pending(recheck_due=asked))
            self._duty(lambda: self.recovery.reap(own_runs=self.workers.in_flight()))
            self._duty(self._hold_claims)
            self._duty(self._recover_lost_hosts)
            self._next_scan = now + self._scan_every()
        wake_at = min(self._next_scan, self._next_retention, self._next_status, self._next_sweep)
        if self.hostbeat is not None:
            wake_at = min(wake_at, self.hostbeat.next_due)
        wake_at = min(wake_at, now + self.systemd.next_wake(now))
        if (due := self.due.next_due()) is not None:
            wake_at = min(wake_at, now + due - self.clock.now().timestamp())
        return wake_at

    def _scan_every(self) -> float:
        incoming = self._incoming_watch
        if self.watch_mode == "poll" or (incoming is not None and not incoming.watching):
            return self.config.poll_interval
        return self.config.rescan_interval

    def _report_status(self, now: float) -> None:
        """``STATUS=running: N jobs, M pending`` for ``systemctl status``, in the round at ``now``.

        The round's time, not a reading taken after the count: the line throttles against the
        last one sent, and a count that took longer last time made a due line "too soon".
        """
        running = len(self.workers.in_flight())
        wall = self.clock.now().timestamp()  # before the stat: see DirectoryCount
        pending = self._pending_count.count(wall=wall, now=self.clock.monotonic())
        text = f"running: {running} jobs, {pending} pending"
        if self.systemd.status(text, now):
            self.logger.debug("status: %s", text)

    def reload_config(self) -> bool:
        """Read the config file again (SIGHUP); return whether the new one was taken.

        Applied at once: ``log_level``, ``poll_interval``, ``rescan_interval`` (from the next
        scan, and in the outbox's senders' waits), ``retention`` (from the next hourly pass)
        and ``shutdown_grace``. Every other key needs a restart: the worker processes got the
        config when they started (executor settings, limits, kill_grace, lease and heartbeat
        times, default callback, secrets, workdir, run_as users), and the spool, watch mode,
        workers and log files are built once.
        Changes to those are logged as waiting for a restart, named by their keys. A file that
        does not load, or that a start would refuse (``start_problems``: a job user that does
        not exist, a logdir that cannot be written, a certificate that cannot be loaded, ...),
        is refused whole, each problem logged, and the config in use is kept: the restart an
        upgrade makes must not fail on a file the reload said was taken.
        """
        old = self.config
        reopen_logging()  # a rotation's postrotate may send the SIGHUP
        try:
            # --spool stays as the start had it; SPOOLD_SPOOL is read again, as a start would.
            new = load_config(
                old.source, spool=old.spool if old.spool_override == "--spool" else None
            )
        except ConfigError as exc:
            problems = [str(exc)]
        else:
            problems = start_problems(new, running=old, spool=self.spool, logger=self.logger,
                                      detached=self.detached)  # fmt: skip
        for problem in problems:
            self.logger.error("config not reloaded, the old one stays in use: %s", problem)
        if problems:
            return False
        changed = changed_keys(old, new)
        applied = [k for k in changed if k in RELOADABLE]
        waiting = [k for k in changed if k not in RELOADABLE]
        kept = {f: getattr(old, f) for f in _config_fields() if f not in RELOADABLE}
        self.config = new._replace(**kept)
        self.logger.setLevel(self.config.log_level.upper())
        if {"poll_interval", "rescan_interval"} & set(applied):
            self._pace_outbox()
        self.logger.info(
            "config reloaded from %s: applied %s; need a restart: %s",
            old.source, ", ".join(applied) or "no changes",
            ", ".join(waiting) or "none",
        )  # fmt: skip
        if new.spool_override and new.file_spool not in (None, old.file_spool):
            self.logger.warning(
                "config %s: spool: %s in the file is overridden by %s: spoold stays on %s, "
                "after a restart too", old.source, new.file_spool, new.spool_override, new.spool,
            )  # fmt: skip
        if "api" in waiting and new.api is not None:
            from spoold.face.api.server import plain_text_warning  # noqa: PLC0415

            if (warning := plain_text_warning(new.api)) is not None:
                self.logger.warning("from the next restart, %s", warning)
        self.logger.info("keys a reload applies: %s; all others need a restart",
                         ", ".join(RELOADABLE))  # fmt: skip
        return True

    def apply_retention(self, retention: Retention | None = None) -> int:
        """Remove the finished jobs ``retention`` (the config's) says to; return how many."""
        rules = retention or self.config.retention
        purged = apply_retention(self.spool, rules, self.clock.now().timestamp())
        if self.seen is not None:
            for job in purged:
                self.seen.catalogue.forget(job.job_id)
        removed = len(purged)
        if removed:
            self.logger.info("retention: removed %d finished job(s)", removed)
        return removed

    def _meta(self, job_id: str) -> JobMeta:
        """A pending job's priority and concurrency, as its status.json kept them."""
        return JobMeta.from_document(self._pending_status(self.spool.jobs.find(job_id)))

    def _pending_status(self, job: JobDir | None) -> dict[str, Any]:
        """A pending job's status.json; {} if it is gone or unreadable (its worker finds out)."""
        if job is None:
            return {}
        try:
            return self.spool.jobs.read_status(job)
        except (OSError, SpooldError, ValueError):
            return {}

    def _replace_workers(self) -> None:
        lost = self.workers.replace_dead()
        self._reap()  # their leases name a dead pid now: those jobs end or requeue at once
        self._hold_claims()
        if lost:
            self._queue_pending()

    def _sweep_executors(self) -> None:
        """What a job's own clean-up could not remove (its engine away): not left until the
        next start, or the next job recovery moves. In a thread of its own: an engine that
        does not answer is asked with timeouts of 10 to 30 s, and the loop pings a 60 s
        watchdog."""
        if self.sweeping is not None and self.sweeping.is_alive():
            return
        self.sweeping = threading.Thread(
            target=self._duty, args=(self.recovery.sweep_executors,), name="spoold-sweep",
            daemon=True,
        )  # fmt: skip
        self.sweeping.start()

    def _duty(self, duty: Callable[[], object]) -> None:
        """Run one periodic duty; its failure is logged and the daemon goes on. A spool that
        cannot be reached (a shared one cut off) is said once, not at every round."""
        self._outage.call(duty, "unexpected failure in a periodic duty; retrying next time")

    def recover(self) -> None:
        """What a start does before anything runs: finish what a crash left half done, end
        or requeue the lost claims, queue what is pending."""
        self.spool.sync_tree()
        # Before the stages: a prepared rejection is decided by whether its stage is one.
        made, dropped = self.callbacks.settle_all()
        if made or dropped:
            self.logger.warning(
                "recovery: %d callback(s) of changes made before a crash queued, %d of "
                "changes not made dropped", made, dropped,
            )  # fmt: skip
        for line in self.spool.stages.recover():
            self.logger.warning("recovery: %s", line)
        if restored := self.spool.deliveries.finish_adoptions(frozenset({self.config.host_id})):
            self.logger.warning("recovery: %d callback adoption(s) cut short put back", restored)
        self.recovery.repair_pending()
        # Before anything is dispatched: what still runs of the last daemon counts first.
        self._hold_claims(first=True)
        self._reap()
        if left := remove_empty_run_cgroups():
            self.logger.info("recovery: removed %d empty cgroup(s) of runs that ended", left)
        self._hold_claims()
        self._queue_pending()

    def _hold_claims(self, *, first: bool = False) -> None:
        """Have the workers count, against their slots and limits, every job in running/ that
        this host holds or that no lease names yet (``first``, at the start: all of them;
        later, of those held, the ones not adopted, ended or taken over since). Until it is
        adopted, such a job may still run under the worker of the last daemon, or of a worker
        process that died, alive or not yet judged gone."""
        workers = self.workers
        if not isinstance(workers, ClaimHolder):
            return
        if first:
            jobs = self.spool.jobs.list_jobs("running")
        elif held := workers.held_claims():
            jobs = [
                job for job_id in held
                if (job := self.spool.jobs.find(job_id, among=("running",))) is not None
            ]  # fmt: skip
        else:
            return
        machine, claims, users = this_machine(), {}, {}
        for job in jobs:
            try:
                lease = self.spool.jobs.read_lease(job)
            except FileNotFoundError:
                continue  # it moved on meanwhile
            except (OSError, ValueError):
                lease = None  # unreadable: not judged yet, so counted
            if lease is not None and (
                lease.get("host") != self.config.host_id or machine.relation(lease) == "elsewhere"
            ):
                continue  # another host's (or another machine's of this host id)
            claims[job.job_id] = JobMeta.from_document(self._pending_status(job))
            if lease is not None and isinstance(user := lease.get("job_user"), str):
                users[job.job_id] = user  # the user it runs as, kept for it
        workers.hold_claims(claims, users)

    def _recover_lost_hosts(self) -> None:
        """What hosts found stale or gone left half done in tmp/ and outbox/: their intake
        stages and their adoptions of deliveries. (Their claims: ``recovery.reap``.)"""
        lost = self.hostbeat.lost() if self.hostbeat is not None else frozenset()
        if not lost:
            return
        # Before their stages: a job file given back must not find its own first delivery.
        made, dropped = self.callbacks.settle_all(lost)
        if made or dropped:
            self.logger.warning(
                "recovery of %s: %d callback(s) of changes made queued, %d of changes not "
                "made dropped", ", ".join(sorted(lost)), made, dropped,
            )  # fmt: skip
        for line in self.spool.stages.recover(lost):
            self.logger.warning("recovery of %s: %s", ", ".join(sorted(lost)), line)
        if restored := self.spool.deliveries.finish_adoptions(lost):
            self.logger.warning("recovery: %d callback adoption(s) of %s put back", restored,
                                ", ".join(sorted(lost)))  # fmt: skip

    def _reap(self) -> None:
        for job in self.recovery.reap(own_runs=self.workers.in_flight()):
            self.logger.warning("recovery: job %s is now in %s/", job.job_id, job.directory)

    def _queue_pending(self, *, recheck_due: bool = False) -> None:
        """Hand the workers every pending job they do not hold, unless it waits for a retry.

        A backlog they hold already costs a listing of names, no stat a job (10,000 waiting
        behind a full limit: 36 ms a scan, stat'ed and sorted, now 5). ``recheck_due``: a scan
        asked for (``spoold retry`` wakes the daemon): the jobs waiting for a retry are read
        again, since one may have been cancelled and retried meanwhile, to run at once.
        """
        now = self.clock.now().timestamp()
        held = self.workers.held()
        waiting: Container[str] = () if recheck_due else self.due
        for job in self.spool.jobs.list_jobs(
            "pending", skip=lambda job_id: job_id in held or job_id in waiting
        ):
            status = self._pending_status(job)
            due = status.get("next_attempt_at")
            when = parse_rfc3339(due).timestamp() if isinstance(due, str) else None
            if when is not None and self.due.due_at(job.job_id) == when:
                continue  # known, and unchanged: its wait runs on the monotonic clock
            if when is not None and when > now:
                self.due.add(job.job_id, when, longest=scheduled_wait(status))
                self.logger.info(
                    "job %s waits for its next attempt, due at %s",
                    job.job_id, rfc3339(datetime.fromtimestamp(when, UTC)),
                )  # fmt: skip
            else:
                self.due.discard(job.job_id)
                self.workers.submit(job.job_id, meta=JobMeta.from_document(status))

    def _install_signals(self, stop: Wakeup) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def request_stop(signum: int, _frame: FrameType | None) -> None:
            self.logger.info("received %s", signal.Signals(signum).name)
            stop.set()
            self.attention.set()

        def request_rescan(signum: int, _frame: FrameType | None) -> None:
            self.rescan.set()  # `spoold retry` put a job back into pending/
            self.attention.set()

        def request_reload(signum: int, _frame: FrameType | None) -> None:
            self.reload.set()
            self.attention.set()

        # A hangup held since start-up (spoold.face.cli.HeldHangup) is a reload asked for.
        if getattr(signal.getsignal(signal.SIGHUP), "came", False):
            self.reload.set()
        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGHUP, request_reload)
        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGUSR1, request_rescan)
        # A lease-break notice (SIGIO) would kill the process by default; leases are only
        # held for microseconds, but the default must never apply.
        signal.signal(signal.SIGIO, signal.SIG_IGN)


@dataclass
class _Seen:
    """What the API reads of the changes of state this process sees (its own, and its worker
    processes'): the counters of /metrics, and the index jobs are listed from."""

    metrics: Metrics
    catalogue: Catalogue

    @classmethod
    def build(cls, config: Config, spool: Spool, clock: Clock, logger: logging.Logger) -> _Seen:
        import platform  # noqa: PLC0415

        from spoold import __version__  # noqa: PLC0415
        from spoold.face.catalogue import Catalogue  # noqa: PLC0415
        from spoold.face.metrics import Metrics  # noqa: PLC0415

        info = {"version": __version__, "python": platform.python_version()}
        metrics = Metrics(spool, config, clock, build_info=info, logger=logger)
        return cls(metrics, Catalogue(spool))

    def observe(self, observation: Observation) -> None:
        self.metrics.observe(observation)
        self.catalogue.forget(observation.job_id)  # read again: its state changed

    def listeners(self, clock: Clock) -> tuple[Listener, ...]:
        """For the ledgers of this process: each change they make, observed."""
        return (observed_listener(self.observe, clock),)


#: How often the retention rules are applied (also once at start).
RETENTION_EVERY = 3600.0
#: Seconds between the executors' sweeps of what jobs no longer running left (containers,
#: services): an engine listing or two, over its socket, without the SDK.
SWEEP_EVERY = 600.0


def _config_fields() -> list[str]:
    return [f for f in Config._fields if f not in ("source", "worker_id")]


def check_spool(spool: Spool) -> None:
    """What a start requires of the spool: the whole tree, on one filesystem (a mount on done/:
    every finish would fail with EXDEV), and no one else able to write jobs into it."""
    spool.check()
    spool.check_filesystems()
    if problems := spool.unsafe_permissions():
        # A job written into pending/ by someone else would run unvalidated, as spoold.
        raise SpoolError("refusing to run: others could write jobs; " + "; ".join(problems))


def start_problems(
    config: Config, *, running: Config, spool: Spool, logger: logging.Logger, detached: bool
) -> list[str]:
    """What would stop ``spoold run`` with ``config`` (loaded already) on this host, each
    problem naming its key; none: a start would take it. For a reload, which must not take a
    file the next start refuses. The checks are the start's own (``Daemon.build``, ``run``,
    ``check_detach``), with their side effects (a logdir, a work root made); ``running``,
    on ``spool``: the config in use, whose API address is this daemon's already."""
    problems: list[str] = []

    def check(what: Callable[[], object], key: str | None = None) -> bool:
        try:
            what()
        except (SpooldError, OSError) as exc:
            problems.append(f"key {key}: {exc}" if key else str(exc))
            return False
        return True

    if detached:
        check(lambda: check_detach(config))
    if config.logdir is not None:
        logdir = config.logdir
        check(lambda: _log_file(logdir).close())
    target = spool
    if config.spool != running.spool:
        target = Spool(config.spool, durable=config.durable, host=config.host_id)
    if target is spool or check(lambda: check_spool(target), "spool"):
        check(lambda: Lane.from_config(config, target.jobs.work_root))  # tmp/work/ in the spool
        check(lambda: resolve_watch_mode(config.watch, target.dir("incoming")))
    if config.api is not None:
        from spoold.face.api.server import check_api  # noqa: PLC0415 - only with an API

        api, now = config.api, running.api
        moved = now is None or (api.host, api.port) != (now.host, now.port)
        check(lambda: check_api(api, logger, bind=moved))
    return problems


def check_detach(config: Config) -> None:
    """Refuse ``spoold run --daemon`` where its log would go nowhere: ConfigError naming logdir.

    Detached, spoold's standard error (and its worker processes') is /dev/null: without
    ``logdir`` no line of its log, not even why it stopped, would be kept. Under systemd, run
    it in the foreground instead: journald keeps the log.
    """
    if config.logdir is None:
        raise ConfigError(
            "logdir: spoold run --daemon needs a logdir in the config (e.g. logdir: "
            "/var/log/spoold, or RUNNER_LOG_DIR): detached, its standard error goes to "
            "/dev/null and its log with it; or run it in the foreground (under systemd, "
            "whose journal keeps the log)"
        )


def detach(pidfile: Path | None) -> None:
    """Become a background daemon (``spoold run --daemon``) with python-daemon.

    ``check_detach`` first: detached, only ``logdir`` keeps spoold's log.
    """
    import daemon  # noqa: PLC0415 - only --daemon needs it
    import daemon.pidfile  # noqa: PLC0415

    context = daemon.DaemonContext(
        working_directory=str(Path.cwd()),
        umask=0o027,
        pidfile=daemon.pidfile.TimeoutPIDLockFile(str(pidfile)) if pidfile else None,
        stderr=None,
    )
    context.open()
