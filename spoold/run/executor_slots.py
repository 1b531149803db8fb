"""Slots of an executor for jobs' steps: ``limits.executors`` holds across every job a daemon
runs, steps included, as a vendor's rate limit does.

Dispatch counts a job without steps against its executor's limit as it hands the job out. A job
with steps takes no slot as a whole: each try of each step takes one of its own executor's slots
(``claim``) and gives it back as the try ends, or as the step stops waiting for it (a cancel,
the job's timeout). A step waiting for a slot goes before any job of that executor not yet
started: it holds a worker slot already.

In a worker process the main process counts the slots with its jobs (``LinkedSlots``, in
spoold.run.pool); a runner with no daemon above it (``spoold exec``, tests) counts its own
(``LocalSlots``). Both count with the same rules: spoold.run.dispatch's.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Mapping
from typing import Protocol

from spoold.run.dispatch import DispatchQueue, SlotKey


class Ticket:
    """A step's claim on a slot of its executor: ``granted`` is set once it has one. Give it
    back as the try ends, or when the step stops waiting for it (once; again is nothing)."""

    __slots__ = ("_give_back", "granted")

    def __init__(self, give_back: Callable[[], None] | None = None) -> None:
        self.granted = threading.Event()
        self._give_back = give_back

    def give_back(self) -> None:
        give_back, self._give_back = self._give_back, None
        if give_back is not None:
            give_back()


def free_ticket() -> Ticket:
    """The ticket of an executor without a limit: granted, nothing to give back."""
    ticket = Ticket()
    ticket.granted.set()
    return ticket


class ExecutorSlots(Protocol):
    """Where the steps of a runner's jobs take their executors' slots."""

    def stepping(self, job_id: str) -> None:
        """A job's steps start: the job holds no slot of its own executor (they do)."""

    def claim(self, executor: str, *, running: bool = False) -> Ticket:
        """A slot of ``executor`` for one try of a step; ``running``: the step runs already
        (adopted): it has one at once, whatever the limit."""


class LocalSlots:
    """Slots counted in this process, across the jobs of the runners that share it."""

    def __init__(self, limits: Mapping[str, int]) -> None:
        self._limits = dict(limits)
        self._queue = DispatchQueue(limits)
        self._lock = threading.Lock()
        self._tickets: dict[SlotKey, Ticket] = {}
        self._tokens = itertools.count()

    def stepping(self, job_id: str) -> None:
        pass  # no job of this process is counted by its executor: only steps are, here

    def claim(self, executor: str, *, running: bool = False) -> Ticket:
        if executor not in self._limits:
            return free_ticket()
        key = (0, 0, str(next(self._tokens)))
        ticket = Ticket(lambda: self._free(key))
        with self._lock:
            self._tickets[key] = ticket
            if self._queue.want_slot(key, executor, running=running):
                ticket.granted.set()
        return ticket

    def _free(self, key: SlotKey) -> None:
        with self._lock:
            del self._tickets[key]
            self._queue.free_slot(key)
            for granted in self._queue.granted():
                self._tickets[granted].granted.set()
