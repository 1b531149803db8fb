"""Run one command in a session of its own: output into the log, timeout, cancel, and an end
for everything it started.

What every process run here gets, whatever the process that starts it does:

- **Its signals.** It starts with every signal at its default disposition and none blocked:
  a job's ``trap ... TERM`` runs on a timeout, a cancel or a stop. (An ignored signal stays
  ignored across exec; a caught one does not. The worker processes catch what they must not
  die of, so their jobs start clean at no cost; where the starting thread ignores or blocks
  a signal anyway, the child resets it before exec.)
- **An end for its whole tree.** Each run's processes carry ``SPOOLD_PROCESS_TREE=<token>``
  in their environment. On a timeout or cancel, SIGTERM goes to the run's process group and to
  every process of the run outside it; after ``kill_grace``, SIGKILL. When the run's first
  process has ended, for whatever reason, SIGKILL goes to everything of the run still there.
  In a worker process (``adopt_orphans``) orphans become its children, so finding what a run
  left costs one read of /proc; elsewhere (``spoold exec``) /proc is scanned for the token.
  A supervisor's runs are each in a cgroup of their own too, where cgroup v2 lets it make one
  (``procfs.cgroup_home``): no process of the run can leave it, and its SIGKILL reaches them
  all at once (cgroup.kill); so does its SIGTERM, sent while the cgroup is frozen. A sweep
  over pids cannot end a process that forks and exits faster than the sweep looks (measured:
  one forking every millisecond outlived it, and every end after); nor can it find one that
  cleared its environment and left the group.
- **Bounded output.** See ``spoold.core.joblog``: at most ``HELD_BYTES`` of an unfinished line per
  stream, plus one read of ``_READ_SIZE``.
- **What it cost** (``ProcessOutcome.usage``), from the kernel: each process of the run is
  reaped here with ``wait4``, whose rusage covers it and every descendant it reaped itself.
  CPU user and system seconds add up over those; the peak is the largest ``ru_maxrss`` among
  them: the most memory one process of the tree held, exact, not a sum of processes side by
  side (nothing samples them). Linux counts into a process's max RSS the image it replaced by
  exec, so a job's figure is at least what the process that started it held at the start,
  or by vfork (the usual start) the most it ever held (a supervisor: some 20-30 MB). An
  orphan is counted where it is reaped here, which a supervisor (a child subreaper, one run
  at a time) does for all of them; elsewhere only what the run's own processes reaped is
  counted.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import resource
import select
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

from spoold.core import procfs
from spoold.core.clock import Clock
from spoold.core.errors import ExecutorError
from spoold.core.joblog import JobLog, OutputStream
from spoold.core.procfs import ProcessInfo
from spoold.core.units import format_duration, timeout_reason
from spoold.core.usage import Usage

_READ_SIZE = 65536
_DRAIN_QUIET_ROUNDS = 6
#: Names a run's processes, whatever session or group they moved to.
TREE_VARIABLE = "SPOOLD_PROCESS_TREE"
#: How long an end waits for the processes it killed to be gone (a process in uninterruptible
#: sleep can take longer: it is killed again by a later end).
_KILL_WAIT = 2.0
#: How long a signal waits for the run's cgroup to freeze before it goes anyway.
_FREEZE_WAIT = 0.5
#: Signals subprocess resets in the child itself (restore_signals=True).
_RESTORED = (1 << (signal.SIGPIPE - 1)) | (1 << (signal.SIGXFSZ - 1))
# Signals 32 and 33: glibc's own (thread cancellation, setxid), which Python can neither set nor
# reset, and which each program's C library takes over when it starts. A parent that ignores
# them (seen under a test runner's worker processes) changes nothing for a job.
_LIBC_INTERNAL = (1 << 31) | (1 << 32)
#: The exit status of a process that became a job's user for a start and could not come back.
_CANNOT_SWITCH_BACK = 71  # EX_OSERR


class RunAs(NamedTuple):
    """A user a job's processes run as (``run_as:``).

    This module's records are named tuples, not dataclasses: a job's supervisor imports it,
    and each supervisor counts again what its launcher imported (dataclasses brings inspect,
    ~1.2 MiB, measured).
    """

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str

    @classmethod
    def lookup(cls, name: str) -> RunAs:
        """The account ``name`` on this host; ExecutorError if there is none."""
        try:
            account = pwd.getpwnam(name)
        except KeyError:
            raise ExecutorError(f"run_as: there is no user {name!r} on this host") from None
        groups = os.getgrouplist(name, account.pw_gid)
        return cls(name, account.pw_uid, account.pw_gid, tuple(groups), account.pw_dir)

    def environment(self) -> dict[str, str]:
        """What a login as this user would set, so that tools look in the right home."""
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name}


class ProcessOutcome(NamedTuple):
    """How a process ended."""

    exit_code: int | None
    timed_out: bool = False
    cancelled: bool = False
    #: Left running for the next daemon (spoold stopped): no end yet.
    detached: bool = False
    #: Its supervisor was stopped (a shutdown) or died, or ended it with the spool out of
    #: its reach: the job's ``on_interrupt`` decides.
    interrupted: bool = False
    #: Why, where its supervisor said (the spool out of reach).
    why: str | None = None
    #: Its last lines of output (unmasked: for spoold to read, never to write).
    tail: tuple[str, ...] = ()
    #: What it cost (None: not measured, as for one left running).
    usage: Usage | None = None
    #: When it ended, where that was while no daemon watched it (its supervisor's record);
    #: None: as it is told.
    ended_at: datetime | None = None

    @property
    def error(self) -> str | None:
        if self.timed_out or self.cancelled or self.detached or self.interrupted:
            return None  # the caller words these; it knows the timeout
        if self.exit_code is None or self.exit_code == 0:
            return None
        if self.exit_code < 0:
            return f"killed by signal {signal.Signals(-self.exit_code).name}"
        return f"exit code {self.exit_code}"


class Processes:
    """How a job's local processes start. This one runs each in this process, with none of a
    supervisor's survival: for executors used outside the daemon (a plugin's tests, a tool of
    its own). The daemon and ``spoold exec`` use ``spoold.run.launcher.Supervised``."""

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
        """Run ``argv`` as the job's unit ``key`` to its end, or until ``detach`` is set (which
        only a supervisor honours: here the process is this process's, and ends with it)."""
        return run_process(
            argv, cwd=cwd, env=env, log=log, clock=clock, timeout=timeout,
            kill_grace=kill_grace, cancel=cancel, on_spawn=on_spawn, run_as=run_as, label=label,
        )  # fmt: skip


def new_token() -> str:
    """A run's ``SPOOLD_PROCESS_TREE`` value: random, so that no other run's processes carry it."""
    return os.urandom(8).hex()


def adopt_orphans() -> bool:
    """Make this process the parent of every orphan its runs leave (a child subreaper).

    For a process whose main thread starts no processes itself, as a worker process's does
    not: every child of its main thread is then an orphan it adopted, so what a run left is
    found there, cheaply, and reaped. False where Linux does not allow it; runs then look for
    their processes in all of /proc.
    """
    _TREES.adopting = procfs.become_child_subreaper()
    return _TREES.adopting


def run_process(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    log: JobLog,
    clock: Clock,
    timeout: float | None,
    kill_grace: float,
    cancel: threading.Event,
    on_spawn: Callable[[int], None] | None = None,
    run_as: RunAs | None = None,
    label: str = "the job",
    switch_in_place: bool = False,
    token: str | None = None,
    tend: Callable[[float], None] | None = None,
) -> ProcessOutcome:
    """Run ``argv`` to its end, writing its output into ``log``; nothing it started outlives it.

    ``label`` names it in the log's lines about its end ("the job", "hook post_run").
    ``switch_in_place``: the caller is a process of its own for runs (a supervisor), which may
    become ``run_as`` for the moment of the start (see ``_switched``), and starts the run in a
    cgroup of its own (``run_cgroup``). ``token``: the run's
    ``SPOOLD_PROCESS_TREE`` (``new_token``), when the caller records it before the start (a
    supervisor, for a next daemon to find what the run left should the supervisor die).
    ``tend``: called with the monotonic time at each turn of the wait (at least every 0.2 s),
    in this thread; it may set ``cancel``.
    """
    token = token or new_token()
    environment = {**env, TREE_VARIABLE: token}
    if run_as is not None:
        environment.update(run_as.environment())
    cgroup = _contained(token) if switch_in_place else None
    try:
        with _switched(run_as if switch_in_place else None) as switched:
            process = _start(argv, cwd, environment, None if switched else run_as)
    except BaseException:
        if cgroup is not None and _leave():
            procfs.remove_cgroup(cgroup)
        raise
    if cgroup is not None and not _leave():
        cgroup = None  # this process is in it: the run ends by the sweep over pids alone
    tree = _TREES.add(token, process.pid, cgroup)
    meter = _TREES.meter(tree, clock.monotonic())
    written = log.output_bytes  # counted by the streams' OutputStream as they read
    assert process.stdout is not None and process.stderr is not None
    streams = _Streams(log, process.stdout.fileno(), process.stderr.fileno())
    deadline = None if timeout is None else clock.monotonic() + timeout
    timed_out = cancelled = False
    kill_at: float | None = None
    try:
        if on_spawn is not None:
            on_spawn(process.pid)
        while not _reaped(process, meter):
            now = clock.monotonic()
            if tend is not None:
                tend(now)
            if not (timed_out or cancelled):
                if deadline is not None and now >= deadline:
                    timed_out = True
                elif cancel.is_set():
                    cancelled = True
                if timed_out or cancelled:
                    reason = timeout_reason(timeout) if timed_out else "cancel"
                    log.error(f"{reason}: sending SIGTERM to {label}'s processes")
                    _TREES.signal(tree, signal.SIGTERM)
                    kill_at = now + kill_grace
            elif kill_at is not None and now >= kill_at:
                log.error(f"still running {format_duration(kill_grace)} after SIGTERM: SIGKILL")
                _TREES.signal(tree, signal.SIGKILL)
                kill_at = None
            wait = 0.2
            if deadline is not None and not timed_out:
                wait = min(wait, max(deadline - now, 0.0))
            if streams.open:
                streams.pump(wait)
            else:  # both pipes closed: the exit is all there is left to wait for
                _exit_wait(process.pid, wait)
    finally:
        if not _reaped(process, meter):  # an exception: the process must not outlive it either
            _signal_group(process.pid, signal.SIGKILL)
            _reaped(process, meter, block=True)
        _TREES.remove(tree)
        # Whatever the run left running ends with it; this also closes pipes that background
        # children would otherwise hold open forever.
        left = _TREES.end(tree)
        _TREES.forget(tree)
        streams.drain()
        process.stdout.close()
        process.stderr.close()
        if left:
            log.info(f"ended {left} process(es) {label} left running (SIGKILL)")
    usage = meter.usage(clock.monotonic(), log.output_bytes - written)
    return ProcessOutcome(process.returncode, timed_out=timed_out, cancelled=cancelled,
                          usage=usage)  # fmt: skip


def _start(
    argv: Sequence[str], cwd: Path, env: Mapping[str, str], run_as: RunAs | None
) -> subprocess.Popen[bytes]:
    """``argv``'s process, in a session of its own, becoming ``run_as`` (None: as this
    process is) between fork and exec."""
    # subprocess enters cwd before it becomes the job's user; a daemon that is not root may
    # not enter the job user's work dir (mode 0700), so the child enters it once it is them.
    enter_late = run_as is not None and os.geteuid() != 0
    return subprocess.Popen(
        list(argv),
        cwd=None if enter_late else cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
        user=None if run_as is None else run_as.uid,
        group=None if run_as is None else run_as.gid,
        extra_groups=None if run_as is None else list(run_as.groups),
        # None (and no Python in the child) unless this thread ignores or blocks a signal,
        # or the job changes user while this process holds ambient capabilities.
        preexec_fn=_before_exec(run_as is not None, cwd if enter_late else None),  # noqa: PLW1509
    )


@contextlib.contextmanager
def _switched(user: RunAs | None) -> Iterator[bool]:
    """This whole process as ``user`` (real and effective ids, groups) for the body, keeping
    its own uid as the saved one to come back with; True if it switched.

    Why: Python's subprocess forks, and cannot vfork, when the child is to change user (a
    vfork child shares its parent's memory, and glibc's setuid would reach the parent's
    threads); a fork copies the page tables of a process of ~30 MB and makes it take a fault
    for every page it writes afterwards: 0.86 ms of the parent's CPU and ~190 faults a start,
    against 0.24 ms and none by vfork (300 starts of a shell, a supervisor-sized process). The
    child of a process that already is the user needs no switch, so subprocess vforks it.
    exec then sets the saved uid to the effective one: the job holds the user's ids in all
    four places and no capability (none are ambient here; without file capabilities exec
    gives a user's process none).

    Only for a single-threaded process (the ids of every thread change) with no ambient
    capabilities (the job would inherit them); otherwise False and nothing changes. While
    switched, the user's processes may signal this one (their real uid is its): for the tenth
    of a millisecond of a start, by the user whose job it is starting.
    """
    if (
        user is None
        or user.uid == os.geteuid()
        or threading.active_count() != 1
        or procfs.ambient_capabilities()
    ):
        yield False
        return
    uids, gids, groups = os.getresuid(), os.getresgid(), os.getgroups()
    try:
        os.setgroups(list(user.groups))
        os.setresgid(user.gid, user.gid, user.gid)
        os.setresuid(user.uid, user.uid, uids[1])
        yield True
    finally:
        try:
            os.setresuid(*uids)
            os.setresgid(*gids)
            os.setgroups(groups)
            procfs.make_dumpable()  # the change of euid took the mark away
        except OSError:
            # Not itself again: it must not record, nor start another unit, as someone else.
            os._exit(_CANNOT_SWITCH_BACK)


class _Meter:
    """What one run's processes cost, added up as each is reaped (``os.wait4``'s rusage)."""

    def __init__(self, started: float) -> None:
        self.started = started  # monotonic
        self.user = 0.0
        self.system = 0.0
        self.peak_kib = 0  # Linux's ru_maxrss is in KiB

    def add(self, rusage: resource.struct_rusage) -> None:
        self.user += rusage.ru_utime
        self.system += rusage.ru_stime
        self.peak_kib = max(self.peak_kib, rusage.ru_maxrss)

    def usage(self, now: float, output_bytes: int) -> Usage:
        return Usage(
            wall_seconds=max(now - self.started, 0.0), cpu_user_seconds=self.user,
            cpu_system_seconds=self.system, peak_memory_bytes=self.peak_kib * 1024,
            output_bytes=output_bytes, source="kernel",
        )  # fmt: skip


def _reaped(process: subprocess.Popen[bytes], meter: _Meter, *, block: bool = False) -> bool:
    """Whether the run's first process has ended; reaps it with its rusage (and its
    descendants') into ``meter``, where Popen's own wait would throw that away."""
    if process.returncode is not None:
        return True
    try:
        pid, status, rusage = os.wait4(process.pid, 0 if block else os.WNOHANG)
    except ChildProcessError:  # reaped elsewhere (cannot be here): its cost is not known
        return process.poll() is not None
    if pid == 0:
        return False
    meter.add(rusage)
    process.returncode = os.waitstatus_to_exitcode(status)
    return True


def _exit_wait(pid: int, timeout: float) -> None:
    """Wait up to ``timeout`` seconds for ``pid`` to end, without reaping it."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # gone already (its zombie is reaped next), or no pidfds: a short nap
        time.sleep(min(timeout, 0.05))
        return
    try:
        select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _before_exec(switching: bool, enter: Path | None = None) -> Callable[[], None] | None:
    """What the child does between fork and exec, after it became the job's user: reset
    signals, drop ambient capabilities, enter its work dir (``enter``)."""
    reset = _signal_reset()
    clear = procfs.ambient_clearer() if switching else None
    if clear is None and enter is None:
        return reset

    def before() -> None:
        if reset is not None:
            reset()
        if clear is not None:
            clear()
        if enter is not None:
            os.chdir(enter)

    return before


def _signal_reset() -> Callable[[], None] | None:
    """What the child must do before exec so that it starts with default signal dispositions
    and an empty mask; None when it inherits that anyway (the fast path: no Python in the
    child, and vfork stays possible).

    A handled signal is reset by exec itself; SIGPIPE and SIGXFSZ by subprocess.
    """
    state = procfs.signal_state()
    if state is None:
        return functools.partial(_reset_signals, tuple(range(1, signal.NSIG)))
    blocked, ignored = state[0] & ~_LIBC_INTERNAL, state[1] & ~(_RESTORED | _LIBC_INTERNAL)
    if not (blocked or ignored):
        return None
    return functools.partial(_reset_signals, _bits(ignored))


def clean_signal_state() -> None:
    """Unblock every signal, and give back its default to every one this process ignores but
    SIGPIPE (which subprocess restores in the child itself): for a process of its own for
    runs (a supervisor), whose jobs then need no step between fork and exec, so that
    subprocess may vfork them. What it cleans is what the daemon's start left: a shell's
    background job ignores SIGINT and SIGQUIT (seen under CI), and so did everything after."""
    state = procfs.signal_state()
    ignored = tuple(range(1, signal.NSIG)) if state is None else _bits(state[1])
    _reset_signals(tuple(n for n in ignored if n != signal.SIGPIPE))


def _bits(mask: int) -> tuple[int, ...]:
    return tuple(n for n in range(1, signal.NSIG) if mask >> (n - 1) & 1)


def _reset_signals(ignored: tuple[int, ...]) -> None:
    """In the child, between fork and exec: two C calls (sigprocmask, sigaction) and nothing
    that could wait for a lock a thread of the parent held at the fork (no import, no I/O)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    for signum in ignored:
        with contextlib.suppress(OSError, ValueError):  # SIGKILL, SIGSTOP, libc's own
            signal.signal(signum, signal.SIG_DFL)


class _Tree(NamedTuple):
    """One run of run_process: its token, its first process and its cgroup (None: none)."""

    token: str
    pid: int
    cgroup: str | None = None


class _Trees:
    """The runs of this process that have not ended, and the ends of those that have."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[str, _Tree] = {}
        self._meters: dict[str, _Meter] = {}  # of runs not yet at their end's very end
        self.adopting = False  # adopt_orphans() was called and took effect

    def add(self, token: str, pid: int, cgroup: str | None = None) -> _Tree:
        tree = _Tree(token, pid, cgroup)
        with self._lock:
            self._live[token] = tree
        return tree

    def remove(self, tree: _Tree) -> None:
        with self._lock:
            self._live.pop(tree.token, None)

    def meter(self, tree: _Tree, started: float) -> _Meter:
        """What ``tree`` costs, counted from ``started`` (monotonic) until ``forget``."""
        meter = _Meter(started)
        with self._lock:
            self._meters[tree.token] = meter
        return meter

    def forget(self, tree: _Tree) -> None:
        with self._lock:
            self._meters.pop(tree.token, None)

    def signal(self, tree: _Tree, sig: signal.Signals) -> None:
        """Signal a live run's processes: its group at once, then each one outside it.

        With the run's cgroup frozen meanwhile (``_frozen``), so that the signal reaches all
        of them together at the thaw: none can fork a process past the look at who is there,
        and none ends of it early and lets another one end before its own signal came (a
        shell whose ``wait`` returned because its child died first)."""
        with _frozen(tree.cgroup):
            _signal_group(tree.pid, sig)
            if tree.cgroup is not None:
                _signal_cgroup(tree.cgroup, sig)
            for info in self._processes(tree, [tree.pid]):
                if info.pgrp != tree.pid:
                    _signal(info.pid, sig)

    def end(self, tree: _Tree) -> int:
        """SIGKILL what an ended run left, and wait until it is gone; return how many.

        Its process group at once, then every process of the run, again until none is left
        or ``_KILL_WAIT`` has passed (one in uninterruptible sleep is left to a later end).
        """
        killed = set() if tree.cgroup is None else _signal_cgroup(tree.cgroup, signal.SIGKILL)
        left = self._processes(tree, [])
        _signal_group(tree.pid, signal.SIGKILL)
        give_up = time.monotonic() + _KILL_WAIT
        while left:
            for info in left:
                _signal(info.pid, signal.SIGKILL)
            killed.update(info.pid for info in left)
            if time.monotonic() > give_up:
                break
            time.sleep(0.002)  # a signal is delivered asynchronously
            left = self._processes(tree, [])
        if tree.cgroup is not None:
            _remove_cgroup(tree.cgroup, give_up)
        return len(killed)

    def _processes(self, tree: _Tree, roots: list[int]) -> list[ProcessInfo]:
        """The live processes of ``tree``: below ``roots`` and, wherever they are, those that
        carry its token. Adopted orphans that have ended are reaped on the way."""
        if self.adopting:
            roots = roots + [info.pid for info in self._orphans(tree)]
        else:
            roots = roots + procfs.processes_with_environment(f"{TREE_VARIABLE}={tree.token}")
        if not roots:
            return []
        found = [
            procfs.process_info(pid) for pid in dict.fromkeys(roots + procfs.descendants(roots))
        ]
        return [info for info in found if info is not None and not info.zombie]

    def _orphans(self, tree: _Tree) -> list[ProcessInfo]:
        """Adopted orphans that are ``tree``'s, or no live run's: those to signal for it.

        An orphan is known by its token; or, if it cleared its environment (or that cannot be
        read), by the session or group it is in. One known by neither is ended once no run
        that was going when it started still goes. Ended orphans are reaped: none of them is
        a Popen's to wait for.
        """
        mine = os.getpid()
        adopted = procfs.children(mine, mine)
        if not adopted:
            return []  # the usual case: nothing to look at
        with self._lock:
            live = dict(self._live)
        mains = {run.pid for run in live.values()}  # started by this thread, if by the main one
        found = []
        for pid in adopted:
            info = procfs.process_info(pid)
            if info is None or pid in mains:
                continue
            if info.zombie:
                # Whose it was cannot be read from a zombie: the run being ended, which in a
                # supervisor (one run at a time) is the one it can only be.
                with contextlib.suppress(ChildProcessError):
                    reaped, _, rusage = os.wait4(pid, os.WNOHANG)
                    with self._lock:
                        if reaped and (meter := self._meters.get(tree.token)) is not None:
                            meter.add(rusage)
                continue
            token = procfs.environment_value(pid, TREE_VARIABLE)
            if token is None:
                runs = (tree, *live.values())
                owner = next((r for r in runs if r.pid in (info.session, info.pgrp)), None)
                token = None if owner is None else owner.token
            if token == tree.token or (token is not None and token not in live):
                found.append(info)  # its own, or a run's that has ended (what its end missed)
            elif token is None and not any(_started_by(r, info) for r in live.values()):
                found.append(info)
        return found


def end_left_running(
    environment: str | None,
    firsts: Iterable[tuple[int, int]] = (),
    cgroups: Iterable[str] = (),
) -> int:
    """SIGKILL what a run left running once nothing watches it any more (its supervisor died,
    the worker that ran it is gone), and wait until it is gone; return how many were ended.

    First everything in ``cgroups`` (the runs' own, as their records name them; any other
    path is ignored), which are then removed.

    The run's processes are those whose environment holds ``environment`` ("NAME=value":
    the run's ``SPOOLD_PROCESS_TREE``, the job's ``SPOOLD_JOB_DIR``), those below them, and
    the members of the groups and sessions that these or ``firsts`` lead: processes of the
    run by pid and start time, as a record or a look at the run's supervisor knew them (an
    environment may be out of reach: another user's, or cleared). A pid is never taken at its
    word. One that names a live process started at another time was reused, and it, its group
    and its session are someone else's; the id of a group or a session whose leader has ended
    cannot be reused while it has members, which are the run's. Each process is signalled
    through a pidfd opened while its start time still matched: never a process that took the
    pid of one that ended meanwhile.
    """
    mine = os.getpid()
    killed: set[int] = set()
    give_up = time.monotonic() + _KILL_WAIT
    contained = [path for path in dict.fromkeys(cgroups) if procfs.is_spoold_cgroup(path)]
    for path in contained:
        killed |= _signal_cgroup(path, signal.SIGKILL)
    while True:
        left = [info for info in _left_running(environment, firsts) if info.pid != mine]
        killed.update(info.pid for info in left if _kill_exactly(info))
        if not left or time.monotonic() > give_up:
            break
        time.sleep(0.002)  # a signal is delivered asynchronously
    for path in contained:
        _remove_cgroup(path, give_up)
    return len(killed)


def remove_empty_run_cgroups() -> int:
    """Remove the runs' cgroups in this process's own that hold no process: those of
    supervisors killed meanwhile (one made ahead is named by no record; one whose run ended
    may be left by a kill between its end and its removal). How many. Safe beside other
    daemons' runs: a cgroup that holds a process cannot be removed, and one just made is
    entered at once, or its run goes without one."""
    home = procfs.cgroup_home()
    if home is None:
        return 0
    try:
        names = [e.name for e in os.scandir(home) if e.name.startswith(procfs.CGROUP_PREFIX)]
    except OSError:
        return 0
    return sum(
        1 for name in names
        if not procfs.cgroup_populated(f"{home}/{name}") and procfs.remove_cgroup(f"{home}/{name}")
    )  # fmt: skip


def run_cgroup(token: str) -> str | None:
    """Where the cgroup of the run with ``token`` goes, when this process starts its runs in
    cgroups of their own (a supervisor: ``run_process``'s ``switch_in_place``); None if it
    cannot make them here."""
    home = procfs.cgroup_home()
    return None if home is None else f"{home}/{procfs.CGROUP_PREFIX}{token}"


#: The next run's cgroup, made and entered ahead (``prepare_next_run``), with its token.
_PREPARED: list[tuple[str, str]] = []


def prepare_next_run() -> str:
    """The token of this process's next run, whose cgroup it makes and enters now (where it
    makes cgroups at all): a supervisor does this while it waits for its next unit. Moving a
    process between cgroups waits for an RCU grace period once the kernel has been quiet a
    moment (measured here: 11-15 ms, nine moves in ten after a 20 ms pause; 0.03 ms back to
    back), which a start would otherwise wait for before its job runs."""
    token = new_token()
    if not _PREPARED and (path := _contained(token, prepared=False)) is not None:
        _PREPARED.append((token, path))
    return _PREPARED[0][0] if _PREPARED else token


def forget_prepared() -> None:
    """Leave and remove the cgroup made ahead for a run that will not come (the supervisor
    ends)."""
    while _PREPARED:
        _, path = _PREPARED.pop()
        if _leave():
            procfs.remove_cgroup(path)


def _contained(token: str, *, prepared: bool = True) -> str | None:
    """A new cgroup for the run with ``token``, with this process in it: the run's first
    process is started there, then this process goes back (``_leave``). The one made ahead
    for ``token`` (``prepare_next_run``), if any. None, and nothing changed, where that cannot
    be: no cgroup v2 to make one in, or this process has threads (each would start its
    children in the one cgroup)."""
    if prepared and _PREPARED:
        made, ahead = _PREPARED.pop()
        if made == token:
            return ahead
        if _leave():  # made for another token (not asked for by this run): not this run's
            procfs.remove_cgroup(ahead)
    home = procfs.cgroup_home()
    if home is None or threading.active_count() != 1:
        return None
    path = procfs.make_cgroup(home, token)
    if path is None:
        return None
    if not procfs.enter_cgroup(path):
        procfs.remove_cgroup(path)
        return None
    return path


def _leave() -> bool:
    """Back to this process's own cgroup from a run's; False if it could not go: it is then
    still in the run's cgroup, which must not be killed (it would be among the dead)."""
    home = procfs.cgroup_home()
    return home is not None and procfs.enter_cgroup(home)


def _signal_cgroup(path: str, sig: signal.Signals) -> set[int]:
    """Send ``sig`` to every process in the cgroup at ``path``; return those it held. SIGKILL
    goes to all at once where the kernel can (cgroup.kill)."""
    members = set(procfs.cgroup_members(path))
    if members and not (sig == signal.SIGKILL and procfs.kill_cgroup(path)):
        for pid in members:
            _signal(pid, sig)
    return members


@contextlib.contextmanager
def _frozen(path: str | None) -> Iterator[None]:
    """The cgroup at ``path`` frozen for the block, once the freeze has taken effect (within
    ``_FREEZE_WAIT``: one in uninterruptible sleep freezes when it wakes), thawed after; as it
    is where it cannot be frozen (None: no cgroup). A process killed in the block leaves the
    run frozen: what then ends the run, its supervisor's death or its end, kills with
    SIGKILL, which a frozen process gets at once."""
    if path is None or not procfs.freeze_cgroup(path, True):
        yield
        return
    try:
        give_up = time.monotonic() + _FREEZE_WAIT
        while not procfs.cgroup_frozen(path) and time.monotonic() < give_up:
            time.sleep(0.001)
        yield
    finally:
        procfs.freeze_cgroup(path, False)


def _remove_cgroup(path: str, give_up: float) -> None:
    """Remove a run's cgroup once what it held has ended (until ``give_up``, monotonic): one in
    uninterruptible sleep can outlast that, and keeps it; a later end removes it."""
    while procfs.cgroup_populated(path) and time.monotonic() < give_up:
        time.sleep(0.002)
    procfs.remove_cgroup(path)


def _left_running(environment: str | None, firsts: Iterable[tuple[int, int]]) -> list[ProcessInfo]:
    """The live processes of a run that nothing watches (see ``end_left_running``)."""
    carriers = [] if environment is None else procfs.processes_with_environment(environment)
    # Group or session ids that are the run's, with the start of the process whose pid each is.
    leaders: dict[int, int] = {}
    for pid, start in firsts:
        if procfs.process_start_time(pid) in (None, start):  # the same process, or ended
            leaders[pid] = start
    for pid in carriers:
        if (began := procfs.process_start_time(pid)) is not None:
            leaders[pid] = began
    roots = [pid for pid, start in leaders.items() if procfs.process_start_time(pid) == start]
    pids = dict.fromkeys(roots + procfs.descendants(roots))
    if leaders:
        pids.update(dict.fromkeys(procfs.led_by(leaders)))
    found = [procfs.process_info(pid) for pid in pids]
    return [info for info in found if info is not None and not info.zombie]


def _kill_exactly(info: ProcessInfo) -> bool:
    """SIGKILL ``info``'s process if its pid still names it (not one started since)."""
    try:
        pidfd = os.pidfd_open(info.pid)
    except OSError:
        return False  # ended meanwhile
    try:
        if procfs.process_start_time(info.pid) != info.start:
            return False  # the pid was reused before the pidfd was opened
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return True
    except OSError:  # ended meanwhile, or not ours to signal
        return False
    finally:
        os.close(pidfd)


def _started_by(run: _Tree, info: ProcessInfo) -> bool:
    """Whether ``run`` may have started ``info``: it was going when ``info`` started."""
    start = procfs.process_start_time(run.pid)
    return start is None or start <= info.start


_TREES = _Trees()


class _Streams:
    """Reads stdout and stderr without blocking and turns them into log lines."""

    def __init__(self, log: JobLog, stdout: int, stderr: int) -> None:
        self._log = log
        # poll(2) needs no kernel object of its own, unlike epoll: fewer syscalls for two fds.
        self._selector = selectors.PollSelector()
        self._streams = {
            stdout: OutputStream(log, stderr=False),
            stderr: OutputStream(log, stderr=True),
        }
        for fd in (stdout, stderr):
            os.set_blocking(fd, False)
            self._selector.register(fd, selectors.EVENT_READ)

    @property
    def open(self) -> bool:
        """Whether either stream may still deliver output."""
        return bool(self._selector.get_map())

    def pump(self, timeout: float) -> bool:
        """Read what is there, waiting up to ``timeout`` seconds; False if nothing came."""
        ready = self._selector.select(timeout)
        for key, _ in ready:
            self._read(key.fd)
        return bool(ready)

    def drain(self) -> None:
        """Read to end of file on both streams, then flush incomplete last lines.

        A process out of spoold's reach (one that became another user) may hold a pipe open
        for ever: after a few quiet seconds its output is abandoned rather than the job.
        """
        quiet_rounds = 0
        while self.open and quiet_rounds < _DRAIN_QUIET_ROUNDS:
            quiet_rounds = 0 if self.pump(0.5) else quiet_rounds + 1
        if self.open:
            self._log.error("a process out of spoold's reach still holds the job's output open")
        for stream in self._streams.values():
            stream.close()
        self._selector.close()

    def _read(self, fd: int) -> None:
        try:
            chunk = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            return
        if not chunk:
            self._selector.unregister(fd)
            return
        self._streams[fd].feed(chunk)
