"""Adopted jobs under a hostile probe: the supervisor of an adopted job dies (while the daemon
that adopted it watches, or while no daemon runs), a job ends while no daemon runs, a record
names a pid that is someone else's now.

Each job's command line carries a token of its test (its ``sleep``'s length), so that what
it left running is found in /proc, and ended after the test whatever happened.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from spoold.core.procfs import process_start_time
from tests.harness import (
    DaemonProcess,
    drop,
    job_log,
    job_state,
    kill_processes_with,
    local_job,
    processes_with,
    running,
    supervisors,
    wait_finished,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.daemon


@pytest.fixture
def token() -> Iterator[str]:
    """A length of sleep no other test uses: the job's processes are found by it, and ended
    after the test."""
    made = f"47.{uuid.uuid4().int % 10**9:09d}"
    yield made
    kill_processes_with(made)


@pytest.fixture
def daemon(spool_dir: Path, tmp_path: Path) -> Iterator[DaemonProcess]:
    """A daemon not started yet; killed after the test, with what it left running."""
    process = DaemonProcess(spool_dir, write_config(tmp_path / "c.yaml", spool_dir))
    yield process
    process.kill()


def _when(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def _units(spool: Path, job_id: str) -> Path:
    return spool / "running" / job_id / "units"


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not running(pid), what=f"process {pid} to die")


def _adopted(spool: Path, job_id: str) -> bool:
    return "adopted" in job_log(spool, job_id)


def _left_with_the_job_running(
    daemon: DaemonProcess, spool: Path, job_id: str, key: str = "1"
) -> int:
    """kill -9 the daemon, its job going on; the supervisor of the job's unit ``key``."""
    daemon.kill(leave_jobs=True)
    assert (spool / "running" / job_id).is_dir(), "the job goes on without its daemon"
    supervisor = json.loads((_units(spool, job_id) / key).read_text())["pid"]
    assert isinstance(supervisor, int) and supervisor in supervisors(spool), "it outlived it"
    return supervisor


# -- 1. nothing a job started outlives its supervisor, adopted or not ---------------------------


#: A job's commands, and one whose processes clear their environment: found by neither
#: token nor job directory, but by the group and session of its first process.
_COMMANDS = {
    "plain": "echo s; sleep {token}",
    "cleared-environment": "echo s; exec env -i /bin/sh -c 'sleep {token} & wait'",
}


@pytest.mark.parametrize("commands", list(_COMMANDS))
@pytest.mark.parametrize("when", ["after-its-adoption", "while-no-daemon-runs"])
def test_the_processes_of_an_adopted_job_end_when_its_supervisor_dies(
    spool_dir: Path, daemon: DaemonProcess, token: str, when: str, commands: str
) -> None:
    daemon.start()
    script = _COMMANDS[commands].format(token=token)
    drop(spool_dir, "supkill2.yaml", local_job("supkill2", script))
    wait_for(lambda: len(processes_with(token)) == 2, what="the job's shell and its sleep")
    lease = spool_dir / "running" / "supkill2" / "lease"
    if when == "while-no-daemon-runs":
        # A process that cleared its environment is known by the one the lease names, once
        # a heartbeat wrote it there.
        wait_for(lambda: json.loads(lease.read_text())["job_pid"], what="the lease to name it")
        _kill(_left_with_the_job_running(daemon, spool_dir, "supkill2"))
        daemon.start()
    else:
        supervisor = _left_with_the_job_running(daemon, spool_dir, "supkill2")
        # Killed before a heartbeat named the job's process in the lease: the adopter knows
        # it by the supervisor's children.
        lease.write_text(json.dumps({**json.loads(lease.read_text()), "job_pid": None}))
        daemon.start()
        wait_for(lambda: "adopted the job" in job_log(spool_dir, "supkill2"),
                 what="the new daemon to attach to the job's supervisor")  # fmt: skip
        _kill(supervisor)
    directory, status = wait_finished(spool_dir, "supkill2")
    assert (directory, status["state"]) == ("failed", "failed"), status
    assert status["error"] == "interrupted: its supervisor died", status["error"]
    # Ended before its outcome was recorded, as at every end of a job.
    assert processes_with(token) == [], "nothing the job started outlives its supervisor"
    log = (spool_dir / "failed" / "supkill2" / "log").read_text()
    assert "ended 2 process(es) the job left running" in log, log


@pytest.fixture
def stranger(token: str) -> Iterator[subprocess.Popen[bytes]]:
    """A process that is not the job's, leading a group and a session of its own: what a
    reused pid would name."""
    process = subprocess.Popen(["sleep", token.replace("47.", "48.", 1)], start_new_session=True)
    yield process
    process.kill()
    process.wait()


@pytest.mark.parametrize("recovered", ["adopted", "after-a-reboot"])
def test_a_pid_that_names_another_process_now_is_left_alone(
    spool_dir: Path,
    daemon: DaemonProcess,
    token: str,
    stranger: subprocess.Popen[bytes],
    recovered: str,
) -> None:
    """The lease names the job's first process by pid and start time: a live process of that
    pid that started at another time is someone else's (the pid was reused), and so is its
    group, though it started after the job's did."""
    daemon.start()
    drop(spool_dir, "reused.yaml", local_job("reused", f"echo s; sleep {token}"))
    wait_for(lambda: len(processes_with(token)) == 2, what="the job's shell and its sleep")
    supervisor = _left_with_the_job_running(daemon, spool_dir, "reused")
    _kill(supervisor)
    lease_file = spool_dir / "running" / "reused" / "lease"
    lease: dict[str, Any] = json.loads(lease_file.read_text())
    start = process_start_time(stranger.pid)
    assert start is not None
    lease.update(job_pid=stranger.pid, job_pid_start=start - 1)  # its pid, an earlier start
    if recovered == "after-a-reboot":
        lease["boot_id"] = "another-boot"
    lease_file.write_text(json.dumps(lease))
    daemon.start()
    directory, status = wait_finished(spool_dir, "reused")
    assert (directory, status["state"]) == ("failed", "failed"), status
    assert stranger.poll() is None, "a process that only has a pid the lease names lives on"
    wait_for(lambda: not processes_with(token), what="the job's processes to end")


# -- 2. a job that ended while no daemon ran keeps the end its supervisor recorded --------------


@pytest.mark.parametrize("how", ["exit", "timeout", "steps"])
def test_a_job_that_ended_while_no_daemon_ran_keeps_its_recorded_end(
    spool_dir: Path, tmp_path: Path, daemon: DaemonProcess, token: str, how: str
) -> None:
    mark = tmp_path / "go"
    wait = f"until [ -e {mark} ]; do sleep 0.05; done"
    document: dict[str, Any]
    if how == "exit":
        document, last = local_job("ended", f"{wait}; exit 7"), "1"
    elif how == "timeout":  # long enough for the kill -9 below to come first, whatever the load
        document, last = local_job("ended", f"sleep {token}", timeout="10s"), "1"
    else:
        document = {
            "job_id": "ended", "executor": "local",
            "steps": [
                {"id": "one", "product": {"commands": "true"}},
                {"id": "two", "needs": ["one"], "product": {"commands": f"{wait}; exit 7"}},
            ],
        }  # fmt: skip
        last = "1.two.1"
    daemon.start()
    drop(spool_dir, "ended.yaml", document)
    seen = token if how == "timeout" else str(mark)
    wait_for(lambda: processes_with(seen), what="the job to run")
    _left_with_the_job_running(daemon, spool_dir, "ended", last)
    mark.touch()  # it ends while nothing watches it
    record_file = _units(spool_dir, "ended") / f"{last}.end"
    wait_for(record_file.exists, what="its supervisor's record of its end")
    record = json.loads(record_file.read_text())
    ended = _when(record["finished_at"])
    # The next daemon comes well after the end: its adoption is not the job's end.
    wait_for(lambda: time.time() > ended.timestamp() + 2, what="two seconds past its end")
    daemon.start()
    directory, status = wait_finished(spool_dir, "ended")
    assert (directory, status["exit_code"]) == ("failed", -15 if how == "timeout" else 7), status
    [attempt] = status["attempts"]
    assert status["finished_at"] == attempt["finished_at"] == record["finished_at"], status
    wall = (ended - _when(attempt["started_at"])).total_seconds()
    assert attempt["usage"]["wall_seconds"] == pytest.approx(wall, abs=0.002), attempt
    assert attempt["usage"]["cpu_user_seconds"] is not None, "the record's figures"
    if how == "steps":  # the step's own entry too (it said the adoption's time)
        assert status["steps"]["two"]["finished_at"] == record["finished_at"], status["steps"]


# -- 3. what the log says when a supervisor dies ------------------------------------------------


@pytest.mark.parametrize("adopted", [False, True], ids=["watched", "adopted"])
def test_a_requeue_after_a_supervisor_died_says_so(
    spool_dir: Path, tmp_path: Path, daemon: DaemonProcess, token: str, adopted: bool
) -> None:
    once = tmp_path / "once"
    commands = f"if [ -e {once} ]; then echo again; exit 0; fi; touch {once}; sleep {token}"
    daemon.start()
    drop(spool_dir, "requeue.yaml", local_job("requeue", commands, on_interrupt="requeue"))
    wait_for(lambda: once.exists() and len(processes_with(token)) == 2, what="the job to run")
    if adopted:
        supervisor = _left_with_the_job_running(daemon, spool_dir, "requeue")
        daemon.start()
        wait_for(lambda: _adopted(spool_dir, "requeue"), what="the job's adoption")
    else:
        [supervisor] = supervisors(spool_dir)
    _kill(supervisor)
    directory, status = wait_finished(spool_dir, "requeue")
    assert (directory, status["state"]) == ("done", "succeeded"), status
    first, _ = status["attempts"]
    assert first["error"] == "interrupted: its supervisor died", first
    log = (spool_dir / "done" / "requeue" / "log").read_text()
    assert "spoold is stopping" not in log, log
    said = "interrupted: its supervisor died; the job goes back to pending (on_interrupt: requeue)"
    assert said in log, log
    assert job_state(spool_dir, "requeue") == (directory, status)
