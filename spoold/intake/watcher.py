"""Tells intake that a file arrived in incoming/; nothing more.

inotify through watchdog's ``InotifyFD`` with a mask of IN_MOVED_TO and IN_CLOSE_WRITE only:
watchdog's observer holds every IN_MOVED_FROM for 0.5 s to pair moves, and once spoold moves a
file out of incoming/ every later drop would queue behind it. Asking the kernel for neither
IN_MOVED_FROM nor anything else keeps pickup in the low milliseconds. Where inotify cannot see
other hosts' writes (NFS, sshfs, CephFS), the daemon scans instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from watchdog.observers.inotify_c import CallbackId, InotifyConstants, InotifyFD, Mask

from spoold.core.errors import ConfigError
from spoold.core.spool import filesystem_type

# Filesystems on which inotify sees only this host's changes.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "fuse.sshfs", "fuse.ceph", "fuse.glusterfs",
    "glusterfs", "9p", "afs", "lustre", "gpfs", "fuse.s3fs", "fuse.rclone", "virtiofs",
})  # fmt: skip


def resolve_watch_mode(setting: str, incoming: Path) -> str:
    """'auto' becomes 'poll' on a network filesystem and 'inotify' elsewhere."""
    if setting not in ("auto", "inotify", "poll"):
        raise ConfigError(f"key watch: {setting!r} is not one of auto, inotify, poll")
    if setting != "auto":
        return setting
    return "poll" if filesystem_type(incoming) in NETWORK_FILESYSTEMS else "inotify"


class InotifyWatcher:
    """Calls ``on_arrival(name)`` for each file renamed into, or closed after writing in, a directory.

    ``on_overflow`` is called when the kernel dropped events; the caller then scans.
    """

    def __init__(
        self,
        directory: Path,
        on_arrival: Callable[[str], None],
        on_overflow: Callable[[], None],
        logger: logging.Logger,
    ) -> None:
        self._directory = directory
        self._on_arrival = on_arrival
        self._on_overflow = on_overflow
        self._logger = logger
        # A private instance: watchdog's shared one would be a hidden global.
        self._fd = InotifyFD()
        self._wd: object | None = None
        self._stopping = False

    def start(self) -> None:
        c = InotifyConstants
        mask = c.IN_MOVED_TO | c.IN_CLOSE_WRITE | c.IN_DELETE_SELF | c.IN_MOVE_SELF
        self._fd.start()
        self._wd = self._fd.add_callback(
            os.fsencode(self._directory), Mask(mask), self, CallbackId(0)
        )

    def stop(self) -> None:
        self._stopping = True
        self._fd.stop()
        self._fd.join(5)

    # WatchCallback protocol, called on watchdog's reader thread.
    def on_event(self, event: object) -> None:
        name = os.fsdecode(getattr(event, "name", b""))
        if getattr(event, "is_delete_self", False) or getattr(event, "is_move_self", False):
            self._logger.error("incoming directory %s was removed or moved", self._directory)
            return
        if name:
            self._on_arrival(name)

    def on_watch_deleted(self, wd: object) -> None:
        if self._stopping:
            return
        self._logger.error("the watch on %s ended; falling back to scans", self._directory)
        self._on_overflow()

    def on_queue_overflow(self) -> None:
        self._logger.warning("inotify queue overflowed; scanning %s", self._directory)
        self._on_overflow()
