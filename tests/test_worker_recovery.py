"""The job runner and recovery in-process: artifacts, outcomes, dead workers, stale leases."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from spoold.core.clock import SystemClock, rfc3339
from spoold.core.config import Config
from spoold.core.job import JobStatus
from spoold.core.joblog import LINE_BOUND
from spoold.core.procfs import process_start_time
from spoold.core.spool import JobDir, Spool
from spoold.intake.incoming import Accepted, Intake, Rejected
from spoold.intake.validation import job_validator
from spoold.run.recovery import Recovery
from spoold.run.registry import ExecutorRegistry
from spoold.run.worker import JobRunner
from tests.fakes import FakeClock

LOGGER = logging.getLogger("spoold.test")


def _parts(tmp_path: Path, **config: Any) -> tuple[Spool, Intake, JobRunner, Config]:
    spool = Spool(tmp_path / "spool")
    spool.init()
    cfg = Config(spool=spool.root, hostname="here", worker_id="w1", kill_grace=0.5, **config)
    registry = ExecutorRegistry.from_entry_points()
    clock = SystemClock()
    intake = Intake(spool, job_validator(registry), clock, max_file_size=cfg.max_file_size,
                    settle_time=0, on_accepted=lambda job, document: None, logger=LOGGER)  # fmt: skip
    return spool, intake, JobRunner(spool, registry, cfg, clock, LOGGER), cfg


def _submit(spool: Spool, intake: Intake, document: dict[str, Any], name: str = "j.yaml") -> JobDir:
    (spool.dir("incoming") / name).write_text(yaml.safe_dump(document))
    outcome = intake.offer(name, complete=True)
    assert isinstance(outcome, Accepted), outcome
    return outcome.job


def _run(
    spool: Spool, intake: Intake, runner: JobRunner, document: dict[str, Any]
) -> tuple[JobDir, dict[str, Any]]:
    job = _submit(spool, intake, document)
    claimed = runner.claim(job.job_id)
    assert claimed is not None
    final = runner.run(claimed)
    assert final is not None
    return final, spool.jobs.read_status(final)


def test_artifacts_are_copied_with_size_and_sha256_and_never_from_outside(tmp_path: Path) -> None:
    spool, intake, runner, _ = _parts(tmp_path)
    commands = [
        "mkdir -p out/sub report && echo one > out/a.log && echo two > out/sub/b.log",
        "echo r > report/index.html && ln -s /etc/passwd out/passwd.log",
    ]
    artifacts = [{"path": "out/**/*.log"}, {"path": "report", "type": "dir"}, {"path": "out/*"},
                 {"path": "missing.txt"}]  # fmt: skip
    job, status = _run(
        spool,
        intake,
        runner,
        {
            "job_id": "art",
            "executor": "local",
            "product": {"commands": commands},
            "artifacts": artifacts,
        },
    )
    assert status["state"] == "succeeded"
    kept = {a["path"]: a for a in status["artifacts"]}
    assert sorted(kept) == ["out/a.log", "out/sub/b.log", "report/index.html"]
    assert kept["out/a.log"]["size"] == 4
    assert (
        kept["out/a.log"]["sha256"]
        == "2c8b08da5ce60398e1f19af0e5dccc744df274b826abe585eaba68c525434806"
    )
    assert (job.path / "artifacts" / "out" / "sub" / "b.log").read_text() == "two\n"
    assert not (job.path / "work").exists()  # only declared artifacts are kept
    log = job.log_path.read_text()
    assert "artifact 'missing.txt': nothing matched" in log


def test_a_failing_job_lands_in_failed_with_its_exit_code(tmp_path: Path) -> None:
    spool, intake, runner, _ = _parts(tmp_path)
    job, status = _run(
        spool,
        intake,
        runner,
        {"job_id": "f", "executor": "local", "product": {"commands": "exit 7"}},
    )
    assert job.directory == "failed"
    assert (status["state"], status["exit_code"], status["error"]) == ("failed", 7, "exit code 7")
    assert status["attempts"][0]["exit_code"] == 7 and status["attempts"][0]["finished_at"]


def test_variables_are_exported_and_interpolated_but_unknown_names_reach_the_shell(
    tmp_path: Path,
) -> None:
    spool, intake, runner, _ = _parts(tmp_path)
    document = {"job_id": "v", "executor": "local", "variables": {"CUSTOMER": 4711},
                "product": {"commands": ["echo ${CUSTOMER}-$CUSTOMER-${HOME:+home}-${JOB_ID}"]}}  # fmt: skip
    job, status = _run(spool, intake, runner, document)
    assert status["state"] == "succeeded"
    assert " INFO 4711-4711-home-v\n" in job.log_path.read_text()


def test_the_runner_sees_the_values_that_were_validated(tmp_path: Path) -> None:
    # YAML 1.1 would read 10:30 as 630 and 2026-01-01 as a date; validation reads strings.
    spool, intake, runner, _ = _parts(tmp_path)
    name = "j.yaml"
    text = "job_id: s\nexecutor: local\nvariables: {AT: 10:30, DAY: 2026-01-01}\n"
    (spool.dir("incoming") / name).write_text(text + "product: {commands: 'echo $AT $DAY'}\n")
    outcome = intake.offer(name, complete=True)
    assert isinstance(outcome, Accepted)
    claimed = runner.claim("s")
    assert claimed is not None
    final = runner.run(claimed)
    assert final is not None
    assert " INFO 10:30 2026-01-01\n" in final.log_path.read_text()


def test_configured_workdir_is_used_and_cleaned(tmp_path: Path) -> None:
    spool, intake, runner, _ = _parts(tmp_path, workdir=tmp_path / "work")
    job, _ = _run(
        spool, intake, runner, {"job_id": "w", "executor": "local",
                                "product": {"commands": "pwd; echo left > behind.txt"}},
    )  # fmt: skip
    # One work dir per attempt, made in it by the job's user and removed after it.
    log = job.log_path.read_text()
    assert re.search(rf" INFO {re.escape(str(tmp_path / 'work'))}/w\.1\.[0-9a-f]{{12}}\n", log), log
    assert list((tmp_path / "work").iterdir()) == []


def _running_job(
    spool: Spool, intake: Intake, lease: dict[str, Any], document: dict[str, Any] | None = None
) -> JobDir:
    job = _submit(
        spool,
        intake,
        document or {"job_id": "r", "executor": "local", "product": {"commands": "true"}},
    )
    claimed = spool.jobs.claim(job.job_id)
    assert claimed is not None
    spool.jobs.write_lease(claimed, lease)
    status = JobStatus.from_dict(spool.jobs.read_status(claimed))
    status.begin_attempt(SystemClock().now(), str(lease["worker"]))
    spool.jobs.write_status(claimed, status.to_dict())
    return claimed


def test_recovery_fails_a_job_whose_local_worker_is_gone(tmp_path: Path) -> None:
    spool, intake, _, cfg = _parts(tmp_path)
    dead = subprocess.run(["true"], check=True)  # a pid that no longer exists
    del dead
    lease = {
        "worker": "old",
        "host": "here",
        "pid": 999_999,
        "pid_start": 1,
        "heartbeat": rfc3339(SystemClock().now()),
    }
    _running_job(spool, intake, lease)
    moved = Recovery(spool, cfg, SystemClock(), LOGGER).reap()
    assert [(j.job_id, j.directory) for j in moved] == [("r", "failed")]
    status = spool.jobs.read_status(moved[0])
    assert status["state"] == "failed" and status["error"].startswith("interrupted: worker old")
    assert "interrupted" in moved[0].log_path.read_text()


def test_recovery_requeues_when_the_job_asks_for_it(tmp_path: Path) -> None:
    spool, intake, _, cfg = _parts(tmp_path)
    lease = {"worker": "old", "host": "here", "pid": 999_999, "pid_start": 1}
    document = {
        "job_id": "q",
        "executor": "local",
        "on_interrupt": "requeue",
        "product": {"commands": "true"},
    }
    _running_job(spool, intake, lease, document)
    (moved,) = Recovery(spool, cfg, SystemClock(), LOGGER).reap()
    assert moved.directory == "pending"
    assert spool.jobs.read_status(moved)["state"] == "pending"


def test_recovery_leaves_a_live_local_worker_alone(tmp_path: Path) -> None:
    spool, intake, _, cfg = _parts(tmp_path)
    lease = {
        "worker": "exec",
        "host": "here",
        "pid": os.getpid(),
        "pid_start": process_start_time(os.getpid()),
    }
    _running_job(spool, intake, lease)
    assert Recovery(spool, cfg, SystemClock(), LOGGER).reap() == []


def test_recovery_takes_over_another_hosts_claim_only_when_its_heartbeat_is_stale(
    tmp_path: Path,
) -> None:
    spool, intake, _, cfg = _parts(tmp_path, lease_timeout=60)
    clock = FakeClock()
    # Its heartbeat text is an hour old by this host's clock: no matter, only its beat counts.
    lease = {"worker": "far", "host": "elsewhere", "pid": 1, "generation": 1, "beat": 3,
             "heartbeat": rfc3339(clock.now() - timedelta(hours=1))}  # fmt: skip
    _running_job(spool, intake, lease)
    recovery = Recovery(spool, cfg, clock, LOGGER)
    assert recovery.reap() == []
    clock.advance(59)
    assert recovery.reap() == []
    clock.advance(2)
    (moved,) = recovery.reap()
    error = spool.jobs.read_status(moved)["error"]
    assert "from host elsewhere" in error and "beat 3) unchanged for 61s" in error


def test_a_pending_status_lost_to_power_loss_is_rebuilt(tmp_path: Path) -> None:
    spool, intake, _, cfg = _parts(tmp_path)
    job = _submit(
        spool, intake, {"job_id": "p", "executor": "local", "product": {"commands": "true"}}
    )
    job.status_path.write_bytes(b"")  # written at accept without fsync: may come back empty
    assert Recovery(spool, cfg, SystemClock(), LOGGER).repair_pending() == ["p"]
    status = spool.jobs.read_status(job)
    assert (status["job_id"], status["state"], status["executor"]) == ("p", "pending", "local")
    assert status["submitted_at"] and status["sha256"]


def test_recovery_kills_the_processes_a_dead_worker_left_behind(tmp_path: Path) -> None:
    spool, intake, _, cfg = _parts(tmp_path)
    orphan = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        lease = {"worker": "old", "host": "here", "pid": 999_999, "pid_start": 1,
                 "job_pid": orphan.pid, "job_pid_start": process_start_time(orphan.pid)}  # fmt: skip
        _running_job(spool, intake, lease)
        Recovery(spool, cfg, SystemClock(), LOGGER).reap()
        assert orphan.wait(10) == -9
    finally:
        orphan.kill()


def test_intake_rejects_with_a_reason_that_names_line_and_path(tmp_path: Path) -> None:
    spool, intake, _, _ = _parts(tmp_path)
    (spool.dir("incoming") / "bad.yaml").write_text(
        "job_id: bad\nexecutor: local\nproduct:\n  comands: x\n"
    )
    outcome = intake.offer("bad.yaml", complete=True)
    assert isinstance(outcome, Rejected)
    reason = json.loads((outcome.path / "reason.json").read_text())
    assert reason["code"] == "invalid"
    messages = {(e["path"], e["line"]) for e in reason["errors"]}
    assert ("product.comands", 4) in messages or ("product", 3) in messages
    assert (outcome.path / "bad.yaml").read_text().startswith("job_id: bad")


def test_intake_puts_the_file_back_when_the_disk_fails_mid_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool, intake, _, _ = _parts(tmp_path)
    (spool.dir("incoming") / "a.yaml").write_text(
        "job_id: a\nexecutor: local\nproduct: {commands: 'true'}\n"
    )

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool.stages, "accept", full_disk)
    assert intake.offer("a.yaml", complete=True) is None
    assert spool.stages.list_incoming() == ["a.yaml"]
    assert list(spool.dir("tmp").iterdir()) == []


def test_a_failing_file_is_retried_with_backoff_not_in_a_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool, _, runner, cfg = _parts(tmp_path)
    clock = FakeClock()
    intake = Intake(spool, job_validator(ExecutorRegistry.from_entry_points()), clock,
                    max_file_size=cfg.max_file_size, settle_time=0,
                    on_accepted=lambda job, document: None, logger=LOGGER)  # fmt: skip
    (spool.dir("incoming") / "a.yaml").write_text(
        "job_id: a\nexecutor: local\nproduct: {commands: 'true'}\n"
    )
    tries: list[float] = []

    def full_disk(*args: object, **kwargs: object) -> None:
        tries.append(clock.monotonic())
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool.stages, "take_incoming", full_disk)
    for _ in range(5):  # the file's own rename back into incoming/ re-offers it at once
        assert intake.offer("a.yaml", complete=True) is None
    assert len(tries) == 1
    clock.advance(1.01)
    intake.offer("a.yaml", complete=True)
    clock.advance(1.01)
    intake.offer("a.yaml", complete=True)  # skipped: the second delay is 2 s
    clock.advance(1.0)
    intake.offer("a.yaml", complete=True)
    assert [t - tries[0] for t in tries] == pytest.approx([0, 1.01, 3.02])
    monkeypatch.undo()
    clock.advance(60)
    assert isinstance(intake.offer("a.yaml", complete=True), Accepted)
    del runner


def test_a_job_that_prints_very_long_lines_is_logged_without_blocking(tmp_path: Path) -> None:
    spool, intake, runner, _ = _parts(tmp_path)
    start = time.monotonic()
    job, status = _run(
        spool,
        intake,
        runner,
        {
            "job_id": "big",
            "executor": "local",
            "product": {"commands": "head -c 3000000 /dev/zero | tr '\\0' x"},
        },
    )
    assert status["state"] == "succeeded"
    # The line is cut at its bound, and the log says how long it was (issue 16).
    log = job.log_path.read_text()
    assert f" INFO {'x' * LINE_BOUND}\n" in log
    assert f"a line of stdout was 3000000 bytes long: only its first {LINE_BOUND}" in log
    assert job.log_path.stat().st_size < 2 * LINE_BOUND
    del start
