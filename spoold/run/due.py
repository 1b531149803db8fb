"""Jobs in pending/ that wait for a later attempt: which are due, and when the next one is."""

from __future__ import annotations

import heapq
import threading
from collections.abc import Mapping
from typing import Any

from spoold.core.clock import Clock, parse_rfc3339


class DueJobs:
    """Job ids with the time each becomes due; thread-safe.

    A due time comes as a wall-clock time, as status.json's ``next_attempt_at`` keeps it: a
    retry's schedule outlives the process that made it, and a restarted daemon rebuilds this
    from status.json. With a ``clock``, the wait then runs on its monotonic time: when a due
    time is first seen, its deadline is ``monotonic + (due - wall now)``, at least 0 and at
    most the wait as scheduled (``longest``). A step of the wall clock after that (NTP, a VM
    resumed) neither holds a retry back for the length of the step nor cuts its backoff
    short, which is what a backoff is for: a failing backend is not hammered.

    Without a clock, the wall-clock times as given decide (``pop_due(now)``).
    """

    def __init__(self, clock: Clock | None = None) -> None:
        self._clock = clock
        self._heap: list[tuple[float, str]] = []  # (deadline, id); may hold stale entries
        #: The current (due time as given, deadline) of each id.
        self._due: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def add(self, job_id: str, due: float, *, longest: float | None = None) -> None:
        """``job_id`` becomes due at wall-clock time ``due``; ``longest``: the most it can
        still have to wait (``scheduled_wait``), which a wall clock set back since the due
        time was written cannot stretch."""
        with self._lock:
            deadline = due
            if self._clock is not None:
                wait = max(due - self._clock.now().timestamp(), 0.0)
                if longest is not None:
                    wait = min(wait, max(longest, 0.0))
                deadline = self._clock.monotonic() + wait
            self._due[job_id] = (due, deadline)
            heapq.heappush(self._heap, (deadline, job_id))

    def discard(self, job_id: str) -> None:
        with self._lock:
            self._due.pop(job_id, None)

    def due_at(self, job_id: str) -> float | None:
        """The due time ``job_id`` was added with (wall-clock), or None if it is not waiting."""
        with self._lock:
            found = self._due.get(job_id)
            return None if found is None else found[0]

    def __contains__(self, job_id: object) -> bool:
        with self._lock:
            return job_id in self._due

    def __len__(self) -> int:
        with self._lock:
            return len(self._due)

    def pop_due(self, now: float | None = None) -> list[str]:
        """Remove and return the ids due now, earliest first. ``now``: the wall-clock time,
        for one without a clock; one with a clock goes by its monotonic time alone."""
        if self._clock is not None:
            now = self._clock.monotonic()
        if now is None:
            raise TypeError("DueJobs without a clock: pop_due needs now")
        due: list[str] = []
        with self._lock:
            while self._heap and self._heap[0][0] <= now:
                deadline, job_id = heapq.heappop(self._heap)
                if (found := self._due.get(job_id)) is not None and found[1] == deadline:
                    del self._due[job_id]
                    due.append(job_id)
        return due

    def next_due(self) -> float | None:
        """When the earliest one becomes due, as a wall-clock time (with a clock: its deadline
        as seen from now), or None."""
        with self._lock:
            while self._heap and self._stale(self._heap[0]):
                heapq.heappop(self._heap)  # superseded or discarded
            if not self._heap:
                return None
            deadline = self._heap[0][0]
        if self._clock is None:
            return deadline
        return self._clock.now().timestamp() + deadline - self._clock.monotonic()

    def _stale(self, entry: tuple[float, str]) -> bool:
        found = self._due.get(entry[1])
        return found is None or found[1] != entry[0]


def scheduled_wait(status: Mapping[str, Any]) -> float | None:
    """How long a pending job's wait for its ``next_attempt_at`` was when it was scheduled:
    from the stamp written with it (its last attempt's end; a run a schedule made, its
    submission) to it. Both come from one process at one moment, so a wall clock set back
    since does not lengthen it (``DueJobs.add``'s ``longest``). None if not known."""
    attempts = status.get("attempts") or ()
    last = attempts[-1] if attempts and isinstance(attempts[-1], Mapping) else None
    since = last.get("finished_at") if last is not None else status.get("submitted_at")
    due = status.get("next_attempt_at")
    if not isinstance(since, str) or not isinstance(due, str):
        return None
    try:
        return max((parse_rfc3339(due) - parse_rfc3339(since)).total_seconds(), 0.0)
    except (ValueError, TypeError):
        return None
