"""What callbacks cost: the delivery made with a state change, how fast the sender empties
outbox/ into a receiver on loopback, and what a backlog costs while its receiver is down.
Prints numbers; bounded (``--events``, ``--down``).

The last part: as many deliveries again, to a port on loopback where nothing listens (each try
refused at once), the sender left to them for ``--down`` seconds: this process's CPU over that
time (the sender's threads; nothing else runs), the tries made, and the CPU a try. A sender
that walks every waiting delivery at each post's end spends it on the backlog, not the tries.

    .venv/bin/python benchmarks/bench_callbacks.py [--events 2000] [--down 10]
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
from tests.loopback import free_port
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
    parser.add_argument("--down", type=float, default=10.0, help="seconds; 0: not measured")
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
    if args.down:
        down(args.events, args.down, args.dir)
    return 0 if sent == args.events else 1


class _Tries(logging.Handler):
    """Counts the sender's failed tries, as it logs them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "failed (" in record.getMessage()


def down(events: int, seconds: float, where: Path | None) -> None:
    clock = SystemClock()
    tries = _Tries()
    LOG.addHandler(tries)
    LOG.propagate = False  # thousands of warnings: counted, not printed
    with tempfile.TemporaryDirectory(dir=where) as temp:
        spool = Spool(Path(temp) / "spool")
        spool.init()
        callbacks = Callbacks(spool, clock, SecretStore(None), logger=LOG)
        target = CallbackTarget(f"http://127.0.0.1:{free_port()}/hook", "bench-secret")
        for n in range(events):
            with callbacks.announce(target, "succeeded", _status(f"job{n}")):
                pass
        sender = Sender(spool, callbacks, clock, CallbackSettings(), LOG)
        cpu = time.process_time()
        sender.start()
        time.sleep(seconds)
        used = time.process_time() - cpu
        sender.stop()
    made = max(tries.count, 1)
    print(
        f"receiver down, {events} deliveries waiting, {seconds:g} s: {tries.count} tries, "
        f"{100 * used / seconds:.1f} % of a core ({used * 1e3 / made:.2f} ms of CPU a try)"
    )


if __name__ == "__main__":
    sys.exit(main())
