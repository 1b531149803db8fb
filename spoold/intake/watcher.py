"""Tells intake that a file arrived in incoming/, and the outbox's senders that a name came
or went in outbox/; nothing more.

inotify through watchdog's ``InotifyFD`` with a mask of IN_MOVED_TO and IN_CLOSE_WRITE only:
watchdog's observer holds every IN_MOVED_FROM for 0.5 s to pair moves, and once spoold moves a
file out of incoming/ every later drop would queue behind it. Asking the kernel for neither
IN_MOVED_FROM nor anything else keeps pickup in the low milliseconds. Where inotify cannot see
other hosts' writes (NFS, sshfs, CephFS), the daemon scans instead.

outbox/ is watched too (``ChangeWatch``, with a descriptor and a reader thread of its own): a
delivery a worker process, the CLI or another daemon commits is sent at once, not at the
senders' next poll.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
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


class _Watch(ABC):
    """One directory watched by inotify, with a descriptor and a reader thread of its own: a
    private ``InotifyFD`` (watchdog's shared one would be a hidden global). The kernel's
    events come to the WatchCallback methods (``on_event``, ...), on that thread."""

    MASK: int  # the events asked for

    def __init__(self, directory: Path, logger: logging.Logger) -> None:
        self._directory = directory
        self._logger = logger
        self._fd = InotifyFD()
        self._stopping = False

    def start(self) -> None:
        self._fd.start()
        self._fd.add_callback(os.fsencode(self._directory), Mask(self.MASK), self, CallbackId(0))

    def stop(self) -> None:
        self._stopping = True
        self._fd.stop()
        self._fd.join(5)

    @abstractmethod
    def on_event(self, event: object) -> None: ...

    @abstractmethod
    def on_queue_overflow(self) -> None:
        """The kernel dropped events."""

    def on_watch_deleted(self, wd: object) -> None:
        if not self._stopping:
            self._lost()

    @abstractmethod
    def _lost(self) -> None:
        """The watch ended before ``stop``: the directory was removed or moved."""


_C = InotifyConstants


class InotifyWatcher(_Watch):
    """Calls ``on_arrival(name)`` for each file renamed into, or closed after writing in, a directory.

    ``on_overflow`` is called when the kernel dropped events; the caller then scans.
    """

    MASK = _C.IN_MOVED_TO | _C.IN_CLOSE_WRITE | _C.IN_DELETE_SELF | _C.IN_MOVE_SELF

    def __init__(
        self,
        directory: Path,
        on_arrival: Callable[[str], None],
        on_overflow: Callable[[], None],
        logger: logging.Logger,
    ) -> None:
        super().__init__(directory, logger)
        self._on_arrival = on_arrival
        self._on_overflow = on_overflow

    def on_event(self, event: object) -> None:
        name = os.fsdecode(getattr(event, "name", b""))
        if getattr(event, "is_delete_self", False) or getattr(event, "is_move_self", False):
            self._logger.error("incoming directory %s was removed or moved", self._directory)
            return
        if name:
            self._on_arrival(name)

    def _lost(self) -> None:
        self._logger.error("the watch on %s ended; falling back to scans", self._directory)
        self._on_overflow()

    def on_queue_overflow(self) -> None:
        self._logger.warning("inotify queue overflowed; scanning %s", self._directory)
        self._on_overflow()


class ChangeWatch(_Watch):
    """Calls ``on_name(name)`` for each name created, linked, written, renamed in or out, or
    removed in a directory (a writer's temporary ones too); ``on_name(None)`` when the
    kernel dropped events (any name may have changed); ``on_lost`` if the watch ends before
    ``stop`` (the directory was removed or moved). A failure in ``on_name`` is logged.

    A descriptor and a reader thread of its own, not incoming/'s: intake's watcher waits
    while a flood fills intake's backlog (the flood waits in the kernel's queue), and what
    comes here must not wait behind it, nor fill that queue.
    """

    MASK = (_C.IN_CREATE | _C.IN_MOVED_TO | _C.IN_CLOSE_WRITE | _C.IN_MOVED_FROM | _C.IN_DELETE
            | _C.IN_DELETE_SELF | _C.IN_MOVE_SELF)  # fmt: skip

    def __init__(
        self, directory: Path, on_name: Callable[[str | None], None],
        on_lost: Callable[[], None], logger: logging.Logger,
    ) -> None:  # fmt: skip
        super().__init__(directory, logger)
        self._on_name, self._on_lost = on_name, on_lost

    def on_event(self, event: object) -> None:
        if getattr(event, "is_delete_self", False) or getattr(event, "is_move_self", False):
            return  # on_watch_deleted follows
        name = os.fsdecode(getattr(event, "name", b""))
        if name:
            self._tell(name)

    def _lost(self) -> None:
        self._on_lost()

    def on_queue_overflow(self) -> None:
        self._tell(None)

    def _tell(self, name: str | None) -> None:
        try:
            self._on_name(name)
        except Exception:  # the reader thread must outlive a failure of the one it tells
            self._logger.exception("a change in %s was not told (%s)", self._directory, name)
