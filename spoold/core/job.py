"""The job as data: the parsed spec, its status document and its attempts. No I/O."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from spoold.core.clock import parse_rfc3339, rfc3339
from spoold.core.errors import SecretError
from spoold.core.limits import Limits
from spoold.core.retry import RetryPolicy
from spoold.core.secrets import NAME_RULE, SECRET_NAME, Masker
from spoold.core.states import JobState
from spoold.core.units import parse_duration
from spoold.core.usage import Usage

if TYPE_CHECKING:
    from spoold.core.policy import Submitter

_VARIABLE = r"[A-Za-z_][A-Za-z0-9_]*"
#: ``${NAME}`` and ``${secret:NAME}``; ``broken``: any other ``${secret:...}``, which names no
#: secret (``${secret:../x}``, ``${secret:}``, ``${secret:a${b}}``, one never closed).
_REFERENCE = re.compile(
    rf"\$\{{(?:secret:(?:(?P<secret>{SECRET_NAME.pattern})\}}|(?P<broken>[^}}]*)\}}?)"
    rf"|(?P<name>{_VARIABLE})\}})"
)
#: What validation looks at: every ``${secret:...}``, and a reference nested in one
#: (``${${X}}``, ``${A${B}}``). A shell's own ``${X:-${Y}}`` is neither.
_SUSPECT = re.compile(
    rf"\$\{{(?:secret:(?P<body>[^}}]*)(?P<end>\}}?)|(?P<nested>(?:{_VARIABLE})?\$\{{))"
)
_NOT_IN_NAMES = re.compile(r"[^A-Za-z0-9_]")
_SHOWN = 60


@dataclass(frozen=True)
class ArtifactSpec:
    """One declared artifact: a glob relative to the work dir."""

    path: str
    type: str = "file"


@dataclass(frozen=True)
class JobSpec:
    """A validated job file, reduced to what spoold acts on."""

    job_id: str
    executor: str
    type: str | None
    product: dict[str, Any]
    variables: dict[str, str]
    artifacts: tuple[ArtifactSpec, ...]
    timeout: float | None
    on_interrupt: str
    retry: RetryPolicy
    limits: Limits | None
    run_as: str | None
    hooks: dict[str, str | list[str]]
    steps: tuple[dict[str, Any], ...]
    document: dict[str, Any]

    @classmethod
    def from_document(cls, document: dict[str, Any], job_id: str) -> JobSpec:
        """Build from a document that already passed schema validation."""
        timeout = document.get("timeout")
        return cls(
            job_id=job_id,
            executor=str(document.get("executor", "")),
            type=document.get("type"),
            product=dict(document.get("product") or {}),
            variables={k: _scalar_text(v) for k, v in (document.get("variables") or {}).items()},
            artifacts=tuple(
                ArtifactSpec(path=a["path"], type=a.get("type", "file"))
                for a in document.get("artifacts") or ()
            ),
            timeout=None if timeout is None else parse_duration(timeout),
            on_interrupt=str(document.get("on_interrupt", "fail")),
            retry=RetryPolicy.from_document(document),
            limits=Limits.from_document(document.get("limits")),
            run_as=document.get("run_as"),
            hooks=dict(document.get("hooks") or {}),
            steps=tuple(document.get("steps") or ()),
            document=document,
        )


def labels_and_description(document: Mapping[str, Any]) -> dict[str, Any]:
    """``labels`` and ``description`` for status.json, which submitters read: masked as a
    worker masks status.json (secret-named fields' values), since job.yaml is spoold's alone."""
    labels, description = dict(document.get("labels") or {}), document.get("description")
    if labels or description:
        masker = Masker()
        masker.collect(document)
        labels, description = masker.mask_data(labels), masker.mask_data(description)
    return {"labels": labels, "description": description}


def _stamps_apart(start: str, end: str) -> float | None:
    """Seconds from ``start`` to ``end`` (RFC 3339); None if either does not parse or the
    end comes first, which only a wall clock stepped back between them does."""
    try:
        seconds = (parse_rfc3339(end) - parse_rfc3339(start)).total_seconds()
    except (ValueError, TypeError):  # not written by spoold (no time zone: TypeError)
        return None
    return seconds if seconds >= 0 else None


def _scalar_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def secret_variable(name: str) -> str:
    """The environment variable a job's program reads secret ``name`` from."""
    return "SPOOLD_SECRET_" + _NOT_IN_NAMES.sub("_", name).upper()


def interpolate(value: Any, variables: Mapping[str, str], secret: Callable[[str], str]) -> Any:
    """Replace ``${NAME}`` by variables and ``${secret:NAME}`` by ``secret(NAME)``, in every
    string of a parsed structure, in one pass.

    The document is parsed before this runs, so a value can never add YAML structure; and a
    replacement is not looked at again, so a variable's value that itself says ``${...}``
    stays as it is. Unknown names stay as written. For fields that are not programs.
    """

    def replace(match: re.Match[str]) -> str:
        if (name := match.group("secret")) is not None:
            return secret(name)
        if match.group("name") is None:
            raise _unresolvable(match)
        return variables.get(match.group("name"), match.group(0))

    return _each_string(value, lambda text: _REFERENCE.sub(replace, text))


def refer_to_secrets(value: Any, used: set[str]) -> Any:
    """For fields that are programs (a shell script): change nothing but ``${secret:NAME}``,
    which becomes ``${SPOOLD_SECRET_NAME}``; record each NAME in ``used``.

    A value pasted into a script would be parsed as part of it: ``; rm -rf /`` in a variable
    would run. Left as references, variables and secrets reach the program through its
    environment, and a shell expands them as data, never as syntax.
    """

    def replace(match: re.Match[str]) -> str:
        if match.group("broken") is not None:
            raise _unresolvable(match)
        if (name := match.group("secret")) is None:
            return match.group(0)
        used.add(name)
        return "${" + secret_variable(name) + "}"

    return _each_string(value, lambda text: _REFERENCE.sub(replace, text))


def reference_problems(text: str) -> list[str]:
    """What in ``text`` reads as a reference spoold would not resolve, in words; [] if none.

    Validation refuses these, so that none reaches ``interpolate``, which would refuse them
    only at run time: a ``${secret:...}`` whose name breaks the rule for secret names, one
    never closed, and a reference nested in another.
    """
    problems = []
    for match in _SUSPECT.finditer(text):
        shown = _shown(text, match.start())
        body = match.group("body")
        if match.group("nested") is not None or (body is not None and "${" in body):
            problems.append(
                f"{shown} puts a reference inside a reference, which spoold does not resolve: "
                "name the secret or the variable itself"
            )
        elif not match.group("end"):
            problems.append(f"{shown} has no closing '}}'")
        elif SECRET_NAME.fullmatch(body or "") is None:
            problems.append(f"{shown} names no secret spoold can read: {NAME_RULE}")
    return problems


def _unresolvable(match: re.Match[str]) -> SecretError:
    shown = _shown(match.string, match.start())
    return SecretError(f"{shown} names no secret spoold can read: {NAME_RULE}")


def _shown(text: str, start: int) -> str:
    """The reference that starts at ``start``, to its matching brace, quoted and cut short."""
    depth, end = 0, len(text)
    for index in range(start + 1, min(len(text), start + 4 * _SHOWN)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                end = index + 1
                break
    piece = text[start:end]
    return repr(piece if len(piece) <= _SHOWN else piece[: _SHOWN - 3] + "...")


def _each_string(value: Any, change: Callable[[str], str]) -> Any:
    """A copy of a parsed structure with ``change`` applied to every string in it."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, list):
        return [_each_string(item, change) for item in value]
    if isinstance(value, dict):
        return {key: _each_string(item, change) for key, item in value.items()}
    return value


@dataclass
class Attempt:
    """One run of a job."""

    number: int
    started_at: str
    finished_at: str | None = None
    exit_code: int | None = None
    error: str | None = None
    #: The executor said its failure is transient: a retry can help (``retry:`` still decides).
    retryable: bool = False
    #: What it cost, once it ended (None while it runs, and for an attempt from before usage).
    usage: Usage | None = None

    def seconds(self) -> float | None:
        """How long it took, once ended: its usage's wall time (measured on a monotonic
        clock), else its stamps' difference where that is not negative (a wall clock stepped
        back between them); None if neither is known."""
        if self.usage is not None and self.usage.wall_seconds is not None:
            return self.usage.wall_seconds
        if self.finished_at is None:
            return None
        return _stamps_apart(self.started_at, self.finished_at)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "number": self.number,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "exit_code": self.exit_code,
            "error": self.error,
        }
        if self.retryable:  # only then: status.json from before the flag reads the same
            data["retryable"] = True
        if self.usage is not None:
            data["usage"] = self.usage.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Attempt:
        return cls(
            number=int(data["number"]),
            started_at=str(data["started_at"]),
            finished_at=data.get("finished_at"),
            exit_code=data.get("exit_code"),
            error=data.get("error"),
            retryable=data.get("retryable") is True,
            usage=Usage.from_dict(data.get("usage")),
        )


@dataclass
class JobStatus:
    """The content of status.json (SPEC section 6)."""

    job_id: str
    state: JobState
    executor: str
    type: str | None
    submitted_at: str
    source: str | None
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    error: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    steps: dict[str, Any] = field(default_factory=dict)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    worker: str | None = None
    schedule: str | None = None
    result: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None
    log_lines_lost: int = 0
    #: When a job waiting in pending/ for its next attempt becomes due (RFC 3339).
    next_attempt_at: str | None = None
    #: Kept from the job file, so that a restarted daemon orders and limits it without reading it.
    priority: int = 0
    concurrency: dict[str, Any] | None = None
    #: The sequence number of the job's latest callback delivery: its record of having been sent.
    callback_sequence: int = 0
    #: The ``delivery_id`` of that delivery: of two writers that prepared one sequence (a
    #: firing made by one host, tried by another), it tells whose change was made.
    callback_delivery: str | None = None
    #: The claim generation of its latest attempt (raised by each takeover; SPEC section 11).
    generation: int = 0
    #: Kept from the job file for ``spoold status`` and ``list --label``: job.yaml is spoold's
    #: alone to read. None: not kept (a job accepted before status.json kept them).
    labels: dict[str, str] | None = None
    description: str | None = None
    #: Who submitted it (a user name, or ``uid:N``), and the uid: a schedule's runs inherit the
    #: schedule's. None: not known (a job accepted before spoold recorded it).
    submitter: str | None = None
    submitter_uid: int | None = None

    @classmethod
    def accepted(
        cls,
        spec: JobSpec,
        *,
        source: str | None,
        now: datetime,
        sha256: str | None,
        submitter: Submitter | None = None,
    ) -> JobStatus:
        """The status of a job that was just accepted into pending/."""
        return cls(
            job_id=spec.job_id,
            state=JobState.PENDING,
            executor=spec.executor,
            type=spec.type,
            submitted_at=rfc3339(now),
            source=source,
            sha256=sha256,
            priority=int(spec.document.get("priority") or 0),
            concurrency=spec.document.get("concurrency"),
            **labels_and_description(spec.document),
            **({} if submitter is None else submitter.status_fields()),
        )

    @property
    def identity(self) -> str:
        """Names this job among the jobs of every spool, the same on every host that shares
        its spool: its id (which another spool may give one of its own) and when it was
        accepted, digested. What an executor starts elsewhere may carry it
        (``RunContext.job_key``)."""
        return hashlib.sha256(f"{self.job_id}\0{self.submitted_at}".encode()).hexdigest()[:16]

    def begin_attempt(self, now: datetime, worker: str) -> Attempt:
        """Mark the job running with a new attempt."""
        attempt = Attempt(number=len(self.attempts) + 1, started_at=rfc3339(now))
        self.attempts.append(attempt)
        self.state = JobState.RUNNING
        self.started_at = attempt.started_at
        self.finished_at = None
        self.exit_code = None
        self.error = None
        self.worker = worker
        self.next_attempt_at = None
        return attempt

    def end_attempt(
        self,
        now: datetime,
        state: JobState,
        exit_code: int | None,
        error: str | None,
        *,
        retryable: bool = False,
        usage: Usage | None = None,
        took: float | None = None,
    ) -> None:
        """Close the current attempt and set the job's outcome (``retryable``: the attempt's;
        ``usage``: what its work cost, whose wall time becomes the attempt's own, start to end).

        ``took``: how long the attempt took, measured on a monotonic clock by the process that
        saw it start and end. A wall clock stepped meanwhile (NTP) moves the stamps, not the
        duration. None (an attempt adopted from an earlier worker, whose start another process
        saw): the stamps' difference, unless negative, else the wall time of ``usage`` (the
        supervisor's own measure of its unit), else none.
        """
        stamp = rfc3339(now)
        if self.attempts and self.attempts[-1].finished_at is None:
            current = self.attempts[-1]
            current.finished_at = stamp
            current.exit_code = exit_code
            current.error = error
            current.retryable = retryable
            if usage is not None:
                if took is None:
                    took = _stamps_apart(current.started_at, stamp)
                wall = usage.wall_seconds if took is None else max(took, 0.0)
                current.usage = usage._replace(wall_seconds=wall)
        self.state = state
        # A job going back to pending (a requeue) has not finished.
        self.finished_at = None if state is JobState.PENDING else stamp
        self.exit_code = exit_code
        self.error = error

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "state": self.state.value,
            "executor": self.executor,
            "type": self.type,
            "submitted_at": self.submitted_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "exit_code": self.exit_code,
            "error": self.error,
            "attempts": [a.to_dict() for a in self.attempts],
            "steps": self.steps,
            "artifacts": self.artifacts,
            "worker": self.worker,
            "source": self.source,
            "submitter": self.submitter,
            "submitter_uid": self.submitter_uid,
            "sha256": self.sha256,
            "schedule": self.schedule,
            "result": self.result,
            "log_lines_lost": self.log_lines_lost,
            "next_attempt_at": self.next_attempt_at,
            "priority": self.priority,
            "concurrency": self.concurrency,
            "callback_sequence": self.callback_sequence,
            "callback_delivery": self.callback_delivery,
            "generation": self.generation,
            "labels": self.labels,
            "description": self.description,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobStatus:
        return cls(
            job_id=str(data["job_id"]),
            state=JobState(data["state"]),
            executor=str(data.get("executor", "")),
            type=data.get("type"),
            submitted_at=str(data.get("submitted_at", "")),
            source=data.get("source"),
            submitter=data.get("submitter"),
            submitter_uid=data.get("submitter_uid"),
            started_at=data.get("started_at"),
            finished_at=data.get("finished_at"),
            exit_code=data.get("exit_code"),
            error=data.get("error"),
            attempts=[Attempt.from_dict(a) for a in data.get("attempts") or ()],
            steps=dict(data.get("steps") or {}),
            artifacts=list(data.get("artifacts") or ()),
            worker=data.get("worker"),
            schedule=data.get("schedule"),
            result=dict(data.get("result") or {}),
            sha256=data.get("sha256"),
            log_lines_lost=int(data.get("log_lines_lost") or 0),
            next_attempt_at=data.get("next_attempt_at"),
            priority=int(data.get("priority") or 0),
            concurrency=data.get("concurrency"),
            callback_sequence=int(data.get("callback_sequence") or 0),
            callback_delivery=data.get("callback_delivery"),
            generation=int(data.get("generation") or 0),
            labels=dict(labels) if isinstance(labels := data.get("labels"), dict) else None,
            description=data.get("description"),
        )
