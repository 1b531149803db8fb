"""How long the light commands of ``spoold`` take to start and answer: ``--version``,
``status ID`` and ``list`` against a small spool, with ``python -c pass`` as the floor.

Prints the median of ``--runs`` runs of each, in wall time and in CPU time (user + system of
the child: the steadier number on a shared machine). Numbers, not asserts. Byte code is
written to (and read from) a temporary PYTHONPYCACHEPREFIX, warmed by one run of each
command, as an installed spoold has it (the package compiles its modules at install); with
``--no-bytecode`` every run compiles the sources, as under PYTHONDONTWRITEBYTECODE.

    .venv/bin/python benchmarks/bench_cli_start.py [--runs 15]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JOB = "job_id: bench-1\nexecutor: local\nproduct: {commands: 'true'}\n"


def _spoold() -> list[str]:
    """The console script beside this interpreter (what users run), else ``python -m spoold``."""
    script = Path(sys.executable).with_name("spoold")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "spoold"]


def _timed(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) of one run; the command must succeed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, timeout=60)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=15, help="runs of each command (median)")
    parser.add_argument("--no-bytecode", action="store_true", help="compile on every run")
    args = parser.parse_args()
    spoold = _spoold()
    top = Path(tempfile.mkdtemp(prefix="spoold-bench-cli-"))
    try:
        spool = top / "spool"
        env = {**os.environ, "SPOOLD_SPOOL": str(spool)}
        if args.no_bytecode:
            env["PYTHONDONTWRITEBYTECODE"] = "1"
        else:
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = str(top / "pycache")
        subprocess.run([*spoold, "init"], env=env, check=True, stdout=subprocess.DEVNULL)
        (top / "job.yaml").write_text(JOB)
        subprocess.run([*spoold, "exec", str(top / "job.yaml")], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)  # fmt: skip
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "spoold --version": [*spoold, "--version"],
            "spoold status ID": [*spoold, "status", "bench-1"],
            "spoold list": [*spoold, "list"],
        }
        print(f"{'command':<20} {'wall (median)':>14} {'cpu (median)':>14}   runs: {args.runs}")
        for name, command in commands.items():
            _timed(command, env)  # byte code written, caches warm
            runs = [_timed(command, env) for _ in range(args.runs)]
            wall = statistics.median(r[0] for r in runs)
            cpu = statistics.median(r[1] for r in runs)
            print(f"{name:<20} {wall * 1000:>11.1f} ms {cpu * 1000:>11.1f} ms")
    finally:
        shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
