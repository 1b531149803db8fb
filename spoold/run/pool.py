"""The daemon's worker processes: jobs run on their threads, each process with its own GIL.

spoold's work per job (the spawn, log lines, status writes, fsync waits) is mostly Python, and
one Python process runs Python on one core at a time: past a few hundred jobs a second its
threads spend more time handing the GIL around than working. So, as gunicorn and dramatiq do,
the main process takes files in and hands job ids to worker processes, one socket pair each,
and a worker process reports each job it is done with. Each process holds one job beyond its
slots, so that a slot starts its next job without a round trip; a job held behind a long one
is taken back when another process has a slot free. A worker process that dies is replaced,
and its claims are recovered as a crashed daemon's would be: they carry its pid.

The steps of a job ask the main process for their executors' slots too (SlotWanted, then
SlotGranted, SlotFreed: spoold.run.executor_slots), so that ``limits.executors`` holds across
the jobs of every worker process.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import itertools
import logging
import marshal
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from spoold.core.clock import Clock
from spoold.core.config import Config
from spoold.core.errors import WorkerProcessError
from spoold.core.procfs import release_memory
from spoold.run.dispatch import DispatchQueue, JobMeta, SlotKey
from spoold.run.executor_slots import Ticket, free_ticket
from spoold.run.heartbeat import LeaseHeartbeat
from spoold.run.lane import user_slots
from spoold.run.launcher import DaemonLauncher, Launcher
from spoold.run.observed import Observation
from spoold.run.worker import JobRunner, WorkerPool

_PR_SET_PDEATHSIG = 1
# How long past shutdown_grace a worker process may take to record what it interrupted.
_STOP_MARGIN = 15.0
_READY_BOUND = 60.0  # a fresh interpreter importing spoold takes well under a second
# Jobs a worker process holds beyond its slots, so that a slot that frees up starts the next
# job at once instead of waiting for the main process to answer. A job held behind a long
# one is taken back (Revoke) as soon as another process has a slot free.
_PREFETCH = 1
# A worker process's observations (the metrics') wait this long at most, to go out together
# and with its other messages: each message wakes the main process's reader of the link, and
# a wake-up costs it more than counting what it brings.
_OBSERVED_WINDOW = 0.05
_OBSERVED_MOST = 256  # then they go at once
#: Queued jobs that keep the document intake parsed, for their worker process to skip a
#: parse; the ones queued behind them keep none (their worker reads job.yaml: ~40 µs).
DOCUMENTS_KEPT = 64
#: How long a worker process started after a quiet spell stays with nothing to do: longer
#: than a job supervisor (``IDLE_SUPERVISOR_FOR``), a fork of ~1 ms where a worker process is
#: a new interpreter (~0.15 s of CPU).
LINGER_FIRST = 10.0


@dataclass(frozen=True)
class Setup:
    """The first message to a new worker process: what it is and which work slots it has."""

    config: Config
    slots: tuple[str, ...]
    parent: int
    #: Whether the main process counts what it does (``Observed``): else it sends none.
    observe: bool = False
    #: The descriptor of its socket to the daemon's launcher (spoold.run.launcher), if any.
    launcher: int | None = None
    #: The daemon's executors, name and class (``ExecutorRegistry.references``), imported
    #: when first used; empty: from the entry points, each at once.
    executors: tuple[tuple[str, str], ...] = ()
    #: How long it stays with nothing to do before it says Leaving (``Linger``); 0: never.
    linger: float = 0.0
    #: Whether it tells the deliveries it commits (``Told``): no watch of outbox/ does.
    tell: bool = False


@dataclass(frozen=True, slots=True)
class RunJob:
    """Run a pending job; ``document`` is the job file as intake parsed it, if it did.

    ``adopt``: the job is in running/ already, its worker gone (a daemon that died or
    stopped): take it over and go on with its attempt where that worker left it.
    """

    job_id: str
    document: dict[str, Any] | None = None
    adopt: bool = False
    #: The slot whose job user it runs as, in the worker process it is sent to (an
    #: adoption's: its lease's user's; None: the process picks one of its own that is free).
    slot: str | None = None


@dataclass(frozen=True)
class Stop:
    """Take no more jobs; interrupt running ones after ``grace`` seconds; exit."""

    grace: float


@dataclass(frozen=True)
class Ready:
    """From a new worker process: built and listening."""


@dataclass(frozen=True)
class Leaving:
    """From a worker process that had nothing to do for ``worker_idle_exit``: it may be
    stopped. The main process answers Stop, or nothing if it sent a job meanwhile."""


@dataclass(frozen=True)
class Revoke:
    """Give back the jobs you hold and have not started: another process has a slot free."""


@dataclass(frozen=True)
class Returned:
    """From a worker process, answering Revoke: the jobs it gave back (maybe none)."""

    job_ids: tuple[str, ...]


@dataclass(frozen=True)
class Done:
    """From a worker process: its slot is free again (the job ran, or another claimed it);
    with the observations it held meanwhile (``Observed``): one message, one wake-up."""

    job_id: str
    observations: tuple[Observation, ...] = ()


@dataclass(frozen=True)
class Deferred:
    """From a worker process: a job failed, went back to pending/, and is due again at ``due``."""

    job_id: str
    due: float  # a wall-clock timestamp: it is also what status.json says


@dataclass(frozen=True, slots=True)
class Told:
    """From a worker process: the deliveries it committed to outbox/, by name (``Setup.tell``:
    a polled spool, where the callback sender would see them only at its next look)."""

    names: tuple[str, ...]


@dataclass(frozen=True)
class Observed:
    """From a worker process: changes of jobs' states it made, for the daemon's metrics."""

    observations: tuple[Observation, ...]


@dataclass(frozen=True, slots=True)
class Stepping:
    """From a worker process: a job it runs has steps, which take their executors' slots
    (``SlotWanted``); the job holds none of its own executor's."""

    job_id: str


@dataclass(frozen=True, slots=True)
class SlotWanted:
    """From a worker process: a step's try wants a slot of ``executor`` (``running``: the
    step runs already, adopted). The main process answers SlotGranted, at once or in turn."""

    token: str
    executor: str
    running: bool = False


@dataclass(frozen=True, slots=True)
class SlotFreed:
    """From a worker process: a step's slot is free, or the step no longer waits for one."""

    token: str


@dataclass(frozen=True, slots=True)
class SlotGranted:
    """To a worker process: the step that asked (SlotWanted) has its slot."""

    token: str


Message = (
    RunJob | Stop | Ready | Leaving | Done | Revoke | Returned | Deferred | Observed
    | Stepping | SlotWanted | SlotFreed | SlotGranted | Told
)  # fmt: skip


def send_message(conn: Connection, message: Message) -> None:
    """Send one message as marshal data: several times cheaper than pickle, and both ends run
    the same interpreter. A document marshal cannot take goes as None (the worker reads it)."""
    match message:
        case RunJob(job_id, document, adopt, slot):
            try:
                data = marshal.dumps(("run", job_id, document, adopt, slot))
            except ValueError:
                data = marshal.dumps(("run", job_id, None, adopt, slot))
        case Stop(grace):
            data = marshal.dumps(("stop", grace))
        case Ready():
            data = marshal.dumps(("ready",))
        case Leaving():
            data = marshal.dumps(("leaving",))
        case Done(job_id, ()):
            data = marshal.dumps(("done", job_id))
        case Done(job_id, observations):
            data = marshal.dumps(("done", job_id, tuple(each.to_wire() for each in observations)))
        case Revoke():
            data = marshal.dumps(("revoke",))
        case Returned(job_ids):
            data = marshal.dumps(("returned", job_ids))
        case Deferred(job_id, due):
            data = marshal.dumps(("deferred", job_id, due))
        case Observed(observations):
            data = marshal.dumps(("observed", tuple(each.to_wire() for each in observations)))
        case Stepping(job_id):
            data = marshal.dumps(("stepping", job_id))
        case SlotWanted(token, executor, running):
            data = marshal.dumps(("slot", token, executor, running))
        case SlotFreed(token):
            data = marshal.dumps(("slot-free", token))
        case SlotGranted(token):
            data = marshal.dumps(("slot-go", token))
        case Told(names):
            data = marshal.dumps(("told", names))
    conn.send_bytes(data)


def receive_message(conn: Connection) -> Message:
    """The next message; raise EOFError when the other end is gone, WorkerProcessError on junk."""
    try:
        # A private socket pair to our own child: no one else can write to it.
        fields = marshal.loads(conn.recv_bytes())  # noqa: S302 - EOFError: the other end is gone
    except (ValueError, TypeError) as exc:
        raise WorkerProcessError(f"unreadable message between spoold processes: {exc}") from exc
    match fields:
        case ("run", str(job_id), document, bool(adopt), (str() | None) as slot):
            return RunJob(job_id, document, adopt, slot)
        case ("stop", float(grace)):
            return Stop(grace)
        case ("ready",):
            return Ready()
        case ("leaving",):
            return Leaving()
        case ("done", str(job_id)):
            return Done(job_id)
        case ("done", str(job_id), tuple(batch)):
            with contextlib.suppress(ValueError):  # not observations: junk, as below
                return Done(job_id, tuple(Observation.from_wire(wire) for wire in batch))
        case ("revoke",):
            return Revoke()
        case ("deferred", str(job_id), float(due)):
            return Deferred(job_id, due)
        case ("observed", tuple(batch)):
            with contextlib.suppress(ValueError):  # not observations: junk, as below
                return Observed(tuple(Observation.from_wire(wire) for wire in batch))
        case ("returned", tuple(job_ids)) if all(isinstance(j, str) for j in job_ids):
            return Returned(job_ids)
        case ("stepping", str(job_id)):
            return Stepping(job_id)
        case ("slot", str(token), str(executor), bool(running)):
            return SlotWanted(token, executor, running)
        case ("slot-free", str(token)):
            return SlotFreed(token)
        case ("slot-go", str(token)):
            return SlotGranted(token)
        case ("told", tuple(names)) if all(isinstance(name, str) for name in names):
            return Told(names)
    raise WorkerProcessError(f"unknown message between spoold processes: {fields!r}")


def plan_slots(workers: int, processes: int) -> list[tuple[str, ...]]:
    """Spread ``workers`` work slots over ``processes`` processes, round robin."""
    count = max(1, min(processes, workers))
    return [tuple(str(slot) for slot in range(n, workers, count)) for n in range(count)]


@dataclass
class _Link:
    """One worker process as the main process sees it."""

    index: int
    slots: tuple[str, ...]
    process: subprocess.Popen[bytes]
    conn: Connection
    linger: float = 0.0  # how long it stays idle (Setup.linger)
    in_flight: dict[str, RunJob] = field(default_factory=dict)  # sent, not reported done
    alive: bool = True
    revoking: bool = False  # a Revoke is out, its Returned not in yet
    #: It said Leaving with nothing in flight and was sent Stop: it takes no more jobs.
    retiring: bool = False
    #: Sends come from intake threads and from this link's receiver: one message at a time.
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    #: Slots kept for claims to be adopted here, their job users' (``WorkerProcesses._reserve``).
    reserved: int = 0

    def send(self, message: Message) -> None:
        """Send one message; OSError when the process is gone."""
        with self.send_lock:
            send_message(self.conn, message)

    @property
    def free(self) -> int:
        """How many more jobs it may be sent (its slots and its prefetch)."""
        # None held beyond its slots while it keeps one: a held job would start in it.
        room = len(self.slots) + (0 if self.reserved else _PREFETCH) - len(self.in_flight)
        return room - self.reserved if self.usable else 0

    @property
    def idle_slots(self) -> int:
        return len(self.slots) - len(self.in_flight) - self.reserved if self.usable else 0

    @property
    def usable(self) -> bool:
        return self.alive and not self.retiring

    @property
    def waiting(self) -> int:
        """Jobs it holds that no slot of it runs yet."""
        return max(len(self.in_flight) - len(self.slots), 0)


class Linger:
    """How long a worker process with nothing to do stays before it leaves.

    A burst of jobs after a quiet spell is most often alone: its worker processes leave after
    ``LINGER_FIRST`` and the daemon is back to its main process (~65 MiB less) within seconds.
    When a job needed one again less than ``ceiling`` (``worker_idle_exit``) after one left,
    that leave cost a start (~0.15 s of CPU and of the job's wait) for little: the next
    processes stay twice as long, up to ``ceiling``, so that jobs coming every few seconds find
    them there after a few starts. A start that comes later than ``ceiling`` after the last
    leave begins again at ``LINGER_FIRST``.
    """

    def __init__(self, ceiling: float, first: float) -> None:
        self._ceiling = ceiling
        self._current = min(first, ceiling)
        self._first = self._current
        self._left: float | None = None

    def left(self, now: float) -> None:
        """A worker process left, idle."""
        self._left = now

    def starting(self, now: float) -> float:
        """How long a worker process started now stays idle (0: for the daemon's life)."""
        if self._left is not None:
            soon = now - self._left < self._ceiling
            self._current = min(self._current * 2, self._ceiling) if soon else self._first
            self._left = None  # processes started together count as one start
        return self._current


class WorkerProcesses:
    """Starts the worker processes, feeds them job ids as slots free up, replaces the dead.

    A worker process that had nothing to do for a while (``Linger``, at most
    ``worker_idle_exit``) leaves (Leaving, then Stop): a quiet daemon keeps none, and no
    launcher either. Its place stays empty until a job waits that the others cannot take;
    then ``on_lost`` asks for ``replace_dead``, which starts it again.

    ``entry`` (``module:function``) is what a worker process runs, given the descriptor of its
    end of the socket pair: the composition root of a worker process, which the daemon's own
    root names (this layer builds no process of its own).
    """

    def __init__(
        self,
        config: Config,
        logger: logging.Logger,
        *,
        processes: int,
        entry: str,
        clock: Clock,
        on_lost: Callable[[], None],
        on_deferred: Callable[[str, float], None],
        on_cancel: Callable[[str, str], None],
        on_observed: Callable[[Observation], None] | None = None,
        on_started: Callable[[], None] | None = None,
        on_told: Callable[[str], None] | None = None,
        executors: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """``on_observed`` hears of each change of state a worker process makes (the
        metrics'), on the thread that reads that process's messages: it must be quick.
        ``on_started``: each worker process started (the metrics' count of them).
        ``on_told``: each delivery a worker process committed, by name (``Told``); None:
        outbox/'s watch tells them, the processes send none.
        ``executors``: what the worker processes may run (``Setup.executors``)."""
        self._config = config
        self._on_told = on_told
        self._executors = executors
        self._on_observed = on_observed
        self._on_started = on_started
        self._child_main = child_main(entry)
        self._on_deferred = on_deferred
        self._on_cancel = on_cancel  # a job to end as cancelled, and why
        self._logger = logger
        self._plan = plan_slots(config.workers, processes)
        self._on_lost = on_lost
        self._lock = threading.Lock()
        # What it holds, queued or in flight, is never queued again: a job is handed out once.
        self._queue = DispatchQueue(config.executor_limits)
        #: By index in the plan; None: none runs there now (it left while idle, or not yet).
        self._links: list[_Link | None] = [None] * len(self._plan)
        self._stopping = False
        self._launcher: DaemonLauncher | None = None
        self._clock = clock
        self._linger = Linger(config.worker_idle_exit, LINGER_FIRST)  # under the lock
        self._slots = sum(len(slots) for slots in self._plan)
        self._claims_taken = False  # whether hold_claims was called
        # A job adopted goes on as the user it ran as: it goes to the worker process that
        # has that user's slot, which keeps the slot for it meanwhile, so that no job that
        # starts there runs as that user beside it (SPEC 13).
        self._user_slots = user_slots(config)
        self._process_of = {slot: index for index, slots in enumerate(self._plan) for slot in slots}
        #: job -> the process keeping a slot for it, and the slot (its user's).
        self._reserved: dict[str, tuple[int, str]] = {}
        self._adopt_slot: dict[str, str] = {}  # an adoption -> its user's slot

    @property
    def processes(self) -> int:
        return len(self._plan)

    def start(self) -> None:
        """Start every worker process and wait until each is ready.

        Call from a thread that lives as long as the daemon: a worker process dies with the
        thread that started it (PR_SET_PDEATHSIG).
        """
        self._launcher = DaemonLauncher()  # one for all: an interpreter fewer each
        links = [self._spawn(index, slots) for index, slots in enumerate(self._plan)]
        for link in links:
            self._await_ready(link)
        with self._lock:  # each known before any is handed a job: adoptions go to their own
            for link in links:
                self._links[link.index] = link
        for link in links:
            self._add(link)

    def _add(self, link: _Link) -> None:
        """Put a ready worker process to use, and hand it what is queued."""
        with self._lock:
            self._links[link.index] = link
            link.reserved = sum(1 for index, _ in self._reserved.values() if index == link.index)
            handed = [self._hand_out(link) for _ in range(link.free + link.reserved)]
            holder = self._holder_to_revoke(link)  # queued behind a job while this one started
        for each in handed:
            self._send(each)
        _revoke(holder)

    def submit(
        self,
        job_id: str,
        document: dict[str, Any] | None = None,
        meta: JobMeta | None = None,
        *,
        adopt: bool = False,
        user: str | None = None,
    ) -> bool:
        """Queue a pending job (``adopt``: a running one whose worker is gone, ``user``: the
        job user it runs as, its lease's) unless it is queued or running already (one waiting
        packed is not looked for: queued again, the two come in as one, see
        DispatchQueue._unpack; ``held`` names those too).

        ``meta`` (priority, concurrency) comes from ``document`` when not given. A job its
        concurrency strategy refuses, or one it replaces, goes to ``on_cancel``.
        """
        if meta is None:
            meta = JobMeta() if document is None else JobMeta.from_document(document)
        with self._lock:
            if job_id in self._queue or self._stopping:
                return False
            if len(self._queue) >= DOCUMENTS_KEPT:
                # A flood's thousands of documents held here were 3.5 MiB of the main
                # process's peak, and left its heap fragmented for good: as much again at rest.
                document = None
            if adopt and (slot := self._user_slots.get(user or "")) is not None:
                self._adopt_slot[job_id] = slot
            # A plain job waits as its id alone (its RunJob is made as it is handed out).
            held = None if document is None and not adopt else RunJob(job_id, document, adopt)
            cancel = self._queue.add(job_id, meta, held, running=adopt)
            handed = self._hand_out(self._free_link())
            holder = None if handed else self._outranked_holder(meta.priority)
            start_one = self._wants_one()
        self._send(handed)
        if start_one:
            self._on_lost()
        _revoke(holder)
        for cancelled, why in cancel:
            self._on_cancel(cancelled, why)
        return all(cancelled != job_id for cancelled, _ in cancel)

    def hold_claims(
        self, claims: Mapping[str, JobMeta], users: Mapping[str, str | None] | None = None
    ) -> None:
        """The jobs in running/ this host may be running outside these worker processes (a
        previous daemon's, not adopted yet), with their limits: each takes a worker slot and
        counts against its executor's limit and its concurrency key until it is adopted
        (``submit`` with ``adopt``) or missing from a later call (it ended, or another host
        took it over); ``users``: the job users they run as, their leases': the worker
        process with that user's slot keeps it for the claim meanwhile. The first call holds
        them; later ones only let go: a job claimed since is this daemon's own, counted as it
        was handed out. (The jobs a worker process that died had in hand are held the same
        way, by ``replace_dead``.)"""
        with self._lock:
            if not self._claims_taken:
                self._claims_taken = True
                for job_id, meta in claims.items():
                    self._queue.hold(job_id, meta)
                    if (slot := self._user_slots.get((users or {}).get(job_id) or "")) is not None:
                        self._reserve(job_id, slot)
                return
            freed = [job_id for job_id in self._queue.held_claims() if job_id not in claims]
            for job_id in freed:
                self._queue.let_go(job_id)
                self._unreserve(job_id)
            handed = self._fill() if freed else []
        for each in handed:
            self._send(each)
        if freed:
            self._grant_slots()

    def held_claims(self) -> frozenset[str]:
        """The claims ``hold_claims`` holds still."""
        with self._lock:
            return self._queue.held_claims()

    def holds(self, job_id: str) -> bool:
        """Whether the job is queued here or in a worker process's hands."""
        with self._lock:
            return self._queue.holds(job_id)

    def held(self) -> frozenset[str]:
        """Every job queued here or in a worker process's hands (``holds``), at one moment."""
        with self._lock:
            return frozenset(self._queue.job_ids())

    def in_flight(self) -> frozenset[str]:
        """Jobs handed to a worker process and not reported done."""
        with self._lock:
            return frozenset().union(*(link.in_flight.keys() for link in self._live()))

    def lost_any(self) -> bool:
        """Whether a worker process died, or queued jobs wait for one that left, and
        ``replace_dead`` has work to do."""
        with self._lock:
            return not self._stopping and (self._wants_one() or any(
                not link.alive and not link.retiring for link in self._live()
            ))  # fmt: skip

    def replace_dead(self) -> list[str]:
        """Restart every worker process that died, start those the queued jobs wait for;
        return the jobs the dead had in hand."""
        lost: list[str] = []
        for link in self._live():
            if link.alive or link.retiring or self._stopping:
                continue
            code = link.process.wait()
            with self._lock:
                lost.extend(link.in_flight)
                for job_id, job in link.in_flight.items():
                    self._queue.lost(job_id)  # counted until adopted, or let go (hold_claims)
                    # It runs on as its user: that slot is kept for it (where it is known).
                    if (slot := job.slot or _only(link.slots)) is not None:
                        self._reserve(job_id, slot)
                link.in_flight.clear()
                self._queue.free_slots(link.index, link.process.pid)
            self._grant_slots()
            self._logger.error(
                "worker process %d (pid %d) ended with %s; starting a new one",
                link.index, link.process.pid, _describe_exit(code),
            )  # fmt: skip
            replacement = self._spawn(link.index, link.slots)
            self._await_ready(replacement)
            self._add(replacement)
        with self._lock:
            wanted = self._wants_one()
        if wanted:
            self._start_wanted()
        return lost

    def _wants_one(self) -> bool:
        """Under the lock: whether a job waits, queued or held behind another, that no running
        worker process has a slot for, while one has left. A new one takes the held jobs
        from their holders (Revoke), as it would from any process it finds busy."""
        return (
            None in self._links and not self._stopping and self._free_link() is None
            and self._waiting() > 0
        )  # fmt: skip

    def _waiting(self) -> int:
        """Under the lock: jobs queued here, or held by a process that has no slot for them."""
        return len(self._queue) + sum(link.waiting for link in self._live() if link.usable)

    def _start_wanted(self) -> None:
        """Start worker processes in the empty places, as many as the queued jobs need slots."""
        with self._lock:
            wanted, started = self._waiting(), []
            for index, link in enumerate(self._links):
                if link is None and wanted > 0:
                    started.append((index, self._plan[index]))
                    wanted -= len(self._plan[index])
        for link in [self._spawn(index, slots) for index, slots in started]:
            try:
                self._await_ready(link)
            except WorkerProcessError as exc:  # the place stays empty: the next round tries again
                self._logger.error("%s", exc)
                continue
            self._add(link)
            self._logger.debug("worker process %d (pid %d) started for queued jobs", link.index,
                               link.process.pid)  # fmt: skip

    def _live(self) -> list[_Link]:
        return [link for link in self._links if link is not None]

    def stop(self, grace: float) -> None:
        """Stop taking jobs; worker processes interrupt theirs after ``grace`` and exit."""
        with self._lock:
            self._stopping = True
            self._queue.clear()
        for link in self._live():
            with contextlib.suppress(OSError):
                link.send(Stop(float(grace)))
        for link in self._live():
            try:
                link.process.wait(timeout=grace + _STOP_MARGIN)
            except subprocess.TimeoutExpired:
                self._logger.error("worker process %d did not stop; killing it", link.index)
                link.process.kill()
                link.process.wait()
            link.conn.close()
        if self._launcher is not None:
            self._launcher.close()

    def _spawn(self, index: int, slots: tuple[str, ...]) -> _Link:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        launcher = None if self._launcher is None else self._launcher.connect()
        launcher_fd = None if launcher is None else launcher.fileno()  # the same in the child
        passed = (theirs.fileno(), *([] if launcher_fd is None else [launcher_fd]))
        with ours, theirs, launcher or contextlib.nullcontext():
            process = subprocess.Popen(
                [sys.executable, "-c", self._child_main, str(theirs.fileno())], pass_fds=passed
            )
            conn = Connection(ours.detach())
        if self._on_started is not None:
            self._on_started()
        with self._lock:
            linger = self._linger.starting(self._clock.monotonic())
        conn.send(Setup(self._config, slots, os.getpid(), observe=self._on_observed is not None,
                        launcher=launcher_fd, executors=self._executors, linger=linger,
                        tell=self._on_told is not None))  # fmt: skip
        return _Link(index, slots, process, conn, linger=linger)

    def _await_ready(self, link: _Link) -> None:
        """Wait for the Ready of a new worker process, then listen to it."""
        try:
            if not link.conn.poll(_READY_BOUND):
                raise WorkerProcessError(
                    f"worker process {link.index} was not ready after {_READY_BOUND:.0f}s"
                )
            if not isinstance(message := receive_message(link.conn), Ready):
                raise WorkerProcessError(
                    f"worker process {link.index} said {message!r} instead of Ready"
                )
        except (EOFError, OSError) as exc:
            code = link.process.wait()
            raise WorkerProcessError(
                f"worker process {link.index} ended while starting ({_describe_exit(code)})"
            ) from exc
        threading.Thread(
            target=self._receive, args=(link,), name=f"spoold-link-{link.index}", daemon=True
        ).start()

    def _receive(self, link: _Link) -> None:
        try:
            while True:
                message = receive_message(link.conn)
                if isinstance(message, Done):
                    with self._lock:
                        link.in_flight.pop(message.job_id, None)
                        self._queue.finished(message.job_id)
                        handed = self._hand_out(link)
                        holder = self._holder_to_revoke(link)
                    self._send(handed)  # the freed slot's next job, without another thread
                    _revoke(holder)
                    for observation in message.observations:
                        self._observed(observation)
                elif isinstance(message, Observed):
                    for observation in message.observations:
                        self._observed(observation)
                elif isinstance(message, Deferred):
                    self._on_deferred(message.job_id, message.due)
                elif isinstance(message, Told):
                    if (told := self._on_told) is not None:
                        for name in message.names:
                            told(name)
                    continue  # frees nothing
                elif isinstance(message, Leaving):
                    self._leaving(link)
                elif isinstance(message, Returned):
                    with self._lock:
                        link.revoking = False
                        for job_id in message.job_ids:
                            if (job := link.in_flight.pop(job_id, None)) is not None:
                                self._queue.give_back(job_id)  # to its old place in line
                                if job.adopt and job.slot is not None:
                                    self._adopt_slot[job_id] = job.slot  # still its user's
                        handed_out = [self._hand_out(self._free_link()) for _ in message.job_ids]
                    for each in handed_out:
                        self._send(each)
                elif isinstance(message, SlotWanted):
                    with self._lock:
                        now = self._queue.want_slot(
                            _slot_key(link, message.token), message.executor,
                            running=message.running,
                        )  # fmt: skip
                    if now:
                        link.send(SlotGranted(message.token))
                    continue  # frees nothing
                elif isinstance(message, SlotFreed | Stepping):
                    with self._lock:
                        if isinstance(message, Stepping):
                            self._queue.stepping(message.job_id)
                        else:
                            self._queue.free_slot(_slot_key(link, message.token))
                        filled = self._fill()
                    for each in filled:
                        self._send(each)
                self._grant_slots()  # whatever freed one: the steps waiting go first
        except (EOFError, OSError, WorkerProcessError):
            pass  # a worker process that says nonsense is as good as dead: it is replaced
        if link.retiring:
            link.process.wait()  # it stops at once: nothing in flight, Stop sent
            link.conn.close()
        with self._lock:
            link.alive = False
            stopping = self._stopping
            if link.retiring and self._links[link.index] is link:
                self._links[link.index] = None
                self._linger.left(self._clock.monotonic())
            wanted = link.retiring and self._wants_one()
            resting = link.retiring and not (wanted or stopping or self._live())
        if wanted or not (stopping or link.retiring):
            self._on_lost()
        if resting:
            if self._launcher is not None:
                self._launcher.rest()
            # A burst (a flood's intake) left free pages in the heaps of the threads that
            # served it: a daemon at rest gives them back (~1 MiB after 10,000 files).
            release_memory()

    def _grant_slots(self) -> None:
        """Tell the steps that waited for a slot of their executor, and have one now."""
        with self._lock:
            if not (granted := self._queue.granted()):
                return
            links = {(link.index, link.process.pid): link for link in self._live()}
        for index, pid, token in granted:
            if (link := links.get((index, pid))) is not None:
                with contextlib.suppress(OSError):  # it died: its slots are freed as it goes
                    link.send(SlotGranted(token))

    def _leaving(self, link: _Link) -> None:
        """A worker process had nothing to do for a while: stop it, unless a job is on its way."""
        with self._lock:
            if link.in_flight or link.revoking or link.reserved or self._stopping:
                return  # it hears the job and stays; a stopping daemon stops it anyway
            link.retiring = True
        self._logger.debug("worker process %d (pid %d) idle for %gs: stopping it", link.index,
                           link.process.pid, link.linger)  # fmt: skip
        with contextlib.suppress(OSError):  # it died meanwhile: the end is the same
            link.send(Stop(float(self._config.shutdown_grace)))

    def _observed(self, observation: Observation) -> None:
        """Hand an observation on; a failure there is logged, never felt by the link's reader
        (which would take it for a dead worker process)."""
        if self._on_observed is None:
            return
        try:
            self._on_observed(observation)
        except Exception:
            self._logger.exception("counting %s of job %s failed", observation.kind,
                                   observation.job_id)  # fmt: skip

    def _hand_out(self, link: _Link | None) -> tuple[_Link, RunJob] | None:
        """Under the lock: the next queued job, reserved for a free slot of ``link``; an
        adoption first, wherever it goes (``_adoption``).

        While claims are held (``hold_claims``), each keeps a slot: beside them only as many
        jobs go out, prefetched ones included, as there are slots left; adoptions always do
        (each takes the slot its claim kept)."""
        if not self._queue or self._stopping:
            return None
        if (adoption := self._adoption()) is not None:
            return adoption
        if link is None or link.free <= 0:
            return None
        claims = self._queue.claims
        full = claims > 0 and sum(len(each.in_flight) for each in self._live()) + claims >= (
            self._slots
        )
        if (taken := self._queue.take(adopted_only=full)) is None:
            return None  # what waits, waits for a concurrency limit
        job: RunJob = taken[1] or RunJob(taken[0])
        if link.reserved:
            # A process keeping slots: the job runs as the user of one it does not keep.
            taken_slots = {kept for index, kept in self._reserved.values() if index == link.index}
            taken_slots.update(each.slot for each in link.in_flight.values() if each.slot)
            free = [slot for slot in link.slots if slot not in taken_slots]
            job = dataclasses.replace(job, slot=free[0] if free else None)
        link.in_flight[job.job_id] = job
        return link, job

    def _adoption(self) -> tuple[_Link, RunJob] | None:
        """Under the lock: an adoption queued, to the worker process with its user's slot
        (which kept it for the job, if it was held: it goes there whatever else waits), else
        to one with room; None if none is queued, or none can take it now."""
        if (taken := self._queue.take(adopted_only=True)) is None:
            return None
        job: RunJob = taken[1] or RunJob(taken[0], adopt=True)
        slot = self._adopt_slot.pop(job.job_id, None)
        owner = None if slot is None else self._links[self._process_of[slot]]
        target = owner if owner is not None and owner.usable else self._free_link()
        if target is None:
            self._queue.give_back(job.job_id)  # at the head of the line again
            if slot is not None:
                self._adopt_slot[job.job_id] = slot
            return None
        self._unreserve(job.job_id)
        if target is owner:  # else its user's process is gone: it goes on as its lease says
            job = dataclasses.replace(job, slot=slot)
        target.in_flight[job.job_id] = job
        return target, job

    def _reserve(self, job_id: str, slot: str) -> None:
        """Under the lock: the worker process with ``slot`` keeps it for a job it will adopt
        (the job runs as that slot's user): no job starts there as that user meanwhile."""
        self._unreserve(job_id)
        index = self._process_of[slot]
        self._reserved[job_id] = index, slot
        if (link := self._links[index]) is not None:
            link.reserved += 1

    def _unreserve(self, job_id: str) -> None:
        if (kept := self._reserved.pop(job_id, None)) is not None and (
            link := self._links[kept[0]]
        ) is not None:
            link.reserved -= 1

    def _outranked_holder(self, priority: int) -> _Link | None:
        """Under the lock: a process holding, unstarted, a job of lower priority than a new one.

        Its held jobs come back (Revoke, Returned) and go out again in priority order.
        """
        for link in self._live():
            if not link.usable or not link.waiting or link.revoking:
                continue
            if any(self._queue.priority_of(job_id) < priority for job_id in link.in_flight):
                link.revoking = True
                return link
        return None

    def _holder_to_revoke(self, freed: _Link) -> _Link | None:
        """Under the lock: a process holding a job it cannot start while ``freed`` idles."""
        if self._queue or freed.idle_slots <= 0 or self._stopping:
            return None
        for link in self._live():
            if link is not freed and link.usable and link.waiting and not link.revoking:
                link.revoking = True
                return link
        return None

    def _send(self, handed: tuple[_Link, RunJob] | None) -> None:
        if handed is None:
            return
        link, job = handed
        try:
            link.send(job)
        except OSError:  # it died: the job stays pending, and a scan queues it again
            with self._lock:
                link.in_flight.pop(job.job_id, None)
                self._queue.finished(job.job_id)

    def _fill(self) -> list[tuple[_Link, RunJob]]:
        """Under the lock: hand out what may go now to the processes with room for it."""
        handed = []
        while (each := self._hand_out(self._free_link())) is not None:
            handed.append(each)  # in its link's in_flight: the next _free_link sees it
        return handed

    def _free_link(self) -> _Link | None:
        """The process to send a job to: an idle slot first, then room to prefetch."""
        best = max(self._live(), key=lambda link: (link.idle_slots, link.free), default=None)
        return best if best is not None and best.free > 0 else None


def _only(slots: tuple[str, ...]) -> str | None:
    return slots[0] if len(slots) == 1 else None


def _slot_key(link: _Link, token: str) -> SlotKey:
    """A step's slot as dispatch knows it: its worker process (a replacement is another) and
    the token that process gave it."""
    return link.index, link.process.pid, token


def _revoke(holder: _Link | None) -> None:
    """Ask ``holder`` (if any) for the jobs it holds unstarted."""
    if holder is not None:
        with contextlib.suppress(OSError):  # its receiver sees it die
            holder.send(Revoke())


def _describe_exit(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def child_main(entry: str) -> str:
    """The ``python -c`` program of a worker process that runs ``entry`` (``module:function``):
    a fresh interpreter (no fork of a threaded process), given its socket's descriptor."""
    module, _, function = entry.partition(":")
    if not (module and function.isidentifier()):
        raise ValueError(f"not a module:function: {entry!r}")
    return f"import sys; from {module} import {function}; {function}(int(sys.argv[1]))"


# SIGPIPE and SIGXFSZ: subprocess resets them in each child (restore_signals).
_RESET_BY_SUBPROCESS = (signal.SIGPIPE, signal.SIGXFSZ)


def _disregard(signum: int, frame: object) -> None:
    """A worker process's handler for the signals it must neither die of nor pass on ignored."""


def set_up_signals() -> None:
    """A worker process's signals, and its jobs': the main process decides when to stop
    (Stop), so a Ctrl-C or SIGTERM to the process group is not this process's to act on.

    Caught, not ignored: an ignored signal stays ignored across exec, so every job would start
    deaf to it (its `trap ... TERM` would never run); a caught one starts at its default. The
    same for what the daemon was started with ignored, or ignores itself (SIGIO; nohup's
    SIGHUP): this process goes on disregarding it, its jobs start clean, and spoold.run.process
    starts them without a step in the child.

    Not a child subreaper: the jobs' processes are their supervisors' (spoold.run.launcher),
    which must go to init, never to this process, when their launcher is gone.
    """
    for signum in signal.valid_signals():
        if signum in (signal.SIGINT, signal.SIGTERM) or (
            signum not in _RESET_BY_SUBPROCESS and signal.getsignal(signum) == signal.SIG_IGN
        ):
            signal.signal(signum, _disregard)


def receive_setup(fd: int) -> tuple[Connection, Setup] | None:
    """In a new worker process: die with the main process, then read the Setup; None if orphaned."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    set_up_signals()
    conn = Connection(fd)
    try:
        setup = conn.recv()
    except EOFError:
        return None
    if not isinstance(setup, Setup) or os.getppid() != setup.parent:
        return None  # the main process died before prctl took effect
    return conn, setup


def serve_jobs(
    conn: Connection,
    parent: ParentLink,
    runner: JobRunner,
    pool: WorkerPool,
    heartbeat: LeaseHeartbeat,
    *,
    launcher: Launcher,
    slots: LinkedSlots,
    config: Config,
    clock: Clock,
    linger: float,
) -> None:
    """A worker process's loop: take jobs from the main process, keep leases alive, let
    supervisors that wait for work too long go (``launcher``), hand the slots the main process
    grants to the steps that asked (``slots``), say Leaving when it had nothing to do for
    ``linger`` seconds (0: never), stop.

    ``heartbeat`` is ticked between messages while a job is queued or runs here.
    """
    heartbeat.restart(clock.monotonic())
    pool.start()
    parent.send(Ready())
    busy_seen = clock.monotonic()  # when it last saw work here
    idle_since: float | None = busy_seen
    leaving = False
    while True:
        ended = pool.idle_since  # None while a job is queued or runs in its slots
        busy = ended is None or bool(runner.active_ids())
        now = clock.monotonic()
        if busy:
            idle_since, leaving, busy_seen = None, False, now
        elif idle_since is None and ended is not None:
            # A job's end wakes no one here (a wake a job cost the slots more than it saves):
            # the pool says when its last job ended, and the loop looks at least once a linger.
            # Never before it last saw work (a job the runner held outside the pool's slots).
            idle_since = min(max(ended, busy_seen), now)
        due = [heartbeat.next_due] if busy else []
        if linger and not leaving:
            if idle_since is None:
                due.append(now + linger)
            elif now >= idle_since + linger:
                parent.send(Leaving())  # the main process answers Stop unless a job is on its way
                leaving = True
            else:
                due.append(idle_since + linger)
        if (expiry := launcher.expire(now)) is not None:
            due.append(expiry)
        if conn.poll(max(min(due) - now, 0.0) if due else None):
            try:
                message = receive_message(conn)
            except (EOFError, OSError):  # the main process is gone: stop as it would have
                message = Stop(config.shutdown_grace)
            if isinstance(message, Stop):
                pool.stop(message.grace, clock)
                parent.close()
                return
            if isinstance(message, RunJob):
                if message.document is not None:
                    runner.remember(message.job_id, message.document)
                pool.submit(message.job_id, adopt=message.adopt, slot=message.slot)
            elif isinstance(message, SlotGranted):
                slots.granted(message.token)
            elif isinstance(message, Revoke):
                parent.send(Returned(tuple(pool.revoke())))
        now = clock.monotonic()
        if busy:
            heartbeat.tick(now)
        else:
            heartbeat.restart(now)


class ParentLink:
    """A worker process's link to the main process: its messages, one at a time from any
    thread (not spoold.out.outbox, which holds the callbacks' deliveries).

    Observations are held for up to ``window`` seconds and go out together: in the next
    ``Done`` (a slot's, which comes every job), ahead of any other message sent meanwhile, or
    else by a thread of their own once the window is over.
    """

    def __init__(self, conn: Connection, *, window: float = _OBSERVED_WINDOW) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._held: list[Observation] = []
        self._since = 0.0  # when the first of those held came (time.monotonic)
        self._window = window
        self._changed = threading.Condition(self._lock)
        self._closed = False
        self._sender: threading.Thread | None = None

    def send(self, message: Message) -> None:
        with self._lock, contextlib.suppress(OSError):  # the main process is gone: no one hears
            if self._held and isinstance(message, Done):  # the most frequent: they go along
                message, self._held = Done(message.job_id, tuple(self._held)), []
            self._send_held()
            send_message(self._conn, message)

    def close(self) -> None:
        """Send what is held; hold nothing more (the process ends)."""
        with self._lock:
            self._closed = True
            with contextlib.suppress(OSError):
                self._send_held()
            self._changed.notify()
        if self._sender is not None:
            self._sender.join()

    def done(self, job_id: str) -> None:
        """What the slots call when they are done with a job."""
        self.send(Done(job_id))

    def deferred(self, job_id: str, due: float) -> None:
        """What the runner calls when a job waits in pending/ for its next attempt."""
        self.send(Deferred(job_id, due))

    def told(self, name: str) -> None:
        """What the callbacks call for each delivery committed here (``Setup.tell``)."""
        self.send(Told((name,)))

    def observed(self, observation: Observation) -> None:
        """What the runner's ledger listener calls for each change of state (the metrics')."""
        with self._lock:
            if self._closed:
                with contextlib.suppress(OSError):
                    send_message(self._conn, Observed((observation,)))
                return
            self._held.append(observation)
            if len(self._held) == 1:
                # Real time, not a Clock: how long a batch waits to go is no job's time.
                self._since = time.monotonic()
                if self._sender is None:
                    self._sender = threading.Thread(
                        target=self._send_in_time, name="spoold-observed", daemon=True
                    )
                    self._sender.start()
                self._changed.notify()
            elif len(self._held) >= _OBSERVED_MOST:
                with contextlib.suppress(OSError):
                    self._send_held()

    def _send_held(self) -> None:
        """Under the lock: the observations held, in one message."""
        if self._held:
            held, self._held = tuple(self._held), []
            send_message(self._conn, Observed(held))

    def _send_in_time(self) -> None:
        """Send the observations no other message took along, ``window`` after the first."""
        with self._lock:
            while not self._closed:
                if not self._held:
                    self._changed.wait()
                    continue
                left = self._since + self._window - time.monotonic()
                if left > 0:
                    self._changed.wait(left)
                    continue
                with contextlib.suppress(OSError):
                    self._send_held()


class LinkedSlots:
    """A worker process's executor slots (spoold.run.executor_slots): the main process counts
    them with its jobs', and answers each claim in turn."""

    def __init__(self, parent: ParentLink, limits: Mapping[str, int]) -> None:
        self._parent = parent
        self._limits = dict(limits)
        self._lock = threading.Lock()
        self._tickets: dict[str, Ticket] = {}
        self._tokens = itertools.count()

    def stepping(self, job_id: str) -> None:
        if self._limits:  # else its executor is counted by nothing
            self._parent.send(Stepping(job_id))

    def claim(self, executor: str, *, running: bool = False) -> Ticket:
        if executor not in self._limits:
            return free_ticket()
        token = str(next(self._tokens))
        ticket = Ticket(lambda: self._free(token))
        with self._lock:
            self._tickets[token] = ticket
        self._parent.send(SlotWanted(token, executor, running))
        return ticket

    def granted(self, token: str) -> None:
        """The main process's SlotGranted (one given back meanwhile is freed again by it)."""
        with self._lock:
            ticket = self._tickets.get(token)
        if ticket is not None:
            ticket.granted.set()

    def _free(self, token: str) -> None:
        with self._lock:
            del self._tickets[token]
        self._parent.send(SlotFreed(token))
