"""Waiting on jobs from the command line: ``spoold wait``, ``submit --wait`` and ``logs -f``.

Each polls the spool (status.json of the jobs waited for), so it works on a shared spool and
without a daemon on this host. Every wait is bounded when a timeout is given; the outcome is
the exit code: 0 only if every job succeeded.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spoold.core.errors import IncomingMissing, JobNotFound, SpooldError
from spoold.face.access import NotAllowed, UsageError, locate, read_status, who
from spoold.face.views import LogText, ended_text, printable

if TYPE_CHECKING:
    from spoold.core.config import Config
    from spoold.core.spool import JobDir, Spool

#: How often the spool is looked at while waiting.
POLL = 0.2
#: A job found nowhere for this long was removed (a purge) rather than caught mid-rename.
GONE_AFTER = 5.0
_FINISHED = ("done", "failed")


def wait_for_jobs(
    spool: Spool, job_ids: list[str], *, timeout: float | None, host: str | None = None
) -> bool:
    """Wait until every job has ended, saying how each did; True only if every one succeeded.

    An id whose file waits in incoming/ (``spoold submit`` wrote the id into it) is a job to
    come: waited for until spoold takes it in (then until it ends) or rejects it, as
    ``submit --wait`` does; ``host``: this host's id, to say when no daemon runs here for
    the spool. JobNotFound for an id that names no job and no such file, UsageError for a
    schedule (which never ends): the command line's usage errors, as for every command given
    an id.
    """
    coming: list[Submitted] = []
    for job_id in job_ids:
        found = _job_or_file(spool, job_id)
        if isinstance(found, Path):
            print(printable(f"job {job_id} is not taken in yet (incoming/{found.name}): "
                            "waiting for it"), file=sys.stderr)  # fmt: skip
            coming.append(Submitted(job_id, found, _placed_at(found)))
            continue
        if found.directory == "scheduled":
            raise UsageError(
                f"{job_id} is a schedule, which never ends: wait for its runs ({job_id}@<time>)"
            )
    deadline = None if timeout is None else time.monotonic() + timeout
    ok = True
    if coming:
        accepted, ok, in_time = _until_taken(spool, host, coming, deadline, timeout)
        if not in_time:
            return False
        taken = {*accepted}
        job_ids = [j for j in job_ids if j in taken or j not in {c.job_id for c in coming}]
    return _wait_for_ended(spool, job_ids, deadline, timeout) and ok


def _job_or_file(spool: Spool, job_id: str) -> JobDir | Path:
    """Where the job is, or its file in incoming/; JobNotFound if neither. Looked at a few
    times: intake may be taking the file in (out of incoming/, not in pending/ yet)."""
    for look in range(3):
        try:
            return locate(spool, job_id)
        except JobNotFound:
            if (placed := find_incoming(spool, job_id)) is not None:
                return placed
            if look == 2:
                raise
        time.sleep(POLL)
    raise AssertionError("unreachable")


def _wait_for_ended(
    spool: Spool, job_ids: list[str], deadline: float | None, timeout: float | None
) -> bool:
    """Until every job (each in the spool now) has ended, or ``deadline`` (monotonic: where
    the whole wait's ``timeout`` ends); True only if every one succeeded."""
    left = list(job_ids)
    states: dict[str, str] = {}
    missing: dict[str, float] = {}  # job id -> since when it is found nowhere
    while True:
        for job_id in list(left):
            job = spool.jobs.find(job_id)
            if job is None:
                if time.monotonic() - missing.setdefault(job_id, time.monotonic()) > GONE_AFTER:
                    print(f"job {job_id} is gone from the spool (purged?)", file=sys.stderr)
                    states[job_id] = "gone"
                    left.remove(job_id)
                continue
            missing.pop(job_id, None)
            if job.directory in _FINISHED and (status := _final_status(spool, job)) is not None:
                print(ended_text(status))
                states[job_id] = str(status.get("state"))
                left.remove(job_id)
        if not left:
            break
        if deadline is not None and time.monotonic() >= deadline:
            print(
                f"spoold: still waiting after {timeout:g}s for {', '.join(left)}", file=sys.stderr
            )
            break
        time.sleep(POLL)
    return all(states.get(job_id) == "succeeded" for job_id in job_ids)


def _final_status(spool: Spool, job: JobDir) -> dict[str, Any] | None:
    try:
        return read_status(spool, job)
    except JobNotFound:  # moved on (a retry) while we looked
        return None


@dataclass(frozen=True)
class Submitted:
    """A file ``spoold submit`` placed into incoming/: the job it becomes, the name, when."""

    job_id: str
    placed: Path
    at: str  # RFC 3339, just before it was placed


def wait_for_submitted(
    spool: Spool, config: Config, placed: list[Submitted], *, timeout: float | None
) -> bool:
    """``submit --wait``: until each file is a job (then until it ends) or rejected."""
    deadline = None if timeout is None else time.monotonic() + timeout
    accepted, ok, in_time = _until_taken(spool, config.host_id, placed, deadline, timeout)
    if not in_time:
        return False
    return _wait_for_ended(spool, accepted, deadline, timeout) and ok if accepted else ok


def _until_taken(
    spool: Spool,
    host: str | None,
    placed: list[Submitted],
    deadline: float | None,
    timeout: float | None,
) -> tuple[list[str], bool, bool]:
    """Until each file in incoming/ is a job or rejected: the ids accepted, whether none was
    rejected, and whether that came before ``deadline`` (said on standard error if not)."""
    started, told = time.monotonic(), False
    waiting, accepted, ok = list(placed), [], True
    while waiting:
        for item in list(waiting):
            if spool.jobs.find(item.job_id) is not None:
                accepted.append(item.job_id)
                waiting.remove(item)
            elif not _still_there(item.placed) and (reason := rejection_of(spool, item)):
                said = f"{item.placed.name}: rejected: {reason.get('reason')}"
                print(printable(said), file=sys.stderr)
                waiting.remove(item)
                ok = False
        if not waiting:
            break
        waited = time.monotonic() - started > 5
        if not told and host is not None and waited and _no_daemon(spool, host):
            told = True
            print(f"spoold: no spoold runs on {host} for this spool: the file(s) "
                  "wait in incoming/ until one starts (or another host's takes them)",
                  file=sys.stderr)  # fmt: skip
        if deadline is not None and time.monotonic() >= deadline:
            names = printable(", ".join(item.placed.name for item in waiting))
            print(f"spoold: still in incoming/ after {timeout:g}s: {names}", file=sys.stderr)
            return accepted, ok, False
        time.sleep(POLL)
    return accepted, ok, True


#: How many files of incoming/ a look for a job to come reads at most: a backlog of files is
#: looked through by name first (``spoold submit`` keeps the file's name), then by content.
_LOOK_AT_MOST = 2000


def find_incoming(spool: Spool, job_id: str) -> Path | None:
    """The file in incoming/ that will become job ``job_id`` (its ``job_id:``, as ``spoold
    submit`` writes it), or None. Bounded: at most ``_LOOK_AT_MOST`` files, each within the
    intake's size limit; a file this user may not read, or not a regular one, is passed over."""
    from spoold.core.documents import load_document  # noqa: PLC0415 - YAML: only here

    try:
        names = sorted(
            spool.stages.incoming_names(),
            key=lambda name: not name.startswith(job_id),  # the likely one first
        )[:_LOOK_AT_MOST]
    except (OSError, IncomingMissing):
        return None
    needle = job_id.encode()
    for name in names:
        data = spool.stages.peek_incoming(name, 4 * 1024 * 1024)
        if data is None or needle not in data:
            continue
        try:
            document = load_document(data, name)
        except (SpooldError, ValueError, RecursionError):
            continue
        if isinstance(document, dict) and document.get("job_id") == job_id:
            return spool.dir("incoming") / name
    return None


def _placed_at(path: Path) -> str:
    """When a file was placed (its mtime), as a rejection's ``rejected_at`` compares: a
    rejection of it comes after."""
    from datetime import UTC, datetime  # noqa: PLC0415

    from spoold.core.clock import rfc3339  # noqa: PLC0415

    try:
        return rfc3339(datetime.fromtimestamp(path.stat().st_mtime - 1, UTC))
    except OSError:
        return ""


def _still_there(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return True


def _no_daemon(spool: Spool, host: str) -> bool:
    try:
        return spool.host_lock.daemon_on(host) is None
    except OSError:  # tmp/ is not this user's to look into: no telling
        return False


def rejection_of(spool: Spool, item: Submitted) -> dict[str, Any] | None:
    """The reason.json of the rejection of ``item``'s file, if there is one.

    rejected/ keeps a file under its name, or ``name-2.yaml`` and so on when that is taken:
    the one whose reason names this file, rejected since it was placed.
    """
    name = item.placed.name
    stem = name.rpartition(".")[0] or name
    try:
        candidates = [p.name for p in spool.dir("rejected").iterdir() if p.name.startswith(stem)]
    except OSError:
        return None
    for candidate in sorted(candidates):
        reason = spool.stages.read_rejection(candidate)
        if reason and reason.get("file") == name and str(reason.get("rejected_at")) >= item.at:
            return reason
    return None


def give_job_id(data: bytes, job_id: str) -> bytes | None:
    """The file with ``job_id`` added as its first key, in the file's own style (block YAML, or
    flow YAML and JSON); None where that cannot be done without changing anything else."""
    import codecs  # noqa: PLC0415

    import yaml  # noqa: PLC0415

    from spoold.core.documents import load_document  # noqa: PLC0415

    bom = codecs.BOM_UTF8 if data.startswith(codecs.BOM_UTF8) else b""
    try:
        text = data[len(bom) :].decode("utf-8")
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        before = load_document(data, "job.yaml")
    except (UnicodeDecodeError, yaml.YAMLError, SpooldError, ValueError, RecursionError):
        return None
    if not isinstance(root, yaml.MappingNode) or not root.value or not isinstance(before, dict):
        return None
    mark = root.value[0][0].start_mark
    if root.flow_style:
        at, piece = mark.index, f'"job_id": "{job_id}", '
    else:
        at = mark.index - mark.column
        newline = "\r\n" if "\r\n" in text else "\n"
        piece = f"{' ' * mark.column}job_id: {job_id}{newline}"
        if text[at : mark.index].strip():  # the first key is not the first thing on its line
            return None
    changed = bom + (text[:at] + piece + text[at:]).encode("utf-8")
    try:
        after = load_document(changed, "job.yaml")
    except (SpooldError, ValueError):
        return None
    return changed if after == {**before, "job_id": job_id} else None


class _LogText:
    """A job's log as ``spoold logs`` shows it: its own output, written by whoever submitted
    the job, with control characters escaped (newlines and tabs aside) and bytes that are not
    UTF-8 as ``\\xff`` (``LogText``, as the API serves it), as ``less`` shows them; the log
    file keeps them as written."""

    def __init__(self) -> None:
        self._shown = LogText()
        self._out = sys.stdout.buffer

    def write(self, chunk: bytes, *, final: bool = False) -> None:
        self._out.write(self._shown.text(chunk, final=final).encode("utf-8"))
        self._out.flush()


def show_log(spool: Spool, job_id: str, *, follow: bool) -> int:
    """``spoold logs ID [-f]``: the log; with -f, followed until the job ends, and then exit 0
    if it succeeded, 1 if not."""
    job = locate(spool, job_id)
    out = _LogText()
    try:
        log = open(job.log_path, "rb")  # noqa: SIM115 - closed below; valid across renames
    except PermissionError:
        raise NotAllowed(
            f"job {job_id} is in {job.directory}/, but {who()} may not read its log"
        ) from None
    with log:
        missing_since: float | None = None
        while True:
            chunk = log.read(65536)
            if chunk:
                out.write(chunk)
                continue
            if not follow:
                out.write(b"", final=True)
                return 0
            where = spool.jobs.find(job_id)
            if where is None:  # between two directories, or purged
                missing_since = missing_since or time.monotonic()
                if time.monotonic() - missing_since <= GONE_AFTER:
                    time.sleep(POLL)
                    continue
                out.write(b"", final=True)
                return 1
            missing_since = None
            if where.directory in ("pending", "running"):
                time.sleep(POLL)
                continue
            # The job ended: whatever it wrote before that is already in the file.
            out.write(log.read(), final=True)
            if where.directory == "scheduled":
                return 0
            status = _final_status(spool, where) or {}
            return 0 if status.get("state") == "succeeded" else 1
