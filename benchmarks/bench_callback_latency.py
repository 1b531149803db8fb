"""From a job's end to its callback, through the real daemon; and what the daemon costs idle.

- latency: ``--jobs`` jobs, one at a time, each ending with ``date +%s.%N`` into a file of its
  own and calling back ``succeeded`` to a receiver on loopback: the time from that stamp to
  the POST's arrival. The delivery is committed by the worker process that ran the job, not
  by the daemon's process, whose sender must learn of it (outbox/'s watch, or a poll). After
  each callback the next job waits a random time up to twice ``--spacing`` (a second in
  all by default): a job that came right after a callback would meet a sender that had just
  looked, and a poll's wait would show as nearly a whole poll every time.
- idle: every daemon left alone ``--idle`` seconds after its worker processes have left
  (``worker_idle_exit``): the CPU of all its threads, to the nanosecond where the same
  threads ran all through (``bench_compare.QuietCpu``: utime and stime count whole clock
  ticks, 10 ms, which is 0.03 % of a core over 30 s).

``--against PYTHON``: the same daemon run by another interpreter's spoold (an older checkout
in a venv of its own) beside this one, interleaved job by job; ratios are this one's over it.

    .venv/bin/python benchmarks/bench_callback_latency.py [--jobs 60] [--idle 30]
        [--against /path/to/old/.venv/bin/python]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the project root is one up
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_compare import QuietCpu, family
from benchmarks.bench_spool import Tool, percentile, spoold_cli, spoold_tool
from tests.receiver import Receiver

SECRET = "bench-latency-secret"
RECEIPT_BOUND = 30.0  # seconds a callback may take before the run fails
LEAVE_BOUND = 60.0  # seconds the worker processes may take to leave (worker_idle_exit)


def one_job(tool: Tool, receiver: Receiver, marks: Path, job_id: str) -> float:
    """Run one job that calls back; seconds from its last command to the callback's arrival."""
    count = len(receiver.received)
    stage = tool.spool / "tmp" / f".stage-{job_id}"
    stage.write_text(
        f"job_id: {job_id}\nexecutor: local\n"
        f"product: {{commands: 'date +%s.%N > {marks}/{job_id}'}}\n"
        f"callback: {{url: '{receiver.url}', secret: {SECRET}, events: [succeeded]}}\n"
    )
    os.rename(stage, tool.incoming / f"{job_id}.yaml")
    end = time.monotonic() + RECEIPT_BOUND
    while len(receiver.received) <= count:
        if time.monotonic() > end:
            raise TimeoutError(f"{tool.name}: no callback for {job_id} in {RECEIPT_BOUND:g} s")
        time.sleep(0.0005)
    arrived = time.time()
    return arrived - float((marks / job_id).read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=60)
    parser.add_argument("--spacing", type=float, default=0.5, help="mean seconds between jobs")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds; 0: not measured")
    parser.add_argument("--against", help="another interpreter's spoold, run beside this one")
    parser.add_argument("--dir", type=Path, help="where the temporary spools go")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-cblat-", dir=args.dir))
    base.chmod(0o755)  # the jobs run as spoold's job user and write their stamps here
    marks = base / "marks"
    marks.mkdir()
    marks.chmod(0o777)
    columns = {"this": sys.executable} | ({"against": args.against} if args.against else {})
    tools = {
        name: spoold_tool(name, base, spoold_cli(python), "workers: 2\nworker_idle_exit: 5s\n")
        for name, python in columns.items()
    }  # fmt: skip
    receivers = {name: Receiver().start() for name in tools}
    draw = random.Random(4711)
    try:
        for tool in tools.values():
            tool.daemon.start()
            tool.daemon.wait_quiet()
        latency: dict[str, list[float]] = {name: [] for name in tools}
        for n in range(args.jobs):
            order = list(tools) if n % 2 == 0 else list(reversed(tools))
            for name in order:
                latency[name].append(one_job(tools[name], receivers[name], marks, f"{name}-{n}"))
                time.sleep(2 * args.spacing * draw.random())
        print(f"job's end -> its callback received ({args.jobs} jobs each, interleaved):")
        for name, values in latency.items():
            print(
                f"  {name:8s} p50 {statistics.median(values) * 1e3:7.1f} ms  "
                f"p90 {percentile(values, 90) * 1e3:7.1f} ms  max {max(values) * 1e3:7.1f} ms"
            )
        if args.against:
            ratio = statistics.median(latency["this"]) / statistics.median(latency["against"])
            print(f"  p50 ratio this/against: {ratio:.3f}x")
        if args.idle:
            idle(tools, args.idle)
    finally:
        for tool in tools.values():
            tool.daemon.stop()
        for receiver in receivers.values():
            receiver.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


def idle(tools: dict[str, Tool], seconds: float) -> None:
    """Every daemon alone at once for ``seconds``, once its worker processes have left."""
    end = time.monotonic() + LEAVE_BOUND
    while any(len(family(tool.daemon)) > 1 for tool in tools.values()):
        if time.monotonic() > end:
            raise TimeoutError("the worker processes did not leave")
        time.sleep(0.2)
    time.sleep(1.0)
    quiet = {name: QuietCpu(tool.daemon) for name, tool in tools.items()}
    started = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    used = {name: each.seconds() for name, each in quiet.items()}
    print(f"idle, {elapsed:.0f} s alone, all threads:")
    for name, (cpu, counted) in used.items():
        print(f"  {name:8s} {cpu * 1e3:6.2f} ms of CPU ({counted}) = "
              f"{100 * cpu / elapsed:.4f} % of a core")  # fmt: skip
    if used.get("against", (0.0, ""))[0]:
        print(f"  ratio this/against: {used['this'][0] / used['against'][0]:.3f}x")


if __name__ == "__main__":
    raise SystemExit(main())
