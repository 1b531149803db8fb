"""What a job costs on a single-node swarm against the plain docker executor.

The same one-line job (``echo hi``, the test image) run to its end, one after another, by the
``docker`` executor (a container) and by the ``swarm`` executor (a replicated-job service),
in one interleaved run (pairs of blocks, each executor meeting the same machine), as ratios:

- wall time per job, from the call to the result (scheduling, start, output, removal);
- spoold's CPU per job (this process: the executor's calls and its output followers);
- the whole machine's CPU per job (/proc/stat: the engine, containerd, the shims and the job).

Needs a running engine (``dockerd``) with the image; a swarm is made on it if it has none, and
left again at the end.

Usage: .venv/bin/python benchmarks/bench_swarm.py [--jobs N] [--rounds R] [--image IMAGE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

from spoold.executors.base import Executor, RunContext
from spoold.executors.docker import DockerExecutor
from spoold.executors.swarm import SwarmExecutor

from spoold.core.clock import SystemClock
from spoold.core.joblog import JobLog


def _cpu_jiffies() -> int:
    """Busy time of the whole machine, in clock ticks."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


def _context(name: str, image: str, workdir: Path, log: JobLog) -> RunContext:
    job_id = f"bench-{uuid.uuid4().hex[:8]}"
    return RunContext(
        job_id=job_id, executor=name, type=None, product={"image": image, "script": "echo hi"},
        workdir=workdir, env={}, job_env={"JOB_ID": job_id}, log=log, clock=SystemClock(),
        timeout=60.0, kill_grace=1.0, cancel=threading.Event(),
    )  # fmt: skip


def _block(executor: Executor, image: str, jobs: int, workdir: Path) -> tuple[float, ...]:
    """Run ``jobs`` jobs one after another: (wall, spoold CPU, machine CPU) seconds per job."""
    ticks = os.sysconf("SC_CLK_TCK")
    with open(os.devnull, "wb") as sink:
        log = JobLog(sink, SystemClock())
        jiffies, cpu, start = _cpu_jiffies(), time.process_time(), time.perf_counter()
        for _ in range(jobs):
            result = executor.run(_context(executor.name, image, workdir, log))
            if not result.succeeded:
                raise SystemExit(f"{executor.name}: a job failed: {result.failure}")
        wall = time.perf_counter() - start
        own = time.process_time() - cpu
        machine = (_cpu_jiffies() - jiffies) / ticks
    return wall / jobs, own / jobs, machine / jobs


def _swarm_state() -> str:
    done = subprocess.run(
        ["docker", "info", "--format", "{{.Swarm.LocalNodeState}}"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10, help="jobs per block (default 10)")
    parser.add_argument("--rounds", type=int, default=5, help="pairs of blocks (default 5)")
    parser.add_argument("--image", default="local/busybox:test")
    args = parser.parse_args()
    made = _swarm_state() != "active"
    if made:
        subprocess.run(["docker", "swarm", "init", "--advertise-addr", "127.0.0.1"], check=True)
    executors: list[Executor] = [DockerExecutor(), SwarmExecutor()]
    figures: dict[str, list[tuple[float, ...]]] = {e.name: [] for e in executors}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for executor in executors:  # warm both up: the image, the SDK, the first service
                _block(executor, args.image, 1, Path(tmp))
            for round_ in range(args.rounds):
                order = executors if round_ % 2 == 0 else executors[::-1]
                for executor in order:
                    figures[executor.name].append(
                        _block(executor, args.image, args.jobs, Path(tmp))
                    )
    finally:
        if made:
            subprocess.run(["docker", "swarm", "leave", "--force"], check=True)
    print(f"{args.rounds} pairs of blocks of {args.jobs} jobs (echo hi), medians of the blocks")
    print(f"{'':8} {'wall/job':>10} {'spoold CPU/job':>15} {'machine CPU/job':>16}")
    medians = {
        name: [statistics.median(block[i] for block in blocks) for i in range(3)]
        for name, blocks in figures.items()
    }
    for name, (wall, own, machine) in medians.items():
        print(f"{name:8} {wall * 1000:8.0f}ms {own * 1000:13.1f}ms {machine * 1000:14.0f}ms")
    docker, swarm = medians["docker"], medians["swarm"]
    print(
        f"swarm/docker: wall {swarm[0] / docker[0]:.2f}x, spoold CPU {swarm[1] / docker[1]:.2f}x, "
        f"machine CPU {swarm[2] / docker[2]:.2f}x; "
        f"overhead per job {(swarm[0] - docker[0]) * 1000:+.0f} ms wall"
    )


if __name__ == "__main__":
    main()
