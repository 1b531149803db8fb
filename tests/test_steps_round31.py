"""A job's steps against the config's ``limits.executors`` (round 31), and its steps shown from
the job's acceptance, before its attempt's steps start.

The limit: within one job, never more steps of one executor at once than the config allows.
Each step's command writes when it began and ended (nanoseconds); it holds on until the test
lets it go (a file), and the test lets a step go only once it has begun, so that steps
allowed to overlap would be seen doing so. No sleep stands in for an order.
"""

from __future__ import annotations

import io
import itertools
import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from spoold.executors.base import ExecResult

from spoold.core.clock import SystemClock
from spoold.core.job import JobSpec
from spoold.core.joblog import JobLog
from spoold.face.views import job_view, steps_before_start
from spoold.run.dag import StepScheduler
from spoold.run.steps import StepsRun
from tests.apiclient import Api, module_api
from tests.harness import run_cli, wait_for
from tests.test_job_semantics import Parts

BOUND = 30.0  # a ceiling for what must happen, not a measurement
# A step's command waits for its go file at most this many times 10 ms: bounded, never a timing.
_TURNS = 3000


# -- 1. limits.executors within a job ---------------------------------------------------------


def test_ready_passes_over_a_step_whose_executor_is_full_for_one_of_another() -> None:
    steps = [{"id": s} for s in ("d1", "d2", "l1", "d3")]
    kinds = {"d1": "docker", "d2": "docker", "l1": "local", "d3": "docker"}
    scheduler = StepScheduler(steps)
    assert scheduler.ready(4, caps={"docker": 1}, kinds=kinds) == ["d1", "l1"]
    scheduler.started("d1")
    assert scheduler.ready(4, caps={"docker": 1}, kinds=kinds) == ["l1"]
    assert scheduler.ready(4, caps={"docker": 2}, kinds=kinds) == ["d2", "l1"]
    assert scheduler.ready(2, caps={"docker": 2}, kinds=kinds) == ["d2"]  # workers still bound
    scheduler.finished("d1", True)
    assert scheduler.ready(4, caps={"docker": 1}, kinds=kinds) == ["d2", "l1"]
    with pytest.raises(ValueError, match="caps must be at least 1"):
        scheduler.ready(4, caps={"docker": 0}, kinds=kinds)


def _held_step(step_id: str, marks: Path, *needs: str, **fields: Any) -> dict[str, Any]:
    """A step that writes its start, waits for ``marks/go-<id>``, writes its end."""
    stamp = f"{marks}/{step_id}"
    commands = (
        f'date +%s%N > "{stamp}.began"; i=0; '
        f'while [ ! -e "{marks}/go-{step_id}" ] && [ $i -lt {_TURNS} ]; do sleep 0.01; i=$((i+1)); '
        f'done; date +%s%N > "{stamp}.ended"'
    )
    return {"id": step_id, "needs": list(needs), "product": {"commands": commands}, **fields}


def _marks(tmp_path: Path) -> Path:
    """Where the steps write their times: theirs to write, as the job's user."""
    marks = tmp_path / "marks"
    marks.mkdir()
    marks.chmod(0o1777)
    return marks


def _release_one_at_a_time(marks: Path, step_ids: list[str]) -> list[str]:
    """Let these steps go as they begin, each once the one before has ended; the order they
    began in."""
    order: list[str] = []
    for _ in step_ids:
        began = wait_for(
            lambda: [s for s in step_ids if s not in order and (marks / f"{s}.began").exists()],
            bound=BOUND,
            what="a step to begin",
        )
        step_id = began[0]
        order.append(step_id)
        (marks / f"go-{step_id}").touch()
        wait_for((marks / f"{step_id}.ended").exists, bound=BOUND, what=f"{step_id} to end")
    return order


def _spans(marks: Path, step_ids: list[str]) -> list[tuple[int, int, str]]:
    return sorted(
        (int((marks / f"{s}.began").read_text()), int((marks / f"{s}.ended").read_text()), s)
        for s in step_ids
    )


def _assert_no_overlap(spans: list[tuple[int, int, str]]) -> None:
    for (_, ended, first), (began, _, second) in itertools.pairwise(spans):
        assert ended <= began, f"steps {first} and {second} ran at once: {spans}"


def _shell_unit(step_id: str, spec: JobSpec, log: JobLog) -> ExecResult:
    """The step's commands in a shell, as the local executor runs them (without its
    supervisor: this is the steps' scheduling under test)."""
    done = subprocess.run(
        ["sh", "-c", spec.document["product"]["commands"]], check=False, timeout=BOUND
    )
    return ExecResult(exit_code=done.returncode)


def test_steps_run_holds_steps_of_a_limited_executor_to_its_limit(tmp_path: Path) -> None:
    marks = _marks(tmp_path)
    steps = [_held_step(s, marks) for s in ("a", "b", "c")]
    steps.append({**_held_step("elsewhere", marks), "executor": "docker"})
    spec = JobSpec.from_document({"executor": "local", "steps": steps}, "lim")
    seen: list[dict[str, Any]] = []
    run = StepsRun(
        spec, previous={}, run_unit=_shell_unit, log=JobLog(io.BytesIO(), SystemClock()),
        clock=SystemClock(), cancel=threading.Event(), parallel=8,
        executor_limits={"local": 1}, on_change=seen.append, draw=lambda: 0.0,
    )  # fmt: skip
    outcome: list[ExecResult] = []
    runner = threading.Thread(target=lambda: outcome.append(run.run()), daemon=True)
    runner.start()
    # The step of another executor is not held back by the local one that runs.
    wait_for((marks / "elsewhere.began").exists, bound=BOUND, what="the docker step to begin")
    (marks / "go-elsewhere").touch()
    order = _release_one_at_a_time(marks, ["a", "b", "c"])
    runner.join(BOUND)
    assert outcome and outcome[0].succeeded, outcome
    assert sorted(order) == ["a", "b", "c"]
    _assert_no_overlap(_spans(marks, order))
    # Whenever a local step ran, the other local steps not yet run said pending.
    for records in seen:
        running = [s for s in "abc" if records[s]["state"] == "running"]
        assert len(running) <= 1, records


def test_a_jobs_local_steps_run_one_at_a_time_under_limits_executors_local_1(
    tmp_path: Path,
) -> None:
    marks = _marks(tmp_path)
    parts = Parts(tmp_path, clock=SystemClock(), executor_limits={"local": 1}, workers=4)
    document = {"job_id": "one-by-one", "executor": "local",
                "steps": [_held_step(s, marks) for s in ("a", "b", "c")]}  # fmt: skip
    job_id = parts.submit(document)
    ended: list[tuple[Any, dict[str, Any]]] = []
    runner = threading.Thread(target=lambda: ended.append(parts.attempt(job_id)), daemon=True)
    runner.start()
    wait_for(lambda: list(marks.glob("*.began")), bound=BOUND, what="a step to begin")
    # While one runs, the others wait, and their entries say pending.
    running = parts.spool.jobs.find(job_id)
    assert running is not None
    status = parts.spool.jobs.read_status(running)
    states = sorted(entry["state"] for entry in status["steps"].values())
    order = _release_one_at_a_time(marks, ["a", "b", "c"])
    runner.join(BOUND)
    assert ended and ended[0][1]["state"] == "succeeded", ended
    _assert_no_overlap(_spans(marks, order))
    assert states == ["pending", "pending", "running"], status["steps"]


# -- 2. steps shown from acceptance ----------------------------------------------------------


def _steps_document(job_id: str) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "executor": "local",
        "steps": [
            {"id": "fetch", "product": {"commands": "true"}},
            {"id": "lint", "product": {"commands": "true"}, "continue_on_error": True},
            {"id": "build", "needs": ["fetch", "lint"], "product": {"commands": "true"}},
        ],
    }


EXPECTED_PENDING = {
    "fetch": {"state": "pending", "continue_on_error": False, "needs": []},
    "lint": {"state": "pending", "continue_on_error": True, "needs": []},
    "build": {"state": "pending", "continue_on_error": False, "needs": ["fetch", "lint"]},
}


def test_a_pending_job_shows_its_steps_pending_with_their_needs(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    job_id = parts.submit(_steps_document("waiting"))
    job = parts.spool.jobs.find(job_id)
    assert job is not None and job.directory == "pending"
    status = parts.spool.jobs.read_status(job)
    assert not status.get("steps")  # status.json is as it was: the view derives them
    assert job_view(parts.spool, job, status)["steps"] == EXPECTED_PENDING
    shown = run_cli(parts.spool.root, "status", job_id)
    assert shown.returncode == 0, shown.stderr
    lines = [line for line in shown.stdout.splitlines() if line.startswith("step ")]
    assert lines == [
        "step fetch:      pending",
        "step lint:       pending",
        "step build:      pending, needs fetch, lint",
    ], shown.stdout


def test_a_job_waiting_for_a_retry_before_its_steps_started_shows_them_pending(
    tmp_path: Path,
) -> None:
    """Its attempt failed before the steps started (a secret that is not there): status.json
    has no step entries, and the job waits in pending/ for its next attempt."""
    parts = Parts(tmp_path, secrets_dir=tmp_path / "secrets")
    (tmp_path / "secrets").mkdir(mode=0o700)
    document = {**_steps_document("again"), "retries": 1,
                "variables": {"TOKEN": "${secret:missing}"}}  # fmt: skip
    job, status = parts.attempt(parts.submit(document))
    assert job.directory == "pending" and not status.get("steps"), status
    assert job_view(parts.spool, job, status)["steps"] == EXPECTED_PENDING
    shown = run_cli(parts.spool.root, "status", "again")
    assert "step build:      pending, needs fetch, lint" in shown.stdout, shown.stdout


def test_a_job_that_ended_before_its_steps_started_shows_them_not_run() -> None:
    entries = steps_before_start(_steps_document("x")["steps"], ended=True)
    assert {s: (e["state"], e["error"]) for s, e in entries.items()} == dict.fromkeys(
        ("fetch", "lint", "build"),
        ("skipped", "not run: the attempt ended before its steps started"),
    )
    assert steps_before_start("not a list") == {}
    assert steps_before_start([{"no": "id"}, "x", {"id": "a", "needs": "b"}]) == {
        "a": {"state": "pending", "continue_on_error": False, "needs": []}
    }


# -- the API's job and ``status --json``: one representation -----------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    yield from module_api(tmp_path_factory, "round31")


@pytest.mark.daemon
def test_the_api_and_status_json_show_a_pending_jobs_steps(api: Api, tmp_path: Path) -> None:
    release = tmp_path / "release"
    hold = {"job_id": "r31-holder", "executor": "local", "concurrency": {"key": "r31"},
            "product": {"commands": f'i=0; while [ ! -e "{release}" ] && [ $i -lt {_TURNS} ]; '
                                    "do sleep 0.01; i=$((i+1)); done"}}  # fmt: skip
    try:
        assert api.submit(yaml.safe_dump(hold)).status_code == 201
        wait_for((api.spool / "running" / "r31-holder").exists, bound=BOUND, what="the holder")
        waiting = {**_steps_document("r31-waits"), "concurrency": {"key": "r31"}}
        answer = api.submit(yaml.safe_dump(waiting))
        assert answer.status_code == 201, answer.text
        job = api.call("GET", "/api/v1/jobs/r31-waits", token="read")
        assert job.status_code == 200, job.text
        assert job.json()["state"] == "pending"
        assert (api.spool / "pending" / "r31-waits").exists()
        assert job.json()["steps"] == EXPECTED_PENDING, job.json()
        shown = run_cli(api.spool, "status", "--json", "r31-waits")
        assert json.loads(shown.stdout)["steps"] == EXPECTED_PENDING
    finally:
        release.touch()
