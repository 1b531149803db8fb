"""The lease heartbeat: what keeps the jobs a process claimed its own while they run.

One for every process that runs jobs: a worker process of the daemon ticks it between the
messages it gets; ``spoold exec`` ticks it on a thread of its own (``in_background``) while
its main thread runs the job.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

from spoold.core.clock import Clock
from spoold.core.outage import Outage, is_outage


class Claims(Protocol):
    """The jobs a process claimed, as the heartbeat keeps them: spoold.run.worker.JobRunner."""

    def check_cancels(self) -> object: ...

    def renew_leases(self) -> object: ...

    def retry_finishing(self) -> object: ...


class LeaseHeartbeat:
    """Leases renewed (and outcomes not recorded yet tried again) every ``every`` seconds;
    cancel requests looked for every ``look`` seconds. Time is passed in; the caller waits.

    Cancel requests are files (they must work across hosts and restarts): looked for while
    jobs run, as often as a polling watcher looks at incoming/.
    """

    def __init__(
        self, runner: Claims, *, every: float, look: float, now: float,
        logger: logging.Logger | None = None,
    ) -> None:  # fmt: skip
        self._logger = logger or logging.getLogger("spoold")
        self._outage = Outage(self._logger, "lease heartbeat")
        self._runner = runner
        self._every = every
        self._look = look
        self._next_beat = now + every
        self._next_look = now + look

    def restart(self, now: float) -> None:
        """Count both periods from ``now`` (nothing ran meanwhile: nothing was due)."""
        self._next_beat, self._next_look = now + self._every, now + self._look

    @property
    def next_due(self) -> float:
        """When ``tick`` has work next, on the clock ``now`` is read from."""
        return min(self._next_beat, self._next_look)

    def tick(self, now: float) -> float:
        """Do what is due at ``now``; return when the next tick is due."""
        if now >= self._next_look:
            self._duty(self._runner.check_cancels)
            self._next_look = now + self._look
        if now >= self._next_beat:
            self._duty(self._runner.renew_leases)
            self._duty(self._runner.retry_finishing)
            self._next_beat = now + self._every
        return self.next_due

    def _duty(self, duty: Callable[[], object]) -> None:
        """One duty; a spool that cannot be reached (a shared one cut off: EIO) is said once,
        and tried again at the next tick: the process that runs the jobs goes on."""
        try:
            duty()
        except OSError as exc:  # the process that runs the jobs goes on, whatever it was
            if is_outage(exc):
                self._outage.failed(exc)
            else:
                self._logger.warning("lease heartbeat: %s; trying again", exc)
            return
        self._outage.ok()

    @contextlib.contextmanager
    def in_background(self, clock: Clock) -> Iterator[None]:
        """Tick on a thread of its own, on ``clock``, until the block is left."""
        stop = threading.Event()

        def keep() -> None:
            while not stop.wait(max(self.next_due - clock.monotonic(), 0.0)):
                self.tick(clock.monotonic())

        thread = threading.Thread(target=keep, name="spoold-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
