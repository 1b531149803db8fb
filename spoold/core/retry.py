"""When a failed attempt is tried again, and after how long: pure functions of the job's fields.

``retries: 3`` alone backs off exponentially (10 s, 20 s, 40 s, at most 10 min): retries that
hammer a struggling backend are the failure users leave job runners over. ``backoff: 30s`` is a
fixed wait; ``backoff: {initial, max, multiplier, jitter}`` shapes the curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from spoold.core.units import parse_duration

DEFAULT_INITIAL = 10.0
DEFAULT_MULTIPLIER = 2.0
DEFAULT_MAX = 600.0


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` attempts after the first, each ``delay()`` after the previous one ended."""

    retries: int = 0
    initial: float = DEFAULT_INITIAL
    multiplier: float = DEFAULT_MULTIPLIER
    maximum: float = DEFAULT_MAX
    jitter: bool = False
    retry_on: frozenset[int] | None = None  # None: every failure

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> RetryPolicy:
        """From a job's (or a step's) validated ``retries``, ``backoff`` and ``retry_on``."""
        retries = int(document.get("retries") or 0)
        retry_on = document.get("retry_on")
        codes = None if retry_on is None else frozenset(int(code) for code in retry_on)
        backoff = document.get("backoff")
        if backoff is None:
            return cls(retries, retry_on=codes)
        if not isinstance(backoff, Mapping):  # a plain duration: the same wait every time
            wait = parse_duration(backoff)
            return cls(retries, initial=wait, multiplier=1.0, maximum=wait, retry_on=codes)
        initial = parse_duration(backoff.get("initial", DEFAULT_INITIAL))
        maximum = backoff.get("max")
        return cls(
            retries,
            initial=initial,
            multiplier=float(backoff.get("multiplier", DEFAULT_MULTIPLIER)),
            # An initial wait above the default ceiling must not be cut down to it.
            maximum=max(initial, DEFAULT_MAX) if maximum is None else parse_duration(maximum),
            jitter=bool(backoff.get("jitter", False)),
            retry_on=codes,
        )

    def should_retry(self, attempt: int, exit_code: int | None) -> bool:
        """Whether attempt number ``attempt`` (1 is the first), which failed, gets another.

        With ``retry_on``, only those exit codes are retried: a failure without one (a
        timeout, an executor that could not start) is then final.
        """
        if attempt > self.retries:
            return False
        return self.retry_on is None or exit_code in self.retry_on

    def delay(self, attempt: int, random: Callable[[], float]) -> float:
        """Seconds to wait after failed attempt ``attempt`` before the next one.

        ``random`` returns a float in [0, 1); with ``jitter`` the wait is spread over
        [delay/2, delay), so that jobs failing together do not all come back together.
        """
        try:
            grown = self.initial * self.multiplier ** (attempt - 1)
        except OverflowError:  # retries: 5000 with a multiplier of 10
            grown = math.inf
        wait = min(grown, self.maximum)
        if self.jitter:
            wait = wait / 2 + random() * wait / 2
        return wait

    @property
    def attempts(self) -> int:
        """How many attempts there can be in all."""
        return self.retries + 1
