"""Jobs and their leases: where a job is, what it holds, and its moves after intake.

A job's state is the directory it sits in (pending/, running/, done/, failed/; a schedule's
definition sits in scheduled/); every transition is one rename(2) of its directory. What each
transition fsyncs (see ``spoold.core.spool.fs`` for why no more):

- claim:   rename into running/, fsync running/, before any process of the job starts: after a
           power loss a job that may have started is never found in pending/ again.
- finish:  fsync status.json and log, rename into done/ or failed/, fsync that directory.
- requeue: rename into pending/, fsync pending/, then the new status written durably.
- purge, unschedule: out of the tree in one rename (into tmp/gone-...), fsync the directory it
           left, then deleted; its id given up (``Reservations.finish_removal``).

A lease (running/<id>/lease) and a cancel request (running/<id>/cancel) are not fsynced: a lost
lease reads as a dead worker.

Fencing (SPEC section 11). A claim has a generation: one more than the highest generation ever
fenced in the job's directory. A host that takes over another's stale claim first creates
``fenced.<generation>`` in the job's directory, exclusively (of two hosts that judge the same
lease stale, one wins), then rotates the log (``rotate_log``). The claim's old owner checks,
before every write it makes for the job (status, lease, units, artifacts, the move), that its
generation is not fenced and that the job is still where it left it (``check_fence``): a host
that wakes after a pause or a partition finds itself fenced and writes nothing more. The marker
travels with the job's directory, so a later claim of the same job (requeued, claimed again)
still fences the old owner's generation.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

from spoold.core.errors import (
    InvalidTransition,
    JobFenced,
    JobFileChanged,
    JobNotFound,
    SpoolError,
)
from spoold.core.ids import RUN_ID
from spoold.core.spool.fs import (
    DEFAULT_MODE,
    TEMP_MARK,
    DirStamp,
    GroupCommit,
    Seen,
    fsync_path,
    give_to_owner_of,
    json_bytes,
    link_into_place,
    path_stamp,
    read_bytes,
    read_json,
    rename_noreplace,
    sighting,
    stat_stamp,
    write_file,
    write_new,
    write_spare,
)
from spoold.core.spool.reservations import GONE_PREFIX, Reservations, check_job_id, new_token
from spoold.core.spool.spares import Spares
from spoold.core.states import JOB_DIRECTORIES, JobState

__all__ = ["UNITS", "DirStamp", "JobDir", "Jobs", "ScheduleRequests", "Seen", "sighting"]

_CANCEL_FILE = "cancel"  # in running/<id>/: spoold cancel's request to the job's worker
#: In a job's directory: what each unit of its attempts began and how it ended.
UNITS = "units"
_PAUSED = "paused"  # in scheduled/<id>/: there while the schedule is paused (who, since when)
_RESUMED = "resumed"  # in scheduled/<id>/: who ended the pause, until the scheduler noted it
_RUN_NOW = "run-now."  # in scheduled/<id>/: run-now.<UTC time>, a run asked for at that time
_FENCED = "fenced."  # in a job's directory: fenced.<generation>, that claim taken over (by whom)
_FENCED_LOG = "fenced-log."  # the log as the fenced owner held it open: its late lines go here
#: In a job's directory: kept.<generation>.<beat>, the claim's beat as its supervisor moves it
#: while no worker renews the lease (its daemon stopped, leaving the job to run on).
_KEPT = "kept."


class ScheduleRequests(NamedTuple):
    """What a schedule's directory asks of the scheduler (``Jobs.schedule_requests``)."""

    paused: dict[str, Any] | None  # the pause, while paused
    resumed: dict[str, Any] | None  # the resume not yet noted
    run_now: list[tuple[str, str, dict[str, Any]]]  # (file name, run id, record), oldest first


class JobDir(NamedTuple):
    """Where a job is: its id, the state directory it sits in, and that directory's path; for
    a claimed job, the generation of the claim (each write for it checks it is not fenced)."""

    job_id: str
    directory: str
    location: str  # a string: the per-job paths are built often enough for pathlib to show
    generation: int | None = None

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


def _create_whole(schedule: JobDir, name: str, record: dict[str, Any], *, durable: bool) -> bool:
    """Create ``name`` in a schedule's directory holding ``record``, whole (a link of a file
    written aside) and only if it is not there; False if it was."""
    temporary = _request_file(schedule, name, record, durable=durable)
    if not link_into_place(temporary, f"{schedule.location}/{name}"):
        return False
    if durable:
        fsync_path(schedule.location)
    return True


def _request_file(schedule: JobDir, name: str, record: dict[str, Any], *, durable: bool) -> str:
    """``record`` written aside in a schedule's directory, to be linked or renamed into place;
    its path. Root's (``spoold schedule ...`` run as root) is given to the directory's owner:
    the daemon, running as that owner, must read it."""
    temporary = f"{schedule.location}/{TEMP_MARK}{name}.{os.getpid()}.{os.urandom(4).hex()}"
    write_new(temporary, json_bytes(record), durable=durable)
    give_to_owner_of(temporary, schedule.location)
    return temporary


def _job_directory(directory: str) -> str:
    if directory not in (*JOB_DIRECTORIES, "scheduled"):
        raise SpoolError(f"no job directory named {directory!r}")
    return directory


def _snapshot_name(name: str) -> str:
    if not (name.isascii() and name.isalnum()):
        raise SpoolError(f"not a snapshot name: {name!r}")
    return f"{name}.snapshot"


def check_fence(job: JobDir) -> None:
    """JobFenced if ``job``'s claim was taken over, or the job is no longer where its claim
    left it (moved on by whoever took it over). Nothing for a job held by no claim."""
    if job.generation is None:
        return
    try:
        os.lstat(f"{job.location}/{_FENCED}{job.generation}")
    except FileNotFoundError:
        pass
    else:
        taker = read_json(f"{job.location}/{_FENCED}{job.generation}") or {}
        raise JobFenced(
            f"job {job.job_id}: claim generation {job.generation} was taken over by "
            f"{taker.get('by', 'another host')}"
        )
    if not os.path.isdir(job.location):
        raise JobFenced(f"job {job.job_id}: no longer in {job.directory}/ (taken over, or removed)")


def generations(location: str) -> list[int]:
    """The claim generations fenced in a job's directory, lowest first."""
    return claim_marks(location)[0]


def claim_marks(location: str) -> tuple[list[int], tuple[str, ...]]:
    """What a job's directory says of its claims, from one listing: the generations fenced
    (lowest first), and the beats its supervisors keep (``Jobs.keep_claim``), as names."""
    try:
        names = os.listdir(location)
    except FileNotFoundError:
        return [], ()
    found = [n[len(_FENCED) :] for n in names if n.startswith(_FENCED)]
    kept = tuple(sorted(n for n in names if n.startswith(_KEPT)))
    return sorted(int(n) for n in found if n.isdigit()), kept


class Jobs:
    """The jobs of a spool, in every state, and the schedules' definitions in scheduled/."""

    def __init__(
        self,
        root: Path,
        dirs: Mapping[str, str],
        disk: GroupCommit,
        reservations: Reservations,
        *,
        host: str = "",
    ) -> None:
        """``host``: this host's id among those sharing the spool, for the spares' names."""
        self._root = root
        self._dirs = dirs
        self._disk = disk
        self._ids = reservations
        #: Files made ahead in tmp/ (a worker process's slots fill it while they wait) for the
        #: writes on a job's way to its start: status.json "started" and the first lease.
        self.spares = Spares(dirs["tmp"], host)

    def find(
        self, job_id: str, among: Sequence[str] = (*JOB_DIRECTORIES, "scheduled")
    ) -> JobDir | None:
        """Where the job is now, looked up in the order jobs move so that none is missed;
        ``among``: in those directories only."""
        check_job_id(job_id)
        for directory in among:
            path = f"{self._dirs[directory]}/{job_id}"
            if os.path.isdir(path):
                return JobDir(job_id, directory, path)
        return None

    def get(self, job_id: str) -> JobDir:
        """Like find(), but raise JobNotFound."""
        found = self.find(job_id)
        if found is None:
            raise JobNotFound(f"no job {job_id!r} in {self._root}")
        return found

    def list_jobs(
        self, directory: str, *, skip: Callable[[str], bool] | None = None
    ) -> list[JobDir]:
        """The jobs in one state directory, oldest arrival first; those whose id ``skip``
        names are left out before their stat (a backlog the daemon holds already)."""
        parent = self._dirs[directory]
        return [
            JobDir(name, directory, os.path.join(parent, name))
            for _, name in sorted(self._entered(directory, skip))
        ]

    def entered_times(self, directory: str) -> list[tuple[JobDir, float]]:
        """Every job in ``directory`` with when it entered it: one stat each, no reads."""
        parent = self._dirs[directory]
        return [
            (JobDir(name, directory, os.path.join(parent, name)), ctime / 1e9)
            for ctime, name in self._entered(directory)
        ]

    def _entered(
        self, directory: str, skip: Callable[[str], bool] | None = None
    ) -> list[tuple[int, str]]:
        if directory not in (*JOB_DIRECTORIES, "scheduled"):
            raise SpoolError(f"no job directory named {directory!r}")
        found = []
        with os.scandir(self._dirs[directory]) as entries:
            for entry in entries:
                if not (entry.is_dir(follow_symlinks=False) and RUN_ID.match(entry.name)):
                    continue
                if skip is not None and skip(entry.name):
                    continue
                try:
                    found.append((entry.stat(follow_symlinks=False).st_ctime_ns, entry.name))
                except FileNotFoundError:
                    continue  # moved on (claimed, finished) while we looked
        return found

    # -- for a catalogue of the jobs (spoold.face.catalogue): what changed, without reading --

    def names(self, directory: str) -> list[str]:
        """The names in ``directory``: one listdir, no stat, unchecked (a job's read tells;
        half the cost of a scandir, which makes an object of every name)."""
        return os.listdir(self._dirs[_job_directory(directory)])

    def entry_stamps(self, directory: str) -> dict[str, DirStamp]:
        """Every job directory in ``directory`` with its stamp (``DirStamp``): one listing and
        one stat each, no reads. What a schedule's requests, a definition replaced or removed
        change (``spoold.schedule.scheduler`` reads only those); with the filesystem's timestamp
        granularity: a change within a tick of the last one may leave the stamp as it was."""
        found: dict[str, DirStamp] = {}
        fd = os.open(self._dirs[_job_directory(directory)], os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in os.listdir(fd):
                if not RUN_ID.match(name):
                    continue
                try:
                    info = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # moved on while we looked
                if stat.S_ISDIR(info.st_mode):
                    found[name] = stat_stamp(info)
        finally:
            os.close(fd)
        return found

    def directory_stamp(self, directory: str) -> DirStamp | None:
        """The stamp of ``directory`` itself (``entry_stamps``): a job directory renamed in or
        out of it changes it, and so does a schedule's request (``_requested``); None if it is
        gone."""
        return path_stamp(self._dirs[_job_directory(directory)])

    @staticmethod
    def stamp_of(job: JobDir) -> DirStamp | None:
        """One job directory's stamp (``entry_stamps``); None if it is gone."""
        return path_stamp(job.location, follow_symlinks=False)

    def read_snapshot(self, name: str) -> bytes | None:
        """tmp/<name>.snapshot as ``write_snapshot`` left it, or None if there is none."""
        try:
            return read_bytes(f"{self._dirs['tmp']}/{_snapshot_name(name)}")
        except FileNotFoundError:
            return None

    def write_snapshot(self, name: str, data: bytes) -> None:
        """Replace tmp/<name>.snapshot atomically: a cache of what the tree says, which its
        reader validates and can always rebuild; so not fsynced (a crash may lose or tear it)."""
        write_file(f"{self._dirs['tmp']}/{_snapshot_name(name)}", data, durable=False)

    def read_status(self, job: JobDir) -> dict[str, Any]:
        """The job's status.json."""
        try:
            data: dict[str, Any] = json.loads(read_bytes(f"{job.location}/status.json"))
        except FileNotFoundError as exc:
            raise JobNotFound(f"job {job.job_id!r} moved or has no status") from exc
        return data

    def read_job_file(self, job: JobDir, *, sha256: str | None) -> bytes:
        """The job file as submitted; JobFileChanged unless its sha256 is ``sha256``.

        Every reader passes what status.json recorded at intake (None only where there is no
        record to check against): what runs is what was validated, or nothing.
        """
        data = read_bytes(f"{job.location}/job.yaml")
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
        """Replace status.json atomically (JobFenced if the claim ``job`` holds is fenced)."""
        check_fence(job)
        write_file(
            f"{job.location}/status.json",
            json_bytes(status),
            durable=durable and self._disk.durable,
            spare=self.spares.take(),
        )

    @staticmethod
    def read_log(job: JobDir) -> IO[bytes]:
        """The job's log, opened for reading from its start."""
        return open(f"{job.location}/log", "rb")

    @staticmethod
    def open_log(job: JobDir) -> IO[bytes]:
        """The job's log, opened for appending; it stays valid when the directory moves."""
        return open(f"{job.location}/log", "ab", buffering=0)

    def claim(self, job_id: str) -> JobDir | None:
        """pending/<id> -> running/<id>; None when another worker won the rename.

        The claimant writes its lease once the job's process exists (``write_lease``); until
        then recovery judges the claim by whether it moves.
        """
        check_job_id(job_id)
        source, target = f"{self._dirs['pending']}/{job_id}", f"{self._dirs['running']}/{job_id}"
        try:
            rename_noreplace(source, target)
        except FileNotFoundError:
            return None
        except FileExistsError as exc:
            # Where the filesystem has no no-replace rename (FUSE, NFS), another host's claim
            # can be seen made before this one's source is seen gone: it won.
            if not os.path.lexists(source):
                return None
            raise SpoolError(f"job {job_id!r} is in pending/ and running/ at once") from exc
        self._disk.sync(self._dirs["running"])
        return JobDir(job_id, "running", target, max(generations(target), default=0) + 1)

    def check_fence(self, job: JobDir) -> None:
        """JobFenced if the claim ``job`` holds was taken over (see ``check_fence``)."""
        check_fence(job)

    def fence(self, job: JobDir, generation: int, record: dict[str, Any]) -> bool:
        """Fence claim ``generation`` of a running job (``record``: who takes it over, and
        why); False if another host fenced it first. Made whole and exclusively."""
        temporary = f"{job.location}/{TEMP_MARK}{_FENCED}{generation}.{os.urandom(4).hex()}"
        write_new(temporary, json_bytes(record), durable=self._disk.durable)
        placed = link_into_place(temporary, f"{job.location}/{_FENCED}{generation}")
        if placed and self._disk.durable:
            fsync_path(job.location)
        return placed

    @staticmethod
    def rotate_log(job: JobDir, generation: int) -> None:
        """Give the job a log of its own again after fencing ``generation``: the old owner
        keeps its log open and would append to it when it wakes. The log is copied, the old
        file renamed aside (the old owner's late lines land there, never in ``log``), what
        came in between copied too, and the copy renamed into place."""
        log, aside = f"{job.location}/log", f"{job.location}/{_FENCED_LOG}{generation}"
        copy = f"{job.location}/{TEMP_MARK}log.{os.urandom(4).hex()}"
        with open(copy, "wb") as target:
            try:
                with open(log, "rb") as source:
                    shutil.copyfileobj(source, target, 1 << 20)
                    os.rename(log, aside)
                    shutil.copyfileobj(source, target, 1 << 20)  # appended meanwhile
            except FileNotFoundError:
                pass  # no log yet: the copy starts it
        os.rename(copy, log)

    def write_lease(self, job: JobDir, lease: dict[str, Any], *, first: bool = False) -> None:
        """Record (``first``) or renew the claim. Not fsynced: a lost lease reads as a dead worker.

        The first write creates the file in place: a reader that catches it half-written
        sees no lease yet, which is what it would have seen a moment earlier. JobFenced if
        the claim was taken over.
        """
        check_fence(job)
        spare = self.spares.take() if first else None  # a renewal is on no job's way
        if first and spare is None:
            with contextlib.suppress(FileExistsError):
                write_new(f"{job.location}/lease", json_bytes(lease))
                return
        write_file(f"{job.location}/lease", json_bytes(lease), durable=False, spare=spare)

    # -- units: each process, container or call an attempt starts, begun once and ended once --

    @staticmethod
    def begin_unit(
        job: JobDir, key: str, record: dict[str, Any], *, spares: Spares | None = None
    ) -> bool:
        """Record that unit ``key`` of the job starts; False if it was begun before.

        Exclusive: of two that try (a supervisor forked just before its daemon died, and the
        next daemon's), one wins, so no unit runs twice. Created whole (a link of a written
        file): a reader never sees it half written. Not fsynced: after a reboot no unit
        goes on, and recovery then follows the job's ``on_interrupt`` (see ``lease``).
        ``spares``: the caller's, made ahead in tmp/; one is the file written, if there is one.
        """
        check_fence(job)
        units = f"{job.location}/{UNITS}"
        with contextlib.suppress(FileExistsError):
            os.mkdir(units, DEFAULT_MODE)
        data = json_bytes(record)
        temporary = None if spares is None else spares.take()
        if temporary is None or not write_spare(temporary, data):
            temporary = f"{units}/.{key}.{os.getpid()}"
            write_new(temporary, data)
        return link_into_place(temporary, f"{units}/{key}")

    @staticmethod
    def end_unit(job: JobDir, key: str, record: dict[str, Any]) -> None:
        """Record how unit ``key`` ended (replaced whole; not fsynced, as ``begin_unit``)."""
        check_fence(job)
        write_file(f"{job.location}/{UNITS}/{key}.end", json_bytes(record), durable=False)

    @staticmethod
    def keep_claim(job: JobDir, beat: int) -> None:
        """Move the claim's beat from its supervisor: ``kept.<generation>.<beat>``, renamed
        from the beat before (made at the first). A host that judges the claim sees the name
        change in the listing it makes for the fences anyway (``claim_marks``)."""
        check_fence(job)
        name = f"{job.location}/{_KEPT}{job.generation}.{beat}"
        if beat <= 1:
            write_new(name, b"")
        else:
            os.rename(f"{job.location}/{_KEPT}{job.generation}.{beat - 1}", name)

    @staticmethod
    def drop_kept(job: JobDir, beat: int) -> None:
        """The supervisor's beat is over (its unit ended, or a worker renews the lease again)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{job.location}/{_KEPT}{job.generation}.{beat}")

    @staticmethod
    def read_unit(job: JobDir, key: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """How unit ``key`` began and ended, each None if it did not (yet)."""
        units = f"{job.location}/{UNITS}"
        return read_json(f"{units}/{key}"), read_json(f"{units}/{key}.end")

    @staticmethod
    def unended_units(job: JobDir) -> list[dict[str, Any]]:
        """How each unit of the job that began with no end recorded began."""
        units = f"{job.location}/{UNITS}"
        try:
            names = set(os.listdir(units))
        except (FileNotFoundError, NotADirectoryError):
            return []
        begun = (n for n in names if n[:1] != "." and not n.endswith(".end"))
        records = (read_json(f"{units}/{n}") for n in sorted(begun) if f"{n}.end" not in names)
        return [record for record in records if isinstance(record, dict)]

    @staticmethod
    def read_lease(job: JobDir) -> dict[str, Any] | None:
        """The claim on a running job, or None when it has none (yet)."""
        return read_json(f"{job.location}/lease")

    def entered_at(self, job: JobDir) -> float:
        """When the job entered its directory (the directory's ctime)."""
        return job.path.stat().st_ctime

    def finish(
        self, job: JobDir, state: JobState, status: dict[str, Any], *, log_synced: bool = False
    ) -> JobDir:
        """running/<id> -> done|failed/<id> (or pending/ for a requeue), status written first.

        Whether the move is allowed is the ledger's to decide (spoold.run.ledger), not the
        store's. JobFenced, with nothing written, if the claim ``job`` holds was taken over."""
        check_fence(job)
        write_file(f"{job.location}/status.json", json_bytes(status), durable=self._disk.durable)
        if self._disk.durable and not log_synced:
            fsync_path(f"{job.location}/log")
        for claim_file in ("lease", _CANCEL_FILE):  # they belong to the run that just ended
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{job.location}/{claim_file}")
        check_fence(job)  # again: the writes above took time
        return self._move(job, state.directory)

    def _move(self, job: JobDir, directory: str) -> JobDir:
        """The rename of a job's directory into ``directory``/, then that directory synced."""
        target = f"{self._dirs[directory]}/{job.job_id}"
        try:
            rename_noreplace(job.location, target)
        except (FileExistsError, FileNotFoundError) as exc:
            # A network filesystem's client may send a rename again after its answer was
            # lost, and report the second try's error for a rename that was made: for a move
            # the claim's owner makes, where the job is now says what happened.
            made = job.generation is not None and not os.path.lexists(job.location)
            if not (made and os.path.isdir(target)):
                if isinstance(exc, FileNotFoundError):
                    raise
                raise SpoolError(f"job {job.job_id!r} already exists in {directory}/") from exc
        self._disk.sync(self._dirs[directory])
        return JobDir(job.job_id, directory, target)

    def requeue(self, job: JobDir, status: dict[str, Any]) -> JobDir:
        """failed/<id> -> pending/<id> (``spoold retry``), with its new status.

        Moved first, then the status rewritten: a crash in between leaves a pending job whose
        status still says how it ended, which runs as the next attempt all the same. So does a
        worker that claims it in between (the daemon's rescan, a wake): its directory has moved
        on, and the status is then the worker's to write.
        """
        pending = self._move(job, "pending")
        try:
            self.write_status(pending, status, durable=True)
        except FileNotFoundError:
            if os.path.isdir(pending.location):
                raise  # not the claim: something else is missing
        return pending

    def request_cancel(self, job: JobDir, request: dict[str, Any]) -> None:
        """Ask whoever runs ``job`` to cancel it; FileNotFoundError if it is no longer running."""
        if job.directory != "running":
            raise InvalidTransition(f"only a running job takes a cancel request, not {job}")
        write_file(f"{job.location}/{_CANCEL_FILE}", json_bytes(request), durable=False)

    @staticmethod
    def cancel_request(job: JobDir) -> dict[str, Any] | None:
        """The cancel request made for a running job, if any."""
        return read_json(f"{job.location}/{_CANCEL_FILE}")

    def unschedule(self, job_id: str) -> None:
        """Remove scheduled/<job_id> (the runs it made stay); JobNotFound if there is none."""
        check_job_id(job_id)
        try:
            self._remove(JobDir(job_id, "scheduled", f"{self._dirs['scheduled']}/{job_id}"))
        except FileNotFoundError:
            raise JobNotFound(f"no schedule {job_id!r} in {self._root}") from None

    # -- a schedule's requests: files in scheduled/<id>/ that its faces write (spoold schedule
    # pause|resume|run, the API) and the daemon's scheduler acts on; that scheduler alone
    # writes the schedule's status.json, so no request is lost to another's rewrite of it.

    def request_pause(self, schedule: JobDir, record: dict[str, Any]) -> dict[str, Any] | None:
        """Mark a schedule paused (``paused``, made whole and exclusively, durably); the
        record of the pause already there, if it was (then nothing changes).
        FileNotFoundError if the schedule is gone."""
        if _create_whole(schedule, _PAUSED, record, durable=self._disk.durable):
            self._requested()
            return None
        return read_json(f"{schedule.location}/{_PAUSED}") or {}

    def request_resume(self, schedule: JobDir, record: dict[str, Any]) -> dict[str, Any] | None:
        """End a schedule's pause: ``resumed`` (who, when) written for the scheduler's record,
        then ``paused`` removed. The pause that ended, or None if it was not paused."""
        paused = read_json(f"{schedule.location}/{_PAUSED}")
        if paused is None:
            return None
        durable = self._disk.durable
        temporary = _request_file(schedule, _RESUMED, {**record, "paused": paused}, durable=durable)
        os.replace(temporary, f"{schedule.location}/{_RESUMED}")
        try:
            os.unlink(f"{schedule.location}/{_PAUSED}")
        except FileNotFoundError:
            return None  # another resume was first
        finally:
            self._requested()
        if durable:
            fsync_path(schedule.location)
        return paused

    def request_run_now(self, schedule: JobDir, run_id: str, record: dict[str, Any]) -> bool:
        """Ask for the run ``run_id`` (``<id>@<time>``) of a schedule now (``run-now.<time>``,
        made whole and exclusively, durably); False if that very run was asked for already."""
        check_job_id(run_id)
        job_id, _, moment = run_id.partition("@")
        if job_id != schedule.job_id or not moment:
            raise SpoolError(f"{run_id!r} is not a run of schedule {schedule.job_id!r}")
        made = _create_whole(schedule, _RUN_NOW + moment, record, durable=self._disk.durable)
        if made:
            self._requested()
        return made

    def _requested(self) -> None:
        """A request was made in a schedule's directory: scheduled/'s own stamp changes too,
        so that a scheduler with nothing else to do looks at scheduled/ alone (one stat a
        round, not one a schedule), on any host sharing the spool."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self._dirs["scheduled"])

    @staticmethod
    def schedule_requests(schedule: JobDir) -> ScheduleRequests:
        """The requests waiting in a schedule's directory: one scandir, and a read of each."""
        paused = resumed = None
        run_now: list[tuple[str, str, dict[str, Any]]] = []
        try:
            with os.scandir(schedule.location) as entries:
                names = [entry.name for entry in entries]
        except FileNotFoundError:
            names = []
        for name in names:
            if name == _PAUSED:
                paused = read_json(f"{schedule.location}/{name}")
            elif name == _RESUMED:
                resumed = read_json(f"{schedule.location}/{name}")
            elif name.startswith(_RUN_NOW):
                record = read_json(f"{schedule.location}/{name}")
                run = f"{schedule.job_id}@{name[len(_RUN_NOW) :]}"
                if record is not None and RUN_ID.match(run):
                    run_now.append((name, run, record))
        return ScheduleRequests(paused, resumed, sorted(run_now))

    @staticmethod
    def drop_schedule_request(schedule: JobDir, name: str) -> None:
        """Remove a request the scheduler has acted on (a run now, a resume's record). Not
        fsynced: one seen again is recognised (its run exists) and removed again."""
        if name != _RESUMED and not name.startswith(_RUN_NOW):
            raise SpoolError(f"{name!r} is no request a schedule's scheduler removes")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{schedule.location}/{name}")

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
        token = self._ids.holder(job.job_id) or new_token("none-")
        gone = f"{self._dirs['tmp']}/{GONE_PREFIX}{token}~{job.job_id}"
        os.rename(job.location, gone)
        self._disk.sync(self._dirs[job.directory])
        self._ids.finish_removal(gone)

    # -- work dirs and artifacts --------------------------------------------------------------

    def work_root(self) -> Path:
        """Where jobs' work dirs are made (tmp/work/) when the config names no workdir and
        jobs run as spoold's own user."""
        path = Path(self._dirs["tmp"]) / "work"
        path.mkdir(parents=True, exist_ok=True, mode=DEFAULT_MODE)
        return path

    def artifacts_dir(self, job: JobDir) -> Path:
        return job.path / "artifacts"

    def store_artifact(
        self, job: JobDir, relative: str, source: IO[bytes], size: int | None = None
    ) -> Path:
        """Copy one file (open: the job's user opened it) into the job's artifacts/, keeping
        its path relative to the work dir: its ``size`` bytes (default: its size now), holes
        left holes. Made whole or not at all: an OSError (a full disk), or ArtifactChanged (it
        changed size while copied), leaves no part of it."""
        check_fence(job)
        target = self.artifacts_dir(job) / relative
        if not target.resolve().is_relative_to(self.artifacts_dir(job).resolve()):
            raise SpoolError(f"artifact path {relative!r} leaves the artifacts directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        size = os.fstat(source.fileno()).st_size if size is None else size
        temporary = f"{target.parent}/{TEMP_MARK}{target.name}.{os.urandom(4).hex()}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(temporary, flags, 0o666)
        try:
            try:
                _copy_sparse(source.fileno(), fd, size)
            finally:
                os.close(fd)
            os.replace(temporary, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        return target

    def artifact_store(
        self, job: JobDir, *, max_count: int | None, max_size: int | None
    ) -> ArtifactStore:
        """What stores one attempt's artifacts of ``job`` within the limits."""
        return ArtifactStore(self, job, max_count=max_count, max_size=max_size)

    def open_artifact(self, job: JobDir, relative: str) -> IO[bytes]:
        """One of the job's artifacts, opened for reading, confined to its artifacts/: each
        component opened below the last without following a link, so that no name (``..``, a
        link, an absolute path) reaches outside. FileNotFoundError for anything else."""
        parts = relative.split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise FileNotFoundError(relative)
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(self.artifacts_dir(job), flags | os.O_DIRECTORY)
        try:
            for part in parts[:-1]:
                inner = os.open(part, flags | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = inner
            found = os.open(parts[-1], flags, dir_fd=fd)
        except (NotADirectoryError, OSError) as exc:
            if isinstance(exc, PermissionError):
                raise
            raise FileNotFoundError(relative) from None
        finally:
            os.close(fd)
        if not stat.S_ISREG(os.fstat(found).st_mode):
            os.close(found)
            raise FileNotFoundError(relative)
        return os.fdopen(found, "rb")


#: How many of the files a limit left out the line about them names.
_NAMED = 3
#: What copy_file_range says where the two files do not allow it (other filesystems, a kernel
#: without it): the copy is made with reads and writes instead.
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}


class ArtifactChanged(SpoolError):
    """An artifact changed size while it was copied: its copy would hold no one moment of it."""


class ArtifactStore:
    """One attempt's artifacts copied into the job's artifacts/ within the limits
    (``limits.max_artifacts``, ``limits.max_artifacts_size``, apparent sizes): a file that
    would pass one, that cannot be copied (a full disk) or that changes size while copied,
    is left out, and so is what the walk that found them left (``left_by_walk``);
    ``left_out`` says so in one line, whatever their number. The job's outcome is not theirs
    to change."""

    def __init__(
        self, jobs: Jobs, job: JobDir, *, max_count: int | None, max_size: int | None
    ) -> None:
        self._jobs = jobs
        self._job = job
        self._max_count = max_count
        self._max_size = max_size
        self._count = 0
        self._size = 0
        #: reason -> (how many, their bytes (None: not looked at), the first few names, of
        #: what, whether there were more than counted)
        self._left: dict[str, tuple[int, int | None, list[str], str, bool]] = {}

    def store(self, relative: str, source: IO[bytes]) -> Path | None:
        """The copy of one artifact, or None where it was left out."""
        size = os.fstat(source.fileno()).st_size  # what the limit counts; a sparse file's too
        if self._max_count is not None and self._count >= self._max_count:
            self._leave("past limits.max_artifacts", relative, size)
            return None
        if self._max_size is not None and self._size + size > self._max_size:
            self._leave("past limits.max_artifacts_size", relative, size)
            return None
        try:
            stored = self._jobs.store_artifact(self._job, relative, source, size)
        except ArtifactChanged:
            self._leave("changed size while copied", relative, size)
            return None
        except OSError as exc:
            self._leave(f"not copied: {exc.strerror or exc}", relative, size)
            return None
        self._count += 1
        self._size += size
        return stored

    def left_by_walk(
        self, reason: str, count: int, names: Sequence[str], *, more: bool = False,
        what: str = "file(s)",
    ) -> None:  # fmt: skip
        """What the walk that found the artifacts left out for ``reason``: ``count`` of
        ``what`` (``more``: it stopped counting there), their sizes not looked at."""
        known, _, kept, _, beyond = self._left.get(reason, (0, 0, [], what, False))
        kept.extend(names[: max(0, _NAMED - len(kept))])
        self._left[reason] = (known + count, None, kept, what, beyond or more)

    def _leave(self, reason: str, relative: str, size: int) -> None:
        files, total, names, what, more = self._left.get(reason, (0, 0, [], "file(s)", False))
        if len(names) < _NAMED:
            names.append(relative)
        self._left[reason] = (files + 1, None if total is None else total + size, names,
                              what, more)  # fmt: skip

    def left_out(self) -> str | None:
        """One line for the job's log about the artifacts not kept, if any."""
        if not self._left:
            return None
        # Not at the top: a job's supervisor imports this module, and dataclasses with it.
        from spoold.core.limits import format_size  # noqa: PLC0415

        limits = {"past limits.max_artifacts": f"{self._max_count} files",
                  "past limits.max_artifacts_size": format_size(self._max_size or 0)}  # fmt: skip
        parts = []
        for reason, (count, total, names, what, more) in self._left.items():
            shown = ", ".join(names) + (", ..." if more or count > len(names) else "")
            said = f"{reason} ({limits[reason]})" if reason in limits else reason
            size = "" if total is None else f", {format_size(total)}"
            parts.append(f"{'more than ' if more else ''}{count} {what}{size}, {said}: {shown}")
        return f"artifacts not kept: {'; '.join(parts)}"


def _copy_sparse(source: int, target: int, size: int) -> None:
    """The ``size`` bytes of ``source`` into ``target`` (new, empty), the holes left holes: a
    sparse file takes in the spool only what it holds (copy_file_range alone fills them in
    on ext4, 2 GiB of zeros written for ``truncate -s 2G``). ArtifactChanged if ``source``
    is not ``size`` bytes long all along: a file written while copied is a mix of moments,
    and one cut short would be padded with zeros of its copy's own making."""
    position = 0
    while position < size:  # bounded: each round copies up to a hole past position, or ends
        try:
            data = os.lseek(source, position, os.SEEK_DATA)
            hole = os.lseek(source, data, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # a hole from position to the end
                break
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            data, hole = position, size  # a filesystem that does not say: copied whole
        if data >= size:
            break
        hole = min(hole, size)
        if not _copy_range(source, target, data, hole - data):
            raise ArtifactChanged("it ended sooner: it shrank while copied")
        position = hole
    # A shrink past the last data copied reads as a hole at the end; a growth reads nowhere.
    if os.fstat(source).st_size != size:
        raise ArtifactChanged("its size changed while copied")
    os.ftruncate(target, size)  # the hole at the end, if any


def _copy_range(source: int, target: int, offset: int, length: int) -> bool:
    """``length`` bytes at ``offset`` from ``source`` to the same offset in ``target``; False
    if ``source`` ended first."""
    end = offset + length
    while offset < end:  # bounded: each round copies something or returns
        try:
            copied = os.copy_file_range(source, target, end - offset, offset, offset)
        except OSError as exc:
            if exc.errno not in _NO_COPY_RANGE:
                raise
            return _write_range(source, target, offset, end)
        if not copied:
            return False
        offset += copied
    return True


def _write_range(source: int, target: int, offset: int, end: int) -> bool:
    while offset < end:  # bounded: each round writes something or returns
        data = os.pread(source, min(end - offset, 1 << 20), offset)
        if not data:
            return False
        written = 0
        while written < len(data):  # a regular file takes less only when full: the next raises
            written += os.pwrite(target, memoryview(data)[written:], offset + written)
        offset += len(data)
    return True
