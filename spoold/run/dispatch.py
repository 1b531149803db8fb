"""Which pending job a free slot gets: the highest ``priority`` first, then the oldest, within
the concurrency limits (the config's per executor, the job's per ``concurrency.key``).

A job whose limit is full waits and lets the next one pass. ``concurrency.strategy`` decides
what a new job does when its key is busy: ``queue`` waits its turn, ``skip`` is cancelled,
``replace`` cancels the jobs of that key still waiting and waits in their place. Pure and
single-threaded: the caller holds its lock.
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class JobMeta:
    """What dispatch needs to know of a job: its executor, priority and concurrency."""

    executor: str = ""
    priority: int = 0
    key: str | None = None
    limit: int = 1
    strategy: str = "queue"

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> JobMeta:
        """From a validated job document, or from a status.json that kept these fields.

        Jobs alike share one: a flood of 10,000 queued jobs held one each.
        """
        concurrency = document.get("concurrency") or {}
        return _meta(
            str(document.get("executor") or ""),
            int(document.get("priority") or 0),
            concurrency.get("key"),
            int(concurrency.get("limit", 1)),
            str(concurrency.get("strategy", "queue")),
        )


@functools.lru_cache(maxsize=256)
def _meta(executor: str, priority: int, key: str | None, limit: int, strategy: str) -> JobMeta:
    return JobMeta(executor, priority, key, limit, strategy)


@dataclass(slots=True)
class _Waiting:
    job_id: str
    meta: JobMeta
    seq: int
    payload: Any = field(compare=False)


class DispatchQueue:
    """Pending jobs in the order they may start, and the jobs handed out, counted by limit."""

    def __init__(self, executor_limits: Mapping[str, int] | None = None) -> None:
        self._executor_limits = dict(executor_limits or {})
        self._waiting: dict[int, list[_Waiting]] = {}  # by priority, each oldest first
        self._ids: dict[str, _Waiting] = {}
        self._active: dict[str, _Waiting] = {}
        self._by_executor: Counter[str] = Counter()
        self._by_key: Counter[str] = Counter()
        self._seq = itertools.count()

    def __bool__(self) -> bool:
        return bool(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, job_id: str, meta: JobMeta, payload: Any = None) -> list[tuple[str, str]]:
        """Queue a job; return the jobs to cancel (job id, why): the new one, or those replaced."""
        cancel: list[tuple[str, str]] = []
        if meta.key is not None and meta.strategy != "queue":
            waiting = [w for w in self._ids.values() if w.meta.key == meta.key]
            busy = self._by_key[meta.key] + len(waiting)
            if busy >= meta.limit and meta.strategy == "skip":
                why = (
                    f"skipped: {busy} job(s) with concurrency key {meta.key!r} already running "
                    f"or waiting (limit {meta.limit})"
                )
                return [(job_id, why)]
            if busy >= meta.limit and meta.strategy == "replace":
                for old in sorted(waiting, key=lambda w: w.seq):
                    self._remove(old.job_id)
                    why = f"replaced by job {job_id} (concurrency key {meta.key!r})"
                    cancel.append((old.job_id, why))
        self._put(_Waiting(job_id, meta, next(self._seq), payload))
        return cancel

    def take(self) -> tuple[str, Any] | None:
        """The next job allowed to start now, marked as handed out; None if none is."""
        for priority in sorted(self._waiting, reverse=True):
            for waiting in self._waiting[priority]:
                if self._allowed(waiting.meta):
                    self._remove(waiting.job_id)
                    self._activate(waiting)
                    return waiting.job_id, waiting.payload
        return None

    def finished(self, job_id: str) -> None:
        """A job handed out is done with (ran, or was claimed elsewhere): its limits free up."""
        if (active := self._active.pop(job_id, None)) is not None:
            self._count(active.meta, -1)

    def give_back(self, job_id: str) -> None:
        """A job handed out and not started comes back, to its old place in line."""
        if (active := self._active.pop(job_id, None)) is not None:
            self._count(active.meta, -1)
            self._put(active)

    def priority_of(self, job_id: str) -> int:
        """The priority of a job waiting or handed out (0 if unknown)."""
        entry = self._ids.get(job_id) or self._active.get(job_id)
        return entry.meta.priority if entry is not None else 0

    def clear(self) -> None:
        self._waiting.clear()
        self._ids.clear()

    def _allowed(self, meta: JobMeta) -> bool:
        limit = self._executor_limits.get(meta.executor)
        if limit is not None and self._by_executor[meta.executor] >= limit:
            return False
        return meta.key is None or self._by_key[meta.key] < meta.limit

    def _put(self, waiting: _Waiting) -> None:
        line = self._waiting.setdefault(waiting.meta.priority, [])
        # Mostly appended at the end; a job given back goes back to where it stood.
        position = len(line)
        while position and line[position - 1].seq > waiting.seq:
            position -= 1
        line.insert(position, waiting)
        self._ids[waiting.job_id] = waiting

    def _remove(self, job_id: str) -> None:
        waiting = self._ids.pop(job_id)
        line = self._waiting[waiting.meta.priority]
        line.remove(waiting)
        if not line:
            del self._waiting[waiting.meta.priority]

    def _activate(self, waiting: _Waiting) -> None:
        self._active[waiting.job_id] = waiting
        self._count(waiting.meta, 1)

    def _count(self, meta: JobMeta, delta: int) -> None:
        self._by_executor[meta.executor] += delta
        if meta.key is not None:
            self._by_key[meta.key] += delta
