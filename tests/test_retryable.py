"""An executor's "a retry can help" is a flag that reaches status.json's attempt, `spoold status`
and spoold's own log line; a failure without it leaves status.json as it was before the flag."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from spoold.executors.base import ExecResult, Executor, RunContext
from spoold.executors.local import LocalExecutor

from spoold.core.config import Config
from spoold.core.errors import ExecutorError
from spoold.core.job import JobStatus
from spoold.core.spool import Spool
from spoold.intake.incoming import Accepted, Intake
from spoold.intake.validation import job_validator
from spoold.run.registry import ExecutorRegistry
from spoold.run.worker import JobRunner
from tests.fakes import FakeClock
from tests.harness import run_cli

LOGGER = logging.getLogger("spoold.test.retryable")


class AwayExecutor(Executor):
    """Its server is never there: the transient failure an API executor meets."""

    name = "away"
    schema_resource = "local.schema.json"

    def execute(self, ctx: RunContext) -> ExecResult:
        raise ExecutorError("away: no answer from the server", retryable=True)


class RefusedExecutor(Executor):
    """Its server says no: a failure no retry mends."""

    name = "refused"
    schema_resource = "local.schema.json"

    def execute(self, ctx: RunContext) -> ExecResult:
        raise ExecutorError("refused: the server refused the key")


class Parts:
    """A spool, intake and a runner with the two executors above, on one fake clock."""

    def __init__(self, tmp_path: Path) -> None:
        self.spool = Spool(tmp_path / "spool")
        self.spool.init()
        self.clock = FakeClock()
        registry = ExecutorRegistry(
            {"local": LocalExecutor, "away": AwayExecutor, "refused": RefusedExecutor}
        )
        config = Config(spool=self.spool.root, hostname="here", worker_id="w1", kill_grace=0.5)
        self.intake = Intake(self.spool, job_validator(registry), self.clock,
                             max_file_size=config.max_file_size, settle_time=0,
                             on_accepted=lambda job, document: None, logger=LOGGER)  # fmt: skip
        self.runner = JobRunner(self.spool, registry, config, self.clock, LOGGER,
                                draw=lambda: 0.0)  # fmt: skip

    def submit(self, job_id: str, executor: str, retries: int) -> str:
        document = {"job_id": job_id, "executor": executor, "product": {"commands": "true"},
                    "retries": retries, "backoff": "10s"}  # fmt: skip
        (self.spool.dir("incoming") / "j.yaml").write_text(yaml.safe_dump(document))
        outcome = self.intake.offer("j.yaml", complete=True)
        assert isinstance(outcome, Accepted), outcome
        return outcome.job.job_id

    def attempt(self, job_id: str) -> tuple[str, dict[str, Any]]:
        claimed = self.runner.claim(job_id)
        assert claimed is not None
        final = self.runner.run(claimed)
        assert final is not None
        return final.directory, self.spool.jobs.read_status(final)


def test_a_retryable_failure_reaches_status_json_spoold_status_and_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    parts = Parts(tmp_path)
    job_id = parts.submit("away1", "away", retries=1)
    with caplog.at_level(logging.INFO, logger=LOGGER.name):
        directory, status = parts.attempt(job_id)
    assert directory == "pending"
    [first] = status["attempts"]
    assert first["error"] == "away: no answer from the server" and first["retryable"] is True
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "attempt 1 of 2 failed: away: no answer from the server (retryable) (" in line
        for line in said
    ), said
    shown = run_cli(parts.spool.root, "status", job_id)
    assert shown.returncode == 0, shown.stderr
    attempt_line = next(line for line in shown.stdout.splitlines() if line.startswith("attempt 1:"))
    assert attempt_line.endswith("away: no answer from the server (retryable)"), shown.stdout

    parts.clock.advance(10)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER.name):
        directory, status = parts.attempt(job_id)
    assert directory == "failed"  # retryable, yet ``retry:`` has the last word: none is left
    assert [a.get("retryable") for a in status["attempts"]] == [True, True]
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        f"job {job_id} failed: away: no answer from the server (retryable) (" in line
        for line in said
    ), said


def test_a_failure_no_retry_mends_leaves_no_flag(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    parts = Parts(tmp_path)
    job_id = parts.submit("refused1", "refused", retries=0)
    with caplog.at_level(logging.INFO, logger=LOGGER.name):
        directory, status = parts.attempt(job_id)
    assert directory == "failed"
    [only] = status["attempts"]
    assert only["error"] == "refused: the server refused the key" and "retryable" not in only
    assert "(retryable)" not in caplog.text
    shown = run_cli(parts.spool.root, "status", job_id)
    assert shown.returncode == 0, shown.stderr
    assert "refused: the server refused the key" in shown.stdout
    assert "(retryable)" not in shown.stdout


def test_status_json_from_before_the_flag_reads_and_writes_the_same() -> None:
    attempt = {"number": 1, "started_at": "2026-11-22T12:00:00.000000Z",
               "finished_at": "2026-11-22T12:00:01.000000Z", "exit_code": None,
               "error": "ssh: cannot connect"}  # fmt: skip
    old = {"job_id": "old1", "state": "failed", "executor": "ssh", "attempts": [attempt]}
    status = JobStatus.from_dict(json.loads(json.dumps(old)))
    assert status.attempts[0].retryable is False
    assert status.to_dict()["attempts"] == [attempt]
    status.attempts[0].retryable = True
    again = JobStatus.from_dict(status.to_dict())
    assert again.attempts[0].retryable is True


def test_a_job_of_steps_is_retryable_only_if_every_step_that_failed_it_was(
    tmp_path: Path,
) -> None:
    """A retry of the job reruns the steps that did not succeed: it can help only if each of
    them failed in a way a retry can mend."""
    parts = Parts(tmp_path)
    outcomes = {}
    for name, executors in (("both-away", ("away", "away")), ("one-refused", ("away", "refused"))):
        document = {"job_id": name, "executor": "local", "retries": 1, "backoff": "10s",
                    "steps": [{"id": f"s{i}", "executor": e, "product": {"commands": "true"}}
                              for i, e in enumerate(executors)]}  # fmt: skip
        (parts.spool.dir("incoming") / "j.yaml").write_text(yaml.safe_dump(document))
        accepted = parts.intake.offer("j.yaml", complete=True)
        assert isinstance(accepted, Accepted), accepted
        _, status = parts.attempt(accepted.job.job_id)
        outcomes[name] = status["attempts"][-1].get("retryable", False)
    assert outcomes == {"both-away": True, "one-refused": False}
