"""Intake's side of the spool: incoming/, the private stages under tmp/, and rejected/.

A file is moved out of incoming/ into a stage (tmp/in-<random>: that rename is also how several
hosts sharing a spool agree who takes it), read there, and replaced by spoold's own copy of the
bytes read. From the stage it is accepted (into pending/, or scheduled/ for a schedule's
definition, its id reserved in ids/ first), rejected (into rejected/<name>/ beside a
reason.json), or released (back into incoming/). What accept fsyncs (see
``spoold.core.spool.fs`` for why no more):

- accept:  fsync job.yaml, rename the stage into pending/, fsync pending/. status.json and the
           first log line are derived from job.yaml; recovery rebuilds a status lost to power
           loss (``repair_pending``). Not one that names the job's ``accepted`` change
           (``callback_delivery``): that one is fsynced with job.yaml (``Prepared.numbered``).
           Rebuilt, it would name no change and say sequence 0: the prepared ``accepted`` of
           a job that exists dropped at the next start, or, committed, replaced unsent by the
           job's next event, numbered 1 again.

A crash leaves the stage; ``recover`` at start finishes a rejection whose reason.json was
written, and otherwise gives up the reservation the stage made and puts the file back into
incoming/: only ever the submitter's file, whole (spoold's copy of it, which names its
submitter: ``SUBMITTER_MARK``). A stage of a job file spoold made itself (a
schedule's firing, ``spoold exec``'s copy: its name says so) is removed instead, as is one
of bytes handed over (the API); a file being copied is written under a hidden name until
whole. The same holds for a host found stale that goes on (frozen, then thawed): the stage
it fills is taken from under it, and what it does next fails there, changing nothing
outside it.

Ready stages. Each file taken needs a stage and, once accepted, the first entries of a job's
directory and its id's reservation: six new inodes (the stage, the private copy, status.json,
log, artifacts/, the symlink in ids/) and a seventh its supervisor makes (units/). On ext4
without a journal (this machine's root) a new inode costs 0.1-0.3 ms while inodes were freed
nearby in the last minutes: a search past each of them. So while intake has nothing to do
(``IntakeThread``: not while the job of a file that came alone starts), ``make_ready`` makes a
few stages ahead, each with those entries under hidden names
(``.spoold-ready-*``; the reservation's target is the stage's name, known then); a file taken
then costs renames, not creates, on its way to a worker. A ready stage is an ordinary one to
recovery: what is hidden in it is never a submitter's, and one that holds nothing else is
removed without a word.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from spoold.core.errors import DuplicateJob, IncomingMissing, JobBusy, SpoolError
from spoold.core.ids import RUN_ID
from spoold.core.spool.fs import (
    DEFAULT_MODE,
    NO_EXCHANGE,
    TEMP_MARK,
    GroupCommit,
    json_bytes,
    read_json,
    read_limited,
    read_limited_path,
    rename_exchange,
    rename_noreplace,
    write_file,
    write_into,
    write_new,
)
from spoold.core.spool.jobs import UNITS, JobDir, Jobs
from spoold.core.spool.reservations import (
    GONE_PREFIX,
    MIGRATION_PREFIX,
    Reservations,
    check_job_id,
    new_token,
)
from spoold.core.spool.spares import sweep_spares

__all__ = ["FileOwner", "FileSignature", "QuietCheck", "Stages", "TakenFile", "is_transient_name"]

# A job file (job.yaml, a rejected file's copy) may hold secrets written into it: spoold's
# alone, as a job's artifacts/ (its unmasked output). status.json and log (secrets masked)
# are readable by the group of the directory they are made in (the package's spoold-submit).
_PRIVATE_FILE, _PRIVATE_DIR = 0o600, 0o700

_F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)
_STAGE_PREFIX = "in-"
#: Begins the random part of the name of a stage that holds a job file of spoold's own (a
#: schedule's firing, a file run by ``spoold exec``, a stage being deleted), never one taken
#: from incoming/: a stage of it left behind is removed, the file in it never given to
#: incoming/ (where it would be a file nobody submitted; seen: an empty job.yaml, being
#: written when a host found stale recovered the stage). In the name, not in a file beside
#: it: there from the stage's first instant, and no inode more.
_OWN = "own-"
#: A submitter's file that spoold's private copy replaced, out of its stage, to be removed.
SPENT_PREFIX = "spent-"
# The files spoold writes into a stage; a staged original is any other entry.
#: In a stage of bytes handed over (the HTTP API): no file of incoming/ to give back after a
#: crash, and a client that got no answer, whose retry places the job again.
_HANDED_OVER = "handed-over"
_STAGE_FILES = frozenset(
    {"job.yaml", "status.json", "log", "artifacts", UNITS, "reason.json", _HANDED_OVER}
)
#: A ready stage's entries (``make_ready``): the private copy's file, then what each becomes.
_READY = f"{TEMP_MARK}ready-"
_READY_COPY = f"{_READY}copy"
_READY_ID = f"{_READY}id"  # the job id's reservation, its target the stage's name
_READY_FILES = ("status.json", "log")
_READY_DIRS = ("artifacts", UNITS)
_REPLACED = "replaced"  # in a schedule's directory: its definition is being replaced
#: How a network filesystem names a file removed or replaced while its host had it open, kept
#: until the last close (FUSE's libfuse without hard_remove, as sshfs; NFS's "silly rename").
#: In a stage, the submitter's file that spoold's copy replaced: alone (the copy's rename cut
#: off after FUSE moved the file aside), it holds the job's bytes.
_STAND_INS = (".fuse_hidden", ".nfs")
#: On spoold's private copy, who owned the submitter's file it replaced (``uid:gid:mode``,
#: the mode in octal): a copy given back to incoming/ (its intake failed; a crash's
#: recovery) is taken again as that submitter's, judged by their policy, not as spoold's
#: user's. Believed only on a file of spoold's own user, which nobody but spoold (or root)
#: can have given it: a user attribute is set by the file's owner alone. (A link to a copy
#: is no way round: a file with a second name is rejected, whoever it names.)
SUBMITTER_MARK = "user.spoold.submitter"
#: How setxattr says the filesystem keeps no user attributes (sshfs, NFS before 4.2).
_NO_XATTRS = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})

#: What tells one version of a file from the next without reading it.
FileSignature = tuple[int, int, int, int]
#: Whether the file ``name``, as ``signature`` shows it now, has been left alone long enough.
QuietCheck = Callable[[str, FileSignature], bool]


def is_transient_name(name: str) -> bool:
    """Names writers use while a file is incomplete: never taken from incoming/."""
    return name.startswith(".") or name.endswith((".tmp", ".part"))


class FileOwner(NamedTuple):
    """Whose a taken file was, as it was read: its owner is who submitted it."""

    uid: int
    gid: int
    #: Its permission bits: a file others could write is not known to be its owner's alone.
    mode: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileOwner:
        return cls(st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))


class TakenFile(NamedTuple):
    """A file moved out of incoming/ into a private stage, ready to be accepted or rejected."""

    name: str
    stage: Path
    kind: str  # file | symlink | directory | fifo | socket | device | other
    size: int
    data: bytes | None  # the content, for regular files no larger than the limit
    links: int = 1  # names the file had when taken: more than one is a hard link
    #: Whose the bytes read were (spoold's own copy replaces the file); None: not known.
    owner: FileOwner | None = None
    #: When it arrived in incoming/: its ctime as taken (a rename into incoming/ and every
    #: write set it, and no writer can set it back, unlike the mtime that rsync and scp -p
    #: copy from the source). None: not taken from incoming/.
    arrived: float | None = None
    #: The submitter's file that the private copy replaced, moved aside for ``remove_spent``
    #: (None: removed already, or none).
    spent: str | None = None
    #: Its stage was made ahead (``Stages.make_ready``): the entries not used yet are there.
    ready: bool = False

    @property
    def original(self) -> Path:
        return self.stage / self.name


class StageLeft(SpoolError):
    """A take failed and may have left its file in its stage (``taken``): release it."""

    def __init__(self, taken: TakenFile) -> None:
        super().__init__(f"{taken.name} may be left in {taken.stage.name}")
        self.taken = taken


class Prepared(NamedTuple):
    """A job's directory written in its stage (``Stages.prepare``), not yet placed."""

    job_id: str
    stage: str
    original: str  # where the staged file was, to give it back under its name
    job_file: str
    schedule: bool
    ready: bool = False  # its stage was made ahead (TakenFile.ready)
    #: Its status.json names the job's first change (``callback_delivery``): made durable by
    #: ``settle`` with the job file, as nothing could rebuild it.
    numbered: bool = False


class Stages:
    """incoming/, the stages a file passes through on its way in, and rejected/."""

    def __init__(
        self, dirs: Mapping[str, str], disk: GroupCommit, jobs: Jobs, reservations: Reservations,
        *, host: str = "",
    ) -> None:  # fmt: skip
        """``host``: this host's id, in the name of each stage it makes: of hosts sharing the
        spool, each recovers only its own stages (and those of a host found stale)."""
        self._dirs = dirs
        self._disk = disk
        self._jobs = jobs
        self._ids = reservations
        self._host = host
        self._swaps = True  # whether renameat2 can swap two names here (not over FUSE)
        self._marks = True  # whether a file here keeps user attributes (SUBMITTER_MARK)
        self._euid = os.geteuid()
        # Stages made ahead, for take_incoming. One thread makes them (make_ready), intake's
        # take them: list.append and list.pop are atomic, and a length read late only means
        # one stage more or less.
        self._ready: list[str] = []

    # -- incoming ----------------------------------------------------------------------------

    def list_incoming(self) -> list[str]:
        """Names in incoming/ that are not marked as still being written."""
        return sorted(self.incoming_names())

    def incoming_names(self) -> Iterator[str]:
        """``list_incoming``'s names in the directory's order, read as they are asked for: a
        flood's ten thousands are not all held at once. Files taken meanwhile are not named
        again; one arriving meanwhile may or may not be (readdir's rule). IncomingMissing if
        there is no incoming/."""
        try:
            entries = os.scandir(self._dirs["incoming"])
        except FileNotFoundError as exc:
            raise IncomingMissing(f"{self._dirs['incoming']} is missing") from exc
        with entries:
            for entry in entries:
                if not is_transient_name(entry.name):
                    yield entry.name

    def peek_incoming(self, name: str, limit: int) -> bytes | None:
        """The first ``limit`` bytes of ``incoming/<name>`` as it is now, taking nothing; None
        if it is not a regular file this user may read (gone, a link, a FIFO: never waited on)."""
        try:
            fd = os.open(f"{self._dirs['incoming']}/{name}",
                         os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)  # fmt: skip
        except OSError:
            return None
        try:
            return os.read(fd, limit) if stat.S_ISREG(os.fstat(fd).st_mode) else None
        except OSError:
            return None
        finally:
            os.close(fd)

    def waiting_incoming(self) -> tuple[int, float | None]:
        """How many files wait in incoming/ (as ``list_incoming`` names them), and the ctime
        of the one waiting longest (None: none waits). One lstat each, nothing read."""
        count, oldest = 0, None
        with os.scandir(self._dirs["incoming"]) as entries:
            for entry in entries:
                if is_transient_name(entry.name):
                    continue
                try:
                    changed = entry.stat(follow_symlinks=False).st_ctime
                except FileNotFoundError:
                    continue  # taken while we looked
                count += 1
                oldest = changed if oldest is None else min(oldest, changed)
        return count, oldest

    def take_incoming(
        self,
        name: str,
        *,
        now: float,
        max_size: int,
        settle: float = 0.0,
        quiet: QuietCheck | None = None,
    ) -> TakenFile | None:
        """Move one file out of incoming/ into a private stage, if it is complete.

        Returns None when the file is gone (another instance took it) or not complete yet:
        a local process still has it open for writing; or, where open writers cannot be seen,
        it changed less than ``settle`` seconds before ``now`` (both by this host's clock);
        or ``quiet`` (for writers on other hosts, whose clocks say nothing here) says no.
        """
        if is_transient_name(name) or "/" in name or name in (".", ".."):
            return None
        path = f"{self._dirs['incoming']}/{name}"  # plain strings: this runs for every file
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        kind = _kind(st.st_mode)
        fd = -1
        try:
            if kind == "file":
                try:
                    # O_NONBLOCK: a FIFO swapped in after the lstat must not hang us.
                    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
                except FileNotFoundError:
                    return None
                except PermissionError:
                    kind = "unreadable"
                except OSError as exc:
                    if exc.errno != errno.ELOOP:
                        raise
                    kind = "symlink"
                else:
                    st = os.fstat(fd)
                    kind = _kind(st.st_mode)
                    writer = _has_local_writer(fd) if kind == "file" else False
                    if writer or (quiet is not None and not quiet(name, _signature(st))):
                        return None
                    if writer is None and settle and now - st.st_mtime < settle:
                        return None
            stage, ready = self._take_stage()
            for last in (False, True):
                try:
                    os.rename(path, f"{stage}/{name}")
                except FileNotFoundError:
                    if not last and not os.path.isdir(stage):
                        # A stage that is gone (recovered by another host while this one was
                        # stale): the file may still be there, for a stage made now.
                        stage, ready = self._new_stage(), False
                        continue
                    self._drop_stage(stage, ready=ready, reuse=True)  # nothing of it was used
                    return None
                except OSError as exc:  # on a shared mount the rename may have happened anyway
                    left = TakenFile(name=name, stage=Path(stage), kind=kind, size=0, data=None,
                                     ready=ready)  # fmt: skip
                    raise StageLeft(left) from exc
                break
        finally:
            if fd >= 0:
                os.close(fd)
        if kind != "file":
            return TakenFile(name=name, stage=Path(stage), kind=kind, size=st.st_size, data=None,
                             ready=ready)  # fmt: skip
        try:
            return self._own_copy(
                name, stage, max_size, checked=(st.st_dev, st.st_ino), arrived=st.st_ctime,
                ready=ready,
            )  # fmt: skip
        except OSError as exc:  # its own undoing may have failed too (an I/O error)
            left = TakenFile(name=name, stage=Path(stage), kind=kind, size=0, data=None,
                             ready=ready)  # fmt: skip
            raise StageLeft(left) from exc

    def _own_copy(
        self, name: str, stage: str, max_size: int, *, checked: tuple[int, int], arrived: float,
        ready: bool,
    ) -> TakenFile | None:  # fmt: skip
        """Read the file now in ``stage`` and put a private copy of those bytes in its place.

        What was checked above may not be what was renamed: another file can be renamed over
        the name in between. And what was renamed may still change: a hard link, or a writer
        that kept it open. So the content is read only from the stage, where nobody else can
        put a name, and the stage then holds a file only spoold can write: exactly the bytes
        that are validated, accepted (as job.yaml) or kept with the reason of a rejection.
        """
        staged = f"{stage}/{name}"
        try:
            fd = os.open(staged, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:  # swapped for a symlink, or for a file spoold may not read
            kind = "symlink" if exc.errno == errno.ELOOP else "unreadable"
            size = os.lstat(staged).st_size
            return TakenFile(name=name, stage=Path(stage), kind=kind, size=size, data=None,
                             ready=ready)  # fmt: skip
        try:
            st = os.fstat(fd)
            kind = _kind(st.st_mode)
            if kind == "file" and (st.st_dev, st.st_ino) != checked and _has_local_writer(fd):
                # Renamed over the checked file while still being written: not complete.
                _move_to_free_name(Path(staged), Path(self._dirs["incoming"]), name)
                self._drop_stage(stage, ready=ready, reuse=True)  # its copy not made yet
                return None
            if kind != "file" or st.st_size > max_size:
                return TakenFile(name=name, stage=Path(stage), kind=kind, size=st.st_size,
                                 data=None, links=st.st_nlink, ready=ready)  # fmt: skip
            data = read_limited(fd, max_size + 1)
            owner = self._owner_of(fd, st)
        finally:
            os.close(fd)
        spent = None
        if len(data) <= max_size:
            temp = f"{stage}/{_READY_COPY if ready else TEMP_MARK + 'copy'}"
            try:
                if ready:
                    write_into(temp, data)
                else:
                    write_new(temp, data, mode=_PRIVATE_FILE)
                self._mark(temp, owner)
                spent = self._put_in_place(temp, staged)
            except BaseException:  # a full disk: the file goes back, to be tried again
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
                _move_to_free_name(Path(staged), Path(self._dirs["incoming"]), name)
                self._drop_stage(stage, ready=ready)
                raise
        return TakenFile(name=name, stage=Path(stage), kind="file", size=len(data),
                         data=data if len(data) <= max_size else None, links=st.st_nlink,
                         owner=owner, arrived=arrived, spent=spent, ready=ready)  # fmt: skip

    def _owner_of(self, fd: int, st: os.stat_result) -> FileOwner:
        """Who submitted the file open as ``fd``: its owner, or for spoold's own copy given
        back to incoming/, the owner of the file it replaced (``SUBMITTER_MARK``)."""
        if st.st_uid == self._euid and self._marks:
            try:
                uid, gid, mode = os.getxattr(fd, SUBMITTER_MARK).split(b":")
                return FileOwner(int(uid), int(gid), int(mode, 8) & 0o7777)
            except (OSError, ValueError):
                pass  # none: a file spoold's user dropped itself
        return FileOwner.of(st)

    def _mark(self, copy: str, owner: FileOwner) -> None:
        """Say on spoold's ``copy`` whose file it replaces (``SUBMITTER_MARK``)."""
        if not self._marks:
            return
        mark = f"{owner.uid}:{owner.gid}:{owner.mode:o}".encode()
        try:
            os.setxattr(copy, SUBMITTER_MARK, mark, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in _NO_XATTRS:
                raise
            self._marks = False

    def _put_in_place(self, copy: str, staged: str) -> str | None:
        """Put spoold's ``copy`` in place of the submitter's file ``staged``; the submitter's
        file, moved aside for ``remove_spent``, or None if it was removed here.

        Removing a file frees its blocks, which a filesystem mounted with ``discard`` (this
        machine's root) tells the disk there and then: replacing the file in place took 38 %
        of intake's time in a flood (py-spy). Where two names can be swapped in one step, the
        stage never lacks its file: after a crash it holds the copy, or the original and a
        temporary copy, as it did with a replace."""
        if self._swaps:
            try:
                rename_exchange(copy, staged)
            except OSError:  # EINVAL over FUSE (sshfs); a failed swap changed nothing
                self._swaps = False
            else:
                spent = f"{self._dirs['tmp']}/{SPENT_PREFIX}{os.urandom(8).hex()}"
                try:
                    os.rename(copy, spent)
                except BaseException:
                    rename_exchange(copy, staged)  # the submitter's file back, as before
                    raise
                return spent
        os.replace(copy, staged)
        return None

    @staticmethod
    def remove_spent(path: str) -> None:
        """Remove a submitter's file that ``take_incoming`` moved aside (``TakenFile.spent``)."""
        with contextlib.suppress(FileNotFoundError):  # a start's recovery removed it first
            os.unlink(path)

    def submit_file(self, name: str, data: bytes) -> Path:
        """Place a job file into incoming/ atomically, never over an existing file.

        Written under a transient name and fsynced, then renamed to a free final name.
        """
        incoming = Path(self._dirs["incoming"])
        # Made unique by its random part, so written in place; the name shortened to leave
        # room for what is added to it (the final name may be as long as a name can be).
        ending = f".{os.urandom(8).hex()}.tmp"
        temp = incoming / f".{fit_name(name, name_max(incoming) - len(ending) - 1)}{ending}"
        try:
            write_new(temp, data, durable=self._disk.durable)
            target = _move_to_free_name(temp, incoming, name)
        except FileExistsError:  # made by another (its random part the same): not ours
            raise
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        self._disk.sync(incoming)
        return target

    def stage_file(self, source: Path, *, max_size: int) -> TakenFile:
        """Copy a file from outside the spool into a stage, as if it had been taken from
        incoming/ (but never given to it: the file stays where it is, outside)."""
        stage = Path(self._new_stage(own=True))
        target = stage / source.name
        size = source.stat().st_size
        data = read_limited_path(source, max_size + 1) if size <= max_size else None
        if data is not None:
            write_new(target, data, mode=_PRIVATE_FILE)  # a stage is private: no atomic replace
        # Who names a file to run (``spoold exec``) submits it, whoever wrote it.
        caller = FileOwner(os.geteuid(), os.getegid(), _PRIVATE_FILE)
        return TakenFile(
            name=source.name, stage=stage, kind="file", size=size, data=data, owner=caller
        )

    def stage_data(self, name: str, data: bytes) -> TakenFile:
        """Job file bytes handed over directly (the HTTP API) into a stage, as if taken from
        incoming/ under ``name``; their submitter is whoever handed them over, not a file's
        owner."""
        stage = Path(self._new_stage())
        write_new(stage / _HANDED_OVER, b"", mode=_PRIVATE_FILE)
        write_new(stage / name, data, mode=_PRIVATE_FILE)
        return TakenFile(name=name, stage=stage, kind="file", size=len(data), data=data)

    @staticmethod
    def handed_over(job: JobDir) -> None:
        """A job placed from bytes handed over: its stage's mark is no longer needed (one left
        by a crash in between is inert)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{job.location}/{_HANDED_OVER}")

    def discard(self, taken: TakenFile) -> None:
        """Remove a stage that was not accepted (its bytes were handed over, not dropped)."""
        with contextlib.suppress(OSError):
            self._remove_stage(taken.stage)

    def _remove_stage(self, stage: str | Path) -> None:
        """Delete a stage whose job file must never go to incoming/ (a schedule's definition
        replaced, a firing, bytes handed over): first renamed to a stage of spoold's own
        (``_OWN``) in one step. Deleted in place, a removal cut short (a crash, this host
        found stale) could have lost the entry that tells what the stage is before its job
        file, which recovery would then give to incoming/ as a file taken (found: a replaced
        definition's "replaced" mark deleted first, and the old definition put back)."""
        doomed = self._new_stage_name(own=True)
        os.rename(stage, doomed)
        shutil.rmtree(doomed)

    def _new_stage(self, *, own: bool = False) -> str:
        stage = self._new_stage_name(own=own)
        os.mkdir(stage, DEFAULT_MODE)
        return stage

    def make_ready(self, count: int, *, enough: Callable[[], bool]) -> int:
        """Make stages ahead, each with a job directory's first entries (the module's
        docstring), until ``count`` are ready or ``enough()`` says to stop (intake has work
        again: in a flood the inodes cost the same made here or there, and intake's are
        wanted first). Return how many are ready."""
        while len(self._ready) < count and not enough():
            stage = self._new_stage()
            try:
                write_new(f"{stage}/{_READY_COPY}", b"", mode=_PRIVATE_FILE)
                os.symlink(os.path.basename(stage), f"{stage}/{_READY_ID}")
                for name in _READY_FILES:
                    write_new(f"{stage}/{_READY}{name}", b"")
                os.mkdir(f"{stage}/{_READY}artifacts", _PRIVATE_DIR)
                os.mkdir(f"{stage}/{_READY}{UNITS}", DEFAULT_MODE)
            except BaseException:  # a full disk: no stage half made is left behind
                shutil.rmtree(stage, ignore_errors=True)
                raise
            self._ready.append(stage)
        return len(self._ready)

    def drop_ready(self) -> None:
        """Remove the stages made ahead (intake has stopped: a clean stop leaves tmp/ as it
        found it)."""
        while self._ready:
            shutil.rmtree(self._ready.pop(), ignore_errors=True)

    def _take_stage(self) -> tuple[str, bool]:
        """A stage for a file to take: a ready one if there is one (and True), else a new one."""
        try:
            return self._ready.pop(), True
        except IndexError:
            return self._new_stage(), False

    def _drop_stage(self, stage: str, *, ready: bool, reuse: bool = False) -> None:
        """Remove a stage that holds nothing of a file; a ready one whose entries are all still
        there (``reuse``) is ready again instead."""
        if ready and reuse:
            self._ready.append(stage)
            return
        if ready:
            _clear_ready(stage)
        with contextlib.suppress(FileNotFoundError):  # taken over by another host, emptied
            os.rmdir(stage)

    def _new_stage_name(self, *, own: bool = False) -> str:
        # Random: stages of several hosts sharing one spool must not collide.
        owner = f"{self._host}@" if self._host else ""  # not "~": gone-<token>~<id> parses it
        kind = _OWN if own else ""
        return f"{self._dirs['tmp']}/{_STAGE_PREFIX}{owner}{kind}{os.urandom(8).hex()}"

    def accept(
        self,
        taken: TakenFile,
        job_id: str,
        status: dict[str, Any],
        log_text: str,
        *,
        schedule: bool = False,
        sync: bool = True,
    ) -> JobDir:
        """Turn a staged file into pending/<job_id>; raise DuplicateJob if the id exists anywhere.

        ``schedule``: into scheduled/<job_id> instead, replacing a schedule of that id (one
        atomic exchange: the old definition is there up to the instant the new one is).
        ``prepare``, ``settle`` and ``place`` in one: for one file at a time; ``sync`` as
        ``place``'s.
        """
        prepared = self.prepare(taken, job_id, status, log_text, schedule=schedule)
        self.settle([prepared])
        return self.place(prepared, sync=sync)

    def prepare(
        self,
        taken: TakenFile,
        job_id: str,
        status: dict[str, Any],
        log_text: str,
        *,
        schedule: bool = False,
    ) -> Prepared:
        """Write a job's directory in its stage, beside the staged file: durable only once
        ``settle`` has been called on it, placed by ``place``. A schedule's has no
        ``artifacts/``: it never runs (each firing is a job of its own), and a directory
        less is one inode less for each of thousands registered."""
        check_job_id(job_id)
        stage = os.fspath(taken.stage)
        original = f"{stage}/{taken.name}"
        job_file = f"{stage}/job.yaml"
        # The original keeps its name to the last, so that recovery can give it back under
        # it; unless it is named like a file written beside it (a job file named status.json).
        # It is spoold's own copy already (take_incoming, stage_file, create_run).
        if taken.name in _STAGE_FILES:
            os.rename(original, job_file)
        # Plain writes: nobody else looks into a stage.
        for name, data in (("status.json", json_bytes(status)), ("log", log_text.encode())):
            if taken.ready:
                write_into(f"{stage}/{_READY}{name}", data)
                os.rename(f"{stage}/{_READY}{name}", f"{stage}/{name}")
            else:
                write_new(f"{stage}/{name}", data)
        if taken.ready:
            for name in _READY_DIRS:
                if schedule:
                    os.rmdir(f"{stage}/{_READY}{name}")
                else:  # units/ now, where a job's supervisor would make it on its way to start
                    os.rename(f"{stage}/{_READY}{name}", f"{stage}/{name}")
        elif not schedule:
            os.mkdir(f"{stage}/artifacts", _PRIVATE_DIR)
        if taken.name not in _STAGE_FILES:
            os.rename(original, job_file)
        numbered = not schedule and status.get("callback_delivery") is not None
        return Prepared(job_id, stage, original, job_file, schedule, taken.ready, numbered)

    def settle(self, prepared: Sequence[Prepared]) -> None:
        """Make prepared stages durable before any is placed: the job file, a status that
        names a change (``Prepared.numbered``), and the job directory's own entries (without
        them, a filesystem that orders no metadata, such as ext4 without a journal, may come
        back from a power loss with pending/<id> naming a directory that was never written).
        Many at once share one syncfs where it is safe."""
        paths = []
        for one in prepared:
            paths.append(one.job_file)
            if one.numbered:
                paths.append(f"{one.stage}/status.json")
            paths.append(one.stage)
        self._disk.barrier(paths)

    def place(self, prepared: Prepared, *, sync: bool = True) -> JobDir:
        """Rename a settled stage into pending/ (or scheduled/); DuplicateJob if its id is
        taken (the stage holds the staged file alone again). ``sync``: fsync the directory it
        went into now; else the caller does, once for several (``sync_placed``)."""
        stage, job_id = prepared.stage, prepared.job_id
        # Reserved only now that status.json names the id: recovery of a stage undoes a
        # reservation that names the stage. No fsync of ids/: the fsync of pending/ (or
        # scheduled/) commits it, as every metadata change before it.
        token: str | None = os.path.basename(stage)
        made = f"{stage}/{_READY_ID}" if prepared.ready else None
        if not self._ids.reserve(job_id, str(token), made=made):
            if made is not None:  # no place beside a job file, rejected or a schedule's
                os.unlink(made)
            found = self._jobs.find(job_id)
            if not (prepared.schedule and found is not None and found.directory == "scheduled"):
                _unstage(prepared)
                if found is None:  # a file of that id being placed, which may yet fail
                    raise JobBusy.held(job_id)
                raise DuplicateJob(f"a job with id {job_id!r} already exists in {found.directory}/")
            token = None  # a schedule replaced keeps the reservation it had
        try:
            if prepared.schedule:
                return self._place_schedule(stage, job_id, sync=sync)
            target = f"{self._dirs['pending']}/{job_id}"
            try:
                rename_noreplace(stage, target)
            except FileExistsError as exc:
                # A job from before ids/ existed that the spool's migration missed: the
                # reservation just made is now its.
                token = None
                _unstage(prepared)
                raise DuplicateJob(f"a job with id {job_id!r} already exists") from exc
        except BaseException:
            if token is not None:
                self._ids.unreserve(job_id, token)
            raise
        if sync:
            self._disk.sync(self._dirs["pending"])
        return JobDir(job_id, "pending", target)

    def sync_placed(self, *, schedules: bool) -> None:
        """The one fsync of pending/ (and of scheduled/) for jobs placed with ``sync=False``."""
        self._disk.sync(self._dirs["pending"], *([self._dirs["scheduled"]] if schedules else []))

    def _place_schedule(self, stage: str, job_id: str, *, sync: bool) -> JobDir:
        target = f"{self._dirs['scheduled']}/{job_id}"
        try:
            rename_noreplace(stage, target)
        except FileExistsError:
            # Marked before it goes: once exchanged, the old definition sits where the new one
            # was prepared, and recovery must delete it there, not give it back to incoming/
            # (where it would replace the new one). On the current definition the mark is inert.
            mark = f"{target}/{_REPLACED}"
            try:
                os.close(os.open(mark, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            except FileExistsError:
                mark = ""  # another's (a replacement under way elsewhere): not this one's to take
            try:
                stage = self._swap_definition(stage, target)
            except BaseException:
                # The stage is gone (taken over, this host found stale): what is in place
                # stays as it was, unmarked by this host.
                if mark:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(mark)
                raise
            with contextlib.suppress(FileNotFoundError):  # taken over: removed there
                self._remove_stage(stage)
        if sync:
            self._disk.sync(self._dirs["scheduled"])
        return JobDir(job_id, "scheduled", target)

    @staticmethod
    def _swap_definition(stage: str, target: str) -> str:
        """Put the definition prepared in ``stage`` in place of ``target``'s; where the old one
        is now, to be removed."""
        try:
            rename_exchange(stage, target)  # the old definition is in the stage now
        except OSError as exc:
            if exc.errno not in NO_EXCHANGE:
                raise  # the stage is gone: nothing was moved
            # No exchange here (NFS, sshfs): the old one goes first, for a moment, and comes
            # back should the new one not follow (never left out of scheduled/).
            os.rename(target, f"{stage}.old")
            try:
                os.rename(stage, target)
            except BaseException:
                os.rename(f"{stage}.old", target)
                raise
            return f"{stage}.old"
        return stage

    def create_run(
        self, schedule: JobDir, run_id: str, status: dict[str, Any], log_text: str
    ) -> JobDir:
        """A firing of a schedule: pending/<run_id> with the schedule's job.yaml, status, log.

        DuplicateJob if that run exists anywhere already: the firing was made before (a crash
        between making it and recording it), and must not be made twice.
        """
        data = self._jobs.read_job_file(schedule, sha256=status.get("sha256"))
        stage = self._new_stage(own=True)
        try:
            write_new(f"{stage}/job.yaml", data, mode=_PRIVATE_FILE)
            taken = TakenFile(
                name="job.yaml", stage=Path(stage), kind="file", size=len(data), data=data
            )
            return self.accept(taken, run_id, status, log_text)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise

    def reject(self, taken: TakenFile, reason: dict[str, Any]) -> Path:
        """Move a staged file into rejected/<name>/ beside a reason.json; return that directory."""
        stage = taken.stage
        if taken.ready:  # what was made ahead and not used has no place beside a rejected file
            _clear_ready(os.fspath(stage))
        if taken.name == "reason.json":  # the reason must not land on the file it is about
            os.rename(taken.original, stage / "reason.json.orig")
        write_file(stage / "reason.json", json_bytes(reason), durable=self._disk.durable)
        target = _move_to_free_name(stage, Path(self._dirs["rejected"]), taken.name)
        self._disk.sync(self._dirs["rejected"])
        return target

    def release(self, taken: TakenFile) -> str:
        """Undo a take that could not be finished: the file goes back into incoming/.

        A stage that is gone was recovered by another host (this one was stale to it: frozen,
        cut off) or was never made: it has nothing left to undo here.
        """
        try:
            return self._release(taken)
        except FileNotFoundError:
            if os.path.lexists(taken.stage):
                raise
            return f"{taken.name}: its stage was gone (another host recovered it)"

    def _release(self, taken: TakenFile) -> str:
        stage = taken.stage
        # The id a placing cut short may have left reserved for this stage (its own undo failed
        # too: a cut): given up first, as by recovery, for nothing else will name it once the
        # stage is gone (seen: a file given back, waiting "being accepted" for good).
        self._unreserve_staged(stage, stage.name)
        # Where accept() or reject() may have moved it; a file named like one spoold writes
        # was moved first, so its original name may now hold spoold's own file.
        moved = [stage / "job.yaml", stage / "reason.json.orig"]
        places = (
            [*moved, taken.original] if taken.name in _STAGE_FILES else [taken.original, *moved]
        )
        source = next((p for p in places if p.exists() or p.is_symlink()), None)
        if source is None and (stand_ins := _stand_ins(os.listdir(stage))):
            source = stage / stand_ins[0]
        if source is None:
            shutil.rmtree(stage)
            return f"{taken.name} was gone from its stage"
        if not self._marks and taken.owner is not None:
            _give_back_to(source, taken.owner)
        target = _move_to_free_name(source, Path(self._dirs["incoming"]), taken.name)
        return f"returned {taken.name} to incoming/ as {target.name}{self._emptied(stage)}"

    def _emptied(self, stage: Path) -> str:
        """Remove a stage whose submitter's file went back to incoming/; "" or what was left.

        Made one of spoold's own first, so that nothing left in it is ever given back in its
        turn: a stand-in (``_STAND_INS``) held open on this host is hidden again by FUSE as it
        is removed (ENOTEMPTY), and would be a second copy of the job. Left now (that, or a
        cut), it goes at this host's next start, and the give-back stands.
        """
        try:
            self._remove_stage(stage)
        except OSError as exc:
            return f"; its stage is left for later ({exc.strerror})"
        return ""

    def recover(self, hosts: frozenset[str] | None = None) -> list[str]:
        """Finish or undo intake that a crash interrupted; return what was done, for the log.

        At start (``hosts`` None): this host's stages, and those no host's name marks (made
        by an older spoold). Later, ``hosts``: the stages of those hosts only (found stale:
        a live host's stage is intake under way, not a leftover). Each is first renamed to a
        stage of this host's (one host wins it; its maker, should it wake, finds it gone and
        writes nothing into it), and recovered under the name its reservation holds.
        """
        done: list[str] = []
        with os.scandir(self._dirs["tmp"]) as entries:
            found = [Path(e.path) for e in entries]
        mine = {self._host, ""} if hosts is None else set(hosts)
        for stage in (p for p in found if p.name.startswith(_STAGE_PREFIX)):
            maker = stage.name[len(_STAGE_PREFIX) :].rpartition("@")[0]
            if maker not in mine:
                continue
            try:
                if hosts is not None:
                    taken = Path(self._new_stage_name(own=_is_own(stage.name)))
                    os.rename(stage, taken)
                    what = self._recover_stage(taken, token=stage.name)
                else:
                    what = self._recover_stage(stage)
            except FileNotFoundError:
                continue  # its maker finished it, or another host took it first
            except OSError as exc:
                done.append(f"could not recover stage {stage.name} yet: {exc}")
                continue
            if what is not None:
                done.append(what)
        spent = [p for p in found if p.name.startswith(SPENT_PREFIX)]
        for path in spent:  # nothing reads them: whoever finds one may remove it
            self.remove_spent(os.fspath(path))
        if spent:
            done.append(f"removed {len(spent)} submitted file(s) left after their copy")
        # Empty files made ahead by processes now gone (a worker killed): nothing to say.
        sweep_spares(self._dirs["tmp"], self._host, stale=hosts or ())
        if hosts is not None:
            return done
        for gone in (p for p in found if p.name.startswith(GONE_PREFIX)):
            self._ids.finish_removal(os.fspath(gone))  # a removal a crash cut short
            done.append(f"finished removing {gone.name}")
        for building in (p for p in found if p.name.startswith(MIGRATION_PREFIX)):
            shutil.rmtree(building, ignore_errors=True)  # Reservations.ensure() begins anew
        # A cache's copy being written when a crash came (the API's catalogue snapshot); an
        # hour old, so that no writer of a host sharing the spool still writes it.
        for torn in (p for p in found if p.name.startswith(TEMP_MARK) and ".snapshot." in p.name):
            with contextlib.suppress(FileNotFoundError):
                if time.time() - torn.lstat().st_mtime > 3600:
                    torn.unlink()
                    done.append(f"removed {torn.name}, a snapshot left half written")
        return done

    def _recover_stage(self, stage: Path, *, token: str | None = None) -> str | None:
        """``token``: the name the stage had when it reserved its job id (its own if None).
        What was done, for the log; None for a ready stage never used (``make_ready``)."""
        token = token or stage.name
        if _is_own(stage.name):
            # Whole or not, nobody's file: a firing not recorded is made again.
            self._unreserve_staged(stage, token)
            self._remove_stage(stage)
            return f"removed {stage.name}, a stage of spoold's own (nothing to give back)"
        names = [e.name for e in os.scandir(stage)]
        if names and all(name.startswith(_READY) for name in names):
            shutil.rmtree(stage)  # made ahead, and no file came: nothing to say
            return None
        # Never a submitter's file: a name never taken from incoming/, such as spoold's own
        # temporaries (TEMP_MARK) and what a network filesystem keeps of a file removed while
        # its host held it open (.fuse_hidden*, .nfs*), which a cut can leave in a stage for
        # good: it sorts first (seen: given back in place of the job file, deleted with the stage).
        entries = {name for name in names if not is_transient_name(name)}
        if _REPLACED in entries:  # a schedule's old definition, replaced: what was left to do
            if self._restore_definition(stage):
                return f"put a schedule's definition back in scheduled/ ({stage.name})"
            self._remove_stage(stage)
            return f"finished removing a replaced schedule definition ({stage.name})"
        originals = sorted(entries - _STAGE_FILES)
        # A file named like one spoold writes (a job file named log, or reason.json) is renamed
        # away (to job.yaml, reason.json.orig) before anything is written beside it: alone,
        # it is the submitter's, taken just before the crash.
        alone = len(entries) == 1 and not originals and not entries & {"job.yaml", _HANDED_OVER}
        if alone:
            originals = sorted(entries)
        # No file of the submitter's nor job.yaml: only a stand-in can hold the job's bytes.
        stand_ins = [] if originals or "job.yaml" in entries else _stand_ins(names)
        if _HANDED_OVER in entries:
            self._unreserve_staged(stage, token)
            self._remove_stage(stage)
            return f"removed job file {stage.name} handed over by the API and not yet accepted"
        if "reason.json" in entries and not alone:
            reason = json.loads((stage / "reason.json").read_bytes())
            target = _move_to_free_name(
                stage, Path(self._dirs["rejected"]), str(reason.get("file"))
            )
            return f"finished rejecting {target.name}"
        if originals or "job.yaml" in entries or stand_ins:
            # Taken but not yet accepted: back to incoming/ to be taken again, and the id it
            # may have reserved given up. A file already renamed to job.yaml is named after
            # the source recorded beside it, if any.
            self._unreserve_staged(stage, token)
            # Each original, should there ever be more than one: the stage is deleted after.
            sources = (
                [(n, n) for n in originals]
                or [
                    (n, self._staged_source(stage, f"recovered-{stage.name}.yaml"))
                    for n in stand_ins
                ]
                or [("job.yaml", self._staged_source(stage))]
            )
            given = [
                f"{name} to incoming/ as "
                + _move_to_free_name(stage / entry, Path(self._dirs["incoming"]), name).name
                for entry, name in sources
            ]
            return f"returned {', '.join(given)} (intake was interrupted){self._emptied(stage)}"
        shutil.rmtree(stage)
        return f"removed empty stage {stage.name}"

    def _restore_definition(self, stage: Path) -> bool:
        """Put a replaced definition back where no other is (its replacement, where there is
        no exchange, was cut between its two renames: the new one goes back to incoming/ from
        its own stage); whether it was."""
        job_id = self._staged_id(stage)
        if job_id is None:
            return False
        target = f"{self._dirs['scheduled']}/{job_id}"
        if os.path.lexists(target):
            return False
        try:
            rename_noreplace(stage, target)
        except FileExistsError:  # the new one came meanwhile
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{target}/{_REPLACED}")
        self._disk.sync(self._dirs["scheduled"])
        return True

    @staticmethod
    def _staged_status(stage: Path) -> dict[str, Any]:
        return read_json(f"{stage}/status.json") or {}

    def _staged_id(self, stage: Path) -> str | None:
        """The job id a stage's status.json names, if it is one."""
        job_id = self._staged_status(stage).get("job_id")
        return job_id if isinstance(job_id, str) and RUN_ID.match(job_id) else None

    def _unreserve_staged(self, stage: Path, token: str) -> None:
        """Give up the id the stage's status.json names, if ``token`` (the name the stage had
        when it reserved it) still holds it."""
        if (job_id := self._staged_id(stage)) is not None:
            self._ids.unreserve(job_id, token)

    def _staged_source(self, stage: Path, unknown: str = "job.yaml") -> str:
        source = self._staged_status(stage).get("source")
        return str(source) if source else unknown

    def idle_reservation(self, job_id: str) -> str | None:
        """The token of ``job_id``'s reservation if it names nothing under way: no job of that
        id, no stage of that name (a file being placed), no removal of it; else None.

        Left so by a placing whose undo failed with it (a host cut off), or by a job removed
        by hand: nothing else would ever give it up. The caller decides how long one must
        stand so (a job moving between directories can be missed by one look).
        """
        token = self._ids.holder(job_id)
        if token is None or "/" in token or token in (".", ".."):
            return None  # none, or not a name spoold gives
        tmp = self._dirs["tmp"]
        if os.path.lexists(f"{tmp}/{token}") or os.path.lexists(
            f"{tmp}/{GONE_PREFIX}{token}~{job_id}"
        ):
            return None
        if self._jobs.find(job_id) is not None:
            return None
        return token

    # -- rejected files --------------------------------------------------------------------------

    def list_rejected(self) -> list[tuple[str, dict[str, Any] | None]]:
        """Every entry of rejected/, by name, with its reason.json (None where it has none, or
        this user may not read it)."""
        with os.scandir(self._dirs["rejected"]) as entries:
            names = sorted(
                e.name for e in entries if e.is_dir(follow_symlinks=False) and e.name[0] != "."
            )
        return [(name, self.read_rejection(name)) for name in names]

    def read_rejection(self, name: str) -> dict[str, Any] | None:
        """rejected/<name>/reason.json, or None."""
        try:
            return read_json(f"{self._dirs['rejected']}/{_entry_name(name)}/reason.json")
        except OSError:  # not this user's to read
            return None

    def purge_rejected(self, name: str) -> None:
        """Remove rejected/<name> as a job is removed: out of the tree in one rename, then
        deleted; FileNotFoundError if it is gone."""
        gone = f"{self._dirs['tmp']}/{GONE_PREFIX}{new_token('rejected-')}"
        os.rename(f"{self._dirs['rejected']}/{_entry_name(name)}", gone)
        self._disk.sync(self._dirs["rejected"])
        self._ids.finish_removal(gone)

    def decided(self, stage: str) -> bool:
        """Whether intake's stage was turned into a rejection (or is gone: moved on)."""
        path = os.path.join(self._dirs["tmp"], os.path.basename(stage))
        return not os.path.isdir(path) or os.path.exists(f"{path}/reason.json")


def _entry_name(name: str) -> str:
    """``name`` if it names an entry of a directory, never a path out of it."""
    if "/" in name or name in ("", ".", ".."):
        raise SpoolError(f"{name!r} is not a name of an entry")
    return name


def _is_own(stage_name: str) -> bool:
    """Whether a stage holds a job file of spoold's own (``_OWN``), by its name."""
    return stage_name[len(_STAGE_PREFIX) :].rpartition("@")[2].startswith(_OWN)


def _unstage(prepared: Prepared) -> None:
    """Undo prepare's writes: the stage holds the file alone again, as reject() expects.

    The file gets its name back first, where no file of spoold's has it: until then its
    name is known only from status.json, and a stage taken over meanwhile (this host
    found stale) would give it back to incoming/ as job.yaml once status.json was gone."""
    if os.path.basename(prepared.original) not in _STAGE_FILES:
        os.rename(prepared.job_file, prepared.original)
    for leftover in ("status.json", "log"):
        os.unlink(f"{prepared.stage}/{leftover}")
    if not prepared.schedule:
        os.rmdir(f"{prepared.stage}/artifacts")
        with contextlib.suppress(FileNotFoundError):  # made by prepare from a ready stage only
            os.rmdir(f"{prepared.stage}/{UNITS}")
    if os.path.basename(prepared.original) in _STAGE_FILES:
        os.rename(prepared.job_file, prepared.original)


def _stand_ins(names: Iterable[str]) -> list[str]:
    """The stand-ins (``_STAND_INS``) among a stage's entries, by name."""
    return sorted(name for name in names if name.startswith(_STAND_INS))


def _clear_ready(stage: str) -> None:
    """Remove what is left of a ready stage's entries made ahead (``make_ready``)."""
    for name in (_READY_COPY, _READY_ID, *(_READY + n for n in _READY_FILES)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{stage}/{name}")
    for name in _READY_DIRS:
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(f"{stage}/{_READY}{name}")


#: The longest name of a directory's entry, in bytes, where the file system does not say.
NAME_MAX = 255


def name_max(directory: str | Path) -> int:
    """The longest name an entry of ``directory`` may have, in bytes (NAME_MAX: 255 on most
    file systems, less on some, such as eCryptfs)."""
    try:
        return min(os.pathconf(directory, "PC_NAME_MAX"), NAME_MAX)
    except (OSError, ValueError):
        return NAME_MAX


def fit_name(text: str, size: int) -> str:
    """The longest start of ``text`` that takes at most ``size`` bytes in the file system's
    encoding, cut between characters (a character cut in two would be a name that is not
    UTF-8); bytes that were not UTF-8 to begin with count one each."""
    used = 0
    for end, char in enumerate(text):
        used += len(os.fsencode(char))
        if used > size:
            return text[:end]
    return text


def _free_names(name: str, longest: int = NAME_MAX) -> Iterator[str]:
    """name, then name-2.yaml, name-3.yaml, ...: the suffix stays, so a job file stays one.

    Each fits in ``longest`` bytes: the stem is shortened (from its end) where the number
    would not fit beside it, so that a name already as long as a name can be still gets a
    free one. Names shortened alike differ by their number; the full name is the caller's to
    keep (a rejection's reason.json has it).
    """
    stem, dot, suffix = name.rpartition(".")
    if not (dot and stem) or len(os.fsencode(suffix)) > longest // 2:
        stem, suffix = name, ""  # no suffix, or one too long to be a job file's: all stem
    ending = f".{suffix}" if suffix else ""
    if len(os.fsencode(name)) <= longest:
        yield name
    else:  # longer than its new directory allows (another file system): shortened too
        yield fit_name(stem, longest - len(os.fsencode(ending))) + ending
    for n in range(2, 10_000):
        number = f"-{n}{ending}"
        yield fit_name(stem, longest - len(os.fsencode(number))) + number


def _move_to_free_name(source: Path, parent: Path, name: str) -> Path:
    """Rename ``source`` into ``parent`` under the first free name that fits there (see
    ``_free_names``); never replaces anything."""
    for candidate in _free_names(name, name_max(parent)):
        try:
            rename_noreplace(source, parent / candidate)
        except FileExistsError:
            continue
        return parent / candidate
    raise SpoolError(f"no free name for {name!r} in {parent}")


def _signature(st: os.stat_result) -> FileSignature:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "other"


def _has_local_writer(fd: int) -> bool | None:
    """Whether a process on this host has the file open for writing; None if unknowable.

    A read lease is granted only when nobody holds the file open for writing, which is
    exactly "the writer (scp, cp, an editor) has closed it". Released at once, so that no
    lease-break signal can reach us.
    """
    try:
        fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            return True
        return None  # EACCES (not our file, no CAP_LEASE), EINVAL (NFS and friends)
    fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_UNLCK)
    return False


def _give_back_to(path: Path, owner: FileOwner) -> None:
    """Where no ``SUBMITTER_MARK`` can be kept, spoold's copy given back as its submitter's:
    their owner and mode, where spoold may give them (as root)."""
    st = path.lstat()
    if not stat.S_ISREG(st.st_mode) or FileOwner.of(st) == owner:
        return
    with contextlib.suppress(PermissionError):
        os.chown(path, owner.uid, owner.gid, follow_symlinks=False)
        os.chmod(path, owner.mode & 0o777)
