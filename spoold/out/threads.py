"""The threads of an outbox sender: one that decides what is due, and a few that send it,
fed by a queue and each stopped by a ``None`` in it (callbacks and notifications alike)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SenderThreads(Generic[T]):
    """``decide`` on one thread; ``send`` on ``workers`` threads, each taking from ``work``
    until it takes ``None``."""

    def __init__(
        self, name: str, decide: Callable[[], None], send: Callable[[], None], workers: int,
        *, stopping: threading.Event, wake: threading.Event,
    ) -> None:  # fmt: skip
        """``stopping`` and ``wake``: what the deciding loop watches (``stop`` sets both)."""
        self.work: queue.Queue[T | None] = queue.Queue()
        self._stopping, self._wake = stopping, wake
        self._name, self._decide, self._send, self._workers = name, decide, send, workers
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._decide, name=self._name, daemon=True)]
        self._threads += [
            threading.Thread(target=self._send, name=f"{self._name}-{n}", daemon=True)
            for n in range(self._workers)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """No more sends; those under way end on their own (within their timeout)."""
        self._stopping.set()
        self._wake.set()
        if not self._threads:  # never started (the daemon failed before)
            return
        for _ in range(self._workers):
            self.work.put(None)
        self._threads[0].join()
