"""What ``spoold status`` shows: one job (its attempts, steps, why it waits, its callbacks) or
the spool (counts, callbacks given up, the daemon), read as this user may (spoold.face.access);
and ``printable``, through which every text face of the command line shows what a submitter
wrote."""

from __future__ import annotations

import codecs
import contextlib
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from spoold.core.clock import parse_rfc3339, rfc3339
from spoold.core.errors import SpooldError, ValidationIssue, escape_unprintable
from spoold.core.procfs import started_at
from spoold.core.spool import JobDir, Spool
from spoold.core.states import state_phrase
from spoold.core.units import format_duration
from spoold.face.access import current_job, owner, who
from spoold.out.notices import count_outbox, is_notification

if TYPE_CHECKING:
    from spoold.core.config import Config

#: The directories ``spoold status`` counts; ids/ and tmp/ are spoold's own bookkeeping.
COUNTED = ("incoming", "pending", "running", "done", "failed", "rejected", "scheduled")
_WIDTH = 17  # the label column of ``spoold status ID``
#: What ``spoold status ID`` reads from the job file of a job accepted before status.json kept
#: these (JobStatus ``labels`` and ``description``, a step entry's ``continue_on_error``).
_ABOUT_KEYS = ("labels", "description", "continue_on_error")


# -- text from a submitter ---------------------------------------------------------------------

#: What a terminal acts on instead of showing (C0 controls, DEL, C1 controls: colours, a cleared
#: screen, a window title, a line overwritten), the lone surrogates that stand for bytes that
#: are not UTF-8 (a file name, a job's output), which no UTF-8 terminal can be sent, and the
#: backslash, doubled: else a name that holds a backslash and an ``n`` could not be told from one
#: that holds a newline. And the invisible characters that reorder or hide what is shown (bidi
#: overrides, embeddings and isolates, the line and paragraph separators, zero-width space and
#: no-break space, word joiner, tags): a job's line that shows `ok` may hold a `fail` the
#: terminal turned around ("Trojan Source"). Joiners (U+200C, U+200D) stay: scripts need them.
_INVISIBLE = (
    "\u061c\u200b\u200e\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff\U000e0000-\U000e007f"
)
_UNPRINTABLE = re.compile(rf"[\\\x00-\x1f\x7f-\x9f\ud800-\udfff{_INVISIBLE}]")
#: The same, but for newlines and tabs: in a text of several lines (a job's log) they stay.
_UNPRINTABLE_IN_LINES = re.compile(rf"[\\\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff{_INVISIBLE}]")


def _escaped(found: re.Match[str]) -> str:
    code = ord(found.group())
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, as surrogateescape decoded it
        return f"\\x{code - 0xDC00:02x}"
    return repr(found.group())[1:-1]  # \x1b, \n, \t, \r, \x9b, \ud800, \\


def printable(text: object, *, lines: bool = False) -> str:
    """``text`` as the command line shows what a submitter wrote (a file name, a description,
    a label, an error, a job's log): each control character escaped as Python writes it
    (``\\x1b``, ``\\n``), as spoold's own log writes a file name, a byte that is not UTF-8
    as ``\\xff``, and a backslash as ``\\\\`` (so that every escape reads one way back). The
    submitter is not trusted (SPEC 13): what they wrote must not drive the operator's terminal,
    nor add a line of its own to a listing. ``lines``: a text of several lines, whose newlines
    and tabs stay. ``--json`` output needs none of this: JSON escapes them all."""
    pattern = _UNPRINTABLE_IN_LINES if lines else _UNPRINTABLE
    return pattern.sub(_escaped, str(text))


def issue_line(path: object, issue: ValidationIssue) -> str:
    """One refusal of a file as ``spoold validate`` prints it: the file name (the caller's
    text: ``printable``), then the issue, whose words quote their values escaped already where
    they were made (``printable`` would double each backslash of those escapes)."""
    return printable(str(path)) + escape_unprintable(issue.format(""))


class LogText:
    """A job's log as text for a person (``spoold logs``, the API's log and its streams, the
    page), from its bytes as they come: ``printable`` with its newlines and tabs, a character
    split between two pieces decoded whole (``held``: the bytes of one still waiting)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")

    def text(self, piece: bytes, *, final: bool = False) -> str:
        """The text of ``piece``; ``final``: nothing follows, bytes held are shown as bytes."""
        return printable(self._decoder.decode(piece, final), lines=True)

    @property
    def held(self) -> int:
        """How many bytes at the end of the pieces so far wait for the rest of a character."""
        return len(self._decoder.getstate()[0])


def log_piece(data: bytes, following: bytes, *, growing: bool) -> tuple[str, int]:
    """A piece of a log as ``LogText`` shows it, and how many of its bytes that text covers
    (offsets are the file's bytes): all of them, but for a character cut in two by the piece's
    end, which the next piece starts with. ``following``: the (up to 3) bytes after ``data`` in
    the file; ``growing``: the log may still get more (its job runs), so a character cut at its
    end may yet be completed. A piece that is nothing but part of a character shows it as bytes
    (``\\xe2``): every piece moves on."""
    shown = LogText()
    text = shown.text(data)
    held = shown.held
    if not held:
        return text, len(data)
    rest = data[-held:] + following
    needs = 2 if rest[0] < 0xE0 else 3 if rest[0] < 0xF0 else 4  # its first byte says
    cut_in_two = _decodes(rest[:needs]) if len(rest) >= needs else growing
    if cut_in_two and held < len(data):
        return text, len(data) - held
    return text + shown.text(b"", final=True), len(data)


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# -- one job ----------------------------------------------------------------------------------


def outcome_text(exit_code: Any, error: Any) -> str:
    """``exit code 3``, or the error (which names the exit code when it is all there is)."""
    if error:
        said = f"exit code {exit_code}"
        return str(error) if exit_code is None or said in str(error) else f"{said}: {error}"
    return "" if exit_code is None else f"exit code {exit_code}"


def ended_text(status: dict[str, Any]) -> str:
    """``job f3 failed: exit code 3``, ``job ok1 succeeded``, ``job c was cancelled: ...``."""
    state = str(status.get("state"))
    outcome = (
        "" if state == "succeeded" else outcome_text(status.get("exit_code"), status.get("error"))
    )
    said = f"job {status.get('job_id')} {state_phrase(state)}" + (f": {outcome}" if outcome else "")
    return printable(said)


def _line(label: str, text: Any) -> str:
    """One line of ``spoold status ID``: a value of several lines stays on this one."""
    return printable(f"{label + ':':<{_WIDTH}}{text}")


def shown_status(spool: Spool, job_id: str) -> dict[str, Any]:
    """The job wherever it is now (``current_status``), as every face shows it (``job_view``)."""
    return job_view(spool, *current_job(spool, job_id))


def job_view(spool: Spool, job: JobDir, status: dict[str, Any]) -> dict[str, Any]:
    """The job as every face shows it (``spoold status``, the API's job, the page): its
    status.json, with an entry per step (``steps_before_start``) while it has none yet."""
    if status.get("steps") or job.directory not in _STEPS_SHOWN:
        return status
    try:
        document = job_document(spool, job, status, keys=("steps",))
    except (OSError, SpooldError, ValueError):  # not this user's to read: as status.json says
        return status
    steps = steps_before_start(document.get("steps"), ended=job.directory in ("done", "failed"))
    return {**status, "steps": steps} if steps else status


#: Where a job's steps may be missing from status.json, to be shown from its file: not done/
#: (a job succeeds only by its steps, all recorded, so its file is not read at each look),
#: nor scheduled/ (a schedule's steps are its runs').
_STEPS_SHOWN = ("pending", "running", "failed")


def steps_before_start(steps: Any, *, ended: bool = False) -> dict[str, dict[str, Any]]:
    """Per step of a job file's ``steps``, its entry before its attempt's steps start (the
    worker writes them to status.json only then): ``pending``, with what it ``needs``. A job
    that ``ended`` before they started (a secret missing, the work dir not made) ran none:
    ``skipped``, and why."""
    entries: dict[str, dict[str, Any]] = {}
    for step in steps if isinstance(steps, list) else ():
        if not isinstance(step, dict) or not isinstance(step.get("id"), str):
            continue
        needs = step.get("needs")
        entry: dict[str, Any] = {
            "state": "skipped" if ended else "pending",
            "continue_on_error": step.get("continue_on_error") is True,
            "needs": [str(need) for need in needs] if isinstance(needs, list) else [],
        }
        if ended:
            entry["error"] = "not run: the attempt ended before its steps started"
        entries[step["id"]] = entry
    return entries


def job_text(spool: Spool, config: Config, job: JobDir, status: dict[str, Any]) -> str:
    """``spoold status ID``: the job, its attempts and steps, why it waits, its callbacks
    (``status`` as ``job_view`` shows it)."""
    lines = []
    keys = ("job_id", "state", "executor", "type", "description", "source", "submitter",
            "submitted_at", "started_at", "finished_at", "next_attempt_at", "exit_code", "error",
            "worker", "schedule", "last_fired", "paused_at", "paused_by")  # fmt: skip
    about = _about(spool, job, status)
    for key in keys:
        value = status.get(key)
        value = about.get(key) if value is None else value  # a job from before status kept it
        if value is not None and value != "":
            lines.append(_line(key, value))
    if labels := about.get("labels"):
        lines.append(_line("labels", ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))))
    lines += [_line("next firing", moment) for moment in status.get("next_fire_times") or ()]
    lines += [_line("run", run["run_id"]) for run in (status.get("runs") or [])[-5:]]
    lines += [_line("note", f"{n['at']} {n['what']}") for n in (status.get("notes") or [])[-5:]]
    for attempt in status.get("attempts") or ():
        lines.append(_line(f"attempt {attempt.get('number')}", _attempt_text(attempt)))
        if cost := usage_text(attempt.get("usage")):
            lines.append(_line("  cost", cost))
    lines += _steps_lines(status, about)
    for artifact in status.get("artifacts") or ():
        sha = str(artifact.get("sha256") or "")[:12]
        lines.append(
            _line("artifact", f"{artifact['path']} ({artifact['size']} bytes, sha256 {sha})")
        )
    if status.get("log_lines_lost"):
        lines.append(_line("log", f"{status['log_lines_lost']} line(s) lost (the disk was full)"))
    # Looked at once (the lock, hosts/) for both lines that say it.
    daemon = (
        _daemon(spool, config) if job.directory in ("pending", "running", "scheduled") else None
    )
    if job.directory == "pending":
        reasons = _waiting_reasons(spool, config, status, daemon)
        lines += [_line("waits", reason) for reason in reasons]
    lines += [_line("callback", text) for text in _callback_lines(spool, job.job_id)]
    if job.directory in ("pending", "running", "scheduled"):
        lines.append(_line("daemon", _daemon_words(spool, daemon)))
    return "\n".join(lines)


def _attempt_text(attempt: dict[str, Any]) -> str:
    end = attempt.get("finished_at") or "(running)"
    outcome = outcome_text(attempt.get("exit_code"), attempt.get("error"))
    if attempt.get("retryable") is True:
        outcome += " (retryable)"
    return f"{attempt.get('started_at')} -> {end}" + (f", {outcome}" if outcome else "")


#: How each ``usage.source`` measured, in words (README, "What an attempt cost").
_MEASURED_BY = {
    "kernel": "from the kernel",
    "docker": "from the docker engine",
    "docker-sampled": "from the docker engine; memory sampled",
    "wall": "CPU and memory not known for this executor",
}


def usage_text(usage: Any) -> str:
    """An attempt's or a step's ``usage`` in a line: ``wall 1.02s, CPU 0.98s user + 0.01s
    system, peak memory 212.4 MiB, output 7 bytes (from the kernel)``; "" if there is none."""
    if not isinstance(usage, dict):
        return ""
    parts = []
    if isinstance(wall := usage.get("wall_seconds"), int | float):
        parts.append(f"wall {_seconds_text(wall)}")
    user, system = usage.get("cpu_user_seconds"), usage.get("cpu_system_seconds")
    if isinstance(user, int | float) and isinstance(system, int | float):
        parts.append(f"CPU {_seconds_text(user)} user + {_seconds_text(system)} system")
    if isinstance(peak := usage.get("peak_memory_bytes"), int):
        parts.append(f"peak memory {bytes_text(peak)}")
    if isinstance(output := usage.get("output_bytes"), int):
        parts.append(f"output {bytes_text(output)}")
    source = str(usage.get("source") or "")
    said = "; ".join(_MEASURED_BY.get(each, each) for each in source.split("+") if each)
    return ", ".join(parts) + (f" ({said})" if said else "")


def _seconds_text(seconds: float) -> str:
    return f"{seconds:.2f}s" if seconds < 60 else format_duration(seconds)


def bytes_text(size: int) -> str:
    """``7 bytes``, ``1.5 KiB``, ``212.4 MiB``, ``3.0 GiB``."""
    if size < 1024:
        return f"{size} bytes"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def _about(spool: Spool, job: JobDir, status: dict[str, Any]) -> dict[str, Any]:
    """Labels, description and which steps may fail (``continue_on_error``), as status.json
    keeps them; for a job accepted before it kept them, as its job file says."""
    steps = status.get("steps") or {}
    if isinstance(status.get("labels"), dict) and all(
        "continue_on_error" in (step or {}) for step in steps.values()
    ):
        tolerated = {key for key, step in steps.items() if step.get("continue_on_error")}
        return {"labels": status["labels"], "description": status.get("description"),
                "tolerated": tolerated}  # fmt: skip
    return _about_from_file(spool, job, status)


def labels_of(spool: Spool, job: JobDir, status: dict[str, Any]) -> dict[str, Any] | None:
    """The job's labels (``spoold list --label``) as status.json keeps them; for a job accepted
    before it kept them, as its job file says where this user may read it. None if unknown."""
    labels = status.get("labels")
    if not isinstance(labels, dict):
        try:
            labels = job_document(spool, job, status, keys=("labels",)).get("labels")
        except (OSError, SpooldError, ValueError):
            return None
    return labels if isinstance(labels, dict) else None


def _about_from_file(spool: Spool, job: JobDir, status: dict[str, Any]) -> dict[str, Any]:
    """``_about`` of a job accepted before status.json kept it: read from job.yaml, which only
    spoold may read (0600); empty for everyone else."""
    try:
        document = job_document(spool, job, status, keys=_ABOUT_KEYS)
    except (OSError, SpooldError, ValueError):
        return {}
    tolerated = {
        str(step.get("id"))
        for step in document.get("steps") or ()
        if isinstance(step, dict) and step.get("continue_on_error") is True
    }
    labels = document.get("labels") if isinstance(document.get("labels"), dict) else None
    return {"labels": labels, "description": document.get("description"), "tolerated": tolerated}


def job_document(
    spool: Spool, job: JobDir, status: dict[str, Any], *, keys: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The job file, parsed (the sha256 status.json recorded checked); OSError if unreadable.

    ``keys``: only these top-level keys are wanted, and a file whose text names none of them
    is not parsed ({}): importing YAML and the job-file loader would cost ``spoold status ID``
    20-30 ms. A key spelled with escapes (``"\\u006cabels"``) is not seen.
    """
    data = spool.jobs.read_job_file(job, sha256=status.get("sha256"))
    if keys and not any(key.encode() in data for key in keys):
        return {}
    from spoold.core.documents import load_document  # noqa: PLC0415 - YAML only where needed

    document = load_document(data, "job.yaml")
    return document if isinstance(document, dict) else {}


def _steps_lines(status: dict[str, Any], about: dict[str, Any]) -> list[str]:
    """One line per step: its state, exit code or error, attempts, what it needs (where its
    entry says); a failed step the job went on past (``continue_on_error``) says so."""
    steps = status.get("steps") or {}
    tolerated = about.get("tolerated")
    lines = []
    for step_id, step in steps.items():
        state = str((step or {}).get("state"))
        parts = [state]
        if outcome := outcome_text(step.get("exit_code"), step.get("error")):
            parts.append(outcome)
        if int(step.get("attempts") or 0) > 1:
            parts.append(f"{step['attempts']} attempts")
        if needs := step.get("needs"):
            parts.append(f"needs {', '.join(map(str, needs))}")
        text = ", ".join(parts)
        if state == "failed":
            went_on = (
                step_id in tolerated
                if tolerated is not None
                else status.get("state") == "succeeded"
            )
            if went_on:
                text += " (continue_on_error: the job went on)"
        lines.append(_line(f"step {step_id}", text))
        if cost := usage_text(step.get("usage")):
            lines.append(_line("  cost", cost))
    return lines


def waiting_reasons(spool: Spool, config: Config, status: dict[str, Any]) -> list[str]:
    """Why a pending job has not started: its due time, a busy concurrency key or executor, every
    worker busy, no daemon. "next in line" when nothing holds it back."""
    try:
        daemon = _daemon(spool, config)
    except OSError:  # tmp/ is not this user's to look into
        daemon = None
    return _waiting_reasons(spool, config, status, daemon)


def _waiting_reasons(
    spool: Spool, config: Config, status: dict[str, Any], daemon: dict[str, Any] | None
) -> list[str]:
    """``waiting_reasons``, with the daemons as ``_daemon`` found them (None: not known)."""
    from spoold.core.clock import SystemClock  # noqa: PLC0415
    from spoold.core.units import format_duration  # noqa: PLC0415

    now = SystemClock().now()
    reasons = []
    due = status.get("next_attempt_at")
    if isinstance(due, str) and (when := _moment(due)) is not None and when > now:
        wait = format_duration((when - now).total_seconds())
        reasons.append(f"for its next attempt, due at {due} (in {wait})")
    running = _running_statuses(spool)
    concurrency = status.get("concurrency") if isinstance(status.get("concurrency"), dict) else {}
    if key := (concurrency or {}).get("key"):
        limit = int((concurrency or {}).get("limit") or 1)
        busy = sum(1 for s in running if (s.get("concurrency") or {}).get("key") == key)
        if busy >= limit:
            reasons.append(f"for concurrency key {key!r}: {busy} running, limit {limit}")
    executor = status.get("executor")
    # A job with steps takes no slot of an executor: each of its steps takes its own's.
    if not status.get("steps") and (cap := config.executor_limits.get(str(executor))) is not None:
        busy = sum(_slots_held(s, str(executor)) for s in running)
        if busy >= cap:
            reasons.append(f"for a {executor} slot: {busy} running, limits.executors: {cap}")
    if len(running) >= config.workers:
        reasons.append(f"for a worker: {len(running)} running, workers: {config.workers}")
    if daemon is None:
        return reasons or ["for its turn, as far as this user can see"]
    if daemon["pid"] is None and not daemon["other_hosts"]:
        # Named by host id, as hosts/, the lock and ``spoold hosts`` name hosts: on a shared
        # spool another host's daemon serves it as well as this host's would.
        reasons.append(f"for a daemon: none runs on {config.host_id} for this spool, "
                       "nor on another host (spoold hosts)")  # fmt: skip
    return reasons or ["for its turn: nothing else holds it back"]


def _slots_held(status: dict[str, Any], executor: str) -> int:
    """How many slots of ``executor`` a running job holds: one, or its steps' that run."""
    steps = status.get("steps")
    if not steps or not isinstance(steps, dict):
        return int(status.get("executor") == executor)
    return sum(
        1
        for step in steps.values()
        if isinstance(step, dict)
        and step.get("state") == "running"
        and step.get("executor") == executor
    )


def _moment(text: str) -> datetime | None:
    try:
        return parse_rfc3339(text)
    except ValueError:
        return None


def _running_statuses(spool: Spool) -> list[dict[str, Any]]:
    found = []
    for job in spool.jobs.list_jobs("running"):
        with contextlib.suppress(OSError, SpooldError, ValueError):
            found.append(spool.jobs.read_status(job))
    return found


def job_deliveries(spool: Spool, job_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    """The job's callbacks still in outbox/ (``""``) or given up (``"failed"``): (name, where,
    record); PermissionError where this user may not look."""
    return [
        (name, where, spool.deliveries.read(name, where) or {})
        for where in ("", "failed")
        for name in spool.deliveries.names(where)
        if name.startswith(f"{job_id}~")
    ]


def _callback_lines(spool: Spool, job_id: str) -> list[str]:
    """The job's callbacks still in outbox/ (or given up in outbox/failed/): last error, next try."""
    try:
        waiting = job_deliveries(spool, job_id)
    except PermissionError:
        return [f"not visible to this user (outbox/ is {owner(str(spool.dir('outbox')))})"]
    lines = []
    for _, where, record in waiting:
        event, tries = record.get("event", "?"), int(record.get("tries") or 0)
        if where:
            text = f"{event}: given up after {tries} tries; last error: {record.get('last_error')}"
        elif not tries:
            text = f"{event}: waiting in outbox/, not tried yet"
        else:
            next_try = record.get("next_try")
            when = rfc3339(datetime.fromtimestamp(float(next_try), UTC)) if next_try else "soon"
            text = (
                f"{event}: {tries} tries failed, last: {record.get('last_error')}; next try {when}"
            )
        lines.append(text)
    return lines


def daemon_text(spool: Spool, config: Config) -> str:
    """Whether a daemon serves this spool: on this host (its pid and since when), else on
    another host of a shared spool (hosts/, as ``spoold hosts`` sees them)."""
    return _daemon_words(spool, _daemon(spool, config))


def _daemon(spool: Spool, config: Config) -> dict[str, Any] | None:
    """The daemon on this host as ``status --json`` shows it (pid None: none), and
    ``other_hosts``: the other hosts alive in hosts/ (``hosts_rows``), which serve the spool
    too; None if this user may not look into tmp/."""
    host = config.host_id
    try:
        holder = spool.host_lock.daemon_on(host)
    except PermissionError:
        return None
    since = started_at(holder[1]) if holder else None
    others = [row for row in hosts_rows(spool, config)
              if row["state"] == "alive" and not row["this_host"]]  # fmt: skip
    return {"host": host, "pid": holder[0] if holder else None,
            "since": rfc3339(since) if since else None,
            "other_hosts": [row["host"] for row in others],
            "other_hosts_seen_by": {row["host"]: row["seen_by"] for row in others}}  # fmt: skip


def hosts_rows(spool: Spool, config: Config) -> list[dict[str, Any]]:
    """The hosts serving this spool (hosts/): each with its state as a daemon sees it
    (``alive``, ``stale``, ``gone``; ``unknown`` where no daemon's view says), its beat, what
    it runs (``running_as_of``: the beat that list is from when the host is not alive), and
    ``seen_by``: whose view that is.

    A command has no clock that watched the beats, so it shows a daemon's view: this host's
    daemon's if it runs (its lock proves it live), else the view of the host whose record is
    the newest, ``_by_recency``: every other record's beat is one it has seen. That host is
    shown as its own record says (``alive``, seen by itself: it wrote it). A view is taken
    from another host only if no view taken before calls that host stale or gone: a host
    killed long ago still says, in its last record, that the others were alive then."""
    records = spool.hosts.all()
    me = config.host_id
    mine = records.get(me)
    here = _lock_says(spool, me) if mine is not None and not mine.get("stopped") else None
    ordered = [h for h in _by_recency(records) if h != me or here is None]
    if here:
        ordered.insert(0, me)
    observers: list[str] = []
    for candidate in ordered:
        said = [(records[o].get("view") or {}).get(candidate) or {} for o in observers]
        if not any(seen.get("state") in ("stale", "gone") for seen in said):
            observers.append(candidate)
    rows = []
    for host, record in records.items():
        seen_by, state, still = None, "unknown", None
        if record.get("stopped"):
            state = "gone"
        elif host == me and here is False:
            # Its record says it runs, its lock that no daemon holds it: killed (kill -9,
            # a crash), whatever a view written before says. This host's own evidence.
            seen_by, state = me, "stale"
        elif observers and host == observers[0]:
            seen_by, state, still = host, "alive", 0.0  # its own record: the newest, or locked
        else:
            for observer in observers:
                if (seen := (records[observer].get("view") or {}).get(host)) is not None:
                    seen_by, state, still = observer, seen.get("state"), seen.get("unchanged_for")
                    break
        rows.append({
            "host": host, "hostname": record.get("hostname"), "state": state,
            "beat": record.get("beat"), "unchanged_for": still, "seen_by": seen_by,
            "running": list(record.get("running") or []),
            "running_as_of": None if state == "alive" else record.get("beat"),
            "pid": record.get("pid"), "started_at": record.get("started_at"),
            "this_host": host == me,
        })  # fmt: skip
    return rows


def _by_recency(records: dict[str, dict[str, Any]]) -> list[str]:
    """The hosts whose daemon has not said it stopped, the newest record first, told without
    a clock: a record is as old as the beats it has not seen. For each other host, the beats
    that host wrote since this record's view saw it (all of them, if the view never saw it or
    saw an earlier run of it), times that host's ``heartbeat_interval``: roughly how many
    seconds this record is older than that one. A live daemon's record misses at most a beat
    of each; one killed minutes ago misses minutes of the others'."""
    live = {h: r for h, r in records.items() if not r.get("stopped")}

    def lag(host: str) -> float:
        view = live[host].get("view") or {}
        behind = 0.0
        for other, record in live.items():
            if other == host or not isinstance(beat := record.get("beat"), int):
                continue
            seen = (view.get(other) or {}).get("beat")
            missed = beat - seen if isinstance(seen, int) and seen <= beat else beat + 1
            behind += missed * float(record.get("heartbeat_interval") or 1.0)
        return behind

    return sorted(live, key=lambda host: (lag(host), host))


def _lock_says(spool: Spool, host: str) -> bool | None:
    """Whether a daemon holds ``host``'s lock (tmp/daemon-<host>.lock: only a command on that
    host can tell); None if this user may not look."""
    try:
        return spool.host_lock.daemon_on(host) is not None
    except PermissionError:
        return None


def _daemon_words(spool: Spool, daemon: dict[str, Any] | None) -> str:
    if daemon is None:
        return f"not visible to this user (its lock is in tmp/, {owner(str(spool.dir('tmp')))})"
    if daemon["pid"] is None:
        if daemon.get("other_hosts"):
            return f"none on {daemon['host']}; served by {_hosts_words(daemon)}"
        return f"none: no spoold runs on {daemon['host']} for this spool, nor on another host"
    since = f", running since {daemon['since']}" if daemon["since"] else ""
    return f"pid {daemon['pid']} on {daemon['host']}{since}"


def _hosts_words(daemon: dict[str, Any]) -> str:
    """``host h2 (alive, by its own record)``, ``hosts h2, h3 (alive, seen by h2)``."""
    seen_by = daemon.get("other_hosts_seen_by") or {}
    said = []
    for host in daemon["other_hosts"]:
        by = seen_by.get(host)
        said.append(f"{host} (alive, " + ("by its own record)" if by in (host, None)
                                          else f"seen by {by})"))  # fmt: skip
    return ("host " if len(said) == 1 else "hosts ") + ", ".join(said)


# -- the spool ------------------------------------------------------------------------------------


def _count(spool: Spool, name: str) -> int | None:
    try:
        return spool.count(name)
    except PermissionError:
        return None


def summary(spool: Spool, config: Config) -> dict[str, Any]:
    """``spoold status --json``: counts (null where this user may not look), outbox/'s callbacks
    and notifications apart, the callbacks given up, and the daemon on this host."""
    counts: dict[str, int | None] = {name: _count(spool, name) for name in COUNTED}
    outbox: dict[str, int] | None
    try:
        outbox = count_outbox(spool.deliveries)._asdict()
        given_up: list[dict[str, Any]] | None = [
            {"name": name, **_delivery_summary(spool.deliveries.read(name, "failed") or {})}
            for name in spool.deliveries.names("failed")
            if not is_notification(name)
        ]
    except PermissionError:
        outbox, given_up = None, None
    # counts' outbox is the callbacks alone, as spoold_callbacks_waiting counts them.
    counts["outbox"] = None if outbox is None else outbox["callbacks_waiting"]
    return {"spool": str(spool.root), "counts": counts, "outbox": outbox,
            "callbacks_given_up": given_up, "daemon": _daemon(spool, config)}  # fmt: skip


def delivery_shown(record: dict[str, Any]) -> dict[str, Any]:
    """A delivery as spoold shows it to its readers (the page, ``status``, the API, which a
    read token sees): its URL as the log names it (scheme, host and port: a user, a password,
    a webhook's key in the path or query are the receiver's secrets), and its last error
    with that URL's secrets taken out (``error_shown``: a record written before the sender
    masked them)."""
    from spoold.out.messages import error_shown, url_shown  # noqa: PLC0415 - only for these

    url = record.get("url")
    shown = {**record, "url": None if url is None else url_shown(str(url))}
    if record.get("last_error"):
        shown["last_error"] = error_shown(
            str(record["last_error"]), None if url is None else str(url)
        )
    return shown


def _delivery_summary(record: dict[str, Any]) -> dict[str, Any]:
    shown = delivery_shown(record)
    return {key: shown.get(key) for key in ("event", "url", "tries", "last_error", "created")}


def summary_text(spool: Spool, config: Config) -> str:
    """``spoold status``: how many entries each directory holds, and who serves the spool."""
    found = summary(spool, config)
    lines = [f"spool {spool.root}"]
    outbox = found["outbox"]
    for name, count in found["counts"].items():
        shown = "?" if count is None else str(count)
        if name == "outbox" and outbox is not None:
            shown = (
                f"{_several(outbox['callbacks_waiting'], 'callback')} waiting, "
                f"{_several(outbox['notifications_waiting'], 'notification')} waiting"
            )
        lines.append(f"  {name + '/':<11} {shown}")
    hidden = [name for name, count in found["counts"].items() if count is None]
    if hidden:
        lines.append(f"  ?: {who()} may not look into {', '.join(n + '/' for n in hidden)}")
    lines.append(f"  daemon:     {_daemon_words(spool, found['daemon'])}")
    given_up = found["callbacks_given_up"] or []
    if given_up:
        lines.append(f"  {len(given_up)} callback(s) given up, kept in outbox/failed/:")
        lines += [
            printable(
                f"    {item['name']}: {item['event']} to {item['url']} after "
                f"{item['tries']} "
                f"tries; last: {item['last_error']}"
            )
            for item in given_up
        ]
    if outbox is not None and outbox["notifications_given_up"]:
        lines.append(
            f"  {_several(outbox['notifications_given_up'], 'notification')} given up, "
            "kept in outbox/failed/"
        )
    return "\n".join(lines)


def _several(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")
