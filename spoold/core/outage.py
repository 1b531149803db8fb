"""A spool that cannot be reached, said once rather than at every try.

A shared spool cut off from this host (sshfs or NFS after a partition) answers every operation
with EIO or ENOTCONN until it is back. Each periodic part of spoold (the daemon's duties,
intake, the callback sender, the worker slots, the lease heartbeat) tries again at its next
round; without this, each round would log a traceback: hundreds a minute, hiding what else
happened. Other errors are not outages and are left to their caller.

Its return is said once too. While a mount is cut off, some operations still work (one that
needs no round trip to the server, one answered from the kernel's cache): a part whose round
runs several operations (the daemon's duties every 200 ms) sees successes between the
failures. Said at the first success, the return flapped with the cut every round (34 pairs in
8 s, the link still down). So the return is said only once the part has seen ``rounds``
successes in a row and no failure for ``quiet`` seconds by its monotonic clock.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable

__all__ = ["RETURN_QUIET", "RETURN_ROUNDS", "Outage", "is_outage"]

#: What a network filesystem answers while its server cannot be reached.
_UNREACHABLE = frozenset({
    errno.EIO, errno.ENOTCONN, errno.ESTALE, errno.ETIMEDOUT, errno.EHOSTUNREACH,
    errno.ENETUNREACH, errno.ECONNRESET, errno.ECONNABORTED, errno.EHOSTDOWN,
})  # fmt: skip
#: How many successes in a row, and how long without a failure (seconds), before the spool is
#: said to be back. The quiet period is longer than the slowest duty that reaches the server
#: (the host's beat and the lease heartbeat, every ``heartbeat_interval``: 10 s by default),
#: so that one has worked too; the count keeps a part whose single duty fails and works by
#: turns from calling the spool back at each success. A return is said late, never the work
#: done late: nothing waits for this.
RETURN_ROUNDS = 3
RETURN_QUIET = 15.0


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the spool cannot be reached (rather than that something is wrong)."""
    return isinstance(exc, OSError) and exc.errno in _UNREACHABLE


class Outage:
    """One part's view of whether the spool can be reached: its first failure, and its return,
    are logged; the failures in between are not."""

    def __init__(
        self, logger: logging.Logger, part: str, *,
        monotonic: Callable[[], float] = time.monotonic,
        rounds: int = RETURN_ROUNDS, quiet: float = RETURN_QUIET,
    ) -> None:  # fmt: skip
        """``monotonic``: the clock the quiet period is measured by (a test passes a fake)."""
        self._logger = logger
        self._part = part
        self._monotonic = monotonic
        self._rounds = rounds
        self._quiet = quiet
        self._errno: int | None = None
        self._last_failure = 0.0  # when the last failure was seen (monotonic)
        self._good = 0  # successes since then

    def failed(self, exc: OSError) -> None:
        """An operation failed with an outage's error: said if it is news (the first failure,
        or another errno); a failure between successes of an outage not yet over is not."""
        if exc.errno != self._errno:
            self._logger.warning("%s: the spool cannot be reached (%s); trying again",
                                 self._part, exc)  # fmt: skip
        self._errno = exc.errno
        self._last_failure = self._monotonic()
        self._good = 0

    def call(self, duty: Callable[[], object], failure: str) -> None:
        """Run ``duty``: an outage is said once; any other failure is logged with its
        traceback as ``failure``; either way the caller goes on."""
        try:
            duty()
        except Exception as exc:
            if isinstance(exc, OSError) and is_outage(exc):
                self.failed(exc)
            else:
                self._logger.exception("%s", failure)
            return
        self.ok()

    def ok(self) -> None:
        """An operation worked: the spool is said to be back (once) when it could not be
        reached before and this is the ``rounds``-th success in a row, ``quiet`` seconds or
        more after the last failure. One success alone proves little during a cut."""
        if self._errno is None:
            return
        self._good += 1
        if self._good < self._rounds or self._monotonic() - self._last_failure < self._quiet:
            return
        self._errno = None
        self._good = 0
        self._logger.warning("%s: the spool can be reached again", self._part)
