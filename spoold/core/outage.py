"""A spool that cannot be reached, said once rather than at every try.

A shared spool cut off from this host (sshfs or NFS after a partition) answers every operation
with EIO or ENOTCONN until it is back. Each periodic part of spoold (the daemon's duties,
intake, the callback sender, the worker slots, the lease heartbeat) tries again at its next
round; without this, each round would log a traceback: hundreds a minute, hiding what else
happened. Other errors are not outages and are left to their caller.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

__all__ = ["Outage", "is_outage"]

#: What a network filesystem answers while its server cannot be reached.
_UNREACHABLE = frozenset({
    errno.EIO, errno.ENOTCONN, errno.ESTALE, errno.ETIMEDOUT, errno.EHOSTUNREACH,
    errno.ENETUNREACH, errno.ECONNRESET, errno.ECONNABORTED, errno.EHOSTDOWN,
})  # fmt: skip


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the spool cannot be reached (rather than that something is wrong)."""
    return isinstance(exc, OSError) and exc.errno in _UNREACHABLE


class Outage:
    """One part's view of whether the spool can be reached: its first failure, and its return,
    are logged; the failures in between are not."""

    def __init__(self, logger: logging.Logger, part: str) -> None:
        self._logger = logger
        self._part = part
        self._errno: int | None = None

    def failed(self, exc: OSError) -> None:
        """An operation failed with an outage's error: said if it is news."""
        if exc.errno != self._errno:
            self._logger.warning("%s: the spool cannot be reached (%s); trying again",
                                 self._part, exc)  # fmt: skip
        self._errno = exc.errno

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
        """An operation worked: said if the spool could not be reached before."""
        if self._errno is not None:
            self._errno = None
            self._logger.warning("%s: the spool can be reached again", self._part)
