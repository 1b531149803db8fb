"""A cancel sticks (issue 16): once asked for, it wins over `on_interrupt: requeue` and retries.

In-process first (recovery and the runner, each moment a cancel can come), then the real
daemon: `kill -9` while a job runs, `spoold cancel` with the daemon down, a restart.
"""

from __future__ import annotations

import functools
import logging
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from spoold.core.clock import SystemClock
from spoold.core.config import Config
from spoold.core.job import JobStatus
from spoold.core.spool import JobDir, Spool
from spoold.intake.incoming import Accepted, Intake
from spoold.intake.validation import JobValidator, job_validator
from spoold.run.control import JobControl
from spoold.run.recovery import Recovery
from spoold.run.registry import ExecutorRegistry
from spoold.run.worker import JobRunner
from tests.harness import (
    DEFAULT_BOUND,
    DaemonProcess,
    drop,
    job_state,
    kill_processes_with,
    local_job,
    processes_with,
    run_cli,
    sleep_command,
    wait_finished,
    wait_for,
    write_config,
)
from tests.receiver import Receiver

LOGGER = logging.getLogger("spoold.test")


def fails_when(mark: Path) -> str:
    """A job that fails by itself (exit 3) once ``mark`` exists: the test makes it as soon as
    it asked for a cancel, before any worker acts on it. (A job cannot see the spool, and so
    not the request itself.)"""
    return f'while [ ! -e "{mark}" ]; do sleep 0.02; done; exit 3'


class Parts:
    """A spool, intake, a runner and a JobControl, in this process."""

    def __init__(self, tmp_path: Path) -> None:
        self.spool = Spool(tmp_path / "spool")
        self.spool.init()
        self.config = Config(spool=self.spool.root, hostname="here", worker_id="w1",
                             kill_grace=0.5)  # fmt: skip
        registry = ExecutorRegistry.from_entry_points()
        clock = SystemClock()
        self.intake = Intake(self.spool, _validator(), clock, max_file_size=1 << 20,
                             settle_time=0, on_accepted=lambda job, document: None,
                             logger=LOGGER)  # fmt: skip
        self.runner = JobRunner(self.spool, registry, self.config, clock, LOGGER)
        self.control = JobControl(self.spool, clock, who="alice on here")

    def submit(self, document: dict[str, Any]) -> JobDir:
        name = f"{document['job_id']}.yaml"
        (self.spool.dir("incoming") / name).write_text(yaml.safe_dump(document))
        outcome = self.intake.offer(name, complete=True)
        assert isinstance(outcome, Accepted), outcome
        return outcome.job

    def status(self, job: JobDir) -> dict[str, Any]:
        return dict(self.spool.jobs.read_status(job))


@functools.cache
def _validator() -> JobValidator:
    return job_validator(ExecutorRegistry.from_entry_points())


@pytest.fixture
def parts(tmp_path: Path) -> Parts:
    return Parts(tmp_path)


def _job(job_id: str, commands: str, **fields: Any) -> dict[str, Any]:
    return {"job_id": job_id, "executor": "local", "product": {"commands": commands}, **fields}


def test_recovery_ends_a_cancelled_job_whose_worker_died_instead_of_requeueing_it(
    parts: Parts,
) -> None:
    job = parts.submit(_job("r", "sleep 30", on_interrupt="requeue", retries=2))
    claimed = parts.spool.jobs.claim(job.job_id)
    assert claimed is not None
    parts.spool.jobs.write_lease(claimed, {"worker": "old", "host": "here", "pid": 999_999,
                                      "pid_start": 1}, first=True)  # fmt: skip
    status = JobStatus.from_dict(parts.status(claimed))
    status.begin_attempt(SystemClock().now(), "old")
    parts.spool.jobs.write_status(claimed, status.to_dict())
    outcome = parts.control.cancel("r")  # its daemon is gone: only a request can be left
    assert not outcome.cancelled and (claimed.path / "cancel").exists()
    assert parts.control.worker_gone(outcome.job, "here"), "what spoold cancel can tell"
    assert not parts.control.worker_gone(outcome.job, "elsewhere"), "not its to judge"

    (moved,) = Recovery(parts.spool, parts.config, SystemClock(), LOGGER).reap()
    assert moved.directory == "failed"
    ended = parts.status(moved)
    assert (ended["state"], ended["error"]) == ("cancelled", "cancelled by alice on here")
    assert [a["number"] for a in ended["attempts"]] == [1], "no attempt 2"
    assert ended["attempts"][0]["error"] == "cancelled by alice on here"
    assert "the job ends cancelled" in moved.log_path.read_text()
    assert not (moved.path / "cancel").exists()


def test_spoold_cancel_says_when_a_job_whose_spoold_is_gone_ends(parts: Parts) -> None:
    """No worker stops it: the CLI says so at once, and when it ends, instead of waiting."""
    job = parts.submit(_job("orphan", "sleep 30"))
    claimed = parts.spool.jobs.claim(job.job_id)
    assert claimed is not None
    parts.spool.jobs.write_lease(claimed, {"worker": "old", "host": socket.gethostname(),
                                      "pid": 999_999, "pid_start": 1}, first=True)  # fmt: skip
    asked = run_cli(parts.spool.root, "cancel", "orphan", "--wait", "5")
    assert asked.returncode == 0, asked.stdout + asked.stderr
    assert asked.stdout == (
        "orphan: cancel requested; no spoold runs it now: it ends cancelled when spoold starts "
        "again on this host\n"
    ), asked.stdout
    assert "its worker stops it" not in asked.stderr, asked.stderr
    assert (claimed.path / "cancel").exists(), "the request waits for spoold's next start"


def _run_in_thread(parts: Parts, job: JobDir) -> tuple[threading.Thread, list[JobDir | None]]:
    claimed = parts.runner.claim(job.job_id)
    assert claimed is not None
    ended: list[JobDir | None] = []
    thread = threading.Thread(target=lambda: ended.append(parts.runner.run(claimed)))
    thread.start()
    return thread, ended


def test_a_job_that_fails_as_it_is_cancelled_is_not_retried(parts: Parts) -> None:
    # The worker never looks for requests here (no serve loop): only the end of the attempt
    # can see this one, as a daemon's worker would between two looks.
    mark = parts.spool.root.parent / "asked"
    job = parts.submit(_job("f", fails_when(mark), retries=2, backoff="1s"))
    thread, ended = _run_in_thread(parts, job)
    running = parts.spool.dir("running") / "f"
    wait_for((running / "lease").exists, bound=20, what="the job to run")
    asked = parts.control.cancel("f")
    mark.touch()
    assert not asked.cancelled and not parts.control.worker_gone(asked.job, "here")
    thread.join(20)
    [final] = ended
    assert final is not None and final.directory == "failed"
    status = parts.status(final)
    assert (status["state"], status["error"]) == ("cancelled", "cancelled by alice on here")
    assert (len(status["attempts"]), status["exit_code"], status["next_attempt_at"]) == (1, 3, None)


def test_a_cancel_that_comes_once_the_retry_is_decided_still_wins(parts: Parts) -> None:
    job = parts.submit(_job("late", "exit 3", retries=2, backoff="1h"))
    claimed = parts.runner.claim(job.job_id)
    assert claimed is not None
    outcome = parts.runner.attempt(claimed)
    assert outcome is not None and outcome.status.next_attempt_at is not None, "a retry was decided"
    parts.control.cancel("late")  # before its outcome is recorded
    final = parts.runner.record(outcome)
    assert final is not None and final.directory == "failed"
    status = parts.status(final)
    assert (status["state"], status["next_attempt_at"], len(status["attempts"])) == (
        "cancelled", None, 1,
    )  # fmt: skip
    assert status["finished_at"] == status["attempts"][0]["finished_at"]
    log = final.log_path.read_text()
    assert "retrying in 1h" in log and "the job ends cancelled, with no further attempt" in log


def test_a_job_cancelled_while_it_waits_for_its_retry_is_due_no_more(parts: Parts) -> None:
    """Cancelled in pending/ while its second attempt was due in an hour: it ended there and
    then, and no next attempt stays on its record (``spoold status`` would say it waits)."""
    job = parts.submit(_job("waiting", "exit 3", retries=2, backoff="1h"))
    claimed = parts.runner.claim(job.job_id)
    assert claimed is not None
    outcome = parts.runner.attempt(claimed)
    assert outcome is not None
    pending = parts.runner.record(outcome)
    assert pending is not None and parts.status(pending)["next_attempt_at"] is not None
    done = parts.control.cancel("waiting")
    assert done.cancelled and done.job.directory == "failed"
    status = parts.status(done.job)
    assert (status["state"], status["next_attempt_at"]) == ("cancelled", None), status
    assert status["error"] == "cancelled by alice on here before attempt 2 started"


def test_a_retried_job_waits_in_pending_without_its_last_outcome(parts: Parts) -> None:
    """``spoold retry``: back in pending/ with its attempts kept, and none of the outcome of
    the last one on the job itself (no error, exit code or end while it waits to run)."""
    job = parts.submit(_job("again", "exit 3"))
    claimed = parts.runner.claim(job.job_id)
    assert claimed is not None
    outcome = parts.runner.attempt(claimed)
    assert outcome is not None
    failed = parts.runner.record(outcome)
    assert failed is not None and parts.status(failed)["error"] == "exit code 3"
    pending = parts.control.retry("again").job
    status = parts.status(pending)
    assert pending.directory == "pending" and status["state"] == "pending"
    assert len(status["attempts"]) == 1 and status["attempts"][0]["exit_code"] == 3
    found = {key: status[key] for key in ("error", "exit_code", "finished_at", "next_attempt_at")}
    assert found == dict.fromkeys(found), found


def test_a_cancel_wins_over_requeue_when_spoold_stops_during_it(parts: Parts) -> None:
    job = parts.submit(_job("stop", "sleep 30 & wait", on_interrupt="requeue"))
    thread, ended = _run_in_thread(parts, job)
    wait_for((parts.spool.dir("running") / "stop" / "lease").exists, bound=20,
             what="the job to run")  # fmt: skip
    parts.control.cancel("stop")
    parts.runner.interrupt_all()  # spoold stops before its worker looked for requests
    thread.join(20)
    [final] = ended
    assert final is not None and final.directory == "failed"
    assert parts.status(final)["state"] == "cancelled"


def test_a_job_that_succeeds_before_the_cancel_reaches_it_succeeded(parts: Parts) -> None:
    mark = parts.spool.root.parent / "asked"
    job = parts.submit(_job("quick", f'while [ ! -e "{mark}" ]; do sleep 0.02; done'))
    thread, ended = _run_in_thread(parts, job)
    wait_for((parts.spool.dir("running") / "quick" / "lease").exists, bound=20,
             what="the job to run")  # fmt: skip
    parts.control.cancel("quick")
    mark.touch()
    thread.join(20)
    [final] = ended
    assert final is not None and parts.status(final)["state"] == "succeeded", "its work was done"


# -- the real daemon -------------------------------------------------------------------------------


@pytest.mark.daemon
def test_a_cancel_made_while_the_daemon_is_down_ends_the_job_at_its_restart(
    spool_dir: Path, tmp_path: Path, receiver: Receiver
) -> None:
    sleep, token = sleep_command(tmp_path, "spoold-cancel")
    daemon = DaemonProcess(spool_dir, write_config(tmp_path / "config.yaml", spool_dir))
    # Outlasts the kill, the cancel and the restart however slow they are: the cancel ends it.
    document = local_job("c1", f"{sleep} 300", on_interrupt="requeue", retries=2,
                         callback={"url": receiver.url, "secret": "s3cret"})  # fmt: skip
    try:
        daemon.start()
        drop(spool_dir, "c1.yaml", document)
        wait_for(lambda: processes_with(token), what="the job to run")
        wait_for(lambda: any(b["event"] == "started" for b in receiver.bodies()),
                 what="the started callback")  # fmt: skip
        daemon.kill()  # kill -9: its job's process lives on, in a session of its own
        asked = run_cli(spool_dir, "cancel", "c1", "--wait", "0")
        assert asked.returncode == 0, asked.stderr
        assert (spool_dir / "running" / "c1" / "cancel").exists()

        daemon.start()  # recovery runs before READY
        directory, status = wait_finished(spool_dir, "c1")
        assert (directory, status["state"]) == ("failed", "cancelled"), status
        assert status["error"].startswith("cancelled by root on "), status["error"]
        assert [a["number"] for a in status["attempts"]] == [1], "no attempt 2"
        wait_for(lambda: not processes_with(token), what="the leftover to be killed")

        def last_event() -> str | None:
            bodies = [b for b in receiver.bodies() if b["job_id"] == "c1"]
            ended = max(bodies, key=lambda b: b["sequence"]) if bodies else None
            return ended["event"] if ended and ended["event"] == "cancelled" else None

        wait_for(last_event, what="the cancelled callback")
        events = [b["event"] for b in sorted(receiver.bodies(), key=lambda b: b["sequence"])]
        assert events[-1] == "cancelled" and "retrying" not in events, events
        assert "job c1 cancelled by root on " in daemon.log()
        assert job_state(spool_dir, "c1") == (directory, status), "it stays cancelled"
    finally:
        daemon.kill()
        kill_processes_with(token)


@pytest.mark.daemon
@pytest.mark.parametrize("how", ["stopped-by-its-worker", "fails-on-its-own"])
def test_a_running_job_cancelled_with_retries_left_is_not_retried(
    spool_dir: Path, tmp_path: Path, how: str
) -> None:
    if how == "stopped-by-its-worker":  # SIGTERM from the worker; the job exits 3 on it
        script, overrides = "trap 'exit 3' TERM; sleep 30 & wait", {}
    else:  # exits 3 just after the request, before the worker's next look
        script, overrides = fails_when(tmp_path / "asked"), {"poll_interval": "1h"}
    daemon = DaemonProcess(spool_dir, write_config(tmp_path / "config.yaml", spool_dir,
                                                   **overrides))  # fmt: skip
    try:
        daemon.start()
        drop(spool_dir, "c2.yaml", local_job("c2", script, retries=2, backoff="200ms"))
        wait_for((spool_dir / "running" / "c2" / "lease").exists, what="c2 to run")
        asking = subprocess.Popen(
            [sys.executable, "-m", "spoold", "cancel", "--spool", str(spool_dir), "c2", "--wait",
             "45"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        wait_for((spool_dir / "running" / "c2" / "cancel").exists, what="the request")
        (tmp_path / "asked").touch()
        out, err = asking.communicate(timeout=DEFAULT_BOUND)  # its --wait, and its start
        asked = subprocess.CompletedProcess(asking.args, asking.returncode, out, err)
        assert asked.returncode == 0, asked.stdout + asked.stderr
        assert "c2: cancelled" in asked.stdout
        directory, status = wait_finished(spool_dir, "c2")
        assert (directory, status["state"], len(status["attempts"])) == ("failed", "cancelled", 1)
        assert status["exit_code"] == 3 and status["next_attempt_at"] is None
        wait_for(lambda: "job c2 cancelled by root on " in daemon.log(),
                 what="the daemon's log line")  # fmt: skip
        assert "job c2 attempt" not in daemon.log(), "no retry was ever due"
    finally:
        daemon.kill()
