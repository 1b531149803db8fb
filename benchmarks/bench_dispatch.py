"""Dispatch with a backlog behind a limit (issue 23, twelfth round): does a take cost more as
more jobs wait?

A daemon's dispatch queue (spoold.run.dispatch) hands the next job to a free slot. Jobs held
back by a full limit (``limits.executors``, a busy ``concurrency.key``) used to be walked at
every take: a flood of 10,000 jobs behind ``limits.executors`` cost 5.4 s of the main
process's time, quadratic in the flood. Two parts:

1. the queue alone, in this process, for N jobs waiting (``--sizes``, 1000 to 40,000), in
   rounds alternating the sizes: microseconds per operation for
   - ``limit``: a take (and the add before it) with every waiting job behind a full executor
     limit;
   - ``key``: a take of a free job with every other waiting job behind one busy key;
   - ``skip``: an add of a ``strategy: skip`` job among N jobs each with a key of its own;
   - ``plain``: N adds and N takes, no limit (the common case);

   and the ratio of the largest size's cost to the smallest's: near 1.0x, a take does not
   walk the waiting jobs. Then the bytes a queued job holds (tracemalloc), with one JobMeta
   for all (past ``HELD`` waiting packed, and all as objects) and with a concurrency key per
   job (each key is a lane of its own, its first job never packed);
2. the daemon (``--daemon N``, 0 to leave it out): N job files renamed into incoming/ at once
   while a running job fills ``limits.executors: {local: 1}``, so that all N wait; files/s
   accepted (all in pending/) and the main process's CPU for them. Then the backlog waiting:
   the daemon's CPU (all its processes) over ``--idle`` seconds (30: one ``rescan_interval``),
   from a second after a round asked for (SIGUSR1) once the last acceptances are SETTLE old,
   as bench_schedules.py measures 10,000 schedules at rest. The blocking job is cancelled and
   the daemon stopped at the end; its spool is removed.

Usage: .venv/bin/python benchmarks/bench_dispatch.py [--sizes 1000,10000,40000] [--rounds 3]
       [--daemon 5000] [--idle 30] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the project root is one up
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_compare import Flood, cpu_seconds
from benchmarks.bench_spool import (
    CLOCK_TICKS,
    make_tool,
    say,
    spread_subdirectories,
    stage_jobs,
)
from spoold.core.spool.fs import SETTLE
from spoold.run.dispatch import HELD, DispatchQueue, JobMeta

BOUND = 300.0  # seconds a daemon's flood may take at most
OPS = 2000  # timed operations per measurement


def behind_a_full_limit(size: int) -> float:
    """µs per add + take with ``size`` jobs waiting behind a full executor limit."""
    queue = DispatchQueue({"local": 1})
    meta = JobMeta(executor="local")
    queue.add("running", meta)
    queue.take()
    for n in range(size):
        queue.add(f"w{n}", meta)
    started = time.perf_counter()
    for n in range(OPS):
        queue.add(f"x{n}", meta)
        queue.take()
    return (time.perf_counter() - started) * 1e6 / OPS


def behind_a_busy_key(size: int) -> float:
    """µs per add + take of a free job with ``size`` jobs waiting behind a busy key."""
    queue = DispatchQueue()
    deploy = JobMeta(key="deploy")
    queue.add("running", deploy)
    queue.take()
    for n in range(size):
        queue.add(f"w{n}", deploy)
    free = JobMeta(key="free")
    started = time.perf_counter()
    for n in range(OPS):
        queue.add(f"x{n}", free)
        queue.take()
        queue.finished(f"x{n}")
    return (time.perf_counter() - started) * 1e6 / OPS


def skip_among_keys(size: int) -> float:
    """µs per add of a ``skip`` job with ``size`` jobs waiting, each with its own key."""
    queue = DispatchQueue()
    for n in range(size):
        queue.add(f"w{n}", JobMeta(key=f"vm-{n}"))
    backup = JobMeta(key="backup", limit=OPS, strategy="skip")
    started = time.perf_counter()
    for n in range(OPS):
        queue.add(f"x{n}", backup)
    return (time.perf_counter() - started) * 1e6 / OPS


def plain(size: int) -> float:
    """µs per job for ``size`` adds then ``size`` takes, no limit."""
    queue = DispatchQueue()
    meta = JobMeta(executor="local")
    started = time.perf_counter()
    for n in range(size):
        queue.add(f"w{n}", meta)
    while queue.take() is not None:
        pass
    return (time.perf_counter() - started) * 1e6 / size


CASES: dict[str, Callable[[int], float]] = {
    "limit": behind_a_full_limit,
    "key": behind_a_busy_key,
    "skip": skip_among_keys,
    "plain": plain,
}


def bytes_a_job(size: int, *, key_each: bool, held: int = HELD) -> float:
    """``held``: jobs waiting as objects before the queue packs the others (``size``: none)."""
    metas = [JobMeta(executor="local", key=f"vm-{n}" if key_each else None) for n in range(size)]
    queue = DispatchQueue(held=held)
    tracemalloc.start()
    try:
        for n, meta in enumerate(metas):
            queue.add(f"job-{n:06d}", meta)  # a new id each, as intake's are
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return used / size


def queue_alone(sizes: list[int], rounds: int) -> None:
    found: dict[tuple[str, int], list[float]] = {}
    for round_ in range(rounds):
        order = sizes if round_ % 2 == 0 else list(reversed(sizes))
        for size in order:
            for name, case in CASES.items():
                found.setdefault((name, size), []).append(case(size))
    print(f"the queue alone: µs per operation, medians of {rounds} rounds")
    print(f"  {'case':<6}" + "".join(f"{size:>12,}" for size in sizes) + "   largest/smallest")
    for name in CASES:
        costs = [statistics.median(found[name, size]) for size in sizes]
        ratio = costs[-1] / costs[0]
        print(f"  {name:<6}" + "".join(f"{c:>12.2f}" for c in costs) + f"   {ratio:>8.2f}x")
    size = sizes[-1]
    print(
        f"bytes a queued job ({size:,} waiting): one JobMeta for all "
        f"{bytes_a_job(size, key_each=False):.0f} (past {HELD} packed; all as objects "
        f"{bytes_a_job(size, key_each=False, held=size):.0f}), a concurrency key each "
        f"{bytes_a_job(size, key_each=True):.0f}"
    )


def main_cpu(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def daemon_flood(count: int, where: str | None, idle: float) -> None:
    base = Path(tempfile.mkdtemp(prefix="bench-dispatch-", dir=where))
    try:
        spread_subdirectories(base)
        tool = make_tool("spoold", base, 2)
        config = base / "spoold" / "config.yaml"
        config.write_text(config.read_text() + "limits: {executors: {local: 1}}\n")
        stage = base / "stage"
        stage.mkdir()
        tool.daemon.start()
        tool.daemon.wait_quiet()
        try:
            (blocker,) = stage_jobs(stage, ["blocker"], f"sleep {BOUND:.0f}")
            os.rename(stage / blocker, tool.incoming / blocker)
            deadline = time.monotonic() + BOUND
            while not (tool.spool / "running" / "blocker").exists():
                if time.monotonic() > deadline:
                    raise TimeoutError("the blocking job did not start")
                time.sleep(0.05)
            ids = [f"held-{n:06d}" for n in range(count)]
            names = stage_jobs(stage, ids, "/bin/true")
            os.sync()
            assert tool.daemon.process is not None
            pid = tool.daemon.process.pid
            before = main_cpu(pid)
            with Flood(tool.spool, ids) as seen:
                first = time.time()
                for name in names:
                    os.rename(stage / name, tool.incoming / name)
                while len(seen.accepted) < count and time.monotonic() < deadline:
                    time.sleep(0.05)
            if len(seen.accepted) < count:
                raise TimeoutError(f"{count - len(seen.accepted)} file(s) not accepted")
            accepted = max(seen.accepted.values()) - first
            user, system = (after - then for after, then in zip(main_cpu(pid), before, strict=True))
            print(
                f"the daemon: {count:,} files behind limits.executors {{local: 1}}: accepted "
                f"in {accepted:.2f} s = {count / accepted:.0f} files/s; main process "
                f"{user * 1000 / count:.2f} ms user + {system * 1000 / count:.2f} ms system a file"
            )
            if idle:
                time.sleep(SETTLE + 1.0)
                tool.daemon.process.send_signal(signal.SIGUSR1)  # a round: the stamps settle
                time.sleep(1.0)
                before_idle = cpu_seconds(tool.daemon)
                time.sleep(idle)
                used = cpu_seconds(tool.daemon) - before_idle
                print(
                    f"the daemon waiting with them: {100 * used / idle:.3f} % of a core over "
                    f"{idle:g} s ({used * 1000:.0f} ms of CPU, all its processes)"
                )
        finally:
            cli = [sys.executable, "-m", "spoold", "--spool", str(tool.spool)]
            subprocess.run([*cli, "cancel", "blocker"], capture_output=True, check=False)
            ended = time.monotonic() + 30.0  # it outlives the daemon: ended first, by its own
            while time.monotonic() < ended and not any(
                (tool.spool / state / "blocker").exists() for state in ("done", "failed")
            ):
                time.sleep(0.1)
            tool.daemon.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,40000", help="jobs waiting")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--daemon", type=int, default=5000, help="files of the flood; 0: none")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds; 0: not measured")
    parser.add_argument(
        "--dir", help="where the daemon's spool goes (default: $TMPDIR): on ext4 without a "
        "journal, files freed in the last minutes slow each create (see benchmarks/README.md)"
    )  # fmt: skip
    args = parser.parse_args()
    sizes = sorted(int(size) for size in args.sizes.split(","))
    say(f"dispatch: sizes {sizes}, {args.rounds} rounds")
    queue_alone(sizes, args.rounds)
    if args.daemon:
        daemon_flood(args.daemon, args.dir, args.idle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
