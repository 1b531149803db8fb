"""Empty files and directories made ahead, so that a write on a job's way is a rename.

On ext4 without a journal (this machine's root), a new inode costs 0.1-0.3 ms while inodes
were freed nearby in the last minutes (see ``spoold.core.spool.stages``: Ready stages). Intake
makes its stages ahead; a worker process then still made three new inodes on a job's way to
its start (``status.json`` "started", the lease, the work dir) and its supervisor a fourth (the
unit's record). A process that has nothing to do makes a few spares (``fill``) where those go;
on the job's way it takes one (``take``), writes into it, and renames (or links) it into place.

Each process makes its spares in a directory of its own, named after it
(``.spoold-spares-<host>@<pid>.<start>.<random>``): a create holds its directory's lock while
ext4 searches for a free inode, and intake's renames through tmp/ must not wait for that. The
name says whose they are, so that ``sweep_spares`` removes those of processes that are gone, and
never a live process's: several daemons share one work root, several hosts one spool's tmp/.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Collection

from spoold.core.procfs import process_start_time
from spoold.core.spool.fs import TEMP_MARK

__all__ = ["SPARES_PREFIX", "Spares", "sweep_spares"]

SPARES_PREFIX = f"{TEMP_MARK}spares-"


class Spares:
    """Empty files (``dirs``: directories) of mode ``mode`` made ahead under ``directory`` by
    this process, for this host (``host``: its id among those sharing the spool); safe to use
    from several threads."""

    def __init__(self, directory: str, host: str, *, dirs: bool = False, mode: int = 0o640) -> None:
        self.directory = directory
        self.host = host
        self._dirs = dirs
        self._mode = mode
        self._lock = threading.Lock()
        self._made: list[str] = []
        self._pid = 0  # the process whose spares those are, and their directory once made
        self._own = ""
        self._count = 0

    def fill(self, count: int) -> int:
        """Make spares until there are ``count``; return how many there are. OSError (a full
        disk, the directory gone) is the caller's: a write then creates its file, as before."""
        while True:
            with self._lock:
                self._mine()
                if len(self._made) >= count:
                    return len(self._made)
                if not self._own:
                    self._own = self._make_own()
                self._count += 1
                path = f"{self._own}/{self._count}"
            if self._dirs:
                os.mkdir(path, self._mode)
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                 self._mode))  # fmt: skip
            with self._lock:
                self._made.append(path)

    def take(self) -> str | None:
        """A spare, now the caller's to use or remove; None when none is made."""
        with self._lock:
            self._mine()
            return self._made.pop() if self._made else None

    def drop(self) -> None:
        """Remove the spares not taken, and their directory (the process stops)."""
        with self._lock:
            self._mine()
            own, self._made, self._own = self._own, [], ""
        if own:
            shutil.rmtree(own, ignore_errors=True)

    def _make_own(self) -> str:
        pid = os.getpid()
        own = (
            f"{self.directory}/{SPARES_PREFIX}{self.host}@{pid}.{process_start_time(pid)}."
            f"{os.urandom(4).hex()}"  # each its own: one process may have several
        )
        os.mkdir(own, 0o700)
        return own

    def _mine(self) -> None:
        """Forget the spares of the process this one was forked from: they are its."""
        if (pid := os.getpid()) != self._pid:
            self._made, self._pid, self._own = [], pid, ""


def sweep_spares(directory: str, host: str, *, stale: Collection[str] = ()) -> int:
    """Remove the spares under ``directory`` whose maker is gone: those of this host's
    (``host``) whose process has ended, and all of the hosts in ``stale`` (found gone).
    Return of how many processes."""
    try:
        with os.scandir(directory) as entries:
            found = [(entry.name, entry.path) for entry in entries
                     if entry.name.startswith(SPARES_PREFIX)]  # fmt: skip
    except FileNotFoundError:
        return 0
    removed = 0
    for name, path in found:
        maker, _, process = name[len(SPARES_PREFIX) :].rpartition("@")
        if maker not in stale and (maker != host or _alive(process)):
            continue
        shutil.rmtree(path, ignore_errors=True)  # gone meanwhile: another host swept it
        removed += 1
    return removed


def _alive(process: str) -> bool:
    """Whether the process a spares directory's name gives (``<pid>.<start>.<random>``)
    still runs."""
    pid, _, rest = process.partition(".")
    start = rest.partition(".")[0]
    return pid.isdigit() and str(process_start_time(int(pid))) == start
