"""Job states and the transitions allowed between them. Standard library only."""

from __future__ import annotations

import enum

from spoold.core.errors import InvalidTransition


class JobState(enum.StrEnum):
    """The state a job is in, as written to status.json."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REJECTED = "rejected"

    @property
    def directory(self) -> str:
        """The spool directory a job in this state sits in."""
        return _DIRECTORY[self]

    @property
    def is_terminal(self) -> bool:
        """True when no further transition happens without a user asking for it."""
        return self in _TERMINAL


_DIRECTORY = {
    JobState.PENDING: "pending",
    JobState.RUNNING: "running",
    JobState.SUCCEEDED: "done",
    JobState.FAILED: "failed",
    JobState.CANCELLED: "failed",
    JobState.REJECTED: "rejected",
}

_TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.REJECTED})

# running -> pending is the requeue of an interrupted job (on_interrupt: requeue);
# failed/cancelled -> pending is `spoold retry`.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED}),
    JobState.RUNNING: frozenset(
        {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.PENDING}
    ),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset({JobState.PENDING}),
    JobState.CANCELLED: frozenset({JobState.PENDING}),
    JobState.REJECTED: frozenset(),
}

# The directories a job can be found in, in the order a job moves through them, so that a
# lookup in this order cannot miss a job that moves forward while it is being looked for.
JOB_DIRECTORIES = ("pending", "running", "done", "failed")


#: How a state reads after "job X": most as they are (``job X succeeded``, ``job X failed``).
_PHRASES = {"pending": "is pending", "running": "is running", "cancelled": "was cancelled",
            "rejected": "was rejected"}  # fmt: skip


def state_phrase(state: str) -> str:
    """``job X succeeded``, ``job X is pending``, ``job X was cancelled``: never ``is succeeded``."""
    return _PHRASES.get(state, state)


def check_transition(current: JobState, new: JobState) -> None:
    """Raise InvalidTransition unless ``current -> new`` is allowed."""
    if new not in TRANSITIONS[current]:
        raise InvalidTransition(f"a {current.value} job cannot become {new.value}")
