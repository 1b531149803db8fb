"""Fixtures shared by the test modules."""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Generator, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from spoold.core.spool import Spool
from spoold.run.launcher import Launcher
from tests.dockerd import client, dockerd, swarm  # noqa: F401 - the real servers, one each per session
from tests.fakes import FakeClock
from tests.harness import DaemonProcess, write_config
from tests.receiver import receiver_fixture  # noqa: F401 - a webhook receiver on loopback
from tests.sshd import sshd_fixture  # noqa: F401


@pytest.fixture(scope="session", autouse=True)
def launcher() -> Launcher:
    """This test process's launcher of job supervisors: the runners tests make share it, as a
    worker process's runner does; it lives as long as the process, as there."""
    shared = Launcher.shared()
    shared.start()  # now, not in a test
    return shared


@pytest.fixture(autouse=True)
def idle_supervisors_end(launcher: Launcher) -> Iterator[None]:
    """The supervisors a test's jobs left idle for a next unit end with the test."""
    yield
    launcher.drain()


@pytest.fixture(autouse=True)
def jobs_reach_tmp_path(tmp_path: Path) -> None:
    """Jobs run as the job user (spoold-job), not as root: the tests' jobs write their marks
    into the test's tmp_path, as jobs would into a directory an operator gives them. pytest
    makes it and its parents root's alone; here they may be entered, and it written (sticky,
    as /tmp). A spool made in it keeps its own modes: no job reaches into it."""
    for above in tmp_path.parents:
        if above == Path(tempfile.gettempdir()):
            break
        mode = above.stat().st_mode
        if not mode & stat.S_IXOTH:
            above.chmod(stat.S_IMODE(mode) | 0o011)
    tmp_path.chmod(0o1777)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    """A fresh spool tree in the test's directory."""
    made = Spool(tmp_path / "spool")
    made.init()
    return made


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    """An initialised, empty spool."""
    root = tmp_path / "spool"
    Spool(root).init()
    return root


@pytest.fixture
def daemon(spool_dir: Path, tmp_path: Path) -> Iterator[DaemonProcess]:
    """A running daemon on ``spool_dir``; killed at the end whatever happened."""
    process = DaemonProcess(spool_dir, write_config(tmp_path / "config.yaml", spool_dir))
    process.start()
    yield process
    process.kill()


# -- leak guard: a test must not leave a thread or a process running -----------------------------
#
# A plugin object rather than conftest hooks: pytest calls the hooks of session-scoped fixtures
# through the session node, which sees only conftests above the rootdir, not this one.
#
# Per test: a snapshot of the threads and the direct children of this process when its setup
# starts; the environment variable LEAK_TOKEN set to a value of its own, which every process
# started during the test inherits (unless its environment was built from scratch), so its
# descendants are found even after their parent died (an orphaned job of a killed daemon, a
# daemon that detached), as are the members of a group or session a child of the test leads;
# and the last pid allocated, so that only the pids allocated since are read.
# After its teardown, what is new, still alive after a grace, and not started by a fixture of a
# wider scope (recorded as those fixtures are set up) fails the test, and the processes are
# killed so that the leak does not spill into the tests after it.

LEAK_TOKEN = "SPOOLD_TEST_LEAK_GUARD"
LEAVES_RUNNING = "leaves_running"
_GRACE_INI = "leak_grace"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class _Proc(NamedTuple):
    """A process as /proc/<pid>/stat says."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str  # R, S, D, Z (a zombie: ended, not reaped), ...
    start: int  # clock ticks since boot


class _Started(NamedTuple):
    """What a fixture wider than a function started while it was set up."""

    threads: set[threading.Thread]
    pids: set[int]
    since: int  # clock ticks since boot


class _Watch:
    """What one test started: compared against what ran when its setup began."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.threads = set(threading.enumerate())
        self.children = _children()
        self.last_pid = _last_pid()
        self.since = int(time.clock_gettime(time.CLOCK_BOOTTIME) * _CLK_TCK)
        self.phase: dict[threading.Thread | int, str] = {}  # first seen after: setup, call

    def saw(self, phase: str) -> None:
        for thread in threading.enumerate():
            if thread not in self.threads:
                self.phase.setdefault(thread, phase)
        for pid in _children() - self.children:
            self.phase.setdefault(pid, phase)


def _stat(pid: int) -> _Proc | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses; the fields after its last ")" do not.
    fields = data.rsplit(b")", 1)[1].split()
    ppid, pgid, sid, start = int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19])
    return _Proc(pid, ppid, pgid, sid, fields[0].decode(), start)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _children() -> set[int]:
    """This process's children: each thread's list (a child belongs to the thread that forked)."""
    tasks = f"/proc/{os.getpid()}/task"
    found: set[int] = set()
    for tid in os.listdir(tasks):
        try:
            with open(f"{tasks}/{tid}/children", "rb") as handle:
                found.update(map(int, handle.read().split()))
        except OSError:
            continue  # the thread ended meanwhile
    return found


def _last_pid() -> int | None:
    try:
        with open("/proc/sys/kernel/ns_last_pid", "rb") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return None


def _descendants(token: str, leaders: set[int], after: int | None, upto: int | None) -> set[int]:
    """Among the pids allocated in (after, upto] (wrapping at pid_max; all of /proc when those
    are not known): the processes whose environment holds ``LEAK_TOKEN=token``, and those in
    the process group or session of one of ``leaders`` (whose environment may not)."""
    if after is not None and after == upto:
        return set()
    needle = f"\0{LEAK_TOKEN}={token}\0".encode()
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        if after is not None and upto is not None:
            fresh = after < pid <= upto if after < upto else (pid > after or pid <= upto)
            if not fresh:
                continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                environ = handle.read()
        except OSError:
            continue
        if needle in b"\0" + environ or (leaders and _led_by(pid, leaders)):
            found.add(pid)
    return found


def _led_by(pid: int, leaders: set[int]) -> bool:
    proc = _stat(pid)
    return proc is not None and (proc.pgid in leaders or proc.sid in leaders)


def _process_singletons() -> set[int]:
    """Helper processes multiprocessing starts on first use and keeps for the life of this one."""
    pids = set()
    tracker = sys.modules.get("multiprocessing.resource_tracker")
    pids.add(getattr(getattr(tracker, "_resource_tracker", None), "_pid", None))
    forkserver = sys.modules.get("multiprocessing.forkserver")
    pids.add(getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None))
    return {pid for pid in pids if isinstance(pid, int)}


def _running(pids: Iterable[int], since: int) -> dict[int, _Proc]:
    """Those of ``pids`` alive (zombies have ended) and started no earlier than ``since``: a
    recycled pid, or a child the kernel's list skipped at the snapshot, is not the test's."""
    found = {}
    for pid in pids:
        proc = _stat(pid)
        if proc is not None and proc.state not in "ZXx" and proc.start >= since:
            found[pid] = proc
    return found


def _wait(threads: list[threading.Thread], procs: dict[int, _Proc], until: float) -> bool:
    """Wait until these threads and processes have ended or ``until``; True if some have not."""
    for thread in threads:
        thread.join(max(0.0, until - time.monotonic()))
    running = list(procs.values())
    while running and time.monotonic() < until:
        time.sleep(0.01)
        running = [p for p in running if _running([p.pid], p.start)]
    return bool(running) or any(thread.is_alive() for thread in threads)


def _describe_thread(thread: threading.Thread, phase: str) -> str:
    target = getattr(thread, "_target", None)
    if target is None:
        runs = f"{type(thread).__module__}.{type(thread).__qualname__}.run"
    else:
        runs = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', target)}"
    where = ""
    frame = sys._current_frames().get(thread.ident or -1)
    if frame is not None:
        stack = [f for f in traceback.extract_stack(frame) if "threading.py" not in f.filename]
        if stack:
            where = f"; now at {stack[-1].filename}:{stack[-1].lineno} in {stack[-1].name}"
    daemon = ", daemon" if thread.daemon else ""
    return f"thread {thread.name!r} ({runs}{daemon}), started in {phase}{where}"


def _allowed(item: pytest.Item, text: str) -> bool:
    for marker in item.iter_markers(LEAVES_RUNNING):
        if not marker.args or any(str(part) in text for part in marker.args):
            return True
    return False


def _kill(procs: dict[int, _Proc]) -> None:
    """SIGKILL each, with its process group when it leads one; reap the ones that are ours."""
    for pid, proc in procs.items():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if proc.pgid == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
    mine = [pid for pid, proc in procs.items() if proc.ppid == os.getpid()]
    end = time.monotonic() + 2.0
    while mine and time.monotonic() < end:
        for pid in list(mine):
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    mine.remove(pid)
            except ChildProcessError:
                mine.remove(pid)  # reaped by its Popen meanwhile
        if mine:
            time.sleep(0.01)


class LeakGuard:
    """Fails a test that leaves a thread or a process it started running after its teardown."""

    def __init__(self, config: pytest.Config) -> None:
        self.grace = float(str(config.getini(_GRACE_INI)))
        self.tests = 0
        # Started by fixtures wider than a function: they outlive the test that set them up.
        self.owned_threads: set[threading.Thread] = set()
        self.owned_pids: set[int] = set()
        self.by_fixture: dict[pytest.FixtureDef[object], _Started] = {}
        self.watch: _Watch | None = None

    def _new(self, watch: _Watch) -> tuple[list[threading.Thread], dict[int, _Proc]]:
        threads = [
            thread
            for thread in threading.enumerate()
            if thread not in watch.threads
            and thread not in self.owned_threads
            and not isinstance(thread, threading._DummyThread)  # not started from Python
        ]
        leaders = {pid for pid in watch.phase if isinstance(pid, int)} - self.owned_pids
        pids = _children() - watch.children
        pids |= _descendants(watch.token, leaders, watch.last_pid, _last_pid())
        pids -= self.owned_pids
        if pids:
            pids -= _process_singletons()
        return threads, _running(pids, watch.since)

    def _settle(
        self, find: Callable[[], tuple[list[threading.Thread], dict[int, _Proc]]]
    ) -> tuple[list[threading.Thread], dict[int, _Proc]]:
        """What ``find`` names, once they had ``grace`` seconds in all to end."""
        threads, procs = find()
        if not threads and not procs:
            return threads, procs
        end = time.monotonic() + self.grace
        # Most are ending already (a paramiko transport's thread outlives its close by a few
        # ms): the collector, which costs tens of ms, is for those that are not.
        if _wait(threads, procs, min(end, time.monotonic() + 0.2)):
            # A socket held only by garbage (a cycle through a pytest.raises traceback, say)
            # keeps the server thread that reads it alive until the collector runs.
            gc.collect()
            _wait(threads, procs, end)
        return find()

    def _verdict(self, item: pytest.Item, watch: _Watch) -> str | None:
        threads, procs = self._settle(lambda: self._new(watch))
        lines, count = [], [0, 0]
        for thread in threads:
            line = _describe_thread(thread, watch.phase.get(thread, "teardown"))
            if _allowed(item, f"{thread.name} {line}"):
                self.owned_threads.add(thread)
            else:
                lines.append(line)
                count[0] += 1
        leaked = {}
        for pid, proc in procs.items():
            command = _cmdline(pid)
            if _allowed(item, command):
                self.owned_pids.add(pid)
                continue
            if pid in watch.phase:
                how = f"a child of the test process, started in {watch.phase[pid]}"
            elif proc.ppid == os.getpid():
                how = "a child of the test process, started in teardown"
            elif {proc.pgid, proc.sid} & set(watch.phase):
                how = f"in the group or session of a child the test started, parent {proc.ppid}"
            else:
                how = f"started during the test (its environment says so), parent {proc.ppid}"
            lines.append(f"process {pid} ({how}), killed: {command}")
            leaked[pid] = proc
            count[1] += 1
        _kill(leaked)
        if not lines:
            return None
        return (
            f"{item.nodeid} left {count[0]} thread(s) and {count[1]} process(es) running"
            f" {self.grace:g} s after its teardown:\n  " + "\n  ".join(lines) + "\n"
            f"Stop them in the test or its fixtures; one that must outlive the test is declared"
            f" with @pytest.mark.{LEAVES_RUNNING}(name or command-line part)."
        )

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Generator[None, None, None]:
        self.tests += 1
        token = f"{os.getpid()}-{self.tests}"
        os.environ[LEAK_TOKEN] = token
        self.watch = watch = _Watch(token)
        item.stash[_WATCH] = watch
        try:
            yield
        finally:
            watch.saw("setup")

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, None, None]:
        try:
            yield
        finally:
            if _WATCH in item.stash:
                item.stash[_WATCH].saw("the test body")

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> Generator[None, None, None]:
        try:
            yield
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as failure:
            verdict = self._verdict(item, item.stash[_WATCH]) if _WATCH in item.stash else None
            if verdict:
                failure.add_note(verdict)
            raise
        verdict = self._verdict(item, item.stash[_WATCH]) if _WATCH in item.stash else None
        if verdict:
            pytest.fail(verdict, pytrace=False)

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(
        self, fixturedef: pytest.FixtureDef[object], request: pytest.FixtureRequest
    ) -> Generator[None, object, object]:
        if fixturedef.scope == "function":
            return (yield)
        threads, children, last = set(threading.enumerate()), _children(), _last_pid()
        since = int(time.clock_gettime(time.CLOCK_BOOTTIME) * _CLK_TCK)
        # A token of the fixture's own: what its processes start later (a daemon's worker
        # process, started on demand) is theirs, not the test's that happened to set it up.
        test_token = os.environ.get(LEAK_TOKEN)
        token = f"{test_token}-{fixturedef.argname}"
        os.environ[LEAK_TOKEN] = token
        try:
            return (yield)
        finally:
            if test_token is None:
                os.environ.pop(LEAK_TOKEN, None)
            else:
                os.environ[LEAK_TOKEN] = test_token
            new_threads = set(threading.enumerate()) - threads
            # Read twice: the kernel's list can skip a child while another one exits.
            new_pids = (_children() | _children()) - children
            new_pids |= _descendants(token, new_pids, last, _last_pid())
            self.owned_threads |= new_threads
            self.owned_pids |= new_pids
            if new_threads or new_pids:
                self.by_fixture[fixturedef] = _Started(new_threads, new_pids, since)

    def pytest_fixture_post_finalizer(
        self, fixturedef: pytest.FixtureDef[object], request: pytest.FixtureRequest
    ) -> None:
        started = self.by_fixture.pop(fixturedef, None)
        # A session's servers may be shared with other xdist workers (dockerd), and the
        # process ends right after.
        if started is None or fixturedef.scope == "session":
            return
        self.owned_threads -= started.threads
        self.owned_pids -= started.pids

        def still() -> tuple[list[threading.Thread], dict[int, _Proc]]:
            threads = [t for t in started.threads if t.is_alive()]
            return threads, _running(started.pids, started.since)

        threads, procs = self._settle(still)
        lines = [_describe_thread(t, "its setup") for t in threads]
        lines += [f"process {pid}, killed: {_cmdline(pid)}" for pid in procs]
        _kill(procs)
        if lines:
            pytest.fail(
                f"the {fixturedef.scope}-scoped fixture {fixturedef.argname!r} left running"
                f" after its teardown:\n  " + "\n  ".join(lines),
                pytrace=False,
            )


_WATCH = pytest.StashKey[_Watch]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(_GRACE_INI, "seconds a test's threads and processes get to end", default="2.0")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{LEAVES_RUNNING}(*parts): the threads (by name or target) and processes (by command"
        " line) holding one of these parts, or all without any, may outlive the test",
    )
    if not config.pluginmanager.has_plugin("spoold-leak-guard"):
        config.pluginmanager.register(LeakGuard(config), "spoold-leak-guard")
    if config.option.basetemp is None and not hasattr(config, "workerinput"):
        # Not pytest's /tmp/pytest-of-root, which it keeps root's alone (0700), re-checked
        # as each xdist worker starts: the tests' jobs run as the job user and must enter
        # their test's tmp_path (jobs_reach_tmp_path). One fresh directory per run, removed after.
        base = tempfile.mkdtemp(prefix="spoold-tests-")
        config.option.basetemp = base
        config.add_cleanup(lambda: shutil.rmtree(base, ignore_errors=True))
