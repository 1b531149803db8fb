"""What callbacks cost: the delivery made with a state change, how fast the sender empties
outbox/ into a receiver on loopback, and what a backlog costs while its receiver is down.
Prints numbers; bounded (``--events``, ``--down``).

The next part: as many deliveries again, to a port on loopback where nothing listens (each try
refused at once), the sender left to them for ``--down`` seconds: this process's CPU over that
time (the sender's threads; nothing else runs), the tries made, and the CPU a try. A sender
that walks every waiting delivery at each post's end spends it on the backlog, not the tries.

The last part (``--held``): a chat webhook down while that many jobs failed, each with a
notification for it. The notifier and the sender run as the daemon runs them; once the first
try has been refused (the next is 10 minutes away) and outbox/ has stood still for
``SETTLE`` seconds, this process's CPU over ``--down`` seconds: what the held notices cost
while nothing can be done for them.

    .venv/bin/python benchmarks/bench_callbacks.py [--events 2000] [--down 10] [--held 10000]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the project root is one up
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spoold.core.clock import SystemClock
from spoold.core.config import NotifySettings, NotifyTarget
from spoold.core.job import JobStatus
from spoold.core.secrets import SecretStore
from spoold.core.spool import Spool
from spoold.core.spool.fs import SETTLE
from spoold.core.states import JobState
from spoold.out.notices import Notices
from spoold.out.notify import Notifier
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
    parser.add_argument("--held", type=int, default=10000, help="notices; 0: not measured")
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
    if args.down and args.held:
        held(args.held, args.down, args.dir)
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


def held(notices: int, seconds: float, where: Path | None) -> None:
    clock = SystemClock()
    tries = _Tries()
    LOG.addHandler(tries)
    LOG.propagate = False
    settings = NotifySettings(window=300.0, wait=0.0)
    sending = CallbackSettings(initial=1200.0)  # jittered into [600, 1200): none due meanwhile
    with tempfile.TemporaryDirectory(dir=where) as temp:
        spool = Spool(Path(temp) / "spool")
        spool.init()
        callbacks = Callbacks(spool, clock, SecretStore(None), logger=LOG,
                              notices=Notices(settings, hostname="bench"))  # fmt: skip
        target = NotifyTarget("webhook", url=f"http://127.0.0.1:{free_port()}/hook",
                              format="slack", on=frozenset({"failed"}))  # fmt: skip
        for n in range(notices):
            job = spool.dir("running") / f"job{n}"
            job.mkdir()
            (job / "log").write_text("")
            status = _status(f"job{n}")
            status.state = JobState.FAILED
            with callbacks.announce(CallbackTarget(None, "", notify=(target,)), "failed", status):
                (job / "status.json").write_text(json.dumps(status.to_dict()))
        notifier = Notifier(spool, callbacks, clock, settings=settings, sending=sending,
                            secrets=SecretStore(None), logger=LOG)  # fmt: skip
        sender = Sender(spool, callbacks, clock, sending, LOG)
        notifier.start()
        sender.start()
        deadline = time.monotonic() + 600  # bounded: a notifier that never tries fails the run
        while tries.count < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(SETTLE + 1.0)  # every notice rewritten by the refusal; then outbox/ settles
        cpu = time.process_time()
        time.sleep(seconds)
        used = time.process_time() - cpu
        notifier.stop()
        sender.stop()
    print(
        f"webhook down, {notices} notices held, {seconds:g} s after the first try: "
        f"{100 * used / seconds:.2f} % of a core ({tries.count} tries)"
    )


if __name__ == "__main__":
    sys.exit(main())
