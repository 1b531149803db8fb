"""`spoold wait`, `submit --wait` and `purge` (rejected/ too, --dry-run, naming what goes)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from spoold.core.spool import Spool
from spoold.core.states import JobState
from spoold.face.waits import give_job_id, wait_for_jobs
from tests.harness import DaemonProcess, local_job, run_cli, write_config
from tests.test_cli_status import NOW, make_job


@pytest.fixture
def spool_root(tmp_path: Path) -> Path:
    root = tmp_path / "spool"
    Spool(root).init()
    return root


def test_wait_exits_0_only_if_every_job_succeeded(spool_root: Path) -> None:
    make_job(spool_root, "ok-1", "succeeded", exit_code=0)
    make_job(spool_root, "ok-2", "succeeded", exit_code=0)
    make_job(spool_root, "broke", "failed", exit_code=3, error="exit code 3")
    make_job(spool_root, "stopped", "cancelled", error="cancelled by root on host")
    both = run_cli(spool_root, "wait", "ok-1", "ok-2")
    assert both.returncode == 0, both.stderr
    assert both.stdout.splitlines() == ["job ok-1 succeeded", "job ok-2 succeeded"]
    mixed = run_cli(spool_root, "wait", "ok-1", "broke", "stopped")
    assert mixed.returncode == 1, mixed.stderr
    assert "job broke failed: exit code 3" in mixed.stdout
    assert "job stopped was cancelled: cancelled by root on host" in mixed.stdout


def test_wait_for_an_unknown_job_is_a_usage_error(spool_root: Path) -> None:
    make_job(spool_root, "ok-1", "succeeded", exit_code=0)
    result = run_cli(spool_root, "wait", "ok-1", "no-such-job")
    assert result.returncode == 2, result.stderr
    assert "no job 'no-such-job'" in result.stderr


def test_wait_is_bounded_by_its_timeout(spool_root: Path) -> None:
    make_job(spool_root, "forever")
    result = run_cli(spool_root, "wait", "forever", "--timeout", "0.3s")
    assert result.returncode == 1
    assert "still waiting after 0.3s for forever" in result.stderr


def test_wait_sees_a_job_end_while_it_waits(
    spool_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A job moved to done/ while `spoold wait` polls (as a worker would finish it): moved
    only once a look of the wait found it running, where a `spoold wait` started as a process
    took longer to start than the move (it found the job ended at its first look)."""
    make_job(spool_root, "soon", "running")
    spool = Spool(spool_root, durable=False)
    find, seen_running = spool.jobs.find, threading.Event()

    def looked(job_id: str) -> Any:
        found = find(job_id)
        if found is not None and found.directory == "running":
            seen_running.set()
        return found

    setattr(spool.jobs, "find", looked)  # noqa: B010 - a spy on the instance
    answers: list[bool] = []
    waiting = threading.Thread(
        target=lambda: answers.append(wait_for_jobs(spool, ["soon"], timeout=60))
    )
    waiting.start()
    try:
        assert seen_running.wait(60)
        running = find("soon")
        assert running is not None
        status = {**spool.jobs.read_status(running), "state": "succeeded", "exit_code": 0}
        spool.jobs.finish(running, JobState.SUCCEEDED, status)
    finally:
        waiting.join(60)
    assert answers == [True]
    assert capsys.readouterr().out == "job soon succeeded\n"


def test_purge_names_what_it_removes_and_a_dry_run_removes_nothing(spool_root: Path) -> None:
    make_job(spool_root, "old", "succeeded", exit_code=0)
    make_job(spool_root, "pending-one")
    spool = Spool(spool_root, durable=False)
    bad = spool_root.parent / "bad.yaml"
    bad.write_text("executor: nope\n")
    spool.stages.reject(spool.stages.stage_file(bad, max_size=1 << 20),
                 {"file": "bad.yaml", "rejected_at": NOW, "code": "invalid", "reason": "no"})  # fmt: skip
    time.sleep(0.05)  # older than the age below: ctime and rejected_at both lie in the past
    dry = run_cli(spool_root, "purge", "--older-than", "10ms", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [
        "would remove done/old",
        "would remove rejected/bad.yaml",
        "would remove 1 finished job(s) and 1 rejected file(s) older than 10ms (a dry run: "
        "nothing removed)",
    ]
    assert (spool_root / "done" / "old").is_dir() and (
        spool_root / "rejected" / "bad.yaml"
    ).is_dir()
    gone = run_cli(spool_root, "purge", "--older-than", "10ms")
    assert gone.returncode == 0, gone.stderr
    assert "removed done/old" in gone.stdout and "removed rejected/bad.yaml" in gone.stdout
    assert "removed 1 finished job(s) and 1 rejected file(s) older than 10ms" in gone.stdout
    assert not os.listdir(spool_root / "done") and not os.listdir(spool_root / "rejected")
    assert (spool_root / "pending" / "pending-one").is_dir()
    assert [n for n in os.listdir(spool_root / "tmp") if n.startswith("gone-")] == []


def test_purge_of_rejected_needs_no_age_and_nothing_else_does_without_one(
    spool_root: Path,
) -> None:
    spool = Spool(spool_root, durable=False)
    for name in ("a.yaml", "b.json"):
        source = spool_root.parent / name
        source.write_text("{}")
        spool.stages.reject(
            spool.stages.stage_file(source, max_size=1 << 20), {"file": name, "code": "invalid"}
        )
    result = run_cli(spool_root, "purge", "--state", "rejected")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "removed rejected/a.yaml",
        "removed rejected/b.json",
        "removed 2 rejected file(s)",
    ]
    refused = run_cli(spool_root, "purge")
    assert refused.returncode == 2 and "--older-than AGE is needed" in refused.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("executor: local\nproduct: {commands: 'true'}\n",
         "job_id: J\nexecutor: local\nproduct: {commands: 'true'}\n"),
        ("# a comment\n---\nexecutor: local  # why\nproduct:\n  commands: 'true'\n",
         "# a comment\n---\njob_id: J\nexecutor: local  # why\nproduct:\n  commands: 'true'\n"),
        ('{"executor": "local", "product": {"commands": "true"}}',
         '{"job_id": "J", "executor": "local", "product": {"commands": "true"}}'),
        ("executor: local\r\nproduct: {commands: 'true'}\r\n",
         "job_id: J\r\nexecutor: local\r\nproduct: {commands: 'true'}\r\n"),
    ],
    ids=["block", "comments-and-marker", "json", "crlf"],
)  # fmt: skip
def test_submit_wait_gives_a_file_its_id_in_its_own_style(text: str, expected: str) -> None:
    assert give_job_id(text.encode(), "J") == expected.encode()


def test_submit_wait_gives_no_id_where_that_would_change_the_file() -> None:
    assert give_job_id(b"- not a mapping\n", "J") is None
    assert give_job_id(b"\xff\xfe\x00 not utf-8", "J") is None
    assert give_job_id(b"executor: local\n  bad indentation: [\n", "J") is None


def test_submit_wait_waits_for_the_jobs_it_submitted(tmp_path: Path, spool_root: Path) -> None:
    daemon = DaemonProcess(spool_root, write_config(tmp_path / "config.yaml", spool_root))
    daemon.start()
    try:
        good = tmp_path / "good.yaml"
        good.write_text(yaml.safe_dump(local_job("good", "echo fine")))
        anonymous = tmp_path / "anonymous.yaml"
        anonymous.write_text("executor: local  # no job_id\nproduct: {commands: 'true'}\n")
        fine = run_cli(spool_root, "submit", "--wait", "--timeout", "60", str(good), str(anonymous))
        assert fine.returncode == 0, fine.stderr
        ids = [line.rsplit("(job ", 1)[1].rstrip(")") for line in fine.stdout.splitlines()
               if "submitted as" in line]  # fmt: skip
        assert ids[0] == "good" and ids[1].startswith("job-"), fine.stdout
        assert f"job {ids[1]} succeeded" in fine.stdout and "job good succeeded" in fine.stdout
        assert (
            (spool_root / "done" / ids[1] / "job.yaml")
            .read_text()
            .startswith(f"job_id: {ids[1]}\nexecutor: local  # no job_id\n")
        )
        assert daemon.process is not None
        summary = run_cli(spool_root, "status").stdout
        assert f"daemon:     pid {daemon.process.pid} on " in summary, summary
        assert ", running since 20" in summary, summary
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump(local_job("bad", "exit 5")))
        failed = run_cli(spool_root, "submit", "--wait", str(bad))
        assert failed.returncode == 1, failed.stderr
        assert "job bad failed: exit code 5" in failed.stdout
    finally:
        daemon.stop()


def test_submit_wait_without_a_daemon_ends_at_its_timeout(tmp_path: Path, spool_root: Path) -> None:
    job = tmp_path / "idle.yaml"
    job.write_text(yaml.safe_dump(local_job("idle", "true")))
    result = run_cli(spool_root, "submit", "--wait", "--timeout", "0.5", str(job))
    assert result.returncode == 1, result.stderr
    assert "still in incoming/ after 0.5s: idle.yaml" in result.stderr, result.stderr
    assert (spool_root / "incoming" / "idle.yaml").is_file()
    misuse = run_cli(spool_root, "submit", "--timeout", "5", str(job))
    assert misuse.returncode == 2 and "--timeout goes with --wait" in misuse.stderr
