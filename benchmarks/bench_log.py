"""What a job's output costs on its way into the log, against ``> file`` + fsync.

One job's worth of output through the objects a job's supervisor writes it with
(``spoold.run.launcher._run_unit``): a ``JobLog`` on the log opened as ``Jobs.open_log`` opens
it, with the job's ``Masker`` (none known: the common case) and ``limits.max_log_size``, fed by
``run_process`` (the pipes, ``OutputStream``), then ``summarize`` and an fsync of the log. The
baseline is the same generator with its output redirected into a file, then ``sync FILE``.
Both run in turns (pairs, the order swapped each round), so that each meets the same machine;
ratios are medians of per-round ratios.

Cases (``--cases``), each ``--size`` bytes of output:

- ``lines100``: 100-byte lines (``yes <99 x>``), the default limit (100 MiB);
- ``lines2``: 2-byte lines (``yes``), the default limit;
- ``lines100-10MB``, ``lines2-10MB``: the same with ``max_log_size`` 10 MB, hit early: what
  comes after it should cost next to nothing;
- ``lines100-nolimit``: no limit, every line written (the log is 1.3x the output);
- ``lines100-masked``: a secret known to the job's masker (never printed): every line looked
  at for it.

Printed per case: wall time of each, spoold's ratio to the baseline, the CPU time of this
process (the supervisor's share: reading, stamping, writing), of the job's processes and of the
baseline's, the log's size, and issue 23's target for the ratio where it sets one.

Usage: .venv/bin/python benchmarks/bench_log.py [--rounds R] [--size BYTES] [--cases A,B]
       [--dir DIR]   (DIR: where the files go, on the disk under test; default /var/tmp)
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from spoold.core.clock import SystemClock
from spoold.core.joblog import JobLog
from spoold.core.secrets import Masker
from spoold.run.process import run_process

_DEFAULT_LIMIT = 100 * 1024 * 1024  # spoold.core.config: limits.max_log_size's default
_LINE100 = "x" * 99  # yes adds the newline


@dataclass(frozen=True)
class Case:
    """One shape of output and the log limit it meets."""

    name: str
    line: str | None  # yes's argument; None: plain ``yes`` ("y\n")
    limit: int | None
    secrets: tuple[str, ...] = ()
    target: float | None = None  # issue 23's bound on the ratio, where it sets one


CASES = {
    case.name: case
    for case in (
        Case("lines100", _LINE100, _DEFAULT_LIMIT, target=2.0),
        Case("lines2", None, _DEFAULT_LIMIT, target=5.0),
        Case("lines100-10MB", _LINE100, 10_000_000),
        Case("lines2-10MB", None, 10_000_000),
        Case("lines100-nolimit", _LINE100, None),
        Case("lines100-masked", _LINE100, _DEFAULT_LIMIT, ("a-secret-never-printed",)),
    )
}


@dataclass(frozen=True)
class Run:
    """One measured run: wall seconds, this process's CPU, the children's CPU, bytes left."""

    wall: float
    own_cpu: float
    child_cpu: float
    size: int


def _generator(case: Case, size: int) -> str:
    yes = "yes" if case.line is None else f"yes {case.line}"
    return f"{yes} | head -c {size}"


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _baseline(case: Case, size: int, path: Path) -> Run:
    """The generator straight into a file, then ``sync FILE``."""
    script = f"{_generator(case, size)} > {path}; sync {path}"
    child, start = _cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(["/bin/sh", "-c", script], check=True)
    wall = time.perf_counter() - start
    return Run(wall, 0.0, _cpu(resource.RUSAGE_CHILDREN) - child, path.stat().st_size)


def _spoold(case: Case, size: int, path: Path) -> Run:
    """The generator as a job, its output into a log as a supervisor writes it."""
    clock = SystemClock()
    own, child = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    masker = Masker(case.secrets)
    mask = masker.mask_text if masker else None  # as the supervisor has it
    log = JobLog(open(path, "ab", buffering=0), clock, mask=mask, limit=case.limit)
    outcome = run_process(
        ["/bin/sh", "-c", _generator(case, size)], cwd=path.parent, env=dict(os.environ),
        log=log, clock=clock, timeout=None, kill_grace=1.0, cancel=threading.Event(),
    )  # fmt: skip
    log.summarize()
    log.sync()
    log.close()
    wall = time.perf_counter() - start
    assert outcome.exit_code == 0, outcome
    return Run(
        wall,
        _cpu(resource.RUSAGE_SELF) - own,
        _cpu(resource.RUSAGE_CHILDREN) - child,
        path.stat().st_size,
    )


def main() -> None:
    """Run the cases in turns and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="pairs of runs per case")
    parser.add_argument("--size", type=int, default=200_000_000, help="bytes of output a job")
    parser.add_argument("--cases", default="lines100,lines2,lines100-10MB,lines2-10MB",
                        help=f"comma-separated, of: {', '.join(CASES)}")  # fmt: skip
    parser.add_argument("--dir", default="/var/tmp", help="where the files go")
    args = parser.parse_args()
    cases = [CASES[name] for name in args.cases.split(",")]
    runs: dict[tuple[str, str], list[Run]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-log-", dir=args.dir) as name:
        directory = Path(name)
        for round_ in range(args.rounds):
            for case in cases:
                kinds = ("baseline", "spoold") if round_ % 2 == 0 else ("spoold", "baseline")
                for kind in kinds:
                    path = directory / f"{case.name}-{kind}"
                    measure = _baseline if kind == "baseline" else _spoold
                    run = measure(case, args.size, path)
                    path.unlink()  # outside the time taken: freeing blocks is slow here
                    runs.setdefault((case.name, kind), []).append(run)
                    print(f"  round {round_ + 1} {case.name:16} {kind:8} {run.wall:7.2f} s "
                          f"wall, {run.own_cpu:6.2f} s CPU here", flush=True)  # fmt: skip
    print(f"\n{args.size / 1e6:.0f} MB of output a job, {args.rounds} round(s), medians")
    print(f"{'case':16} {'baseline':>9} {'spoold':>9} {'ratio':>6} {'spoold CPU':>11} "
          f"{'job CPU':>8} {'base CPU':>9} {'log MB':>7} {'target':>7}")  # fmt: skip
    for case in cases:
        base, ours = runs[(case.name, "baseline")], runs[(case.name, "spoold")]
        ratio = statistics.median(o.wall / b.wall for o, b in zip(ours, base, strict=True))
        print(f"{case.name:16} {statistics.median(r.wall for r in base):8.2f}s "
              f"{statistics.median(r.wall for r in ours):8.2f}s {ratio:5.2f}x "
              f"{statistics.median(r.own_cpu for r in ours):10.2f}s "
              f"{statistics.median(r.child_cpu for r in ours):7.2f}s "
              f"{statistics.median(r.child_cpu for r in base):8.2f}s "
              f"{statistics.median(r.size for r in ours) / 1e6:7.1f} "
              f"{'' if case.target is None else f'<={case.target:g}x':>7}")  # fmt: skip


if __name__ == "__main__":
    main()
