"""hosts/<id>: the heartbeat of each host serving this spool (SPEC section 11).

Each daemon rewrites its own record every ``heartbeat_interval`` with a counter one higher
(``beat``), what it runs, and how it sees the others. Other hosts read the counter and judge it
by their own monotonic clock (spoold.core.sightings), never by a time written in it: the
times in a record are for people. A record is replaced whole (written aside, renamed over it;
over sshfs that takes OpenSSH's posix-rename, which its sftp-server offers), not fsynced: a
lost beat only looks like a slow host for one interval.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from spoold.core.errors import SpoolError
from spoold.core.ids import HOST_ID
from spoold.core.spool.fs import DEFAULT_MODE, give_to_owner_of, json_bytes, read_json, write_file

__all__ = ["ALIVE", "GONE", "STALE", "HostRecords", "others_may_take_over"]

#: How a host sees another in its record's ``view`` (spoold.run.hostbeat judges them).
ALIVE, STALE, GONE = "alive", "stale", "gone"


class HostRecords:
    """hosts/: one record per host id, written only by that host's daemon."""

    def __init__(self, root: Path, dirs: Mapping[str, str]) -> None:
        self._root = root
        self._dir = dirs["hosts"]

    def _path(self, host: str) -> str:
        if not HOST_ID.match(host):
            raise SpoolError(f"not a host id: {host!r}")
        return f"{self._dir}/{host}"

    def path(self, host: str) -> str:
        """Where ``host``'s record is (for ``others_may_take_over``, in another process)."""
        return self._path(host)

    def write(self, host: str, record: dict[str, Any]) -> None:
        """Replace ``host``'s record (only its own daemon calls this)."""
        path = self._path(host)
        if not os.path.isdir(self._dir):  # a spool made before hosts/ existed
            with contextlib.suppress(FileExistsError):
                os.mkdir(self._dir, DEFAULT_MODE)
                give_to_owner_of(self._dir, os.fspath(self._root))
        write_file(path, json_bytes(record), durable=False)

    def read(self, host: str) -> dict[str, Any] | None:
        """One host's record; None if it has none (or it is being replaced this instant)."""
        return read_json(self._path(host))

    def all(self) -> dict[str, dict[str, Any]]:
        """Every host's record, by host id (a record unreadable right now is left out)."""
        try:
            names = os.listdir(self._dir)
        except (FileNotFoundError, PermissionError):  # none yet, or not this user's to read
            return {}
        found = {}
        for name in sorted(names):
            if not HOST_ID.match(name):
                continue
            try:
                record = read_json(f"{self._dir}/{name}")
            except PermissionError:
                continue
            if record is not None:
                found[name] = record
        return found

    def remove(self, host: str) -> bool:
        """Forget a host (``spoold hosts --forget``); False if it had no record."""
        try:
            os.unlink(self._path(host))
        except FileNotFoundError:
            return False
        return True


def others_may_take_over(record_path: str) -> bool:
    """Whether the host whose record is at ``record_path`` saw, at its last beat, another
    host that may take its jobs over should it be found stale: one alive, or stale (it may
    come back). True where its record is not there yet (none seen: no view to go by).
    OSError where the spool cannot be read."""
    record = read_json(record_path)
    if record is None:
        return True
    view = record.get("view")
    if not isinstance(view, dict):
        return True
    return any(isinstance(seen, dict) and seen.get("state") != GONE for seen in view.values())
