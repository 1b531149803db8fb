"""What callbacks cost: the delivery made with a state change, and how fast the sender empties
outbox/ into a receiver on loopback. Prints numbers; bounded (``--events``).

    .venv/bin/python benchmarks/bench_callbacks.py [--events 2000]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the project root is one up
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spoold.core.clock import SystemClock
from spoold.core.job import JobStatus
from spoold.core.secrets import SecretStore
from spoold.core.spool import Spool
from spoold.core.states import JobState
from spoold.out.outbox import Callbacks, CallbackTarget
from spoold.out.sender import CallbackSettings, Sender
from tests.receiver import Receiver

LOG = logging.getLogger("bench")


def _status(job_id: str) -> JobStatus:
    return JobStatus(
        job_id=job_id, state=JobState.SUCCEEDED, executor="local", type=None,
        submitted_at="2026-11-22T12:00:00Z", source=None,
    )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--dir", type=Path, help="where the temporary spool goes")
    args = parser.parse_args()
    clock = SystemClock()
    with tempfile.TemporaryDirectory(dir=args.dir) as temp:
        spool = Spool(Path(temp) / "spool")
        spool.init()
        callbacks = Callbacks(spool, clock, SecretStore(None), logger=LOG)
        receiver = Receiver().start()
        target = CallbackTarget(receiver.url, "bench-secret")
        costs = []
        for n in range(args.events):  # one event for each of as many jobs: keys in parallel
            started = time.perf_counter()
            with callbacks.announce(target, "succeeded", _status(f"job{n}")):
                pass
            costs.append(time.perf_counter() - started)
        settings = CallbackSettings()
        sender = Sender(spool, callbacks, clock, settings, LOG, poll_interval=0.05)
        started = time.perf_counter()
        sender.start()
        deadline = started + 600  # bounded: a sender that stalls fails the run
        while len(receiver.received) < args.events and time.perf_counter() < deadline:
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
        sender.stop()
        receiver.stop()
        sent = len(receiver.received)
    costs.sort()
    print(f"events: {args.events}, delivered: {sent}")
    print(
        "delivery made with a state change (prepare + commit, 2 fsyncs): "
        f"p50 {statistics.median(costs) * 1e3:.2f} ms, "
        f"p99 {costs[int(len(costs) * 0.99) - 1] * 1e3:.2f} ms"
    )
    print(
        f"sender into a loopback receiver ({settings.workers} workers, per_host "
        f"{settings.per_host}): {sent / elapsed:.0f} deliveries/s"
    )
    return 0 if sent == args.events else 1


if __name__ == "__main__":
    sys.exit(main())
