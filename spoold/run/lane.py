"""The jobs' own lane: who a job's processes run as, and the work dir only they may enter.

A job runs as its worker slot's job user (``job_user:``; by default ``spoold-job`` for the
first slot, ``spoold-job2`` for the second, and so on) or a ``run_as`` user the
config allows, never as spoold's own user when spoold may switch users (it is root, or has
CAP_SETUID and CAP_SETGID), and as root only when the config names root. Its work dir is made
by its own user, mode 0700, under a work root of mode 1733 that no job may list: a job reaches
its work dir, the secrets its file references (handed over in its environment), and nothing of
the spool, of secrets_dir, of another job (given one job user per slot) or of the daemon.
What a slot's own user leaves in the shared temporary directories (``SHARED_DIRS``) is removed
after each attempt, so that the slot's next job does not find it either.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from spoold.core.config import Config
from spoold.core.errors import ConfigError, ExecutorError
from spoold.core.spool.spares import Spares, sweep_spares
from spoold.run.process import RunAs

_CAP_SETGID, _CAP_SETUID = 6, 7
#: The first worker slot's job user when the config names none; the others' add their number.
DEFAULT_JOB_USER = "spoold-job"


def default_job_users(workers: int) -> tuple[str, ...]:
    """The accounts of ``workers`` worker slots when the config names no ``job_user``: one
    each (spoold-job, spoold-job2, ...), so that jobs running at the same time, each in a slot
    of its own, cannot reach each other (SPEC 13) unless the config says they may."""
    return (DEFAULT_JOB_USER, *(f"{DEFAULT_JOB_USER}{n}" for n in range(2, workers + 1)))


def _job_user_names(config: Config) -> tuple[str, ...]:
    """The job users the config names (``job_user:``), else the default account of each slot."""
    return config.job_users or default_job_users(max(1, config.workers))


def user_slots(config: Config) -> dict[str, str]:
    """Which worker slot each job user belongs to, by name, for the users that belong to one
    slot alone (none where slots share one: ``job_user: NAME``). A job adopted after a restart
    goes on as the user it ran as: the daemon gives it that user's slot, so that no job that
    starts meanwhile runs as the same user beside it (SPEC 13: a job reaches no other job)."""
    names = _job_user_names(config)
    by_slot = [names[index % len(names)] for index in range(max(1, config.workers))]
    return {name: str(index) for index, name in enumerate(by_slot) if by_slot.count(name) == 1}


#: The work root's mode: job users may make their own entries in it, not list or remove others'.
WORK_ROOT_MODE = 0o1733

#: Directories every user may write: what a job leaves there, outside its work dir, the next
#: job of its slot (the same user) would find. What that user made or changed there during an
#: attempt is removed after it, where the user is the slot's alone (``Lane.sweeps``).
SHARED_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
#: The kernel stamps a change with a coarse clock (a tick: 1-10 ms): a stamp this close to a
#: look may be followed by a change with the same stamp, so such a directory is looked
#: through after the attempt all the same, and what was changed this long before the look
#: counts as changed during the attempt.
STAMP_SLACK_NS = 50_000_000


class SharedLook(NamedTuple):
    """The shared directories as an attempt began (``look``): after it, only those whose
    stamp changed are looked through, for what its user made or changed since ``since``."""

    #: Wall-clock nanoseconds (the kernel's stamps are on it): changes from then on count.
    since: int
    #: Each directory and its ctime at the look (None: look through it after the attempt).
    stamps: tuple[tuple[str, int | None], ...]

    @classmethod
    def look(cls, dirs: tuple[str, ...] = SHARED_DIRS) -> SharedLook:
        """The directories now, before anything of an attempt runs. The wall clock, not an
        injected one: the stamps it is compared with are the kernel's."""
        began = time.time_ns()
        stamps: list[tuple[str, int | None]] = []
        for directory in dirs:
            # None: not there (or not to be seen): whatever is there after counts.
            ctime = _ctime(directory)
            settled = ctime is not None and ctime < began - STAMP_SLACK_NS
            stamps.append((directory, ctime if settled else None))
        return cls(began - STAMP_SLACK_NS, tuple(stamps))

    @classmethod
    def since_start(cls, started: int, dirs: tuple[str, ...] = SHARED_DIRS) -> SharedLook:
        """For an attempt adopted from a worker that is gone: all of them, for what changed
        since its start (``started``, wall-clock nanoseconds)."""
        return cls(started - STAMP_SLACK_NS, tuple((directory, None) for directory in dirs))

    def changed(self) -> tuple[str, ...]:
        """The directories to look through now: those whose stamp is not the look's."""
        found = []
        for directory, ctime in self.stamps:
            now = _ctime(directory)
            if now is not None and (ctime is None or now != ctime):  # None: nothing is there
                found.append(directory)
        return tuple(found)


def _ctime(directory: str) -> int | None:
    """A directory's ctime (which no user can set back), None if it cannot be seen."""
    try:
        return os.stat(directory).st_ctime_ns  # noqa: PTH116 - at each attempt: no Path made
    except OSError:
        return None


def may_switch_users() -> bool:
    """Whether this process may start processes as other users (root, or the capabilities)."""
    if os.geteuid() == 0:
        return True
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            line = next(line for line in status if line.startswith("CapEff:"))
    except (OSError, StopIteration):
        return False
    effective = int(line.split()[1], 16)
    return all(effective >> cap & 1 for cap in (_CAP_SETUID, _CAP_SETGID))


class Lane:
    """Who each worker slot's jobs run as, and where they work."""

    def __init__(
        self,
        users: tuple[RunAs | None, ...],
        work_root: Path,
        *,
        switching: bool,
        notes: tuple[str, ...],
        swept: frozenset[int] = frozenset(),
    ) -> None:
        self._users = users
        self.work_root = work_root
        #: Whether jobs run as users other than spoold's own.
        self.switching = switching
        #: What spoold says once at start about what jobs can reach.
        self.notes = notes
        self._swept = swept

    @classmethod
    def from_config(
        cls, config: Config, own_root: Callable[[], Path], *, switching: bool | None = None
    ) -> Lane:
        """The lane the config describes on this host; ConfigError if it cannot be had.

        ``own_root`` makes the work root for jobs that run as spoold's own user (the spool's
        tmp/work/) when the config names no workdir.
        """
        switching = may_switch_users() if switching is None else switching
        me = pwd.getpwuid(os.geteuid()).pw_name if _has_name(os.geteuid()) else str(os.geteuid())
        owners = _trusted_owners(config)
        if not switching:
            root = config.workdir or own_root()
            _prepare_root(root, "workdir" if config.workdir else None, owners, shared=False)
            note = (
                f"spoold runs as {me} and cannot switch users: jobs run as {me} and can reach "
                f"all that {me} can (the spool, secrets_dir, the daemon's processes); run it as "
                "root, or with CAP_SETUID and CAP_SETGID, to give jobs a user of their own "
                "(README: Trust)"
            )
            return cls((None,), root, switching=False, notes=(note,))
        users, missing = _slot_users(config)
        for user in users:
            if user is not None and user.uid == os.geteuid() != 0:
                raise ConfigError(
                    f"key job_user: {user.name} is spoold's own user: jobs would reach the "
                    "spool, secrets_dir and the daemon; name a user of their own (spoold-job)"
                )
        notes = []
        if any(user is None or user.uid == 0 for user in users):
            notes.append("jobs run as root (job_user: root): they can reach everything")
        elif missing:
            notes.append(
                f"worker slots whose own job users are missing ({', '.join(missing)}) run their "
                f"jobs as {DEFAULT_JOB_USER}, which jobs of the first slot run as: jobs running "
                "at the same time may reach each other; make each like spoold-job (useradd "
                f"--system --gid {DEFAULT_JOB_USER} --no-create-home --home-dir /nonexistent "
                f"--shell /usr/sbin/nologin {missing[0]}), or name job_user"
            )
        elif len({user.uid for user in users if user is not None}) < config.workers:
            shared = ", ".join(dict.fromkeys(user.name for user in users if user is not None))
            notes.append(
                f"jobs running at the same time share the user(s) {shared}: "
                "one may reach another's work dir; give job_user one user per worker to keep "
                "them apart"
            )
        # One for all of this user's spools: each work dir's name is unguessable anyway.
        root = config.workdir or Path(tempfile.gettempdir()) / f"spoold-work-{os.geteuid()}"
        _prepare_root(root, "workdir" if config.workdir else None, owners, shared=True)
        _check_secrets(config, users)
        # root as the job user needs no switch: None is "as spoold itself".
        plain = tuple(
            None if user is not None and user.uid == os.geteuid() else user for user in users
        )
        return cls(plain, root, switching=True, notes=tuple(notes), swept=_swept(config, plain))

    def user_for(self, slot: str, run_as: str | None) -> RunAs | None:
        """Who a job in worker slot ``slot`` runs as (None: spoold's own user)."""
        if run_as is not None:
            return self._switch_to(run_as, "run_as")
        return self._slot_user(slot)

    def sweeps(self, slot: str, user: RunAs | None) -> bool:
        """Whether what ``user`` leaves in the shared directories (SHARED_DIRS) is removed
        after each attempt in worker slot ``slot``: where the user is that slot's own and no
        other's (a daemon's slot, not ``spoold exec``'s; no ``run_as`` may name it)."""
        return (
            user is not None
            and user.uid in self._swept
            and slot.isascii()
            and slot.isdigit()
            and (own := self._slot_user(slot)) is not None
            and own.uid == user.uid
        )

    def job_user(self, slot: str) -> str | None:
        """The name of worker slot ``slot``'s job user (None: spoold's own user), as a lease
        records it: an adopted job goes on as that user (``user_named``), whichever slot
        adopts it, since its work dir and its processes are that user's."""
        user = self._slot_user(slot)
        return None if user is None else user.name

    def user_named(self, job_user: str | None, run_as: str | None) -> RunAs | None:
        """Who a job runs as, its job user being ``job_user`` (``job_user()``, as its lease
        recorded it; None: spoold's own user) unless its file names ``run_as``."""
        if run_as is not None:
            return self._switch_to(run_as, "run_as")
        if job_user is None:
            return None
        # A slot's own, as looked up at start (``user_for`` gives the same): getgrouplist
        # reads every group source again each time (190 us a job here through nss-systemd).
        known = [user for user in self._users if user is not None and user.name == job_user]
        return known[0] if known else self._switch_to(job_user, "the job user")

    def job_user_of(self, workdir: Path) -> str | None:
        """Which job user owns ``workdir`` (an attempt's work dir, made by its job user);
        None if none of them does, or it is not there."""
        try:
            owner = workdir.lstat().st_uid
        except OSError:
            return None
        found = [user.name for user in self._users if user is not None and user.uid == owner]
        return found[0] if found else None

    def _slot_user(self, slot: str) -> RunAs | None:
        index = int(slot) if slot.isascii() and slot.isdigit() else sum(map(ord, slot))
        return self._users[index % len(self._users)]

    def _switch_to(self, name: str, what: str) -> RunAs | None:
        """The user ``name`` to start processes as (None: spoold's own user); ExecutorError
        if there is none, or spoold cannot switch to it (``what``: where it was named)."""
        try:
            user = RunAs.lookup(name)
        except ExecutorError:
            raise ExecutorError(f"{what}: there is no user {name!r} on this host") from None
        if not self.switching and user.uid != os.geteuid():
            raise ExecutorError(f"{what}: spoold cannot switch users here, so not to {name!r}")
        return None if user.uid == os.geteuid() else user

    def spares(self, host: str) -> Spares:
        """Work dirs made ahead in the work root by this process (which must make them as
        root: each is renamed to a job's, then given to its user)."""
        return Spares(str(self.work_root), host, dirs=True, mode=0o700)

    def sweep_spares(self, host: str) -> int:
        """Remove the work dirs made ahead (``spares``) by processes that are gone."""
        return sweep_spares(str(self.work_root), host)

    def workdir_for(self, job_id: str, attempt: int) -> Path:
        """A new work dir's path for one attempt of a job (unguessable: no job can take it first)."""
        return self.work_root / f"{job_id}.{attempt}.{os.urandom(6).hex()}"


def _has_name(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def _slot_users(config: Config) -> tuple[tuple[RunAs | None, ...], tuple[str, ...]]:
    """Each worker slot's job user, and the default accounts that are missing (their slots
    run as the first slot's: a default must not keep a spoold upgraded from one job user, or
    given more workers, from starting). Named in the config, each must be there."""
    if config.job_users:
        return tuple(_job_user(name) for name in config.job_users), ()
    first, *others = _job_user_names(config)
    users, missing = [_job_user(first)], []
    for name in others:
        try:
            users.append(RunAs.lookup(name))
        except ExecutorError:
            users.append(users[0])
            missing.append(name)
    return tuple(users), tuple(missing)


def _swept(config: Config, users: tuple[RunAs | None, ...]) -> frozenset[int]:
    """The uids whose leftovers in the shared directories are removed after each attempt
    (``Lane.sweeps``): a slot's own job user, which no other slot shares and no ``run_as``
    may name (by any name of its uid), and not root."""
    by_slot = [users[index % len(users)] for index in range(max(1, config.workers))]
    uids = [user.uid for user in by_slot if user is not None]
    named = set()
    for name in config.allowed_run_as:
        with contextlib.suppress(KeyError):
            named.add(pwd.getpwnam(name).pw_uid)
    return frozenset(uid for uid in uids if uid != 0 and uids.count(uid) == 1 and uid not in named)


def _job_user(name: str) -> RunAs | None:
    try:
        return RunAs.lookup(name)
    except ExecutorError:
        raise ConfigError(
            f"key job_user: there is no user {name!r} on this host: create it (useradd --system "
            f"--no-create-home --shell /usr/sbin/nologin {name}) or name another"
        ) from None


def _trusted_owners(config: Config) -> frozenset[int]:
    """Who may own the work root and the directories above it: spoold's own user and root.
    And the spool's owner: root's ``spoold exec`` on a daemon's spool (the package's, whose
    work root is its daemon's) trusts that user, who holds every record of the spool already;
    a daemon refuses a spool of anyone but itself and root (``Spool.unsafe_permissions``)."""
    owners = {os.geteuid(), 0}
    with contextlib.suppress(OSError):
        owners.add(config.spool.stat().st_uid)
    return frozenset(owners)


def _prepare_root(root: Path, key: str | None, owners: frozenset[int], *, shared: bool) -> None:
    """Make the work root, or check the configured one: a directory, never a link, that only
    ``owners`` may change, under directories that only they may change. ``shared``: job users
    of their own make their work dirs there: mode 1733 (spoold sets it on its own), reachable
    by every job user. Anything else refuses to run, naming the path, what was found and the
    fix: another user who may rename entries there could put a directory of its own in place
    of a job's work dir, and so its files among the job's artifacts."""
    where = (
        f"key {key}: the work root {root}" if key else f"the work root {root} (workdir's default)"
    )
    me = _who(os.geteuid())
    elsewhere = f"name a workdir of {me}'s" if key else f"set workdir: to a directory of {me}'s"
    # First what is there above it: nothing is made or changed under another's directory.
    if problem := _ancestor_problem(root, owners, shared=shared):
        raise ConfigError(f"refusing to run: {where}: {problem}, or {elsewhere}")
    try:
        if key is not None:
            _make_parents(root.parent)
        with contextlib.suppress(FileExistsError):
            root.mkdir(0o700)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot make it: {exc.strerror}") from None
    try:
        # Not followed if a link: one planted there (in /tmp, by anyone) would take spoold to
        # a directory of its maker's choosing.
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise ConfigError(f"{where}: cannot open it: {exc.strerror}") from None
        raise ConfigError(
            f"refusing to run: {where} is not a directory (a symbolic link or a file: spoold "
            f"follows no link there); remove it (rm {root}), or {elsewhere}"
        ) from None
    try:
        info = os.fstat(fd)
        mode = stat.S_IMODE(info.st_mode)
        if info.st_uid not in owners:
            fix = f"chown {me} {root}" if key else f"remove it (rm -rf {root}): another made it"
            mine = f"{me} (spoold's user)" if os.geteuid() == 0 else f"{me} (spoold's user) or root"
            raise ConfigError(
                f"refusing to run: {where} belongs to {_who(info.st_uid)}, not to {mine}: that "
                f"user could put a directory of its own in place of a job's work dir, and its "
                f"files among the job's artifacts; {fix}, or {elsewhere}"
            )
        if info.st_uid == os.geteuid() and shared and mode != WORK_ROOT_MODE:
            os.fchmod(fd, WORK_ROOT_MODE)
        elif _writable_by_others(info) or (shared and not mode & stat.S_IXOTH):
            why = (
                "others could rename a job's work dir there and put their own in its place"
                if _writable_by_others(info)
                else "job users cannot reach their work dirs there"
            )
            wanted = f"{WORK_ROOT_MODE:04o}" if shared else "go-w"
            raise ConfigError(
                f"refusing to run: {where} is mode {mode:04o}: {why}; chmod {wanted} {root}, or "
                f"{elsewhere}"
            )
    finally:
        os.close(fd)


def _make_parents(directory: Path) -> None:
    """Make the missing directories down to ``directory``, mode 0755 whatever the umask (the
    job users pass through them; no one but their maker may change them)."""
    missing = []
    while not (directory.exists() or directory.is_symlink()) and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    for made in reversed(missing):
        with contextlib.suppress(FileExistsError):
            made.mkdir(0o755)
            made.chmod(0o755)  # not the umask's: the job users pass through


def _ancestor_problem(root: Path, owners: frozenset[int], *, shared: bool) -> str | None:
    """What about the directories above the work root (and the links on the way to it) lets
    a user other than ``owners`` rename it, with the fix; or, ``shared``, keeps job users
    from reaching it. None if nothing does. Those not made yet are not looked at."""
    for above in root.absolute().parents:
        if above.is_symlink() and (owner := above.lstat().st_uid) not in owners:
            return (
                f"{above}, a symbolic link on the way to it, belongs to {_who(owner)}, who could "
                f"point it elsewhere; write the path it stands for ({above.resolve()}) in workdir:"
            )
    for above in root.resolve().parents:
        try:
            info = above.stat()
        except FileNotFoundError:
            continue
        mode = stat.S_IMODE(info.st_mode)
        if info.st_uid not in owners:
            return (
                f"{above}, above it, belongs to {_who(info.st_uid)}, who could put another "
                f"directory in its place: chown {_who(os.geteuid())} {above}"
            )
        if _writable_by_others(info):
            return (
                f"{above}, above it, is mode {mode:04o}: others could put another directory in "
                f"its place; chmod go-w {above} (or chmod +t {above})"
            )
        if shared and not mode & stat.S_IXOTH:
            return f"job users cannot reach it: {above} is mode {mode:04o}; chmod o+x {above}"
    return None


def _writable_by_others(info: os.stat_result) -> bool:
    """Whether users other than the owner may rename entries of this directory (writable by
    its group or everyone, without the sticky bit)."""
    return bool(info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)) and not info.st_mode & stat.S_ISVTX


def _who(uid: int) -> str:
    """A user as a message names it: by name, or by uid where it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _check_secrets(config: Config, users: tuple[RunAs | None, ...]) -> None:
    """A job user must not be able to read secrets_dir: it would reach every job's secrets."""
    if config.secrets_dir is None or not config.secrets_dir.is_dir():
        return
    info = config.secrets_dir.stat()
    for user in users:
        if user is None or user.uid == 0:
            continue
        readable = (
            info.st_uid == user.uid
            or (info.st_gid in user.groups and info.st_mode & stat.S_IRGRP)
            or info.st_mode & stat.S_IROTH
        )
        if readable:
            raise ConfigError(
                f"key secrets_dir: the job user {user.name} may read {config.secrets_dir}: "
                f"jobs must reach only the secrets their files reference (chown it to spoold's "
                f"user, chmod 0700)"
            )
