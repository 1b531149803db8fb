"""spoold against the durable floor and its peers, in one interleaved run (issue 23).

The tools: spoold (this checkout's, 2 workers), the durable floor (floor_durable.py, 2 workers:
spoold's 7 fsyncs a job and nothing more), the same floor compiled (floor_durable.c, built with
the system's cc; in the throughput, flood and pickup rows, and left alone with the others in
the idle ones: what SPEC section 1's work costs without an interpreter), and where a row
applies to them task-spooler (``tsp -S 2``), nq (two queues, jobs alternating), incron (one
command per file renamed in; where no syslog daemon listens at /dev/log, a sink of the run's
stands in for one, see ``SyslogSink``) and a plain subprocess loop (2 threads), plus ``> file``
+ fsync for the log rows. Each round measures every row, and within a row the tools take turns (the
order rotates from round to round); the table shows medians over the rounds and ratios taken
within a round, where the tools met the same machine. Rows (``--only``):

- idle: a few jobs, spoold's job supervisors waited out (5 s idle; ``awake``), then every daemon
  left alone ``idle`` s at once: CPU over that time (``QuietCpu``: to the nanosecond where the
  same threads ran all through, in 10 ms clock ticks otherwise); RSS and PSS summed over all
  of its processes (smaps_rollup), their number and their threads;
- rest: the same once spoold's worker processes and launcher have left (10 s after a burst that
  came after a quiet spell, longer when jobs came soon after they left, up to
  ``worker_idle_exit``; waited for, at most REST_BOUND s); then one job dropped into each spool: its pickup
  latency (what the quiet costs the next job: spoold starts a worker process for it);
- pickup: jobs renamed into incoming/ one at a time, ``spacing`` apart, in blocks of 25 per
  tool; rename -> the job's process has started (it writes $EPOCHREALTIME);
- throughput: ``jobs`` ``/bin/true`` jobs, 2 at a time: renamed into incoming/ at once, first
  rename -> last job in done/ (spoold, floor, incron: each file's command ends by moving it to
  done/), all submitted by a shell loop then waited for (tsp, nq), or run by the loop; also
  the daemon's CPU per job: utime+stime of the daemon and of its descendants that run its own
  executable (spoold: worker processes, launchers, the jobs' supervisors, which sit in sessions
  of their own), so not the jobs (tsp: its server alone, not the clients that run its jobs;
  incron: incrond; the loop: its own process); for spoold and the floor, also how much of it
  was the kernel's (stime);
- flood: ``flood`` ``/bin/true`` job files renamed into incoming/ at once. *Accepted* = the job's
  directory was renamed into pending/ (or a later state's directory: running/, done/, failed/),
  seen by inotify; accepted files/s = ``flood`` / (last one accepted - first rename). When the
  last file left incoming/ and when the last job finished are shown too; peak RSS is the largest
  sum of VmRSS over the daemon's processes, sampled every 0.1 s until the last job finished,
  beside that sum just before the drop; peak PSS the same, sampled every 0.5 s (a forked
  process, such as spoold's job supervisors, counts its parent's pages in its RSS again);
- log100, log2: one job writing ``log_bytes`` in 100-byte lines (``yes <99 x> | head -c N``), or
  in 2-byte lines (``yes | head -c N``): rename -> job in done/, and the daemon's CPU over it,
  against the same command with ``> file`` and an fsync of the file (spoold keeps its default
  ``max_log_size``);
- schedules: a fresh spoold each round (stopped and removed after it), ``schedules`` files
  ``{every: 60s}`` renamed in at once; first rename -> every schedule's status.json lists its
  ``next_fire_times`` (its scheduler took it in), and the daemon's CPU over that time; then,
  once the worker processes started with it have left, its CPU left alone up to
  ``schedule_idle`` s (``QuietCpu``), in the minute before the first firing is due.
  ``--schedules-large`` adds the same with ``schedules_large`` (10,000).

Every wait is bounded; every daemon (incrond with a throwaway config and table in the run's own
directory, tsp's server on its own socket) is stopped and every temporary directory removed on the
way out, also after a failure or Ctrl-C. task-spooler, nq, incron and a C compiler are installed
with apt-get when missing. Local files and a Unix socket only: no network.

Usage: .venv/bin/python benchmarks/bench_compare.py [--quick] [--rounds N] [--json FILE]
       [--only ROW,...] [--schedules-large] [--dir DIR] [--workers 2]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self, TypeVar

from watchdog.observers.inotify_c import InotifyConstants

if __package__ in (None, ""):  # run as a script: the project root is one up
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_spool import (
    CLOCK_TICKS,
    START_BOUND,
    STOP_BOUND,
    Daemon,
    Finished,
    InotifyWatch,
    Tool,
    archive_jobs,
    load_average,
    make_tool,
    memory_of,
    one_per_address_space,
    percentile,
    pickup,
    runs,
    say,
    service_environment,
    spread_subdirectories,
    stage_jobs,
)
from benchmarks.floor_durable import DIRECTORIES as FLOOR_DIRECTORIES

HERE = Path(__file__).resolve().parent
ROWS = ("idle", "rest", "pickup", "throughput", "flood", "log100", "log2", "schedules")
COMPILED_ROWS = {"pickup", "throughput", "flood"}  # the rows the compiled floor takes part in
AWAKE_BOUND = 20.0  # seconds a flood waits at most for spoold's idle job supervisors to leave
REST_BOUND = 90.0  # seconds the rest row waits at most for spoold's helper processes to leave
PICKUP_BLOCK = 25  # pickup drops alternate between the tools in blocks of this many
SAMPLE_EVERY = 0.1  # seconds between two RSS samples in the flood
PSS_EVERY = 5  # a PSS sample every this many: smaps_rollup walks every page table
LINE_99 = "x" * 99  # with yes's newline: 100-byte lines
FIRST_FIRING = 60.0  # seconds from a schedule's acceptance to its first firing ({every: 60s})
SETTLED = 6.0  # seconds after which spoold's scheduler takes a directory's stamp as final (5)
T = TypeVar("T")


@dataclass(frozen=True)
class Sizes:
    jobs: int  # throughput: /bin/true jobs per tool and round
    flood: int  # files renamed into incoming/ at once
    log_bytes: int  # what the log job writes
    schedules: int  # schedules registered
    schedules_large: int  # the same with --schedules-large
    drops: int  # pickup: drops per tool and round
    spacing: float  # pickup: seconds between two drops
    idle: float  # seconds each daemon is left alone
    #: seconds the schedules' daemon is left alone after registering them: with the full
    #: sizes one ``rescan_interval`` (30 s in ``make_tool``'s config), so that its round over
    #: every schedule falls in the window once, not in one round's window out of three
    schedule_idle: float
    rounds: int
    warmup: int  # jobs each spool runs before the first round, not counted


FULL = Sizes(
    jobs=1000,
    flood=10_000,
    log_bytes=200_000_000,
    schedules=1000,
    schedules_large=10_000,
    drops=200,
    spacing=0.020,
    idle=10.0,
    schedule_idle=30.0,
    rounds=3,
    warmup=50,
)
QUICK = Sizes(
    jobs=200,
    flood=1000,
    log_bytes=20_000_000,
    schedules=100,
    schedules_large=1000,
    drops=50,
    spacing=0.020,
    idle=3.0,
    schedule_idle=3.0,
    rounds=1,
    warmup=20,
)


# -- processes ----------------------------------------------------------------------------------


def proc_status(pid: int, key: str) -> int:
    """A number from /proc/PID/status (``VmRSS`` in kB, ``Threads``); 0 if it has ended."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    return 0


def family(daemon: Daemon) -> list[int]:
    """The daemon's processes: itself and its descendants that run its own executable.

    spoold's worker processes, their launchers and the jobs' supervisors (forks of a launcher,
    each in a session of its own, which write the job's log) are all its Python; a job runs
    other programs (sh, true, yes) and is left out, with whatever it starts.
    """
    exe = executable(daemon)
    if exe is None:
        return []
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [daemon.pid], [daemon.pid]
    while todo:  # each process is reached once: the tree is finite
        for child in children.get(todo.pop(), []):
            if runs(child, exe):
                found.append(child)
                todo.append(child)
    return found


def executable(daemon: Daemon) -> str | None:
    """The program the daemon runs (its Python); None once it has ended."""
    try:
        return os.readlink(f"/proc/{daemon.pid}/exe")
    except OSError:
        return None


def cpu_seconds(daemon: Daemon) -> float:
    """utime + stime of the daemon's ``family`` (all their threads; not the jobs), those
    that ended since counted as last seen."""
    return daemon.family_cpu.seconds(family(daemon))


def thread_ns(pids: list[int]) -> dict[tuple[int, int], int]:
    """On-CPU nanoseconds of each thread of ``pids``, as the scheduler counts them
    (``/proc/PID/task/TID/schedstat``)."""
    found: dict[tuple[int, int], int] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    text = Path(f"/proc/{pid}/task/{task}/schedstat").read_text()
                    found[pid, int(task)] = int(text.split()[0])
    return found


class QuietCpu:
    """A daemon's CPU over a quiet window: to the nanosecond where the same threads ran at
    its start and its end (``schedstat``); in clock ticks otherwise (``cpu_seconds``, which
    keeps what a process that ended used). A tick is 10 ms: 0.033 % of a core over 30 s, a
    third of the 10,000 schedules' idle limit.

    A thread that began and ended inside the window is in neither list of threads, and its
    time in no thread's count: its process's ticks (utime and stime, each cut to a whole
    tick) then exceed the threads' sum by more than two ticks, and the ticks are taken."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self._ticks = cpu_seconds(daemon)
        self._threads = thread_ns(family(daemon))

    def seconds(self) -> tuple[float, str]:
        """CPU since the start, and how it was counted (``schedstat`` or ``ticks``)."""
        now = thread_ns(family(self._daemon))
        ticks = cpu_seconds(self._daemon) - self._ticks
        precise = (sum(now.values()) - sum(self._threads.values())) / 1e9
        if now and now.keys() == self._threads.keys() and ticks - precise <= 2 / CLOCK_TICKS:
            return precise, "schedstat"
        return ticks, "ticks"


#: spoold's processes by the names they give themselves (``ps -o comm``), and what they are.
ROLES = {
    "spoold": "main",
    "spoold-worker": "workers",
    "spoold-launcher": "supervisors",
    "spoold-job-sup": "supervisors",
}


ROLE_NAMES = {
    "main": "main",
    "workers": "worker processes",
    "supervisors": "launcher and job supervisors",
}


def cpu_by_role(daemon: Daemon) -> tuple[dict[str, float], float]:
    """``cpu_seconds`` per role (``ROLES``; any other name is ``other``: a peer's processes),
    and how much of it all was spent in the kernel."""
    found: dict[str, float] = {}
    kernel = 0.0
    for name, (seconds, in_kernel) in daemon.family_cpu.split_by_name(family(daemon)).items():
        role = ROLES.get(name, "other")
        found[role] = found.get(role, 0.0) + seconds
        kernel += in_kernel
    return found, kernel


class MachineCpu:
    """How many of the machine's cores were busy (not idle, not waiting on I/O) between
    its start and ``cores()``: a run near all of them is bound by CPU, not by waiting."""

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as stat:
            ticks = [int(x) for x in stat.readline().split()[1:]]
        return sum(ticks[:8]), ticks[3] + ticks[4]  # guest time is within user already

    def cores(self) -> float:
        total, idle = self._read()
        spent = total - self._start[0]
        return (os.cpu_count() or 1) * (1 - (idle - self._start[1]) / spent) if spent else 0.0


def memory_mb(daemon: Daemon) -> tuple[float, float]:
    """RSS and PSS summed over the daemon's ``family`` (PSS counts shared pages once); a
    child that has become a job since it was listed is not counted (``runs``)."""
    return memory_of(family(daemon), executable(daemon))


def rss_now_mb(daemon: Daemon) -> float:
    """VmRSS summed over the daemon's ``family`` (cheaper than smaps_rollup: for sampling),
    as ``memory_mb`` counts them."""
    exe = executable(daemon)
    total = 0
    for pid in one_per_address_space(family(daemon)):
        rss = proc_status(pid, "VmRSS")
        if exe is not None and runs(pid, exe):
            total += rss
    return total / 1024


class Sampler:
    """Calls ``sample(tick)`` every ``every`` s in a thread while the block runs."""

    def __init__(self, every: float) -> None:
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self, tick: int) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        for tick in itertools.count():
            self.sample(tick)
            if self._stop.wait(self._every):
                return

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(10)


class PeakMemory(Sampler):
    """Samples ``rss_now_mb`` every SAMPLE_EVERY s in a thread while the block runs, and the
    PSS sum every PSS_EVERY samples: a process forked from another (spoold's job supervisors,
    forks of its launcher) counts their shared pages in its RSS again, in its PSS not."""

    def __init__(self, daemon: Daemon) -> None:
        super().__init__(SAMPLE_EVERY)
        self.daemon = daemon
        self.peak = 0.0
        self.peak_pss = 0.0

    def sample(self, tick: int) -> None:
        self.peak = max(self.peak, rss_now_mb(self.daemon))
        if tick % PSS_EVERY == 0:
            self.peak_pss = max(self.peak_pss, memory_mb(self.daemon)[1])


def run_script(script: str, env: dict[str, str], bound: float) -> float:
    """Run a shell script in a session of its own; its wall time. Killed (its whole session)
    and TimeoutError after ``bound`` seconds."""
    started = time.monotonic()
    process = subprocess.Popen(
        ["/bin/sh", "-c", script],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _, err = process.communicate(timeout=bound)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=10)
        raise TimeoutError(f"script not done after {bound:.0f}s") from None
    elapsed = time.monotonic() - started
    if process.returncode != 0:
        raise RuntimeError(f"script failed ({process.returncode}): {err.decode(errors='replace')}")
    return elapsed


# -- the peers ----------------------------------------------------------------------------------


def find_tsp() -> str | None:
    """task-spooler's binary: Debian names it ``tsp`` (``ts`` is also moreutils' timestamper)."""
    if found := shutil.which("tsp"):
        return found
    ts = shutil.which("ts")
    if ts is None:
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([ts, "-V"], capture_output=True, timeout=5, check=False)
        if b"spooler" in (out.stdout + out.stderr).lower():
            return ts
    return None


def find_cc() -> str | None:
    """A C compiler that can build floor_durable.c: cc, with the C library's headers."""
    cc = shutil.which("cc")
    return cc if cc is not None and Path("/usr/include/stdio.h").is_file() else None


#: Each peer's Debian packages (separated by spaces) and how to find its binary.
PEERS: dict[str, tuple[str, Callable[[], str | None]]] = {
    "tsp": ("task-spooler", find_tsp),
    "nq": ("nq", lambda: shutil.which("nq")),
    "incron": (
        "incron",
        lambda: shutil.which("incrond") or shutil.which("incrond", path="/usr/sbin"),
    ),
    "cc": ("gcc libc6-dev", find_cc),
}


def ensure_peers(wanted: list[str]) -> dict[str, str | None]:
    """The peers' binaries, installed with apt-get where missing; None for one not to be had."""
    missing = [
        package for name in wanted if PEERS[name][1]() is None for package in PEERS[name][0].split()
    ]
    if missing:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            say(f"cannot install {missing} (not root, or no apt-get): those columns stay empty")
        else:
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
            say(f"installing {' '.join(missing)} with apt-get")
            for attempt in range(2):  # the second after an update of the package lists
                done = subprocess.run(
                    install, env=env, capture_output=True, timeout=600, check=False
                )
                if done.returncode == 0 or attempt == 1:
                    break
                subprocess.run(
                    ["apt-get", "update", "-qq"],
                    env=env,
                    capture_output=True,
                    timeout=600,
                    check=False,
                )
            if done.returncode != 0:
                say(f"apt-get failed: {done.stderr.decode(errors='replace')[-500:]}")
    return {name: PEERS[name][1]() for name in wanted}


class TaskSpooler(Daemon):
    """task-spooler's server on a socket of its own: started by ``tsp -S 2`` (it forks into a
    session of its own, found by the TS_SOCKET in its environment), stopped by ``tsp -K``."""

    def __init__(self, binary: str, home: Path) -> None:
        super().__init__("tsp", [binary], home / "daemon.log")
        self.binary = binary
        self.socket = home / "socket"
        self.env = {
            **service_environment(),
            "TS_SOCKET": str(self.socket),
            "TMPDIR": str(home),
            "TS_MAXFINISHED": "20",
            "TS_MAXCONN": "5000",
        }
        self.server: int | None = None

    @property
    def pid(self) -> int:
        assert self.server is not None
        return self.server

    def _find_server(self) -> int | None:
        mark = f"TS_SOCKET={self.socket}\0".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == int(entry.name) and mark in (entry / "environ").read_bytes():
                    return int(entry.name)
        return None

    def start(self, bound: float = START_BOUND) -> None:
        subprocess.run(
            [self.binary, "-S", "2"], env=self.env, capture_output=True, timeout=bound, check=True
        )
        end = time.monotonic() + bound
        while (server := self._find_server()) is None and time.monotonic() < end:
            time.sleep(0.05)
        if server is None:
            raise RuntimeError("tsp: no server process found")
        self.server = server

    def stop(self, bound: float = STOP_BOUND) -> int | None:
        if self.server is None:
            return None
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                [self.binary, "-K"], env=self.env, capture_output=True, timeout=10, check=False
            )
        end = time.monotonic() + bound
        while self._find_server() == self.server and time.monotonic() < end:
            time.sleep(0.05)
        if self._find_server() == self.server:  # still ours (its socket in its environment)
            os.kill(self.server, signal.SIGKILL)
        self.server = None
        return 0

    def throughput(self, jobs: int, bound: float) -> dict[str, float]:
        """``jobs`` ``tsp -n /bin/true`` submitted by a shell loop, then waited for."""
        cpu = cpu_seconds(self)
        script = (
            f'for i in $(seq {jobs}); do "$TSP" -n /bin/true > /dev/null || exit 1; done\n'
            '"$TSP" -w > /dev/null 2>&1\n'  # the last one added; then any still going
            'for id in $("$TSP" -l | awk \'NR > 1 && $2 != "finished" {print $1}\'); do\n'
            '  "$TSP" -w "$id" > /dev/null 2>&1\n'
            "done\n"
            "exit 0\n"
        )
        seconds = run_script(script, {**self.env, "TSP": self.binary}, bound)
        used = cpu_seconds(self) - cpu
        return {"jobs_per_s": jobs / seconds, "cpu_ms_per_job": used * 1000 / jobs}


_SINK = """\
import os, socket, sys
sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sink.bind(sys.argv[1])
os.chmod(sys.argv[1], 0o666)
print(os.stat(sys.argv[1]).st_ino, flush=True)
while True:
    sink.recv(65536)
"""


class SyslogSink:
    """A syslog socket at ``path`` (/dev/log) that drops what it is sent, where none is.

    incrond logs two lines through syslog(3) for every file it runs a command for. With no
    syslog daemon listening (these machines run none), glibc writes each line to
    /dev/console instead, and incron's pickup took 6.6 ms here against 1.55 ms with a sink
    (its fork waits behind the console). A machine that runs incron runs a syslog daemon;
    this stands in for one, in a process of its own (not counted as incron's, as rsyslogd's
    would not be). spoold logs to its stderr, and the floors log nothing: only incron's
    figures move with it. Where something is at ``path`` already it is left alone.
    """

    def __init__(self, path: str = "/dev/log") -> None:
        self.path = path
        self.process: subprocess.Popen[bytes] | None = None
        self._inode: int | None = None

    def start(self, bound: float = START_BOUND) -> bool:
        """Listen at ``path`` unless something is there; True if this sink does."""
        if os.path.lexists(self.path):
            return False
        self.process = subprocess.Popen(
            [sys.executable, "-c", _SINK, self.path], stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        assert self.process.stdout is not None
        timer = threading.Timer(bound, self.process.kill)  # a sink that never says: no hang
        timer.start()
        try:
            line = self.process.stdout.readline()
        finally:
            timer.cancel()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"the syslog sink at {self.path} did not start")
        self._inode = int(line)
        return True

    def stop(self) -> None:
        """Stop listening, and remove the socket if it is still this sink's."""
        if self.process is None:
            return
        self.process.kill()
        self.process.wait(STOP_BOUND)
        self.process = None
        with contextlib.suppress(FileNotFoundError):
            if self._inode is not None and os.lstat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        self._inode = None


class Incron(Daemon):
    """incrond in the foreground with a throwaway config: its system table, lock file and
    allow/deny lists in ``home``, none of the machine's (/etc/incron.d, /var/spool/incron).

    Its table watches two spool-like trees, each file renamed into their incoming/ runs one
    command (bash -c, as incrond runs them), which ends by moving the file to done/<id>:
    ``true_tree`` runs /bin/true, ``pick_tree`` writes $EPOCHREALTIME to ``marks``/<id> first.
    """

    def __init__(
        self, binary: str, home: Path, true_tree: Path, pick_tree: Path, marks: Path
    ) -> None:
        tables, conf = home / "tables", home / "incron.conf"
        for directory in (tables, home / "lock", home / "users"):
            directory.mkdir(parents=True)
        conf.write_text(
            f"system_table_dir = {tables}\nuser_table_dir = {home / 'users'}\n"
            f"allowed_users = {home / 'allow'}\ndenied_users = {home / 'deny'}\n"
            f"lockfile_dir = {home / 'lock'}\nlockfile_name = incrond\n"
        )

        # incrond replaces $@ (the directory) and $# (the file's name), and $$ by $.
        def done(tree: Path) -> str:
            return f"mv -- $@/$# {tree}/done/$${{n%.yaml}}"

        (tables / "bench").write_text(
            f"{true_tree}/incoming IN_MOVED_TO n=$#; /bin/true; {done(true_tree)}\n"
            f"{pick_tree}/incoming IN_MOVED_TO n=$#; echo $$EPOCHREALTIME > {marks}/$${{n%.yaml}};"
            f" {done(pick_tree)}\n"
        )
        super().__init__("incron", [binary, "-n", "-f", str(conf)], home / "daemon.log")
        self.probe_tree = true_tree

    def start(self, bound: float = START_BOUND) -> None:
        """Start, and return once a probe file renamed in has come out in done/."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                env=service_environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        end = time.monotonic() + bound
        for probe in range(int(bound) + 1):  # one probe a second at most
            name = f"probe-{probe}"
            staged = self.probe_tree / f"{name}.yaml"
            staged.write_text("probe\n")
            os.rename(staged, self.probe_tree / "incoming" / staged.name)
            seen = time.monotonic() + 1.0
            while time.monotonic() < min(seen, end) and self.process.poll() is None:
                if (self.probe_tree / "done" / name).exists():
                    os.unlink(self.probe_tree / "done" / name)
                    return
                time.sleep(0.02)
            with contextlib.suppress(FileNotFoundError):  # renamed in before it watched
                os.unlink(self.probe_tree / "incoming" / staged.name)
            if time.monotonic() >= end or self.process.poll() is not None:
                break
        raise RuntimeError(f"incrond did not run its table; its log:\n{self.log_tail()}")


def nq_throughput(binary: str, home: Path, jobs: int, bound: float) -> dict[str, float]:
    """``jobs`` ``nq /bin/true`` alternating between two queues (two at a time), then ``nq -w``."""
    queues = [home / "q1", home / "q2"]
    for queue in queues:
        shutil.rmtree(queue, ignore_errors=True)
        queue.mkdir(parents=True)
    script = (
        f"for i in $(seq {(jobs + 1) // 2}); do\n"
        '  NQDIR="$Q1" "$NQ" -c -q /bin/true || exit 1\n'
        '  NQDIR="$Q2" "$NQ" -c -q /bin/true || exit 1\n'
        "done\n"
        'NQDIR="$Q1" "$NQ" -w && NQDIR="$Q2" "$NQ" -w\n'
    )
    env = {**service_environment(), "NQ": binary, "Q1": str(queues[0]), "Q2": str(queues[1])}
    seconds = run_script(script, env, bound)
    return {"jobs_per_s": 2 * ((jobs + 1) // 2) / seconds}


LOOP = r"""
import json, resource, subprocess, sys, threading, time
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
jobs, lock, left = int(sys.argv[1]), threading.Lock(), [int(sys.argv[1])]
def work():
    while True:
        with lock:
            if left[0] == 0:
                return
            left[0] -= 1
        subprocess.run(["/bin/true"], check=False)
before, started = cpu(), time.monotonic()
threads = [threading.Thread(target=work) for _ in range(2)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps({"seconds": time.monotonic() - started, "cpu": cpu() - before}))
"""


def loop_throughput(jobs: int, bound: float) -> dict[str, float]:
    """A Python loop running ``/bin/true`` in 2 threads: the spawn floor."""
    done = subprocess.run(
        [sys.executable, "-c", LOOP, str(jobs)],
        env=service_environment(),
        capture_output=True,
        timeout=bound,
        check=True,
    )
    measured = json.loads(done.stdout)
    return {
        "jobs_per_s": jobs / measured["seconds"],
        "cpu_ms_per_job": measured["cpu"] * 1000 / jobs,
    }


# -- the spools ---------------------------------------------------------------------------------


def floor_tool(name: str, home: Path, program: list[str], workers: int) -> Tool:
    """A floor's column: ``program`` serving a spool of its own under ``home``."""
    spool = home / "spool"
    for directory in FLOOR_DIRECTORIES:
        (spool / directory).mkdir(parents=True)
    argv = [*program, str(spool), "--workers", str(workers)]
    return Tool(name, spool, Daemon(name, argv, home / "daemon.log"), home / "done.aside")


def make_floor(base: Path, workers: int) -> Tool:
    """The durable floor's column: floor_durable.py."""
    program = [sys.executable, str(HERE / "floor_durable.py")]
    return floor_tool("floor", base / "floor", program, workers)


def make_compiled_floor(base: Path, workers: int, cc: str) -> Tool:
    """The compiled floor's column: floor_durable.c built with ``cc`` into the run's directory
    (RuntimeError with the compiler's words if it will not build)."""
    binary = base / "cfloor" / "floor_durable"
    tool = floor_tool("cfloor", binary.parent, [str(binary)], workers)
    built = subprocess.run(
        [cc, "-O2", "-Wall", "-o", str(binary), str(HERE / "floor_durable.c"), "-lpthread"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if built.returncode != 0:
        raise RuntimeError(f"floor_durable.c did not build: {built.stderr[-500:]}")
    return tool


def present(*tools: Tool | None) -> list[Tool]:
    """The tools that are there (a peer that would not start is None)."""
    return [tool for tool in tools if tool is not None]


def incron_tree(path: Path) -> Path:
    for directory in ("incoming", "done", "failed"):
        (path / directory).mkdir(parents=True)
    return path


@dataclass
class Dropped:
    """What ``drop_and_wait`` saw."""

    seconds: float
    cpu_s: float  # the daemon's, all its processes
    cpu_s_by_role: dict[str, float]  # the same per ``ROLES``
    kernel_s: float  # of cpu_s, in the kernel
    busy_cores: float  # the whole machine's (``MachineCpu``)
    failed: int


def drop_and_wait(tool: Tool, ids: list[str], base: Path, commands: str, bound: float) -> Dropped:
    """Stage one job per id, rename them all into incoming/ at once, wait for all in done/ (or
    failed/): wall seconds and the daemon's CPU over it. The jobs stay in done/."""
    names = stage_jobs(base / "stage", ids, commands)
    cpu, kernel_before = cpu_by_role(tool.daemon)
    with Finished(tool.spool, ids) as finished:
        machine = MachineCpu()
        first = time.time()
        for name in names:
            os.rename(base / "stage" / name, tool.incoming / name)
        last = finished.wait(bound)
        busy = machine.cores()
    cpu_after, kernel_after = cpu_by_role(tool.daemon)
    used = {role: seconds - cpu.get(role, 0.0) for role, seconds in cpu_after.items()}
    if finished.failed:
        say(f"{tool.name}: {len(finished.failed)} job(s) failed")
    kernel = kernel_after - kernel_before
    return Dropped(last - first, sum(used.values()), used, kernel, busy, len(finished.failed))


def spool_throughput(tool: Tool, ids: list[str], base: Path) -> dict[str, float]:
    bound = max(120.0, len(ids) / 5)
    run = drop_and_wait(tool, ids, base, "/bin/true", bound)
    archive_jobs(tool, ids, base / "archive")
    return {
        "jobs_per_s": len(ids) / run.seconds,
        "cpu_ms_per_job": run.cpu_s * 1000 / len(ids),
        **{f"cpu_ms_{role}": s * 1000 / len(ids) for role, s in run.cpu_s_by_role.items()},
        "cpu_ms_kernel": run.kernel_s * 1000 / len(ids),
        "busy_cores": run.busy_cores,
        "failed": run.failed,
    }


class Flood(InotifyWatch):
    """When each of a flood's files left incoming/, reached pending/ (or a later state's
    directory), and finished (done/ or failed/), seen by inotify."""

    def __init__(self, spool: Path, ids: list[str]) -> None:
        super().__init__()
        self.spool = spool
        self.ids = set(ids)
        self.left: dict[str, float] = {}
        self.accepted: dict[str, float] = {}
        self.finished: dict[str, float] = {}
        self._where: dict[object, str] = {}

    def add_watches(self) -> None:
        out = InotifyConstants.IN_MOVED_FROM | InotifyConstants.IN_DELETE
        for directory in ("incoming", "pending", "running", "done", "failed"):
            mask = out if directory == "incoming" else InotifyConstants.IN_MOVED_TO
            self._where[self.watch(self.spool / directory, mask)] = directory

    def on_event(self, event: Any) -> None:
        self._seen(self._where.get(event.wd, ""), os.fsdecode(event.name), time.time())

    def _seen(self, directory: str, name: str, now: float) -> None:
        job_id = name.removesuffix(".yaml") if directory == "incoming" else name
        if job_id not in self.ids:
            return
        with self._lock:
            if directory == "incoming":
                self.left.setdefault(job_id, now)
            else:
                self.accepted.setdefault(job_id, now)
                if directory in ("done", "failed"):
                    self.finished.setdefault(job_id, now)
            if len(self.finished) == len(self.ids) and len(self.left) == len(self.ids):
                self._all_in.set()

    def _look(self) -> None:
        """After lost events: what the directories hold now (late by up to a poll)."""
        now = time.time()
        for job_id in self.ids - set(self.finished):
            if not (self.spool / "incoming" / f"{job_id}.yaml").exists():
                self._seen("incoming", f"{job_id}.yaml", now)
            for directory in ("pending", "running", "done", "failed"):
                if (self.spool / directory / job_id).exists():
                    self._seen(directory, job_id, now)

    def wait(self, bound: float) -> None:
        """Until every job finished; TimeoutError after ``bound`` seconds."""
        end = time.monotonic() + bound
        while not self._all_in.wait(0.5):
            if self._overflowed:
                self._overflowed = False
                self._look()
            if time.monotonic() > end:
                raise TimeoutError(
                    f"{len(self.ids) - len(self.finished)} flood job(s) not finished"
                )


def flood(tool: Tool, ids: list[str], base: Path) -> dict[str, float]:
    """All of ``ids`` renamed into incoming/ at once; see the module's docstring."""
    names = stage_jobs(base / "stage", ids, "/bin/true")
    awake(tool, f"{ids[0]}-awake", base)
    os.sync()  # the staged files written back now, not during the drop
    baseline, baseline_pss = rss_now_mb(tool.daemon), memory_mb(tool.daemon)[1]
    cpu = cpu_seconds(tool.daemon)
    with Flood(tool.spool, ids) as seen, PeakMemory(tool.daemon) as peak:
        first = time.time()
        for name in names:
            os.rename(base / "stage" / name, tool.incoming / name)
        seen.wait(max(300.0, len(ids) / 20))
    used = cpu_seconds(tool.daemon) - cpu
    archive_jobs(tool, ids, base / "archive")
    accepted = max(seen.accepted.values()) - first
    return {
        "accepted_s": accepted,
        "accepted_per_s": len(ids) / accepted,
        "left_incoming_s": max(seen.left.values()) - first,
        "finished_s": max(seen.finished.values()) - first,
        "rss_before_mb": baseline,
        "peak_rss_mb": peak.peak,
        "pss_before_mb": baseline_pss,
        "peak_pss_mb": peak.peak_pss,
        "cpu_s": used,
    }


def awake(tool: Tool, prefix: str, base: Path) -> None:
    """The same daemon before a flood or the idle row, whatever ran before it: a few jobs
    wake spoold's worker processes and launcher (after a quiet spell they leave 10 s after
    their last job, ``LINGER_FIRST``), and its job supervisors, which leave after 5 s idle,
    are waited out. A flood measured from rest would count five interpreters starting as its growth."""
    ids = [f"{prefix}-{n}" for n in range(4)]
    drop_and_wait(tool, ids, base, "/bin/true", 60.0)
    archive_jobs(tool, ids, base / "archive")
    deadline = time.monotonic() + AWAKE_BOUND
    while time.monotonic() < deadline and any(
        proc_name(pid) == "spoold-job-sup" for pid in family(tool.daemon)
    ):
        time.sleep(0.2)
    if tool.name == "spoold" and not any(
        proc_name(pid) == "spoold-worker" for pid in family(tool.daemon)
    ):  # they stay longer than the supervisors (LINGER_FIRST): said if this machine was slower
        say("  spoold's worker processes had left before its job supervisors: measured at rest")


def proc_name(pid: int) -> str:
    """A process's name as ps shows it (``comm``); empty once it has ended."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def log_command(line_bytes: int, total: int) -> str:
    return f"yes {LINE_99} | head -c {total}" if line_bytes == 100 else f"yes | head -c {total}"


def log_job(tool: Tool, job_id: str, base: Path, commands: str) -> dict[str, float]:
    """One job writing a lot to its stdout: rename -> done/, the daemon's CPU, the log kept."""
    run = drop_and_wait(tool, [job_id], base, commands, bound=900.0)
    job_dir = next(
        tool.spool / d / job_id for d in ("done", "failed") if (tool.spool / d / job_id).is_dir()
    )
    kept = (job_dir / "log").stat().st_size if (job_dir / "log").exists() else 0
    shutil.rmtree(job_dir)  # hundreds of MB: not kept for the archive
    return {
        "wall_s": run.seconds,
        "cpu_s": run.cpu_s,
        "log_bytes": kept,
        "failed": run.failed,
    }


def to_file(base: Path, commands: str) -> dict[str, float]:
    """The same command with ``> file``, then an fsync of the file: the disk's own speed."""
    path = base / "to-file.out"
    started = time.monotonic()
    subprocess.run(["/bin/sh", "-c", f"{commands} > {path}"], check=True, timeout=900)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    wall = time.monotonic() - started
    size = path.stat().st_size
    path.unlink()
    return {"wall_s": wall, "log_bytes": size}


class Registered(InotifyWatch):
    """Waits until each schedule's status.json (scheduled/<id>/) lists ``next_fire_times``.
    Intake writes them, and hands the schedule to the scheduler in the same call (``accept``),
    so this is when the scheduler took it in, within one registration. A watch on scheduled/
    adds one on each schedule's directory."""

    def __init__(self, spool: Path, ids: list[str]) -> None:
        super().__init__()
        self.scheduled = spool / "scheduled"
        self.ids = set(ids)
        self.placed: set[str] = set()
        self.registered: dict[str, float] = {}
        self._job_of: dict[object, str] = {}
        self._top: object = None

    def add_watches(self) -> None:
        mask = InotifyConstants.IN_MOVED_TO | InotifyConstants.IN_CREATE
        self._top = self.watch(self.scheduled, mask)

    def on_event(self, event: Any) -> None:
        name = os.fsdecode(event.name)
        if event.wd == self._top:
            if name in self.ids and name not in self.placed:
                self.placed.add(name)
                mask = InotifyConstants.IN_MOVED_TO | InotifyConstants.IN_CLOSE_WRITE
                self._job_of[self.watch(self.scheduled / name, mask)] = name
                self._check(name)  # its status may have been written before the watch
        elif name == "status.json" and (job_id := self._job_of.get(event.wd)):
            self._check(job_id)

    def _check(self, job_id: str) -> None:
        try:
            status = json.loads((self.scheduled / job_id / "status.json").read_bytes())
        except (OSError, ValueError):
            return
        if isinstance(status, dict) and "next_fire_times" in status:
            with self._lock:
                self.registered.setdefault(job_id, time.time())
                if len(self.registered) == len(self.ids):
                    self._all_in.set()

    def wait(self, bound: float, daemon: Daemon) -> tuple[float, str]:
        """The time the last one was registered, and how that was known: ``status`` (every
        status.json says so), or ``quiet`` (all are in scheduled/ but some status.json never
        said so, and the daemon used no CPU for 2 s: the last time it did). TimeoutError."""
        end = time.monotonic() + bound
        cpu, moved = cpu_seconds(daemon), time.time()
        while not self._all_in.wait(0.5):
            if self._overflowed:
                self._overflowed = False
                for job_id in self.ids - set(self.registered):
                    if (self.scheduled / job_id).is_dir():
                        self.placed.add(job_id)
                        self._check(job_id)
            now_cpu = cpu_seconds(daemon)
            if now_cpu != cpu:
                cpu, moved = now_cpu, time.time()
            elif len(self.placed) == len(self.ids) and time.time() - moved >= 2.0:
                return moved, "quiet"
            if time.monotonic() > end:
                raise TimeoutError(
                    f"{len(self.registered)} of {len(self.ids)} schedules registered"
                )
        return max(self.registered.values()), "status"


def schedules(base: Path, count: int, sizes: Sizes, workers: int, label: str) -> dict[str, Any]:
    """A fresh spoold; ``count`` schedules renamed in at once; see the module's docstring."""
    home = base / label
    home.mkdir()
    tool = make_tool("spoold", home, workers)
    try:
        tool.daemon.start()
        stage = home / "stage"
        stage.mkdir()
        ids = [f"sched-{i:05d}" for i in range(count)]
        for job_id in ids:
            (stage / f"{job_id}.yaml").write_text(
                f"job_id: {job_id}\nexecutor: local\nproduct: {{commands: /bin/true}}\n"
                "schedule: {every: 60s}\n"
            )
        os.sync()
        tool.daemon.wait_quiet()  # its start-up is not registration
        cpu = cpu_seconds(tool.daemon)
        with Registered(tool.spool, ids) as registered:
            first = time.time()
            for job_id in ids:
                os.rename(stage / f"{job_id}.yaml", tool.incoming / f"{job_id}.yaml")
            last, how = registered.wait(min(900.0, max(120.0, count * 0.2)), tool.daemon)
        used = cpu_seconds(tool.daemon) - cpu
        result: dict[str, Any] = {"wall_s": last - first, "cpu_s": used, "known_by": how}
        # Idle with them: only before the first firing is due (one period after acceptance).
        # First the round that reads again those registered in the last seconds (a stamp
        # that young may hide a change, spoold.schedule.scheduler), asked for (SIGUSR1) once
        # they are old enough; the window opens a second later, in the steady state after it.
        time.sleep(max(0.0, last + SETTLED - time.time()))
        os.kill(tool.daemon.pid, signal.SIGUSR1)
        time.sleep(1.0)
        # And the worker processes started with the daemon gone (``LINGER_FIRST``), while
        # the window can still be as long: their leaving is not what idle costs.
        while len(family(tool.daemon)) > 1 and (
            first + FIRST_FIRING - 3.0 - time.time() > sizes.schedule_idle + 0.5
        ):
            time.sleep(0.5)
        window = min(sizes.schedule_idle, first + FIRST_FIRING - 3.0 - time.time())
        if window >= 1.0:
            quiet, started = QuietCpu(tool.daemon), time.monotonic()
            time.sleep(window)
            elapsed = time.monotonic() - started
            used, counted = quiet.seconds()
            result.update(idle_s=elapsed, idle_cpu_percent=100 * used / elapsed, idle_by=counted)
        else:
            say(f"{label}: registration ran into the first firings; no idle window")
        rss, pss = memory_mb(tool.daemon)
        result.update(rss_mb=rss, pss_mb=pss)
        return result
    finally:
        tool.daemon.stop()
        shutil.rmtree(home, ignore_errors=True)


# -- the run ------------------------------------------------------------------------------------


def rotated(items: list[T], turn: int) -> list[T]:
    """``items`` starting at ``turn``: each round a different tool goes first."""
    k = turn % len(items) if items else 0
    return items[k:] + items[:k]


@dataclass
class Results:
    sizes: Sizes
    peers: dict[str, str | None] = field(default_factory=dict)
    # row -> tool -> round -> what was measured
    rows: dict[str, dict[str, dict[int, dict[str, Any]]]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    load_average: dict[str, str] = field(default_factory=dict)

    def put(self, row: str, tool: str, round_: int, measured: dict[str, Any]) -> None:
        self.rows.setdefault(row, {}).setdefault(tool, {})[round_] = measured

    def median(self, row: str, tool: str, key: str) -> float:
        values = [m[key] for m in self.rows.get(row, {}).get(tool, {}).values() if key in m]
        return statistics.median(values) if values else math.nan

    def ratio(self, row: str, a: str, b: str, key: str) -> float:
        """The median over rounds of a's value / b's, both from the same round."""
        mine, theirs = self.rows.get(row, {}).get(a, {}), self.rows.get(row, {}).get(b, {})
        pairs = [
            (mine[i][key], theirs[i][key])
            for i in mine
            if i in theirs and key in mine[i] and key in theirs[i]
        ]
        ratios = [x / y for x, y in pairs if y]
        return statistics.median(ratios) if ratios else math.nan

    def samples(self, row: str, tool: str, key: str) -> list[float]:
        """Every round's samples of ``key`` (a list per round) together."""
        return [x for m in self.rows.get(row, {}).get(tool, {}).values() for x in m.get(key, [])]

    def rounds(self) -> list[int]:
        """The rounds measured, in any row."""
        return sorted({k for tools in self.rows.values() for t in tools.values() for k in t})

    def of_round(self, round_: int) -> Results:
        """What was measured in one round alone."""
        rows = {
            row: {tool: {round_: got[round_]} for tool, got in tools.items() if round_ in got}
            for row, tools in self.rows.items()
        }
        return Results(self.sizes, self.peers, rows)


class Bench:
    """The daemons of one run, and the rows measured on them."""

    def __init__(
        self, base: Path, sizes: Sizes, rows: list[str], workers: int, large: bool
    ) -> None:
        self.base = base
        self.sizes = sizes
        self.rows = rows
        self.workers = workers
        self.large = large
        self.results = Results(sizes)
        self.spools: dict[str, Tool] = {}
        self.compiled: Tool | None = None  # the compiled floor: some rows only
        self.incron: Incron | None = None
        self.incron_true: Tool | None = None
        self.incron_pick: Tool | None = None
        self.tsp: TaskSpooler | None = None
        self.nq: str | None = None
        self.syslog = SyslogSink()

    def daemons(self) -> dict[str, Daemon]:
        found: dict[str, Daemon] = {name: tool.daemon for name, tool in self.spools.items()}
        if self.compiled is not None:
            found["cfloor"] = self.compiled.daemon
        if self.tsp is not None:
            found["tsp"] = self.tsp
        if self.incron is not None:
            found["incron"] = self.incron
        return found

    def set_up(self) -> None:
        for directory in ("stage", "archive", "peers"):
            (self.base / directory).mkdir()
        needs_spools = set(self.rows) - {"schedules"}
        if needs_spools:
            self.spools["spoold"] = make_tool("spoold", self.base, self.workers)
            self.spools["floor"] = make_floor(self.base, self.workers)
        wanted = [
            name
            for name, rows in (
                ("tsp", {"idle", "rest", "throughput"}),
                ("nq", {"throughput"}),
                ("incron", {"idle", "rest", "pickup", "throughput"}),
                ("cc", COMPILED_ROWS),
            )
            if rows & set(self.rows)
        ]
        self.results.peers = ensure_peers(wanted)
        for tool in self.spools.values():
            tool.daemon.start()
        if cc := self.results.peers.get("cc"):
            try:
                compiled = make_compiled_floor(self.base, self.workers, cc)
            except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
                self.results.errors.append(f"the compiled floor: {exc}")
                say(self.results.errors[-1])
            else:
                if self._started(compiled.daemon):
                    self.compiled = compiled
        peers = self.base / "peers"
        if binary := self.results.peers.get("incron"):
            if self.syslog.start():
                say("no syslog daemon at /dev/log: a sink stands in for one while incrond runs")
                self.results.peers["syslog"] = f"{self.syslog.path} (this run's sink)"
            else:
                self.results.peers["syslog"] = f"{self.syslog.path} (the machine's)"
            home = peers / "incron"
            true_tree, pick_tree = incron_tree(home / "true"), incron_tree(home / "pick")
            marks = self.base / "marks-incron"  # where bench_spool.pickup looks for tool "incron"
            marks.mkdir()
            self.incron = Incron(binary, home / "daemon", true_tree, pick_tree, marks)
            if self._started(self.incron):
                aside = home / "aside"
                self.incron_true = Tool("incron", true_tree, self.incron, aside)
                self.incron_pick = Tool("incron", pick_tree, self.incron, aside)
            else:
                self.incron = None
        if binary := self.results.peers.get("tsp"):
            (peers / "tsp").mkdir()
            self.tsp = TaskSpooler(binary, peers / "tsp")
            if not self._started(self.tsp):
                self.tsp = None
        self.nq = self.results.peers.get("nq")
        warm = [*self.spools.values(), *present(self.compiled, self.incron_true)]
        for tool in warm:  # lazily loaded code and first-time costs, not counted
            ids = [f"warm-{tool.name}-{i:04d}" for i in range(self.sizes.warmup)]
            spool_throughput(tool, ids, self.base)

    def _started(self, peer: Daemon) -> bool:
        """Start a peer; one that will not start is stopped, said, and its column left empty."""
        try:
            peer.start()
        except Exception as exc:
            self.results.errors.append(f"{peer.name} did not start: {exc!r}")
            say(self.results.errors[-1])
            peer.stop()
            return False
        return True

    def tear_down(self) -> None:
        """Every daemon stopped, whatever happened (each on its own: one failing stops no other)."""
        for daemon in self.daemons().values():
            try:
                code = daemon.stop()
                if code not in (0, None):
                    say(f"{daemon.name} exited with {code}; its log:\n{daemon.log_tail(10)}")
            except Exception as exc:  # the others must still be stopped
                say(f"{daemon.name}: stopping it failed: {exc!r}")
        self.syslog.stop()

    def attempt(
        self, row: str, tool: str, round_: int, measure: Callable[[], dict[str, Any]]
    ) -> None:
        """Measure one tool's cell of one round; a failure is recorded, and the run goes on."""
        try:
            self.results.put(row, tool, round_, measure())
        except Exception as exc:
            self._failed(row, tool, round_, exc)

    def _failed(self, row: str, tool: str, round_: int, exc: Exception) -> None:
        """A cell (or what comes before it) failed: said, recorded, and the run goes on."""
        message = f"round {round_ + 1}, {row}, {tool}: {exc!r}"
        say(message)
        self.results.errors.append(message)

    def run(self) -> Results:
        self.results.load_average["start"] = load_average()
        for round_ in range(self.sizes.rounds):
            for row in self.rows:
                say(f"round {round_ + 1}/{self.sizes.rounds}: {row}")
                getattr(self, f"row_{row}")(round_)
        self.results.load_average["end"] = load_average()
        return self.results

    def row_idle(self, round_: int) -> None:
        """Every daemon alone for ``idle`` seconds, the spools from the same state each round
        whatever row ran before: a few jobs just run (spoold's worker processes and launcher
        are up then; they leave after ``worker_idle_exit``, which the rest row waits for)."""
        for name, tool in self.spools.items():
            try:
                awake(tool, f"idle{round_}-{name}", self.base)
            except Exception as exc:
                self._failed("idle", name, round_, exc)
        os.sync()
        daemons = self.daemons()
        before = {name: QuietCpu(daemon) for name, daemon in daemons.items()}
        started = time.monotonic()
        time.sleep(self.sizes.idle)
        self._measure_quiet("idle", round_, daemons, before, time.monotonic() - started)

    def row_rest(self, round_: int) -> None:
        """The idle row once spoold's worker processes and launcher have left
        (``worker_idle_exit``): its main process alone."""
        os.sync()
        daemons = self.daemons()
        before = {name: QuietCpu(daemon) for name, daemon in daemons.items()}
        started = time.monotonic()
        if (spoold := daemons.get("spoold")) is not None:
            while len(family(spoold)) > 1 and time.monotonic() - started < REST_BOUND:
                time.sleep(0.5)
            say(f"  spoold alone after {time.monotonic() - started:.1f} s")
        self._measure_quiet("rest", round_, daemons, before, time.monotonic() - started)
        for name, tool in self.spools.items():  # what the quiet costs the next job

            def woken(tool: Tool = tool, job_id: str = f"rest{round_}-{name}") -> dict[str, Any]:
                return {"pickup_ms": pickup(tool, [job_id], self.sizes.spacing, self.base)[0]}

            self.attempt("woken", name, round_, woken)

    def _measure_quiet(
        self,
        row: str,
        round_: int,
        daemons: dict[str, Daemon],
        before: dict[str, QuietCpu],
        elapsed: float,
    ) -> None:
        for name, daemon in daemons.items():

            def measure(name: str = name, daemon: Daemon = daemon) -> dict[str, Any]:
                rss, pss = memory_mb(daemon)
                pids = family(daemon)
                used, counted = before[name].seconds()
                return {
                    "cpu_percent": 100 * used / elapsed,
                    "cpu_by": counted,
                    "rss_mb": rss,
                    "pss_mb": pss,
                    "processes": len(pids),
                    "threads": sum(proc_status(pid, "Threads") for pid in pids),
                }

            self.attempt(row, name, round_, measure)

    def row_pickup(self, round_: int) -> None:
        tools = [*self.spools.values(), *present(self.compiled, self.incron_pick)]
        latencies: dict[str, list[float]] = {tool.name: [] for tool in tools}
        for block, first in enumerate(range(0, self.sizes.drops, PICKUP_BLOCK)):
            numbers = range(first, min(first + PICKUP_BLOCK, self.sizes.drops))
            for tool in rotated(tools, round_ + block):
                ids = [f"pick{round_}-{tool.name}-{i:05d}" for i in numbers]
                try:
                    latencies[tool.name] += pickup(tool, ids, self.sizes.spacing, self.base)
                except Exception as exc:
                    self._failed("pickup", tool.name, round_, exc)
        for name, values in latencies.items():
            self.results.put(
                "pickup",
                name,
                round_,
                {
                    "samples_ms": values,
                    "p50_ms": percentile(values, 50),
                    "p99_ms": percentile(values, 99),
                    "late": self.sizes.drops - len(values),
                },
            )

    def row_throughput(self, round_: int) -> None:
        jobs, base = self.sizes.jobs, self.base
        bound = max(120.0, jobs / 5)
        cells: dict[str, Callable[[], dict[str, Any]]] = {}
        tools = [*self.spools.values(), *present(self.compiled, self.incron_true)]
        for tool in tools:
            ids = [f"t{round_}-{tool.name}-{i:05d}" for i in range(jobs)]
            cells[tool.name] = partial(spool_throughput, tool, ids, base)
        if self.tsp is not None:
            cells["tsp"] = partial(self.tsp.throughput, jobs, bound)
        if self.nq is not None:
            cells["nq"] = partial(nq_throughput, self.nq, base / "peers" / "nq", jobs, bound)
        cells["loop"] = partial(loop_throughput, jobs, bound)
        for name in rotated(list(cells), round_):
            say(f"  {name}: {jobs} jobs")
            self.attempt("throughput", name, round_, cells[name])

    def row_flood(self, round_: int) -> None:
        tools = {tool.name: tool for tool in [*self.spools.values(), *present(self.compiled)]}
        for name in rotated(list(tools), round_):
            tool = tools[name]
            ids = [f"f{round_}-{name}-{i:05d}" for i in range(self.sizes.flood)]
            say(f"  {name}: {len(ids)} files")
            self.attempt("flood", name, round_, partial(flood, tool, ids, self.base))

    def _log_row(self, row: str, line_bytes: int, round_: int) -> None:
        commands = log_command(line_bytes, self.sizes.log_bytes)
        cells: dict[str, Callable[[], dict[str, Any]]] = {
            name: partial(log_job, tool, f"{row}-{round_}-{name}", self.base, commands)
            for name, tool in self.spools.items()
        }
        cells["file"] = partial(to_file, self.base, commands)
        for name in rotated(list(cells), round_):
            os.sync()  # the last one's writes and frees settled before this one starts
            say(f"  {name}: {self.sizes.log_bytes / 1e6:.0f} MB in {line_bytes}-byte lines")
            self.attempt(row, name, round_, cells[name])

    def row_log100(self, round_: int) -> None:
        self._log_row("log100", 100, round_)

    def row_log2(self, round_: int) -> None:
        self._log_row("log2", 2, round_)

    def row_schedules(self, round_: int) -> None:
        counts = [("schedules", self.sizes.schedules)]
        if self.large:
            counts.append(("schedules-large", self.sizes.schedules_large))
        for row, count in counts:
            say(f"  {count} schedules")
            measure = partial(
                schedules, self.base, count, self.sizes, self.workers, f"{row}-{round_}"
            )
            self.attempt(row, "spoold", round_, measure)


# -- the table ----------------------------------------------------------------------------------


def fmt(value: float, digits: int = 0, unit: str = "") -> str:
    return "—" if value is None or math.isnan(value) else f"{value:,.{digits}f}{unit}"


Check = Callable[["Results"], "bool | None"]


def met(check: Check | None, results: Results) -> str:
    """Whether the target is met: yes, no, ? (not measured), — (no target); by the medians,
    and "at the limit" when the rounds, each taken alone, do not all agree with them (a
    verdict that turns on the hour is not a verdict)."""
    if check is None:
        return "—"
    ok = check(results)
    if ok is None:
        return "?"
    verdict = "yes" if ok else "no"
    rounds = [check(results.of_round(k)) for k in results.rounds()]
    known = [v for v in rounds if v is not None]
    if len(known) < 2 or all(v == ok for v in known):
        return verdict
    return f"{verdict}, at the limit: met in {sum(known)} of {len(known)} rounds"


def at_most(row: str, key: str, limit: float) -> Check:
    """spoold's median of ``key`` in ``row`` is at most ``limit``."""

    def check(x: Results) -> bool | None:
        value = x.median(row, "spoold", key)
        return None if math.isnan(value) else value <= limit

    return check


def both(first: Check, second: Check) -> Check:
    def check(x: Results) -> bool | None:
        a, b = first(x), second(x)
        return None if a is None or b is None else a and b

    return check


def ratio_at_most(row: str, other: str, key: str, limit: float) -> Check:
    """spoold's ratio of ``key`` to ``other``'s in ``row`` (within a round) is at most ``limit``."""

    def check(x: Results) -> bool | None:
        value = x.ratio(row, "spoold", other, key)
        return None if math.isnan(value) else value <= limit

    return check


def times(value: float, what: str) -> str:
    """``value`` as a ratio to ``what``; empty when it could not be taken."""
    return "" if math.isnan(value) else f"{value:.2f}x {what}"


def all_known(*values: float) -> bool:
    return all(not math.isnan(v) for v in values)


PEER_NAMES = {
    "cfloor": "compiled floor",
    "tsp": "tsp",
    "nq": "nq x2",
    "incron": "incron",
    "loop": "loop",
    "file": "`> file` + fsync",
}


def table(results: Results) -> str:
    """The issue's table: spoold, the durable floor, the peers, ratios within a round, targets."""
    s, r = results.sizes, results
    lines = [
        "| what | spoold | durable floor | peers | ratios (same round, median) | target | met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]

    def add(
        what: str, spoold: str, floor: str, peers: str, ratios: str, target: str,
        check: Check | None,
    ) -> None:  # fmt: skip
        lines.append(
            f"| {what} | {spoold} | {floor} | {peers or '—'} | {ratios or '—'} | {target} "
            f"| {met(check, r)} |"
        )

    def peers_of(
        row: str, key: str, names: tuple[str, ...], digits: int = 0, unit: str = ""
    ) -> str:
        return ", ".join(
            f"{PEER_NAMES[n]} {fmt(r.median(row, n, key), digits, unit)}"
            for n in names
            if n in r.rows.get(row, {})
        )

    if "throughput" in r.rows:
        key = "jobs_per_s"
        vs = {
            n: r.ratio("throughput", "spoold", n, key)
            for n in ("floor", "cfloor", "tsp", "nq", "incron", "loop")
        }
        # Whether SPEC section 1's work, with no interpreter at all, meets the target here.
        compiled_ratios = ", ".join(
            text
            for text in (
                times(r.ratio("throughput", "cfloor", "floor", key), "floor"),
                times(r.ratio("throughput", "cfloor", "tsp", key), "tsp"),
            )
            if text
        )

        def ahead(x: Results) -> bool | None:
            floor = x.ratio("throughput", "spoold", "floor", "jobs_per_s")
            tsp = x.ratio("throughput", "spoold", "tsp", "jobs_per_s")
            return None if not all_known(floor, tsp) else floor >= 1.5 and tsp >= 1.0

        add(
            f"{s.jobs} `/bin/true` jobs, 2 at a time (jobs/s)",
            fmt(r.median("throughput", "spoold", key)),
            fmt(r.median("throughput", "floor", key)),
            peers_of("throughput", key, ("cfloor", "tsp", "nq", "incron", "loop")),
            ", ".join(times(v, PEER_NAMES.get(n, n)) for n, v in vs.items() if not math.isnan(v))
            + (f"; the compiled floor {compiled_ratios}" if compiled_ratios else ""),
            ">= 1.5x the durable floor and >= tsp, same run",
            ahead,
        )
        key = "cpu_ms_per_job"
        mine = r.median("throughput", "spoold", key)
        roles = ", ".join(
            f"{what} {fmt(r.median('throughput', 'spoold', f'cpu_ms_{role}'), 2)}"
            for role, what in ROLE_NAMES.items()
        )

        def in_kernel(tool: str) -> str:
            return f"{fmt(r.median('throughput', tool, 'cpu_ms_kernel'), 2)} of it in the kernel"

        cpu_peers = [peers_of("throughput", key, ("tsp", "incron", "loop"), 2)]
        if "cfloor" in r.rows["throughput"]:
            compiled = r.median("throughput", "cfloor", key)
            cpu_peers.insert(0, f"compiled floor {fmt(compiled, 2)} ({in_kernel('cfloor')})")

        add(
            "daemon CPU per job (all its processes, jobs excluded; ms)",
            f"{fmt(mine, 2)} ({roles}; {in_kernel('spoold')}; "
            f"{fmt(r.median('throughput', 'spoold', 'busy_cores'), 2)} "
            f"of the machine's {os.cpu_count()} cores busy)",
            f"{fmt(r.median('throughput', 'floor', key), 2)} ({in_kernel('floor')}; "
            f"{fmt(r.median('throughput', 'floor', 'busy_cores'), 2)} cores busy)",
            ", ".join(p for p in cpu_peers if p).replace("tsp", "tsp server"),
            times(r.ratio("throughput", "spoold", "floor", key), "floor"),
            "<= 1.5 ms",
            at_most("throughput", "cpu_ms_per_job", 1.5),
        )
    for row, what in (
        ("idle", f"idle ({s.idle:.0f} s alone), all processes: RSS / PSS"),
        ("rest", "at rest (worker processes and launcher gone): RSS / PSS"),
    ):
        if row not in r.rows:
            continue

        def memory(tool: str, row: str = row) -> str:
            if tool not in r.rows[row]:
                return "—"
            return (
                f"{fmt(r.median(row, tool, 'rss_mb'))} / {fmt(r.median(row, tool, 'pss_mb'))} MiB "
                f"({fmt(r.median(row, tool, 'processes'))} processes, "
                f"{fmt(r.median(row, tool, 'threads'))} threads)"
            )

        add(
            what,
            memory("spoold"),
            memory("floor"),
            ", ".join(f"{n} {memory(n)}" for n in ("tsp", "incron") if n in r.rows[row]),
            f"RSS {times(r.ratio(row, 'spoold', 'floor', 'rss_mb'), 'floor')}, "
            f"PSS {times(r.ratio(row, 'spoold', 'floor', 'pss_mb'), 'floor')}",
            "<= 60 / 40 MiB",
            both(at_most(row, "rss_mb", 60), at_most(row, "pss_mb", 40)),
        )
    if "woken" in r.rows:
        add(
            "pickup of the first job at rest (ms)",
            fmt(r.median("woken", "spoold", "pickup_ms"), 1),
            fmt(r.median("woken", "floor", "pickup_ms"), 1),
            "",
            times(r.ratio("woken", "spoold", "floor", "pickup_ms"), "floor"),
            "—",
            None,
        )
    if "idle" in r.rows:
        key = "cpu_percent"
        add(
            f"idle CPU ({s.idle:.0f} s alone; % of a core)",
            fmt(r.median("idle", "spoold", key), 3),
            fmt(r.median("idle", "floor", key), 3),
            peers_of("idle", key, ("tsp", "incron"), 3),
            "",
            "—",
            None,
        )
    if "flood" in r.rows:

        def flooded(tool: str) -> str:
            if tool not in r.rows["flood"]:
                return "—"
            return (
                f"{fmt(r.median('flood', tool, 'accepted_per_s'))} files/s "
                f"(all in pending/ after {fmt(r.median('flood', tool, 'accepted_s'), 1)} s, out of "
                f"incoming/ after {fmt(r.median('flood', tool, 'left_incoming_s'), 1)} s, all done after "
                f"{fmt(r.median('flood', tool, 'finished_s'), 1)} s) / peak RSS "
                f"{fmt(r.median('flood', tool, 'peak_rss_mb'))} MiB "
                f"(before {fmt(r.median('flood', tool, 'rss_before_mb'))}), PSS "
                f"{fmt(r.median('flood', tool, 'peak_pss_mb'))} MiB "
                f"(before {fmt(r.median('flood', tool, 'pss_before_mb'))})"
            )

        growth = r.median("flood", "spoold", "peak_rss_mb") / r.median(
            "flood", "spoold", "rss_before_mb"
        )

        def flood_ok(x: Results) -> bool | None:
            rate = x.median("flood", "spoold", "accepted_per_s")
            peak = x.median("flood", "spoold", "peak_rss_mb")
            grew = peak / x.median("flood", "spoold", "rss_before_mb")
            return None if not all_known(rate, grew) else rate >= 2000 and grew <= 1.3

        growth_pss = r.median("flood", "spoold", "peak_pss_mb") / r.median(
            "flood", "spoold", "pss_before_mb"
        )
        add(
            f"{s.flood:,} files renamed in at once: accepted / peak RSS",
            flooded("spoold"),
            flooded("floor"),
            f"compiled floor {flooded('cfloor')}" if "cfloor" in r.rows["flood"] else "",
            f"accepted/s {times(r.ratio('flood', 'spoold', 'floor', 'accepted_per_s'), 'floor')}; "
            f"spoold's peak {times(growth, 'its RSS before')} "
            f"(PSS {times(growth_pss, 'its PSS before')})",
            "accepted >= 2000 files/s; peak <= 1.3x idle",
            flood_ok,
        )
    for row, lines_of, limit in (("log100", "100-byte lines", 2.0), ("log2", "2-byte lines", 5.0)):
        if row not in r.rows:
            continue

        def logged(tool: str, row: str = row) -> str:
            if tool not in r.rows[row]:
                return "—"
            return (
                f"{fmt(r.median(row, tool, 'wall_s'), 2)} s, {fmt(r.median(row, tool, 'cpu_s'), 2)} s "
                f"daemon CPU, log {fmt(r.median(row, tool, 'log_bytes') / 1e6)} MB"
            )

        to_disk = r.ratio(row, "spoold", "file", "wall_s")
        add(
            f"one job writing {s.log_bytes / 1e6:.0f} MB in {lines_of}",
            logged("spoold"),
            logged("floor"),
            f"{PEER_NAMES['file']} {fmt(r.median(row, 'file', 'wall_s'), 2)} s",
            f"{times(to_disk, '`> file`')}, {times(r.ratio(row, 'spoold', 'floor', 'wall_s'), 'floor')}",
            f"<= {limit:.0f}x `> file`",
            ratio_at_most(row, "file", "wall_s", limit),
        )
    for row, count in (("schedules", s.schedules), ("schedules-large", s.schedules_large)):
        if row not in r.rows:
            continue
        wall, cpu = r.median(row, "spoold", "wall_s"), r.median(row, "spoold", "cpu_s")
        idle = r.median(row, "spoold", "idle_cpu_percent")
        known = {m.get("known_by") for m in r.rows[row].get("spoold", {}).values()}
        cell = (
            f"{fmt(wall, 2)} s, {fmt(cpu, 2)} s CPU; then idle {fmt(idle, 3)}% of a core, "
            f"RSS {fmt(r.median(row, 'spoold', 'rss_mb'))} MiB"
            + ("" if known <= {"status"} else " (quiet)")
        )
        if row == "schedules":
            target, check = "<= 1 s CPU", at_most(row, "cpu_s", 1.0)
        else:
            target = "<= 10 s; idle CPU <= 0.1% of a core"
            check = both(at_most(row, "wall_s", 10), at_most(row, "idle_cpu_percent", 0.1))
        add(f"{count:,} schedules `{{every: 60s}}` registered", cell, "—", "", "", target, check)
    if "pickup" in r.rows:

        def picked(tool: str, x: Results = r) -> tuple[float, float]:
            values = x.samples("pickup", tool, "samples_ms")
            return percentile(values, 50), percentile(values, 99)

        def quick(x: Results) -> bool | None:
            (p50, p99), (i50, _) = picked("spoold", x), picked("incron", x)
            return None if not all_known(p50, p99, i50) else p50 <= i50 and p99 <= 10

        (p50, p99), (f50, f99), (i50, i99) = picked("spoold"), picked("floor"), picked("incron")
        c50, c99 = picked("cfloor")
        add(
            "pickup p50 / p99 (rename into incoming/ -> job process started; ms)",
            f"{fmt(p50, 1)} / {fmt(p99, 1)}",
            f"{fmt(f50, 1)} / {fmt(f99, 1)}",
            f"incron {fmt(i50, 1)} / {fmt(i99, 1)}"
            + (f", compiled floor {fmt(c50, 1)} / {fmt(c99, 1)}" if all_known(c50) else ""),
            f"p50 {times(r.ratio('pickup', 'spoold', 'incron', 'p50_ms'), 'incron')}, "
            f"{times(r.ratio('pickup', 'spoold', 'floor', 'p50_ms'), 'floor')}",
            "p50 <= incron's, p99 <= 10 ms, same run",
            quick,
        )
    return "\n".join(lines)


def summary(results: Results) -> dict[str, Any]:
    """Everything measured, per row, tool and round, with the medians the table shows."""
    medians: dict[str, dict[str, dict[str, float]]] = {}
    for row, tools in results.rows.items():
        for tool, rounds in tools.items():
            keys = {k for m in rounds.values() for k, v in m.items() if isinstance(v, (int, float))}
            medians.setdefault(row, {})[tool] = {
                k: results.median(row, tool, k) for k in sorted(keys)
            }
    return {
        "sizes": dataclasses.asdict(results.sizes),
        "peers": results.peers,
        "medians": medians,
        "rounds": results.rows,
        "errors": results.errors,
        "load_average": results.load_average,
    }


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM ends the run as Ctrl-C does: through every ``finally`` (daemons, directories)."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="everything smaller (~1-2 min)")
    parser.add_argument("--rounds", type=int, help="rounds (default 3, --quick 1)")
    parser.add_argument("--json", type=Path, help="also write every number to this file")
    parser.add_argument("--only", help=f"comma-separated rows, of: {','.join(ROWS)}")
    parser.add_argument(
        "--schedules-large",
        action="store_true",
        help="the schedules row also with 10,000 (--quick: 1000)",
    )
    parser.add_argument("--dir", type=Path, help="where the temporary spools go")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    if args.rounds:
        sizes = dataclasses.replace(sizes, rounds=args.rounds)
    rows = [row.strip() for row in args.only.split(",")] if args.only else list(ROWS)
    if unknown := [row for row in rows if row not in ROWS]:
        parser.error(f"unknown row(s) {unknown}; the rows: {','.join(ROWS)}")
    rows = [row for row in ROWS if row in rows]  # the run's own order
    began = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="bench-compare-", dir=args.dir))
    base.chmod(0o711)  # spoold's job user passes through to the pickup marks
    bench = Bench(base, sizes, rows, args.workers, args.schedules_large)
    try:
        with interruptible():
            try:
                spread_subdirectories(base)
                bench.set_up()
                results = bench.run()
            finally:
                bench.tear_down()
                say(f"removing {base}")
                shutil.rmtree(base, ignore_errors=True)
    except KeyboardInterrupt:
        say("interrupted: daemons stopped, directories removed")
        return 130
    data = summary(results)
    data["run_seconds"] = round(time.monotonic() - began, 1)
    print(table(results))
    print()
    print(f"sizes: {data['sizes']}")
    print(f"load average (1, 5, 15 min): {data['load_average']}; run: {data['run_seconds']:.0f} s")
    for error in results.errors:
        print(f"error: {error}")
    if args.json:
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 1 if results.errors else 0


if __name__ == "__main__":
    sys.exit(main())
