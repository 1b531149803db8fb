"""The one gate for every change of a job's state (STYLE: supervisor's ``change_state``).

Every move of a job into pending/, running/, done/ or failed/ goes through ``JobLedger``, in
this order, written once:

1. check the move against ``states.TRANSITIONS`` (a move not in the table raises
   InvalidTransition, and nothing is written);
2. settle what the job's last owner left prepared in outbox/, then prepare this change's
   delivery (``Callbacks.announce``: status ``callback_sequence`` + 1);
3. make the change in the spool's stores (status.json written, the directory renamed);
4. commit the delivery; if the change raised, commit or drop it as the job's status.json
   then records it (a change can raise after its status was written: its move cut off,
   which a retry or a takeover completes without announcing it again);
5. tell the listeners (``StateChange``): a listener that fails is logged, never felt.

A ``StateChange`` carries what a listener needs to tell what happened (spoold.run.observed
makes the metrics' observations of it) without reading the spool again: the status written,
and for a claim the status the job was claimed with (read only when someone listens).

Where a job comes from (an accepted file, a schedule's firing) it enters pending/ through
``enter``; the crash-safety of each step is the stores' (spoold.core.spool) and the outbox's.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from spoold.core.errors import InvalidTransition, SpooldError
from spoold.core.job import JobStatus
from spoold.core.states import JobState, check_transition
from spoold.out.outbox import event_for

if TYPE_CHECKING:
    from spoold.core.spool import JobDir, Spool
    from spoold.out.outbox import Callbacks, CallbackTarget

#: What a job's directory says of its state (failed/ holds the failed and the cancelled, whose
#: moves are the same: only back to pending/).
_STATE_OF_DIRECTORY = {
    "pending": JobState.PENDING,
    "running": JobState.RUNNING,
    "done": JobState.SUCCEEDED,
    "failed": JobState.FAILED,
}


class StateChange(NamedTuple):
    """One change made: the job, where it was and where it is now (``before`` None: it is new)."""

    job_id: str
    before: JobState | None
    after: JobState
    job: JobDir
    #: The status written by the change (before masking: what a listener keeps of it must
    #: hold no secret); for a claim, which writes none, the status the job had in pending/,
    #: read only when the ledger has listeners. None: not known (unreadable).
    status: JobStatus | None = None
    #: For a new job taken from a file: when the file arrived in incoming/ (a Unix time).
    arrived: float | None = None


Listener = Callable[[StateChange], None]
Mask = Callable[[dict[str, Any]], dict[str, Any]]


class FromJobFile:
    """The callback target named by the job's own job.yaml (read when needed)."""


#: ``target=`` default of ``JobLedger.move``: the job's job.yaml says where its events go.
FROM_JOB_FILE = FromJobFile()


class JobLedger:
    """Changes a job's state: checked, announced, made, committed, told; nowhere else."""

    def __init__(
        self,
        spool: Spool,
        callbacks: Callbacks | None,
        *,
        listeners: Iterable[Listener] = (),
        logger: logging.Logger | None = None,
    ) -> None:
        self._spool = spool
        self._callbacks = callbacks
        self._listeners = tuple(listeners)
        self._logger = logger or logging.getLogger("spoold")

    def claim(self, job_id: str) -> JobDir | None:
        """pending/ -> running/ for the worker that wins the rename; None for the others."""
        job = self._spool.jobs.claim(job_id)
        if job is not None and self._listeners:
            self._tell(StateChange(job_id, JobState.PENDING, JobState.RUNNING, job,
                                   self._claimed_status(job)))  # fmt: skip
        return job

    def move(
        self,
        job: JobDir,
        to: JobState,
        status: JobStatus,
        *,
        target: CallbackTarget | FromJobFile | None = FROM_JOB_FILE,
        event: str | None = None,
        mask: Mask | None = None,
        announce: bool = True,
        log_synced: bool = False,
        retry: bool = False,
    ) -> JobDir:
        """Move ``job`` into ``to``'s directory with ``status`` (masked by ``mask`` where it is
        written and sent); its event (``event``, else the one of ``to``) goes to ``target``.

        ``announce=False`` only for recovery completing a move whose delivery was made (and
        settled) before its worker died. ``retry``: this very change (``status`` as the try
        that raised left it) tried again: where its status was written before it raised (its
        move cut off), only the move is left, and its delivery is the one it made then.
        """
        if to is JobState.RUNNING:
            raise ValueError("a job becomes running by claim(), which its worker wins")
        before = _STATE_OF_DIRECTORY[job.directory]
        check_transition(before, to)
        # Before anything is written for it, its delivery included: a claim another host
        # took over writes nothing more (JobFenced).
        self._spool.jobs.check_fence(job)
        if retry and announce and self._recorded(job, status):
            if self._callbacks is not None:
                self._callbacks.settle_job(
                    job.job_id, status.callback_sequence, status.callback_delivery
                )
            announce = False
        with self._announced(job, event or event_for(to), status, target, mask=mask,
                             announce=announce):  # fmt: skip
            data = status.to_dict()
            if mask is not None:
                data = mask(data)
            if before is JobState.FAILED:  # `spoold retry`: moved first, then the status
                moved = self._spool.jobs.requeue(job, data)
            else:
                moved = self._spool.jobs.finish(job, to, data, log_synced=log_synced)
        self._tell(StateChange(job.job_id, before, to, moved, status))
        return moved

    def enter(
        self,
        status: JobStatus,
        target: CallbackTarget | None,
        place: Callable[[], JobDir],
        *,
        arrived: float | None = None,
        change: str | None = None,
    ) -> JobDir:
        """A new job into pending/ (``place`` puts it there: intake's accept, a schedule's
        firing), its ``accepted`` event prepared before and committed after.

        ``arrived``: when its file arrived in incoming/, for the listeners (pickup latency).
        ``change``: the ``accepted`` change's id, where the status ``place`` puts was written
        numbered for it before (``outbox.numbered``).
        """
        if status.state is not JobState.PENDING:
            raise InvalidTransition(f"a new job enters pending, not {status.state.value}")
        announced = self._announced(
            None, "accepted", status, target, mask=None, announce=True, change=change
        )
        with announced:
            job = place()
        self._tell(StateChange(job.job_id, None, JobState.PENDING, job, status, arrived))
        return job

    @contextlib.contextmanager
    def _announced(
        self,
        job: JobDir | None,
        event: str,
        status: JobStatus,
        target: CallbackTarget | FromJobFile | None,
        *,
        mask: Mask | None,
        announce: bool,
        change: str | None = None,
    ) -> Iterator[None]:
        if self._callbacks is None or not announce:
            yield
            return
        if isinstance(target, FromJobFile):
            assert job is not None, "a new job has no job.yaml to read its target from"
            with self._callbacks.announce_job(job, event, status):
                yield
            return
        with self._callbacks.announce(target, event, status, mask, change=change):
            yield

    def _recorded(self, job: JobDir, status: JobStatus) -> bool:
        """Whether ``job``'s status.json records the change ``status`` announced (its
        ``callback_delivery``): a try that raised after writing it."""
        if status.callback_delivery is None:
            return False
        try:
            written = self._spool.jobs.read_status(job)
        except (OSError, SpooldError, ValueError):
            return False  # not known: announced again, as a change not recorded
        return bool(
            written.get("callback_delivery") == status.callback_delivery
            and written.get("callback_sequence") == status.callback_sequence
            and written.get("state") == status.state.value  # not a cancel asked since
        )

    def _claimed_status(self, job: JobDir) -> JobStatus | None:
        """The status a claimed job had in pending/ (its worker reads it next, from the page
        cache); None if it cannot be read (recovery rebuilds a lost one: repair_pending)."""
        try:
            return JobStatus.from_dict(self._spool.jobs.read_status(job))
        except (OSError, SpooldError, ValueError, KeyError, TypeError):
            return None

    def _tell(self, change: StateChange) -> None:
        for listener in self._listeners:
            try:
                listener(change)
            except Exception:  # a listener's failure must not undo or stop a change made
                self._logger.exception(
                    "unexpected failure in a listener of job %s's change to %s",
                    change.job_id, change.after.value,
                )  # fmt: skip
