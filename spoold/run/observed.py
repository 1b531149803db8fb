"""What the metrics count, as it happens: an ``Observation`` of each change of a job's state.

Made where the change is made (a worker process, intake) from the ledger's ``StateChange`` by a
pure function, ``observation_of``, and counted in the daemon's main process
(spoold.face.metrics). Worker processes send theirs over the pool's link (spoold.run.pool),
mostly inside the message a slot sends once a job anyway: an observation is a flat tuple of
text and numbers, which marshal sends as it is, so that counting costs the job path a few
microseconds and no file.

The times it carries are measured as the change is made:

- ``accepted`` (a new job in pending/): ``pickup_seconds``, from the file's arrival in
  incoming/ (its ctime, see ``spoold.core.spool.stages.TakenFile.arrived``) to the job's;
- ``started`` (a claim): ``wait_seconds``, from the time the job became ready to run (its
  submission for a first attempt; for a retry, the time it was due) to its claim. A job put
  back by a requeue or by ``spoold retry`` records no such time: its wait is not observed;
- ``retrying``, ``requeued``, ``finished`` (a move out of running/): ``run_seconds``, the wall
  time of the attempt that just ended, and what it cost where its executor could tell
  (``cpu_seconds``, ``peak_memory_bytes``, ``output_bytes``: its status.json ``usage``).
  ``finished`` is also a pending job cancelled (no run).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from spoold.core.clock import Clock, parse_rfc3339
from spoold.core.job import JobStatus
from spoold.core.states import JobState
from spoold.run.ledger import Listener, StateChange

#: The kinds of observation, in the order a job's life has them.
KINDS = ("accepted", "started", "retrying", "requeued", "finished")


class Observation(NamedTuple):
    """One change of a job's state, as the metrics count it (text and seconds only)."""

    #: accepted | started | retrying (back to pending/, a retry due) | requeued (back to
    #: pending/, interrupted) | finished (succeeded, failed or cancelled).
    kind: str
    job_id: str
    executor: str  # "" when not known
    #: The state the change reached: pending | running | succeeded | failed | cancelled.
    outcome: str
    run_seconds: float | None = None
    wait_seconds: float | None = None
    pickup_seconds: float | None = None
    cpu_seconds: float | None = None  # user + system
    peak_memory_bytes: float | None = None
    output_bytes: float | None = None

    def to_wire(self) -> tuple[str | float | None, ...]:
        """A plain tuple, which marshal takes (a NamedTuple it does not)."""
        return tuple(self)

    @classmethod
    def from_wire(cls, fields: object) -> Observation:
        """Rebuild one from ``to_wire``'s tuple; ValueError for anything else."""
        if not isinstance(fields, tuple) or len(fields) != len(cls._fields):
            raise ValueError(f"not an observation: {fields!r}")
        kind, job_id, executor, outcome, *numbers = fields
        texts = (kind, job_id, executor, outcome)
        if kind not in KINDS or not all(isinstance(text, str) for text in texts):
            raise ValueError(f"not an observation: {fields!r}")
        return cls(str(kind), str(job_id), str(executor), str(outcome),
                   *(_seconds(number) for number in numbers))  # fmt: skip


def observation_of(change: StateChange, *, now: float) -> Observation | None:
    """What the metrics count of ``change``, made at Unix time ``now``; None for a change they
    do not count (``spoold retry`` putting a failed job back into pending/)."""
    status, after = change.status, change.after
    executor = "" if status is None else status.executor
    if change.before is None:
        pickup = None if change.arrived is None else max(now - change.arrived, 0.0)
        return Observation("accepted", change.job_id, executor, after.value, pickup_seconds=pickup)
    if after is JobState.RUNNING:
        since = None if status is None else _ready_since(status)
        wait = None if since is None else max(now - since, 0.0)
        return Observation("started", change.job_id, executor, after.value, wait_seconds=wait)
    if change.before is JobState.RUNNING:
        if after is JobState.PENDING:
            retry = status is not None and status.next_attempt_at is not None
            kind, run = ("retrying" if retry else "requeued"), _last_run(status, ended=False)
        else:
            kind, run = "finished", _last_run(status, ended=True)
        usage = None if run is None or status is None else status.attempts[-1].usage
        if usage is None:
            return Observation(kind, change.job_id, executor, after.value, run_seconds=run)
        cpu = None
        if usage.cpu_user_seconds is not None and usage.cpu_system_seconds is not None:
            cpu = usage.cpu_user_seconds + usage.cpu_system_seconds
        return Observation(
            kind, change.job_id, executor, after.value, run_seconds=run, cpu_seconds=cpu,
            peak_memory_bytes=_number(usage.peak_memory_bytes),
            output_bytes=_number(usage.output_bytes),
        )  # fmt: skip
    if after.is_terminal:  # a pending job ended before it started (cancelled)
        return Observation("finished", change.job_id, executor, after.value)
    return None


def listener(observe: Callable[[Observation], None], clock: Clock) -> Listener:
    """A ledger listener that hands ``observe`` an observation of each change it counts."""

    def tell(change: StateChange) -> None:
        found = observation_of(change, now=clock.now().timestamp())
        if found is not None:
            observe(found)

    return tell


def _ready_since(status: JobStatus) -> float | None:
    """When a job being claimed became ready to run; None when its status does not say."""
    if status.next_attempt_at:
        return _timestamp(status.next_attempt_at)
    if not status.attempts and status.submitted_at:
        return _timestamp(status.submitted_at)
    return None  # requeued, or put back by `spoold retry`: when is not recorded


def _last_run(status: JobStatus | None, *, ended: bool) -> float | None:
    """How long the attempt that just ended ran; None if none did in this change (``ended``:
    the job ended, and an attempt that ended earlier is not this change's)."""
    if status is None or not status.attempts:
        return None
    last = status.attempts[-1]
    if last.finished_at is None or (ended and last.finished_at != status.finished_at):
        return None
    return last.seconds()  # monotonic where measured: a wall clock step does not change it


def _seconds(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, float | int):
        raise ValueError(f"not a number of seconds: {value!r}")
    return float(value)


def _number(value: int | None) -> float | None:
    return None if value is None else float(value)


def _timestamp(text: str) -> float | None:
    try:
        return parse_rfc3339(text).timestamp()
    except ValueError:
        return None
