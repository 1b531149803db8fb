"""Supervisors for a job's processes, and the chores done as the job's user, forked on request by
a launcher: a small single-threaded process the daemon starts once for its worker processes.

Why a launcher. A job's process must outlive the daemon (a crash, ``kill -9``, an upgrade), so
something that is not the daemon must own it: its **supervisor**, which starts it as the job's
user, writes its output into the job's log within the limits, ends its whole tree on a timeout,
a cancel or its own end, and records how it ended in the job's directory. The next daemon
adopts it (``spoold.run.worker``) instead of failing or requeueing the job. A fresh Python
for each supervisor costs ~80 ms and ~13 MB; a fork of the worker process is unsafe (it has
threads). The launcher is a fresh interpreter made once, single-threaded, with what a
supervisor needs imported: a fork of it costs ~1 ms and shares its pages.

The same forks do a job user's file work: make the job's work dir, empty it, open its
artifacts. The daemon may lack the right to read or remove what the job user made (in the
Debian package it has CAP_SETUID, CAP_SETGID and CAP_KILL, no more), so it does that work as
that user, in a child that became them.

The daemon starts one launcher for all its worker processes (``DaemonLauncher``: one
interpreter, ~16 MiB RSS, fewer than one each), and hands each worker process a socket to it;
when the last of them has left (idle, see spoold.run.pool) it lets the launcher end, and the
next worker process started gets a new one.
A worker process whose launcher is gone (the OOM killer, an operator) starts one of its own,
as ``spoold exec`` and the tests do. A launcher ends once every socket it serves has reached end
of file: its worker processes' and the daemon's own; supervisors do not: they are in sessions
of their own, and when the launcher is gone they are init's.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import gc
import os
import pickle
import re
import select
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from spoold.core.clock import Clock, SystemClock, parse_rfc3339, rfc3339
from spoold.core.errors import ExecutorError, JobFenced, NotStarted, SpooldError
from spoold.core.joblog import JobLog
from spoold.core.procfs import (
    children,
    drop_ambient_capabilities,
    name_process,
    process_info,
    process_of_user,
    process_start_time,
)
from spoold.core.secrets import Masker
from spoold.core.spool.fs import rename_noreplace
from spoold.core.spool.hosts import others_may_take_over
from spoold.core.spool.jobs import JobDir, Jobs, check_fence
from spoold.core.spool.spares import Spares
from spoold.core.units import format_duration
from spoold.core.usage import Usage
from spoold.run.log_socket import LogTap
from spoold.run.process import (
    TREE_VARIABLE,
    Processes,
    ProcessOutcome,
    RunAs,
    adopt_orphans,
    clean_signal_state,
    end_left_running,
    forget_prepared,
    new_token,
    prepare_next_run,
    run_cgroup,
    run_process,
)

#: Where the spoold package this process imported lives (for the launcher's import path).
_SPOOLD_ROOT = str(Path(__file__).parents[2])
_HEADER = struct.Struct("!I")
_FD_BATCH = 64  # descriptors per message (SCM_RIGHTS takes at most 253)
#: Supervisors kept waiting for a next unit, per worker process: each holds ~2.5 MB of its own.
_IDLE_SUPERVISORS = 4
#: How long one waits for a next unit before it is let go. A new one costs a fork (~1 ms, and
#: its first copy-on-write faults): nothing beside a gap this long; one kept costs ~7 MiB PSS.
IDLE_SUPERVISOR_FOR = 5.0
#: How often a waiting worker looks at the cancel and detach switches.
_LOOK = 0.2


class LauncherError(SpooldError):
    """The launcher could not be started or reached, or a chore failed."""


class Supervise(NamedTuple):
    """Start one unit's process under a supervisor."""

    job: JobDir
    key: str
    argv: tuple[str, ...]
    cwd: str
    env: dict[str, str]
    run_as: RunAs | None
    timeout: float | None
    kill_grace: float
    label: str
    sections: tuple[str, ...]
    masks: tuple[str, ...]
    log_limit: int | None
    host: str
    #: RUNNER_LOG_SOCKET: where every line goes too.
    log_socket: str | None = None
    #: Where the supervisor makes a spare ahead for its next unit's record (the spool's tmp/),
    #: and for which host (``Spares``).
    spares: tuple[str, str] | None = None
    #: How often the supervisor looks at the claim while its unit runs (the daemon's
    #: ``heartbeat_interval``): it ends the unit if the job was taken over, and moves the
    #: claim's beat itself while its worker is gone (``_Keeper``). None: it does not.
    beat_interval: float | None = None
    #: For a job another host would run again once it took it over (``on_interrupt:
    #: requeue``): when the supervisor ends the unit itself, the spool out of its reach.
    cut_off: CutOff | None = None


class CutOff(NamedTuple):
    """A unit ends if the spool has been out of reach while its claim's beat was last seen
    moving ``after`` seconds ago, and the host's record (``host_record``) last showed
    another host that may take the job over: its run there could not be stopped before
    that host runs the job again (``_Keeper``)."""

    after: float
    host_record: str
    lease_timeout: float

    def why(self, still: float, stood: str) -> str | None:
        """Why the unit ends, what ``stood`` still for ``still`` seconds (the claim's beat,
        the lease) with the spool out of reach; None while it may run on."""
        if still < self.after:
            return None
        return (
            f"the spool was out of reach and {stood}: another host may take it over after "
            f"lease_timeout ({format_duration(self.lease_timeout)}) and run it again"
        )


class AddClient(NamedTuple):
    """To a launcher, from the daemon: serve one more worker process, on the socket that
    comes with this message."""


class Chore(NamedTuple):
    """File work on a job's work dir, done as its user (``None``: as the daemon's own)."""

    kind: str  # "mkdir", "remove", "artifacts" or "leftovers"
    user: RunAs | None
    path: str
    #: For "artifacts": (glob, type) of each declared artifact, relative to ``path``.
    patterns: tuple[tuple[str, str], ...] = ()
    #: For "mkdir": the work dir's mode, and an empty directory made ahead in the work root
    #: (``spoold.core.spool.spares``) to be renamed into place instead of a new one.
    mode: int = 0o700
    spare: str | None = None
    #: For "artifacts": at most this many files are opened (``limits.max_artifacts``); those
    #: found past it are only counted, so that a job's million files cost no million opens.
    max_files: int | None = None
    #: For "leftovers": the shared directories (``spoold.run.lane.SHARED_DIRS``) to look
    #: through, and from when (wall-clock nanoseconds) what the user changed there counts.
    sweep: tuple[str, ...] = ()
    since: int = 0


class Leftovers(NamedTuple):
    """From a leftovers chore: how many entries the user had made or changed in the shared
    directories during the attempt, the first few of them, and whether they were removed:
    kept where a process of the user's runs on (``busy``: the user is not the attempt's
    alone now, as under another daemon)."""

    number: int = 0
    names: tuple[str, ...] = ()
    busy: int | None = None


class ArtifactsLeft(NamedTuple):
    """From an artifacts chore, after its files: what it left out for one ``reason``,
    ``number`` of them (``more``: it stopped counting there), the first few ``names``."""

    reason: str
    number: int
    more: bool
    names: tuple[str, ...]
    what: str = "file(s)"


# -- framing: a length, a pickle, and descriptors riding on the length --------------------------


def _send(sock: socket.socket, message: object, fds: tuple[int, ...] = ()) -> None:
    data = pickle.dumps(message)
    frame = _HEADER.pack(len(data)) + data  # one system call for both (three a unit's end)
    sent = socket.send_fds(sock, [frame], list(fds)) if fds else 0
    if sent < len(frame):  # a signal may cut a send with descriptors short
        sock.sendall(frame[sent:])


def _receive(sock: socket.socket) -> tuple[Any, list[int]]:
    """A message and the descriptors that came with it; EOFError at the end of the stream."""
    header, fds, _, _ = socket.recv_fds(sock, _HEADER.size, _FD_BATCH)
    if not header:
        raise EOFError
    while len(header) < _HEADER.size:
        header += _exactly(sock, _HEADER.size - len(header))
    (length,) = _HEADER.unpack(header)
    return pickle.loads(_exactly(sock, length)), fds  # noqa: S301 - our own processes' pickles


def _exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(left)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# -- the worker's side -------------------------------------------------------------------------


class Launcher:
    """A worker process's way to its launcher process: started on first use, thread-safe."""

    _shared: Launcher | None = None
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls) -> Launcher:
        """This process's launcher: it lives as long as the process (it reads end of file
        when the process is gone)."""
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    @classmethod
    def share(cls, sock: socket.socket) -> None:
        """Make this process's launcher the one at the end of ``sock`` (the daemon's), before
        its first use."""
        with cls._shared_lock:
            assert cls._shared is None, "this process's launcher is in use already"
            cls._shared = cls(sock=sock)

    def __init__(
        self, *, chores_here: bool | None = None, sock: socket.socket | None = None
    ) -> None:
        """``chores_here``: do the chores in this process, not in a fork that became the job's
        user; by default when this process is root, which may do them for any user at the
        cost of a few system calls (a fork costs milliseconds). ``sock``: a launcher's socket
        (the daemon's, which others use too): else one of its own is started on first use,
        and again if the one in use is gone."""
        self._lock = threading.Lock()
        self._sock: socket.socket | None = sock
        self._process: subprocess.Popen[bytes] | None = None
        self._chores_here = os.geteuid() == 0 if chores_here is None else chores_here
        # Supervisors that ended a unit, for the next, with when they did (monotonic seconds).
        self._idle: list[tuple[socket.socket, float]] = []

    def request(self, message: Supervise | Chore, fds: tuple[int, ...] = ()) -> socket.socket:
        """Hand ``message`` to a fork of the launcher; return the socket its answers come on."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with self._lock:
                sock = self._started()
                try:
                    _send(sock, message, (theirs.fileno(), *fds))
                except OSError:  # it died (a test killed it, the OOM killer): once more
                    self._stop()
                    _send(self._started(), message, (theirs.fileno(), *fds))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return ours

    def supervise(self, request: Supervise, fds: tuple[int, ...] = ()) -> socket.socket:
        """Hand a unit to an idle supervisor, or to a new one; return its socket."""
        while True:
            with self._lock:
                # The one that waited least: the others age out at quiet times.
                idle = self._idle.pop()[0] if self._idle else None
            if idle is None:
                return self.request(request, fds)
            try:
                _send(idle, request, fds)
            except OSError:  # it ended meanwhile (a signal): another, or a new one
                idle.close()
                continue
            return idle

    def release(self, sock: socket.socket, now: float) -> None:
        """Keep a supervisor that ended its unit at ``now`` for the next; past a few, let it
        end (it reads end of file)."""
        with self._lock:
            if len(self._idle) < _IDLE_SUPERVISORS:
                self._idle.append((sock, now))
                return
        sock.close()

    def expire(self, now: float) -> float | None:
        """Let the supervisors that waited IDLE_SUPERVISOR_FOR for a unit end; return when the
        next of those kept will have waited that long (None: none is kept)."""
        with self._lock:
            kept = []
            for sock, since in self._idle:
                if now - since < IDLE_SUPERVISOR_FOR:
                    kept.append((sock, since))
                else:
                    sock.close()
            self._idle = kept
        return kept[0][1] + IDLE_SUPERVISOR_FOR if kept else None  # the first kept waited longest

    @property
    def chores_here(self) -> bool:
        """Whether chores are done in the calling process (it is root), not by the launcher."""
        return self._chores_here

    def chore(self, chore: Chore) -> Any:
        """Do ``chore`` and return its answer; LauncherError with its reason if it failed."""
        if self._chores_here:
            try:
                return _do_chore(chore, chown=True)
            except OSError as exc:
                raise LauncherError(f"{chore.kind} {chore.path}: {exc}") from None
        with self.request(chore) as sock:
            try:
                answer, _ = _receive(sock)
            except EOFError:
                raise LauncherError(f"the {chore.kind} chore on {chore.path} died") from None
        if isinstance(answer, Exception):
            raise LauncherError(str(answer))
        return answer

    def artifacts(self, chore: Chore) -> Iterator[tuple[str, int] | str | ArtifactsLeft]:
        """Open the declared artifacts as the job's user: each found file's path and an open
        descriptor (the caller closes it), a line for the log (a glob that matched nothing),
        or what was left out for one reason, after the files."""
        if self._chores_here:
            yield from _artifacts(chore)
            return
        with self.request(chore) as sock:
            while True:
                try:
                    answer, fds = _receive(sock)
                except EOFError:
                    raise LauncherError(
                        f"collecting the artifacts of {chore.path} failed"
                    ) from None
                if answer is None:
                    return
                if isinstance(answer, Exception):  # the chore failed: what it found stands
                    raise LauncherError(str(answer))
                if isinstance(answer, str | ArtifactsLeft):
                    yield answer
                    continue
                for index, relative in enumerate(answer):
                    yield relative, fds[index]

    def start(self) -> None:
        """Start the launcher process now, not on the first request."""
        with self._lock:
            self._started()

    def drain(self) -> None:
        """Let the idle supervisors end (each reads end of file)."""
        with self._lock:
            for idle, _ in self._idle:
                idle.close()
            self._idle.clear()

    def close(self) -> None:
        self.drain()
        with self._lock:
            self._stop()

    def _started(self) -> socket.socket:
        if self._sock is None:
            self._sock, self._process = _start_launcher()
        return self._sock

    def _stop(self) -> None:
        if self._sock is not None:
            self._sock.close()  # the launcher reads end of file and exits, unless it is shared
            self._sock = None
        if self._process is not None:
            _reap(self._process)
            self._process = None


class DaemonLauncher:
    """The daemon's launcher, shared by its worker processes: each is handed a socket to it
    (``connect``). It ends once the daemon (``close``, ``rest``) and every worker process are
    done with it; the next ``connect`` starts another."""

    def __init__(self) -> None:
        self._control: socket.socket | None
        self._control, self._process = _start_launcher()
        self._lock = threading.Lock()

    def connect(self) -> socket.socket | None:
        """A new socket to the launcher, for a worker process (a new launcher if it rested or
        died); None if it cannot be reached (that worker process starts one of its own)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with ours, self._lock:
            if self._control is None or self._process.poll() is not None:  # poll() reaps it
                if self._control is not None:
                    self._control.close()
                self._control, self._process = _start_launcher()
            try:
                _send(self._control, AddClient(), (ours.fileno(),))
            except OSError:
                theirs.close()
                return None
        return theirs

    def rest(self) -> None:
        """No worker process runs: let the launcher end (an interpreter less at rest)."""
        if (process := self._let_go()) is not None:
            # It ends at once unless a worker process connected meanwhile: then it serves that one.
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)

    def close(self) -> None:
        """Let it end once the worker processes are done with it (call after they stopped)."""
        self._let_go()
        _reap(self._process)

    def _let_go(self) -> subprocess.Popen[bytes] | None:
        """Close the daemon's socket to the launcher; the launcher, or None if let go before."""
        with self._lock:
            if self._control is None:
                return None
            self._control.close()
            self._control = None
            return self._process


def _start_launcher() -> tuple[socket.socket, subprocess.Popen[bytes]]:
    """A new launcher process, and a socket it serves."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with theirs:
        # This interpreter and this import path, where site-packages stands for the place
        # this spoold came from, but without site: the launcher imports nothing from
        # site-packages, and each supervisor, a fork, counts again what the launcher holds
        # (site and its .pth files are ~0.5 MiB of anonymous memory, measured).
        code = (
            f"import sys; sys.path.append({_SPOOLD_ROOT!r}); from {__name__} import serve; serve()"
        )
        process = subprocess.Popen(
            [sys.executable, "-S", "-c", code, str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
        )  # fmt: skip
    return ours, process


def _reap(process: subprocess.Popen[bytes]) -> None:
    """Wait for a launcher whose sockets were closed; kill one that does not end."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)
    if process.poll() is None:
        process.kill()
        process.wait()


class Supervised(Processes):
    """Runs a job's processes under supervisors, or finds those an earlier daemon started.

    One per attempt of a job. ``resume``: the attempt was begun under an earlier daemon: a
    unit found begun is attached to (its supervisor may still run) or, if it ended, its
    outcome is taken as it was recorded; only a unit never begun is started.
    """

    def __init__(
        self,
        launcher: Launcher,
        jobs: Jobs,
        job: JobDir,
        *,
        masker: Masker,
        log_limit: int | None,
        host: str,
        resume: bool = False,
        log_socket: Path | None = None,
        meanwhile: Callable[[], None] | None = None,
        beat_interval: float | None = None,
        cut_off: CutOff | None = None,
    ) -> None:
        """``meanwhile``: what the caller does while a unit's process starts, once it has been
        asked for (``JobRunner.attempt``); ``beat_interval``, ``cut_off``: ``Supervise``'s."""
        self._beat_interval = beat_interval
        self._cut_off = cut_off
        self._launcher = launcher
        self._jobs = jobs
        self._job = job
        self._masker = masker
        self._log_limit = log_limit
        self._host = host
        self._log_socket = None if log_socket is None else str(log_socket)
        self._meanwhile = meanwhile
        self.resume = resume
        self._ends = threading.Lock()
        #: The latest end of the units that ended while no daemon watched them, as their
        #: supervisors recorded it; and whether a unit ran, or ended, in this one's sight.
        self._unwatched_end: datetime | None = None
        self._watched = False

    def ended_unwatched(self) -> datetime | None:
        """When the attempt's work ended, if each of its units ended while no daemon watched
        it (an adopted job that ended while the daemon was down): the last end their
        supervisors recorded, which is the attempt's, not the time of this adoption. None if
        a unit ran or ended in this daemon's sight: the attempt ends now."""
        with self._ends:
            return None if self._watched else self._unwatched_end

    def run(
        self,
        argv: Sequence[str],
        *,
        key: str,
        cwd: Path,
        env: Mapping[str, str],
        log: JobLog,
        clock: Clock,
        timeout: float | None,
        kill_grace: float,
        cancel: threading.Event,
        detach: threading.Event,
        on_spawn: Callable[[int], None] | None = None,
        run_as: RunAs | None = None,
        label: str = "the job",
    ) -> ProcessOutcome:
        """Run ``argv`` as unit ``key`` to its end (or until ``detach``), its output in ``log``."""
        if self.resume:
            if self._meanwhile is not None:  # an adopted unit may run on for long
                self._meanwhile()
            begun, ended = self._jobs.read_unit(self._job, key)
            if ended is not None:
                log.info(f"{label} had ended: its outcome is taken as recorded")
                return self._ended_while_unwatched(ended, log)
            if begun is not None:
                return self._attach(begun, key, log, cancel=cancel, detach=detach, label=label)
        self._in_sight()
        request = Supervise(
            self._job, key, tuple(argv), str(cwd), dict(env), run_as, timeout, kill_grace,
            label, log.sections, self._masker.values(), self._log_limit, self._host,
            self._log_socket, (self._jobs.spares.directory, self._jobs.spares.host),
            self._beat_interval, self._cut_off,
        )  # fmt: skip
        tee = log.tee_fd()
        sock = self._launcher.supervise(request, () if tee is None else (tee,))
        reusable = False
        try:
            if self._meanwhile is not None:
                self._meanwhile()
            pidfd: int | None = None
            spawned: tuple[int, int] | None = None
            stopped = _Stopped(log, label)
            try:
                while True:
                    if detach.is_set():
                        return ProcessOutcome(None, detached=True)
                    if cancel.is_set() and pidfd is not None:
                        _signal(pidfd, signal.SIGUSR1)
                        cancel = threading.Event()  # once is enough: it takes it from there
                    if not select.select([sock], [], [], _LOOK)[0]:
                        if pidfd is None:  # it has not said it started the unit's process
                            begun, _ = self._jobs.read_unit(self._job, key)
                            stopped.look((begun or {}).get("pid"), (begun or {}).get("pid_start"))
                        else:
                            stopped.look(*stopped.supervisor)
                        continue
                    try:
                        message, _ = _receive(sock)
                    except EOFError:
                        return self._ended_unseen(key, log, label, [spawned] if spawned else [])
                    kind, value = message
                    if kind == "spawned":  # its supervisor's pid (to signal), its process's
                        supervisor, pid = value
                        pidfd = _pidfd(supervisor)
                        stopped.supervisor = (supervisor, process_start_time(supervisor))
                        start = process_start_time(pid)
                        spawned = None if start is None else (pid, start)
                        if on_spawn is not None:
                            on_spawn(pid)
                    elif kind == "taken":  # an earlier daemon's supervisor began it: attach
                        reusable = True
                        begun, _ = self._jobs.read_unit(self._job, key)
                        return self._attach(
                            begun or {}, key, log, cancel=cancel, detach=detach, label=label
                        )
                    elif kind == "ended":
                        reusable = True
                        log.written_elsewhere()
                        return _outcome(value, log)
                    elif kind == "failed":  # its start could not be recorded
                        reusable = True
                        raise NotStarted(value)
            finally:
                if pidfd is not None:
                    os.close(pidfd)
        finally:
            if reusable:
                self._launcher.release(sock, clock.monotonic())
            else:  # busy (left running) or gone: it ends after its unit, at end of file
                sock.close()

    def _attach(
        self,
        begun: dict[str, Any],
        key: str,
        log: JobLog,
        *,
        cancel: threading.Event,
        detach: threading.Event,
        label: str,
    ) -> ProcessOutcome:
        """Wait for a supervisor this process did not start (an earlier daemon's)."""
        pid, start = begun.get("pid"), begun.get("pid_start")
        if not (isinstance(pid, int) and isinstance(start, int)):
            return self._ended_unseen(key, log, label)
        pidfd = _pidfd(pid)
        if pidfd is not None and process_start_time(pid) != start:
            os.close(pidfd)  # the pid was reused: that supervisor is long gone
            pidfd = None
        if pidfd is None:
            return self._ended_unseen(key, log, label)
        self._in_sight()
        # Its children, as seen while it lives: the unit's first process and what it adopted.
        # Should it die without a record of the end, they and their groups end here.
        seen: dict[int, int] = {}
        _children_of(pid, start, pidfd, seen)
        log.info(f"adopted {label} (supervisor pid {pid}, begun {begun.get('started_at')})")
        try:
            signalled = False
            while not select.select([pidfd], [], [], _LOOK)[0]:
                _children_of(pid, start, pidfd, seen)
                if detach.is_set():
                    return ProcessOutcome(None, detached=True)
                if cancel.is_set() and not signalled:
                    _signal(pidfd, signal.SIGUSR1)
                    signalled = True
        finally:
            os.close(pidfd)
        return self._ended_unseen(key, log, label, seen.items())

    def _ended_unseen(
        self, key: str, log: JobLog, label: str, firsts: Iterable[tuple[int, int]] = ()
    ) -> ProcessOutcome:
        """The supervisor is gone: its record says how the unit ended, or that it died.

        One that died (killed by itself: the OOM killer) left its job's processes to init:
        they end here, found by the run's token in their environment (the unit's record names
        it), by ``firsts`` (processes of the unit, by pid and start time: its first, the
        children its supervisor had) and, for the job's own command, by the lease's
        ``job_pid``, with the groups and sessions these lead.
        """
        log.written_elsewhere()
        begun, ended = self._jobs.read_unit(self._job, key)
        if ended is not None:
            return self._ended_while_unwatched(ended, log)
        self._in_sight()  # when it died is not known: the attempt ends now
        log.error(f"the supervisor of {label} died before it could record its end")
        tree, cgroup = (begun or {}).get("tree"), (begun or {}).get("cgroup")
        environment = f"{TREE_VARIABLE}={tree}" if isinstance(tree, str) and tree else None
        cgroups = [cgroup] if isinstance(cgroup, str) else []
        left = end_left_running(environment, [*firsts, *self._leased_process(key)], cgroups)
        if left:
            log.info(f"ended {left} process(es) {label} left running (SIGKILL)")
        return ProcessOutcome(None, interrupted=True)

    def _leased_process(self, key: str) -> list[tuple[int, int]]:
        """The process the lease names (``job_pid``, ``job_pid_start``), if it is unit ``key``'s:
        the lease names the first process of the job's own command (unit ``<attempt>``), not
        a hook's or a step's. Only the lease of this claim: once another host took the job
        over, the lease is the taker's (a generation higher), and its pid is the taker's."""
        if "." in key:
            return []
        with contextlib.suppress(OSError, ValueError):
            lease = self._jobs.read_lease(self._job) or {}
            if lease.get("generation") != self._job.generation:
                return []
            pid, start = lease.get("job_pid"), lease.get("job_pid_start")
            if isinstance(pid, int) and isinstance(start, int):
                return [(pid, start)]
        return []

    def _in_sight(self) -> None:
        with self._ends:
            self._watched = True

    def _ended_while_unwatched(self, record: dict[str, Any], log: JobLog) -> ProcessOutcome:
        """A unit's end as recorded (its outcome, with when it ended), for ``ended_unwatched``
        too."""
        try:
            ended = parse_rfc3339(str(record.get("finished_at")))
        except ValueError:
            ended = None
        with self._ends:
            if ended is None:
                self._watched = True  # not known: the attempt ends now
            elif self._unwatched_end is None or ended > self._unwatched_end:
                self._unwatched_end = ended
        return _outcome(record, log)._replace(ended_at=ended)


def _children_of(pid: int, start: int, pidfd: int, seen: dict[int, int]) -> None:
    """Add to ``seen`` the children of the live supervisor ``pid`` (started at ``start``),
    each with its start time; nothing if it ended meanwhile (its pid may name another)."""
    found = {child: process_start_time(child) for child in children(pid, pid) if child not in seen}
    if select.select([pidfd], [], [], 0)[0]:
        return  # it ended while they were read: what was read may be another's
    seen.update({child: at for child, at in found.items() if at is not None and at >= start})


def _outcome(record: dict[str, Any], log: JobLog) -> ProcessOutcome:
    """A unit's end as its supervisor recorded it; ExecutorError if it could not start. The
    lines it could not write into the job's log are counted in ``log``."""
    if isinstance(lost := record.get("log_lines_lost"), int) and lost > 0:
        error = record.get("log_error")
        log.lost_by_another(lost, error if isinstance(error, str) else None)
    if isinstance(record.get("error"), str):
        raise ExecutorError(record["error"])
    code = record.get("exit_code")
    return ProcessOutcome(
        code if isinstance(code, int) else None,
        timed_out=record.get("timed_out") is True,
        cancelled=record.get("cancelled") is True,
        interrupted=record.get("interrupted") is True,
        why=why if isinstance(why := record.get("why"), str) else None,
        tail=tuple(record.get("tail") or ()),
        usage=Usage.from_dict(record.get("usage")),
    )


class _Stopped:
    """Continues a unit's supervisor that a stop signal halted.

    SIGSTOP cannot be refused, and for the moment of a start (``run_process``'s switch) a
    supervisor is the job's user, whose processes may then signal it. One stopped then would
    stay so, and its unit's timeout and cancel with it (seen: a job that stopped every
    supervisor it could find held two jobs past their timeouts, and lost a cancel). The
    worker continues it, and says so in the job's log once.
    """

    def __init__(self, log: JobLog, label: str) -> None:
        self._log = log
        self._label = label
        self._said = False
        #: Its pid and start time, once it has said it started the unit's process.
        self.supervisor: tuple[object, object] = (None, None)

    def look(self, pid: object, start: object) -> None:
        if not isinstance(pid, int) or not isinstance(start, int):
            return
        info = process_info(pid)
        if info is None or info.state not in ("T", "t") or info.start != start:
            return
        pidfd = _pidfd(pid)
        if pidfd is None:
            return
        try:
            if process_start_time(pid) == start:  # not a pid reused before the pidfd opened
                _signal(pidfd, signal.SIGCONT)
        finally:
            os.close(pidfd)
        if not self._said:
            self._said = True
            self._log.error(
                f"the supervisor of {self._label} was found stopped (by a stop signal it "
                "cannot refuse): continued, so that its timeout and cancel hold"
            )


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except OSError:  # it has ended already: its end comes on the socket
        return None


def _signal(pidfd: int, signum: int) -> None:
    with contextlib.suppress(OSError):
        signal.pidfd_send_signal(pidfd, signum)


# -- the launcher's side -----------------------------------------------------------------------


def serve() -> None:
    """The launcher process: fork a child for each request until every socket it serves (the
    descriptors in its arguments, and those AddClient brings) has reached end of file."""
    name_process("spoold-launcher")
    # Forks are not waited for: the kernel reaps them. Each child puts this back first.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    # A Ctrl-C or SIGTERM to the daemon's process group is the daemon's to act on.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # What is here now stays out of the collector's sight: a fork's collections would touch
    # every object and copy each page that holds one (~6 ms a fork, measured, of ~10).
    gc.freeze()
    with selectors.DefaultSelector() as selector:
        for arg in sys.argv[1:]:
            selector.register(socket.socket(fileno=int(arg)), selectors.EVENT_READ)
        while selector.get_map():
            for key, _ in selector.select():
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    message, fds = _receive(sock)
                except (EOFError, OSError):
                    selector.unregister(sock)
                    sock.close()
                    continue
                if isinstance(message, AddClient):
                    for fd in fds:
                        selector.register(socket.socket(fileno=fd), selectors.EVENT_READ)
                    continue
                if os.fork() == 0:
                    try:
                        # No worker's socket stays open in a supervisor: each worker process
                        # must see end of file when the launcher is gone.
                        for served in list(selector.get_map().values()):
                            served.fileobj.close()  # type: ignore[union-attr]
                        _child(message, fds)
                    finally:
                        os._exit(0)
                for fd in fds:
                    os.close(fd)


def _child(message: Supervise | Chore, fds: list[int]) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    reply = socket.socket(fileno=fds[0])
    if isinstance(message, Supervise):
        _supervise(message, reply, fds[1] if len(fds) > 1 else None)
    else:
        _chore(message, reply)


def _answer(reply: socket.socket, message: object, fds: tuple[int, ...] = ()) -> None:
    with contextlib.suppress(OSError):  # the worker died: its successor reads the records
        _send(reply, message, fds)


class _Unit:
    """What the signal handlers of a supervisor act on: the unit it runs now, if any."""

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.interrupted: list[int] = []
        self.idle = False

    def next(self) -> None:
        """Fresh for the next unit, waiting for it (the handlers hold this one object)."""
        self.cancel = threading.Event()
        self.interrupted = []
        self.idle = True


class _Keeper:
    """A supervisor's watch over its unit's claim, every ``interval`` while the unit runs.

    A job another host took over (fenced) ends here at once, whether or not a daemon of this
    host still runs to tell it so: its processes must not go on beside the taker's run. And
    while the unit's worker is gone (its daemon stopped, leaving the job to run on, as a stop
    does) and no other worker renews the lease, the supervisor moves the claim's beat itself
    (``Jobs.keep_claim``): a job that still runs here is not taken over by another host; and
    it acts on a cancel asked meanwhile (``spoold cancel`` with no daemon to hear it), whose
    end the next daemon records.
    """

    def __init__(
        self, job: JobDir, reply: socket.socket, interval: float,
        *, cancel: threading.Event, log: JobLog, clock: Clock, cut_off: CutOff | None = None,
    ) -> None:  # fmt: skip
        self._job = job
        self._reply = reply
        self._interval = interval
        self._cancel = cancel
        self._log = log
        self._clock = clock
        self._cut_off = cut_off
        now = clock.monotonic()
        self._next = now + interval
        self._lease_beat: object = None  # the lease's beat at the last look
        self._beat = 0  # the last kept.<generation>.<beat> made; 0: none
        #: When the claim's beat was last seen moving, or moved here (the unit's start: its
        #: worker claimed or renewed the job just before).
        self._renewed = now
        #: Whether the host's record, at the last look, showed a host that may take over.
        self._takers = True
        self.fenced = False
        #: Why it ended the unit itself, the spool out of reach (None: it did not).
        self.cut_off: str | None = None

    def __call__(self, now: float) -> None:
        if self.fenced or now < self._next:
            return
        self._next = now + self._interval
        try:
            self._look(now)
        except JobFenced as exc:
            self.fenced = True
            self._log.error(f"{exc}: this host's copy of it ends")
            self._cancel.set()
        except OSError as exc:  # a spool cut off, or a full disk: looked at again next time
            self._out_of_reach(exc)

    def _look(self, now: float) -> None:
        check_fence(self._job)
        beat = (Jobs.read_lease(self._job) or {}).get("beat")
        renewed, self._lease_beat = beat != self._lease_beat, beat
        if self._cut_off is not None:
            self._takers = others_may_take_over(self._cut_off.host_record)
        if renewed:
            self._renewed = now
        if renewed or not self._worker_gone():
            self.done()  # a worker renews the lease: the beat is its own
            return
        if self._beat == 0:
            self._log.info("its worker is gone: its supervisor keeps the claim while it runs")
        Jobs.keep_claim(self._job, self._beat + 1)
        self._beat += 1
        self._renewed = now
        if not self._cancel.is_set() and Jobs.cancel_request(self._job) is not None:
            self._log.error("cancel asked while no daemon watches the job: its supervisor ends it")
            self._cancel.set()

    def _out_of_reach(self, exc: OSError) -> None:
        """The spool could not be read: once the claim's beat has not been seen moving for
        ``CutOff.after``, another host may soon find it stale and run the job again; the
        unit ends first. Not if no other host was there to (a spool of one host: the job
        runs on, and is recorded once the spool is back)."""
        if self._cut_off is None or not self._takers:
            return
        still = self._clock.monotonic() - self._renewed  # the look may have waited long
        self.cut_off = self._cut_off.why(
            still, f"its claim's beat last seen moving {still:.0f}s ago"
        )
        if self.cut_off is None:
            return
        self.fenced = True
        self._log.error(
            f"{self.cut_off} ({exc.strerror or exc}): this host's copy of it ends first"
        )
        self._cancel.set()

    def _worker_gone(self) -> bool:
        try:
            return not self._reply.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True

    def done(self) -> None:
        """No more beats of its own (the unit ended, or a worker beats again)."""
        if self._beat:
            with contextlib.suppress(OSError):
                Jobs.drop_kept(self._job, self._beat)
            self._beat = 0


def _supervise(request: Supervise, reply: socket.socket, tee_fd: int | None) -> None:
    """A supervisor: runs units one after another for its worker, as long as the worker
    hands it more (a fork and its first copy-on-write faults cost more than a unit of
    ``true`` does); ends at the end of the worker's socket, after the unit it runs."""
    os.setsid()  # no signal to the daemon's group or session reaches it
    name_process("spoold-job-sup")  # in ps -o comm, top: not a launcher
    adopt_orphans()  # what the job leaves is found and ended here, without a look at all of /proc
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a dead worker's socket: an error, no death
    # It execs only jobs and hooks, which must not hold the daemon's capabilities (the Debian
    # package's CAP_SETUID would make a job root); without ambient ones, a unit's process is
    # started as its user by vfork (run_process's switch_in_place).
    drop_ambient_capabilities()
    clean_signal_state()  # for the same reason
    unit = _Unit()
    me = (os.getpid(), process_start_time(os.getpid()))  # for each unit's record: read once

    def on_cancel(signum: int, frame: object) -> None:
        if not unit.idle:  # one meant for a unit that ended as it came: not for the next
            unit.cancel.set()

    def on_stop(signum: int, frame: object) -> None:  # system shutdown, or an operator
        if unit.idle:
            raise SystemExit(0)  # no unit to end first
        unit.interrupted.append(signum)
        unit.cancel.set()

    signal.signal(signal.SIGUSR1, on_cancel)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_stop)
    spares: Spares | None = None  # one file for the next unit's record, made while idle
    token = new_token()  # the first unit's: its cgroup is made as it starts
    try:
        while True:
            if request.spares is not None and (
                spares is None or (spares.directory, spares.host) != request.spares
            ):
                if spares is not None:
                    spares.drop()
                spares = Spares(*request.spares)
            _run_unit(request, reply, tee_fd, unit, me, spares=spares, token=token)
            unit.next()
            token = prepare_next_run()  # its cgroup entered now, not when a job waits on it
            if spares is not None:
                with contextlib.suppress(OSError):  # a full disk: the record is made then
                    spares.fill(1)
            try:
                message, fds = _receive(reply)
            except (EOFError, OSError):
                return  # the worker is done with it, or gone
            unit.idle = False
            if not isinstance(message, Supervise):
                return
            request, tee_fd = message, fds[0] if fds else None
    finally:
        forget_prepared()
        if spares is not None:
            spares.drop()


def _run_unit(
    request: Supervise,
    reply: socket.socket,
    tee_fd: int | None,
    unit: _Unit,
    itself: tuple[int, int | None],
    *,
    spares: Spares | None,
    token: str,
) -> None:
    """Begin one unit, run it to its end, record the end. ``itself``: this supervisor's pid
    and start time; ``spares``: its record's file, made ahead; ``token``: the run's, in its
    processes' environment (should this supervisor die, a daemon finds what the unit left
    running by it: ``Supervised._ended_unseen``), which names its cgroup."""
    clock = SystemClock()
    me, start = itself
    began = {"pid": me, "pid_start": start, "host": request.host,
             "started_at": rfc3339(clock.now()), "tree": token}  # fmt: skip
    if (cgroup := run_cgroup(token)) is not None:
        began["cgroup"] = cgroup  # what a next daemon kills, should this supervisor die
    # The log is opened before the unit is begun, which checks the claim. A host taking the
    # job over fences the claim first, then moves the log aside: a log opened before a check
    # that passed is the one moved aside, where this unit's late lines land. Opened after it,
    # by its name, it was the taker's, whatever the unit then wrote (seen: a supervisor frozen
    # between the check and the open wrote its job's output after the taker's "taken over").
    try:
        log_file = Jobs.open_log(request.job)
    except OSError as exc:
        _answer(reply, ("failed", f"cannot open the log of {request.label}: {exc}"))
        return
    try:
        begun = Jobs.begin_unit(request.job, request.key, began, spares=spares)
    except OSError as exc:
        log_file.close()
        _answer(reply, ("failed", f"cannot record the start of {request.label}: {exc}"))
        return
    except BaseException:
        log_file.close()
        raise
    if not begun:
        log_file.close()
        _answer(reply, ("taken", None))
        return
    tee = None if tee_fd is None else os.fdopen(tee_fd, "w")
    masker = Masker(request.masks)
    tap = None if request.log_socket is None else LogTap.open(Path(request.log_socket))
    log = JobLog(
        # No secret to mask (the usual case): no mask to run over every piece of output.
        log_file, clock, tee=tee, mask=masker.mask_text if masker else None,
        limit=request.log_limit,
        tap=None if tap is None else functools.partial(tap.send, request.job.job_id),
    )  # fmt: skip
    for name in request.sections:
        log = log.section(name)
    ended: dict[str, Any]
    keeper = None
    if request.beat_interval is not None and request.job.generation is not None:
        keeper = _Keeper(request.job, reply, request.beat_interval, cancel=unit.cancel,
                         log=log, clock=clock, cut_off=request.cut_off)  # fmt: skip
    try:
        outcome = run_process(
            request.argv, cwd=Path(request.cwd), env=request.env, log=log, clock=clock,
            timeout=request.timeout, kill_grace=request.kill_grace, cancel=unit.cancel,
            on_spawn=lambda pid: _answer(reply, ("spawned", (me, pid))), run_as=request.run_as,
            label=request.label, switch_in_place=True, token=token, tend=keeper,
        )  # fmt: skip
        cut_off = None if keeper is None else keeper.cut_off
        ended = {
            "exit_code": outcome.exit_code,
            "timed_out": outcome.timed_out,
            "cancelled": outcome.cancelled and not unit.interrupted and cut_off is None,
            "interrupted": bool(unit.interrupted) or cut_off is not None,
            # Masked: it is written down (a limit's message is found in it all the same).
            "tail": [masker.mask_text(line) for line in log.tail()],
            # In the record, so that a next daemon that adopts the job has it too.
            "usage": None if outcome.usage is None else outcome.usage.to_dict(),
        }
        if cut_off is not None:
            ended["why"] = cut_off
    except Exception as exc:  # cannot start it (no such program, a work dir gone)
        log.error(f"cannot start {request.label}: {exc}")
        ended = {"exit_code": None, "error": masker.mask_text(str(exc)), "tail": []}
    if unit.interrupted:
        log.error(f"the supervisor of {request.label} was stopped (signal {unit.interrupted[0]})")
    ended["finished_at"] = rfc3339(clock.now())
    log.summarize()
    log.close()
    if log.lost_lines:  # for the worker's count (status.json's log_lines_lost)
        ended["log_lines_lost"], ended["log_error"] = log.lost_lines, log.first_error
    if tap is not None:
        tap.close()
    if keeper is not None:
        keeper.done()
    # Purged meanwhile, or taken over by another host: no one to tell, nothing to record.
    with contextlib.suppress(OSError, JobFenced):
        Jobs.end_unit(request.job, request.key, ended)
    _answer(reply, ("ended", ended))
    if unit.interrupted:
        raise SystemExit(0)  # stopped: no next unit


def _become(user: RunAs | None) -> None:
    if user is not None and os.geteuid() != user.uid:
        os.setgroups(list(user.groups))
        os.setgid(user.gid)
        os.setuid(user.uid)


def _chore(chore: Chore, reply: socket.socket) -> None:
    try:
        _become(chore.user)
        if chore.kind == "artifacts":
            batch: list[tuple[str, int]] = []
            for found in _artifacts(chore):
                if isinstance(found, str | ArtifactsLeft):
                    _flush(reply, batch)  # the files before what is said after them
                    _answer(reply, found)
                    continue
                batch.append(found)
                if len(batch) == _FD_BATCH:
                    _flush(reply, batch)
            _flush(reply, batch)
            _answer(reply, None)
        else:
            _answer(reply, _do_chore(chore, chown=False))
    except Exception as exc:  # said to the worker, which logs it with the job
        _answer(reply, LauncherError(f"{chore.kind} {chore.path}: {exc}"))


def _do_chore(chore: Chore, *, chown: bool) -> bool | Leftovers:
    """A work dir made or removed, or a user's leftovers; ``chown``: by root for the user,
    not as the user."""
    if chore.kind == "mkdir":
        owner = chore.user.uid if chore.user is not None else os.geteuid()
        made = _make_workdir(chore.path, chore.mode, owner, chown=chown, spare=chore.spare)
        if made and chown and chore.user is not None:
            os.chown(chore.path, chore.user.uid, chore.user.gid, follow_symlinks=False)
        return made
    if chore.kind == "remove":
        return _remove_tree(chore.path)
    if chore.kind == "leftovers" and chore.user is not None:
        return _remove_leftovers(chore.user.uid, chore.sweep, chore.since)
    raise LauncherError(f"no chore {chore.kind!r}")


def _remove_leftovers(uid: int, directories: Iterable[str], since: int) -> Leftovers:
    """Remove what ``uid`` made or changed in ``directories`` from ``since`` on (ctime, which
    no user can set back): what else it has there is not the attempt's, and is left. Done as
    the user (the launcher's fork) or by root, who removes only what the user owns. Not while
    a process of the user's runs (the attempt's have ended): another daemon's job, or a
    ``spoold exec``, may run as the user too, and its files are its own."""
    found: list[tuple[str, bool]] = []
    for directory in directories:
        try:
            entries = os.scandir(directory)
        except OSError:
            continue
        with entries:
            for entry in entries:
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if info.st_uid == uid and info.st_ctime_ns >= since:
                    found.append((entry.path, stat.S_ISDIR(info.st_mode)))
    if not found:
        return Leftovers()
    named = tuple(path for path, _ in found[:_NAMED])
    if (busy := process_of_user(uid)) is not None:
        return Leftovers(len(found), named, busy)
    failed: OSError | None = None
    for path, is_dir in found:  # each one it can: one that cannot be removed keeps no other
        try:
            if is_dir:
                _remove_tree(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            failed = failed or exc
    if failed is not None:
        raise failed  # said in the job's log, and spoold's
    return Leftovers(len(found), named)


def _make_workdir(
    path: str, mode: int, owner: int, *, chown: bool, spare: str | None = None
) -> bool:
    """Make the work dir (``spare``: rename that one there), or take the one an earlier
    attempt of this run made (an adoption): True if it is to be given to ``owner`` now
    (``chown``: this process does that)."""
    try:
        _new_dir(path, mode, spare)
    except FileExistsError:
        info = os.lstat(path)
        if stat.S_ISDIR(info.st_mode) and info.st_uid == owner:
            return False
        # Still this process's own (root's): a daemon killed between making it and giving
        # it to the job's user. A job user may make entries in the work root (mode 1733),
        # but none that root owns.
        if not (stat.S_ISDIR(info.st_mode) and chown and info.st_uid == os.geteuid()):
            raise LauncherError(f"{path} exists and is not this job's work dir") from None
    Path(path).chmod(mode)  # not the umask's
    return True


def _new_dir(path: str, mode: int, spare: str | None) -> None:
    """mkdir ``path``; ``spare``, an empty directory made ahead (the caller's), is renamed
    there instead while it is there (a sweep may have taken it for a dead process's)."""
    if spare is not None:
        try:
            rename_noreplace(spare, path)
            return
        except FileNotFoundError:
            pass
        except FileExistsError:
            with contextlib.suppress(OSError):
                Path(spare).rmdir()
            raise
    Path(path).mkdir(mode)


def _remove_tree(path: str) -> bool:
    """Remove ``path`` and all in it, whatever modes the job left on what it made."""

    top = os.path.normpath(path)

    def writable(function: Any, failed: str, exc: Any) -> None:
        if os.geteuid() == 0:
            # Root needs no mode to remove anything, and must change none: a chmod goes by
            # path and follows links, and in a directory the job left open to everyone (in
            # /tmp) another user may have swapped a part of that path for a link.
            raise exc[1]
        entry = Path(failed)
        with contextlib.suppress(OSError):
            # Nothing above the tree: its parent is the work root, or /tmp for a leftover,
            # whose mode root must never change.
            if os.path.normpath(failed) != top:
                entry.parent.chmod(0o700)
            if entry.is_dir() and not entry.is_symlink():
                entry.chmod(0o700)
        with contextlib.suppress(FileNotFoundError):
            function(failed)

    try:
        Path(path).rmdir()  # most jobs leave their work dir empty: one call, not rmtree's dozen
        return True
    except FileNotFoundError:
        return False
    except OSError:
        pass  # not empty (or not a directory): rmtree says what it cannot remove
    import shutil  # noqa: PLC0415 - in the chore's fork only

    try:
        shutil.rmtree(path, onerror=writable)
    except RecursionError:
        # Deeper than Python's recursion (a job made thousands of nested directories): rm's
        # walk has no such bound, and follows no link either.
        subprocess.run(["rm", "-rf", "--one-file-system", "--", path], check=False,
                       stdin=subprocess.DEVNULL, capture_output=True)  # fmt: skip
        if Path(path).exists():
            raise OSError(f"cannot remove {path}: too deep for Python, and rm left it") from None
    return True


# -- artifacts: found and opened from the work dir down, never through a link ------------------

#: How many directories deep below the work dir artifacts are looked for: the walk holds one
#: open for each level; what is deeper is named in the log, not walked.
ARTIFACT_DEPTH = 64
#: How many entries of a work dir the walk for its artifacts looks at, at most.
ARTIFACT_ENTRIES = 200_000
#: How many names a line about what was left out names.
_NAMED = 3
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: Where the globs are in a directory: (a glob's index, how many of its parts are matched).
_States = frozenset[tuple[int, int]]
_NOWHERE: _States = frozenset()


class _Glob(NamedTuple):
    """A declared artifact's glob, as pathlib's glob reads it: a part for each component, a
    name, a wildcard, or None for ``**`` (any number of directories, none too)."""

    text: str
    parts: tuple[str | re.Pattern[str] | None, ...]
    whole: bool  # ``type: dir``: every file below what it matches


class _Frame(NamedTuple):
    """A directory the walk is in: open, its path (with a trailing slash, the work dir's is
    empty), how deep, where the globs are in it, and its entries not yet looked at."""

    fd: int
    prefix: str
    depth: int
    states: _States
    whole: bool
    entries: Iterator[tuple[str, str]]


def _artifacts(chore: Chore) -> Iterator[tuple[str, int] | str | ArtifactsLeft]:
    """Each declared artifact's path and an open descriptor, in path order; then a line for
    each glob that matched nothing, and what was left out.

    Found and opened from the work dir down, each component below the last without following
    a link: a directory the job swaps for a link, whenever it does, leads nowhere outside (a
    glob found first and opened by its path later would follow it, as root here)."""
    globs: list[_Glob] = []
    for pattern, kind in chore.patterns:
        parts = [part for part in pattern.split("/") if part not in ("", ".")]
        if ".." in parts:  # the job schema refuses it already
            yield f"artifact {pattern!r}: a path with '..' is not kept"
            continue
        globs.append(_Glob(pattern, tuple(map(_glob_part, parts)), kind == "dir"))
    walk = _ArtifactWalk(globs, chore.max_files)
    try:
        root = os.open(chore.path, _DIRECTORY)
    except FileNotFoundError:  # no work dir (an executor that made none): nothing matched
        pass
    except OSError as exc:
        yield f"artifacts: the work dir {chore.path}: {exc.strerror}"
        return
    else:
        yield from walk.files(root)
    yield from walk.said()


def _glob_part(part: str) -> str | re.Pattern[str] | None:
    if part == "**":
        return None
    if any(char in part for char in "*?["):  # what pathlib's glob takes for a wildcard
        return re.compile(fnmatch.translate(part))
    return part


class _ArtifactWalk:
    """One walk of a work dir for the files its globs match: all globs at once, each entry
    looked at once, in path order; iterative, a stack of open directories no deeper than
    ARTIFACT_DEPTH, no more than ARTIFACT_ENTRIES entries looked at, no more than
    ``max_files`` files opened (the rest counted)."""

    def __init__(self, globs: list[_Glob], max_files: int | None) -> None:
        self._globs = globs
        self._max_files = max_files
        self._budget = ARTIFACT_ENTRIES
        self._opened = 0
        self._matched: set[int] = set()
        self._cut = False
        #: reason -> (how many, the first few names, of what)
        self._left: dict[str, tuple[int, list[str], str]] = {}

    def files(self, root: int) -> Iterator[tuple[str, int]]:
        """Each matched file's path and descriptor; closes ``root``, the work dir's."""
        start = self._closed((index, 0) for index in range(len(self._globs)))
        stack: list[_Frame] = []
        try:
            whole = self._reached(start, whole=False)  # "." matches the work dir itself
            self._push(stack, root, "", 0, states=start, whole=whole)
            while stack:
                frame = stack[-1]
                entry = next(frame.entries, None)
                if entry is None:
                    stack.pop()
                    os.close(frame.fd)
                    continue
                name, kind = entry
                relative = frame.prefix + name
                states = self._step(frame.states, name, kind == "d") if frame.states else _NOWHERE
                whole = self._reached(states, whole=frame.whole)
                if kind == "l" and states:  # a glob names it: said, never followed
                    self._leave("not followed", relative, "link(s)")
                elif kind == "f":
                    kept = frame.whole or any(not self._globs[index].whole
                                              for index, done in states
                                              if done == len(self._globs[index].parts))  # fmt: skip
                    if kept and (fd := self._open(frame.fd, name, relative)) is not None:
                        yield relative, fd
                elif kind == "d" and (whole or self._further(states)):
                    self._enter(stack, frame, name, states, whole)
                    if self._cut:  # it looked at all it may
                        return
        finally:
            for frame in stack:
                os.close(frame.fd)

    def said(self) -> Iterator[str | ArtifactsLeft]:
        """After the files: a line for each glob that matched nothing, what was left out."""
        if not self._cut:  # else a glob may match past where the walk stopped
            for index, glob in enumerate(self._globs):
                if index not in self._matched:
                    yield f"artifact {glob.text!r}: nothing matched"
        for reason, (count, names, what) in self._left.items():
            more = self._cut and reason == "past limits.max_artifacts"
            yield ArtifactsLeft(reason, count, more, tuple(names), what)

    def _reached(self, states: _States, *, whole: bool) -> bool:
        """Note the globs ``states`` match whole; whether a ``type: dir`` one is among them
        (or ``whole``: the directory is in one already)."""
        for index, done in states:
            if done == len(self._globs[index].parts):
                self._matched.add(index)
                whole = whole or self._globs[index].whole
        return whole

    def _further(self, states: _States) -> bool:
        return any(done < len(self._globs[index].parts) for index, done in states)

    def _step(self, states: _States, name: str, is_dir: bool) -> _States:
        """Where the globs are in entry ``name`` of a directory where they are at ``states``."""
        moved = []
        for index, done in states:
            parts = self._globs[index].parts
            if done == len(parts):
                continue
            part = parts[done]
            if part is None:  # ``**`` goes down directories, never a link
                if is_dir:
                    moved.append((index, done))
            elif part == name or (not isinstance(part, str) and part.match(name)):
                moved.append((index, done + 1))
        return self._closed(moved)

    def _closed(self, states: Iterable[tuple[int, int]]) -> _States:
        """``states`` and, past each ``**``, what follows it (it matches no directory too)."""
        closed: set[tuple[int, int]] = set()
        todo = list(states)
        while todo:  # bounded: each step adds one of the globs' finitely many places
            index, done = todo.pop()
            if (index, done) in closed:
                continue
            closed.add((index, done))
            parts = self._globs[index].parts
            if done < len(parts) and parts[done] is None:
                todo.append((index, done + 1))
        return frozenset(closed)

    def _enter(self, stack: list[_Frame], frame: _Frame, name: str, states: _States,
               whole: bool) -> None:  # fmt: skip
        """Open directory ``name`` in ``frame`` onto the stack, within the walk's bounds."""
        relative = frame.prefix + name
        if frame.depth >= ARTIFACT_DEPTH:
            self._leave(f"deeper than {ARTIFACT_DEPTH} levels, not looked into", relative,
                        "director(ies)")  # fmt: skip
            return
        try:
            fd = os.open(name, _DIRECTORY, dir_fd=frame.fd)
        except OSError as exc:  # swapped for a link or a file since listed, or unreadable
            if exc.errno == errno.ENOTDIR and _is_link(frame.fd, name):  # O_DIRECTORY's word
                self._leave("not followed", relative, "link(s)")
            else:
                self._failed(relative, exc)
            return
        self._push(stack, fd, relative + "/", frame.depth + 1, states=states, whole=whole)

    def _push(self, stack: list[_Frame], fd: int, prefix: str, depth: int, *, states: _States,
              whole: bool) -> None:  # fmt: skip
        """Put directory ``fd`` on the stack, listed (or close it: unreadable, or past the
        walk's budget, which ends the walk)."""
        try:
            entries = self._list(fd, states, whole)
        except OSError as exc:
            os.close(fd)
            self._failed(prefix.rstrip("/") or ".", exc)
            return
        except BaseException:
            os.close(fd)
            raise
        if entries is None:
            os.close(fd)
            self._cut = True
            self._leave(f"past {ARTIFACT_ENTRIES} entries looked at, not looked into",
                        prefix.rstrip("/") or ".", "director(ies)")  # fmt: skip
            return
        stack.append(_Frame(fd, prefix, depth, states, whole, iter(entries)))

    def _list(self, fd: int, states: _States, whole: bool) -> list[tuple[str, str]] | None:
        """The entries of directory ``fd`` the globs may match, with their kinds ("d", "f",
        "l" or "o"), in the order that makes the walk's the paths' order; None when past the
        walk's budget. Names the globs spell out are looked up, not listed."""
        found: list[tuple[str, str]] = []
        names = None if whole else self._names(states)
        if names is not None:
            for name in names:
                if not self._spend():
                    return None
                try:
                    mode = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
                except ValueError:  # a NUL in the name: no file has one
                    continue
                except OSError as exc:
                    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
                        continue
                    raise
                found.append((name, _kind(mode)))
        else:
            with os.scandir(fd) as listing:
                for entry in listing:
                    if not self._spend():
                        return None
                    with contextlib.suppress(FileNotFoundError):  # gone meanwhile
                        found.append((entry.name, _entry_kind(entry)))
        # A directory sorts as its name and a slash, as the paths below it do.
        found.sort(key=lambda item: item[0] + "/" if item[1] == "d" else item[0])
        return found

    def _names(self, states: _States) -> list[str] | None:
        """The names the globs spell out next, if none is a wildcard or ``**``."""
        names = set()
        for index, done in states:
            parts = self._globs[index].parts
            if done < len(parts):
                part = parts[done]
                if not isinstance(part, str):
                    return None
                names.add(part)
        return sorted(names)

    def _spend(self) -> bool:
        if not self._budget:
            return False
        self._budget -= 1
        return True

    def _open(self, directory: int, name: str, relative: str) -> int | None:
        if self._max_files is not None and self._opened >= self._max_files:
            self._leave("past limits.max_artifacts", relative)
            return None
        try:
            fd = os.open(name, _FILE, dir_fd=directory)
        except OSError as exc:
            self._failed(relative, exc)
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped since listed: a FIFO, a device
            os.close(fd)
            return None
        self._opened += 1
        return fd

    def _failed(self, relative: str, exc: OSError) -> None:
        if exc.errno == errno.ELOOP:  # swapped for a link since listed
            self._leave("not followed", relative, "link(s)")
        elif exc.errno not in (errno.ENOENT, errno.ENOTDIR):  # else gone, or no directory now
            self._leave(f"not opened: {exc.strerror or exc}", relative)

    def _leave(self, reason: str, relative: str, what: str = "file(s)") -> None:
        count, names, _ = self._left.get(reason, (0, [], what))
        if len(names) < _NAMED:
            names.append(relative)
        self._left[reason] = (count + 1, names, what)


def _is_link(directory: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=directory, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "l"
    if stat.S_ISDIR(mode):
        return "d"
    return "f" if stat.S_ISREG(mode) else "o"


def _entry_kind(entry: os.DirEntry[str]) -> str:
    """What ``entry`` is, from its directory's listing where it says (an lstat where not)."""
    if entry.is_symlink():
        return "l"
    if entry.is_dir(follow_symlinks=False):
        return "d"
    return "f" if entry.is_file(follow_symlinks=False) else "o"


def _flush(reply: socket.socket, batch: list[tuple[str, int]]) -> None:
    if batch:
        _answer(reply, [relative for relative, _ in batch], tuple(fd for _, fd in batch))
        for _, fd in batch:
            os.close(fd)
        batch.clear()
