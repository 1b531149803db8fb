"""Throughput and pickup latency with 1, 2 and 3 hosts on one shared spool, beside one host on
a local spool (SPEC section 11).

The shared spool is served by a real sshd and mounted with sshfs by each host from its own
network namespace (tests/netbed.py, the multi-host tests' bed); the local one is a directory
on this machine's disk, watched with inotify. Every host runs ``workers`` workers. In each round
every setup runs once, in a rotated order (the machine is shared and noisy: trust the ratios):

- throughput: ``--jobs`` jobs that run ``true``, renamed into ``incoming/`` at once, from the
  first drop to the last job in ``done/``;
- pickup latency: ``--drops`` drops spaced 100 ms, from the rename into ``incoming/`` to the
  job's shell having started (it writes ``date +%s.%N`` into a file named after its id).

    .venv/bin/python benchmarks/bench_hosts.py [--rounds 3] [--jobs 300] [--drops 30]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

if __package__ in (None, ""):  # run as a script: the checkout's tests/ holds the bed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import DaemonProcess, run_cli, wait_for, write_config
from tests.netbed import Bed, make_bed

BOUND = 300.0  # a ceiling for one measurement, not a measurement
SETUPS = ("local, 1 host", "shared, 1 host", "shared, 2 hosts", "shared, 3 hosts")


def _drop(spool: Path, job_id: str, commands: str) -> None:
    """As a backend does on the file server: written aside, renamed into place."""
    document = {"job_id": job_id, "executor": "local", "product": {"commands": commands}}
    temporary = spool / "incoming" / f".{job_id}.part"
    temporary.write_text(yaml.safe_dump(document))
    os.rename(temporary, spool / "incoming" / f"{job_id}.yaml")


def _done(spool: Path, prefix: str) -> int:
    return sum(name.startswith(prefix) for name in os.listdir(spool / "done"))


class Setup:
    """One way of serving a spool: its daemons start and stop around each measurement."""

    def __init__(self, name: str, spool: Path, start: Callable[[], Callable[[], None]]) -> None:
        self.name = name
        self.spool = spool  # where the test drops and looks: the server's side when shared
        self._start = start

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        stop = self._start()
        try:
            yield
        finally:
            stop()


def _config(path: Path, spool: Path, workers: int, **extra: Any) -> Path:
    return write_config(path, spool, workers=workers, settle_time="0.1s", fsync=True, **extra)


def _setups(bed: Bed, base: Path, workers: int) -> list[Setup]:
    local = base / "local-spool"
    assert run_cli(local, "init").returncode == 0
    assert run_cli(bed.server_spool, "init").returncode == 0
    local_config = _config(base / "local.yaml", local, workers, watch="inotify")

    def start_local() -> Callable[[], None]:
        daemon = DaemonProcess(local, local_config)
        daemon.start()
        return lambda: (daemon.stop(), None)[1]

    def start_shared(count: int) -> Callable[[], Callable[[], None]]:
        def start() -> Callable[[], None]:
            hosts = bed.hosts[:count]
            for host in hosts:
                config = _config(base / f"{host.name}.yaml", host.spool, workers, watch="poll",
                                 poll_interval="100ms", heartbeat_interval="1s")  # fmt: skip
                host.start_daemon(config)

            def stop() -> None:
                for host in hosts:
                    if host.daemon is not None:
                        host.daemon.stop()

            return stop

        return start

    return [Setup(SETUPS[0], local, start_local)] + [
        Setup(SETUPS[n], bed.server_spool, start_shared(n)) for n in (1, 2, 3)
    ]


def throughput(setup: Setup, jobs: int, tag: str) -> float:
    """Jobs per second, from the first drop to the last job in done/."""
    prefix = f"t{tag}-"
    with setup.running():
        started = time.monotonic()
        for n in range(jobs):
            _drop(setup.spool, f"{prefix}{n:05d}", "true")
        wait_for(lambda: _done(setup.spool, prefix) >= jobs, bound=BOUND, what=f"{jobs} done")
        return jobs / (time.monotonic() - started)


def pickup(setup: Setup, drops: int, tag: str, marks: Path) -> list[float]:
    """Milliseconds from each drop to its job's shell started."""
    prefix = f"p{tag}-"
    dropped: dict[str, float] = {}
    with setup.running():
        for n in range(drops):
            job_id = f"{prefix}{n:04d}"
            dropped[job_id] = time.time()
            _drop(setup.spool, job_id, f'date +%s.%N > "{marks}/$SPOOLD_JOB_ID"')
            time.sleep(0.1)
        wait_for(lambda: _done(setup.spool, prefix) >= drops, bound=BOUND, what="the drops")
    return [(float((marks / job_id).read_text()) - when) * 1000 for job_id, when in
            dropped.items()]  # fmt: skip


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(share * len(ordered)), len(ordered) - 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--drops", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2, help="per host")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    rates: dict[str, list[float]] = {name: [] for name in SETUPS}
    ratios: dict[str, list[float]] = {name: [] for name in SETUPS}
    latencies: dict[str, list[float]] = {name: [] for name in SETUPS}
    with make_bed(hosts=3) as bed, tempfile.TemporaryDirectory(prefix="bench-hosts-") as tmp:
        base = Path(tmp)
        base.chmod(0o755)
        marks = base / "marks"
        marks.mkdir(mode=0o777)
        marks.chmod(0o777)  # the jobs run as the job user
        setups = _setups(bed, base, args.workers)
        for round_ in range(args.rounds):
            order = setups[round_ % len(setups) :] + setups[: round_ % len(setups)]
            this_round: dict[str, float] = {}
            for setup in order:
                tag = f"{round_}{SETUPS.index(setup.name)}"
                this_round[setup.name] = throughput(setup, args.jobs, tag)
                latencies[setup.name] += pickup(setup, args.drops, tag, marks)
                print(f"round {round_ + 1}: {setup.name}: {this_round[setup.name]:.1f} jobs/s",
                      file=sys.stderr, flush=True)  # fmt: skip
            for name, rate in this_round.items():
                rates[name].append(rate)
                ratios[name].append(rate / this_round[SETUPS[0]])
    summary = {
        name: {
            "jobs_per_s": round(statistics.median(rates[name]), 1),
            "vs_local": round(statistics.median(ratios[name]), 2),
            "pickup_ms_p50": round(statistics.median(latencies[name]), 1),
            "pickup_ms_p95": round(_percentile(latencies[name], 0.95), 1),
        }
        for name in SETUPS
    }
    print(f"{args.rounds} rounds, {args.jobs} jobs for throughput, {args.drops} drops for "
          f"pickup, {args.workers} workers per host")  # fmt: skip
    print(f"{'setup':<18} {'jobs/s':>8} {'vs local':>9} {'pickup p50':>11} {'p95':>8}")
    for name, row in summary.items():
        print(f"{name:<18} {row['jobs_per_s']:>8} {row['vs_local']:>8}x "
              f"{row['pickup_ms_p50']:>9} ms {row['pickup_ms_p95']:>5} ms")  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
