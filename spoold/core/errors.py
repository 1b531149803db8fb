"""The one exception tree of spoold: callers can catch ``SpooldError`` and nothing escapes it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple


def escape_unprintable(text: str) -> str:
    """``text`` with each character ``str.isprintable`` refuses (a terminal's controls, those
    that reorder or hide what is shown, line separators) escaped as ``repr`` escapes it, and
    its backslashes left as they are.

    For messages, whose values ``documents.show_value`` quoted, escaped, where they were
    made: such a message comes out the same, so a face that passes it through here again
    escapes only what another layer's words left raw, never a second time what was escaped
    already.
    """
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


class ValidationIssue(NamedTuple):
    """One problem in a job file, with where it is."""

    message: str
    path: str
    line: int | None = None
    column: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The issue as reason.json and ``--json`` output carry it."""
        return {
            "message": self.message,
            "path": self.path,
            "line": self.line,
            "column": self.column,
        }

    def format(self, filename: str) -> str:
        """``file:line:column: path: message``, leaving out what is unknown."""
        where = filename + "".join(f":{n}" for n in (self.line, self.column) if n is not None)
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class SpooldError(Exception):
    """Base class of every error spoold raises on purpose."""


class ConfigError(SpooldError):
    """The configuration is invalid; the message names the key."""


class SpoolError(SpooldError):
    """The spool tree is missing, unusable or inconsistent."""


class IncomingMissing(SpoolError):
    """incoming/ is not there (moved away, removed, not mounted): nothing can be dropped."""


class JobNotFound(SpoolError):
    """No job with that id is in the spool."""


class DuplicateJob(SpoolError):
    """A job with that id already exists in some state."""


class JobBusy(SpoolError):
    """Another change of that job id is under way, and may yet fail (a file of that id being
    placed, its first delivery prepared): neither a job nor a duplicate yet; try again."""

    #: The job id whose reservation (ids/) holds it with no job found (``held``); None for
    #: another change under way.
    held_id: str | None = None

    @classmethod
    def held(cls, job_id: str) -> JobBusy:
        """The id is held (ids/) and no job of it found: a file of that id being placed, or
        a job that moved between directories as they were looked at."""
        busy = cls(f"a file of job id {job_id!r} is being accepted (its id is held, no job yet)")
        busy.held_id = job_id
        return busy


class JobFileChanged(SpoolError):
    """A job's job.yaml is no longer the file that was validated (its sha256 differs)."""


class InvalidTransition(SpoolError):
    """A state change the state machine does not allow."""


class JobFenced(SpoolError):
    """Another host took the job over: this host's copy of it writes nothing more for it."""


class InvalidJobFile(SpooldError):
    """A job file failed to parse or validate; ``issues`` lists every problem found."""

    def __init__(self, issues: Sequence[ValidationIssue]) -> None:
        self.issues = list(issues)
        super().__init__("; ".join(issue.message for issue in self.issues) or "invalid job file")


class RejectedFile(SpooldError):
    """A file in incoming/ is refused before parsing (symlink, device, too large, ...)."""

    def __init__(self, reason: str, code: str) -> None:
        self.reason = reason
        self.code = code
        super().__init__(reason)


class ExecutorError(SpooldError):
    """An executor could not run the job (as opposed to the job itself failing).

    ``retryable`` says the failure is transient (a server busy or away, a connection lost): a
    retry can help. It is a flag, not words in the message, so that nothing has to parse text.
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class NotStarted(ExecutorError):
    """A unit's work did not begin: its start could not be recorded (a full disk, no inode
    left). Nothing of it ran, so the job is tried again later rather than failed for it."""


class ExecutorNotAvailable(ExecutorError):
    """An executor's SDK is not installed; the message names the extra to install."""


class PluginError(SpooldError):
    """An executor plugin could not be loaded or is not an Executor subclass."""


class JobDetached(SpooldError):
    """spoold stops and leaves a job running for the next daemon to adopt: its attempt ends
    here without an outcome, and the job stays in running/."""


class WorkerProcessError(SpooldError):
    """A worker process could not be started or said something it should not."""


class CallbackError(SpooldError):
    """A job's callback cannot be signed: no secret, or one that cannot be read."""


class NotifyError(CallbackError):
    """A job's ``notify:`` cannot be used (an email target with no mail server configured)."""


class SecretError(SpooldError):
    """A ``${secret:NAME}`` cannot be read safely: missing, unsafe mode, not a plain file."""
