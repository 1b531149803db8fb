"""One attempt of a job with ``steps:``: each step once its needs succeeded, independent ones
in parallel, each with its own executor, timeout, retries, log section and status entry.

``spoold.run.dag`` decides what may start; this runs it. Steps share the job's work dir (a later
step uses what an earlier one built) and its cancel switch. A new attempt of the job, or the
same one adopted after a restart, keeps what the one before settled (``dag.carried_over``): the
steps that succeeded, and those that failed with ``continue_on_error`` on their own, as the job
went past them then; it runs the rest, a step cut off by a cancel among them.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any

from spoold.core.clock import Clock, rfc3339
from spoold.core.errors import JobDetached
from spoold.core.job import JobSpec
from spoold.core.joblog import JobLog
from spoold.core.units import format_duration
from spoold.executors.base import ExecResult
from spoold.run.dag import StepScheduler, StepState, carried_over

#: What runs one attempt of one step: (step id, its spec, its log section) -> result.
RunUnit = Callable[[str, JobSpec, JobLog], ExecResult]

# The job's own fields a step inherits unless it says otherwise.
_INHERITED = ("executor", "type", "timeout", "limits", "run_as")


def step_spec(job: JobSpec, step: Mapping[str, Any]) -> JobSpec:
    """A step as a spec of its own: the job's defaults, the step's fields over them."""
    document: dict[str, Any] = {key: job.document[key] for key in _INHERITED if key in job.document}
    document.update({key: value for key, value in step.items() if key not in ("id", "needs")})
    document["variables"] = {**job.document.get("variables", {}), **step.get("variables", {})}
    return JobSpec.from_document(document, job.job_id)


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
        on_change: Callable[[dict[str, Any]], None],
        draw: Callable[[], float],
    ) -> None:
        """``previous``: the status.json ``steps`` of the attempt before (or of this one, when
        it is adopted), if any."""
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
        self._on_change = on_change
        self._draw = draw  # the jitter of step retries
        self._lock = threading.Lock()  # records and on_change, from several step threads

    def run(self) -> ExecResult:
        """Run until no step can start any more; the result is the job attempt's."""
        finished: queue.SimpleQueue[tuple[str, ExecResult]] = queue.SimpleQueue()
        running = 0
        results: dict[str, ExecResult] = {}
        for step_id in self._scheduler.skipped():
            self._record(step_id, state=StepState.SKIPPED.value)
        detached = interrupted = False
        while True:
            if not (self._cancel.is_set() or detached or interrupted):
                for step_id in self._scheduler.ready(self._parallel):
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
            results[step_id] = result
            # Not the step's own end: nothing goes past it (the job's on_interrupt decides).
            interrupted = interrupted or result.interrupted
            self._scheduler.finished(step_id, result.succeeded)
            for skipped in self._scheduler.skipped():
                if self._records[skipped]["state"] != StepState.SKIPPED.value:
                    self._record(skipped, state=StepState.SKIPPED.value)
                    self._log.error(f"step {skipped} skipped: a step it needs failed")
        if detached:
            raise JobDetached("steps left running")
        return self._result(results)

    def _step(self, step_id: str, finished: queue.SimpleQueue[tuple[str, ExecResult]]) -> None:
        try:
            result = self._attempts(step_id)
        except JobDetached:
            result = ExecResult(exit_code=None, detached=True)
        except Exception as exc:  # a bug here must end the step, not hang the job
            self._log.error(f"step {step_id} failed inside spoold: {exc!r}")
            result = ExecResult(exit_code=None, error=f"internal error: {exc!r}")
        finished.put((step_id, result))

    def _attempts(self, step_id: str) -> ExecResult:
        step = self._scheduler.step(step_id)
        spec = step_spec(self._spec, step)
        log = self._log.section(step_id)
        number = 0
        while True:
            number += 1
            log.info(f"step {step_id} started (attempt {number} of {spec.retry.attempts})")
            self._record(step_id, state=StepState.RUNNING.value, attempts=number,
                         started_at=rfc3339(self._clock.now()), finished_at=None,
                         exit_code=None, error=None, drop=("cancelled",))  # fmt: skip
            result = self._run_unit(step_id, spec, log)
            if result.interrupted:  # not the step's doing: the job's on_interrupt decides
                return result
            failed = not result.succeeded and not result.cancelled
            if failed and spec.retry.should_retry(number, result.exit_code):
                wait = spec.retry.delay(number, self._draw)
                log.error(
                    f"step {step_id} failed ({result.failure}); retrying in {format_duration(wait)}"
                )
                if not self._cancel.wait(wait):
                    continue
            state = StepState.SUCCEEDED if result.succeeded else StepState.FAILED
            # A cancel is no end of the step's own: a retry runs it again, continue_on_error
            # or not (the job never went past it).
            cut_off: dict[str, Any] = {"cancelled": True} if result.cancelled else {}
            # Ended while no daemon watched (adopted): its end as recorded, not this one's.
            ended = result.ended_at or self._clock.now()
            self._record(step_id, state=state.value, finished_at=rfc3339(ended),
                         exit_code=result.exit_code, error=result.error, **cut_off)  # fmt: skip
            word = "succeeded" if result.succeeded else f"failed: {result.failure}"
            tolerated = not result.succeeded and step.get("continue_on_error")
            (log.info if result.succeeded or tolerated else log.error)(
                f"step {step_id} {word}" + (" (continue_on_error)" if tolerated else "")
            )
            return result

    def _record(self, step_id: str, *, drop: tuple[str, ...] = (), **fields: Any) -> None:
        """Update a step's entry with ``fields``, the fields named in ``drop`` taken out."""
        with self._lock:
            record = self._records[step_id]
            for key in drop:
                record.pop(key, None)
            record.update(fields)
            self._on_change({key: dict(value) for key, value in self._records.items()})

    def _result(self, results: Mapping[str, ExecResult]) -> ExecResult:
        if self._cancel.is_set() or any(r.cancelled for r in results.values()):
            return ExecResult(exit_code=None, error="cancelled", cancelled=True)
        if any(result.interrupted for result in results.values()):
            return ExecResult(exit_code=None, error="interrupted while it ran", interrupted=True)
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
    """Per step, its state as status.json kept it; a step a cancel cut off counts as not run."""
    states: dict[str, str] = {}
    for step_id, record in previous.items():
        if isinstance(record, Mapping) and isinstance(record.get("state"), str):
            cut_off = record.get("cancelled") is True
            states[str(step_id)] = StepState.PENDING.value if cut_off else record["state"]
    return states
