"""What this user may look at in the spool, and the messages that say what they may not.

Nothing here says "no job" when the truth is "may not look": a job is reported missing only
where this user could have seen it. On the Debian package the submitters' group may read every
job's status.json and log (spoold masks secrets in both), and nothing else.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spoold.core.errors import JobNotFound, SpooldError
from spoold.core.spool import JobDir, Spool
from spoold.core.states import JOB_DIRECTORIES

if TYPE_CHECKING:
    from spoold.core.config import Config

_LOOKED_IN = (*JOB_DIRECTORIES, "scheduled")


class UsageError(SpooldError):
    """A command asked for what cannot be (an unknown job to wait for): exit 2."""


class NotAllowed(UsageError):
    """This user may not look at (or change) something in the spool: says what, and whose it is."""


def open_spool(config: Config) -> Spool:
    """The config's spool, checked to be one; NotAllowed if this user may not even enter it."""
    spool = Spool(config.spool, durable=config.durable, host=config.host_id)
    root = spool.root
    if root.is_dir() and not os.access(root, os.X_OK):
        raise NotAllowed(
            f"{root}: Permission denied: {who()} may not enter the spool ({owner(str(root))})"
        )
    spool.check()
    return spool


def who() -> str:
    """This user, as the messages name them: ``user alice (groups alice, spoold-submit)``."""
    import grp  # noqa: PLC0415 - only for a message
    import pwd  # noqa: PLC0415

    def group(gid: int) -> str:
        with contextlib.suppress(KeyError):
            return grp.getgrgid(gid).gr_name
        return str(gid)

    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    groups = ", ".join(group(g) for g in dict.fromkeys([os.getegid(), *os.getgroups()]))
    return f"user {name} (groups {groups})"


def caller(hostname: str) -> str:
    """Who runs this command, as records name them (a cancel, a schedule's pause, a token):
    ``alice on host1``."""
    import pwd  # noqa: PLC0415 - only for a record

    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = f"uid:{os.geteuid()}"
    return f"{user} on {hostname}"


def owner(path: str) -> str:
    """``owned by spoold:spoold, mode 0750``: whose a directory is, for a refusal."""
    import grp  # noqa: PLC0415 - only for a message
    import pwd  # noqa: PLC0415
    import stat  # noqa: PLC0415

    try:
        info = Path(path).stat()
    except OSError:
        return "not visible to this user"
    try:
        user = pwd.getpwuid(info.st_uid).pw_name
    except KeyError:
        user = str(info.st_uid)
    try:
        group = grp.getgrgid(info.st_gid).gr_name
    except KeyError:
        group = str(info.st_gid)
    return f"owned by {user}:{group}, mode {stat.S_IMODE(info.st_mode):04o}"


def permission_problem(exc: PermissionError) -> str:
    """A PermissionError met anywhere, as a message for the user."""
    where = Path(os.fsdecode(exc.filename or "."))
    return (
        f"{where}: {exc.strerror or 'Permission denied'}: {who()} may not do this here "
        f"({where.parent.name or where.parent}/ is {owner(str(where.parent))})"
    )


def hidden_directories(spool: Spool, names: tuple[str, ...] = _LOOKED_IN) -> list[str]:
    """The state directories this user may not look into."""
    return spool.hidden(names)


def refusal(spool: Spool, names: list[str]) -> str:
    dirs = ", ".join(f"{n}/" for n in names)
    return (
        f"{who()} may not look into {dirs} of {spool.root} ({owner(str(spool.dir(names[0])))}); "
        "the group those directories belong to may"
    )


def locate(spool: Spool, job_id: str) -> JobDir:
    """Where the job is; JobNotFound only when this user could have seen it, else NotAllowed."""
    found = spool.jobs.find(job_id)
    if found is not None:
        return found
    if hidden := hidden_directories(spool):
        raise NotAllowed(f"cannot tell where job {job_id!r} is: {refusal(spool, hidden)}")
    raise JobNotFound(f"no job {job_id!r} in {spool.root}")


def read_status(spool: Spool, job: JobDir) -> dict[str, Any]:
    """A job's status.json; NotAllowed, naming the file, when this user may not read it."""
    try:
        return spool.jobs.read_status(job)
    except PermissionError:
        raise NotAllowed(
            f"job {job.job_id} is in {job.directory}/, but {who()} may not read its status.json "
            f"({job.job_id}/ is {owner(job.location)})"
        ) from None


def current_status(spool: Spool, job_id: str, *, looks: int = 20) -> dict[str, Any]:
    """The job's status.json wherever it is now: a job that moves between finding it and
    reading it (claimed, finished) is looked for again."""
    return current_job(spool, job_id, looks=looks)[1]


def current_job(spool: Spool, job_id: str, *, looks: int = 20) -> tuple[JobDir, dict[str, Any]]:
    """Where the job is now and its status.json there (``current_status``)."""
    for _ in range(looks - 1):
        job = locate(spool, job_id)
        try:
            return job, read_status(spool, job)
        except JobNotFound:  # moved on: locate finds where to, or says it is gone
            continue
    job = locate(spool, job_id)
    return job, read_status(spool, job)
