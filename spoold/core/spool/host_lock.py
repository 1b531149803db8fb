"""tmp/daemon-<host>.lock: one daemon per host and spool.

The daemon holds an flock on the file for its lifetime and writes into it its pid and start
time, for ``spoold retry`` and ``spoold status`` to find it (and wake it with SIGUSR1). The
kernel drops the lock with the process: no stale lock survives a crash.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from spoold.core.errors import SpoolError
from spoold.core.procfs import process_start_time

__all__ = ["HostLock"]


class HostLock:
    """The per-host daemon lock in tmp/."""

    def __init__(self, root: Path, dirs: Mapping[str, str]) -> None:
        self._root = root
        self._dirs = dirs

    def acquire(self, host: str) -> IO[bytes]:
        """Hold the per-host daemon lock; raise SpoolError if another daemon here holds it."""
        path = Path(self._dirs["tmp"], f"daemon-{host}.lock")
        handle = open(path, "ab")  # noqa: SIM115 - held for the daemon's lifetime
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            handle.close()
            raise SpoolError(f"another spoold on {host} already runs on {self._root}") from exc
        # Who holds it, for `spoold retry` to wake this daemon with SIGUSR1.
        os.truncate(handle.fileno(), 0)
        os.write(handle.fileno(), f"{os.getpid()} {process_start_time(os.getpid())}\n".encode())
        return handle

    def hosts(self) -> list[str]:
        """The hosts that have run a daemon on this spool (each left its lock file)."""
        names = os.listdir(self._dirs["tmp"])
        return sorted(n[len("daemon-") : -len(".lock")] for n in names
                      if n.startswith("daemon-") and n.endswith(".lock"))  # fmt: skip

    def daemon_on(self, host: str) -> tuple[int, int] | None:
        """(pid, start time) of the daemon holding the lock on ``host``, or None if none does."""
        path = Path(self._dirs["tmp"], f"daemon-{host}.lock")
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return None
        with handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # held: a daemon runs, and the file says which
                fields = handle.read(100).split()
                if len(fields) == 2 and all(f.isdigit() for f in fields):
                    return int(fields[0]), int(fields[1])
                return None
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            return None
