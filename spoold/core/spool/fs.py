"""File-system primitives of the spool: renames that never replace, files written whole, reads
with limits, fsyncs, and the group commit of a directory's fsync. Nothing here knows of jobs.

What is fsynced, and why no more: on a journaling filesystem (ext4, xfs: the supported ones) a
rename is one journal operation, and an fsync of a directory commits every metadata change made
before it, in order. So a store fsyncs the content that cannot be rebuilt, renames, then fsyncs
the directory it renamed into (``GroupCommit.sync``), and nothing else. Whether any of it is
done at all (``fsync: false`` in the config turns it off, for throwaway spools) is one setting,
``GroupCommit.durable``, shared by every store of a spool.

The per-job operations build paths as strings: pathlib cost 30% of the GIL there.
"""

from __future__ import annotations

import contextlib
import errno
import filecmp
import functools
import itertools
import json
import os
import stat
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple, Protocol

__all__ = [
    "DEFAULT_MODE",
    "LIST_EVERY",
    "NO_EXCHANGE",
    "SETTLE",
    "TEMP_MARK",
    "DirStamp",
    "GroupCommit",
    "GroupSync",
    "Relist",
    "Seen",
    "Sighted",
    "filesystem_type",
    "fsync_path",
    "give_to_owner_of",
    "json_bytes",
    "link_into_place",
    "link_noreplace",
    "path_stamp",
    "read_bytes",
    "read_json",
    "read_limited",
    "read_limited_path",
    "rename_exchange",
    "rename_noreplace",
    "sighting",
    "stat_stamp",
    "write_file",
    "write_into",
    "write_new",
]

DEFAULT_MODE = 0o750
#: In the name of a file being written, to be renamed into place: never a finished file.
TEMP_MARK = ".spoold-"
_counter = itertools.count()


#: Filesystems where syncfs(2) writes back and flushes everything of the filesystem before it
#: returns. Elsewhere (NFS, FUSE: sshfs) it may return having done nothing: files are fsynced.
_SYNCFS_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "tmpfs"})
#: From this many paths on, one syncfs costs less than an fsync each (0.1-0.2 ms apiece here).
_SYNCFS_FROM = 4


class GroupCommit:
    """The durability setting the stores of one spool share, and their directories' syncs.

    One ``GroupSync`` per top-level directory of the tree: every store that renamed into a
    directory shares its fsync with whoever else needs one at the same time. ``barrier``
    makes many files durable at once, where the filesystem allows it with one syncfs.
    """

    def __init__(self, directories: Iterable[str], *, durable: bool) -> None:
        self.durable = durable
        self._syncers = {path: GroupSync(path) for path in directories}
        self._one_sync: bool | None = None  # whether syncfs may stand for fsyncs: on first use

    def barrier(self, paths: list[str]) -> None:
        """Make these files and directories (all in this spool's tree) durable, if durable:
        one syncfs for many where it writes back everything, else an fsync each."""
        if not self.durable or not paths:
            return
        if len(paths) >= _SYNCFS_FROM and self._syncfs_covers(paths[0]):
            syncfs_path(paths[0])
            return
        for path in paths:
            fsync_path(path)

    def _syncfs_covers(self, path: str) -> bool:
        if self._one_sync is None:
            self._one_sync = (
                filesystem_type(path) in _SYNCFS_FILESYSTEMS and _libc_syncfs() is not None
            )
        return self._one_sync

    def sync(self, *paths: str | Path) -> None:
        """fsync these directories (each one of the tree's top-level ones), if durable."""
        if not self.durable:
            return
        for path in paths:  # always one of the tree's top-level directories
            self._syncers[os.fspath(path)].sync()


def write_file(
    path: str | Path,
    data: bytes,
    *,
    durable: bool,
    spare: str | None = None,
    existing: bool = False,
) -> None:
    """Replace ``path`` atomically: written whole under a temporary name, then renamed over it.

    ``spare``: an empty file made ahead on the same filesystem (``spoold.core.spool.spares``),
    the caller's, to be that temporary file: no new inode now. Gone, a temporary is made.

    ``existing``: only a file still there is replaced; one removed meanwhile (by hand, or
    taken by another host) raises FileNotFoundError and is not made again (``_swap_in``).

    A failed replace leaves no temporary file, even when the directory was moved on meanwhile
    (a job's, claimed as its status is written): the file is found by its descriptor, which
    is closed only after the rename for that reason (no extra call on the way that works).
    """
    fd = _open_spare(spare)
    if spare is None or fd is None:
        directory, name = os.path.split(path)
        spare = f"{directory}/{TEMP_MARK}{name}.{os.getpid()}.{next(_counter)}.tmp"
        fd = os.open(spare, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    temp = spare
    try:
        _write_all(fd, data)
        if durable:
            os.fsync(fd)
        if existing:
            _swap_in(temp, path)
        else:
            os.replace(temp, path)
    except BaseException:
        _remove_temporary(fd, temp)
        raise
    finally:
        os.close(fd)


def _swap_in(temp: str, path: str | Path) -> None:
    """``temp`` in place of ``path`` if ``path`` is there, else FileNotFoundError.

    One exchange (renameat2 RENAME_EXCHANGE), which fails if either name is missing: no
    window in which a removal is undone. Where the filesystem has none (NFS, FUSE), a check
    and a rename: a removal between the two comes back, as with a plain replace.
    """
    err = _renameat2_errno(temp, path, _RENAME_EXCHANGE)
    if err == 0:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)  # the version replaced, under the temporary name now
        return
    if err == errno.ENOENT:
        raise FileNotFoundError(err, os.strerror(err), str(path))
    if err is not None and err not in NO_EXCHANGE:
        raise OSError(err, os.strerror(err), str(path))
    if not os.path.lexists(path):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    os.replace(temp, path)


def _open_spare(spare: str | None) -> int | None:
    """``spare`` opened for writing, emptied; None if there is none (or it is gone)."""
    if spare is None:
        return None
    try:
        return os.open(spare, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None


def write_spare(spare: str, data: bytes) -> bool:
    """``write_into`` a file made ahead (``spoold.core.spool.spares``), removed again if that
    fails; False if it is gone (a sweep took it for a dead process's)."""
    try:
        write_into(spare, data)
    except FileNotFoundError:
        return False
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(spare)
        raise
    return True


def _remove_temporary(fd: int, temp: str) -> None:
    """Remove the file open as ``fd``, created as ``temp``: there, or where its directory went."""
    try:
        os.unlink(temp)
        return
    except FileNotFoundError:
        pass
    with contextlib.suppress(OSError):  # no /proc, or it is gone already
        where = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.basename(where) == os.path.basename(temp):  # not "... (deleted)"
            os.unlink(where)


_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2
#: How renameat2 says it cannot exchange two names here (any other failure is the names').
NO_EXCHANGE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})


def rename_noreplace(source: str | Path, target: str | Path) -> None:
    """rename(2) that fails with FileExistsError instead of replacing ``target``.

    renameat2(RENAME_NOREPLACE) where the filesystem has it. Elsewhere (NFS, FUSE: sshfs) a
    file is linked to ``target`` (which fails if anything is there) and unlinked; a directory
    is renamed after a check, and a rename(2) never replaces a directory that holds anything
    (a job's directory always does): racy only against an empty directory made at that name.

    A link and an unlink are two steps: a process stopped between them (killed, or a host
    frozen or cut off) leaves the file under both names. A target that is the very file is
    that move half done: it is finished here (the source name dropped), whoever finishes it,
    rather than the file given a third name (seen: a job file taken twice, from two names).
    """
    err = _renameat2_errno(source, target, _RENAME_NOREPLACE)
    if err == 0:
        return
    if err in (errno.EEXIST, errno.ENOTEMPTY):  # FUSE too: the kernel looks before sshfs does
        if not os.path.isdir(source) and _same_file(source, target):
            os.unlink(source)
            return
        raise FileExistsError(err, os.strerror(err), str(target))
    if err not in (None, errno.EINVAL, errno.ENOSYS):
        raise OSError(err, os.strerror(err), str(source))
    if not os.path.isdir(source) or os.path.islink(source):
        try:
            link_noreplace(source, target)
        except FileExistsError:
            if not _same_file(source, target):
                raise
        os.unlink(source)
        return
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    try:
        os.rename(source, target)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) or (
            exc.errno == errno.EPERM and os.path.lexists(target)
        ):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target)) from None
        raise


def link_noreplace(source: str | Path, target: str | Path) -> None:
    """link(2), which never replaces: FileExistsError if anything is at ``target``.

    sshfs answers EPERM, not EEXIST, when another host made ``target`` between the kernel's
    lookup and the link (SFTP has one code for every failure): seen in the three-host run,
    as schedule firings refused with "Operation not permitted" while another host's won.
    """
    try:
        os.link(source, target, follow_symlinks=False)
    except PermissionError as exc:
        if exc.errno == errno.EPERM and os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target)) from None
        raise


#: A directory's or a file's inode, mtime and ctime (ns): one of them changes whenever an entry
#: is made, removed or renamed in the directory, or another takes its name; and whenever a
#: file spoold writes is written, each write replacing it (``write_file``).
DirStamp = tuple[int, int, int]


def stat_stamp(info: os.stat_result) -> DirStamp:
    return info.st_ino, info.st_mtime_ns, info.st_ctime_ns


def path_stamp(path: str, *, follow_symlinks: bool = True) -> DirStamp | None:
    """``path``'s stamp (``stat_stamp``); None once it is gone."""
    try:
        return stat_stamp(os.stat(path, follow_symlinks=follow_symlinks))
    except FileNotFoundError:
        return None


#: Seconds by which a read must follow a directory's stamp for the stamp to stand for it:
#: more than the filesystem's timestamp granularity (1 s over SFTP) plus the clock skew between
#: this host and the one whose clock stamps the spool's files (keep hosts on NTP).
SETTLE = 5.0
#: A look in this many lists its directory whether or not the stamp changed (``Relist``).
LIST_EVERY = 10


class Seen(Protocol):
    """A directory's stamp as this host last saw it, and since when (monotonic)."""

    @property
    def stamp(self) -> DirStamp: ...

    @property
    def since(self) -> float: ...


def sighting(
    stamp: DirStamp, last: Seen | None, *, wall: float, now: float, settle: float
) -> tuple[float, bool]:
    """When ``stamp`` was first seen (``last``: what was seen before, if anything), and whether
    it now stands for its directory: whether any change after a read that follows this stat
    must give the directory another stamp. So once the stamp is ``settle`` seconds old by this
    host's wall clock (``wall``, read before the stat), or was seen unchanged for that long by
    its monotonic clock (``now``), which holds whatever the skew of the clock that stamps the
    spool's files."""
    since = last.since if last is not None and last.stamp == stamp else now
    _, mtime_ns, ctime_ns = stamp
    return since, now - since >= settle or max(mtime_ns, ctime_ns) <= (wall - settle) * 1e9


class Sighted(NamedTuple):
    """A directory's stamp as last seen, since when, and whether it had settled then."""

    stamp: DirStamp
    since: float  # (monotonic) when that stamp was first seen
    settled: bool  # it had settled before the listing that followed it


class Relist:
    """Whether a directory must be listed again, or still holds what its last listing found:
    its stamp is the one that listing was made under, and that stamp had settled then
    (``sighting``), so any change since would have given it another. One stat instead of a
    listing (and whatever the lister reads of each entry).

    ``every``: one look in this many lists all the same, for what a stamp may not show at once
    (a shared filesystem's cached attributes, a host whose clock is far off).
    """

    def __init__(
        self, stamp: Callable[[], DirStamp | None], *, settle: float = SETTLE,
        every: int = LIST_EVERY,
    ) -> None:  # fmt: skip
        """``stamp``: the directory's stamp now (None if it is gone)."""
        self._stamp = stamp
        self._settle = settle
        self._every = every
        self._last: Sighted | None = None  # the last listing's
        self._taken: Sighted | None = None  # the stamp the listing under way is made under
        self._skipped = 0
        self._stale = False

    def needed(self, *, wall: float, now: float) -> bool:
        """Before a listing: whether it must be made. When it must, the stamp read here is the
        one it stands under once ``listed()`` is called. ``wall``: the wall clock's time, read
        before this call; ``now``: the monotonic clock's."""
        stamp = self._stamp()
        last = self._last
        if (
            last is not None
            and last.settled
            and stamp == last.stamp
            and not self._stale
            and self._skipped + 1 < self._every
        ):
            self._skipped += 1
            return False
        if stamp is None:
            self._taken = None
        else:
            since, settled = sighting(stamp, last, wall=wall, now=now, settle=self._settle)
            self._taken = Sighted(stamp, since, settled)
        return True

    def listed(self) -> None:
        """The listing ``needed()`` asked for is made: it holds until the stamp changes."""
        self._last, self._taken = self._taken, None
        self._skipped, self._stale = 0, False

    def forget(self) -> None:
        """The next look lists: something changed that the stamp does not show."""
        self._stale = True


def _same_file(one: str | Path, other: str | Path) -> bool:
    """Whether two names are one file: by inode, where the filesystem keeps one per file.

    On a FUSE filesystem (sshfs) each name is a node with a number of its own, and says it has
    one link: there, by all the two names show (type, size, mode, owner, modification time)
    and their bytes. Two names of one file cannot differ in any of it; two files alike in all
    of it are one content twice, which a move that was to keep it once may keep once.
    """
    try:
        first, second = os.lstat(one), os.lstat(other)
        if os.path.samestat(first, second):
            return True
        if not (filesystem_type(os.path.dirname(os.fspath(other))) or "").startswith("fuse"):
            return False
        alike = stat.S_ISREG(first.st_mode) and _shown(first) == _shown(second)
        return alike and filecmp.cmp(one, other, shallow=False)
    except FileNotFoundError:
        return False


def _shown(info: os.stat_result) -> tuple[int, ...]:
    return info.st_size, info.st_mode, info.st_uid, info.st_gid, info.st_mtime_ns


def rename_exchange(source: str | Path, target: str | Path) -> None:
    """Swap two paths in one step (renameat2 RENAME_EXCHANGE); OSError where it is missing."""
    err = _renameat2_errno(source, target, _RENAME_EXCHANGE)
    if err is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available", str(source))
    if err:
        raise OSError(err, os.strerror(err), str(source))


def _renameat2_errno(source: str | Path, target: str | Path, flags: int) -> int | None:
    """renameat2(2)'s errno (0: done), or None where the C library has no renameat2."""
    renameat2 = _libc_renameat2()
    if renameat2 is None:
        return None
    src, dst = os.fsencode(source), os.fsencode(target)
    if renameat2(_AT_FDCWD, src, _AT_FDCWD, dst, flags) == 0:
        return 0
    import ctypes  # noqa: PLC0415 - loaded by _libc_renameat2 already

    return int(ctypes.get_errno())


@functools.cache
def _libc_renameat2() -> Any:
    """The C library's renameat2, or None; looked up on first use (ctypes costs every
    command-line call that never renames anything)."""
    import ctypes  # noqa: PLC0415

    return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)


def write_new(path: str | Path, data: bytes, *, durable: bool = False, mode: int = 0o640) -> None:
    """Create ``path`` (it must not exist) holding ``data``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        _write_all(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def write_into(path: str | Path, data: bytes) -> None:
    """Write ``data`` into ``path``, an empty file made before (created ahead, as a ready
    stage's entries are): no new inode now."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def link_into_place(temporary: str, path: str) -> bool:
    """Link ``temporary`` (a file written whole) to ``path`` unless something is there (then
    False), and remove ``temporary``: a reader never sees half of it, two writers never both
    win."""
    try:
        link_noreplace(temporary, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(temporary)
    return True


def give_to_owner_of(path: str, directory: str) -> None:
    """What root (a command run as root) made in ``directory`` is given to its owner: the
    daemon, running as that owner, must read it."""
    if os.geteuid() == 0 and (owner := os.stat(directory)).st_uid != 0:
        os.chown(path, owner.st_uid, owner.st_gid)


def read_limited(fd: int, limit: int) -> bytes:
    """Up to ``limit`` bytes of a file just opened, to its end as it is now."""
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0:
        # Below malloc's mmap threshold (128 KiB): a larger buffer is mapped, shrunk to the
        # bytes read and unmapped again, three system calls for each read of a small file.
        try:
            chunk = os.read(fd, min(remaining, 1 << 16))
        except BlockingIOError:
            break
        if not chunk:  # not a short read: FUSE and NFS may return those before the end
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_limited_path(path: Path, limit: int) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(limit)


def read_json(path: str) -> dict[str, Any] | None:
    """A small JSON file spoold wrote, or None when it is not there (or not whole yet)."""
    try:
        data = json.loads(read_bytes(path))
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_bytes(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class GroupSync:
    """fsync of one directory, shared by every thread that needs one at the same time.

    What a caller needs is a sync that starts after its rename: when one is under way, the
    callers that arrive meanwhile wait for it to end and share the next, as a database
    commits a group. Under load, a directory is synced once per batch, not once per job.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._cond = threading.Condition()
        self._started = 0
        self._finished = 0
        self._running = False
        self._error: OSError | None = None

    def sync(self) -> None:
        with self._cond:
            needed = self._started + 1  # the first sync to start from now on
            while self._finished < needed:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                self._started += 1
                number = self._started
                self._cond.release()
                try:
                    fsync_path(self._path)
                    error = None
                except OSError as exc:
                    error = exc
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._finished = number
                    self._error = error
                    self._cond.notify_all()
            if self._error is not None:  # the latest sync, which covers this caller, failed
                raise self._error


def syncfs_path(path: str | Path) -> None:
    """syncfs(2) of the filesystem ``path`` is on: everything written to it is on disk after."""
    syncfs = _libc_syncfs()
    if syncfs is None:
        raise OSError(errno.ENOSYS, "syncfs is not available", str(path))
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if syncfs(fd) != 0:
            import ctypes  # noqa: PLC0415 - loaded by _libc_syncfs already

            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


@functools.cache
def _libc_syncfs() -> Any:
    import ctypes  # noqa: PLC0415 - as for renameat2

    return getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)


def filesystem_type(path: str | Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> str | None:
    """The type of the filesystem ``path`` is on, from the longest matching mount point."""
    target = os.path.realpath(path)
    best, best_type = "", None
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        mount_point = fields[4].replace("\\040", " ")
        fs_type = line.split(" - ", 1)[1].split()[0]
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, fs_type
    return best_type


def fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def json_bytes(data: dict[str, Any]) -> bytes:
    # Compact: only then does json use its C encoder (``spoold status`` pretty-prints).
    return (json.dumps(data, separators=(",", ":"), ensure_ascii=False) + "\n").encode()
