"""Jobs outlive their daemon: a crash, ``kill -9``, a stop or an upgrade leaves each local job
running under its supervisor; the next daemon adopts it, or records how it ended while no
daemon watched. Never run twice, never lost, callbacks once."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pwd
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    DaemonProcess,
    drop,
    end_supervisors,
    gate_wait,
    local_job,
    supervisors,
    wait_finished,
    wait_for,
    write_config,
)
from tests.receiver import Receiver
from tests.sshd import SshServer

pytestmark = pytest.mark.daemon


def _waits_for(mark: Path, runs: Path) -> str:
    """A job that counts its runs in ``runs``, then waits for ``mark`` (the test's go)."""
    return (
        f"echo run >> {runs}; echo waiting; until [ -e {mark} ]; do sleep 0.05; done; echo released"
    )


def _events(receiver: Receiver, job_id: str) -> list[str]:
    """The job's events as a receiver sees them: a delivery sent again after a crash (its
    answer may not have been recorded) is the same delivery (``delivery_id``), counted once."""
    bodies = {b["delivery_id"]: b for b in receiver.bodies() if b["job_id"] == job_id}
    return [b["event"] for b in sorted(bodies.values(), key=lambda b: b["sequence"])]


def _units(spool: Path, job_id: str) -> Path:
    return spool / "running" / job_id / "units"


@pytest.mark.parametrize("how", ["kill-9", "stop"])
def test_a_job_goes_on_across_a_daemon_restart_and_finishes_once(
    spool_dir: Path, tmp_path: Path, receiver: Receiver, how: str
) -> None:
    mark, runs = tmp_path / "go", tmp_path / "runs"
    daemon = DaemonProcess(spool_dir, write_config(tmp_path / "c.yaml", spool_dir))
    document = local_job("long", _waits_for(mark, runs), on_interrupt="requeue",
                         callback={"url": receiver.url, "secret": "s3cret"})  # fmt: skip
    try:
        daemon.start()
        drop(spool_dir, "long.yaml", document)
        wait_for(lambda: supervisors(spool_dir), what="the job's supervisor")
        wait_for(lambda: "started" in _events(receiver, "long"), what="the started callback")
        if how == "kill-9":
            daemon.kill(leave_jobs=True)
        else:
            assert daemon.stop(leave_jobs=True) == 0
        [supervisor] = supervisors(spool_dir)  # it outlived the daemon
        assert (spool_dir / "running" / "long").is_dir()
        daemon.start()
        wait_for(lambda: "adopted" in (spool_dir / "running" / "long" / "log").read_text(),
                 what="the new daemon to adopt the job")  # fmt: skip
        assert supervisors(spool_dir) == [supervisor], "attached to, not started again"
        mark.touch()
        directory, status = wait_finished(spool_dir, "long")
        assert (directory, status["state"]) == ("done", "succeeded"), status
        assert len(status["attempts"]) == 1 and runs.read_text() == "run\n", "ran once"
        log = (spool_dir / "done" / "long" / "log").read_text()
        assert log.count("INFO waiting") == 1 and "INFO released" in log, log
        wait_for(lambda: _events(receiver, "long")[-1:] == ["succeeded"], what="the end callback")
        assert _events(receiver, "long") == ["accepted", "started", "succeeded"]
    finally:
        daemon.kill()


def test_a_job_that_ends_while_no_daemon_runs_is_recorded_at_the_restart(
    spool_dir: Path, tmp_path: Path
) -> None:
    mark, runs = tmp_path / "go", tmp_path / "runs"
    daemon = DaemonProcess(spool_dir, write_config(tmp_path / "c.yaml", spool_dir))
    script = _waits_for(mark, runs) + "; exit 4"
    try:
        daemon.start()
        drop(spool_dir, "gone.yaml", local_job("gone", script, on_interrupt="requeue"))
        wait_for(lambda: supervisors(spool_dir), what="the job's supervisor")
        daemon.kill(leave_jobs=True)
        mark.touch()  # it ends while nothing watches it
        wait_for((_units(spool_dir, "gone") / "1.end").exists, what="its supervisor's record")
        daemon.start()
        directory, status = wait_finished(spool_dir, "gone")
        assert (directory, status["state"], status["exit_code"]) == ("failed", "failed", 4)
        assert len(status["attempts"]) == 1 and runs.read_text() == "run\n", "not requeued"
    finally:
        daemon.kill()


def test_a_job_with_steps_goes_on_from_the_step_that_ran(spool_dir: Path, tmp_path: Path) -> None:
    mark, runs = tmp_path / "go", tmp_path / "runs"
    first = tmp_path / "first-ran"
    document: dict[str, Any] = {
        "job_id": "steps", "executor": "local", "on_interrupt": "requeue",
        "hooks": {"pre_run": f"echo pre >> {tmp_path / 'pre'}"},
        "steps": [
            {"id": "one", "product": {"commands": f"echo one >> {first}"}},
            {"id": "two", "needs": ["one"], "product": {"commands": _waits_for(mark, runs)}},
            {"id": "three", "needs": ["two"], "product": {"commands": "echo three"}},
        ],
    }  # fmt: skip
    daemon = DaemonProcess(spool_dir, write_config(tmp_path / "c.yaml", spool_dir))
    try:
        daemon.start()
        drop(spool_dir, "steps.yaml", document)
        wait_for(runs.exists, what="step two to run")
        daemon.kill(leave_jobs=True)
        daemon.start()
        mark.touch()
        directory, status = wait_finished(spool_dir, "steps")
        assert (directory, status["state"]) == ("done", "succeeded"), status
        assert first.read_text() == "one\n" and runs.read_text() == "run\n", "no step ran twice"
        assert (tmp_path / "pre").read_text() == "pre\n", "nor the pre_run hook"
        assert {k: v["state"] for k, v in status["steps"].items()} == {
            "one": "succeeded", "two": "succeeded", "three": "succeeded",
        }  # fmt: skip
    finally:
        daemon.kill()


def test_after_a_reboot_the_jobs_on_interrupt_decides(spool_dir: Path, tmp_path: Path) -> None:
    """A lease from another boot names nothing that still runs: no adoption, the policy."""
    mark, runs = tmp_path / "go", tmp_path / "runs"
    daemon = DaemonProcess(spool_dir, write_config(tmp_path / "c.yaml", spool_dir))
    try:
        daemon.start()
        drop(spool_dir, "boot.yaml", local_job("boot", _waits_for(mark, runs)))
        wait_for(lambda: supervisors(spool_dir), what="the job's supervisor")
        daemon.kill()  # and its supervisor, as the power loss would
        lease = spool_dir / "running" / "boot" / "lease"
        record = json.loads(lease.read_text())
        lease.write_text(json.dumps({**record, "boot_id": "another-boot"}))
        daemon.start()
        directory, status = wait_finished(spool_dir, "boot")
        assert (directory, status["state"]) == ("failed", "failed"), status
        assert status["error"].startswith("interrupted"), status["error"]
    finally:
        daemon.kill()


def test_a_supervisor_that_is_killed_interrupts_its_job(spool_dir: Path, tmp_path: Path) -> None:
    """kill -9 of a supervisor itself (the OOM killer): the job's on_interrupt decides, and
    nothing of the job is left running."""
    mark, runs = tmp_path / "go", tmp_path / "runs"
    daemon = DaemonProcess(spool_dir, write_config(tmp_path / "c.yaml", spool_dir))
    try:
        daemon.start()
        drop(spool_dir, "oom.yaml", local_job("oom", _waits_for(mark, runs)))
        wait_for(lambda: supervisors(spool_dir), what="the job's supervisor")
        [supervisor] = supervisors(spool_dir)
        os.kill(supervisor, signal.SIGKILL)
        directory, status = wait_finished(spool_dir, "oom")
        assert (directory, status["state"]) == ("failed", "failed"), status
        assert "its supervisor died" in status["error"], status["error"]
    finally:
        daemon.kill()
        end_supervisors(spool_dir)
        mark.touch()  # its job, orphaned by the killed supervisor, ends here at the latest


def test_kill_9_while_a_local_a_docker_and_an_ssh_job_run(
    spool_dir: Path, tmp_path: Path, receiver: Receiver, dockerd: str, sshd: SshServer
) -> None:
    """The daemon dies while three kinds of job run; the next one adopts each (a supervisor,
    a container by its labels, a remote command by its pid file): every job finishes once,
    with its outcome, its whole output and its callbacks once."""
    suffix = uuid.uuid4().hex[:8]
    mark, runs = tmp_path / "go", tmp_path / "runs"
    remote_mark = f"/tmp/spoold-adopt-{suffix}"  # the ssh host is this host: the test's gate
    box_gate = tmp_path / "box-gate"  # the container's, mounted
    box_gate.mkdir(mode=0o777)
    callback = {"url": receiver.url, "secret": "s3cret"}
    jobs: dict[str, dict[str, Any]] = {
        f"local-{suffix}": local_job(
            f"local-{suffix}", _waits_for(mark, runs) + "; exit 3", callback=callback
        ),
        f"box-{suffix}": {
            "job_id": f"box-{suffix}",
            "executor": "docker",
            "callback": callback,
            "product": {
                "image": dockerd,
                "script": f"echo box-up; {gate_wait('/gate/go')}; echo box-down",
                "mounts": [f"{box_gate}:/gate"],
            },
        },
        f"ssh-{suffix}": {
            "job_id": f"ssh-{suffix}",
            "executor": "ssh",
            "callback": callback,
            "product": sshd.product(
                commands=f"echo ssh-up; until [ -e {remote_mark} ]; "
                "do sleep 0.05; done; echo ssh-down"
            ),
        },
    }
    daemon = DaemonProcess(spool_dir, write_config(tmp_path / "c.yaml", spool_dir, workers=3))
    try:
        daemon.start()
        for job_id, document in jobs.items():
            drop(spool_dir, f"{job_id}.yaml", document)
        for job_id, word in zip(jobs, ("waiting", "box-up", "ssh-up"), strict=True):
            wait_for(functools.partial(_says, spool_dir, job_id, word), what=f"{job_id} to run")
        # Its output once only if the host knew how far the log had it when the daemon died
        # (else, by design, it comes again from its start): a busy machine may kill it first.
        wait_for(functools.partial(_acknowledged, sshd, f"ssh-{suffix}"),
                 what="the ssh host to know how far the log has the job's output")  # fmt: skip
        daemon.kill(leave_jobs=True)
        daemon.start()
        # Each job runs until the next daemon has adopted it.
        for job_id in jobs:
            wait_for(functools.partial(_says, spool_dir, job_id, "adopted"),
                     what=f"{job_id} to be adopted")  # fmt: skip
        mark.touch()
        (box_gate / "go").touch()
        Path(remote_mark).touch()
        final = {job_id: wait_finished(spool_dir, job_id) for job_id in jobs}
        local, box, ssh = (final[job_id] for job_id in jobs)
        assert (local[0], local[1]["exit_code"]) == ("failed", 3), local
        assert (box[0], box[1]["exit_code"]) == ("done", 0), box
        assert (ssh[0], ssh[1]["exit_code"]) == ("done", 0), ssh
        assert runs.read_text() == "run\n"
        for job_id, (directory, status) in final.items():
            assert len(status["attempts"]) == 1, (job_id, status["attempts"])
            log = (spool_dir / directory / job_id / "log").read_text()
            assert "adopted" in log, (job_id, log)
        box_log = _log_of(spool_dir, f"box-{suffix}")
        assert box_log.count("INFO box-up") == 1 and box_log.count("INFO box-down") == 1, box_log
        ssh_log = _log_of(spool_dir, f"ssh-{suffix}")
        assert ssh_log.count("INFO ssh-up") == 1 and ssh_log.count("INFO ssh-down") == 1, ssh_log
        for job_id, (_, status) in final.items():
            wait_for(functools.partial(_ended, receiver, job_id), what=f"{job_id}'s last callback")
            ended = "succeeded" if status["state"] == "succeeded" else "failed"
            assert _events(receiver, job_id) == ["accepted", "started", ended], job_id
    finally:
        (box_gate / "go").touch()
        daemon.kill()
        Path(remote_mark).unlink(missing_ok=True)


def _says(spool: Path, job_id: str, word: str) -> bool:
    return word in _log_of(spool, job_id)


def _acknowledged(sshd: SshServer, job_id: str) -> bool:
    """Whether the ssh host recorded that the log has some of the job's output (its unit's
    ``logged``, executors/ssh.py)."""
    home = Path(pwd.getpwnam(sshd.user).pw_dir)
    for logged in home.glob(f".spoold/*/{job_id}/*/logged"):
        with contextlib.suppress(OSError, ValueError):
            if int(logged.read_text().split()[0]) > 0:
                return True
    return False


def _ended(receiver: Receiver, job_id: str) -> bool:
    return _events(receiver, job_id)[-1:] in (["succeeded"], ["failed"])


def _log_of(spool: Path, job_id: str) -> str:
    for state in ("running", "done", "failed"):
        path = spool / state / job_id / "log"
        if path.exists():
            return path.read_text()
    return ""
