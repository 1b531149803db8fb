"""Steps as a DAG: the plan in waves, and the scheduler a worker drives step by step."""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from spoold.core.errors import SpooldError
from spoold.run.dag import InvalidStepEvent, InvalidSteps, StepScheduler, plan, plan_text


def step(step_id: str, *needs: str, **fields: Any) -> dict[str, Any]:
    """A step as in a job file; ``needs`` only when it has some."""
    return {"id": step_id, **({"needs": list(needs)} if needs else {}), **fields}


@dataclass
class Run:
    """What a worker saw while driving a scheduler to the end."""

    started: list[str] = field(default_factory=list)
    rounds: list[list[str]] = field(default_factory=list)  # what each ready() call handed out
    most_at_once: int = 0


def drive(
    scheduler: StepScheduler,
    failing: Collection[str] = (),
    limit: int | None = None,
    max_rounds: int = 1000,
) -> Run:
    """Run as a worker would: start what is ready, finish the oldest running step, repeat."""
    run, running = Run(), scheduler.running()  # steps already started go on running
    for _ in range(max_rounds):
        if scheduler.done():
            assert not running
            return run
        ready = scheduler.ready(limit)
        run.rounds.append(ready)
        for step_id in ready:
            scheduler.started(step_id)
            running.append(step_id)
            run.started.append(step_id)
        assert running, f"not done, yet nothing runs or is ready: {scheduler.states()}"
        run.most_at_once = max(run.most_at_once, len(running))
        finishing = running.pop(0)
        scheduler.finished(finishing, succeeded=finishing not in failing)
    raise AssertionError(f"not done after {max_rounds} rounds: {scheduler.states()}")


def assert_needs_first(steps: list[dict[str, Any]], run: Run) -> None:
    """Every step started after all it needs had started (and so finished: see drive)."""
    position = {step_id: i for i, step_id in enumerate(run.started)}
    for s in steps:
        for need in s.get("needs", []):
            if s["id"] in position:
                assert position[need] < position[s["id"]], (s["id"], need)


def test_a_chain_runs_one_step_at_a_time_in_order() -> None:
    steps = [step("c", "b"), step("a"), step("b", "a")]
    scheduler = StepScheduler(steps)
    run = drive(scheduler)
    assert run.started == ["a", "b", "c"]
    assert run.most_at_once == 1
    assert scheduler.outcome() == "succeeded"
    assert set(scheduler.states().values()) == {"succeeded"}


def test_a_diamond_runs_its_middle_in_parallel_and_joins() -> None:
    steps = [step("a"), step("b", "a"), step("c", "a"), step("d", "b", "c")]
    scheduler = StepScheduler(steps)
    assert scheduler.ready() == ["a"]
    scheduler.started("a")
    assert scheduler.ready() == []
    scheduler.finished("a", succeeded=True)
    assert scheduler.ready() == ["b", "c"]
    scheduler.started("b")
    scheduler.started("c")
    scheduler.finished("c", succeeded=True)
    assert scheduler.ready() == []  # d still waits for b
    assert not scheduler.done()
    scheduler.finished("b", succeeded=True)
    assert scheduler.ready() == ["d"]
    scheduler.started("d")
    scheduler.finished("d", succeeded=True)
    assert scheduler.done()
    assert scheduler.outcome() == "succeeded"


def test_independent_branches_start_together() -> None:
    steps = [step("x1"), step("y1"), step("x2", "x1"), step("y2", "y1")]
    scheduler = StepScheduler(steps)
    run = drive(scheduler)
    assert run.rounds[0] == ["x1", "y1"]
    assert sorted(run.started) == ["x1", "x2", "y1", "y2"]
    assert run.most_at_once == 2
    assert scheduler.outcome() == "succeeded"


def twenty_steps() -> list[dict[str, Any]]:
    """Twenty steps: a diamond a1 -> a2, a3 -> a4 on a chain, and branches that share nothing."""
    return [
        step("a1"),
        step("a2", "a1"),
        step("a3", "a1"),  # fails
        step("a4", "a2", "a3"),
        step("a5", "a4"),
        step("a6", "a5"),
        step("b1"),
        step("b2", "b1"),
        step("b3", "b2"),
        step("b4", "b3"),
        step("c1"),
        step("c2"),
        step("c3", "c1", "c2"),
        step("c4", "c3", "a2"),  # needs a2, which succeeds beside the failure
        step("d1", "a4", "b4"),  # behind the failure through a4
        step("e1", "b4"),
        step("e2", "e1", "c4"),
        step("f1"),
        step("f2", "a1"),
        step("f3", "a5"),
    ]


def test_a_failure_in_the_middle_skips_what_needs_it_and_runs_the_rest() -> None:
    steps = twenty_steps()
    assert len(steps) == 20
    scheduler = StepScheduler(steps)
    run = drive(scheduler, failing={"a3"})

    behind = ["a4", "a5", "a6", "d1", "f3"]
    assert scheduler.skipped() == behind
    assert sorted(run.started) == sorted(s["id"] for s in steps if s["id"] not in behind)
    assert len(run.started) == len(set(run.started)) == 15
    assert_needs_first(steps, run)
    assert scheduler.outcome() == "failed"
    states = scheduler.states()
    assert states["a3"] == "failed"
    assert {s for s, state in states.items() if state == "succeeded"} == (set(run.started) - {"a3"})
    # The independent branches ran to their ends, one of them through a step beside the failure.
    for end in ("a2", "b4", "c4", "e2", "f1", "f2"):
        assert states[end] == "succeeded"


def test_steps_behind_a_failure_are_skipped_at_once_and_the_outcome_is_known() -> None:
    scheduler = StepScheduler(twenty_steps())
    scheduler.started("a1")
    scheduler.started("b1")
    scheduler.finished("a1", succeeded=True)
    scheduler.started("a3")
    scheduler.finished("a3", succeeded=False)
    assert scheduler.skipped() == ["a4", "a5", "a6", "d1", "f3"]
    assert scheduler.outcome() == "failed"  # while b1 still runs
    assert not scheduler.done()
    assert "a4" not in scheduler.ready()
    with pytest.raises(InvalidStepEvent, match="'a4' cannot start: it is skipped"):
        scheduler.started("a4")


def test_continue_on_error_lets_dependents_run_and_the_job_succeed() -> None:
    steps = [step("lint", continue_on_error=True), step("build", "lint"), step("ship", "build")]
    scheduler = StepScheduler(steps)
    run = drive(scheduler, failing={"lint"})
    assert run.started == ["lint", "build", "ship"]
    assert scheduler.skipped() == []
    assert scheduler.states() == {"lint": "failed", "build": "succeeded", "ship": "succeeded"}
    assert scheduler.outcome() == "succeeded"


def test_continue_on_error_on_the_failed_step_only_counts_for_that_step() -> None:
    steps = [
        step("a", continue_on_error=True),
        step("b", "a"),  # fails, and has no continue_on_error
        step("c", "b", continue_on_error=True),  # would tolerate its own failure, not b's
    ]
    scheduler = StepScheduler(steps)
    drive(scheduler, failing={"a", "b"})
    assert scheduler.states() == {"a": "failed", "b": "failed", "c": "skipped"}
    assert scheduler.outcome() == "failed"


def test_the_limit_bounds_how_many_run_at_once() -> None:
    steps = [step(f"s{i}") for i in range(5)] + [step("last", *(f"s{i}" for i in range(5)))]
    scheduler = StepScheduler(steps)
    assert scheduler.ready(limit=2) == ["s0", "s1"]
    assert scheduler.ready() == ["s0", "s1", "s2", "s3", "s4"]
    scheduler.started("s0")
    assert scheduler.ready(limit=2) == ["s1"]
    scheduler.started("s1")
    assert scheduler.ready(limit=2) == []
    assert scheduler.ready(limit=3) == ["s2"]
    run = drive(scheduler, limit=2)  # s0 and s1 are still running
    assert run.most_at_once == 2
    assert run.started == ["s2", "s3", "s4", "last"]
    assert run.rounds[:3] == [[], ["s2"], ["s3"]]
    assert scheduler.outcome() == "succeeded"
    with pytest.raises(ValueError, match="limit"):
        scheduler.ready(limit=0)


def test_ready_starts_nothing() -> None:
    scheduler = StepScheduler([step("a"), step("b")])
    assert scheduler.ready() == scheduler.ready() == ["a", "b"]
    assert scheduler.states() == {"a": "pending", "b": "pending"}
    assert scheduler.running() == []


def test_events_out_of_order_are_refused() -> None:
    scheduler = StepScheduler([step("a"), step("b", "a")])
    with pytest.raises(InvalidStepEvent, match="'b' cannot start yet: it waits for a"):
        scheduler.started("b")
    with pytest.raises(InvalidStepEvent, match="'a' cannot finish: it is pending"):
        scheduler.finished("a", succeeded=True)
    with pytest.raises(InvalidStepEvent, match="no step 'z'"):
        scheduler.started("z")
    scheduler.started("a")
    with pytest.raises(InvalidStepEvent, match="'a' cannot start: it is running"):
        scheduler.started("a")
    with pytest.raises(InvalidStepEvent, match="not done yet"):
        scheduler.outcome()
    scheduler.finished("a", succeeded=True)
    with pytest.raises(InvalidStepEvent, match=r"'a' cannot finish: it succeeded$"):
        scheduler.finished("a", succeeded=True)  # never "it is succeeded"


def test_other_fields_pass_through_untouched() -> None:
    build = step("build", executor="local", product={"commands": ["make"]}, timeout="10m")
    scheduler = StepScheduler([build])
    assert scheduler.step("build") is build
    assert build == {
        "id": "build",
        "executor": "local",
        "product": {"commands": ["make"]},
        "timeout": "10m",
    }


def test_no_steps_is_done_and_succeeded() -> None:
    scheduler = StepScheduler([])
    assert scheduler.done()
    assert scheduler.outcome() == "succeeded"
    assert plan([]) == []
    assert plan_text([]) == "no steps"


def test_plan_waves_in_file_order() -> None:
    steps = [
        step("test", "build"),
        step("lint"),
        step("fetch"),
        step("build", "fetch", "lint"),
        step("docs", "fetch"),
        step("ship", "test", "docs"),
    ]
    assert plan(steps) == [["lint", "fetch"], ["build", "docs"], ["test"], ["ship"]]


def test_plan_text() -> None:
    steps = [
        step("fetch"),
        step("lint"),
        step("build", "fetch", "lint"),
        step("test", "build"),
    ]
    assert plan_text(steps) == (
        "4 steps in 3 waves:\n"
        "1. fetch, lint (run in parallel)\n"
        "2. build\n"
        "   build <- fetch, lint\n"
        "3. test\n"
        "   test <- build"
    )


def test_rebuilt_from_states_a_step_left_running_runs_again() -> None:
    steps = [step("a"), step("b", "a"), step("c", "b"), step("d")]
    recorded = {"a": "succeeded", "b": "running", "d": "succeeded"}
    scheduler = StepScheduler.from_states(steps, recorded)
    assert scheduler.states() == {
        "a": "succeeded",
        "b": "pending",
        "c": "pending",
        "d": "succeeded",
    }
    assert scheduler.ready() == ["b"]
    run = drive(scheduler)
    assert run.started == ["b", "c"]  # a and d are not run twice
    assert scheduler.outcome() == "succeeded"


def test_rebuilt_from_states_failures_still_skip_and_fail_the_job() -> None:
    steps = twenty_steps()
    recorded = {"a1": "succeeded", "a3": "failed", "a4": "skipped", "b1": "running"}
    scheduler = StepScheduler.from_states(steps, recorded)
    assert scheduler.skipped() == ["a4", "a5", "a6", "d1", "f3"]
    assert scheduler.outcome() == "failed"
    run = drive(scheduler)
    assert "b1" in run.started
    assert not {"a1", "a3"} & set(run.started)
    assert scheduler.states()["e2"] == "succeeded"


def test_rebuilt_from_states_a_failed_step_reset_to_pending_lets_the_rest_run() -> None:
    steps = [step("a"), step("b", "a"), step("c", "b")]
    scheduler = StepScheduler.from_states(steps, {"a": "pending", "b": "skipped", "c": "skipped"})
    run = drive(scheduler)
    assert run.started == ["a", "b", "c"]
    assert scheduler.outcome() == "succeeded"


@pytest.mark.parametrize(
    ("recorded", "message"),
    [
        ({"a": "finished"}, "step 'a' has unknown state 'finished'"),
        ({"zz": "pending"}, "steps the job does not have: zz"),
        ({"b": "succeeded"}, "'b' is recorded succeeded but the step it needs, 'a', is pending"),
        ({"a": "failed", "b": "failed"}, "'b' is recorded failed but .* 'a', failed"),
    ],
)
def test_states_that_cannot_be_are_refused(recorded: Mapping[str, str], message: str) -> None:
    with pytest.raises(InvalidSteps, match=message):
        StepScheduler.from_states([step("a"), step("b", "a")], recorded)


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([step("a", "b"), step("b", "c"), step("c", "a")], r"cycle: a -> b -> c -> a$"),
        ([step("x"), step("a", "a")], r"cycle: a -> a$"),
        ([step("r"), step("a", "r", "b"), step("b", "a"), step("z", "b")], r"a -> b -> a$"),
        ([step("a"), step("b", "a", "nope")], "step 'b' needs unknown step 'nope'"),
        ([step("a"), step("a")], r"duplicate step id 'a' \(steps\[0\] and \[1\]\)"),
        ([{"needs": ["a"]}], r"steps\[0\] has no id"),
        (["a"], r"steps\[0\] must be a mapping"),
        ([{"id": "a", "needs": "b"}], "'a': needs must be a list"),
        ([step("a", continue_on_error="yes")], "continue_on_error must be true or false"),
        ("abc", "steps must be a list"),
    ],
)
def test_steps_that_are_no_dag_raise_value_error(steps: Any, message: str) -> None:
    for build in (plan, plan_text, StepScheduler):
        with pytest.raises(InvalidSteps, match=message) as caught:
            build(steps)
        assert isinstance(caught.value, ValueError)
        assert isinstance(caught.value, SpooldError)


def test_a_long_chain_neither_recurses_nor_crawls() -> None:
    steps = [step("s0")] + [step(f"s{i}", f"s{i - 1}") for i in range(1, 5000)]
    assert len(plan(steps)) == 5000
    run = drive(StepScheduler(steps), max_rounds=5001)
    assert len(run.started) == 5000
    cyclic = [*steps, step("loop", "s4999")]
    cyclic[0] = step("s0", "loop")
    with pytest.raises(InvalidSteps, match="cycle: s0 -> loop -> s4999 -> s4998"):
        plan(cyclic)


@pytest.mark.parametrize("seed", range(20))
def test_random_dags_run_every_step_after_its_needs(seed: int) -> None:
    rng = random.Random(seed)
    steps: list[dict[str, Any]] = []
    for i in range(rng.randint(1, 30)):
        needs = rng.sample([s["id"] for s in steps], k=min(i, rng.randint(0, 3)))
        steps.append(step(f"s{i}", *needs, continue_on_error=rng.random() < 0.2))
    rng.shuffle(steps)  # file order need not be topological
    failing = {s["id"] for s in steps if rng.random() < 0.15}
    scheduler = StepScheduler(steps)
    run = drive(scheduler, failing=failing, limit=rng.choice([None, 1, 2, 4]))
    assert_needs_first(steps, run)
    waves = {step_id: n for n, wave in enumerate(plan(steps)) for step_id in wave}
    for s in steps:
        assert all(waves[need] < waves[s["id"]] for need in s.get("needs", []))
    hard = {s["id"] for s in steps if s["id"] in failing and not s["continue_on_error"]}
    assert (scheduler.outcome() == "failed") == bool(hard & set(run.started))
    assert set(run.started) | set(scheduler.skipped()) == {s["id"] for s in steps}
