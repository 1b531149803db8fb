"""Which steps of a job may start, given what has happened so far: pure, no I/O, no clock.

A job's ``steps:`` form a DAG through ``needs:`` (SPEC section 3). ``plan()`` lays it out in
waves (``spoold validate --plan``); ``StepScheduler`` is what a worker asks, event by event, which
steps may start now; ``carried_over`` is what a retry or an adoption keeps of what was recorded.
A step starts once every step it needs has succeeded, or has failed with
``continue_on_error: true``. A step that fails without it fails the job, and every step that needs
it, directly or not, is skipped; the steps that do not depend on it still run.

Steps are expected to be validated already (``spoold.intake.validation``), but nothing here loops forever
or crashes on a list that is not: it raises ``InvalidSteps`` (a ``ValueError``) naming the problem.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from spoold.core.errors import SpooldError

__all__ = [
    "InvalidStepEvent",
    "InvalidSteps",
    "StepScheduler",
    "StepState",
    "carried_over",
    "plan",
    "plan_text",
]


class InvalidSteps(SpooldError, ValueError):
    """A steps list that is no DAG (missing or duplicate id, unknown need, cycle), or bad states."""


class InvalidStepEvent(SpooldError, ValueError):
    """A step event the scheduler cannot accept, such as finishing a step that never started."""


class StepState(enum.StrEnum):
    """A step's state, as kept per step in status.json.

    The scheduler's own are the first five. ``cancelled`` and ``timed_out`` are how a worker
    records a step the attempt cut off while it ran or waited for its next try (a cancel or
    spoold's stop; the job's ``timeout``): no end of the step's own, so to a scheduler resumed
    from them (``from_states``) it is pending, and it runs again.
    """

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"


def _phrase(state: StepState) -> str:
    """How a step's state reads after "it": ``succeeded``, ``failed``, ``is running``."""
    return state.value if state in (StepState.SUCCEEDED, StepState.FAILED) else f"is {state.value}"


@dataclass(frozen=True)
class _Graph:
    """A checked steps list: ids in file order, what each needs, and what needs each."""

    steps: dict[str, Mapping[str, Any]]
    index: dict[str, int]
    needs: dict[str, tuple[str, ...]]
    dependents: dict[str, tuple[str, ...]]
    tolerant: frozenset[str]  # continue_on_error: true
    waves: tuple[tuple[str, ...], ...]


def _read_graph(steps: Sequence[Mapping[str, Any]]) -> _Graph:
    """The steps as a graph, or InvalidSteps naming the first problem found."""
    given: object = steps  # unvalidated, it may be anything
    if isinstance(given, str | bytes) or not isinstance(given, Sequence):
        raise InvalidSteps(f"steps must be a list, not {type(given).__name__}")
    by_id: dict[str, Mapping[str, Any]] = {}
    index: dict[str, int] = {}
    needs: dict[str, tuple[str, ...]] = {}
    tolerant: set[str] = set()
    for i, step in enumerate(given):
        if not isinstance(step, Mapping):
            raise InvalidSteps(f"steps[{i}] must be a mapping, not {type(step).__name__}")
        step_id = step.get("id")
        if not isinstance(step_id, str) or not step_id:
            raise InvalidSteps(f"steps[{i}] has no id (a non-empty string)")
        if step_id in index:
            raise InvalidSteps(f"duplicate step id '{step_id}' (steps[{index[step_id]}] and [{i}])")
        listed = step.get("needs") or []
        if not isinstance(listed, list) or not all(isinstance(need, str) for need in listed):
            raise InvalidSteps(f"step '{step_id}': needs must be a list of step ids")
        continue_on_error = step.get("continue_on_error", False)
        if not isinstance(continue_on_error, bool):
            raise InvalidSteps(f"step '{step_id}': continue_on_error must be true or false")
        by_id[step_id], index[step_id] = step, i
        needs[step_id] = tuple(dict.fromkeys(listed))
        if continue_on_error:
            tolerant.add(step_id)
    dependents: dict[str, list[str]] = {step_id: [] for step_id in index}
    for step_id, its_needs in needs.items():
        for need in its_needs:
            if need not in index:
                raise InvalidSteps(f"step '{step_id}' needs unknown step '{need}'")
            dependents[need].append(step_id)
    return _Graph(
        steps=by_id,
        index=index,
        needs=needs,
        dependents={step_id: tuple(ids) for step_id, ids in dependents.items()},
        tolerant=frozenset(tolerant),
        waves=_waves(index, needs, dependents),
    )


def _waves(
    index: Mapping[str, int],
    needs: Mapping[str, tuple[str, ...]],
    dependents: Mapping[str, list[str]],
) -> tuple[tuple[str, ...], ...]:
    """Kahn's layering: each wave the steps whose needs are all in earlier waves, in file order."""
    unplaced = {step_id: len(needs[step_id]) for step_id in index}
    wave = [step_id for step_id in index if not unplaced[step_id]]
    waves: list[tuple[str, ...]] = []
    while wave:
        waves.append(tuple(wave))
        following = []
        for step_id in wave:
            del unplaced[step_id]
            for dependent in dependents[step_id]:
                unplaced[dependent] -= 1
                if not unplaced[dependent]:
                    following.append(dependent)
        wave = sorted(following, key=index.__getitem__)
    if unplaced:
        raise InvalidSteps("steps form a cycle: " + " -> ".join(_a_cycle(unplaced, needs)))
    return tuple(waves)


def _a_cycle(left: Iterable[str], needs: Mapping[str, tuple[str, ...]]) -> list[str]:
    """One cycle among steps Kahn's layering could not place, as ``[a, b, a]`` (a needs b)."""
    left = set(left)  # every one of these needs at least one other of them
    trail = [next(step_id for step_id in needs if step_id in left)]  # the first in file order
    seen = set(trail)
    while True:
        need = next(need for need in needs[trail[-1]] if need in left)
        trail.append(need)
        if need in seen:
            return trail[trail.index(need) :]
        seen.add(need)


def plan(steps: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """The step ids in waves: wave 0 needs nothing, wave n only steps of earlier waves."""
    return [list(wave) for wave in _read_graph(steps).waves]


def plan_text(steps: Sequence[Mapping[str, Any]]) -> str:
    """The plan as ``spoold validate --plan`` prints it: one line per wave, one per step's needs."""
    graph = _read_graph(steps)
    if not graph.waves:
        return "no steps"
    count, waves = len(graph.index), len(graph.waves)
    lines = [f"{count} step{'s' * (count != 1)} in {waves} wave{'s' * (waves != 1)}:"]
    for number, wave in enumerate(graph.waves, 1):
        parallel = " (run in parallel)" if len(wave) > 1 else ""
        lines.append(f"{number}. {', '.join(wave)}{parallel}")
        lines.extend(
            f"   {step_id} <- {', '.join(graph.needs[step_id])}"
            for step_id in wave
            if graph.needs[step_id]
        )
    return "\n".join(lines)


def carried_over(steps: Sequence[Mapping[str, Any]], recorded: Mapping[str, str]) -> dict[str, str]:
    """What a job's next run of its steps keeps of the states recorded before: for a retry, or
    for the same attempt adopted after a restart. The rest is pending: it runs (again).

    Kept: a step that succeeded, and one that failed with ``continue_on_error``, as the attempt
    before let its dependents go past it (``recorded`` names no such step whose end was not its
    own doing, a cancel: the caller leaves it out). A failure that failed the job, a step
    skipped behind one, one left running or never started run again. A step is kept only if
    every step it needs is kept too, so that records that cannot be (hand-edited, from a step
    cut off) lead to more runs, never to a list ``from_states`` refuses. Unknown ids and states
    are left out. In the steps' order: ``from_states(steps, carried_over(steps, recorded))``.
    """
    graph = _read_graph(steps)
    kept: dict[str, str] = {}
    for wave in graph.waves:  # every need of a step is in an earlier wave: already decided
        for step_id in wave:
            state = recorded.get(step_id)
            settled = state == StepState.SUCCEEDED.value or (
                state == StepState.FAILED.value and step_id in graph.tolerant
            )
            if settled and all(need in kept for need in graph.needs[step_id]):
                kept[step_id] = str(state)
    return {step_id: kept[step_id] for step_id in graph.index if step_id in kept}


class StepScheduler:
    """Which steps of one job may start now, told as they start and finish.

    A worker loops: ``ready()``, ``started(id)`` for those it starts, ``finished(id, ok)`` as each
    ends (after the step's own retries), until ``done()``; then ``outcome()`` is the job's result.
    A step the attempt cut off is told with ``cut_off(id)`` instead: once the attempt stops,
    no step starts, and ``outcome()`` is not asked.
    """

    def __init__(self, steps: Sequence[Mapping[str, Any]]) -> None:
        self._graph = _read_graph(steps)
        self._state = dict.fromkeys(self._graph.index, StepState.PENDING)
        self._unmet: dict[str, int] = {}  # per step, the needs not yet succeeded (or tolerated)
        self._startable: set[str] = set()  # pending, nothing unmet
        self._recount()

    @classmethod
    def from_states(
        cls, steps: Sequence[Mapping[str, Any]], states: Mapping[str, str]
    ) -> StepScheduler:
        """A scheduler resumed from the per-step states a status.json kept.

        A step recorded ``running`` was cut off when spoold died: it is pending again and runs
        again. ``skipped`` is worked out afresh from the failures, so a failed step reset to
        pending (a retry) lets the steps behind it run. Steps not named are pending.
        """
        scheduler = cls(steps)
        graph = scheduler._graph
        unknown = [step_id for step_id in states if step_id not in graph.index]
        if unknown:
            raise InvalidSteps(f"states name steps the job does not have: {', '.join(unknown)}")
        for step_id, recorded in states.items():
            try:
                state = StepState(recorded)
            except ValueError:
                expected = ", ".join(StepState)
                raise InvalidSteps(
                    f"step '{step_id}' has unknown state {recorded!r} (expected one of {expected})"
                ) from None
            if state in (StepState.SUCCEEDED, StepState.FAILED):
                scheduler._state[step_id] = state
        for step_id, state in scheduler._state.items():
            waiting = [need for need in graph.needs[step_id] if not scheduler._let_through(need)]
            if state is not StepState.PENDING and waiting:
                raise InvalidSteps(
                    f"step '{step_id}' is recorded {state.value} but the step it needs, "
                    f"'{waiting[0]}', {_phrase(scheduler._state[waiting[0]])}"
                )
        scheduler._recount()
        return scheduler

    def _let_through(self, step_id: str) -> bool:
        """Whether this step's dependents may go ahead: it succeeded or failed and may."""
        state = self._state[step_id]
        return state is StepState.SUCCEEDED or (
            state is StepState.FAILED and step_id in self._graph.tolerant
        )

    def _recount(self) -> None:
        """Unmet needs, skipped and startable steps worked out again from the states."""
        graph = self._graph
        for step_id, state in self._state.items():
            if state is StepState.FAILED and step_id not in graph.tolerant:
                self._skip_behind(step_id)
        self._unmet = {
            step_id: sum(not self._let_through(need) for need in needs)
            for step_id, needs in graph.needs.items()
        }
        self._startable = {
            step_id
            for step_id, state in self._state.items()
            if state is StepState.PENDING and not self._unmet[step_id]
        }

    def _skip_behind(self, failed: str) -> None:
        """Every pending step that needs ``failed``, directly or not, can never run."""
        seen, stack = {failed}, [failed]
        while stack:
            for dependent in self._graph.dependents[stack.pop()]:
                if dependent not in seen:
                    seen.add(dependent)
                    stack.append(dependent)
                    if self._state[dependent] is StepState.PENDING:
                        self._state[dependent] = StepState.SKIPPED
                        self._startable.discard(dependent)

    def _known(self, step_id: str) -> StepState:
        try:
            return self._state[step_id]
        except KeyError:
            raise InvalidStepEvent(f"the job has no step '{step_id}'") from None

    def step(self, step_id: str) -> Mapping[str, Any]:
        """The step's mapping as it was given, every field untouched."""
        self._known(step_id)
        return self._graph.steps[step_id]

    def ready(
        self,
        limit: int | None = None,
        *,
        caps: Mapping[str, int] | None = None,
        kinds: Mapping[str, str] | None = None,
    ) -> list[str]:
        """Steps that may start now, in file order; asking starts nothing.

        ``limit`` bounds how many steps of the job run at once: with ``limit`` 3 and 2 running,
        at most 1 is returned. None: no bound. ``caps`` bounds the steps of one kind (``kinds``:
        step id -> its kind, the executor) running at once: a step whose kind is full is passed
        over, and one after it of another kind may start.
        """
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1 (or None), not {limit}")
        caps, kinds = caps or {}, kinds or {}
        if low := {kind: cap for kind, cap in caps.items() if cap < 1}:
            raise ValueError(f"caps must be at least 1, not {low}")
        ids = sorted(self._startable, key=self._graph.index.__getitem__)
        running = self.running()
        room = None if limit is None else max(0, limit - len(running))
        busy = Counter(kinds.get(step_id) for step_id in running)
        chosen: list[str] = []
        for step_id in ids:
            if room is not None and len(chosen) >= room:
                break
            kind = kinds.get(step_id)
            cap = caps.get(kind) if kind is not None else None
            if cap is not None and busy[kind] >= cap:
                continue
            busy[kind] += 1
            chosen.append(step_id)
        return chosen

    def started(self, step_id: str) -> None:
        """``step_id`` is running now; it must have been ready."""
        state = self._known(step_id)
        if step_id not in self._startable:
            if state is StepState.PENDING:
                waiting = [n for n in self._graph.needs[step_id] if not self._let_through(n)]
                raise InvalidStepEvent(
                    f"step '{step_id}' cannot start yet: it waits for {', '.join(waiting)}"
                )
            raise InvalidStepEvent(f"step '{step_id}' cannot start: it {_phrase(state)}")
        self._startable.discard(step_id)
        self._state[step_id] = StepState.RUNNING

    def finished(self, step_id: str, succeeded: bool) -> None:
        """``step_id``, which was running, ended; its dependents may start, or are skipped."""
        state = self._known(step_id)
        if state is not StepState.RUNNING:
            raise InvalidStepEvent(f"step '{step_id}' cannot finish: it {_phrase(state)}")
        self._state[step_id] = StepState.SUCCEEDED if succeeded else StepState.FAILED
        if not self._let_through(step_id):
            self._skip_behind(step_id)
            return
        for dependent in self._graph.dependents[step_id]:
            self._unmet[dependent] -= 1
            if not self._unmet[dependent] and self._state[dependent] is StepState.PENDING:
                self._startable.add(dependent)

    def cut_off(self, step_id: str) -> None:
        """``step_id``, which was running, ended by no doing of its own (a cancel, the job's
        timeout, spoold's stop): pending again, as a next run of the steps finds it. Its
        dependents are not skipped: they wait for it, as they would for a step not yet run."""
        state = self._known(step_id)
        if state is not StepState.RUNNING:
            raise InvalidStepEvent(f"step '{step_id}' cannot be cut off: it {_phrase(state)}")
        self._state[step_id] = StepState.PENDING
        if not self._unmet[step_id]:
            self._startable.add(step_id)

    def running(self) -> list[str]:
        """Steps started and not finished, in file order."""
        return [s for s, state in self._state.items() if state is StepState.RUNNING]

    def skipped(self) -> list[str]:
        """Steps that can never run because a step they need failed, in file order."""
        return [s for s, state in self._state.items() if state is StepState.SKIPPED]

    def done(self) -> bool:
        """Nothing is running and nothing more can start."""
        return not self._startable and StepState.RUNNING not in self._state.values()

    def outcome(self) -> str:
        """The job's result, "succeeded" or "failed"; InvalidStepEvent while still open.

        "failed" as soon as a step failed without continue_on_error (the other steps may still
        run); "succeeded" once done() and every step succeeded or failed with continue_on_error.
        """
        if any(
            state is StepState.FAILED and step_id not in self._graph.tolerant
            for step_id, state in self._state.items()
        ):
            return StepState.FAILED.value
        if not self.done():
            raise InvalidStepEvent("the job's steps are not done yet: no outcome")
        return StepState.SUCCEEDED.value

    def states(self) -> dict[str, str]:
        """Per step, in file order: pending, running, succeeded, failed or skipped."""
        return {step_id: state.value for step_id, state in self._state.items()}
