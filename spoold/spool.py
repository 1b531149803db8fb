"""The spool tree: the only code that creates, renames or removes anything under it.

A job's state is the directory it sits in; every transition is one rename(2) of its directory.

What is fsynced, and why no more: on a journaling filesystem (ext4, xfs: the supported ones) a
rename is one journal operation, and an fsync of a directory commits every metadata change made
before it, in order. So each transition fsyncs the content that cannot be rebuilt (the job file
as submitted; the final status and log), renames, then fsyncs the directory it renamed into:

- accept:  fsync job.yaml, rename the stage into pending/, fsync pending/. status.json and the
           first log line are derived from job.yaml; recovery rebuilds a status lost to power
           loss (``repair_pending``).
- claim:   rename into running/, fsync running/, before any process of the job starts: after a
           power loss a job that may have started is never found in pending/ again.
- finish:  fsync status.json and log, rename into done/ or failed/, fsync that directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import itertools
import json
import os
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple

from spoold.errors import (
    DuplicateJob,
    InvalidTransition,
    JobFileChanged,
    JobNotFound,
    SpoolError,
)
from spoold.ids import RUN_ID
from spoold.procfs import process_start_time
from spoold.states import JOB_DIRECTORIES, JobState, check_transition

SPOOL_DIRECTORIES = (
    "incoming", "pending", "running", "done", "failed", "rejected", "scheduled", "outbox", "ids",
    "tmp",
)  # fmt: skip
#: Directories an older spoold did not make: created (and filled) when the spool is opened.
_ADDED_LATER = frozenset({"ids"})

# Writers drop files here; spoold alone reads the rest. The sticky bit: a submitter can neither
# rename nor delete another's file (swapping a file another user is about to have validated).
_MODES = {"incoming": 0o1770}
_DEFAULT_MODE = 0o750
# A job file (job.yaml, a rejected file's copy) may hold secrets written into it: spoold's
# alone, as a job's artifacts/ (its unmasked output). status.json and log (secrets masked)
# are readable by the group of the directory they are made in (the package's spoold-submit).
_PRIVATE_FILE, _PRIVATE_DIR = 0o600, 0o700

_F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)
_STAGE_PREFIX = "in-"
_GONE_PREFIX = "gone-"  # a job or schedule being deleted: gone-<its reservation>~<job id>
_MIGRATION_PREFIX = "ids-"  # ids/ being filled for a spool made by an older spoold
_TEMP_MARK = ".spoold-"
# The files spoold writes into a stage; a staged original is any other entry.
_STAGE_FILES = frozenset({"job.yaml", "status.json", "log", "artifacts", "reason.json"})
_REPLACED = "replaced"  # in a schedule's directory: its definition is being replaced
_PREPARED = ".prepared"  # an outbox delivery whose state change is not made yet
_CANCEL_FILE = "cancel"  # in running/<id>/: spoold cancel's request to the job's worker
_counter = itertools.count()

#: What tells one version of a file from the next without reading it.
FileSignature = tuple[int, int, int, int]
#: Whether the file ``name``, as ``signature`` shows it now, has been left alone long enough.
QuietCheck = Callable[[str, FileSignature], bool]


def is_transient_name(name: str) -> bool:
    """Names writers use while a file is incomplete: never taken from incoming/."""
    return name.startswith(".") or name.endswith((".tmp", ".part"))


class JobDir(NamedTuple):
    """Where a job is: its id, the state directory it sits in, and that directory's path."""

    job_id: str
    directory: str
    location: str  # a string: the per-job paths are built often enough for pathlib to show

    @property
    def path(self) -> Path:
        return Path(self.location)

    @property
    def status_path(self) -> Path:
        return Path(self.location, "status.json")

    @property
    def log_path(self) -> Path:
        return Path(self.location, "log")

    @property
    def job_file(self) -> Path:
        return Path(self.location, "job.yaml")


class TakenFile(NamedTuple):
    """A file moved out of incoming/ into a private stage, ready to be accepted or rejected."""

    name: str
    stage: Path
    kind: str  # file | symlink | directory | fifo | socket | device | other
    size: int
    data: bytes | None  # the content, for regular files no larger than the limit
    links: int = 1  # names the file had when taken: more than one is a hard link

    @property
    def original(self) -> Path:
        return self.stage / self.name


class Spool:
    """A spool directory tree and every operation on it."""

    def __init__(self, root: Path, *, durable: bool = True) -> None:
        # Absolute: job paths are handed to jobs (SPOOLD_JOB_DIR), which run elsewhere.
        self.root = Path(os.path.abspath(root))
        self.durable = durable
        self._dirs = {name: os.path.join(root, name) for name in SPOOL_DIRECTORIES}
        self._syncers = {path: _GroupSync(path) for path in self._dirs.values()}

    def dir(self, name: str) -> Path:
        """The path of one of the spool's top-level directories."""
        if name not in self._dirs:
            raise SpoolError(f"no spool directory named {name!r}")
        return Path(self._dirs[name])

    # -- the tree --------------------------------------------------------------------------

    def init(self) -> None:
        """Create the tree with safe permissions, whatever the umask.

        Existing directories keep their owner and mode, except that ``incoming/`` gets the
        sticky bit it lacked before; a spool made by an older spoold gets ``ids/`` filled.
        """
        if not self.root.is_dir():
            self.root.mkdir(mode=_DEFAULT_MODE, parents=True)
            self.root.chmod(_DEFAULT_MODE)  # mkdir's mode is masked by the umask
        elif (mode := stat.S_IMODE(self.root.stat().st_mode)) & 0o027:
            # Only ever tightened: a checkout's spool/ comes as 0755, every job's log readable
            # by every user of the host.
            self.root.chmod(mode & ~0o027)
        for name in SPOOL_DIRECTORIES:
            path = self.root / name
            mode = _MODES.get(name, _DEFAULT_MODE)
            if name in _ADDED_LATER:
                continue
            if not path.is_dir():
                path.mkdir(mode=mode)
                path.chmod(mode)
            elif mode & stat.S_ISVTX and not path.stat().st_mode & stat.S_ISVTX:
                path.chmod(path.stat().st_mode | stat.S_ISVTX)
        self.ensure_reservations()

    def check(self) -> None:
        """Raise SpoolError unless every directory of the tree exists."""
        missing = [
            n for n in SPOOL_DIRECTORIES if n not in _ADDED_LATER and not (self.root / n).is_dir()
        ]
        if missing:
            raise SpoolError(
                f"{self.root} is not a spool (missing {', '.join(missing)}): "
                f"run 'spoold init --spool {self.root}'"
            )

    def unsafe_permissions(self) -> list[str]:
        """What would let users other than spoold's own (and root) put jobs into the tree, each
        with its fix. Only incoming/ may be writable by its group (the submitters'), and only
        with the sticky bit. The directories above the spool count too, as OpenSSH's
        StrictModes counts a home directory's: whoever may rename an ancestor may put another
        tree in the spool's place, unless the sticky bit stops them."""
        problems = []
        me = os.geteuid()
        for above in _ancestors(self.root):
            info = os.stat(above)
            sticky = info.st_mode & stat.S_ISVTX
            if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky:
                who = "everyone" if info.st_mode & stat.S_IWOTH else "its group"
                problems.append(
                    f"{above}, above the spool, is writable by {who}: chmod go-w {above} "
                    f"(or chmod +t {above})"
                )
            if info.st_uid not in (me, 0):
                problems.append(
                    f"{above}, above the spool, belongs to uid {info.st_uid}: chown root {above}"
                )
        for name in ("", *SPOOL_DIRECTORIES):
            path = self.root / name if name else self.root
            try:
                info = path.stat()
            except FileNotFoundError:
                continue  # ids/ of an older spool: made with the right mode when opened
            if info.st_mode & stat.S_IWOTH:
                problems.append(f"{path} is writable by everyone: chmod o-w {path}")
            if info.st_mode & stat.S_IWGRP and name != "incoming":
                problems.append(f"{path} is writable by its group: chmod g-w {path}")
            unguarded = not info.st_mode & stat.S_ISVTX
            if info.st_mode & stat.S_IWGRP and name == "incoming" and unguarded:
                problems.append(
                    f"{path} is writable by its group without the sticky bit, so a submitter "
                    f"could replace another's file: chmod +t {path}"
                )
            if info.st_uid not in (me, 0):
                owner = f"{me}:{os.getegid()}"
                problems.append(
                    f"{path} belongs to uid {info.st_uid}, who could open it to anyone: "
                    f"chown {owner} {path}"
                )
        return problems

    # -- job ids -----------------------------------------------------------------------------
    # ids/<job_id> reserves a job id for as long as the job's record is kept, across every
    # state: a symlink (made in one step, and never replacing anything) whose target is a
    # token naming who reserved it, the intake stage that made it. Checking the state
    # directories one after another cannot do this: a job moves between them while they are
    # looked at, and two files naming one id would both get in.

    def ensure_reservations(self) -> int:
        """Make ids/ for a spool made before it existed: reserve every job's id; return how many.

        Filled under another name and renamed into place, so that no job is accepted against
        a half-filled ids/ (accept fails while ids/ is missing, and the file waits).
        """
        ids = self._dirs["ids"]
        if os.path.isdir(ids):
            return 0
        tmp = self._dirs["tmp"]
        building = f"{tmp}/{_MIGRATION_PREFIX}{os.urandom(8).hex()}"
        os.mkdir(building, _DEFAULT_MODE)
        os.chmod(building, _DEFAULT_MODE)
        count = 0
        for directory in (*JOB_DIRECTORIES, "scheduled"):
            with os.scandir(self._dirs[directory]) as entries:
                names = [e.name for e in entries if RUN_ID.match(e.name)]
            for name in names:
                with contextlib.suppress(FileExistsError):
                    os.symlink(_new_token("mig-"), f"{building}/{name}")
                    count += 1
        try:
            rename_noreplace(building, ids)
        except FileExistsError:  # another spoold did the same a moment ago
            shutil.rmtree(building)
            return 0
        self._sync_dirs(self._dirs["tmp"])
        return count

    def hidden(self, names: tuple[str, ...] = (*JOB_DIRECTORIES, "scheduled")) -> list[str]:
        """Those of the tree's directories this process may not look into (a submitter's CLI)."""
        return [
            n
            for n in names
            if os.path.isdir(self._dirs[n]) and not os.access(self._dirs[n], os.X_OK)
        ]

    def reserved(self, job_id: str) -> bool:
        """Whether a job (or a schedule, or a file being accepted) holds this id."""
        _check_job_id(job_id)
        return os.path.lexists(f"{self._dirs['ids']}/{job_id}")

    def _reserve(self, job_id: str, token: str) -> bool:
        """Reserve ``job_id`` for ``token``; False if it is held already."""
        try:
            os.symlink(token, f"{self._dirs['ids']}/{job_id}")
        except FileExistsError:
            return False
        return True

    def _reservation(self, job_id: str) -> str | None:
        try:
            return os.readlink(f"{self._dirs['ids']}/{job_id}")
        except OSError:  # none, or not a reservation spoold made
            return None

    def _unreserve(self, job_id: str, token: str) -> None:
        """Give ``job_id`` up, if ``token`` still holds it (never another job's reservation)."""
        if self._reservation(job_id) == token:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self._dirs['ids']}/{job_id}")

    # -- incoming ----------------------------------------------------------------------------

    def list_incoming(self) -> list[str]:
        """Names in incoming/ that are not marked as still being written."""
        with os.scandir(self.dir("incoming")) as entries:
            return sorted(e.name for e in entries if not is_transient_name(e.name))

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
            stage = self._new_stage()
            try:
                os.rename(path, f"{stage}/{name}")
            except FileNotFoundError:
                os.rmdir(stage)
                return None
        finally:
            if fd >= 0:
                os.close(fd)
        if kind != "file":
            return TakenFile(name=name, stage=Path(stage), kind=kind, size=st.st_size, data=None)
        return self._own_copy(name, stage, max_size, checked=(st.st_dev, st.st_ino))

    def _own_copy(
        self, name: str, stage: str, max_size: int, *, checked: tuple[int, int]
    ) -> TakenFile | None:
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
            return TakenFile(name=name, stage=Path(stage), kind=kind, size=size, data=None)
        try:
            st = os.fstat(fd)
            kind = _kind(st.st_mode)
            if kind == "file" and (st.st_dev, st.st_ino) != checked and _has_local_writer(fd):
                # Renamed over the checked file while still being written: not complete.
                _move_to_free_name(Path(staged), self.dir("incoming"), name)
                os.rmdir(stage)
                return None
            if kind != "file" or st.st_size > max_size:
                return TakenFile(name=name, stage=Path(stage), kind=kind, size=st.st_size,
                                 data=None, links=st.st_nlink)  # fmt: skip
            data = _read_limited(fd, max_size + 1)
        finally:
            os.close(fd)
        if len(data) <= max_size:
            temp = f"{stage}/{_TEMP_MARK}copy"
            try:
                _write_new(temp, data, mode=_PRIVATE_FILE)
                os.replace(temp, staged)
            except BaseException:  # a full disk: the file goes back, to be tried again
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
                _move_to_free_name(Path(staged), self.dir("incoming"), name)
                os.rmdir(stage)
                raise
        return TakenFile(name=name, stage=Path(stage), kind="file", size=len(data),
                         data=data if len(data) <= max_size else None, links=st.st_nlink)  # fmt: skip

    def submit_file(self, name: str, data: bytes) -> Path:
        """Place a job file into incoming/ atomically, never over an existing file.

        Written under a transient name and fsynced, then renamed to a free final name.
        """
        incoming = self.dir("incoming")
        temp = incoming / f".{name}.{os.urandom(4).hex()}.tmp"
        self._write_file(temp, data, durable=self.durable)
        try:
            target = _move_to_free_name(temp, incoming, name)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        self._sync_dirs(incoming)
        return target

    def stage_file(self, source: Path, *, max_size: int) -> TakenFile:
        """Copy a file from outside the spool into a stage, as if it had been taken from incoming/."""
        stage = Path(self._new_stage())
        target = stage / source.name
        size = source.stat().st_size
        data = _read_limited_path(source, max_size + 1) if size <= max_size else None
        if data is not None:
            _write_new(target, data, mode=_PRIVATE_FILE)  # a stage is private: no atomic replace
        return TakenFile(name=source.name, stage=stage, kind="file", size=size, data=data)

    def _new_stage(self) -> str:
        # Random: stages of several hosts sharing one spool must not collide.
        stage = f"{self._dirs['tmp']}/{_STAGE_PREFIX}{os.urandom(8).hex()}"
        os.mkdir(stage, _DEFAULT_MODE)
        return stage

    def accept(
        self,
        taken: TakenFile,
        job_id: str,
        status: dict[str, Any],
        log_text: str,
        *,
        schedule: bool = False,
    ) -> JobDir:
        """Turn a staged file into pending/<job_id>; raise DuplicateJob if the id exists anywhere.

        ``schedule``: into scheduled/<job_id> instead, replacing a schedule of that id (one
        atomic exchange: the old definition is there up to the instant the new one is).
        """
        _check_job_id(job_id)
        stage = os.fspath(taken.stage)
        original = f"{stage}/{taken.name}"
        job_file = f"{stage}/job.yaml"
        # The original keeps its name to the last, so that recovery can give it back under
        # it; unless it is named like a file written beside it (a job file named status.json).
        # It is spoold's own copy already (take_incoming, stage_file, create_run).
        if taken.name in _STAGE_FILES:
            os.rename(original, job_file)
        # Plain writes: nobody else looks into a stage.
        _write_new(f"{stage}/status.json", _json_bytes(status))
        _write_new(f"{stage}/log", log_text.encode())
        os.mkdir(f"{stage}/artifacts", _PRIVATE_DIR)
        if taken.name not in _STAGE_FILES:
            os.rename(original, job_file)
        if self.durable:
            _fsync_path(job_file)
            # The job directory's own entries: without this, a filesystem that orders no
            # metadata (ext4 without a journal, as on the benchmark machine) may come back from
            # a power loss with pending/<id> naming a directory that was never written.
            _fsync_path(stage)
        # Reserved only now that status.json names the id: recovery of a stage undoes a
        # reservation that names the stage. No fsync of ids/: the fsync of pending/ (or
        # scheduled/) below commits it, as every metadata change before it.
        token: str | None = os.path.basename(stage)
        if not self._reserve(job_id, str(token)):
            found = self.find(job_id)
            if not (schedule and found is not None and found.directory == "scheduled"):
                _unstage(stage, original, job_file)
                where = f" in {found.directory}/" if found else " (its file is being accepted)"
                raise DuplicateJob(f"a job with id {job_id!r} already exists{where}")
            token = None  # a schedule replaced keeps the reservation it had
        try:
            if schedule:
                return self._place_schedule(stage, job_id)
            target = f"{self._dirs['pending']}/{job_id}"
            try:
                rename_noreplace(stage, target)
            except FileExistsError as exc:
                # A job from before ids/ existed that the spool's migration missed: the
                # reservation just made is now its.
                token = None
                _unstage(stage, original, job_file)
                raise DuplicateJob(f"a job with id {job_id!r} already exists") from exc
        except BaseException:
            if token is not None:
                self._unreserve(job_id, token)
            raise
        self._sync_dirs(self._dirs["pending"])
        return JobDir(job_id, "pending", target)

    def _place_schedule(self, stage: str, job_id: str) -> JobDir:
        target = f"{self._dirs['scheduled']}/{job_id}"
        try:
            rename_noreplace(stage, target)
        except FileExistsError:
            # Marked before it goes: once exchanged, the old definition sits where the new one
            # was prepared, and recovery must delete it there, not give it back to incoming/
            # (where it would replace the new one). On the current definition the mark is inert.
            os.close(
                os.open(f"{target}/{_REPLACED}", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            )
            try:
                rename_exchange(stage, target)  # the old definition is in the stage now
            except OSError:  # no exchange here (NFS): the old one goes first, for a moment
                os.rename(target, f"{stage}.old")
                os.rename(stage, target)
                stage = f"{stage}.old"
            shutil.rmtree(stage)
        self._sync_dirs(self._dirs["scheduled"])
        return JobDir(job_id, "scheduled", target)

    def unschedule(self, job_id: str) -> None:
        """Remove scheduled/<job_id> (the runs it made stay); JobNotFound if there is none."""
        _check_job_id(job_id)
        try:
            self._remove(JobDir(job_id, "scheduled", f"{self._dirs['scheduled']}/{job_id}"))
        except FileNotFoundError:
            raise JobNotFound(f"no schedule {job_id!r} in {self.root}") from None

    def purge(self, job: JobDir) -> None:
        """Remove a finished job (retention, ``spoold purge``); FileNotFoundError if gone."""
        if job.directory not in ("done", "failed"):
            raise InvalidTransition(f"only a finished job can be purged, not {job}")
        self._remove(job)

    def _remove(self, job: JobDir) -> None:
        """Out of the tree in one rename, then deleted: no half-deleted job is ever seen.

        Its id is given up once it is out of the tree; the name it goes out under says
        which reservation was its, so that recovery finishes a removal cut short without
        touching a reservation made since by another job of that id.
        """
        token = self._reservation(job.job_id) or _new_token("none-")
        gone = f"{self._dirs['tmp']}/{_GONE_PREFIX}{token}~{job.job_id}"
        os.rename(job.location, gone)
        self._sync_dirs(self._dirs[job.directory])
        self._finish_removal(gone)

    def _finish_removal(self, gone: str) -> None:
        token, _, job_id = os.path.basename(gone)[len(_GONE_PREFIX) :].partition("~")
        if job_id and RUN_ID.match(job_id):
            self._unreserve(job_id, token)
        shutil.rmtree(gone, ignore_errors=True)

    def create_run(
        self, schedule: JobDir, run_id: str, status: dict[str, Any], log_text: str
    ) -> JobDir:
        """A firing of a schedule: pending/<run_id> with the schedule's job.yaml, status, log.

        DuplicateJob if that run exists anywhere already: the firing was made before (a crash
        between making it and recording it), and must not be made twice.
        """
        data = self.read_job_file(schedule, sha256=status.get("sha256"))
        stage = self._new_stage()
        try:
            _write_new(f"{stage}/job.yaml", data, mode=_PRIVATE_FILE)
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
        if taken.name == "reason.json":  # the reason must not land on the file it is about
            os.rename(taken.original, stage / "reason.json.orig")
        self._write_file(stage / "reason.json", _json_bytes(reason), durable=self.durable)
        target = _move_to_free_name(stage, self.dir("rejected"), taken.name)
        self._sync_dirs(self.dir("rejected"))
        return target

    def release(self, taken: TakenFile) -> str:
        """Undo a take that could not be finished: the file goes back into incoming/."""
        stage = taken.stage
        # Where accept() or reject() may have moved it; a file named like one spoold writes
        # was moved first, so its original name may now hold spoold's own file.
        moved = [stage / "job.yaml", stage / "reason.json.orig"]
        places = (
            [*moved, taken.original] if taken.name in _STAGE_FILES else [taken.original, *moved]
        )
        source = next((p for p in places if p.exists() or p.is_symlink()), None)
        if source is None:
            shutil.rmtree(stage)
            return f"{taken.name} was gone from its stage"
        target = _move_to_free_name(source, self.dir("incoming"), taken.name)
        shutil.rmtree(stage)
        return f"returned {taken.name} to incoming/ as {target.name}"

    def sync_tree(self) -> None:
        """fsync every top-level directory: at start, so that the first jobs do not pay for
        whatever metadata of the tree is still unwritten (a fresh ``init`` takes ~0.1 s here)."""
        self._sync_dirs(*(self._dirs[name] for name in SPOOL_DIRECTORIES))

    def recover_stages(self) -> list[str]:
        """Finish or undo intake that a crash interrupted; return what was done, for the log."""
        done: list[str] = []
        with os.scandir(self.dir("tmp")) as entries:
            found = [Path(e.path) for e in entries]
        for stage in (p for p in found if p.name.startswith(_STAGE_PREFIX)):
            done.append(self._recover_stage(stage))
        for gone in (p for p in found if p.name.startswith(_GONE_PREFIX)):
            self._finish_removal(os.fspath(gone))  # a removal a crash cut short
            done.append(f"finished removing {gone.name}")
        for building in (p for p in found if p.name.startswith(_MIGRATION_PREFIX)):
            shutil.rmtree(building, ignore_errors=True)  # ensure_reservations() begins anew
        return done

    def _recover_stage(self, stage: Path) -> str:
        entries = {e.name for e in os.scandir(stage) if not e.name.startswith(_TEMP_MARK)}
        if _REPLACED in entries:  # a schedule's old definition, replaced: what was left to do
            shutil.rmtree(stage)
            return f"finished removing a replaced schedule definition ({stage.name})"
        originals = sorted(entries - _STAGE_FILES)
        if "reason.json" in entries:
            reason = json.loads((stage / "reason.json").read_bytes())
            target = _move_to_free_name(stage, self.dir("rejected"), str(reason.get("file")))
            return f"finished rejecting {target.name}"
        if originals or "job.yaml" in entries:
            # Taken but not yet accepted: back to incoming/ to be taken again, and the id it
            # may have reserved given up. A file already renamed to job.yaml is named after
            # the source recorded beside it, if any.
            job_id = self._staged_status(stage).get("job_id")
            if isinstance(job_id, str) and RUN_ID.match(job_id):
                self._unreserve(job_id, stage.name)
            source = stage / (originals[0] if originals else "job.yaml")
            name = originals[0] if originals else self._staged_source(stage)
            target = _move_to_free_name(source, self.dir("incoming"), name)
            shutil.rmtree(stage)
            return f"returned {name} to incoming/ as {target.name} (intake was interrupted)"
        shutil.rmtree(stage)
        return f"removed empty stage {stage.name}"

    @staticmethod
    def _staged_status(stage: Path) -> dict[str, Any]:
        return _read_json(f"{stage}/status.json") or {}

    def _staged_source(self, stage: Path) -> str:
        source = self._staged_status(stage).get("source")
        return str(source) if source else "job.yaml"

    # -- jobs ------------------------------------------------------------------------------------

    def find(self, job_id: str) -> JobDir | None:
        """Where the job is now, looked up in the order jobs move so that none is missed."""
        _check_job_id(job_id)
        for directory in (*JOB_DIRECTORIES, "scheduled"):
            path = f"{self._dirs[directory]}/{job_id}"
            if os.path.isdir(path):
                return JobDir(job_id, directory, path)
        return None

    def get(self, job_id: str) -> JobDir:
        """Like find(), but raise JobNotFound."""
        found = self.find(job_id)
        if found is None:
            raise JobNotFound(f"no job {job_id!r} in {self.root}")
        return found

    def list_jobs(self, directory: str) -> list[JobDir]:
        """The jobs in one state directory, oldest arrival first."""
        parent = self._dirs[directory]
        return [
            JobDir(name, directory, os.path.join(parent, name))
            for _, name in sorted(self._entered(directory))
        ]

    def count(self, directory: str) -> int:
        """How many entries one top-level directory holds: names only, no stat, no sort."""
        with os.scandir(self._dirs[directory]) as entries:
            return sum(1 for entry in entries if not entry.name.startswith("."))

    def entered_times(self, directory: str) -> list[tuple[JobDir, float]]:
        """Every job in ``directory`` with when it entered it: one stat each, no reads."""
        parent = self._dirs[directory]
        return [
            (JobDir(name, directory, os.path.join(parent, name)), ctime / 1e9)
            for ctime, name in self._entered(directory)
        ]

    def _entered(self, directory: str) -> list[tuple[int, str]]:
        if directory not in (*JOB_DIRECTORIES, "scheduled"):
            raise SpoolError(f"no job directory named {directory!r}")
        found = []
        with os.scandir(self._dirs[directory]) as entries:
            for entry in entries:
                if not (entry.is_dir(follow_symlinks=False) and RUN_ID.match(entry.name)):
                    continue
                try:
                    found.append((entry.stat(follow_symlinks=False).st_ctime_ns, entry.name))
                except FileNotFoundError:
                    continue  # moved on (claimed, finished) while we looked
        return found

    def read_status(self, job: JobDir) -> dict[str, Any]:
        """The job's status.json."""
        try:
            data: dict[str, Any] = json.loads(_read(f"{job.location}/status.json"))
        except FileNotFoundError as exc:
            raise JobNotFound(f"job {job.job_id!r} moved or has no status") from exc
        return data

    def read_job_file(self, job: JobDir, *, sha256: str | None) -> bytes:
        """The job file as submitted; JobFileChanged unless its sha256 is ``sha256``.

        Every reader passes what status.json recorded at intake (None only where there is no
        record to check against): what runs is what was validated, or nothing.
        """
        data = _read(f"{job.location}/job.yaml")
        if sha256 is None:
            return data
        import hashlib  # noqa: PLC0415 - not on the command line's light paths

        if (found := hashlib.sha256(data).hexdigest()) != sha256:
            raise JobFileChanged(
                f"job {job.job_id}: job.yaml is not the file that was validated (sha256 "
                f"{found[:12]}..., recorded {sha256[:12]}...); it is not run"
            )
        return data

    def write_status(self, job: JobDir, status: dict[str, Any], *, durable: bool = False) -> None:
        """Replace status.json atomically."""
        self._write_file(
            f"{job.location}/status.json", _json_bytes(status), durable=durable and self.durable
        )

    def open_log(self, job: JobDir) -> IO[bytes]:
        """The job's log, opened for appending; it stays valid when the directory moves."""
        return open(f"{job.location}/log", "ab", buffering=0)

    def claim(self, job_id: str) -> JobDir | None:
        """pending/<id> -> running/<id>; None when another worker won the rename.

        The claimant writes its lease once the job's process exists (``write_lease``); until
        then recovery judges the claim by its age.
        """
        _check_job_id(job_id)
        source, target = f"{self._dirs['pending']}/{job_id}", f"{self._dirs['running']}/{job_id}"
        try:
            rename_noreplace(source, target)
        except FileNotFoundError:
            return None
        except FileExistsError as exc:
            raise SpoolError(f"job {job_id!r} is in pending/ and running/ at once") from exc
        self._sync_dirs(self._dirs["running"])
        return JobDir(job_id, "running", target)

    def write_lease(self, job: JobDir, lease: dict[str, Any], *, first: bool = False) -> None:
        """Record (``first``) or renew the claim. Not fsynced: a lost lease reads as a dead worker.

        The first write creates the file in place: a reader that catches it half-written
        sees no lease yet, which is what it would have seen a moment earlier.
        """
        if first:
            with contextlib.suppress(FileExistsError):
                _write_new(f"{job.location}/lease", _json_bytes(lease))
                return
        self._write_file(f"{job.location}/lease", _json_bytes(lease), durable=False)

    def read_lease(self, job: JobDir) -> dict[str, Any] | None:
        """The claim on a running job, or None when it has none (yet)."""
        return _read_json(f"{job.location}/lease")

    def entered_at(self, job: JobDir) -> float:
        """When the job entered its directory (the directory's ctime)."""
        return job.path.stat().st_ctime

    def finish(
        self, job: JobDir, state: JobState, status: dict[str, Any], *, log_synced: bool = False
    ) -> JobDir:
        """running/<id> -> done|failed/<id> (or pending/ for a requeue), status written first."""
        check_transition(JobState.RUNNING, state)
        self._write_file(f"{job.location}/status.json", _json_bytes(status), durable=self.durable)
        if self.durable and not log_synced:
            _fsync_path(f"{job.location}/log")
        for claim_file in ("lease", _CANCEL_FILE):  # they belong to the run that just ended
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{job.location}/{claim_file}")
        return self._move(job, state.directory)

    def _move(self, job: JobDir, directory: str) -> JobDir:
        """The rename of a job's directory into ``directory``/, then that directory synced."""
        target = f"{self._dirs[directory]}/{job.job_id}"
        try:
            rename_noreplace(job.location, target)
        except FileExistsError as exc:
            raise SpoolError(f"job {job.job_id!r} already exists in {directory}/") from exc
        self._sync_dirs(self._dirs[directory])
        return JobDir(job.job_id, directory, target)

    def requeue(self, job: JobDir, status: dict[str, Any]) -> JobDir:
        """failed/<id> -> pending/<id> (``spoold retry``), with its new status.

        Moved first, then the status rewritten: a crash in between leaves a pending job whose
        status still says how it ended, which runs as the next attempt all the same.
        """
        if job.directory != "failed":
            raise InvalidTransition(f"only a failed or cancelled job can run again, not {job}")
        pending = self._move(job, "pending")
        self.write_status(pending, status, durable=True)
        return pending

    def request_cancel(self, job: JobDir, request: dict[str, Any]) -> None:
        """Ask whoever runs ``job`` to cancel it; FileNotFoundError if it is no longer running."""
        if job.directory != "running":
            raise InvalidTransition(f"only a running job takes a cancel request, not {job}")
        self._write_file(f"{job.location}/{_CANCEL_FILE}", _json_bytes(request), durable=False)

    def cancel_request(self, job: JobDir) -> dict[str, Any] | None:
        """The cancel request made for a running job, if any."""
        return _read_json(f"{job.location}/{_CANCEL_FILE}")

    # -- the outbox ------------------------------------------------------------------------------
    # A delivery is outbox/<key>~<sequence>.json. It is written as .prepared before the state
    # change it tells of, and renamed to .json once that change is made: see spoold.outbox.

    def prepare_delivery(
        self, key: str, sequence: int, data: bytes, *, exclusive: bool = False
    ) -> str:
        """Write a delivery that is not valid yet, durably; return its name.

        A leftover of that name is replaced (its change was never made); with ``exclusive``,
        FileExistsError instead if that delivery exists in any form (a job's first event:
        another job of that id, even one accepted by another host a moment ago, owns it).
        """
        outbox = self._dirs["outbox"]
        name = f"{key}~{sequence:08d}"
        path = f"{outbox}/{name}{_PREPARED}"
        if not exclusive:
            self._write_file(path, data, durable=self.durable)
        else:
            temp = f"{outbox}/{_TEMP_MARK}{name}.{os.urandom(4).hex()}.tmp"
            _write_new(temp, data, durable=self.durable)
            try:
                os.link(temp, path)  # unlike a rename, never replaces
            finally:
                os.unlink(temp)
            if os.path.exists(f"{outbox}/{name}.json"):
                os.unlink(path)
                raise FileExistsError(f"{outbox}/{name}.json")
        self._sync_dirs(outbox)
        return name + _PREPARED

    def commit_delivery(self, name: str) -> bool:
        """Make a prepared delivery valid; False if it is not there (committed or discarded)."""
        if not name.endswith(_PREPARED):
            raise SpoolError(f"{name!r} is not a prepared delivery")
        outbox = self._dirs["outbox"]
        try:
            os.rename(f"{outbox}/{name}", f"{outbox}/{name[: -len(_PREPARED)]}.json")
        except FileNotFoundError:
            return False
        return True

    def list_outbox(self, directory: str = "") -> list[str]:
        """The deliveries waiting (or, with ``directory="failed"``, given up), in key order."""
        # Names alone: the sender lists a backlog of thousands after every delivery.
        try:
            names = os.listdir(os.path.join(self._dirs["outbox"], directory))
        except FileNotFoundError:
            return []
        names = [n for n in names if "~" in n and n[0] != "."]  # not failed/, nor temp files
        names.sort()
        return names

    def read_delivery(self, name: str, directory: str = "") -> dict[str, Any] | None:
        """A delivery's content; None once it is gone."""
        return _read_json(os.path.join(self._dirs["outbox"], directory, name))

    def update_delivery(self, name: str, data: bytes) -> None:
        """Record a delivery's failed tries. Not fsynced: a lost update only means a sooner try."""
        self._write_file(f"{self._dirs['outbox']}/{name}", data, durable=False)

    def remove_delivery(self, name: str) -> None:
        """Drop a delivery: acknowledged, or a prepared one whose state change never happened."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self._dirs['outbox']}/{name}")

    def give_up_delivery(self, name: str) -> None:
        """Move a delivery that will not be tried again into outbox/failed/."""
        failed = f"{self._dirs['outbox']}/failed"
        with contextlib.suppress(FileExistsError):
            os.mkdir(failed, _DEFAULT_MODE)
        os.replace(f"{self._dirs['outbox']}/{name}", f"{failed}/{name}")
        self._sync_dirs(self._dirs["outbox"])

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
            return _read_json(f"{self._dirs['rejected']}/{_entry_name(name)}/reason.json")
        except OSError:  # not this user's to read
            return None

    def purge_rejected(self, name: str) -> None:
        """Remove rejected/<name> as a job is removed: out of the tree in one rename, then
        deleted; FileNotFoundError if it is gone."""
        gone = f"{self._dirs['tmp']}/{_GONE_PREFIX}{_new_token('rejected-')}"
        os.rename(f"{self._dirs['rejected']}/{_entry_name(name)}", gone)
        self._sync_dirs(self._dirs["rejected"])
        self._finish_removal(gone)

    def stage_decided(self, stage: str) -> bool:
        """Whether intake's stage was turned into a rejection (or is gone: moved on)."""
        path = os.path.join(self._dirs["tmp"], os.path.basename(stage))
        return not os.path.isdir(path) or os.path.exists(f"{path}/reason.json")

    # -- work dirs and artifacts --------------------------------------------------------------

    def work_slot(self, name: str) -> Path:
        """A worker's work dir under tmp/work/, used when the config names no workdir."""
        path = self.dir("tmp") / "work" / name
        path.mkdir(parents=True, exist_ok=True, mode=_DEFAULT_MODE)
        return path

    def artifacts_dir(self, job: JobDir) -> Path:
        return job.path / "artifacts"

    def store_artifact(self, job: JobDir, relative: str, source: Path) -> Path:
        """Copy one file into the job's artifacts/, keeping its path relative to the work dir."""
        target = self.artifacts_dir(job) / relative
        if not target.resolve().is_relative_to(self.artifacts_dir(job).resolve()):
            raise SpoolError(f"artifact path {relative!r} leaves the artifacts directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target, follow_symlinks=False)
        return target

    # -- locks --------------------------------------------------------------------------------

    def lock_host(self, host: str) -> IO[bytes]:
        """Hold the per-host daemon lock; raise SpoolError if another daemon here holds it."""
        path = self.dir("tmp") / f"daemon-{host}.lock"
        handle = open(path, "ab")  # noqa: SIM115 - held for the daemon's lifetime
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            handle.close()
            raise SpoolError(f"another spoold on {host} already runs on {self.root}") from exc
        # Who holds it, for `spoold retry` to wake this daemon with SIGUSR1.
        os.truncate(handle.fileno(), 0)
        os.write(handle.fileno(), f"{os.getpid()} {process_start_time(os.getpid())}\n".encode())
        return handle

    def daemon_on(self, host: str) -> tuple[int, int] | None:
        """(pid, start time) of the daemon holding the lock on ``host``, or None if none does."""
        path = self.dir("tmp") / f"daemon-{host}.lock"
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

    # -- primitives ---------------------------------------------------------------------------

    def _write_file(self, path: str | Path, data: bytes, *, durable: bool) -> None:
        directory, name = os.path.split(path)
        temp = f"{directory}/{_TEMP_MARK}{name}.{os.getpid()}.{next(_counter)}.tmp"
        try:
            _write_new(temp, data, durable=durable)
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):  # no half-written temp files left
                os.unlink(temp)
            raise

    def _sync_dirs(self, *paths: str | Path) -> None:
        if not self.durable:
            return
        for path in paths:  # always one of the tree's top-level directories
            self._syncers[os.fspath(path)].sync()


def _entry_name(name: str) -> str:
    """``name`` if it names an entry of a directory, never a path out of it."""
    if "/" in name or name in ("", ".", ".."):
        raise SpoolError(f"{name!r} is not a name of an entry")
    return name


def _unstage(stage: str, original: str, job_file: str) -> None:
    """Undo accept's writes: the stage holds the file alone again, as reject() expects."""
    for leftover in ("status.json", "log"):
        os.unlink(f"{stage}/{leftover}")
    os.rmdir(f"{stage}/artifacts")
    os.rename(job_file, original)


def _ancestors(root: Path) -> list[str]:
    """The directories above ``root`` as the kernel resolves them now, nearest first."""
    path = os.path.realpath(root)
    found = []
    while (parent := os.path.dirname(path)) != path:
        found.append(parent)
        path = parent
    return found


def _new_token(prefix: str) -> str:
    return f"{prefix}{os.urandom(8).hex()}"


def _check_job_id(job_id: str) -> None:
    # The id becomes a path component: anything but a plain name could escape the spool.
    if not RUN_ID.match(job_id):
        raise SpoolError(f"{job_id!r} is not a valid job id")


def _free_names(name: str) -> Iterator[str]:
    """name, then name-2.yaml, name-3.yaml, ...: the suffix stays, so a job file stays one."""
    stem, dot, suffix = name.rpartition(".")
    if not (dot and stem):
        stem, suffix = name, ""
    yield name
    for n in range(2, 10_000):
        yield f"{stem}-{n}.{suffix}" if suffix else f"{stem}-{n}"


def _move_to_free_name(source: Path, parent: Path, name: str) -> Path:
    """Rename ``source`` into ``parent`` under the first free name; never replaces anything."""
    for candidate in _free_names(name):
        try:
            rename_noreplace(source, parent / candidate)
        except FileExistsError:
            continue
        return parent / candidate
    raise SpoolError(f"no free name for {name!r} in {parent}")


_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2


def rename_noreplace(source: str | Path, target: str | Path) -> None:
    """rename(2) that fails with FileExistsError instead of replacing ``target``.

    renameat2(RENAME_NOREPLACE) where the filesystem has it; elsewhere (NFS) a check first,
    which is racy only against another writer choosing the very same name at the same moment.
    """
    err = _renameat2_errno(source, target, _RENAME_NOREPLACE)
    if err == 0:
        return
    if err in (errno.EEXIST, errno.ENOTEMPTY):
        raise FileExistsError(err, os.strerror(err), str(target))
    if err not in (None, errno.EINVAL, errno.ENOSYS):
        raise OSError(err, os.strerror(err), str(source))
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.rename(source, target)


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


def _write_new(path: str | Path, data: bytes, *, durable: bool = False, mode: int = 0o640) -> None:
    """Create ``path`` (it must not exist) holding ``data``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def _read_limited(fd: int, limit: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0:
        try:
            chunk = os.read(fd, min(remaining, 1 << 20))
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _read_limited_path(path: Path, limit: int) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(limit)


def _read_json(path: str) -> dict[str, Any] | None:
    """A small JSON file spoold wrote, or None when it is not there (or not whole yet)."""
    try:
        data = json.loads(_read(path))
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class _GroupSync:
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
                    _fsync_path(self._path)
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


def _fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_bytes(data: dict[str, Any]) -> bytes:
    # Compact: only then does json use its C encoder (``spoold status`` pretty-prints).
    return (json.dumps(data, separators=(",", ":"), ensure_ascii=False) + "\n").encode()
