"""What a job's supervisor costs: per job start, and per running job.

Each local job runs under a supervisor that outlives the daemon (spoold.run.launcher): a
fork of the worker process's launcher, which begins the unit's record, starts the job as the
job user, writes its output into the log, and records its end. Measured here against the
same job run in the worker's own process (``run_process``, what spoold did before), in one
interleaved run (pairs of blocks, each tool meeting the same machine), as ratios:

1. start: ``/bin/true`` run to its end, one after another: wall time per job and the whole
   machine's CPU time per job (/proc/stat: the supervisors are nobody's children to count).
   A supervisor that ended its unit takes the next one (a fork and its first copy-on-write
   faults cost ~5 ms, several times a unit of ``true``): this is a busy slot's steady state;
2. running: K jobs sleeping at once: the memory each supervisor adds (RSS, PSS, USS from
   /proc/PID/smaps_rollup), and the launcher's own, once per worker process.

Usage: .venv/bin/python benchmarks/bench_supervisor.py [--jobs N] [--rounds R] [--running K]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from spoold.core.clock import SystemClock
from spoold.core.joblog import JobLog
from spoold.core.secrets import Masker
from spoold.core.spool import JobDir, Spool
from spoold.run.launcher import Launcher, Supervised
from spoold.run.process import adopt_orphans, run_process

_CLOCK = SystemClock()


def _cpu_jiffies() -> int:
    """Busy time of the whole machine, in clock ticks."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


def _job(spool: Spool, n: int) -> JobDir:
    path = spool.dir("running") / f"b{n}"
    path.mkdir()
    (path / "log").touch()
    return JobDir(f"b{n}", "running", str(path))


def _block(
    kind: str, spool: Spool, launcher: Launcher, jobs: int, first: int
) -> tuple[float, float]:
    """Run ``jobs`` true's one after another; (seconds, CPU seconds) per job."""
    ticks = os.sysconf("SC_CLK_TCK")
    cpu, start = _cpu_jiffies(), time.perf_counter()
    for n in range(first, first + jobs):
        job = _job(spool, n)
        with spool.jobs.open_log(job) as handle:
            log = JobLog(handle, _CLOCK)
            never = threading.Event()
            if kind == "supervised":
                outcome = Supervised(launcher, spool.jobs, job, masker=Masker(), log_limit=None,
                                     host="bench").run(
                    ["/bin/true"], key="1", cwd=Path("/"), env={}, log=log, clock=_CLOCK,
                    timeout=None, kill_grace=1.0, cancel=never, detach=never,
                )  # fmt: skip
            else:
                outcome = run_process(["/bin/true"], cwd=Path("/"), env={}, log=log, clock=_CLOCK,
                                      timeout=None, kill_grace=1.0, cancel=never)  # fmt: skip
        assert outcome.exit_code == 0, outcome
    took = time.perf_counter() - start
    return took / jobs, (_cpu_jiffies() - cpu) / ticks / jobs


def _memory(pid: int) -> dict[str, int]:
    """RSS, PSS and USS (private) of one process, in KiB."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as rollup:
        for line in rollup:
            name, _, rest = line.partition(":")
            if name in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
                found[name] = int(rest.split()[0])
    return {"rss": found["Rss"], "pss": found["Pss"],
            "uss": found["Private_Clean"] + found["Private_Dirty"]}  # fmt: skip


def _running(
    spool: Spool, launcher: Launcher, count: int
) -> tuple[dict[str, float], dict[str, int]]:
    """Memory per supervisor with ``count`` sleeping jobs, and the launcher's."""
    stop = threading.Event()
    threads, pids = [], []
    for n in range(count):
        job = _job(spool, 1_000_000 + n)
        log = JobLog(spool.jobs.open_log(job), _CLOCK)
        supervised = Supervised(launcher, spool.jobs, job, masker=Masker(), log_limit=None,
                                host="bench")  # fmt: skip

        def run(supervised: Supervised = supervised, log: JobLog = log) -> None:
            supervised.run(["/bin/sleep", "60"], key="1", cwd=Path("/"), env={}, log=log,
                           clock=_CLOCK, timeout=None, kill_grace=1.0, cancel=stop,
                           detach=threading.Event())  # fmt: skip

        thread = threading.Thread(target=run)
        thread.start()
        threads.append(thread)
        begun = Path(job.location) / "units" / "1"
        while not begun.exists():
            time.sleep(0.01)
        pids.append(int(begun.read_text().split('"pid":')[1].split(",")[0]))
    time.sleep(0.5)  # each has started its sleep and settled
    each = [_memory(pid) for pid in pids]
    per = {key: statistics.mean(m[key] for m in each) for key in ("rss", "pss", "uss")}
    assert launcher._process is not None
    own = _memory(launcher._process.pid)
    stop.set()
    for thread in threads:
        thread.join(30)
    return per, own


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200, help="jobs per block")
    parser.add_argument("--rounds", type=int, default=5, help="pairs of blocks")
    parser.add_argument("--running", type=int, default=20, help="jobs running at once")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-supervisor-") as name:
        spool = Spool(Path(name) / "spool", durable=False)
        spool.init()
        # As a worker process was before supervisors: the parent of what its jobs leave.
        adopt_orphans()
        launcher = Launcher()
        _block("supervised", spool, launcher, 5, 0)  # the launcher started, caches warm
        walls: dict[str, list[float]] = {"supervised": [], "in-process": []}
        cpus: dict[str, list[float]] = {"supervised": [], "in-process": []}
        ratios_wall, ratios_cpu = [], []
        first = 10
        for round_ in range(args.rounds):
            order = (
                ["supervised", "in-process"] if round_ % 2 == 0 else ["in-process", "supervised"]
            )
            got = {}
            for kind in order:
                got[kind] = _block(kind, spool, launcher, args.jobs, first)
                first += args.jobs
                walls[kind].append(got[kind][0])
                cpus[kind].append(got[kind][1])
            ratios_wall.append(got["supervised"][0] / got["in-process"][0])
            ratios_cpu.append(got["supervised"][1] / got["in-process"][1])
        print(f"start: {args.rounds} rounds of {args.jobs} /bin/true jobs each way, medians")
        for kind in ("in-process", "supervised"):
            print(f"  {kind:11} {statistics.median(walls[kind]) * 1000:6.2f} ms/job wall, "
                  f"{statistics.median(cpus[kind]) * 1000:6.2f} ms/job CPU (whole machine)")  # fmt: skip
        extra_wall = statistics.median(walls["supervised"]) - statistics.median(walls["in-process"])
        extra_cpu = statistics.median(cpus["supervised"]) - statistics.median(cpus["in-process"])
        print(f"  supervisor: +{extra_wall * 1000:.2f} ms wall, +{extra_cpu * 1000:.2f} ms CPU per job; "
              f"ratio supervised/in-process {statistics.median(ratios_wall):.2f}x wall, "
              f"{statistics.median(ratios_cpu):.2f}x CPU")  # fmt: skip
        per, own = _running(spool, launcher, args.running)
        print(f"running: {args.running} jobs at once, per supervisor: RSS {per['rss'] / 1024:.1f} MiB, "
              f"PSS {per['pss'] / 1024:.1f} MiB, private {per['uss'] / 1024:.1f} MiB; "
              f"the launcher (one per worker process): RSS {own['rss'] / 1024:.1f} MiB, "
              f"PSS {own['pss'] / 1024:.1f} MiB")  # fmt: skip
        launcher.close()


if __name__ == "__main__":
    main()
