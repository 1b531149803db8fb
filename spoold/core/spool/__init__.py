"""The spool tree: the only code that creates, renames or removes anything under it.

A job's state is the directory it sits in; every transition is one rename(2) of its directory.
``Spool`` is the tree itself (its root, its directories, their creation and permissions) and
builds, once, the stores that each own one part of it, sharing one durability setting and one
group commit of directory fsyncs (``fs.GroupCommit``):

- ``spool.stages``: incoming/, intake's stages under tmp/, rejected/ (``stages``);
- ``spool.jobs``: the jobs in every state and scheduled/, their leases, cancel requests,
  artifacts and work dirs (``jobs``);
- ``spool.reservations``: ids/, the job ids held (``reservations``);
- ``spool.deliveries``: outbox/, the callbacks' deliveries (``deliveries``);
- ``spool.host_lock``: one daemon per host (``host_lock``);
- ``spool.hosts``: hosts/, each host's heartbeat (``hosts``);
- ``spool.tokens`` and ``spool.idempotency``: the HTTP API's tokens/ and idempotency/
  (``records``).

What is fsynced, and why no more: on a journaling filesystem (ext4, xfs: the supported ones) a
rename is one journal operation, and an fsync of a directory commits every metadata change made
before it, in order. So each transition fsyncs the content that cannot be rebuilt (the job file
as submitted; the final status and log), renames, then fsyncs the directory it renamed into;
each store's module says what its own transitions fsync.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from spoold.core.errors import SpoolError
from spoold.core.spool.deliveries import Deliveries
from spoold.core.spool.fs import DEFAULT_MODE, GroupCommit, Relist, filesystem_type
from spoold.core.spool.host_lock import HostLock
from spoold.core.spool.hosts import HostRecords
from spoold.core.spool.jobs import JobDir, Jobs
from spoold.core.spool.records import IdempotencyKeys, TokenRecords
from spoold.core.spool.reservations import Reservations
from spoold.core.spool.stages import (
    FileOwner,
    FileSignature,
    Prepared,
    QuietCheck,
    StageLeft,
    Stages,
    TakenFile,
    is_transient_name,
)
from spoold.core.states import JOB_DIRECTORIES

__all__ = [
    "SPOOL_DIRECTORIES",
    "DirectoryCount",
    "FileOwner",
    "FileSignature",
    "JobDir",
    "Prepared",
    "QuietCheck",
    "Spool",
    "StageLeft",
    "TakenFile",
    "filesystem_type",
    "is_transient_name",
]

SPOOL_DIRECTORIES = (
    "incoming", "pending", "running", "done", "failed", "rejected", "scheduled", "outbox", "ids",
    "tmp", "hosts",
)  # fmt: skip
#: Directories an older spoold did not make: created (and filled) when the spool is opened
#: (ids/), or when first written (hosts/).
_ADDED_LATER = frozenset({"ids", "hosts"})

# Writers drop files here; spoold alone reads the rest. The sticky bit: a submitter can neither
# rename nor delete another's file (swapping a file another user is about to have validated).
_MODES = {"incoming": 0o1770}


class Spool:
    """A spool directory tree, and its stores: ``stages``, ``jobs``, ``reservations``,
    ``deliveries``, ``host_lock``, ``hosts``, ``tokens`` and ``idempotency``."""

    def __init__(self, root: Path, *, durable: bool = True, host: str = "") -> None:
        """``host``: this host's id among those sharing the spool (``host_id``), for the
        names of what it stages in tmp/."""
        # Absolute: job paths are handed to jobs (SPOOLD_JOB_DIR), which run elsewhere.
        self.root = Path(os.path.abspath(root))
        self._dirs = {name: os.path.join(root, name) for name in SPOOL_DIRECTORIES}
        self._disk = GroupCommit(self._dirs.values(), durable=durable)
        self.reservations = Reservations(self._dirs, self._disk)
        self.jobs = Jobs(self.root, self._dirs, self._disk, self.reservations, host=host)
        self.stages = Stages(self._dirs, self._disk, self.jobs, self.reservations, host=host)
        self.deliveries = Deliveries(self._dirs, self._disk)
        self.host_lock = HostLock(self.root, self._dirs)
        self.hosts = HostRecords(self.root, self._dirs)
        self.tokens = TokenRecords(self.root, durable=durable)
        self.idempotency = IdempotencyKeys(self.root, durable=durable)

    @property
    def durable(self) -> bool:
        """Whether the spool's writes are fsynced (``fsync`` in the config)."""
        return self._disk.durable

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
            self.root.mkdir(mode=DEFAULT_MODE, parents=True)
            self.root.chmod(DEFAULT_MODE)  # mkdir's mode is masked by the umask
        elif (mode := stat.S_IMODE(self.root.stat().st_mode)) & 0o027:
            # Only ever tightened: a checkout's spool/ comes as 0755, every job's log readable
            # by every user of the host.
            self.root.chmod(mode & ~0o027)
        for name in SPOOL_DIRECTORIES:
            path = self.root / name
            mode = _MODES.get(name, DEFAULT_MODE)
            if name == "ids":
                continue  # made and filled by reservations.ensure(), below
            if not path.is_dir():
                path.mkdir(mode=mode)
                path.chmod(mode)
            elif mode & stat.S_ISVTX and not path.stat().st_mode & stat.S_ISVTX:
                path.chmod(path.stat().st_mode | stat.S_ISVTX)
        self.reservations.ensure()

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

    def hidden(self, names: tuple[str, ...] = (*JOB_DIRECTORIES, "scheduled")) -> list[str]:
        """Those of the tree's directories this process may not look into (a submitter's CLI)."""
        return [
            n
            for n in names
            if os.path.isdir(self._dirs[n]) and not os.access(self._dirs[n], os.X_OK)
        ]

    def count(self, directory: str) -> int:
        """How many entries one top-level directory holds: names only, no stat, no sort."""
        with os.scandir(self._dirs[directory]) as entries:
            return sum(1 for entry in entries if not entry.name.startswith("."))

    def sync_tree(self) -> None:
        """fsync every top-level directory: at start, so that the first jobs do not pay for
        whatever metadata of the tree is still unwritten (a fresh ``init`` takes ~0.1 s here)."""
        self._disk.sync(*(self._dirs[name] for name in SPOOL_DIRECTORIES))


def _ancestors(root: Path) -> list[str]:
    """The directories above ``root`` as the kernel resolves them now, nearest first."""
    path = os.path.realpath(root)
    found = []
    while (parent := os.path.dirname(path)) != path:
        found.append(parent)
        path = parent
    return found


class DirectoryCount:
    """How many entries one of the spool's job directories holds (``Spool.count``), listed
    again only when the directory's stamp has changed since a listing that came after the stamp
    had settled (``Relist``). A backlog of 10,000 pending jobs cost ``systemctl status``'s line
    a listing every 2 s (5 ms each, a quarter of a percent of a core); now one stat."""

    def __init__(self, spool: Spool, directory: str, *, settle: float) -> None:
        self._spool = spool
        self._directory = directory
        self._relist = Relist(
            lambda: spool.jobs.directory_stamp(directory), settle=settle, every=sys.maxsize
        )
        self._entries = 0

    def count(self, *, wall: float, now: float) -> int:
        """``wall``: the wall clock's time, read before this call; ``now``: the monotonic
        clock's."""
        if self._relist.needed(wall=wall, now=now):
            self._entries = self._spool.count(self._directory)
            self._relist.listed()
        return self._entries
