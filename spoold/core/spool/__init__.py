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
import re
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
    "NotASpool",
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
#: What a directory that is not a spool yet may hold and still be made one: a filesystem's own
#: lost+found (a spool on a filesystem of its own), a checkout's README, dot files (.gitkeep).
#: Anything else is someone else's directory (a careless ``--spool /tmp``): init refuses it
#: rather than chmod it and fill it with a tree.
_HARMLESS = re.compile(r"lost\+found|README(\.\w+)?|\..+")


class NotASpool(SpoolError):
    """The directory is no usable spool (not one, a file where a directory belongs, another
    filesystem mounted inside it): the command line's or the operator's mistake, exit 2."""


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

    def init(self) -> list[str]:
        """Create the tree with safe permissions, whatever the umask; return what it changed of
        directories that were there already (``spoold init`` says each).

        NotASpool for a directory that holds things but is no spool (a careless ``--spool
        /tmp``: its mode is never changed, nothing is made in it), for a file where one of the
        tree's directories belongs, and for a directory of the tree on another filesystem.
        Existing directories keep their owner; their modes are tightened as far as
        ``spoold run`` demands (no group or other write, but incoming/'s group with the sticky
        bit), never loosened; a spool made by an older spoold gets ``ids/`` filled.
        """
        changed: list[str] = []
        if not self.root.is_dir():
            if os.path.lexists(self.root):
                raise NotASpool(_not_a_directory(self.root, f"--spool {self.root}"))
            self.root.mkdir(mode=DEFAULT_MODE, parents=True)
            self.root.chmod(DEFAULT_MODE)  # mkdir's mode is masked by the umask
        else:
            if not self._any_tree_directory() and (foreign := _foreign_entries(self.root)):
                shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
                raise NotASpool(
                    f"{self.root} is not empty and is not a spool (it holds {shown}; no "
                    "incoming/, pending/, ...): spoold init makes a spool only in a new or empty "
                    "directory, and leaves this one as it is; choose a directory of its own, "
                    f"e.g. --spool {self.root / 'spool'}"
                )
            # Only ever tightened: a checkout's spool/ comes as 0755, every job's log readable
            # by every user of the host.
            changed += _tighten(self.root, 0o027)
        for name in SPOOL_DIRECTORIES:
            path = self.root / name
            if os.path.lexists(path) and not path.is_dir():
                raise NotASpool(_not_a_directory(path, f"--spool {self.root}"))
            if name == "ids":
                continue  # made and filled by reservations.ensure(), below
            mode = _MODES.get(name, DEFAULT_MODE)
            if not path.is_dir():
                path.mkdir(mode=mode)
                path.chmod(mode)
                continue
            changed += _tighten(path, stat.S_IWOTH if name == "incoming" else 0o022)
            if mode & stat.S_ISVTX and not path.stat().st_mode & stat.S_ISVTX:
                path.chmod(path.stat().st_mode | stat.S_ISVTX)
                changed.append(
                    f"{path}: sticky bit set (a submitter may not rename another's file)"
                )
        self.check_filesystems()
        self.reservations.ensure()
        return changed

    def _any_tree_directory(self) -> bool:
        return any((self.root / name).is_dir() for name in SPOOL_DIRECTORIES)

    def check(self) -> None:
        """NotASpool unless every directory of the tree exists, as a directory."""
        missing, plain = [], []
        for name in SPOOL_DIRECTORIES:
            path = self.root / name
            if path.is_dir():
                continue
            if os.path.lexists(path):
                plain.append(path)
            elif name not in _ADDED_LATER:
                missing.append(name)
        if plain:
            raise NotASpool(_not_a_directory(plain[0], f"--spool {self.root}"))
        if missing:
            raise NotASpool(
                f"{self.root} is not a spool (missing {', '.join(missing)}): "
                f"run 'spoold init --spool {self.root}'"
            )

    def check_filesystems(self) -> None:
        """NotASpool if a directory of the tree is on another filesystem than the spool's root
        (a mount on done/, a link to elsewhere): every transition is a rename(2), which cannot
        cross filesystems (EXDEV), so finished jobs would pile up in running/. Checked at the
        daemon's and ``exec``'s start and by ``init``."""
        root = os.stat(self.root).st_dev
        for name in SPOOL_DIRECTORIES:
            try:
                device = os.stat(self._dirs[name]).st_dev
            except FileNotFoundError:
                continue  # ids/ or hosts/ of an older spool: made inside the root
            if device != root:
                path = self.root / name
                raise NotASpool(
                    f"{path} is on another filesystem than the spool {self.root}: a job moves "
                    "between the spool's directories by rename(2), which cannot cross "
                    f"filesystems; unmount it (or remove the link) so that {name}/ is a plain "
                    "directory of the spool, or mount the whole spool there instead"
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


def _foreign_entries(root: Path) -> list[str]:
    """What ``root`` holds that is no part of a spool, nor harmless (``_HARMLESS``)."""
    with os.scandir(root) as entries:
        return sorted(entry.name for entry in entries if not _HARMLESS.fullmatch(entry.name))


def _tighten(path: Path, off: int) -> list[str]:
    """Take the ``off`` bits from ``path``'s mode, if it has any; what it did, said."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if not mode & off:
        return []
    path.chmod(mode & ~off)
    return [f"{path}: mode {mode:04o} -> {mode & ~off:04o} (spoold run refuses others' write)"]


def _not_a_directory(path: Path, where: str) -> str:
    kind = "a link to nothing" if not os.path.exists(path) else "not a directory"
    return (
        f"{path} is {kind}, where the spool's directory belongs: move it away "
        f"(mv {path} {path}.old), then run 'spoold init {where}'"
    )


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
