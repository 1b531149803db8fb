"""How long idle worker processes stay: the adaptive stay against a fixed 30 s, side by side.

Two spoold daemons of this checkout run at once, 2 workers each: ``adaptive`` as shipped
(worker processes stay 10 s after a burst that follows a quiet spell, twice as long each time
a job soon needed one again, up to ``worker_idle_exit``), and ``fixed``, the same code with
the first stay set to ``worker_idle_exit`` (30 s: what spoold did before). Each pattern drops
``/bin/true`` jobs into both spools at the same moments, one at a time ``gap`` seconds apart,
and then leaves them alone for ``tail`` seconds; before each pattern both are waited back to
rest, and then ``worker_idle_exit`` more (a quiet spell).
Per pattern and daemon: how many worker processes started, the daemon's CPU (all its
processes, the jobs left out), its memory averaged over the pattern's time (RSS and PSS summed
over its processes), and each job's pickup (rename -> the job's shell running; a job that
finds no worker process waits for one to start).

    .venv/bin/python benchmarks/bench_linger.py            # ~12 min
    .venv/bin/python benchmarks/bench_linger.py --quick    # ~3 min
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the project root is one up
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_compare import (
    Sampler,
    cpu_seconds,
    family,
    memory_mb,
    proc_name,
    rss_now_mb,
)
from benchmarks.bench_spool import Tool, pickup, say, spoold_tool

IDLE_EXIT = 30.0  # s, both daemons' worker_idle_exit
SETTINGS = f"workers: 2\nworker_idle_exit: {IDLE_EXIT:g}s\n"
#: The ``fixed`` column: this checkout's daemon with its first stay at the ceiling.
FIXED = (
    f"import sys; import spoold.run.pool as pool; pool.LINGER_FIRST = {IDLE_EXIT!r}; "
    "from spoold.app import main; sys.exit(main())"
)
SAMPLE_EVERY = 0.25  # s; PSS (smaps_rollup, dearer) every PSS_EVERY samples
PSS_EVERY = 4
REST_BOUND = 90.0  # s a pattern waits at most for both daemons to be back at rest


@dataclass(frozen=True)
class Pattern:
    name: str
    gap: float  # seconds between two jobs
    jobs: int
    tail: float  # seconds left alone after the last job


FULL = (
    Pattern("a burst, then quiet", 0.0, 4, 40.0),
    Pattern("a job every 3 s", 3.0, 10, 15.0),
    Pattern("a job every 12 s", 12.0, 10, 15.0),
    Pattern("a job every 40 s", 40.0, 4, 15.0),
)
QUICK = (
    Pattern("a burst, then quiet", 0.0, 2, 35.0),
    Pattern("a job every 12 s", 12.0, 4, 15.0),
)


@dataclass
class Watched:
    """What a sampling thread saw of one daemon while a pattern ran."""

    workers: set[int] = field(default_factory=set)
    rss: list[float] = field(default_factory=list)
    pss: list[float] = field(default_factory=list)


class Watch(Sampler):
    """Samples every daemon's processes while the block runs (one thread for all)."""

    def __init__(self, tools: dict[str, Tool]) -> None:
        super().__init__(SAMPLE_EVERY)
        self.tools = tools
        self.seen = {name: Watched() for name in tools}

    def sample(self, tick: int) -> None:
        for name, tool in self.tools.items():
            seen = self.seen[name]
            pids = family(tool.daemon)
            seen.workers.update(pid for pid in pids if proc_name(pid) == "spoold-worker")
            cpu_seconds(tool.daemon)  # an ended process counts as last seen
            seen.rss.append(rss_now_mb(tool.daemon))
            if tick % PSS_EVERY == 0:
                seen.pss.append(memory_mb(tool.daemon)[1])


def quiet_spell(tools: dict[str, Tool]) -> None:
    """Both daemons back at rest, then ``worker_idle_exit`` more: each pattern begins after a
    quiet spell, as the adaptive stay counts one (a pattern begun soon after the last one's
    processes left would find it doubled by the pattern before)."""
    end = time.monotonic() + REST_BOUND
    while time.monotonic() < end and any(len(family(t.daemon)) > 1 for t in tools.values()):
        time.sleep(0.5)
    time.sleep(IDLE_EXIT)


def run_pattern(
    tools: dict[str, Tool], pattern: Pattern, base: Path
) -> dict[str, dict[str, float]]:
    quiet_spell(tools)
    cpu = {name: cpu_seconds(tool.daemon) for name, tool in tools.items()}
    latencies: dict[str, list[float]] = {name: [] for name in tools}
    started = time.monotonic()
    with Watch(tools) as watch:
        for n in range(pattern.jobs):
            due = started + n * pattern.gap
            if (delay := due - time.monotonic()) > 0:
                time.sleep(delay)
            order = list(tools.items()) if n % 2 == 0 else list(reversed(tools.items()))
            for name, tool in order:  # the same moment for both, turn about who goes first
                job_id = f"{pattern.gap:g}s-{n}-{name}"
                latencies[name] += pickup(tool, [job_id], 0.0, base)
        time.sleep(pattern.tail)
    result = {}
    for name, tool in tools.items():
        seen = watch.seen[name]
        result[name] = {
            "worker_starts": float(len(seen.workers)),
            "cpu_s": cpu_seconds(tool.daemon) - cpu[name],
            "rss_avg_mb": statistics.fmean(seen.rss) if seen.rss else 0.0,
            "pss_avg_mb": statistics.fmean(seen.pss) if seen.pss else 0.0,
            "pickup_p50_ms": statistics.median(latencies[name]) if latencies[name] else 0.0,
            "pickup_max_ms": max(latencies[name], default=0.0),
            "seconds": time.monotonic() - started,
        }
    return result


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [
        "| pattern | worker starts | daemon CPU (s) | RSS / PSS, time-averaged (MiB) | pickup p50 / max (ms) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for pattern, by_name in results.items():
        a, f = by_name["adaptive"], by_name["fixed"]
        lines.append(
            f"| {pattern} | {a['worker_starts']:.0f} / {f['worker_starts']:.0f} "
            f"| {a['cpu_s']:.2f} / {f['cpu_s']:.2f} "
            f"| {a['rss_avg_mb']:.0f} / {a['pss_avg_mb']:.0f} against "
            f"{f['rss_avg_mb']:.0f} / {f['pss_avg_mb']:.0f} "
            f"({a['rss_avg_mb'] / f['rss_avg_mb']:.2f}x RSS) "
            f"| {a['pickup_p50_ms']:.1f} / {a['pickup_max_ms']:.0f} against "
            f"{f['pickup_p50_ms']:.1f} / {f['pickup_max_ms']:.0f} |"
        )
    return "adaptive / fixed in each cell\n" + "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two short patterns (~2 min)")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    parser.add_argument("--dir", type=Path, help="where the temporary spools go")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-linger-", dir=args.dir))
    base.chmod(0o711)  # the job user passes through to its marks
    (base / "stage").mkdir()
    (base / "archive").mkdir()
    spoold = Path(sys.executable).with_name("spoold")
    tools = {
        "adaptive": spoold_tool("adaptive", base, [str(spoold)], SETTINGS),
        "fixed": spoold_tool("fixed", base, [sys.executable, "-c", FIXED], SETTINGS),
    }
    results: dict[str, dict[str, dict[str, float]]] = {}
    try:
        for tool in tools.values():
            tool.daemon.start()
        for pattern in QUICK if args.quick else FULL:
            say(f"{pattern.name}: {pattern.jobs} job(s), then {pattern.tail:.0f} s alone")
            results[pattern.name] = run_pattern(tools, pattern, base)
            say(json.dumps(results[pattern.name]))
    finally:
        for tool in tools.values():
            with contextlib.suppress(Exception):
                tool.daemon.stop()
        shutil.rmtree(base, ignore_errors=True)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
