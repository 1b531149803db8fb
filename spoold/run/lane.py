"""The jobs' own lane: who a job's processes run as, and the work dir only they may enter.

A job runs as the job user (``job_user:``, default ``spoold-job``) or a ``run_as`` user the
config allows, never as spoold's own user when spoold may switch users (it is root, or has
CAP_SETUID and CAP_SETGID), and as root only when the config names root. Its work dir is made
by its own user, mode 0700, under a work root of mode 1733 that no job may list: a job reaches
its work dir, the secrets its file references (handed over in its environment), and nothing of
the spool, of secrets_dir, of another job (given one job user per slot) or of the daemon.
"""

from __future__ import annotations

import os
import pwd
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from spoold.core.config import Config
from spoold.core.errors import ConfigError, ExecutorError
from spoold.core.spool.spares import Spares, sweep_spares
from spoold.run.process import RunAs

_CAP_SETGID, _CAP_SETUID = 6, 7
#: The work root's mode: job users may make their own entries in it, not list or remove others'.
WORK_ROOT_MODE = 0o1733


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
    ) -> None:
        self._users = users
        self.work_root = work_root
        #: Whether jobs run as users other than spoold's own.
        self.switching = switching
        #: What spoold says once at start about what jobs can reach.
        self.notes = notes

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
        if not switching:
            root = config.workdir or own_root()
            root.mkdir(parents=True, exist_ok=True)
            note = (
                f"spoold runs as {me} and cannot switch users: jobs run as {me} and can reach "
                f"all that {me} can (the spool, secrets_dir, the daemon's processes); run it as "
                "root, or with CAP_SETUID and CAP_SETGID, to give jobs a user of their own "
                "(README: Trust)"
            )
            return cls((None,), root, switching=False, notes=(note,))
        users = tuple(_job_user(name) for name in config.job_users)
        for user in users:
            if user is not None and user.uid == os.geteuid() != 0:
                raise ConfigError(
                    f"key job_user: {user.name} is spoold's own user: jobs would reach the "
                    "spool, secrets_dir and the daemon; name a user of their own (spoold-job)"
                )
        notes = []
        if any(user is None or user.uid == 0 for user in users):
            notes.append("jobs run as root (job_user: root): they can reach everything")
        elif len(set(config.job_users)) < config.workers:
            notes.append(
                f"jobs running at the same time share the user(s) {', '.join(config.job_users)}: "
                "one may reach another's work dir; give job_user one user per worker to keep "
                "them apart"
            )
        # One for all of this user's spools: each work dir's name is unguessable anyway.
        root = config.workdir or Path(tempfile.gettempdir()) / f"spoold-work-{os.geteuid()}"
        _prepare_root(root, "workdir" if config.workdir else None)
        _check_secrets(config, users)
        # root as the job user needs no switch: None is "as spoold itself".
        plain = tuple(
            None if user is not None and user.uid == os.geteuid() else user for user in users
        )
        return cls(plain, root, switching=True, notes=tuple(notes))

    def user_for(self, slot: str, run_as: str | None) -> RunAs | None:
        """Who a job in worker slot ``slot`` runs as (None: spoold's own user)."""
        if run_as is not None:
            user = RunAs.lookup(run_as)
            if not self.switching and user.uid != os.geteuid():
                raise ExecutorError(
                    f"run_as: spoold cannot switch users here, so not to {run_as!r}"
                )
            return None if user.uid == os.geteuid() else user
        index = int(slot) if slot.isdigit() else sum(map(ord, slot))
        return self._users[index % len(self._users)]

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


def _job_user(name: str) -> RunAs | None:
    try:
        return RunAs.lookup(name)
    except ExecutorError:
        raise ConfigError(
            f"key job_user: there is no user {name!r} on this host: create it (useradd --system "
            f"--no-create-home --shell /usr/sbin/nologin {name}) or name another"
        ) from None


def _prepare_root(root: Path, key: str | None) -> None:
    """Make the work root (or check the configured one): spoold's, mode 1733, reachable by
    every job user, under no directory another user could swap."""
    where = f"key {key}: " if key else ""
    try:
        root.mkdir(mode=0o700, parents=key is not None, exist_ok=True)
        info = os.lstat(root)
    except OSError as exc:
        raise ConfigError(f"{where}cannot make the work root {root}: {exc.strerror}") from None
    # Root may work in another's (``spoold exec`` as root on the package's work root): it
    # makes each work dir itself, for its user, and follows no link doing so.
    if not stat.S_ISDIR(info.st_mode) or (info.st_uid not in (os.geteuid(), 0) and os.geteuid()):
        raise ConfigError(f"{where}{root} is not a directory of spoold's own user: remove it")
    if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != WORK_ROOT_MODE:
        root.chmod(WORK_ROOT_MODE)
    for above in root.resolve().parents:
        mode = above.stat().st_mode
        if not mode & stat.S_IXOTH:
            raise ConfigError(
                f"{where}job users cannot reach the work root {root}: {above} is mode "
                f"{stat.S_IMODE(mode):04o} (chmod o+x {above}, or choose another workdir)"
            )


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
