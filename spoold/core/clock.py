"""Time as a dependency: production code asks a Clock, tests pass a fake one."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    """Wall-clock time for timestamps, monotonic time for deadlines."""

    def now(self) -> datetime:
        """The current time, timezone-aware, in UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


def rfc3339(moment: datetime) -> str:
    """RFC 3339 in UTC with microseconds and a Z, as status.json and log lines use."""
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    # %-formatting of the fields: twice as fast as isoformat, and this runs for every log line.
    m = moment
    return "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ" % (  # noqa: UP031
        m.year, m.month, m.day, m.hour, m.minute, m.second, m.microsecond,
    )  # fmt: skip


def parse_rfc3339(text: str) -> datetime:
    """Parse what rfc3339() wrote."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
