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
        self, name: str, decide: Callable[[], None], send: Callable[[], None], workers: int
    ) -> None:
        self.work: queue.Queue[T | None] = queue.Queue()
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
        """Once the deciding loop was told to stop: no more sends; those under way end on
        their own (within their timeout). Nothing to do if never started."""
        if not self._threads:
            return
        for _ in range(self._workers):
            self.work.put(None)
        self._threads[0].join()
