"""The ssh executor against a real OpenSSH server on 127.0.0.1 (see tests/sshd.py)."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from spoold.executors import ssh
from spoold.executors.base import ExecResult, RunContext
from spoold.executors.ssh import SshExecutor, _Stream, _unit_path

from spoold.core.job import ArtifactSpec
from spoold.run.registry import ExecutorRegistry
from tests.harness import running, wait_for
from tests.loopback import free_port
from tests.sshd import SshServer, keygen
from tests.test_executors import _context, _Log


def ssh_context(
    tmp_path: Path, product: dict[str, Any], **overrides: Any
) -> tuple[RunContext, _Log]:
    """A RunContext for the ssh executor, with a log the test can read."""
    log = overrides.pop("log", None) or _Log()
    job_id = overrides.pop("job_id", f"ssh-{uuid.uuid4().hex[:12]}")
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    own = {**overrides.pop("job_env", {}), "JOB_ID": job_id, "SPOOLD_JOB_ID": job_id}
    env = {**_context(workdir, {}, log).env, **own}
    ctx = _context(
        workdir, product, log, executor="ssh", job_id=job_id, env=env, job_env=own, **overrides
    )
    return ctx, log


def _run(
    tmp_path: Path, product: dict[str, Any], **overrides: Any
) -> tuple[ExecResult, _Log, RunContext]:
    ctx, log = ssh_context(tmp_path, product, **overrides)
    return SshExecutor().run(ctx), log, ctx


def remote_home() -> Path:
    """The home of this user, which is where the test sshd logs in to."""
    return Path(pwd.getpwuid(os.getuid()).pw_dir)


def unit_dir(ctx: RunContext) -> Path:
    """Where the unit of ``ctx`` lives on the host (sshd runs on this host)."""
    return remote_home() / _unit_path(ctx)


def _remote_dirs(ctx: RunContext) -> list[Path]:
    """What the job left of its remote dirs: its units' dirs are under the job's."""
    return [path for path in [unit_dir(ctx).parent] if path.exists()]


def _processes(marker: str) -> list[str]:
    found = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True, check=False)
    return found.stdout.split()


def _marker() -> str:
    # A sleep whose argv is unique to the test: pgrep can tell it from every other.
    return f"{uuid.uuid4().int % 10**9 + 600}.{uuid.uuid4().int % 10**6:06d}"


def test_registered_with_a_schema_that_accepts_its_fields(sshd: SshServer) -> None:
    registry = ExecutorRegistry.from_entry_points()
    assert registry.get("ssh") is SshExecutor
    assert SshExecutor.resumable and not SshExecutor.supervised  # its own supervisor, remotely
    product = sshd.product(commands=["true"], env={"A": "1"}, connect_timeout="5s")
    jsonschema.validate(product, registry.schemas()["ssh"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**product, "shell": "bash; id"}, registry.schemas()["ssh"])


def test_output_is_streamed_into_the_log_by_stream(sshd: SshServer, tmp_path: Path) -> None:
    product = sshd.product(commands='echo "out $JOB_ID"\necho err >&2\nprintf "no newline"')
    result, log, ctx = _run(tmp_path, product)
    assert result.succeeded and result.exit_code == 0
    assert any(line.endswith(f" INFO out {ctx.job_id}") for line in log.lines())
    assert any(line.endswith(" ERROR err") for line in log.lines())
    assert any(line.endswith(" INFO no newline") for line in log.lines())
    assert _remote_dirs(ctx) == []


def test_output_without_newlines_is_cut_in_bounded_memory(sshd: SshServer, tmp_path: Path) -> None:
    """Remote output with no newline was held whole before it was logged."""
    product = sshd.product(commands="head -c 3000000 /dev/zero | tr '\\0' z; echo; echo after")
    result, log, _ = _run(tmp_path, product)
    assert result.succeeded
    text = log.text()
    assert "a line of stdout was 3000000 bytes long: only its first 65536 bytes are kept" in text
    assert text.endswith("after")
    assert len(log.buffer.getvalue()) < 70_000


def test_a_remote_stream_is_held_in_bounded_memory() -> None:
    """20 MB without a newline, as the channel hands it over: never held whole."""
    log = _Log()
    stream = _Stream(log.log, stderr=False)
    chunk = b"z" * 32768
    tracemalloc.start()
    try:
        stream.feed(b"first\n")
        for _ in range(640):
            stream.feed(chunk)
        peak = tracemalloc.get_traced_memory()[1]
        # What the log has whole, for the next spoold to go on from: not the line begun.
        assert (stream.read, stream.logged) == (6 + 640 * 32768, 6)
        stream.feed(b"\nlast")
        assert stream.logged == 6 + 640 * 32768 + 1
        stream.close()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes at the peak"
    assert log.text().endswith("last")
    assert stream.logged == stream.read


def test_exit_code_of_the_remote_commands_is_the_jobs(sshd: SshServer, tmp_path: Path) -> None:
    product = sshd.product(commands=["echo before", "exit 3", "echo never"])
    result, log, ctx = _run(tmp_path, product)
    assert (result.exit_code, result.succeeded, result.error) == (3, False, "exit code 3")
    assert "before" in log.text() and "never" not in log.text()
    assert _remote_dirs(ctx) == []


def test_commands_run_in_the_remote_work_dir(sshd: SshServer, tmp_path: Path) -> None:
    product = sshd.product(commands='[ "$PWD" = "$RUNNER_WORKDIR" ] && echo "in $PWD"')
    result, log, ctx = _run(tmp_path, product)
    assert result.succeeded, log.text()
    assert f"in {unit_dir(ctx)}/work" in log.text()
    assert str(ctx.workdir) not in log.text()


def test_variables_reach_the_remote_side_literally(sshd: SshServer, tmp_path: Path) -> None:
    victim = tmp_path / "pwned"
    nasty = f'\'; touch {victim} #$(id) `id` \\ \n"x"'
    product = sshd.product(
        commands='printf "%s|" "$NASTY" "$EXTRA" "$SPOOLD_ATTEMPT"', env={"EXTRA": "it's"}
    )
    result, log, _ = _run(tmp_path, product, job_env={"NASTY": nasty, "SPOOLD_ATTEMPT": "2"})
    assert result.succeeded, log.text()
    assert f"{nasty}|it's|2|" in "\n".join(line.split(" ", 2)[2] for line in log.lines())
    assert not victim.exists()


def test_an_unknown_host_key_fails_the_job(sshd: SshServer, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    result, log, _ = _run(tmp_path, sshd.product(commands="echo ran", known_hosts=str(empty)))
    assert result.exit_code is None and not result.succeeded
    assert result.error is not None and "host key" in result.error and "unknown" in result.error
    assert not result.retryable
    assert "ran" not in log.text().replace(result.error, "")


def test_a_changed_host_key_fails_the_job(sshd: SshServer, tmp_path: Path) -> None:
    other = keygen(tmp_path / "other_host_key")
    public = Path(f"{other}.pub").read_text().split()
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {public[0]} {public[1]}\n")
    result, log, _ = _run(tmp_path, sshd.product(commands="echo ran", known_hosts=str(known)))
    assert result.exit_code is None
    assert result.error is not None and "CHANGED" in result.error, result.error
    assert not result.retryable  # no connection failure: a retry meets the same key
    assert "ran" not in log.text().replace(result.error, "")


def test_trust_on_first_use_only_when_the_config_says_so(sshd: SshServer, tmp_path: Path) -> None:
    known = tmp_path / "new" / "known_hosts"  # spoold's own, the config's: not there yet
    trusting = {"trust_on_first_use": True, "known_hosts": str(known)}
    unnamed = {k: v for k, v in sshd.product(commands="echo ran").items() if k != "known_hosts"}
    result, log, _ = _run(tmp_path, unnamed, settings=trusting)
    assert result.succeeded, log.text()
    assert f"trusted [127.0.0.1]:{sshd.port} on first use" in log.text()
    assert known.read_text().startswith(f"[127.0.0.1]:{sshd.port} ")
    product = sshd.product(commands="echo ran", known_hosts=str(known))
    result, log, _ = _run(tmp_path, product)  # now known: no trust needed
    assert result.succeeded and "on first use" not in log.text()
    # A changed key fails even so.
    public = Path(f"{keygen(tmp_path / 'other')}.pub").read_text().split()
    known.write_text(f"[127.0.0.1]:{sshd.port} {public[0]} {public[1]}\n")
    result, _, _ = _run(tmp_path, product, settings=trusting)
    assert result.error is not None and "CHANGED" in result.error


def test_a_refused_connection_fails_retryably(sshd: SshServer, tmp_path: Path) -> None:
    port = free_port()
    result, _, _ = _run(tmp_path, sshd.product(commands="true", port=port))
    assert result.exit_code is None
    assert result.error == f"ssh: cannot connect to 127.0.0.1:{port}: Connection refused"
    assert result.retryable


def test_a_server_that_never_answers_fails_retryably(sshd: SshServer, tmp_path: Path) -> None:
    with socket.socket() as silent:  # the kernel accepts connections; nobody says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        product = sshd.product(commands="true", port=silent.getsockname()[1], connect_timeout=0.5)
        result, _, _ = _run(tmp_path, product)
    assert result.exit_code is None
    assert result.error is not None and result.retryable, result.error


def test_a_rejected_key_fails_without_retry(sshd: SshServer, tmp_path: Path) -> None:
    stranger = keygen(tmp_path / "stranger")
    result, _, _ = _run(tmp_path, sshd.product(commands="true", keyfile=str(stranger)))
    assert result.exit_code is None
    assert result.error is not None and "authentication as" in result.error
    assert not result.retryable


def test_artifacts_are_fetched_from_the_remote_work_dir(sshd: SshServer, tmp_path: Path) -> None:
    commands = [
        "mkdir -p out/sub logs && echo report > out/report.txt && echo no > out/report.bin",
        "echo deep > logs/a.log && ln -s /etc/passwd out/passwd.txt && echo top > top.txt",
        "echo nested > out/sub/n.txt",
    ]
    artifacts = (ArtifactSpec("out/*.txt"), ArtifactSpec("logs", "dir"), ArtifactSpec("../*"))
    result, log, ctx = _run(tmp_path, sshd.product(commands=commands), artifacts=artifacts)
    assert result.succeeded, log.text()
    fetched = sorted(p.relative_to(ctx.workdir).as_posix() for p in ctx.workdir.rglob("*"))
    assert fetched == ["logs", "logs/a.log", "out", "out/report.txt"]
    assert (ctx.workdir / "out/report.txt").read_text() == "report\n"
    assert _remote_dirs(ctx) == []


def test_a_timeout_kills_the_remote_process_group(sshd: SshServer, tmp_path: Path) -> None:
    marker = _marker()
    product = sshd.product(commands=f"sleep {marker} & sleep {marker}")
    result, log, ctx = _run(tmp_path, product, timeout=1.0, kill_grace=1.0)
    assert result.timed_out and result.error == "timed out after 1s", log.text()
    wait_for(lambda: not _processes(marker), bound=10, what="the remote sleeps to end")
    assert _remote_dirs(ctx) == []


def test_what_the_job_left_running_ends_with_it(sshd: SshServer, tmp_path: Path) -> None:
    marker = _marker()
    product = sshd.product(commands=f"sleep {marker} & echo left")
    result, log, _ = _run(tmp_path, product, timeout=30.0)
    assert result.succeeded and "left" in log.text(), log.text()
    wait_for(lambda: not _processes(marker), bound=10, what="the background sleep to end")


def _cancel_once(log: _Log, line: str) -> tuple[threading.Event, threading.Thread]:
    """A cancel set once the job said ``line`` (a thread that waits for it, started)."""
    cancel = threading.Event()

    def cancel_once_said() -> None:
        wait_for(lambda: line in log.text(), bound=30, what="the job's first line")
        cancel.set()

    canceller = threading.Thread(target=cancel_once_said, daemon=True)
    canceller.start()
    return cancel, canceller


def test_sigkill_follows_when_sigterm_is_ignored(sshd: SshServer, tmp_path: Path) -> None:
    marker = _marker()
    log = _Log()
    # Stopped once "term-ignored" says SIGTERM is ignored, not after a time that a slow connect
    # (and so a SIGTERM before the trap) may take up.
    cancel, canceller = _cancel_once(log, "term-ignored")
    product = sshd.product(commands=f"trap '' TERM; echo term-ignored; sleep {marker}")
    result, _, _ = _run(tmp_path, product, log=log, cancel=cancel, kill_grace=0.5)
    canceller.join(10)
    assert result.cancelled, log.text()
    assert "SIGKILL" in log.text(), log.text()
    wait_for(lambda: not _processes(marker), bound=10, what="the remote sleep to end")


def test_cancel_kills_the_remote_process_group(sshd: SshServer, tmp_path: Path) -> None:
    marker = _marker()
    log = _Log()
    cancel, canceller = _cancel_once(log, "started")
    product = sshd.product(commands=f"echo started; sh -c 'sleep {marker}; :'")
    result, _, ctx = _run(tmp_path, product, log=log, cancel=cancel)
    canceller.join(10)
    assert result.cancelled and result.error == "cancelled", log.text()
    wait_for(lambda: not _processes(marker), bound=10, what="the remote processes to end")
    assert _remote_dirs(ctx) == []


def cut_connections(sshd: SshServer) -> None:
    """Kill the sshd processes that serve the connections (privileged monitors and their
    children): as when the network goes away, the processes they started stay."""
    monitors = _children(sshd.pid)
    for pid in monitors + [c for m in monitors for c in _children(m)]:
        with contextlib.suppress(OSError):  # ended meanwhile
            if "sshd" in Path(f"/proc/{pid}/cmdline").read_text():
                os.kill(int(pid), signal.SIGKILL)


def end_unit(ctx: RunContext) -> None:
    """End what a test left running of a unit on the host, and remove its dir."""
    directory = unit_dir(ctx)
    with contextlib.suppress(FileNotFoundError):
        supervisor, group = (directory / "pid").read_text().split()[:2]
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.killpg(int(group), signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(supervisor), signal.SIGKILL)
        wait_for(lambda: not running(int(supervisor)), bound=10, what="the supervisor to end")
    shutil.rmtree(directory, ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty: another test's, or this one's other units
        directory.parent.rmdir()
        directory.parent.parent.rmdir()


def test_a_lost_connection_is_made_again(
    sshd: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job goes on on the host; spoold connects again and logs each line of it once."""
    monkeypatch.setattr(ssh, "_RECONNECT_PAUSES", (0.1, 0.1, 0.1))
    flag = tmp_path / "go-on"
    log = _Log()

    def cut_once_started() -> None:
        wait_for(lambda: "started" in log.text(), bound=30, what="the job's first line")
        cut_connections(sshd)
        wait_for(lambda: "again" in log.text(), bound=30, what="a new connection")
        flag.touch()

    cutter = threading.Thread(target=cut_once_started)
    cutter.start()
    commands = f"echo started; while [ ! -e {flag} ]; do sleep 0.05; done; echo after; exit 5"
    result, _, ctx = _run(tmp_path, sshd.product(commands=commands), log=log, timeout=60.0)
    cutter.join(30)
    assert result.exit_code == 5 and result.error == "exit code 5", log.text()
    text = log.text()
    assert f"lost the connection to 127.0.0.1:{sshd.port}" in text
    assert text.splitlines().count("started") == 1
    assert text.splitlines().count("after") == 1
    assert _remote_dirs(ctx) == []


def test_a_connection_that_cannot_be_made_again_fails_retryably(
    sshd: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ssh, "_RECONNECT_PAUSES", (0.05, 0.05))
    marker = _marker()
    log = _Log()
    product = sshd.product(commands=f"echo started; sleep {marker}")

    def cut_once_started() -> None:
        wait_for(lambda: "started" in log.text(), bound=30, what="the job's first line")
        product["port"] = free_port()  # the host is out of reach from now on
        cut_connections(sshd)

    cutter = threading.Thread(target=cut_once_started)
    cutter.start()
    ctx, _ = ssh_context(tmp_path, product, log=log, timeout=60.0)
    try:
        result = SshExecutor().run(ctx)
        cutter.join(30)
        assert result.exit_code is None
        assert result.error is not None and result.error.startswith(
            f"ssh: the connection to 127.0.0.1:{sshd.port} ended before the job did and could "
            "not be made again (ssh: cannot connect to 127.0.0.1:"
        ), result.error
        assert "Connection refused" in result.error
        assert result.retryable
        assert _processes(marker), "the job was left running for a resume"
        assert (unit_dir(ctx) / "pid").exists()
    finally:
        end_unit(ctx)
    wait_for(lambda: not _processes(marker), bound=10, what="the remote sleep to end")


def _children(pid: int | str) -> list[str]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return found.stdout.split()


def test_without_paramiko_the_error_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "paramiko", None)
    result, _, _ = _run(tmp_path, {"host": "127.0.0.1", "commands": "true"})
    assert result.exit_code is None
    assert result.error is not None and "pip install spoold[ssh]" in result.error


def test_a_known_hosts_a_job_names_is_read_never_written(sshd: SshServer, tmp_path: Path) -> None:
    """With trust on first use, a job's own known_hosts was where its key was written: a job
    naming another job's status.json made spoold overwrite it (and the spool unreadable), and
    a path of new directories had them made. The key goes to spoold's own file."""
    own = tmp_path / "spoold_known_hosts"
    victim = tmp_path / "status.json"
    victim.write_text('{"state": "succeeded"}')
    trusting = {"trust_on_first_use": True, "known_hosts": str(own)}
    for named in (victim, tmp_path / "made" / "a" / "known_hosts"):
        product = sshd.product(commands="echo ran", known_hosts=str(named))
        result, log, _ = _run(tmp_path, product, settings=trusting)
        if named == victim:
            assert result.succeeded, log.text()  # trusted, and kept in spoold's own file
        assert victim.read_text() == '{"state": "succeeded"}'
    assert not (tmp_path / "made").exists()
    assert own.read_text().startswith(f"[127.0.0.1]:{sshd.port} ")


def test_a_known_hosts_paramiko_cannot_read_fails_clearly(sshd: SshServer, tmp_path: Path) -> None:
    bad = tmp_path / "known_hosts"
    bad.write_text("important = yes\n")
    result, _, _ = _run(tmp_path, sshd.product(commands="true", known_hosts=str(bad)))
    assert result.error is not None and result.error.startswith(
        f"ssh: cannot read known_hosts {bad}"
    )


def test_the_entries_of_a_known_hosts_a_job_names_stay_out_of_spoolds_own(
    sshd: SshServer, tmp_path: Path
) -> None:
    """Trust on first use saves spoold's own known_hosts whole: the entries of a job's own file
    must not be among them, or a job plants a host key every later job of the host trusts."""
    own = tmp_path / "spoold_known_hosts"
    named = tmp_path / "job_known_hosts"
    planted = Path(f"{keygen(tmp_path / 'planted')}.pub").read_text().split()
    named.write_text(f"planted.example.net {planted[0]} {planted[1]}\n")
    trusting = {"trust_on_first_use": True, "known_hosts": str(own)}
    product = sshd.product(commands="echo ran", known_hosts=str(named))
    result, log, _ = _run(tmp_path, product, settings=trusting)
    assert result.succeeded, log.text()
    kept = own.read_text()
    assert kept.startswith(f"[127.0.0.1]:{sshd.port} "), kept
    assert "planted.example.net" not in kept and planted[1] not in kept
    assert named.read_text() == f"planted.example.net {planted[0]} {planted[1]}\n"


def test_the_units_remote_dir_is_the_users_alone(sshd: SshServer, tmp_path: Path) -> None:
    """The unit's dir holds the job's output (``out``, ``err``) and commands: made under umask
    077 whatever the login's umask, so that other users of the host read none of it."""
    product = sshd.product(commands='umask; stat -c "mode %a" "$PWD/.." "$PWD"')
    result, log, _ = _run(tmp_path, product)
    assert result.succeeded, log.text()
    lines = log.text().splitlines()
    assert "0077" not in lines, "the test sshd's login umask is 077: it would hide a lax dir"
    assert [line for line in lines if line.startswith("mode ")] == ["mode 700", "mode 700"]


def test_a_job_whose_supervisor_died_is_not_left_running(sshd: SshServer, tmp_path: Path) -> None:
    """The supervisor killed alone (the OOM killer): the attempt fails retryably, and the job's
    processes are ended with it, or the retry would run beside them."""
    marker = _marker()
    log = _Log()
    product = sshd.product(commands=f"echo started; sleep {marker}")
    ctx, _ = ssh_context(tmp_path, product, log=log, timeout=60.0)
    group: list[int] = []

    def kill_the_supervisor() -> None:
        pid = unit_dir(ctx) / "pid"
        wait_for(
            lambda: "started" in log.text() and pid.read_text().split()[1] != "-",
            bound=30,
            what="the job to start",
        )
        supervisor, job = pid.read_text().split()[:2]
        group.append(int(job))
        os.kill(int(supervisor), signal.SIGKILL)

    killer = threading.Thread(target=kill_the_supervisor)
    killer.start()
    try:
        result = SshExecutor().run(ctx)
        killer.join(30)
        assert result.exit_code is None and result.retryable, log.text()
        assert "ended without an exit status" in (result.error or "")
        wait_for(lambda: not _processes(marker), bound=10, what="the job's processes to end")
        assert _remote_dirs(ctx) == []
    finally:
        for pid in group:  # its pid file may be gone with the unit's dir
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        end_unit(ctx)
