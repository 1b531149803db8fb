"""A job of steps run again: a retry (``retries:``, ``spoold retry``) or the same attempt
adopted after a restart keeps what the attempt before settled and runs the rest.

The rule: a step is kept when it succeeded, or when it failed with ``continue_on_error`` on its
own (not cut off by a cancel): the job went past it, as the attempt before did, so it is not
run again and the steps behind it that succeeded are kept too. Every other step runs (again):
a step that failed the job, one skipped behind it, one cancelled, cut off or never started. A
step is kept only if every step it needs is kept too, so what a retry runs is always a DAG the
scheduler can take, whatever the records say.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from spoold.run.dag import StepScheduler, carried_over
from tests.harness import (
    DaemonProcess,
    drop,
    job_log,
    run_cli,
    supervisors,
    wait_finished,
    wait_for,
    write_config,
)
from tests.test_job_semantics import Parts


def _step(step_id: str, commands: str, *needs: str, **fields: Any) -> dict[str, Any]:
    return {"id": step_id, "needs": list(needs), "product": {"commands": commands}, **fields}


def _counted(runs: Path, step_id: str, then: str = "true") -> str:
    """A step's commands: note the run in ``runs``, then ``then``."""
    return f"echo {step_id} >> {runs}; {then}"


def _ran(runs: Path) -> list[str]:
    return runs.read_text().split() if runs.exists() else []


def _states(status: dict[str, Any]) -> dict[str, str]:
    return {step_id: record["state"] for step_id, record in status["steps"].items()}


FAILS_FIRST = 'test "$SPOOLD_ATTEMPT" -gt 1 || exit 5'


def probe_steps(runs: Path) -> list[dict[str, Any]]:
    """The probe's job: b fails and may; c needs b; d needs c and fails its first attempt."""
    return [
        _step("b", _counted(runs, "b", "exit 4"), continue_on_error=True),
        _step("c", _counted(runs, "c", "echo C"), "b"),
        _step("d", _counted(runs, "d", FAILS_FIRST), "c"),
    ]


def check_probe_retried(status: dict[str, Any], runs: Path) -> None:
    """Attempt 2 ran d alone: b's tolerated failure and c, which ran past it, are kept."""
    assert status["state"] == "succeeded", status
    assert sorted(_ran(runs)) == ["b", "c", "d", "d"]
    assert _states(status) == {"b": "failed", "c": "succeeded", "d": "succeeded"}
    assert (status["steps"]["b"]["exit_code"], status["steps"]["b"]["continue_on_error"]) == (
        4,
        True,
    )
    assert [attempt["exit_code"] for attempt in status["attempts"]] == [5, 0]


# -- the rule, on the scheduler's states ---------------------------------------------------------


def _s(step_id: str, *needs: str, **fields: Any) -> dict[str, Any]:
    return {"id": step_id, "needs": list(needs), **fields}


def test_carried_over_keeps_successes_and_tolerated_failures() -> None:
    steps = [
        _s("b", continue_on_error=True),
        _s("c", "b"),
        _s("d", "c"),
        _s("a"),
        _s("s", "a"),
        _s("lone", continue_on_error=True),
        _s("r"),
    ]
    recorded = {"b": "failed", "c": "succeeded", "d": "failed", "a": "failed", "s": "skipped",
                "lone": "failed", "r": "running"}  # fmt: skip
    kept = carried_over(steps, recorded)
    assert kept == {"b": "failed", "c": "succeeded", "lone": "failed"}
    scheduler = StepScheduler.from_states(steps, kept)
    assert scheduler.ready() == ["d", "a", "r"]


@pytest.mark.parametrize(
    "recorded",
    [
        {"c": "succeeded"},  # what it needs left out
        {"b": "pending", "c": "succeeded"},
        {"b": "running", "c": "succeeded", "d": "succeeded"},
        {"b": "skipped", "c": "failed"},
        {"b": "no such state", "c": "succeeded", "zz": "succeeded"},
    ],
    ids=repr,
)
def test_carried_over_never_keeps_a_step_behind_one_that_runs_again(
    recorded: dict[str, str],
) -> None:
    """Records that cannot be (hand-edited, cut off half-written) lead to more runs, never to a
    scheduler that refuses them (``InvalidSteps``) and fails the attempt inside spoold."""
    steps = [_s("b", continue_on_error=True), _s("c", "b"), _s("d", "c")]
    kept = carried_over(steps, recorded)
    assert kept == {}
    assert StepScheduler.from_states(steps, kept).ready() == ["b"]


# -- retries of a job of steps, in-process ------------------------------------------------------


def test_a_retry_keeps_a_tolerated_failure_and_what_ran_past_it(tmp_path: Path) -> None:
    """The probe's job with ``retries: 1``: attempt 2 failed at once with ``InvalidSteps``."""
    parts = Parts(tmp_path)
    runs = tmp_path / "runs"
    document = {"job_id": "rs1", "executor": "local", "steps": probe_steps(runs),
                "retries": 1, "backoff": "1s"}  # fmt: skip
    job, status = parts.attempt(parts.submit(document))
    assert job.directory == "pending", job.log_path.read_text()
    assert _states(status) == {"b": "failed", "c": "succeeded", "d": "failed"}
    parts.clock.advance(1)
    job, status = parts.attempt("rs1")
    assert job.directory == "done", job.log_path.read_text()
    check_probe_retried(status, runs)
    assert "internal error" not in job.log_path.read_text()


def test_a_retry_runs_a_failed_step_and_the_steps_skipped_behind_it(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    runs = tmp_path / "runs"
    steps = [
        _step("a", _counted(runs, "a", FAILS_FIRST)),
        _step("s", _counted(runs, "s"), "a"),
        _step("t", _counted(runs, "t", "exit 3"), "s", continue_on_error=True),
        _step("u", _counted(runs, "u"), "t"),
        _step("lone", _counted(runs, "lone", "exit 2"), continue_on_error=True),
        _step("after", _counted(runs, "after"), "lone"),
    ]
    document = {"job_id": "skips", "executor": "local", "steps": steps,
                "retries": 1, "backoff": "1s"}  # fmt: skip
    job, status = parts.attempt(parts.submit(document))
    assert job.directory == "pending"
    assert _states(status) == {"a": "failed", "s": "skipped", "t": "skipped", "u": "skipped",
                               "lone": "failed", "after": "succeeded"}  # fmt: skip
    parts.clock.advance(1)
    job, status = parts.attempt("skips")
    assert job.directory == "done", job.log_path.read_text()
    assert _states(status) == {"a": "succeeded", "s": "succeeded", "t": "failed",
                               "u": "succeeded", "lone": "failed", "after": "succeeded"}  # fmt: skip
    # a twice; s, t and u once each (skipped the first time); lone and after kept.
    assert sorted(_ran(runs)) == ["a", "a", "after", "lone", "s", "t", "u"]


def test_a_retry_after_which_the_job_fails_again_keeps_the_same_steps(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    runs = tmp_path / "runs"
    steps = [
        _step("b", _counted(runs, "b", "exit 4"), continue_on_error=True),
        _step("c", _counted(runs, "c"), "b"),
        _step("d", _counted(runs, "d", "exit 5"), "c"),
    ]
    document = {"job_id": "twice", "executor": "local", "steps": steps,
                "retries": 2, "backoff": "1s"}  # fmt: skip
    parts.attempt(parts.submit(document))
    for _ in range(2):
        parts.clock.advance(10)
        job, status = parts.attempt("twice")
    assert job.directory == "failed", job.log_path.read_text()
    assert status["error"] == "step d failed: exit code 5"
    assert sorted(_ran(runs)) == ["b", "c", "d", "d", "d"]


# -- on the daemon: spoold retry, a restart, a cancel -------------------------------------------


@pytest.mark.daemon
def test_spoold_retry_of_the_probes_job_runs_only_the_step_that_failed_it(
    spool_dir: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    daemon = DaemonProcess(spool_dir, write_config(tmp_path / "c.yaml", spool_dir))
    try:
        daemon.start()
        drop(spool_dir, "rs1.yaml", {"job_id": "rs1", "executor": "local",
                                      "steps": probe_steps(runs)})  # fmt: skip
        directory, status = wait_finished(spool_dir, "rs1")
        assert (directory, status["error"]) == ("failed", "step d failed: exit code 5"), status
        result = run_cli(spool_dir, "retry", "rs1")
        assert result.returncode == 0, result.stderr
        directory, status = wait_finished(spool_dir, "rs1")
        assert directory == "done", (spool_dir / directory / "rs1" / "log").read_text()
        check_probe_retried(status, runs)
    finally:
        daemon.kill()


@pytest.mark.daemon
def test_a_job_adopted_after_a_restart_goes_on_past_a_tolerated_failure(
    spool_dir: Path, tmp_path: Path
) -> None:
    """The same attempt, adopted by the next daemon: b's tolerated failure and c are kept, d
    (under way) is attached to, not started again."""
    runs, mark = tmp_path / "runs", tmp_path / "go"
    wait = f"echo waiting; until [ -e {mark} ]; do sleep 0.05; done"
    steps = [
        _step("b", _counted(runs, "b", "exit 4"), continue_on_error=True),
        _step("c", _counted(runs, "c"), "b"),
        _step("d", _counted(runs, "d", wait), "c"),
    ]
    document = {"job_id": "adopted", "executor": "local", "on_interrupt": "requeue",
                "steps": steps}  # fmt: skip
    daemon = DaemonProcess(spool_dir, write_config(tmp_path / "c.yaml", spool_dir))
    try:
        daemon.start()
        drop(spool_dir, "adopted.yaml", document)
        wait_for(lambda: "d" in _ran(runs), what="step d to run")
        wait_for(lambda: supervisors(spool_dir), what="step d's supervisor")
        daemon.kill(leave_jobs=True)
        daemon.start()
        # Its adoption's line, not the job's id (in the log's first line already).
        wait_for(lambda: "(supervisor pid" in job_log(spool_dir, "adopted"),
                 what="the new daemon to adopt the job")  # fmt: skip
        mark.touch()
        directory, status = wait_finished(spool_dir, "adopted")
        log = (spool_dir / directory / "adopted" / "log").read_text()
        assert directory == "done", log
        assert _states(status) == {"b": "failed", "c": "succeeded", "d": "succeeded"}
        assert sorted(_ran(runs)) == ["b", "c", "d"], "no step ran twice"
        assert len(status["attempts"]) == 1 and "internal error" not in log
    finally:
        daemon.kill()


@pytest.mark.daemon
def test_a_tolerated_step_cut_off_by_a_cancel_runs_again_on_retry(
    spool_dir: Path, tmp_path: Path
) -> None:
    """A cancel is no failure of the step's own: the job did not go past it, so a retry runs it
    (and what needs it), where a tolerated failure of its own would be kept."""
    runs, mark = tmp_path / "runs", tmp_path / "go"
    wait = f"until [ -e {mark} ]; do sleep 0.05; done; exit 4"
    steps = [
        _step("b", _counted(runs, "b", wait), continue_on_error=True),
        _step("c", _counted(runs, "c"), "b"),
    ]
    daemon = DaemonProcess(spool_dir, write_config(tmp_path / "c.yaml", spool_dir))
    try:
        daemon.start()
        drop(spool_dir, "cut.yaml", {"job_id": "cut", "executor": "local", "steps": steps})
        wait_for(lambda: "b" in _ran(runs), what="step b to run")
        assert run_cli(spool_dir, "cancel", "cut").returncode == 0
        directory, status = wait_finished(spool_dir, "cut")
        assert (directory, status["state"]) == ("failed", "cancelled"), status
        assert _states(status) == {"b": "cancelled", "c": "skipped"}
        mark.touch()
        assert run_cli(spool_dir, "retry", "cut").returncode == 0
        directory, status = wait_finished(spool_dir, "cut")
        assert directory == "done", status
        assert _states(status) == {"b": "failed", "c": "succeeded"}
        assert status["steps"]["b"]["exit_code"] == 4
        assert sorted(_ran(runs)) == ["b", "b", "c"]
    finally:
        daemon.kill()
