"""ids/: the job-id reservations, and the end of a removal that gives one up.

ids/<job_id> reserves a job id for as long as the job's record is kept, across every state: a
symlink (made in one step, and never replacing anything) whose target is a token naming who
reserved it, the intake stage that made it. Checking the state directories one after another
cannot do this: a job moves between them while they are looked at, and two files naming one id
would both get in.

The stages make reservations (accept) and give up those of a stage a crash interrupted; a
record leaves the tree (jobs: purge, unschedule; stages: a rejected file purged) under
tmp/gone-<its reservation>~<job id>, and ``finish_removal`` gives up exactly that reservation,
never one made since by another job of that id. No fsync of ids/: the fsync of the directory
a job is renamed into commits the reservation made before it, as every metadata change before
it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Mapping

from spoold.core.errors import SpoolError
from spoold.core.ids import RUN_ID
from spoold.core.spool.fs import DEFAULT_MODE, GroupCommit, rename_noreplace
from spoold.core.states import JOB_DIRECTORIES

__all__ = [
    "GONE_PREFIX",
    "MIGRATION_PREFIX",
    "Reservations",
    "check_job_id",
    "new_token",
]

GONE_PREFIX = "gone-"  # a job or schedule being deleted: gone-<its reservation>~<job id>
MIGRATION_PREFIX = "ids-"  # ids/ being filled for a spool made by an older spoold


class Reservations:
    """The spool's ids/: which job ids are held, and by whom."""

    def __init__(self, dirs: Mapping[str, str], disk: GroupCommit) -> None:
        self._dirs = dirs
        self._disk = disk

    def ensure(self) -> int:
        """Make ids/ for a spool made before it existed: reserve every job's id; return how many.

        Filled under another name and renamed into place, so that no job is accepted against
        a half-filled ids/ (accept fails while ids/ is missing, and the file waits).
        """
        ids = self._dirs["ids"]
        if os.path.isdir(ids):
            return 0
        tmp = self._dirs["tmp"]
        building = f"{tmp}/{MIGRATION_PREFIX}{os.urandom(8).hex()}"
        os.mkdir(building, DEFAULT_MODE)
        os.chmod(building, DEFAULT_MODE)
        count = 0
        for directory in (*JOB_DIRECTORIES, "scheduled"):
            with os.scandir(self._dirs[directory]) as entries:
                names = [e.name for e in entries if RUN_ID.match(e.name)]
            for name in names:
                with contextlib.suppress(FileExistsError):
                    os.symlink(new_token("mig-"), f"{building}/{name}")
                    count += 1
        try:
            rename_noreplace(building, ids)
        except FileExistsError:  # another spoold did the same a moment ago
            shutil.rmtree(building)
            return 0
        self._disk.sync(self._dirs["tmp"])
        return count

    def reserved(self, job_id: str) -> bool:
        """Whether a job (or a schedule, or a file being accepted) holds this id."""
        check_job_id(job_id)
        return os.path.lexists(f"{self._dirs['ids']}/{job_id}")

    def reserve(self, job_id: str, token: str, *, made: str | None = None) -> bool:
        """Reserve ``job_id`` for ``token``; False if it is held already. ``made``: a symlink
        to ``token`` made ahead (a ready stage's), moved into place, not made now."""
        try:
            if made is None:
                os.symlink(token, f"{self._dirs['ids']}/{job_id}")
            else:
                rename_noreplace(made, f"{self._dirs['ids']}/{job_id}")
        except FileExistsError:
            return False
        return True

    def holder(self, job_id: str) -> str | None:
        """The token holding ``job_id``, or None."""
        try:
            return os.readlink(f"{self._dirs['ids']}/{job_id}")
        except OSError:  # none, or not a reservation spoold made
            return None

    def unreserve(self, job_id: str, token: str) -> None:
        """Give ``job_id`` up, if ``token`` still holds it (never another job's reservation)."""
        if self.holder(job_id) == token:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self._dirs['ids']}/{job_id}")

    def finish_removal(self, gone: str) -> None:
        """Delete what a removal moved out of the tree to ``gone``, giving up its id first."""
        token, _, job_id = os.path.basename(gone)[len(GONE_PREFIX) :].partition("~")
        if job_id and RUN_ID.match(job_id):
            self.unreserve(job_id, token)
        shutil.rmtree(gone, ignore_errors=True)


def new_token(prefix: str) -> str:
    return f"{prefix}{os.urandom(8).hex()}"


def check_job_id(job_id: str) -> None:
    # The id becomes a path component: anything but a plain name could escape the spool.
    if not RUN_ID.match(job_id):
        raise SpoolError(f"{job_id!r} is not a valid job id")
