"""Admission: whether a job file becomes a job, decided in one place for every way in.

Intake (a file in incoming/), ``spoold validate``, ``spoold submit`` and ``spoold exec`` ask the
same ``Admission``, so a file that validate passes is one intake takes, and a refusal reads the
same wherever it is met: a ``code`` (as in rejected/'s reason.json) and issues with the path,
line and column of what is wrong.

The order is intake's: the schema and the executors' checks (``invalid``), what no schema says
about the values (``invalid``: NUL characters, references spoold would not resolve, numbers
that are not finite, durations and sizes past their bounds, variables and scripts longer than
Linux starts a process with), the config's ``allowed_run_as``
and the submitter's ``policy:`` (``not_allowed``), the callback (``callback``), and, where a
spool is given, the job id (``duplicate``). A valid file costs one walk over its values;
positions are worked out only for a refusal, by composing the text again.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from spoold.core.documents import (
    DocPath,
    NodeMap,
    decode_text,
    load_document,
    map_nodes,
    show_value,
    size_problem,
    units_of,
)
from spoold.core.errors import (
    CallbackError,
    InvalidJobFile,
    JobBusy,
    NotifyError,
    SpooldError,
    ValidationIssue,
    escape_unprintable,
)
from spoold.core.ids import generate_job_id
from spoold.core.job import JobSpec, reference_problems
from spoold.core.policy import Policy, Submitter
from spoold.core.secrets import SecretAccessDenied
from spoold.core.spool import Spool
from spoold.core.units import MAX_DURATION, parse_duration, parse_size
from spoold.intake.exec_limits import exec_problems
from spoold.intake.policy_check import policy_problems
from spoold.intake.redaction import Redaction, quoted
from spoold.intake.validation import JobValidator, locate
from spoold.out.outbox import CallbackTarget, callbacks_for

if TYPE_CHECKING:
    from spoold.core.clock import Clock
    from spoold.core.config import Config

#: The names a job file may have.
JOB_SUFFIXES = (".yaml", ".yml", ".json")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: The executors whose processes run on this host, and so can run as another user.
RUN_AS_EXECUTORS = frozenset({"local", "custom"})
#: The largest `limits.memory` (address space), in bytes: 1 PiB (the schema's maximum).
MAX_MEMORY = 2**50
#: How many values of a file are located at most (JobValidator's own bound on a document).
_MAX_NODES = 100_000

#: A job's callback target as the daemon resolves it; CallbackError when it cannot be signed.
CallbackResolver = Callable[[Mapping[str, Any] | None], CallbackTarget | None]

_Problem = tuple[str, DocPath, bool]  # message, path, whether to point at the key
_NUL = "contains a NUL character, which no program argument, environment variable or path can carry"
# Where a job (or a step) gives a duration, below the job or the step.
_DURATIONS: tuple[DocPath, ...] = (("timeout",), ("backoff",), ("backoff", "initial"),
                                   ("backoff", "max"))  # fmt: skip
_SCHEDULE_DURATIONS: tuple[DocPath, ...] = (("schedule", "every"), ("schedule", "jitter"))


@dataclass(frozen=True)
class Admitted:
    """A file admitted as a job: the validated document and what spoold acts on."""

    document: dict[str, Any]
    job_id: str
    spec: JobSpec
    callback: CallbackTarget | None
    #: What could not be checked here and is left to intake (a secret this user may not read).
    notes: tuple[ValidationIssue, ...] = ()


class Refused(SpooldError):
    """A file that is not admitted: ``code`` names the rule, ``issues`` say where and why.

    ``reason`` is the one line that rejected/'s reason.json carries; ``document`` is the parsed
    file where it got that far (its callback then hears of the rejection). ``values``: the
    parsed file where it is no ``document`` (it is invalid). Every refusal is worded here, so
    none quotes what the file's receivers' URLs and secret-named fields hold (``Redaction``),
    and none carries a character a terminal would act on (``escape_unprintable``: once, as
    the issues' words are).
    """

    def __init__(
        self,
        code: str,
        reason: str,
        issues: list[ValidationIssue],
        document: dict[str, Any] | None = None,
        *,
        values: Any = None,
    ) -> None:
        hide = Redaction(document if values is None else values)
        self.code = code
        self.reason = escape_unprintable(hide.text(reason))
        self.issues = [issue._replace(message=escape_unprintable(issue.message))
                       for issue in hide.issues(issues)]  # fmt: skip
        self.document = document
        super().__init__(self.reason)


class Admission:
    """Decides whether a job file is admitted, with the validator and this host's config.

    ``callback_target`` resolves a job's callback (``Callbacks.target``); None where callbacks
    are not set up. ``strict_secrets=False`` (the command line, run by submitters) leaves a
    callback secret this process may not open to intake, with a note, instead of refusing.
    ``policy``: what each submitter may use (the config's ``policy:``); None: no limits.
    """

    def __init__(
        self,
        validator: JobValidator,
        *,
        max_file_size: int,
        allowed_run_as: tuple[str, ...] = (),
        callback_target: CallbackResolver | None = None,
        strict_secrets: bool = True,
        policy: Policy | None = None,
    ) -> None:
        self._validator = validator
        self._policy = policy
        self._max_file_size = max_file_size
        self._allowed_run_as = allowed_run_as
        self._callback_target = callback_target
        self._strict_secrets = strict_secrets

    @classmethod
    def for_config(
        cls, config: Config, validator: JobValidator, clock: Clock, *, strict_secrets: bool
    ) -> Admission:
        """As the daemon with this config admits files; reads secrets, touches no spool."""
        # Callbacks.target reads only the config's defaults and secrets_dir: the spool is unused.
        callbacks = callbacks_for(
            config, Spool(config.spool, durable=False), clock, logging.getLogger("spoold")
        )
        return cls(
            validator,
            max_file_size=config.max_file_size,
            allowed_run_as=config.allowed_run_as,
            callback_target=callbacks.target,
            strict_secrets=strict_secrets,
            policy=config.policy,
        )

    def admit(
        self,
        data: bytes,
        filename: str,
        *,
        now: datetime,
        spool: Spool | None = None,
        submitter: Submitter | None = None,
        job_id: str | None = None,
    ) -> Admitted:
        """The admitted job, or Refused. ``spool``: also refuse a job id it holds already.

        ``submitter``: whose policy applies (the owner of a dropped file); None: this process's
        user (``spoold validate`` and ``submit`` check as their caller). ``job_id``: the id of a
        file that names none (else one is made).
        """
        if (problem := file_problem(filename, len(data), self._max_file_size)) is not None:
            code, reason = problem
            raise Refused(code, reason, [ValidationIssue(reason, "")])
        try:
            document = self._validator.parse(data, filename, now=now)
        except InvalidJobFile as exc:
            values = _loaded(data, filename)
            issues = _also_in_values(data, values, exc.issues)
            raise Refused("invalid", summary(issues), issues, values=values) from None
        if problems := value_problems(document):
            issues = _located(_nodes(data), problems)
            raise Refused("invalid", summary(issues), issues, values=document)
        job_id = str(document.get("job_id") or job_id or generate_job_id(now))
        try:
            spec = JobSpec.from_document(document, job_id)
        except ValueError as exc:  # the checks above should leave nothing for this
            issue = ValidationIssue(str(exc), "")
            raise Refused("invalid", str(exc), [issue], values=document) from None
        if (refused := self._policy_problem(spec)) is not None:
            message, field = refused
            issue = self._issue(data, message, (field,))
            raise Refused("not_allowed", f"{field}: {message}", [issue], document)
        if self._policy is not None:
            who = submitter or Submitter.caller()
            rules = self._policy.rules_of(who)
            if rules is not None and (problems := policy_problems(document, who, rules)):
                issues = _located(_nodes(data), problems)
                raise Refused("not_allowed", summary(issues), issues, document)
        target, notes = self._callback(data, document)
        if spool is not None and "job_id" in document:
            notes += self._check_job_id(data, document, job_id, spool)
        return Admitted(document, job_id, spec, target, notes)

    def duplicate(self, data: bytes, document: dict[str, Any], taken: str) -> Refused:
        """The refusal of a job whose id is taken; ``taken`` says where (DuplicateJob's text)."""
        message = f"{taken}; a job id is never run twice"
        return Refused("duplicate", message, [self._issue(data, message, ("job_id",))], document)

    def _policy_problem(self, spec: JobSpec) -> tuple[str, str] | None:
        """What this host's config does not allow of a valid job: (message, field)."""
        if spec.run_as is None:
            return None
        if spec.executor not in RUN_AS_EXECUTORS:
            return f"applies to local and custom jobs only, not to {spec.executor} jobs", "run_as"
        if spec.run_as not in self._allowed_run_as:
            allowed = ", ".join(self._allowed_run_as) or "none"
            message = (
                f"user {spec.run_as!r} is not allowed here (the config's allowed_run_as: {allowed})"
            )
            return message, "run_as"
        return None

    def _callback(
        self, data: bytes, document: dict[str, Any]
    ) -> tuple[CallbackTarget | None, tuple[ValidationIssue, ...]]:
        if self._callback_target is None:
            return None, ()
        try:
            return self._callback_target(document), ()
        except CallbackError as exc:
            # Callbacks.target raises from the SecretError of a secret it could not read, and
            # with no cause when there is no secret at all.
            where = (
                ("notify",)
                if isinstance(exc, NotifyError)
                else _callback_path(document, exc.__cause__)
            )
            if not self._strict_secrets and isinstance(exc.__cause__, SecretAccessDenied):
                note = (
                    "not checked here: this user may not read secrets_dir, where the callback's "
                    "secret is; spoold checks it when the file arrives"
                )
                return None, (self._issue(data, note, where),)
            issue = self._issue(data, str(exc), where)
            raise Refused("callback", str(exc), [issue], document) from None

    def _check_job_id(
        self, data: bytes, document: dict[str, Any], job_id: str, spool: Spool
    ) -> tuple[ValidationIssue, ...]:
        """Refuse an id the spool holds, as intake would; a schedule replaces its own."""
        found = spool.jobs.find(job_id)
        if found is not None and not ("schedule" in document and found.directory == "scheduled"):
            raise self.duplicate(
                data, document, f"a job with id {job_id!r} already exists in {found.directory}/"
            )
        if found is None and spool.reservations.reserved(job_id):
            raise JobBusy.held(job_id)  # not a job yet: its placing may yet fail
        if found is None and (hidden := spool.hidden()):
            dirs = ", ".join(f"{d}/" for d in hidden)
            note = f"not checked here against {dirs}: this user may not look into them"
            return (self._issue(data, note, ("job_id",)),)
        return ()

    def _issue(self, data: bytes, message: str, path: DocPath) -> ValidationIssue:
        return _located(_nodes(data), [(message, path, False)])[0]


def display_name(name: str) -> str:
    """A file name as one line of text: undecodable bytes replaced, control characters escaped."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def file_problem(name: str, size: int, max_size: int) -> tuple[str, str] | None:
    """What a job file's name or size alone refuses, as (code, reason); None if neither."""
    if display_name(name) != name:
        # Such a name would break log lines, or name no file once shown as text.
        return "file_name", "the file name has control characters or is not UTF-8"
    if not name.endswith(JOB_SUFFIXES):
        return "file_name", "job files must end in .yaml, .yml or .json"
    if size > max_size:
        return "too_large", (
            f"the file is {size} bytes, over the limit of {max_size} bytes (limits.max_file_size)"
        )
    return None


def summary(issues: list[ValidationIssue]) -> str:
    """The refusal in one line, as reason.json's ``reason``: the first issue, and how many more."""
    first = issues[0] if issues else None
    if first is None:
        return "invalid job file"
    where = f" (line {first.line})" if first.line else ""
    more = f" and {len(issues) - 1} more problem(s)" if len(issues) > 1 else ""
    return f"{first.path + ': ' if first.path else ''}{first.message}{where}{more}"


def _loaded(data: bytes, filename: str) -> dict[str, Any] | None:
    """An invalid file's values, where it parses to a mapping small enough to walk."""
    try:
        document = load_document(data, filename)
    except (SpooldError, ValueError):  # it does not parse: the validator said why
        return None
    if not isinstance(document, dict) or size_problem(document, _MAX_NODES):
        return None  # too big to walk (a billion laughs): the validator said so
    return document


def _also_in_values(
    data: bytes, document: dict[str, Any] | None, issues: list[ValidationIssue]
) -> list[ValidationIssue]:
    """The validator's issues and what the values hold besides, so that one run tells all."""
    if document is None:
        return issues
    if not (problems := value_problems(document)):
        return issues
    told = {issue.path for issue in issues}  # `inf` is past the schema's maximum: once is enough
    more = [issue for issue in _located(_nodes(data), problems) if issue.path not in told]
    return sorted([*issues, *more], key=_order)


def value_problems(document: dict[str, Any]) -> list[_Problem]:
    """What a valid document's values hold that no schema says: one walk over every value."""
    problems: list[_Problem] = []
    stack: list[tuple[DocPath, Any]] = [((), document)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if "\0" in value:
                problems.append((_NUL, path, False))
            if "${" in value:
                problems += [(message, path, False) for message in reference_problems(value)]
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str) and "\0" in key:
                    problems.append((f"the key {show_value(key)} {_NUL}", (*path, key), True))
                stack.append(((*path, key), item))
        elif isinstance(value, list):
            stack.extend(((*path, index), item) for index, item in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append((f"must be a finite number (got {value!r})", path, False))
    return problems + _bound_problems(document) + exec_problems(document)


def _bound_problems(document: dict[str, Any]) -> list[_Problem]:
    """Durations and sizes given as text, past the bounds the schema sets for numbers."""
    units = units_of(document)
    found: list[tuple[DocPath, Any]] = []
    for base, unit in units:
        extra = _SCHEDULE_DURATIONS if not base else ()
        found += [((*base, *path), _at(unit, path)) for path in (*_DURATIONS, *extra)]
    problems: list[_Problem] = []
    for path, value in found:
        seconds = _parsed(parse_duration, value)
        if seconds is not None and seconds > MAX_DURATION:
            bound = f"{MAX_DURATION} seconds, 10 years"
            problems.append((f"must be at most {bound} (got {quoted(value, path)})", path, False))
    for base, unit in units:
        memory = _at(unit, ("limits", "memory"))
        size = _parsed(parse_size, memory)
        path = (*base, "limits", "memory")
        if size is not None and size > MAX_MEMORY:
            bound = f"1 PiB, {MAX_MEMORY} bytes"
            problems.append((f"must be at most {bound} (got {quoted(memory, path)})", path, False))
        elif size is not None and size < 1:
            problems.append((f"must be at least 1 byte (got {quoted(memory, path)})", path, False))
    return problems


def _parsed(parse: Callable[[str], float], value: Any) -> float | None:
    """A duration or size given as text, in seconds or bytes; None for anything else."""
    if not isinstance(value, str):
        return None
    try:
        return parse(value)
    except ValueError:  # the schema's pattern let it through: JobSpec says what is wrong
        return None


def _at(value: Any, path: DocPath) -> Any:
    for part in path:
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _callback_path(document: Mapping[str, Any], cause: BaseException | None) -> DocPath:
    """Where a callback's problem is: the URL without a secret, or the secret that failed."""
    block = document.get("callback")
    block = block if isinstance(block, dict) else {}
    if cause is None:  # no secret to sign with
        return ("callback", "url") if "url" in block else ("callback",)
    # Callbacks.target fills in every variable before the secret: a failed read may be in one.
    for name, value in (document.get("variables") or {}).items():
        if isinstance(value, str) and _names_in(value, str(cause)):
            return ("variables", name)
    if "secret" in block:
        return ("callback", "secret")
    return ("callback",) if block else ()


def _names_in(value: str, message: str) -> bool:
    """Whether ``message`` (SecretStore's, which starts ``secret 'NAME'``) is about a secret
    that ``value`` refers to."""
    return any(f"secret {name!r}" in message for name in _secret_names(value))


def _secret_names(value: str) -> list[str]:
    names = []
    for piece in value.split("${secret:")[1:]:
        name, closed, _ = piece.partition("}")
        if closed:
            names.append(name)
    return names


def _nodes(data: bytes) -> NodeMap:
    """Where each value of a file is (a refusal's cost only: the text is composed again)."""
    return map_nodes(decode_text(data), _MAX_NODES)


def _located(nodes: NodeMap, problems: list[_Problem]) -> list[ValidationIssue]:
    issues = [locate(problem, nodes) for problem in problems]
    return sorted(dict.fromkeys(issues), key=_order)


def _order(issue: ValidationIssue) -> tuple[int, int]:
    return issue.line or 0, issue.column or 0
