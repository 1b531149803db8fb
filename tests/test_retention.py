"""Retention: which finished jobs go, by age, count and executor; purge by hand and by daemon."""

from __future__ import annotations

import os
import time
from pathlib import Path

from spoold.core.retention import Retention, apply_retention
from spoold.core.spool import JobDir, Spool
from tests.harness import (
    DaemonProcess,
    drop,
    local_job,
    run_cli,
    wait_finished,
    wait_for,
    write_config,
)

DAY = 86400.0
NOW = 1_800_000_000.0


def _jobs(*ages_in_days: float) -> list[tuple[str, float]]:
    return [(f"j{n}", NOW - age * DAY) for n, age in enumerate(ages_in_days)]


def test_nothing_goes_without_rules() -> None:
    assert Retention.from_document(None).expired("done", _jobs(999), NOW, lambda j: None) == []


def test_by_age_and_by_count_oldest_first() -> None:
    retention = Retention.from_document({"done": {"max_age": "30d", "max_count": 3}})
    jobs = _jobs(40, 31, 20, 10, 5, 1)
    assert retention.expired("done", jobs, NOW, lambda j: "local") == ["j0", "j1", "j2"]
    assert retention.expired("failed", jobs, NOW, lambda j: "local") == [], "no rule for failed/"


def test_an_executor_keeps_its_jobs_longer_and_is_asked_only_when_it_matters() -> None:
    retention = Retention.from_document(
        {"done": {"max_age": "30d", "max_count": 1}, "executors": {"sevdesk": {"max_age": "3650d"}}}
    )
    asked: list[str] = []

    def executor_of(job_id: str) -> str:
        asked.append(job_id)
        return "sevdesk" if job_id in ("j0", "j2") else "local"

    jobs = _jobs(400, 40, 35, 2)
    assert retention.expired("done", jobs, NOW, executor_of) == ["j1"]
    assert "j3" not in asked, "the newest job needs no status read"


def _finished(spool: Path, state: str, job_id: str, age_days: float, executor: str) -> None:
    job = spool / state / job_id
    (job / "artifacts").mkdir(parents=True)
    (job / "status.json").write_text(f'{{"job_id": "{job_id}", "executor": "{executor}"}}')
    os.utime(job, (NOW, NOW))  # ctime cannot be set: the test's clock is the real one instead


def test_apply_retention_returns_what_goes_and_a_dry_run_removes_nothing(spool_dir: Path) -> None:
    """The one selection the daemon's hourly pass and ``spoold purge`` (naming each) share."""
    spool = Spool(spool_dir)
    _finished(spool_dir, "done", "old-local", 0, "local")
    _finished(spool_dir, "done", "old-invoice", 0, "sevdesk")
    _finished(spool_dir, "failed", "old-failed", 0, "local")
    rules = Retention.from_document(
        {"done": {"max_age": "1d"}, "executors": {"sevdesk": {"max_age": "3650d"}}}
    )
    later = time.time() + 2 * DAY  # entered_times are the directories' real ctimes

    def named(jobs: list[JobDir]) -> list[str]:
        return [f"{job.directory}/{job.job_id}" for job in jobs]

    assert named(apply_retention(spool, rules, later, dry_run=True)) == ["done/old-local"]
    assert (spool_dir / "done" / "old-local").is_dir(), "a dry run removes nothing"
    assert named(apply_retention(spool, rules, later)) == ["done/old-local"]
    assert sorted(p.name for p in (spool_dir / "done").iterdir()) == ["old-invoice"]
    assert (spool_dir / "failed" / "old-failed").is_dir(), "no rule for failed/"
    assert apply_retention(spool, rules, later) == []


def test_spoold_purge_removes_old_finished_jobs_and_keeps_the_rest(
    spool_dir: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "c.yaml", spool_dir,
                          retention={"executors": {"sevdesk": {"max_age": "3650d"}}})  # fmt: skip
    _finished(spool_dir, "done", "old-local", 0, "local")
    _finished(spool_dir, "done", "old-invoice", 0, "sevdesk")
    _finished(spool_dir, "failed", "old-failed", 0, "local")
    result = run_cli(spool_dir, "purge", "--older-than", "0s", "--state", "done", "--config",
                     str(config))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "removed 1 finished job(s)" in result.stdout
    assert sorted(p.name for p in (spool_dir / "done").iterdir()) == ["old-invoice"]
    assert (spool_dir / "failed" / "old-failed").is_dir()
    assert [p.name for p in (spool_dir / "tmp").iterdir() if p.name.startswith("gone-")] == []
    bad = run_cli(spool_dir, "purge", "--older-than", "soon")
    assert bad.returncode == 2 and "--older-than" in bad.stderr


def test_the_daemon_keeps_at_most_max_count_finished_jobs(spool_dir: Path, tmp_path: Path) -> None:
    for n in range(4):
        _finished(spool_dir, "done", f"before-{n}", 0, "local")
    config = write_config(tmp_path / "c.yaml", spool_dir, retention={"done": {"max_count": 2}})
    daemon = DaemonProcess(spool_dir, config)
    daemon.start()  # retention runs once at start
    try:
        drop(spool_dir, "fresh.yaml", local_job("fresh", "true"))
        assert wait_finished(spool_dir, "fresh")[0] == "done"
        wait_for(lambda: "retention: removed 2 finished job(s)" in daemon.log(), what="retention")
        kept = sorted(p.name for p in (spool_dir / "done").iterdir())
        assert len(kept) == 3 and "fresh" in kept and "before-0" not in kept  # 2 kept, and fresh
    finally:
        daemon.kill()
