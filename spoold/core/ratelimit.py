"""A rate limit shared by processes: at most ``rate`` requests in any ``per`` seconds.

The workers that run jobs are separate processes, so the limit lives in a small file: the
times (``time.monotonic()``, one clock for the whole machine on Linux) of the last ``rate``
requests, read and written under ``fcntl.flock``. A caller takes a slot before each request;
when none is free it sleeps until the oldest one expires, within its deadline and its cancel.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from spoold.core.errors import ExecutorError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


def default_rate_dir() -> Path:
    """Where the limiters' files are unless the config says: per user, under the temp dir."""
    return Path(tempfile.gettempdir()) / f"spoold-ratelimit-{os.getuid()}"


class RateLimiter:
    """At most ``rate`` slots in any window of ``per`` (+ ``margin``) seconds, across processes.

    ``margin`` widens the window for the time a request takes to reach the server, so that two
    requests sent ``per`` seconds apart do not arrive closer than that.
    """

    def __init__(
        self,
        name: str,
        rate: int,
        per: float = 1.0,
        *,
        directory: str | Path | None = None,
        margin: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not _NAME.match(name):
            raise ValueError(f"rate limiter name {name!r} is not a plain file name")
        if rate < 1 or per <= 0:
            raise ValueError("rate must be >= 1 and per > 0")
        self.rate, self.window, self.clock = rate, per + max(0.0, margin), clock
        folder = Path(directory) if directory is not None else default_rate_dir()
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = folder / f"{name}.json"

    def acquire(
        self, cancel: threading.Event | None = None, deadline: float | None = None
    ) -> float:
        """Take a slot; returns its time (on ``clock``). Raises ExecutorError on cancel or
        deadline (``deadline`` on the same clock), retryable for the deadline."""
        event = cancel or threading.Event()
        while True:
            taken, wait = self._try_take()
            if taken is not None:
                return taken
            if event.is_set():
                raise ExecutorError("rate limit: cancelled while waiting for a slot")
            if deadline is not None:
                left = deadline - self.clock()
                if left <= 0:
                    raise ExecutorError(
                        f"rate limit: no free slot for {self.path.stem} before the deadline",
                        retryable=True,
                    )
                wait = min(wait, left)
            event.wait(min(wait, 1.0))

    def _try_take(self) -> tuple[float | None, float]:
        """Take a slot now (its time, 0.0), or (None, the seconds until one may be free)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with os.fdopen(os.dup(fd), "r+") as handle:
                now = self.clock()
                times = [t for t in _read(handle.read()) if now - self.window < t <= now]
                if len(times) >= self.rate:
                    times.sort()
                    return None, max(0.001, times[-self.rate] + self.window - now)
                times.append(now)
                handle.seek(0)
                handle.truncate()
                handle.write(json.dumps(sorted(times)[-self.rate :]))
                handle.flush()
                return now, 0.0
        finally:
            os.close(fd)  # closing releases the lock


def _read(text: str) -> list[float]:
    try:
        values = json.loads(text) if text.strip() else []
    except ValueError:  # a torn or foreign file: start afresh rather than block forever
        return []
    if not isinstance(values, list):
        return []
    return [float(v) for v in values if isinstance(v, int | float)]
