"""Job semantics on the real daemon (issue 3): cancel, retry, secrets, priorities.

Retries waiting for their backoff, across a restart too, are driven round by round on a
FakeClock in test_daemon_ticks.
"""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import pytest
import yaml

from spoold.core.spool import JobDir
from tests.harness import (
    DaemonProcess,
    drop,
    job_log,
    job_state,
    kill_processes_with,
    local_job,
    processes_with,
    run_cli,
    sleep_command,
    spares_of_live_processes,
    wait_finished,
    wait_for,
    write_config,
)
from tests.test_job_semantics import check_twenty_steps, twenty_steps

pytestmark = pytest.mark.daemon

FLAKY = 'test "$SPOOLD_ATTEMPT" -gt 1 || exit 75'  # fails its first attempt only


def test_cancel_ends_a_running_job_and_its_whole_process_tree(
    daemon: DaemonProcess, spool_dir: Path, tmp_path: Path
) -> None:
    sleep, token = sleep_command(tmp_path, "spoold-test")
    # Children and a grandchild that left the job's environment behind (env -i).
    tree = f"{sleep} 300 & env -i sh -c '{sleep} 301' & {sleep} 302; wait"
    drop(spool_dir, "long.yaml", local_job("long", tree))
    try:
        wait_for(lambda: len(processes_with(token)) >= 3, what="the job's processes")
        result = run_cli(spool_dir, "cancel", "long")
        assert result.returncode == 0, result.stderr
        assert "long: cancelled" in result.stdout
        directory, status = job_state(spool_dir, "long") or ("", {})
        assert directory == "failed", status
        assert status["state"] == "cancelled"
        assert status["error"].startswith("cancelled by root on ")
        assert processes_with(token) == [], "cancel left processes behind"
        assert not (spool_dir / "failed" / "long" / "cancel").exists()
        assert "cancelled by root" in (spool_dir / "failed" / "long" / "log").read_text()
    finally:
        kill_processes_with(token)


def test_cancel_of_a_pending_job_ends_it_before_it_starts(spool_dir: Path, tmp_path: Path) -> None:
    sleep, token = sleep_command(tmp_path, "spoold-test")
    daemon = DaemonProcess(spool_dir, write_config(tmp_path / "one.yaml", spool_dir, workers=1))
    daemon.start()
    try:
        drop(spool_dir, "busy.yaml", local_job("busy", f"{sleep} 300"))
        wait_for(lambda: processes_with(token), what="the first job to run")
        drop(spool_dir, "queued.yaml", local_job("queued", "echo never"))
        wait_for((spool_dir / "pending" / "queued").is_dir, what="queued to be pending")
        result = run_cli(spool_dir, "cancel", "queued")
        assert result.returncode == 0, result.stderr
        assert "cancelled before it started" in result.stdout
        directory, status = job_state(spool_dir, "queued") or ("", {})
        assert (directory, status["state"], status["attempts"]) == ("failed", "cancelled", [])
        assert run_cli(spool_dir, "cancel", "busy").returncode == 0
        assert job_state(spool_dir, "busy")[1]["state"] == "cancelled"  # type: ignore[index]
        again = run_cli(spool_dir, "cancel", "queued")
        assert again.returncode == 1 and "already cancelled" in again.stderr
    finally:
        daemon.kill()
        kill_processes_with(token)


def test_retry_runs_a_failed_job_again_at_once_keeping_its_history(
    spool_dir: Path, tmp_path: Path
) -> None:
    # No periodic scan for an hour: only the wake-up of `spoold retry` can start it again.
    config = write_config(tmp_path / "slow.yaml", spool_dir, rescan_interval="1h")
    daemon = DaemonProcess(spool_dir, config)
    daemon.start()
    try:
        drop(spool_dir, "again.yaml", local_job("again", FLAKY))
        directory, status = wait_finished(spool_dir, "again")
        assert (directory, status["exit_code"]) == ("failed", 75)
        result = run_cli(spool_dir, "retry", "again")
        assert result.returncode == 0, result.stderr
        directory, status = wait_finished(spool_dir, "again")
        assert directory == "done", status
        assert [a["exit_code"] for a in status["attempts"]] == [75, 0]
        log = (spool_dir / "done" / "again" / "log").read_text()
        assert "retry requested by root" in log and "attempt 2 started" in log
        refused = run_cli(spool_dir, "retry", "again")
        assert refused.returncode == 1 and "only a failed or cancelled job" in refused.stderr
    finally:
        daemon.kill()


def test_a_secret_never_reaches_a_file_spoold_writes(spool_dir: Path, tmp_path: Path) -> None:
    secret = "s3cr3t-for-the-daemon-only"
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    (secrets / "api_token").write_text(secret + "\n")
    (secrets / "api_token").chmod(0o600)
    config = write_config(tmp_path / "config.yaml", spool_dir, secrets_dir=str(secrets))
    daemon = DaemonProcess(spool_dir, config)
    daemon.start()
    try:
        commands = [
            'echo "token is ${secret:api_token}"',
            'echo "and on stderr: $SPOOLD_SECRET_API_TOKEN" >&2',
            'test "$SPOOLD_ATTEMPT" -gt 1 || exit 3',
        ]
        job = local_job("leaky", commands, retries=1, backoff="100ms",
                        callback={"url": "http://127.0.0.1:9/", "secret": "cb-" + secret})  # fmt: skip
        drop(spool_dir, "leaky.yaml", job)
        directory, status = wait_finished(spool_dir, "leaky")
        assert directory == "done", status
        log = (spool_dir / "done" / "leaky" / "log").read_text()
        assert log.count("token is ***") == 2 and log.count("and on stderr: ***") == 2
        # A program that cannot start, named by the secret: its error was written to
        # units/1.end in clear (status.json and the log had it masked).
        unstartable = local_job("unstartable", "true", variables={"REF": "${secret:api_token}"})
        unstartable["product"]["shell"] = "/bin/${REF}"
        drop(spool_dir, "unstartable.yaml", unstartable)
        directory, status = wait_finished(spool_dir, "unstartable")
        assert directory == "failed" and "/bin/***" in status["error"], status
    finally:
        daemon.kill()
    # What outlives the daemon a moment (its worker processes, an idle supervisor) removes the
    # spares it made ahead as it ends: the files are read once none is left to go meanwhile.
    wait_for(
        lambda: not spares_of_live_processes(spool_dir / "tmp"),
        what="the daemon's processes to end",
    )
    written = [p for p in spool_dir.rglob("*") if p.is_file() and p.name != "job.yaml"]
    leaks = [str(p) for p in [*written, daemon.log_path] if secret in p.read_text(errors="replace")]
    assert leaks == []


def test_validate_plan_prints_the_order_of_the_steps(spool_dir: Path, tmp_path: Path) -> None:
    document = {"job_id": "plan", "executor": "local", "steps": [
        {"id": "fetch", "product": {"commands": "true"}},
        {"id": "lint", "product": {"commands": "true"}},
        {"id": "build", "needs": ["fetch", "lint"], "product": {"commands": "true"}},
    ]}  # fmt: skip
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(document))
    result = run_cli(spool_dir, "validate", "--plan", str(path))
    assert result.returncode == 0, result.stderr
    assert "1. fetch, lint (run in parallel)\n2. build\n   build <- fetch, lint" in result.stdout


def test_a_job_cancelled_while_it_waited_for_a_retry_and_retried_runs_at_once(
    spool_dir: Path, tmp_path: Path
) -> None:
    """Cancelled while it waited an hour for its second attempt, then retried: `spoold
    status` said it waited for its turn, but it ran at the hour the cancelled retry had
    been due; the cancel said it ended the job "before it started"."""
    config = write_config(tmp_path / "slow.yaml", spool_dir, rescan_interval="1h")
    daemon = DaemonProcess(spool_dir, config)
    daemon.start()
    try:
        drop(spool_dir, "later.yaml", local_job("later", FLAKY, retries=1, backoff="1h"))
        wait_for(lambda: "due at" in job_log(spool_dir, "later"), what="its retry to wait")
        cancelled = run_cli(spool_dir, "cancel", "later")
        assert cancelled.returncode == 0, cancelled.stderr
        assert "cancelled before attempt 2 started" in cancelled.stdout
        status = job_state(spool_dir, "later")[1]  # type: ignore[index]
        assert status["state"] == "cancelled" and "before attempt 2 started" in status["error"]
        retried = run_cli(spool_dir, "retry", "later")
        assert retried.returncode == 0, retried.stderr
        directory, status = wait_finished(spool_dir, "later")
        assert directory == "done", status
        assert [a["exit_code"] for a in status["attempts"]] == [75, 0]
    finally:
        daemon.kill()


def test_cancel_stops_a_job_of_steps_and_starts_no_more(
    daemon: DaemonProcess, spool_dir: Path, tmp_path: Path
) -> None:
    sleep, token = sleep_command(tmp_path, "spoold-test")
    steps = [
        {"id": "first", "product": {"commands": "echo first"}},
        {"id": "long-a", "needs": ["first"], "product": {"commands": f"{sleep} 300"}},
        {"id": "long-b", "needs": ["first"], "product": {"commands": f"{sleep} 301"}},
        {"id": "never", "needs": ["long-a", "long-b"], "product": {"commands": "echo never"}},
    ]
    drop(spool_dir, "dag.yaml", {"job_id": "dag", "executor": "local", "steps": steps})
    try:
        sleeping = f"{token}-sleep\x0030"  # the sleeps themselves, not the shells around them
        wait_for(lambda: len(processes_with(sleeping)) == 2, what="both long steps to run at once")
        result = run_cli(spool_dir, "cancel", "dag")
        assert result.returncode == 0, result.stdout + result.stderr
        directory, status = job_state(spool_dir, "dag") or ("", {})
        assert (directory, status["state"]) == ("failed", "cancelled")
        states = {step: record["state"] for step, record in status["steps"].items()}
        assert states == {"first": "succeeded", "long-a": "cancelled", "long-b": "cancelled",
                          "never": "skipped"}  # fmt: skip
        assert processes_with(token) == []
    finally:
        kill_processes_with(token)


def test_priority_and_concurrency_keys_decide_what_runs_next(
    spool_dir: Path, tmp_path: Path
) -> None:
    order, release = tmp_path / "order.txt", tmp_path / "release"
    config = write_config(tmp_path / "one.yaml", spool_dir, workers=1)
    daemon = DaemonProcess(spool_dir, config)
    daemon.start()

    def job(job_id: str, **fields: object) -> dict[str, object]:
        note = f"echo {job_id} >> {order}"
        return local_job(job_id, note, **fields)

    try:
        blocker = f"echo blocker >> {order}; while [ ! -e {release} ]; do sleep 0.02; done"
        drop(spool_dir, "blocker.yaml",
             local_job("blocker", blocker, concurrency={"key": "customer"}))  # fmt: skip
        wait_for(order.exists, what="the blocker to run")
        drop(spool_dir, "waits.yaml", job("waits", concurrency={"key": "customer"}))
        wait_for((spool_dir / "pending" / "waits").is_dir, what="waits to be pending")
        drop(spool_dir, "newest.yaml",
             job("newest", concurrency={"key": "customer", "strategy": "replace"}))  # fmt: skip
        directory, status = wait_finished(spool_dir, "waits")
        assert (directory, status["state"]) == ("failed", "cancelled")
        assert status["error"] == "replaced by job newest (concurrency key 'customer')"
        drop(spool_dir, "skipped.yaml",
             job("skipped", concurrency={"key": "customer", "strategy": "skip"}))  # fmt: skip
        directory, status = wait_finished(spool_dir, "skipped")
        assert (directory, status["state"]) == ("failed", "cancelled")
        assert status["error"].startswith("skipped: 2 job(s) with concurrency key 'customer'")
        drop(spool_dir, "low.yaml", job("low"))
        drop(spool_dir, "high.yaml", job("high", priority=10))
        wait_for((spool_dir / "pending" / "high").is_dir, what="high to be pending")
        release.touch()
        for job_id in ("blocker", "newest", "low", "high"):
            assert wait_finished(spool_dir, job_id)[0] == "done"
        assert order.read_text().split() == ["blocker", "high", "newest", "low"]
    finally:
        daemon.kill()


def test_a_per_executor_limit_holds_back_only_that_executor(
    spool_dir: Path, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    limits = {"executors": {"local": 1}}
    daemon = DaemonProcess(spool_dir, write_config(tmp_path / "c.yaml", spool_dir, limits=limits))
    daemon.start()
    try:
        blocker = f"while [ ! -e {release} ]; do sleep 0.02; done"
        drop(spool_dir, "blocker.yaml", local_job("blocker", blocker))
        wait_for((spool_dir / "running" / "blocker").is_dir, what="the blocker to run")
        drop(spool_dir, "second.yaml", local_job("second", "true"))
        wait_for((spool_dir / "pending" / "second").is_dir, what="second to be pending")
        other = {"job_id": "other", "executor": "custom", "product": {"script": "true"}}
        drop(spool_dir, "other.yaml", other)
        # "other" came after "second" and ran on the free slot: "second" was passed over.
        assert wait_finished(spool_dir, "other")[0] == "done"
        assert job_state(spool_dir, "second") is not None
        assert job_state(spool_dir, "second")[0] == "pending"  # type: ignore[index]
        release.touch()
        assert wait_finished(spool_dir, "second")[0] == "done"
    finally:
        daemon.kill()


def test_a_dag_of_twenty_steps_on_the_daemon(daemon: DaemonProcess, spool_dir: Path) -> None:
    drop(spool_dir, "dag.yaml", {"job_id": "dag", "executor": "local", "steps": twenty_steps()})
    directory, status = wait_finished(spool_dir, "dag")
    check_twenty_steps(JobDir("dag", directory, str(spool_dir / directory / "dag")), status)


def _log_socket(path: Path, buffer: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
    sock.bind(str(path))
    sock.settimeout(30)
    return sock


def test_runner_log_socket_receives_every_line_of_a_job(spool_dir: Path, tmp_path: Path) -> None:
    path = Path(tempfile.mkdtemp(prefix="spoold-tap-")) / "log.sock"  # short: sun_path is small
    with _log_socket(path) as reader:
        daemon = DaemonProcess(spool_dir, write_config(tmp_path / "c.yaml", spool_dir),
                               env={"RUNNER_LOG_SOCKET": str(path)})  # fmt: skip
        daemon.start()
        try:
            drop(spool_dir, "talk.yaml", local_job("talk", ["echo one", "echo two >&2"]))
            lines: list[str] = []
            while not any("attempt 1 succeeded" in line for line in lines):
                lines.append(reader.recv(65536).decode())
            wait_finished(spool_dir, "talk")
        finally:
            daemon.kill()
    assert all(line.startswith("talk ") for line in lines)
    assert any(line.endswith(" INFO one\n") for line in lines)
    assert any(line.endswith(" ERROR two\n") for line in lines)
    assert (
        "".join(line.removeprefix("talk ") for line in lines)
        in (spool_dir / "done" / "talk" / "log").read_text()
    )


def test_a_log_socket_nobody_reads_never_holds_a_job_up(spool_dir: Path, tmp_path: Path) -> None:
    path = Path(tempfile.mkdtemp(prefix="spoold-tap-")) / "log.sock"
    with _log_socket(path, buffer=4096):  # fills after a few lines, and nobody reads it
        daemon = DaemonProcess(spool_dir, write_config(tmp_path / "c.yaml", spool_dir),
                               env={"RUNNER_LOG_SOCKET": str(path)})  # fmt: skip
        daemon.start()
        try:
            lines = "i=0; while [ $i -lt 20000 ]; do echo line $i; i=$((i+1)); done"
            drop(spool_dir, "flood.yaml", local_job("flood", lines))
            directory, status = wait_finished(spool_dir, "flood")
        finally:
            daemon.kill()
    assert directory == "done", status
    assert (spool_dir / "done" / "flood" / "log").read_text().count(" INFO line ") == 20000
