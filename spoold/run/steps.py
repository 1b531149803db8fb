"""One attempt of a job with ``steps:``: each step once its needs succeeded, independent ones
in parallel, each with its own executor, timeout, retries, log section and status entry.
Parallel within bounds: at most ``workers`` steps of the job at once, and of one executor at
most its ``limits.executors``, counted across every job the daemon runs: each try of a step
takes a slot of its executor as a job without steps does (spoold.run.executor_slots), waiting
for one, pending, if they are all taken; the job itself takes none.

``spoold.run.dag`` decides what may start; this runs it. Steps share the job's work dir (a later
step uses what an earlier one built) and its cancel switch. The job's ``timeout`` bounds the
steps together (their tries and the waits between them): past it, the steps running end as on
a timeout, none starts, and the attempt ends timed out. A new attempt of the job, or the same
one adopted after a restart, keeps what the one before settled (``dag.carried_over``): the
steps that succeeded, and those that failed with ``continue_on_error`` on their own, as the job
went past them then; it runs the rest, a step cut off by a cancel or the timeout among them.

Once the attempt's steps end, every step's entry says what became of it: a step that did not
run is ``skipped``, its ``error`` saying why (a step it needs failed, the job was cancelled, the
timeout ran out, the pre_run hook failed); one cut off while it ran or waited for its next try
is ``cancelled`` or ``timed_out``.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from spoold.core.clock import Clock, parse_rfc3339, rfc3339
from spoold.core.errors import JobDetached
from spoold.core.job import JobSpec
from spoold.core.joblog import JobLog
from spoold.core.units import format_duration
from spoold.executors.base import ExecResult
from spoold.run.dag import StepScheduler, StepState, carried_over
from spoold.run.executor_slots import ExecutorSlots, LocalSlots, Ticket

#: What runs one attempt of one step: (step id, its spec, its log section) -> result.
RunUnit = Callable[[str, JobSpec, JobLog], ExecResult]

# The job's own fields a step inherits unless it says otherwise.
_INHERITED = ("executor", "type", "timeout", "limits", "run_as")
# The longest a wait for a step's next try goes without looking at the clock: a test's clock
# that is moved ends it within this, as the real one does.
_WAIT_TURN = 0.2


def step_spec(job: JobSpec, step: Mapping[str, Any]) -> JobSpec:
    """A step as a spec of its own: the job's defaults, the step's fields over them."""
    document: dict[str, Any] = {key: job.document[key] for key in _INHERITED if key in job.document}
    document.update({key: value for key, value in step.items() if key not in ("id", "needs")})
    document["variables"] = {**job.document.get("variables", {}), **step.get("variables", {})}
    return JobSpec.from_document(document, job.job_id)


class _Tried(NamedTuple):
    """A try of a step: its result, and whether the step ended with it (``final``: cut off),
    where a result that is not final goes to the step's retry rules."""

    result: ExecResult
    final: bool = True


class StepsRun:
    """Runs a job's steps for one attempt and says how it went."""

    def __init__(
        self,
        spec: JobSpec,
        *,
        previous: Mapping[str, Any],
        run_unit: RunUnit,
        log: JobLog,
        clock: Clock,
        cancel: threading.Event,
        parallel: int,
        executor_limits: Mapping[str, int] | None = None,
        slots: ExecutorSlots | None = None,
        on_change: Callable[[dict[str, Any]], None],
        draw: Callable[[], float],
        adopted_from: str | None = None,
        interrupted: Callable[[], bool] = lambda: False,
    ) -> None:
        """``previous``: the status.json ``steps`` of the attempt before (or of this one, when
        it is adopted), if any. ``adopted_from``: the start of an attempt adopted from a worker
        that is gone (RFC 3339): the job's timeout counts from there. ``interrupted``: whether
        ``cancel`` was set because spoold stops, not by a cancel of the job.
        ``parallel``: the job's steps running at once (the config's ``workers``);
        ``executor_limits``: of those, the most of one executor (``limits.executors``);
        ``slots``: where each try takes a slot of its executor, beside other jobs' (counted
        among this job's steps alone if not given)."""
        self._spec = spec
        steps = spec.document["steps"]
        kept = carried_over(steps, _recorded_states(previous))
        self._scheduler = StepScheduler.from_states(steps, kept)
        # Each entry says whether the job goes on past the step's failure: `spoold status`
        # shows it without reading job.yaml. A step kept keeps its entry; one that runs again
        # is pending until it starts (how it ended before is in the job's attempts).
        self._records: dict[str, dict[str, Any]] = {
            step["id"]: {
                **(
                    previous[step["id"]]
                    if step["id"] in kept
                    else {"state": StepState.PENDING.value}
                ),
                "continue_on_error": step.get("continue_on_error") is True,
            }
            for step in steps
        }
        self._run_unit = run_unit
        self._log = log
        self._clock = clock
        self._cancel = cancel
        self._parallel = max(parallel, 1)
        # A step waits, pending, for one of its executor to end, as for a worker: a vendor's
        # rate limit is not the job's to exceed by running its steps side by side.
        self._caps = {name: max(cap, 1) for name, cap in (executor_limits or {}).items()}
        self._kinds = {step["id"]: str(step.get("executor") or spec.executor) for step in steps}
        self._slots = slots if slots is not None else LocalSlots(self._caps)
        # Adopted, a step that ran when its worker went runs on: it has its slot at once.
        self._running_before = set() if adopted_from is None else {
            step_id for step_id, state in _recorded_states(previous).items()
            if state == StepState.RUNNING.value and step_id not in kept
        }  # fmt: skip
        self._on_change = on_change
        self._draw = draw  # the jitter of step retries
        self._adopted_from = adopted_from
        self._interrupted = interrupted
        self._deadline: float | None = None  # the job's timeout, on the clock's monotonic time
        self._lock = threading.Lock()  # records and on_change, from several step threads
        self._timed_out: list[str] = []  # steps the job's timeout cut off, in the order it did
        self._unstarted: set[str] = set()  # started as the attempt stopped: they did not run

    def run(self) -> ExecResult:
        """Run until no step can start any more; the result is the job attempt's."""
        self._deadline = self._start_deadline()
        self._slots.stepping(self._spec.job_id)
        finished: queue.SimpleQueue[tuple[str, ExecResult]] = queue.SimpleQueue()
        running = 0
        results: dict[str, ExecResult] = {}
        self._publish()  # every step shows once the steps start: pending, or as kept
        for step_id in self._scheduler.skipped():
            self._record(step_id, state=StepState.SKIPPED.value, error="a step it needs failed")
        detached = interrupted = False
        while True:
            if not (detached or interrupted or self._stopped()):
                ready = self._scheduler.ready(self._parallel, caps=self._caps, kinds=self._kinds)
                for step_id in ready:
                    self._scheduler.started(step_id)
                    running += 1
                    threading.Thread(
                        target=self._step, args=(step_id, finished), daemon=True,
                        name=f"spoold-step-{step_id}",
                    ).start()  # fmt: skip
            if running == 0:
                break
            step_id, result = finished.get()
            running -= 1
            if result.detached:  # spoold stops: the others are told too, and left as they are
                detached = True
                continue
            if step_id in self._unstarted:
                self._scheduler.cut_off(step_id)
                continue
            results[step_id] = result
            # Not the step's own end: nothing goes past it (the job's on_interrupt decides).
            interrupted = interrupted or result.interrupted
            if result.cancelled or result.interrupted or step_id in self._timed_out:
                self._scheduler.cut_off(step_id)  # what needs it waits: it never ended
                continue
            self._scheduler.finished(step_id, result.succeeded)
            for skipped in self._scheduler.skipped():
                if self._records[skipped]["state"] != StepState.SKIPPED.value:
                    self._record(skipped, state=StepState.SKIPPED.value,
                                 error=f"a step it needs failed ({step_id})")  # fmt: skip
                    self._log.error(f"step {skipped} skipped: a step it needs failed ({step_id})")
        if detached:
            raise JobDetached("steps left running")
        unrun = [] if (why := self._why_stopped(interrupted)) is None else self.not_run(why)
        return self._result(results, unrun)

    def not_run(self, why: str) -> list[str]:
        """Every step that has not run in this attempt is skipped, for ``why``: the attempt
        ended without them (a failed pre_run hook, a cancel, the timeout). Returns their ids."""
        unrun = [
            step_id
            for step_id, record in self._records.items()
            if record["state"] == StepState.PENDING.value
        ]
        if self._cancel.is_set() and not self._interrupted():
            why = "the job was cancelled"  # a pre_run hook that failed as it was cancelled
        for step_id in unrun:
            self._record(step_id, state=StepState.SKIPPED.value, error=f"not run: {why}",
                         publish=False)  # fmt: skip
        if unrun:
            self._log.error(f"not run: {', '.join(unrun)} ({why})")
        self._publish()
        return unrun

    def _start_deadline(self) -> float | None:
        """When the job's timeout ends the steps, on the clock's monotonic time."""
        timeout = self._spec.timeout
        if timeout is None:
            return None
        spent = 0.0
        if self._adopted_from is not None:  # its start was seen by a worker that is gone
            try:
                began = parse_rfc3339(self._adopted_from)
            except ValueError:
                began = self._clock.now()
            spent = min(max((self._clock.now() - began).total_seconds(), 0.0), timeout)
        return self._clock.monotonic() + timeout - spent

    def _left(self) -> float | None:
        """Seconds left of the job's timeout (None: it has none)."""
        if self._deadline is None:
            return None
        return self._deadline - self._clock.monotonic()

    def _expired(self) -> bool:
        left = self._left()
        return left is not None and left <= 0

    def _stopped(self) -> bool:
        """No step starts any more: the job is cancelled, or its timeout ran out."""
        return self._cancel.is_set() or self._expired()

    def _why_stopped(self, interrupted: bool) -> str | None:
        """Why steps that did not run were left out, if the attempt stopped before its end."""
        if self._cancel.is_set() or interrupted:
            if interrupted or self._interrupted():
                return "the attempt was interrupted"
            return "the job was cancelled"
        if self._timed_out or self._expired():
            return f"the job's timeout of {self._timeout_words()} ran out"
        return None

    def _timeout_words(self) -> str:
        return format_duration(self._spec.timeout or 0)

    def _step(self, step_id: str, finished: queue.SimpleQueue[tuple[str, ExecResult]]) -> None:
        try:
            result = self._attempts(step_id)
        except JobDetached:
            result = ExecResult(exit_code=None, detached=True)
        except Exception as exc:  # a bug here must end the step, not hang the job
            self._log.error(f"step {step_id} failed inside spoold: {exc!r}")
            result = ExecResult(exit_code=None, error=f"internal error: {exc!r}")
            self._record(step_id, state=StepState.FAILED.value, error=result.error,
                         finished_at=rfc3339(self._clock.now()))  # fmt: skip
        finished.put((step_id, result))

    def _attempts(self, step_id: str) -> ExecResult:
        step = self._scheduler.step(step_id)
        spec = step_spec(self._spec, step)
        log = self._log.section(step_id)
        kind = self._kinds[step_id]
        number = 0
        result: ExecResult | None = None  # the try before
        while True:
            number += 1
            ticket, stopped = self._turn(step_id, kind, log, running=number == 1
                                         and step_id in self._running_before)  # fmt: skip
            if result is not None and stopped is not None:  # it waited for a slot to try again
                ticket.give_back()
                return self._stopped_between(step_id, log, result, number - 1, stopped)
            if result is None and (stopped is not None or self._stopped()):
                ticket.give_back()  # stopped as it was about to start: not run
                with self._lock:
                    self._unstarted.add(step_id)
                return ExecResult(exit_code=None, error="not run")
            try:
                tried = self._try(step_id, spec, log, number)
            finally:
                ticket.give_back()
            if tried.final:  # cut off: the step ends
                return tried.result
            result = tried.result
            if result.succeeded or not spec.retry.should_retry(number, result.exit_code):
                state = StepState.SUCCEEDED if result.succeeded else StepState.FAILED
                return self._ended(step_id, log, result, state, result.error)
            wait = spec.retry.delay(number, self._draw)
            log.error(
                f"step {step_id} failed ({result.failure}); retrying in {format_duration(wait)}"
            )
            if (stopped := self._wait(wait)) is not None:
                return self._stopped_between(step_id, log, result, number, stopped)

    def _turn(
        self, step_id: str, kind: str, log: JobLog, *, running: bool
    ) -> tuple[Ticket, StepState | None]:
        """A slot of the step's executor for its next try, and what cut the wait for it short
        (the job's cancel, its timeout), if anything did."""
        ticket = self._slots.claim(kind, running=running)
        if ticket.granted.is_set():
            return ticket, None
        log.info(f"step {step_id} waits for a {kind} slot (limits.executors: "
                 f"{self._caps.get(kind)}, other jobs' runs and steps hold them)")  # fmt: skip
        return ticket, self._wait(None, until=ticket.granted)

    def _try(self, step_id: str, spec: JobSpec, log: JobLog, number: int) -> _Tried:
        """Run one try of a step: its result, or the step's end when the try was cut off (a
        cancel, the job's timeout)."""
        left = self._left()
        # The job's timeout, where it ends no later than the step's own (which is the
        # job's, unless the step has one): a try it ends is cut off, not failed.
        bounded = left is not None and (spec.timeout is None or left <= spec.timeout)
        unit = dataclasses.replace(spec, timeout=max(left or 0.0, 0.0)) if bounded else spec
        log.info(f"step {step_id} started (attempt {number} of {spec.retry.attempts})")
        # Its executor too: who asks why a job waits counts the slots running steps hold.
        self._record(step_id, state=StepState.RUNNING.value, attempts=number,
                     executor=self._kinds[step_id], started_at=rfc3339(self._clock.now()),
                     finished_at=None, exit_code=None, error=None,
                     drop=("cancelled",))  # fmt: skip
        result = self._run_unit(step_id, unit, log)
        if result.interrupted or result.cancelled:  # not the step's doing
            return _Tried(self._ended(step_id, log, result, StepState.CANCELLED, result.failure))
        if result.timed_out and bounded:
            self._cut(step_id)
            why = f"cut off: the job's timeout of {self._timeout_words()} ran out"
            return _Tried(self._ended(step_id, log, result, StepState.TIMED_OUT, why))
        return _Tried(result, final=False)

    def _stopped_between(
        self, step_id: str, log: JobLog, result: ExecResult, number: int, stopped: StepState
    ) -> ExecResult:
        """A step cut off (``stopped``) while it waited to try again after try ``number``
        (``result``): the tries it had left are a next run's."""
        if stopped is StepState.TIMED_OUT:
            self._cut(step_id)
            why = f"the job's timeout of {self._timeout_words()} ran out"
        else:
            why = "cancelled"
        said = f"{why} while it waited to try again (try {number}: {result.failure})"
        result = dataclasses.replace(result, cancelled=stopped is StepState.CANCELLED)
        return self._ended(step_id, log, result, stopped, said)

    def _ended(
        self, step_id: str, log: JobLog, result: ExecResult, state: StepState, error: str | None
    ) -> ExecResult:
        """Record how a step ended (``state``, ``error``), and say so in its log section."""
        # Ended while no daemon watched (adopted): its end as recorded, not this one's.
        ended = result.ended_at or self._clock.now()
        # What its executor returned (a checksum, an invoice's id): the step's own, as a job's
        # is status.json's ``result``; a try that returned none leaves none of an earlier one.
        kept: dict[str, Any] = {"result": dict(result.result)} if result.result else {}
        self._record(step_id, drop=() if kept else ("result",), state=state.value,
                     finished_at=rfc3339(ended), exit_code=result.exit_code, error=error,
                     **kept)  # fmt: skip
        if state is StepState.SUCCEEDED:
            log.info(f"step {step_id} succeeded")
        elif state is StepState.FAILED:
            tolerated = self._scheduler.step(step_id).get("continue_on_error") is True
            (log.info if tolerated else log.error)(
                f"step {step_id} failed: {result.failure}" + (" (continue_on_error)" * tolerated)
            )
        else:
            log.error(f"step {step_id} {state.value}: {error}")
        return result

    def _wait(
        self, seconds: float | None, *, until: threading.Event | None = None
    ) -> StepState | None:
        """Wait ``seconds`` on the clock (None: no end) or ``until`` is set: what cut the wait
        short (the job's cancel, its timeout), or None."""
        end = None if seconds is None else self._clock.monotonic() + seconds
        while True:
            if self._cancel.is_set():
                return StepState.CANCELLED
            now = self._clock.monotonic()
            if self._deadline is not None and now >= self._deadline:
                return StepState.TIMED_OUT
            if (end is not None and now >= end) or (until is not None and until.is_set()):
                return None
            turn = _WAIT_TURN if end is None else min(end - now, _WAIT_TURN)
            (until or self._cancel).wait(turn)

    def _cut(self, step_id: str) -> None:
        with self._lock:
            if step_id not in self._timed_out:
                self._timed_out.append(step_id)

    def _record(
        self, step_id: str, *, drop: tuple[str, ...] = (), publish: bool = True, **fields: Any
    ) -> None:
        """Update a step's entry with ``fields``, the fields named in ``drop`` taken out."""
        with self._lock:
            record = self._records[step_id]
            for key in drop:
                record.pop(key, None)
            record.update(fields)
            if publish:
                self._on_change({key: dict(value) for key, value in self._records.items()})

    def _publish(self) -> None:
        with self._lock:
            self._on_change({key: dict(value) for key, value in self._records.items()})

    def _result(self, results: Mapping[str, ExecResult], unrun: list[str]) -> ExecResult:
        if self._cancel.is_set() or any(r.cancelled for r in results.values()):
            return ExecResult(exit_code=None, error="cancelled", cancelled=True)
        if any(result.interrupted for result in results.values()):
            return ExecResult(exit_code=None, error="interrupted while it ran", interrupted=True)
        if self._timed_out or unrun:  # only the timeout is left to leave steps out
            # As a job without steps that runs out of time: timed out, no exit code.
            said = [f"cut off: {', '.join(self._timed_out)}"] if self._timed_out else []
            said += [f"not run: {', '.join(unrun)}"] if unrun else []
            error = f"timed out after {self._timeout_words()} ({'; '.join(said)})"
            return ExecResult(exit_code=None, error=error, timed_out=True)
        if self._scheduler.outcome() == "succeeded":
            return ExecResult(exit_code=0)
        failed = [
            step_id
            for step_id, result in results.items()
            if not result.succeeded and not self._scheduler.step(step_id).get("continue_on_error")
        ]
        first = results[failed[0]] if failed else None
        error = f"step {failed[0]} failed: {first.failure}" if first else "steps failed"
        if len(failed) > 1:
            error += f" (and {len(failed) - 1} more step(s))"
        # Retryable only if every step that failed the job was: a retry reruns them all.
        retryable = bool(failed) and all(results[step_id].retryable for step_id in failed)
        return ExecResult(
            exit_code=first.exit_code if first else None, error=error, retryable=retryable
        )


def _recorded_states(previous: Mapping[str, Any]) -> dict[str, str]:
    """Per step, its state as status.json kept it; a step a cancel cut off counts as not run
    (``cancelled: true`` beside ``failed``: how spoold recorded one before ``cancelled``)."""
    states: dict[str, str] = {}
    for step_id, record in previous.items():
        if isinstance(record, Mapping) and isinstance(record.get("state"), str):
            cut_off = record.get("cancelled") is True
            states[str(step_id)] = StepState.PENDING.value if cut_off else record["state"]
    return states
