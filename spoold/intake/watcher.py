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

from watchdog.observers.inotify_c import (
    CallbackId,
    InotifyConstants,
    InotifyFD,
    Mask,
    WatchDescriptor,
)

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
    events come to the WatchCallback methods (``on_event``, ...), on that thread.

    The watch is lost when the directory is removed, moved away or unmounted under it:
    ``on_lost`` is called once, and ``watching`` turns false until ``rewatch`` finds a
    directory at the path again (made anew, or mounted again).
    """

    MASK: int  # the events asked for

    def __init__(
        self, directory: Path, on_lost: Callable[[], None], logger: logging.Logger
    ) -> None:
        self._directory = directory
        self._on_lost = on_lost
        self._logger = logger
        self._fd = InotifyFD()
        self._wd: WatchDescriptor | None = None
        self._stopping = False
        self.watching = False

    def start(self) -> None:
        self._fd.start()
        self._add()

    def stop(self) -> None:
        self._stopping = True
        self._fd.stop()
        self._fd.join(5)

    def rewatch(self) -> bool:
        """Watch the directory at the path again after the watch was lost, if one is there;
        return whether it is watched now."""
        if self.watching or self._stopping:
            return self.watching
        try:
            self._add()
        except OSError:
            return False
        self._logger.warning("%s is watched again", self._directory)
        return True

    def _add(self) -> None:
        path = os.fsencode(self._directory)
        self._wd = self._fd.add_callback(path, Mask(self.MASK), self, CallbackId(0))
        self.watching = True

    def on_event(self, event: object) -> None:
        if getattr(event, "is_move_self", False):
            # The kernel follows the directory to where it went; a new one at the path is
            # not watched by this watch, and the old one's changes are nobody's business.
            if self._wd is not None:
                self._fd.remove_callbacks([(self._wd, CallbackId(0))])
            self._lose("moved away")
            return
        # On IN_DELETE_SELF (no name) on_watch_deleted follows.
        if name := os.fsdecode(getattr(event, "name", b"")):
            self._changed(name)

    def on_watch_deleted(self, wd: object) -> None:
        if wd == self._wd:
            self._lose("removed or unmounted")

    def _lose(self, how: str) -> None:
        if self._stopping or not self.watching:
            return
        self.watching = False
        self._logger.error("%s was %s: %s until it is there again", self._directory, how,
                           self.LOST)  # fmt: skip
        self._on_lost()

    LOST: str  # what the daemon does meanwhile

    @abstractmethod
    def _changed(self, name: str) -> None:
        """``name`` came, changed or went, as the mask asks."""

    @abstractmethod
    def on_queue_overflow(self) -> None:
        """The kernel dropped events."""


_C = InotifyConstants


class InotifyWatcher(_Watch):
    """Calls ``on_arrival(name)`` for each file renamed into, or closed after writing in, a directory.

    ``on_overflow`` is called when the kernel dropped events; the caller then scans.
    ``on_lost`` when the watch was lost; the caller then scans until ``rewatch`` succeeds.
    """

    MASK = _C.IN_MOVED_TO | _C.IN_CLOSE_WRITE | _C.IN_DELETE_SELF | _C.IN_MOVE_SELF
    LOST = "incoming files are found by scans every poll_interval"

    def __init__(
        self,
        directory: Path,
        on_arrival: Callable[[str], None],
        on_overflow: Callable[[], None],
        on_lost: Callable[[], None],
        logger: logging.Logger,
    ) -> None:
        super().__init__(directory, on_lost, logger)
        self._on_arrival = on_arrival
        self._on_overflow = on_overflow

    def _changed(self, name: str) -> None:
        self._on_arrival(name)

    def on_queue_overflow(self) -> None:
        self._logger.warning("inotify queue overflowed; scanning %s", self._directory)
        self._on_overflow()


class ChangeWatch(_Watch):
    """Calls ``on_name(name)`` for each name created, linked, written, renamed in or out, or
    removed in a directory (a writer's temporary ones too); ``on_name(None)`` when the
    kernel dropped events (any name may have changed); ``on_lost`` if the watch is lost before
    ``stop`` (the directory removed, moved away or unmounted). A failure in ``on_name`` is
    logged.

    A descriptor and a reader thread of its own, not incoming/'s: intake's watcher waits
    while a flood fills intake's backlog (the flood waits in the kernel's queue), and what
    comes here must not wait behind it, nor fill that queue.
    """

    MASK = (_C.IN_CREATE | _C.IN_MOVED_TO | _C.IN_CLOSE_WRITE | _C.IN_MOVED_FROM | _C.IN_DELETE
            | _C.IN_DELETE_SELF | _C.IN_MOVE_SELF)  # fmt: skip
    LOST = "callbacks and notifications are polled for"

    def __init__(
        self, directory: Path, on_name: Callable[[str | None], None],
        on_lost: Callable[[], None], logger: logging.Logger,
    ) -> None:  # fmt: skip
        super().__init__(directory, on_lost, logger)
        self._on_name = on_name

    def _changed(self, name: str) -> None:
        self._tell(name)

    def on_queue_overflow(self) -> None:
        self._tell(None)

    def _tell(self, name: str | None) -> None:
        try:
            self._on_name(name)
        except Exception:  # the reader thread must outlive a failure of the one it tells
            self._logger.exception("a change in %s was not told (%s)", self._directory, name)
