"""Jobs in pending/ that wait for a later attempt: which are due, and when the next one is."""

from __future__ import annotations

import heapq
import threading


class DueJobs:
    """Job ids with the wall-clock time each becomes due; thread-safe.

    Times are wall-clock, as status.json's ``next_attempt_at`` is: a retry's schedule outlives
    the process that made it, and a restarted daemon rebuilds this from status.json.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}  # the current time of each id; the heap may hold stale
        self._lock = threading.Lock()

    def add(self, job_id: str, due: float) -> None:
        with self._lock:
            self._due[job_id] = due
            heapq.heappush(self._heap, (due, job_id))

    def discard(self, job_id: str) -> None:
        with self._lock:
            self._due.pop(job_id, None)

    def due_at(self, job_id: str) -> float | None:
        """When ``job_id`` becomes due, or None if it is not waiting."""
        with self._lock:
            return self._due.get(job_id)

    def __contains__(self, job_id: object) -> bool:
        with self._lock:
            return job_id in self._due

    def __len__(self) -> int:
        with self._lock:
            return len(self._due)

    def pop_due(self, now: float) -> list[str]:
        """Remove and return the ids due at ``now``, earliest first."""
        due: list[str] = []
        with self._lock:
            while self._heap and self._heap[0][0] <= now:
                when, job_id = heapq.heappop(self._heap)
                if self._due.get(job_id) == when:
                    del self._due[job_id]
                    due.append(job_id)
        return due

    def next_due(self) -> float | None:
        """When the earliest one becomes due, or None."""
        with self._lock:
            while self._heap and self._due.get(self._heap[0][1]) != self._heap[0][0]:
                heapq.heappop(self._heap)  # superseded or discarded
            return self._heap[0][0] if self._heap else None
