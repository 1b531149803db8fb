"""Schedules by the thousand (issue 23): registration cost, restart cost, idle cost.

For each count N (a fresh spool and daemon each):

1. registration: N schedule files ``{every: 60s}`` renamed into incoming/ at once; wall time
   from the first rename to the daemon's log saying ``schedule X registered`` for all N, and
   the daemon's CPU over that time (utime+stime of all its processes, as bench_spool counts);
2. restart: the daemon stopped and started again; wall time to READY=1 (every schedule is
   registered before it) and its CPU to then;
3. idle: the restarted daemon's CPU over ``--idle`` seconds (30: one ``rescan_interval``) left
   alone, a steady state: ``--settle`` seconds after READY a round of its periodic duties is
   asked for (SIGUSR1), which reads once more the schedules whose directories were made less
   than SETTLE seconds before the start read them (spoold.schedule.scheduler); the window opens
   a second later and holds the next round, due one rescan_interval after that one. Before the
   first firing: each schedule fires one period after its acceptance; a firing that falls in
   the window is said (``--every 3600s`` keeps them out of it).

Every wait is bounded (``--bound``); a count not registered within it is reported as such,
with how many were. Daemons are stopped and the temporary directory removed on the way out.

Usage: .venv/bin/python benchmarks/bench_schedules.py [--counts 1000,10000] [--idle 30]
       [--settle 6] [--bound 600] [--every 60s] [--dir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the project root is one up
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_spool import (
    Daemon,
    load_average,
    say,
    spoold_cli,
    spread_subdirectories,
)

REGISTERED = b" registered ("  # "schedule X registered (every 60s in UTC, ...)"
POLL = 0.1  # seconds between two looks at the daemon's log
RESCAN = 30.0  # the daemon's rescan_interval (its default): a round of its duties this often


@dataclass
class Result:
    count: int
    registered: int  # within the bound
    register_wall_s: float
    register_cpu_s: float
    idle_s: float
    idle_cpu_s: float
    idle_cpu_percent: float
    firings_in_idle: bool  # the first firing came before the idle window ended
    restart_wall_s: float
    restart_cpu_s: float


class LogCount:
    """Counts a marker in a growing log file, reading only what was appended since."""

    def __init__(self, path: Path, marker: bytes) -> None:
        self.path = path
        self.marker = marker
        self.count = 0
        self._offset = 0
        self._tail = b""

    def update(self) -> int:
        try:
            with open(self.path, "rb") as log:
                log.seek(self._offset)
                data = log.read()
        except FileNotFoundError:
            return self.count
        self._offset += len(data)
        text = self._tail + data
        cut = text.rfind(b"\n") + 1  # whole lines only: a marker may be half written
        self.count += text[:cut].count(self.marker)
        self._tail = text[cut:]
        return self.count


def make_daemon(home: Path) -> tuple[Path, Daemon]:
    """A fresh spool with its config (log at info: the registrations are counted there)."""
    spool = home / "spool"
    subprocess.run([*spoold_cli(), "init", "--spool", str(spool)], check=True, capture_output=True)
    config = home / "config.yaml"
    config.write_text(f"workers: 2\nrescan_interval: {RESCAN:g}s\nlog_level: info\n")
    argv = [*spoold_cli(), "run", "--spool", str(spool), "--config", str(config)]
    return spool, Daemon("spoold", argv, home / "daemon.log")


def stage_schedules(stage: Path, count: int, every: str) -> list[str]:
    names = []
    for i in range(count):
        job_id = f"sched-{i:05d}"
        (stage / f"{job_id}.yaml").write_text(
            f"job_id: {job_id}\nexecutor: local\nproduct: {{commands: 'true'}}\n"
            f"schedule: {{every: {every}}}\n"
        )
        names.append(f"{job_id}.yaml")
    return names


def measure(
    base: Path, count: int, *, idle: float, settle: float, bound: float, every: str
) -> Result:
    home = base / f"n{count}"
    home.mkdir()
    spool, daemon = make_daemon(home)
    stage = home / "stage"
    stage.mkdir()
    names = stage_schedules(stage, count, every)
    os.sync()  # the staged files written back now, not in the middle of the measurement
    period = float(every.rstrip("s"))
    try:
        daemon.start()
        daemon.wait_quiet()  # its start-up is not registration
        seen = LogCount(daemon.log_path, REGISTERED)
        cpu_before = daemon.cpu_seconds()
        first = time.monotonic()
        for name in names:
            os.rename(stage / name, spool / "incoming" / name)
        end = first + bound
        while seen.update() < count and time.monotonic() < end:
            if daemon.process is not None and daemon.process.poll() is not None:
                raise RuntimeError(f"the daemon ended; its log:\n{daemon.log_tail()}")
            time.sleep(POLL)
        registered_at = time.monotonic()
        register_cpu = daemon.cpu_seconds() - cpu_before
        if seen.count < count:
            say(f"N={count}: only {seen.count} registered after {bound:.0f}s")
        say(f"N={count}: registered in {registered_at - first:.2f}s, {register_cpu:.2f}s CPU")
        daemon.stop()
        daemon = Daemon("spoold", daemon.argv, daemon.log_path)
        began = time.monotonic()
        daemon.start(bound)
        restart_wall = time.monotonic() - began
        restart_cpu = daemon.cpu_seconds()
        say(f"N={count}: restart to READY {restart_wall:.2f}s, {restart_cpu:.2f}s CPU")
        time.sleep(settle)
        # A round now (as `spoold schedule pause` asks for one): the window that opens a second
        # later holds the next, due RESCAN seconds after this one.
        os.kill(daemon.pid, signal.SIGUSR1)
        time.sleep(1.0)
        idle_start = daemon.cpu_seconds()
        idle_began = time.monotonic()
        time.sleep(idle)
        idle_cpu = daemon.cpu_seconds() - idle_start
        idle_took = time.monotonic() - idle_began
        firings = time.monotonic() > first + period  # the first acceptance came after `first`
        say(f"N={count}: idle {idle_took:.1f}s, {idle_cpu:.2f}s CPU")
    finally:
        daemon.stop()
    return Result(
        count=count, registered=seen.count, register_wall_s=round(registered_at - first, 2),
        register_cpu_s=round(register_cpu, 2), idle_s=round(idle_took, 1),
        idle_cpu_s=round(idle_cpu, 3), idle_cpu_percent=round(100 * idle_cpu / idle_took, 3),
        firings_in_idle=firings, restart_wall_s=round(restart_wall, 2),
        restart_cpu_s=round(restart_cpu, 2),
    )  # fmt: skip


def table(results: list[Result]) -> str:
    rows = [
        "| schedules | registered | wall | daemon CPU | idle CPU (% of a core) | restart to READY "
        "(wall / CPU) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        idle = f"{r.idle_cpu_percent:.3f}% over {r.idle_s:.0f}s" + (
            " (firings came in it)" if r.firings_in_idle else ""
        )
        rows.append(
            f"| {r.count} | {r.registered} | {r.register_wall_s:.2f} s | {r.register_cpu_s:.2f} s "
            f"| {idle} | {r.restart_wall_s:.2f} s / {r.restart_cpu_s:.2f} s |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1000,10000", help="schedule counts, comma-separated")
    parser.add_argument("--idle", type=float, default=RESCAN, help="seconds left idle")
    parser.add_argument(
        "--settle", type=float, default=6.0,
        help="seconds between READY and the idle window (the scheduler's SETTLE is 5 s)",
    )  # fmt: skip
    parser.add_argument("--bound", type=float, default=600.0, help="seconds to wait at most")
    parser.add_argument("--every", default="60s", help="each schedule's period, in seconds")
    parser.add_argument("--dir", type=Path, help="where the temporary spools go")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-schedules-", dir=args.dir))
    results = []
    try:
        spread_subdirectories(base)
        for count in (int(n) for n in args.counts.split(",")):
            results.append(measure(base, count, idle=args.idle, settle=args.settle,
                                   bound=args.bound, every=args.every))  # fmt: skip
    finally:
        say(f"removing {base}")
        shutil.rmtree(base, ignore_errors=True)
    print(table(results))
    print(f"load average (1, 5, 15 min): {load_average()}")
    text = json.dumps([asdict(r) for r in results], indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
