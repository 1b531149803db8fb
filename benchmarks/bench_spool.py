"""spoold against the floor (benchmarks/floor.py), side by side in one run.

1. pickup latency: rename into incoming/ -> the job's shell has started (the job writes
   $EPOCHREALTIME into a file named after $JOB_ID);
2. throughput: N `true` jobs, 2 workers, first rename into incoming/ -> last job in done/;
3. the same with 100,000 entries already in done/ (one filler tree, swapped in for each tool);
4. idle: RSS and CPU of each daemon left alone for a while.

Other work shares the machine, so the tools take turns: pickup drops alternate in blocks of 25,
throughput runs alternate (medians of ``rounds``), and ratios are taken within a round, where
both tools met the same machine. Daemon CPU per job is reported too: it is far less noisy.
Every wait is bounded; every daemon is stopped and every temporary directory removed on the way
out.

Usage: .venv/bin/python benchmarks/bench_spool.py [--quick] [--json FILE] [--dir DIR]
       [--against PYTHON]   (another spoold in the floor's place: old against new; run it
       from outside the checkout, whose spoold/ would shadow the other one's in its processes)
"""

from __future__ import annotations

import argparse
import array
import contextlib
import ctypes
import fcntl
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from watchdog.observers.inotify_c import InotifyConstants, InotifyFD

HERE = Path(__file__).resolve().parent
TOOLS = ("spoold", "floor")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
START_BOUND = 60.0  # seconds a daemon may take to say READY=1
STOP_BOUND = 60.0
PICKUP_BLOCK = 25  # pickup drops alternate between the tools in blocks of this many
FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_TOPDIR_FL = 0x80086601, 0x40086602, 0x00020000


@dataclass(frozen=True)
class Sizes:
    drops: int  # pickup: jobs dropped one by one
    spacing: float  # pickup: seconds between drops
    jobs: int  # throughput: jobs dropped at once
    filler: int  # entries in done/ for the second throughput run
    idle: float  # seconds the daemons are left idle
    rounds: int  # throughput runs per tool and case (medians)


FULL = Sizes(drops=200, spacing=0.020, jobs=1000, filler=100_000, idle=10.0, rounds=3)
QUICK = Sizes(drops=50, spacing=0.020, jobs=200, filler=10_000, idle=3.0, rounds=1)


def spread_subdirectories(path: Path) -> bool:
    """``chattr +T path``: ext4 puts each subdirectory of ``path`` in its own block group.

    Keeps the tools apart on this machine's ext4, which has no journal: there every inode
    allocation skips the inodes freed in its block group in the last minutes
    (``recently_deleted()``), so one tool's deleted files would slow the other's creates.
    """
    flags = array.array("l", [0])
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags, True)
            flags[0] |= FS_TOPDIR_FL
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, flags)
        finally:
            os.close(fd)
    except OSError:
        return False  # not ext2/3/4: nothing to spread
    return True


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def say(message: str) -> None:
    """Progress, on standard error: standard output carries only the results."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# -- the daemons ------------------------------------------------------------------------------


def service_environment() -> dict[str, str]:
    """The few variables systemd gives a service, not the environment of whoever runs this.

    Every job's environment is the daemon's plus its own variables, built per job: the
    daemons are measured with what they would have in production.
    """
    keep = ("PATH", "LANG", "PYTHONPATH")
    return {key: os.environ[key] for key in keep if key in os.environ} | {"PYTHONUNBUFFERED": "1"}


class CpuTally:
    """utime + stime of a set of processes that changes, which never goes back: a process
    that ended keeps the CPU it was last seen with (spoold lets an idle job supervisor go, and
    its CPU would otherwise leave the sum, which then fell: -1.1 % idle CPU was seen)."""

    def __init__(self) -> None:
        # (pid, start time): (its name as ps shows it, clock ticks, of which in the kernel)
        self._seen: dict[tuple[int, str], tuple[str, int, int]] = {}

    def seconds(self, pids: Iterable[int]) -> float:
        return sum(self.by_name(pids).values())

    def by_name(self, pids: Iterable[int]) -> dict[str, float]:
        """The same, summed per process name (``comm``): spoold names its processes by role."""
        return {name: total for name, (total, _) in self.split_by_name(pids).items()}

    def split_by_name(self, pids: Iterable[int]) -> dict[str, tuple[float, float]]:
        """Per process name: seconds in all, and of them in the kernel (stime): the part no
        interpreter, however fast, takes off a job."""
        for pid in pids:
            with contextlib.suppress(OSError, ValueError):
                text = Path(f"/proc/{pid}/stat").read_text()
                name = text[text.index("(") + 1 : text.rindex(")")]
                fields = text.rsplit(")", 1)[1].split()
                kernel = int(fields[12])
                self._seen[pid, fields[19]] = (name, int(fields[11]) + kernel, kernel)
        found: dict[str, tuple[float, float]] = {}
        for name, ticks, kernel in self._seen.values():
            total, in_kernel = found.get(name, (0.0, 0.0))
            found[name] = (total + ticks / CLOCK_TICKS, in_kernel + kernel / CLOCK_TICKS)
        return found


class Daemon:
    """A spool daemon in a subprocess, started and stopped the way systemd would."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.own_cpu = CpuTally()  # its session's processes
        self.family_cpu = CpuTally()  # with its job supervisors (bench_compare)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, bound: float = START_BOUND) -> None:
        """Start, and return once the daemon has sent READY=1 to its NOTIFY_SOCKET."""
        notify_dir = tempfile.mkdtemp(prefix="bench-notify-")
        address = os.path.join(notify_dir, "notify")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.bind(address)
                sock.settimeout(0.5)
                env = {**service_environment(), "NOTIFY_SOCKET": address}
                with open(self.log_path, "ab") as log:
                    self.process = subprocess.Popen(
                        self.argv,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=log,
                        start_new_session=True,
                    )
                end = time.monotonic() + bound
                while time.monotonic() < end and self.process.poll() is None:
                    with contextlib.suppress(TimeoutError):
                        if b"READY=1" in sock.recv(4096):
                            return
            raise RuntimeError(f"{self.name} did not become ready; its log:\n{self.log_tail()}")
        finally:
            shutil.rmtree(notify_dir, ignore_errors=True)

    def stop(self, bound: float = STOP_BOUND) -> int | None:
        """SIGTERM, then SIGKILL if it has not ended within ``bound`` seconds."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(bound)
            except subprocess.TimeoutExpired:
                say(f"{self.name} ignored SIGTERM for {bound:.0f}s: SIGKILL")
                self.process.kill()
                self.process.wait(bound)
        return self.process.returncode

    def own_pids(self) -> list[int]:
        """The daemon and its helper processes: its session (jobs start sessions of their own)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # ended meanwhile
            if int(fields[3]) == self.pid:  # field 6 of stat: the session id
                pids.append(int(entry.name))
        return pids

    def cpu_seconds(self) -> float:
        """utime + stime of the daemon's processes (all their threads, not the jobs)."""
        return self.own_cpu.seconds(self.own_pids())

    def wait_quiet(self, bound: float = 10.0, step: float = 0.2) -> None:
        """Return once the daemon's processes used less than a clock tick of CPU over
        ``step`` seconds (or after ``bound``): READY comes before its worker processes and
        launchers have finished importing, and a measurement started at READY would count
        their start as the work measured."""
        end = time.monotonic() + bound
        before = self.cpu_seconds()
        while time.monotonic() < end:
            time.sleep(step)
            now = self.cpu_seconds()
            if now - before < 1.0 / CLOCK_TICKS:
                return
            before = now

    def memory_mb(self) -> tuple[float, float]:
        """RSS and PSS summed over the daemon's processes (PSS counts shared pages once)."""
        return memory_of(self.own_pids())

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


#: kcmp(2)'s number where this runs (its numbers differ by architecture); KCMP_VM asks whether
#: two processes share one address space.
_KCMP = {"x86_64": 312, "aarch64": 272}.get(os.uname().machine)
_KCMP_VM = 1
_LIBC = ctypes.CDLL(None, use_errno=True)


def one_per_address_space(pids: Iterable[int]) -> list[int]:
    """``pids`` less each that shares its address space with one before it.

    A child started by vfork, as subprocess starts a program, runs in its parent's memory
    until it execs: its RSS and PSS are its parent's, and summing both counts that memory
    twice (a sample taken while a spool starts a job would show one more interpreter).
    """
    kept: list[int] = []
    for pid in pids:
        if _KCMP is None or not any(
            _LIBC.syscall(_KCMP, pid, other, _KCMP_VM, 0, 0) == 0 for other in kept
        ):
            kept.append(pid)
    return kept


def memory_of(pids: Iterable[int], exe: str | None = None) -> tuple[float, float]:
    """RSS and PSS in MiB summed over ``pids``, each address space once (PSS counts shared
    pages once); with ``exe``, only those still running that program once read."""
    rss = pss = 0
    for pid in one_per_address_space(pids):
        with contextlib.suppress(OSError):
            lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
            if exe is not None and not runs(pid, exe):
                continue
            for line in lines:
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
    return rss / 1024, pss / 1024


def runs(pid: int, exe: str) -> bool:
    """Whether ``pid`` runs ``exe`` now. Asked *after* reading a process's memory: a daemon's
    child listed as its own program may have exec'd a job since (a daemon starts each job
    by vfork and exec), and the memory read was then the job's. An exec is one way."""
    try:
        return os.readlink(f"/proc/{pid}/exe") == exe
    except OSError:
        return False


@dataclass
class Tool:
    """One of the compared spools: its tree, its daemon, where its done/ is parked."""

    name: str
    spool: Path
    daemon: Daemon
    aside: Path  # the empty done/ while the filler stands in for it

    @property
    def incoming(self) -> Path:
        return self.spool / "incoming"


#: What tells two interpreters apart: the version line (release, build, compiler) and the
#: interpreter a venv stands on.
_INTERPRETER = (
    "import os, sys; print(sys.version.replace(chr(10), ' ')); "
    "print(os.path.realpath(getattr(sys, '_base_executable', sys.executable)))"
)


def same_interpreter(python: str, against: str) -> None:
    """Exit with the reason unless ``against`` is a venv of the interpreter ``python`` is.

    Old against new must differ only by spoold: another build of Python differs by more than
    a round of work (pyenv's 3.11.7, a shared libpython without PGO, against Debian's 3.11.2:
    ~3 MiB more in each process, and slower), and so did comparisons made that way."""
    ours, theirs = (
        subprocess.run([py, "-c", _INTERPRETER], check=True, capture_output=True, text=True).stdout
        for py in (python, against)
    )  # fmt: skip
    if ours != theirs:
        raise SystemExit(
            f"--against {against} runs another interpreter than {python}:\n"
            f"  {theirs.strip()!r}\n  against {ours.strip()!r}\n"
            "make its venv from the same Python (e.g. `make setup` in a git worktree of the "
            "older commit)"
        )


def make_tool(name: str, base: Path, workers: int, against: str | None = None) -> Tool:
    """The daemon of one column: spoold, and the floor or (``against``) another spoold."""
    if name == "spoold" or against:
        python = against if name == "floor" and against else sys.executable
        return spoold_tool(name, base, spoold_cli(python), f"workers: {workers}\n")
    home = base / name
    home.mkdir()
    spool = home / "spool"
    for directory in ("incoming", "running", "done", "failed"):
        (spool / directory).mkdir(parents=True)
    argv = [sys.executable, str(HERE / "floor.py"), str(spool), "--workers", str(workers)]
    return Tool(name, spool, Daemon(name, argv, home / "daemon.log"), home / "done.aside")


def spoold_cli(python: str = sys.executable) -> list[str]:
    """The ``spoold`` command of ``python``'s venv, or ``python -m spoold`` where it has none."""
    spoold = Path(python).with_name("spoold")
    return [str(spoold)] if spoold.exists() else [python, "-m", "spoold"]


def spoold_tool(name: str, base: Path, cli: list[str], settings: str) -> Tool:
    """A spoold daemon run by ``cli`` (its command, up to the subcommand) on a spool of its
    own, with ``settings`` (YAML lines) in its config beside the benchmarks' quiet ones."""
    home = base / name
    home.mkdir()
    spool = home / "spool"
    subprocess.run([*cli, "init", "--spool", str(spool)], check=True, capture_output=True)
    config = home / "config.yaml"
    config.write_text(f"{settings}rescan_interval: 30s\nlog_level: warning\n")
    argv = [*cli, "run", "--spool", str(spool), "--config", str(config)]
    return Tool(name, spool, Daemon(name, argv, home / "daemon.log"), home / "done.aside")


# -- jobs -------------------------------------------------------------------------------------


def stage_jobs(stage: Path, ids: list[str], commands: str, shell: str | None = None) -> list[str]:
    """Write one job file per id into ``stage``; return the file names."""
    product: dict[str, str] = {"commands": commands}
    if shell is not None:
        product["shell"] = shell
    flow = json.dumps(product)  # a JSON object is a YAML flow mapping
    names = []
    for job_id in ids:
        name = f"{job_id}.yaml"
        (stage / name).write_text(f"job_id: {job_id}\nexecutor: local\nproduct: {flow}\n")
        names.append(name)
    return names


def archive_jobs(tool: Tool, ids: list[str], archive: Path) -> None:
    """Move a run's jobs out of done/ and failed/, so that the next run starts alike.

    Renamed, not deleted: on ext4 without a journal (this machine's), every inode allocation
    skips the inodes freed in the last minutes (``recently_deleted()``), so deleting thousands
    of files here would slow every create of the following runs. Deleted at the very end.
    """
    for job_id in ids:
        for directory in ("done", "failed"):
            with contextlib.suppress(FileNotFoundError):
                os.rename(tool.spool / directory / job_id, archive / f"{tool.name}-{job_id}")


class InotifyWatch:
    """Watches on a spool's directories (an InotifyFD and its WatchCallback), for waiting on
    what a tool does; lost events (an overflow) are flagged for the waiter to look instead."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._all_in = threading.Event()
        self._overflowed = False
        self._inotify: Any = InotifyFD()

    def __enter__(self) -> Self:
        self._inotify.start()
        self.add_watches()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._inotify.stop()
        self._inotify.join(5)

    def add_watches(self) -> None:
        """Watch what the subclass waits on (``watch``)."""

    def watch(self, path: Path, mask: int) -> object:
        return self._inotify.add_callback(os.fsencode(path), mask, self, 0)

    # WatchCallback protocol, called on the InotifyFD thread.
    def on_event(self, event: Any) -> None:
        raise NotImplementedError

    def on_watch_deleted(self, wd: object) -> None:
        pass

    def on_queue_overflow(self) -> None:
        self._overflowed = True


class Finished(InotifyWatch):
    """Waits, by inotify, until every expected job has been renamed into done/ or failed/."""

    def __init__(self, spool: Path, ids: list[str]) -> None:
        super().__init__()
        self.spool = spool
        self.remaining = set(ids)
        self.failed: list[str] = []
        self.completed_at = math.nan
        self._failed_wd: object = None

    def add_watches(self) -> None:
        self.watch(self.spool / "done", InotifyConstants.IN_MOVED_TO)
        self._failed_wd = self.watch(self.spool / "failed", InotifyConstants.IN_MOVED_TO)

    def on_event(self, event: Any) -> None:
        self._arrived(os.fsdecode(event.name), failed=event.wd == self._failed_wd)

    def _arrived(self, name: str, *, failed: bool) -> None:
        with self._lock:
            if name not in self.remaining:
                return
            self.remaining.discard(name)
            if failed:
                self.failed.append(name)
            if not self.remaining:
                self.completed_at = time.time()
                self._all_in.set()

    def wait(self, bound: float) -> float:
        """The wall-clock time the last job arrived; TimeoutError after ``bound`` seconds."""
        end = time.monotonic() + bound
        while not self._all_in.wait(0.5):
            if self._overflowed:  # events were lost: look instead
                self._overflowed = False
                with self._lock:
                    missing = list(self.remaining)
                for name in missing:
                    for directory in ("done", "failed"):
                        if (self.spool / directory / name).is_dir():
                            self._arrived(name, failed=directory == "failed")
            if time.monotonic() > end:
                raise TimeoutError(f"{len(self.remaining)} job(s) not finished after {bound:.0f}s")
        return self.completed_at


# -- the measurements -------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile; NaN without values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)]


def pickup(tool: Tool, ids: list[str], spacing: float, base: Path) -> list[float]:
    """Drop jobs ``spacing`` s apart; latencies in ms from each rename to the job's shell running."""
    marks = base / f"marks-{tool.name}"
    marks.mkdir(exist_ok=True)
    marks.chmod(0o1777)  # spoold's jobs write here as the job user
    stage = base / "stage"
    names = stage_jobs(stage, ids, f"echo $EPOCHREALTIME > {marks}/$JOB_ID", shell="/bin/bash")
    dropped: dict[str, float] = {}
    with Finished(tool.spool, ids) as finished:
        start = time.monotonic()
        for i, (job_id, name) in enumerate(zip(ids, names, strict=True)):
            delay = start + i * spacing - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            os.rename(stage / name, tool.incoming / name)
            dropped[job_id] = time.time()
        with contextlib.suppress(TimeoutError):
            finished.wait(bound=60.0)
    if finished.failed or finished.remaining:
        say(
            f"{tool.name}: {len(finished.failed)} pickup job(s) failed, {len(finished.remaining)} late"
        )
    latencies = []
    for job_id in ids:
        with contextlib.suppress(FileNotFoundError, ValueError):
            started = float((marks / job_id).read_text().strip().replace(",", "."))
            latencies.append((started - dropped[job_id]) * 1000)
    archive_jobs(tool, ids, base / "archive")
    return latencies


@dataclass
class Run:
    jobs_per_s: float
    cpu_ms_per_job: float
    failed: int
    late: int  # jobs not finished within the bound (then jobs_per_s counts the others)


def throughput(tool: Tool, ids: list[str], base: Path) -> Run:
    """Drop all jobs at once; time from the first rename to the last job in done/."""
    stage = base / "stage"
    names = stage_jobs(stage, ids, "true")
    bound = max(120.0, len(ids) / 5)
    cpu_before = tool.daemon.cpu_seconds()
    with Finished(tool.spool, ids) as finished:
        first = time.time()
        for name in names:
            os.rename(stage / name, tool.incoming / name)
        try:
            last = finished.wait(bound)
            late = 0
        except TimeoutError as exc:
            last, late = time.time(), len(finished.remaining)
            say(f"{tool.name}: {exc}; waiting for them once more before the next run")
            with contextlib.suppress(TimeoutError):
                finished.wait(bound)
    cpu = tool.daemon.cpu_seconds() - cpu_before
    archive_jobs(tool, ids, base / "archive")
    count = len(ids) - late
    return Run(count / (last - first), cpu * 1000 / len(ids), len(finished.failed), late)


def make_filler(path: Path, count: int) -> None:
    """``count`` finished-looking job directories, each with a small status.json."""
    path.mkdir()
    for i in range(count):
        job_id = f"old-{i:06d}"
        os.mkdir(path / job_id)
        fd = os.open(path / job_id / "status.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            os.write(fd, b'{"job_id": "%s", "state": "succeeded"}\n' % job_id.encode())
        finally:
            os.close(fd)


@contextlib.contextmanager
def filled_done(tool: Tool, filler: Path) -> Iterator[None]:
    """The filler stands in for the tool's done/ (renamed in while the daemon is idle)."""
    done = tool.spool / "done"
    os.rename(done, tool.aside)
    os.rename(filler, done)
    try:
        yield
    finally:
        os.rename(done, filler)
        os.rename(tool.aside, done)


@dataclass
class Results:
    sizes: Sizes
    pickup_ms: dict[str, list[float]] = field(default_factory=dict)
    empty: dict[str, list[Run]] = field(default_factory=lambda: {t: [] for t in TOOLS})
    filled: dict[str, list[Run]] = field(default_factory=lambda: {t: [] for t in TOOLS})
    idle_rss_mb: dict[str, float] = field(default_factory=dict)
    idle_pss_mb: dict[str, float] = field(default_factory=dict)
    processes: dict[str, int] = field(default_factory=dict)
    idle_cpu_percent: dict[str, float] = field(default_factory=dict)
    load_average: dict[str, str] = field(default_factory=dict)  # others share this machine

    def summary(self) -> dict[str, Any]:
        """Medians per tool, and ratios taken within each round."""

        def median_of(runs: dict[str, list[Run]], attr: str) -> dict[str, float]:
            return {t: statistics.median(getattr(r, attr) for r in runs[t]) for t in TOOLS}

        def paired(a: list[Run], b: list[Run]) -> float:
            return statistics.median(x.jobs_per_s / y.jobs_per_s for x, y in zip(a, b, strict=True))

        s, f = self.empty, self.filled
        return {
            "sizes": asdict(self.sizes),
            "pickup_p50_ms": {t: percentile(v, 50) for t, v in self.pickup_ms.items()},
            "pickup_p99_ms": {t: percentile(v, 99) for t, v in self.pickup_ms.items()},
            "pickup_samples": {t: len(v) for t, v in self.pickup_ms.items()},
            "pickup_ms_in_drop_order": {
                t: [round(x, 2) for x in v] for t, v in self.pickup_ms.items()
            },
            "throughput_jobs_per_s": median_of(s, "jobs_per_s"),
            "throughput_ratio": paired(s["spoold"], s["floor"]),
            "throughput_filled_jobs_per_s": median_of(f, "jobs_per_s"),
            "throughput_filled_ratio": paired(f["spoold"], f["floor"]),
            # cost per job with the filler / cost per job without: > 1 means it grew
            "cost_growth_filled": {t: paired(s[t], f[t]) for t in TOOLS},
            "cpu_ms_per_job": median_of(s, "cpu_ms_per_job"),
            "cpu_ms_per_job_filled": median_of(f, "cpu_ms_per_job"),
            "failed_jobs": {t: sum(r.failed for r in s[t] + f[t]) for t in TOOLS},
            "late_jobs": {t: sum(r.late for r in s[t] + f[t]) for t in TOOLS},
            "load_average": self.load_average,
            "idle_rss_mb": self.idle_rss_mb,
            "idle_pss_mb": self.idle_pss_mb,
            "processes": self.processes,
            "idle_cpu_percent_of_a_core": self.idle_cpu_percent,
            "runs": {
                "empty": {t: [asdict(r) for r in s[t]] for t in TOOLS},
                "filled": {t: [asdict(r) for r in f[t]] for t in TOOLS},
            },
        }


def table(summary: dict[str, Any], second: str = "floor") -> str:
    sizes = summary["sizes"]
    filler = f"{sizes['filler'] // 1000}k"
    rows: list[tuple[str, str, str, str, str]] = []

    def row(label: str, key: str, fmt: str, ratio: str = "", target: str = "") -> None:
        values = summary[key]
        rows.append(
            (label, format(values["spoold"], fmt), format(values["floor"], fmt), ratio, target)
        )

    row("pickup p50 (ms)", "pickup_p50_ms", ".2f", target="< 10")
    row("pickup p99 (ms)", "pickup_p99_ms", ".2f", target="< 50")
    row("throughput (jobs/s)", "throughput_jobs_per_s", ".0f",
        f"{summary['throughput_ratio']:.2f}", ">= 0.7")  # fmt: skip
    row(f"throughput, {filler} in done/ (jobs/s)", "throughput_filled_jobs_per_s", ".0f",
        f"{summary['throughput_filled_ratio']:.2f}", ">= 0.7")  # fmt: skip
    growth = summary["cost_growth_filled"]
    rows.append((f"cost growth with {filler} in done/", f"{growth['spoold']:.2f}x",
                 f"{growth['floor']:.2f}x", "", "~1.0"))  # fmt: skip
    row("daemon CPU per job (ms)", "cpu_ms_per_job", ".2f")
    row(f"daemon CPU per job, {filler} done/ (ms)", "cpu_ms_per_job_filled", ".2f")
    row("processes", "processes", "d")
    row("idle RSS, all processes (MB)", "idle_rss_mb", ".1f")
    row("idle PSS, all processes (MB)", "idle_pss_mb", ".1f")
    row(f"idle CPU (% of a core, {sizes['idle']:.0f} s)", "idle_cpu_percent_of_a_core", ".2f",
        target="0")  # fmt: skip
    header = ("", "spoold", second, "ratio", "target")
    lines = [f"{header[0]:<38}{header[1]:>9}{header[2]:>9}{header[3]:>8}   {header[4]}"]
    lines += [f"{a:<38}{b:>9}{c:>9}{d:>8}   {e}" for a, b, c, d, e in rows]
    return "\n".join(lines)


def measure(tools: dict[str, Tool], sizes: Sizes, base: Path, filler: Path) -> Results:
    results = Results(sizes)
    results.load_average["start"] = load_average()
    say(f"pickup latency: {sizes.drops} drops {sizes.spacing * 1000:.0f} ms apart per tool")
    for block, first in enumerate(range(0, sizes.drops, PICKUP_BLOCK)):
        numbers = range(first, min(first + PICKUP_BLOCK, sizes.drops))
        for name in TOOLS if block % 2 == 0 else TOOLS[::-1]:
            ids = [f"pick-{name}-{i:05d}" for i in numbers]
            latencies = pickup(tools[name], ids, sizes.spacing, base)
            results.pickup_ms.setdefault(name, []).extend(latencies)
    for round_ in range(sizes.rounds):
        # Alternate which tool and which case comes first: each leaves the machine warmer.
        for name in TOOLS if round_ % 2 == 0 else TOOLS[::-1]:
            for filled in (False, True) if round_ % 2 == 0 else (True, False):
                tool = tools[name]
                case = "filled" if filled else "empty"
                ids = [f"{case[0]}{round_}-{name}-{i:05d}" for i in range(sizes.jobs)]
                say(f"round {round_ + 1}/{sizes.rounds}: {name}, {sizes.jobs} jobs, {case} done/")
                with filled_done(tool, filler) if filled else contextlib.nullcontext():
                    run = throughput(tool, ids, base)
                (results.filled if filled else results.empty)[name].append(run)
    results.load_average["end of runs"] = load_average()
    say(f"idle: {sizes.idle:.0f} s")
    before = {name: tools[name].daemon.cpu_seconds() for name in TOOLS}
    started = time.monotonic()
    time.sleep(sizes.idle)
    elapsed = time.monotonic() - started
    for name in TOOLS:
        used = tools[name].daemon.cpu_seconds() - before[name]
        results.idle_cpu_percent[name] = 100 * used / elapsed
        rss, pss = tools[name].daemon.memory_mb()
        results.idle_rss_mb[name], results.idle_pss_mb[name] = rss, pss
        results.processes[name] = len(tools[name].daemon.own_pids())
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test: everything smaller")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    parser.add_argument("--dir", type=Path, help="where the temporary spools go (same filesystem)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--against", metavar="PYTHON",
        help="in the floor's place, the spoold installed for this interpreter (an older commit's "
        "venv): ratios are then this spoold's over that one's",
    )  # fmt: skip
    args = parser.parse_args()
    if args.against:
        same_interpreter(sys.executable, args.against)
    sizes = QUICK if args.quick else FULL
    began = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="bench-spool-", dir=args.dir))
    base.chmod(0o711)  # the job user passes through to its marks
    tools: dict[str, Tool] = {}
    try:
        spread_subdirectories(base)
        (base / "stage").mkdir()
        (base / "archive").mkdir()
        filler = base / "filler"
        say(f"creating {sizes.filler} entries for done/ in {filler}")
        make_filler(filler, sizes.filler)
        # Written back now, not 30 s later in the middle of the pickup drops: a 1 s stall of
        # the disk there once hit whichever tool was being measured (measured: the floor's
        # p99 went from 4 ms to 1.3 s in one run, spoold's in others).
        os.sync()
        for name in TOOLS:
            tools[name] = make_tool(name, base, args.workers, args.against)
            tools[name].daemon.start()
        summary = measure(tools, sizes, base, filler).summary()
        for name, tool in tools.items():
            code = tool.daemon.stop()
            if code != 0:
                say(f"{name} exited with {code}")
            log = tool.daemon.log_path.read_text(errors="replace").strip()
            if log:
                say(
                    f"{name} logged {len(log.splitlines())} line(s); the last:\n{tool.daemon.log_tail(5)}"
                )
    finally:
        for tool in tools.values():
            tool.daemon.stop()
        say(f"removing {base}")
        shutil.rmtree(base, ignore_errors=True)
    summary["run_seconds"] = round(time.monotonic() - began, 1)
    print(table(summary, "old" if args.against else "floor"))
    if any(summary["failed_jobs"].values()) or any(summary["late_jobs"].values()):
        print(
            f"failed jobs: {summary['failed_jobs']}, jobs late past the bound: "
            f"{summary['late_jobs']} (the throughput numbers above are suspect)"
        )
    print(f"load average (1, 5, 15 min): {summary['load_average']}")
    print(f"full run: {summary['run_seconds']:.0f} s")
    text = json.dumps(summary, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
