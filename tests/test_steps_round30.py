"""A job's cancel and its timeout reach everything of its attempt: its hooks, its steps, the
waits between a step's tries; and every step of a job that ended says what became of it.

In-process (``Parts``): the attempt runs in a thread, the test cancels it as ``spoold cancel``
does (a request, then the worker's look), or moves the fake clock past the job's timeout.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spoold.core.spool import JobDir
from spoold.run.control import JobControl
from tests.harness import kill_processes_with, processes_with, sleep_command, wait_for
from tests.test_job_semantics import REPORT, Parts

BOUND = 30.0  # a ceiling for an attempt that must end, not a measurement


class Attempt:
    """One attempt of a job, run in a thread of its own so that the test can act meanwhile."""

    def __init__(self, parts: Parts, job_id: str) -> None:
        self.parts, self.job_id = parts, job_id
        self.outcome: tuple[JobDir, dict[str, Any]] | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.outcome = self.parts.attempt(self.job_id)

    def cancel(self) -> None:
        """``spoold cancel``: a request in the spool, which the worker takes at its next look."""
        JobControl(self.parts.spool, self.parts.clock, who="tester").cancel(self.job_id)
        assert self.parts.runner.check_cancels() == 1

    def ended(self) -> tuple[JobDir, dict[str, Any]]:
        self._thread.join(BOUND)
        assert not self._thread.is_alive(), "the attempt did not end"
        assert self.outcome is not None
        return self.outcome


@pytest.fixture
def sleeper(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(a sleep command, a word in its command line unique to this test)."""
    sleep, token = sleep_command(tmp_path, "spoold-r30")
    yield sleep, token
    kill_processes_with(token)


def _step(step_id: str, commands: str, *needs: str, **fields: Any) -> dict[str, Any]:
    return {"id": step_id, "needs": list(needs), "product": {"commands": commands}, **fields}


def _states(status: dict[str, Any]) -> dict[str, tuple[str, str | None]]:
    return {s: (r["state"], r.get("error")) for s, r in status["steps"].items()}


def _began(mark: Path) -> None:
    wait_for(mark.exists, bound=BOUND, what=f"{mark.name} to begin")


# -- 1. a cancel ends the hook that runs ---------------------------------------------------------


def test_a_cancel_ends_a_hanging_pre_run_hook_and_on_failure_still_runs(
    tmp_path: Path, sleeper: tuple[str, str]
) -> None:
    sleep, token = sleeper
    parts = Parts(tmp_path)
    mark = tmp_path / "pre"
    document = {"job_id": "h3", "executor": "local", "product": {"commands": "echo main ran"},
                "hooks": {"pre_run": f"touch {mark}; {sleep} 300", "on_failure": REPORT}}  # fmt: skip
    attempt = Attempt(parts, parts.submit(document))
    _began(mark)
    attempt.cancel()
    job, status = attempt.ended()
    assert (job.directory, status["state"]) == ("failed", "cancelled"), status
    log = job.log_path.read_text()
    assert "cancel: sending SIGTERM to hook pre_run's processes" in log, log
    assert "main ran" not in log.replace("echo main ran", "")
    assert "on_failure state=cancelled exit= job=h3" in log, "on_failure runs after a cancel"
    assert "hook on_failure started (after the cancel: for at most 500ms)" in log
    assert processes_with(token) == []


def test_a_cancel_ends_a_post_run_hook_and_bounds_on_failure_after_it(
    tmp_path: Path, sleeper: tuple[str, str]
) -> None:
    """post_run is ended by the cancel; on_failure, which would hang as long, gets kill_grace."""
    sleep, token = sleeper
    parts = Parts(tmp_path)
    mark = tmp_path / "post"
    document = {"job_id": "post", "executor": "local", "product": {"commands": "exit 3"},
                "hooks": {"post_run": f"touch {mark}; {sleep} 300",
                          "on_failure": f"echo cleaning up; {sleep} 301"}}  # fmt: skip
    attempt = Attempt(parts, parts.submit(document))
    _began(mark)
    attempt.cancel()
    job, status = attempt.ended()
    assert (job.directory, status["state"]) == ("failed", "cancelled"), status
    log = job.log_path.read_text()
    assert "cancel: sending SIGTERM to hook post_run's processes" in log, log
    assert "cleaning up" in log and "hook on_failure failed: timed out after 500ms" in log, log
    assert processes_with(token) == []


def test_a_hook_that_outlasts_the_jobs_timeout_is_ended_as_a_unit(
    tmp_path: Path, sleeper: tuple[str, str]
) -> None:
    sleep, token = sleeper
    parts = Parts(tmp_path)
    mark = tmp_path / "pre"
    document = {"job_id": "slowpre", "executor": "local", "timeout": "10s",
                "product": {"commands": "echo main ran"},
                "hooks": {"pre_run": f"touch {mark}; {sleep} 300 & {sleep} 301"}}  # fmt: skip
    attempt = Attempt(parts, parts.submit(document))
    _began(mark)
    parts.clock.advance(11)
    job, status = attempt.ended()
    assert (job.directory, status["error"]) == ("failed", "the pre_run hook failed"), status
    log = job.log_path.read_text()
    assert "timeout of 10s: sending SIGTERM to hook pre_run's processes" in log, log
    assert "hook pre_run failed: timed out after 10s" in log
    assert processes_with(token) == []


# -- 2. the job's timeout bounds its steps -------------------------------------------------------


def test_the_jobs_timeout_cuts_off_a_step_with_a_longer_timeout_of_its_own(
    tmp_path: Path, sleeper: tuple[str, str]
) -> None:
    """The probe's tmo2: ``timeout: 2s``, one step with ``timeout: 1h`` that sleeps."""
    sleep, token = sleeper
    parts = Parts(tmp_path)
    mark = tmp_path / "long"
    steps = [_step("long", f"touch {mark}; {sleep} 300; echo finished", timeout="1h")]
    attempt = Attempt(parts, parts.submit({"job_id": "tmo2", "executor": "local",
                                           "timeout": "2s", "steps": steps}))  # fmt: skip
    _began(mark)
    parts.clock.advance(3)
    job, status = attempt.ended()
    assert job.directory == "failed", job.log_path.read_text()
    assert status["error"] == "timed out after 2s (cut off: long)"
    assert status["attempts"][0]["error"] == status["error"]
    assert _states(status) == {
        "long": ("timed_out", "cut off: the job's timeout of 2s ran out"),
    }
    assert "finished" not in job.log_path.read_text().replace("echo finished", "")
    assert processes_with(token) == []


def test_no_step_starts_once_the_jobs_timeout_ran_out(
    tmp_path: Path, sleeper: tuple[str, str]
) -> None:
    """The probe's tmo1: a chain of steps that together outlast the job's timeout."""
    sleep, _ = sleeper
    parts = Parts(tmp_path)
    mark = tmp_path / "b"
    steps = [
        _step("a", "echo a"),
        _step("b", f"touch {mark}; {sleep} 300", "a"),
        _step("c", "echo c ran", "b"),
        _step("d", "echo d ran", "c", timeout="1s"),
        _step("e", "echo e ran"),
    ]
    attempt = Attempt(parts, parts.submit({"job_id": "tmo1", "executor": "local",
                                           "timeout": "3s", "steps": steps}))  # fmt: skip
    _began(mark)
    parts.clock.advance(4)
    job, status = attempt.ended()
    assert status["error"] == "timed out after 3s (cut off: b; not run: c, d)", status
    timeout = "the job's timeout of 3s ran out"
    assert _states(status) == {
        "a": ("succeeded", None),
        "b": ("timed_out", f"cut off: {timeout}"),
        "c": ("skipped", f"not run: {timeout}"),
        "d": ("skipped", f"not run: {timeout}"),
        "e": ("succeeded", None),
    }
    log = job.log_path.read_text()
    assert "c ran" not in log.replace("echo c ran", "")
    assert "a step it needs failed" not in log


def test_the_jobs_timeout_cuts_off_the_wait_for_a_steps_next_try(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    steps = [_step("x", "exit 9", retries=3, backoff="60s"), _step("y", "echo y ran", "x")]
    attempt = Attempt(parts, parts.submit({"job_id": "tmo3", "executor": "local",
                                           "timeout": "10s", "steps": steps}))  # fmt: skip
    wait_for(lambda: "retrying in 1m" in _log(parts, "tmo3"), bound=BOUND, what="x to wait")
    parts.clock.advance(11)
    job, status = attempt.ended()
    assert job.directory == "failed"
    assert status["error"] == "timed out after 10s (cut off: x; not run: y)", status
    assert _states(status)["x"] == (
        "timed_out", "the job's timeout of 10s ran out while it waited to try again (try 1: "
        "exit code 9)",
    )  # fmt: skip
    assert status["steps"]["x"]["exit_code"] == 9


def test_a_step_that_fits_in_the_jobs_timeout_keeps_its_own(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    steps = [_step("a", "echo a"), _step("b", "echo b", "a")]
    job, status = parts.attempt(parts.submit({"job_id": "fits", "executor": "local",
                                              "timeout": "1h", "steps": steps}))  # fmt: skip
    assert job.directory == "done", job.log_path.read_text()
    assert {s: state for s, (state, _) in _states(status).items()} == {
        "a": "succeeded",
        "b": "succeeded",
    }


def _log(parts: Parts, job_id: str) -> str:
    job = parts.spool.jobs.get(job_id)
    return job.log_path.read_text() if job.log_path.exists() else ""


# -- 3. a cancel during a step's backoff ---------------------------------------------------------


def test_a_cancel_while_a_tolerated_step_waits_to_try_again_leaves_it_to_a_retry(
    tmp_path: Path,
) -> None:
    """The probe's bo1: x (continue_on_error, retries 3, backoff 60s) exits 9, y needs it."""
    parts = Parts(tmp_path)
    runs = tmp_path / "runs"
    steps = [
        _step("x", f"echo x >> {runs}; test -e {tmp_path / 'fixed'} || exit 9",
              continue_on_error=True, retries=3, backoff="60s"),
        _step("y", f"echo y >> {runs}", "x"),
    ]  # fmt: skip
    attempt = Attempt(parts, parts.submit({"job_id": "bo1", "executor": "local",
                                           "steps": steps}))  # fmt: skip
    wait_for(lambda: "retrying in 1m" in _log(parts, "bo1"), bound=BOUND, what="x to wait")
    attempt.cancel()
    job, status = attempt.ended()
    assert (job.directory, status["state"]) == ("failed", "cancelled")
    assert _states(status) == {
        "x": ("cancelled", "cancelled while it waited to try again (try 1: exit code 9)"),
        "y": ("skipped", "not run: the job was cancelled"),
    }
    (tmp_path / "fixed").touch()
    JobControl(parts.spool, parts.clock, who="tester").retry("bo1")
    job, status = parts.attempt("bo1")
    assert job.directory == "done", job.log_path.read_text()
    assert runs.read_text().split() == ["x", "x", "y"], "x runs again, with all its tries"
    assert _states(status) == {"x": ("succeeded", None), "y": ("succeeded", None)}


# -- 4. every step of an ended job says what became of it ----------------------------------------


def test_a_cancel_marks_what_ran_cut_off_and_what_did_not_run(
    tmp_path: Path, sleeper: tuple[str, str]
) -> None:
    sleep, token = sleeper
    parts = Parts(tmp_path)
    mark = tmp_path / "long"
    steps = [
        _step("first", "echo first"),
        _step("long", f"touch {mark}; {sleep} 300", "first"),
        _step("bad", "exit 2", "first"),
        _step("behind-bad", "true", "bad"),
        _step("never", "echo never", "long"),
        _step("last", "true", "never"),
    ]
    attempt = Attempt(parts, parts.submit({"job_id": "dag", "executor": "local",
                                           "steps": steps}))  # fmt: skip
    _began(mark)
    wait_for(lambda: "step behind-bad skipped" in _log(parts, "dag"), bound=BOUND,
             what="bad to fail")  # fmt: skip
    attempt.cancel()
    job, status = attempt.ended()
    assert (job.directory, status["state"]) == ("failed", "cancelled")
    states = _states(status)
    assert states == {
        "first": ("succeeded", None),
        "long": ("cancelled", "cancelled"),
        "bad": ("failed", "exit code 2"),
        "behind-bad": ("skipped", "a step it needs failed (bad)"),
        "never": ("skipped", "not run: the job was cancelled"),
        "last": ("skipped", "not run: the job was cancelled"),
    }
    log = job.log_path.read_text()
    assert "step never skipped" not in log, "not for a failure: long was cut off"
    assert processes_with(token) == []


def test_a_failed_pre_run_says_no_step_ran(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    steps = [_step("a", "echo a ran"), _step("b", "true", "a")]
    document = {"job_id": "prefail", "executor": "local", "steps": steps,
                "hooks": {"pre_run": "exit 7"}}  # fmt: skip
    job, status = parts.attempt(parts.submit(document))
    assert (job.directory, status["error"]) == ("failed", "the pre_run hook failed")
    assert _states(status) == dict.fromkeys(
        ("a", "b"), ("skipped", "not run: the pre_run hook failed")
    )
