"""How long a value written by another host has stood still, by this host's own clock.

Hosts sharing a spool judge each other by counters, never by timestamps: a counter that one
host advances and another reads tells the reader only "changed" or "not changed since I last
looked". How long it has not changed is measured on the reader's monotonic clock, from the
first time the reader saw that value. So no host's clock is compared with another's: a host
whose wall clock is an hour off either way is judged as fast as any other (SPEC section 11).

The price: a reader that just started has seen nothing yet, so it waits a full timeout before
it calls anything stale. Pure, no I/O; time is passed in.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

__all__ = ["Sightings"]

K = TypeVar("K", bound=Hashable)


class Sightings(Generic[K]):
    """For each key, the last value seen and the monotonic time it was first seen at."""

    def __init__(self) -> None:
        self._seen: dict[K, tuple[Hashable, float]] = {}

    def unchanged_for(self, key: K, value: Hashable, now: float) -> float:
        """Record ``value`` seen for ``key`` at ``now``; return how long it has stood still
        (0.0 when it is new or changed)."""
        seen = self._seen.get(key)
        if seen is None or seen[0] != value:
            self._seen[key] = (value, now)
            return 0.0
        return now - seen[1]

    def forget(self, key: K) -> None:
        """Drop what is known of ``key`` (it is gone: a finished job, a removed host)."""
        self._seen.pop(key, None)

    def keep_only(self, keys: Iterable[K]) -> None:
        """Forget every key not in ``keys``: what no longer exists is not watched."""
        alive = set(keys)
        for key in [k for k in self._seen if k not in alive]:
            del self._seen[key]

    def __len__(self) -> int:
        return len(self._seen)
