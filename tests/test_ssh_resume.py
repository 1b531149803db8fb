"""The ssh executor's units outlive spoold: detach, resume, and what a resume finds on the host.

Against the real OpenSSH server of tests/sshd.py, which runs on this host: the tests look into
the unit's remote dir and at its processes directly. Jobs wait for flag files, not for time.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from spoold.executors import ssh
from spoold.executors.base import ExecResult, RunContext
from spoold.executors.ssh import SshExecutor, _unit_path

from tests.harness import running, wait_for
from tests.sshd import SshServer
from tests.test_executors import _Log
from tests.test_ssh_executor import (
    _marker,
    _processes,
    _remote_dirs,
    end_unit,
    ssh_context,
    unit_dir,
)

BOUND = 30.0  # for anything the tests wait for: a ceiling, not a measurement


class _InThread:
    """Runs the executor on a thread, as a worker does, so that the test can act meanwhile."""

    def __init__(self, ctx: RunContext) -> None:
        self.result: ExecResult | None = None
        self._thread = threading.Thread(target=self._run, args=(ctx,), name="ssh-unit")
        self._thread.start()

    def _run(self, ctx: RunContext) -> None:
        self.result = SshExecutor().run(ctx)

    def join(self) -> ExecResult:
        self._thread.join(BOUND)
        assert not self._thread.is_alive(), "the executor did not return"
        assert self.result is not None
        return self.result


def _flags(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "away", tmp_path / "end"


def _waiting_job(tmp_path: Path) -> str:
    """Prints, then waits for a flag to print more (while no spoold watches), then for another
    to end with exit code 7."""
    away, end = _flags(tmp_path)
    return (
        "echo started; echo oops >&2; "
        f"while [ ! -e {away} ]; do sleep 0.05; done; echo while-away; "
        f"while [ ! -e {end} ]; do sleep 0.05; done; echo after; exit 7"
    )


def _detached(
    sshd: SshServer,
    tmp_path: Path,
    commands: str,
    cleanup: Callable[[RunContext], None],
    *,
    recorded: str = "",
    **overrides: Any,
) -> RunContext:
    """A unit started, and left running as spoold stops once it printed ``started`` (and the
    host has ``recorded`` as where the log stands, if given)."""
    ctx, log = ssh_context(tmp_path, sshd.product(commands=commands), **overrides)
    cleanup(ctx)
    running = _InThread(ctx)
    wait_for(lambda: "started" in log.text(), bound=BOUND, what="the job's first line")
    if recorded:
        logged = unit_dir(ctx) / "logged"
        wait_for(lambda: logged.exists() and logged.read_text() == recorded, bound=BOUND)
    ctx.detach.set()
    result = running.join()
    assert result.detached and result.exit_code is None and result.error is None, log.text()
    return ctx


def _resumed(ctx: RunContext, **overrides: Any) -> RunContext:
    """The same unit as the next spoold runs it: the same log, resume set, its own events."""
    fresh: dict[str, Any] = {"detach": threading.Event(), "cancel": threading.Event()}
    return dataclasses.replace(ctx, resume=True, **{**fresh, **overrides})


def _pid_file(ctx: RunContext) -> tuple[int, int, int, str]:
    supervisor, group, started, boot = (unit_dir(ctx) / "pid").read_text().split()
    return int(supervisor), int(group), int(started), boot


def _says(log: _Log, text: str) -> bool:
    return text in log.text()


def _count(log: _Log, line: str) -> int:
    return log.text().splitlines().count(line)


@pytest.fixture
def cleanup() -> Iterator[Callable[[RunContext], None]]:
    """Ends what a test left of its units on the host, whatever happened."""
    contexts: list[RunContext] = []
    yield contexts.append
    for ctx in contexts:
        end_unit(ctx)


def test_detach_leaves_the_job_running_and_resume_takes_it_up(
    sshd: SshServer, tmp_path: Path, cleanup: Callable[[RunContext], None]
) -> None:
    log = _Log()
    # Along the way the host learns where the log stands; as spoold stops, exactly.
    ctx = _detached(sshd, tmp_path, _waiting_job(tmp_path), cleanup, log=log, recorded="8 5\n")
    assert "spoold stops: the job keeps running on 127.0.0.1" in log.text()
    supervisor, group, _, _ = _pid_file(ctx)
    assert running(supervisor) and running(group), "the job runs on without spoold"
    assert (unit_dir(ctx) / "logged").read_text().split() == ["8", "5", "final"]
    away, end = _flags(tmp_path)
    away.touch()  # the job prints while no spoold watches
    wait_for(lambda: b"while-away" in (unit_dir(ctx) / "out").read_bytes(), bound=BOUND)

    resumed = _resumed(ctx)
    resuming = _InThread(resumed)
    wait_for(lambda: "resuming: the job still runs" in log.text(), bound=BOUND)
    end.touch()
    result = resuming.join()
    assert (result.exit_code, result.error) == (7, "exit code 7"), log.text()
    assert f"still runs on 127.0.0.1:{sshd.port} (pid {supervisor}, started" in log.text()
    assert "its output from where this log left it" in log.text()
    for line in ("started", "while-away", "after", "oops"):
        assert _count(log, line) == 1, (line, log.text())
    assert any(line.endswith(" ERROR oops") for line in log.lines())
    assert _remote_dirs(ctx) == []
    assert not running(group)


def test_resume_reports_a_job_that_ended_while_no_spoold_watched(
    sshd: SshServer, tmp_path: Path, cleanup: Callable[[RunContext], None]
) -> None:
    log = _Log()
    ctx = _detached(sshd, tmp_path, _waiting_job(tmp_path), cleanup, log=log)
    for flag in _flags(tmp_path):
        flag.touch()
    wait_for((unit_dir(ctx) / "status").exists, bound=BOUND, what="the job's end")
    # As if it had ended 100 s before this resume (the host is this one: its file's time).
    ended = time.time() - 100
    os.utime(unit_dir(ctx) / "status", (ended, ended))

    result = SshExecutor().run(_resumed(ctx))
    assert (result.exit_code, result.error) == (7, "exit code 7"), log.text()
    # Its end is the host's record, not the resume's (the adopter's time was its end, and
    # the downtime counted in its wall time).
    assert result.ended_at is not None
    assert abs(result.ended_at.timestamp() - ended) < 5, (result.ended_at, ended)
    assert "the job ended on 127.0.0.1" in log.text()
    assert "while no spoold watched it (exit status 7)" in log.text()
    for line in ("started", "while-away", "after", "oops"):
        assert _count(log, line) == 1, (line, log.text())
    assert _remote_dirs(ctx) == []


def test_without_a_recorded_position_the_output_is_logged_again_from_its_start(
    sshd: SshServer, tmp_path: Path, cleanup: Callable[[RunContext], None]
) -> None:
    """As after a crash of spoold before it recorded anything: nothing lost, and the log says
    that lines are repeated."""
    log = _Log()
    ctx = _detached(sshd, tmp_path, _waiting_job(tmp_path), cleanup, log=log)
    (unit_dir(ctx) / "logged").unlink()
    for flag in _flags(tmp_path):
        flag.touch()

    result = SshExecutor().run(_resumed(ctx))
    assert result.exit_code == 7, log.text()
    assert "its output from its start: lines this log already has appear again" in log.text()
    assert (_count(log, "started"), _count(log, "after")) == (2, 1)


def test_a_position_recorded_along_the_way_says_lines_may_repeat(
    sshd: SshServer, tmp_path: Path, cleanup: Callable[[RunContext], None]
) -> None:
    """What a spoold that died (not stopped) leaves: the position it last sent."""
    log = _Log()
    ctx = _detached(sshd, tmp_path, _waiting_job(tmp_path), cleanup, log=log)
    (unit_dir(ctx) / "logged").write_text("8 0\n")  # stderr's line not yet recorded
    for flag in _flags(tmp_path):
        flag.touch()

    result = SshExecutor().run(_resumed(ctx))
    assert result.exit_code == 7, log.text()
    assert "lines from the last moments before the last spoold died may appear twice" in (
        log.text()
    )
    assert (_count(log, "started"), _count(log, "oops"), _count(log, "after")) == (1, 2, 1)


def test_resume_starts_the_unit_when_nothing_of_it_was_started(
    sshd: SshServer, tmp_path: Path
) -> None:
    ctx, log = ssh_context(tmp_path, sshd.product(commands="echo ran; exit 3"), resume=True)
    result = SshExecutor().run(ctx)
    assert result.exit_code == 3, log.text()
    assert "resuming: nothing of unit 1 was started on 127.0.0.1" in log.text()
    assert _count(log, "ran") == 1
    assert _remote_dirs(ctx) == []


def test_resume_starts_the_unit_when_its_dir_holds_no_started_job(
    sshd: SshServer, tmp_path: Path
) -> None:
    """An earlier spoold made the dir and stopped before the job began: no pid file."""
    product = sshd.product(commands="[ -e stale ] && echo stale; echo ran")
    ctx, log = ssh_context(tmp_path, product, resume=True)
    (unit_dir(ctx) / "work").mkdir(parents=True)
    (unit_dir(ctx) / "work" / "stale").write_text("from before")
    result = SshExecutor().run(ctx)
    assert result.succeeded, log.text()
    assert "nothing of unit 1 was started" in log.text()
    assert (_count(log, "ran"), _count(log, "stale")) == (1, 0)
    assert _remote_dirs(ctx) == []


def test_a_supervisor_gone_without_an_exit_status_fails_retryably(
    sshd: SshServer, tmp_path: Path, cleanup: Callable[[RunContext], None]
) -> None:
    """The job and its supervisor were killed while no spoold watched (as a reboot does)."""
    log = _Log()
    ctx = _detached(sshd, tmp_path, _waiting_job(tmp_path), cleanup, log=log)
    supervisor, group, _, _ = _pid_file(ctx)
    # The supervisor first: killed after the job, it would see the job end and record it.
    os.kill(supervisor, signal.SIGKILL)
    os.killpg(group, signal.SIGKILL)
    wait_for(lambda: not running(supervisor), bound=BOUND, what="the supervisor to end")

    result = SshExecutor().run(_resumed(ctx))
    assert result.exit_code is None and result.retryable, log.text()
    assert result.error == (
        f"ssh: the job's supervisor on 127.0.0.1:{sshd.port} (pid {supervisor}) ended without "
        "an exit status (killed, or the host rebooted)"
    )
    assert _count(log, "started") == 1
    assert _remote_dirs(ctx) == []


def test_after_a_reboot_the_pids_of_before_are_not_the_jobs(
    sshd: SshServer, tmp_path: Path, cleanup: Callable[[RunContext], None]
) -> None:
    """A pid file of another boot: its pids may be other processes now. The unit failed, and
    spoold signals none of them."""
    marker = _marker()
    log = _Log()
    ctx = _detached(sshd, tmp_path, f"echo started; sleep {marker}", cleanup, log=log)
    supervisor, group, started, _ = _pid_file(ctx)
    (unit_dir(ctx) / "pid").write_text(f"{supervisor} {group} {started} another-boot\n")
    try:
        result = SshExecutor().run(_resumed(ctx))
        assert result.retryable and result.error is not None, log.text()
        assert result.error.endswith("ended without an exit status (the host rebooted)")
        assert _processes(marker), "a process of the same pid on this boot is not the job's"
        assert _remote_dirs(ctx) == []
    finally:
        os.killpg(group, signal.SIGKILL)  # its pid file is gone with the unit's dir
    wait_for(lambda: not _processes(marker), bound=10, what="the remote sleep to end")


def test_resume_within_what_is_left_of_the_timeout(
    sshd: SshServer, tmp_path: Path, cleanup: Callable[[RunContext], None]
) -> None:
    """The timeout counts from the start on the host, not from the resume."""
    marker = _marker()
    log = _Log()
    ctx = _detached(
        sshd, tmp_path, f"echo started; sleep {marker}", cleanup, log=log, kill_grace=0.5
    )
    started = _pid_file(ctx)[2]
    wait_for(lambda: time.time() >= started + 1, bound=BOUND, what="a second on the host")

    result = SshExecutor().run(_resumed(ctx, timeout=1.0))
    assert result.timed_out and result.error == "timed out after 1s", log.text()
    assert "0ms of its timeout left" in log.text()
    assert "sending SIGTERM to the job's remote processes" in log.text()
    wait_for(lambda: not _processes(marker), bound=10, what="the remote sleep to end")
    assert _remote_dirs(ctx) == []


def test_a_resumed_unit_can_be_detached_again_and_cancelled(
    sshd: SshServer, tmp_path: Path, cleanup: Callable[[RunContext], None]
) -> None:
    marker = _marker()
    log = _Log()
    ctx = _detached(sshd, tmp_path, f"echo started; sleep {marker}", cleanup, log=log)

    again = _resumed(ctx, timeout=3600.0)
    running = _InThread(again)
    wait_for(lambda: "resuming: the job still runs" in log.text(), bound=BOUND)
    again.detach.set()
    assert running.join().detached
    assert "of its timeout left" in log.text()
    assert log.text().count("the next spoold resumes it") == 2
    assert _processes(marker)

    last = _resumed(ctx)
    last.cancel.set()  # while no spoold ran: the next one ends the job
    result = SshExecutor().run(last)
    assert result.cancelled and result.error == "cancelled", log.text()
    wait_for(lambda: not _processes(marker), bound=10, what="the remote sleep to end")
    assert _count(log, "started") == 1
    assert _remote_dirs(ctx) == []


def _alone(marker: str) -> str:
    """Commands that fail if the process of ``marker`` still runs as they begin: "before" is
    checked by the second run itself, not after it (``[s]`` keeps the pattern from matching
    the shell that runs it)."""
    return f"if pgrep -f '[s]leep {marker}' > /dev/null; then echo TWO-AT-ONCE; exit 3; fi; echo second"


def test_a_unit_not_resumed_is_ended_before_it_runs_again(
    sshd: SshServer, tmp_path: Path, cleanup: Callable[[RunContext], None]
) -> None:
    """Run without resume while an earlier run of the unit still runs: never two at once."""
    marker = _marker()
    log = _Log()
    ctx = _detached(sshd, tmp_path, f"echo started; sleep {marker}", cleanup, log=log)
    again = dataclasses.replace(ctx, detach=threading.Event(), product={**ctx.product,
                                "commands": _alone(marker)})  # fmt: skip
    result = SshExecutor().run(again)
    assert result.succeeded, log.text()  # the first run was gone when the second began
    assert "held a dir of unit 1 from an earlier spoold that was not resumed" in log.text()
    assert not _processes(marker)
    assert _remote_dirs(ctx) == []


def test_an_earlier_attempt_another_host_left_running_is_ended_before_the_next(
    sshd: SshServer, tmp_path: Path, cleanup: Callable[[RunContext], None]
) -> None:
    """Host a's daemon died while its attempt 1 ran on the remote host; host b took the job
    over (SPEC section 11) and starts attempt 2 under its own spool dir there: attempt 1 is
    ended first, never two at once. The same job id of another spool (another key) and a
    later attempt are left alone."""
    job_id = f"ssh-{uuid.uuid4().hex[:12]}"

    def on(host: str, unit: str, key: str, commands: str) -> tuple[RunContext, _Log]:
        job_env = {"SPOOLD_JOB_DIR": f"/srv/{host}/running/{job_id}", "RUNNER_HOSTNAME": host}
        ctx, log = ssh_context(tmp_path, sshd.product(commands=commands), job_id=job_id,
                               job_env=job_env, unit_key=unit, job_key=key)  # fmt: skip
        cleanup(ctx)
        return ctx, log

    first, second, other = _marker(), _marker(), _marker()
    started = [  # the later attempt first: its start would end attempt 1 too
        on("host-c", "3", "key-1", f"echo started; sleep {second}"),
        on("host-a", "1", "key-1", f"echo started; sleep {first}"),
        on("host-d", "1", "key-2", f"echo started; sleep {other}"),
    ]
    for ctx, its_log in started:
        running = _InThread(ctx)
        wait_for(functools.partial(_says, its_log, "started"), bound=BOUND)
        ctx.detach.set()
        assert running.join().detached
    (ctx_later, _), (ctx_a, _), (ctx_other, _) = started
    assert _processes(first) and _processes(second) and _processes(other)

    ctx_b, log = on("host-b", "2", "key-1", _alone(first))
    result = SshExecutor().run(ctx_b)
    assert result.succeeded, log.text()  # attempt 1 was gone when attempt 2 began
    assert not _processes(first)
    assert not unit_dir(ctx_a).exists()
    assert "still held attempt 1 of this job, which another spoold started" in log.text()
    assert _processes(second) and _processes(other)  # a later attempt; another spool's job
    assert unit_dir(ctx_later).exists() and unit_dir(ctx_other).exists()
    assert log.text().count("still held attempt") == 1


def test_nothing_is_started_once_spoold_stops(sshd: SshServer, tmp_path: Path) -> None:
    ctx, log = ssh_context(tmp_path, sshd.product(commands="echo ran"))
    ctx.detach.set()
    result = SshExecutor().run(ctx)
    assert result.detached, log.text()
    assert "ran" not in log.text()
    assert not unit_dir(ctx).exists()


def test_secrets_reach_the_job_but_no_file_on_the_host(
    sshd: SshServer, tmp_path: Path, cleanup: Callable[[RunContext], None]
) -> None:
    secret = f"s3cret-{_marker()}"
    log = _Log()
    commands = (  # the job shows that it has the secret without the script holding it
        'echo "$SPOOLD_SECRET_TOKEN" | tr a-z A-Z; echo started; '
        f"while [ ! -e {tmp_path / 'end'} ]; do sleep 0.05; done"
    )
    ctx = _detached(
        sshd, tmp_path, commands, cleanup, log=log, job_env={"SPOOLD_SECRET_TOKEN": secret}
    )
    assert secret.upper() in log.text()
    files = [path for path in unit_dir(ctx).rglob("*") if path.is_file()]
    assert {path.name for path in files} >= {"pid", "out", "err", "script", "logged"}
    for path in files:
        assert secret.encode() not in path.read_bytes(), path
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):  # nor in any command line
        try:
            assert secret.encode() not in cmdline.read_bytes(), cmdline
        except OSError:
            continue  # ended meanwhile
    (tmp_path / "end").touch()
    result = SshExecutor().run(_resumed(ctx))
    assert result.succeeded, log.text()


def test_two_spools_keep_their_units_apart(tmp_path: Path) -> None:
    def path(spool: str, host: str = "here", unit: str = "1") -> str:
        job_env = {"SPOOLD_JOB_DIR": f"{spool}/running/job-1", "RUNNER_HOSTNAME": host}
        ctx, _ = ssh_context(tmp_path, {}, job_id="job-1", job_env=job_env, unit_key=unit)
        return _unit_path(ctx)

    assert path("/srv/a") == path("/srv/a")  # the next spoold on the spool finds its units
    assert path("/srv/a") != path("/srv/b")
    assert path("/srv/a", "here") != path("/srv/a", "there")
    assert path("/srv/a").startswith(".spoold/here-") and path("/srv/a").endswith("/job-1/1")
    assert path("/srv/a", unit="3.build.2").endswith("/job-1/3.build.2")
    odd = path("/srv/a", unit="../x")
    assert odd.count("/") == 3 and "/../" not in odd


def test_without_setsid_perl_gives_the_job_a_session_of_its_own(tmp_path: Path) -> None:
    """The start script itself, on this host, with a PATH that has perl but no setsid (as on
    the BSDs and macOS)."""
    tools = ("cat", "date", "mkdir", "mv", "perl", "rm")
    if any(shutil.which(tool) is None for tool in tools):
        pytest.skip("perl is not installed")
    path = tmp_path / "bin"
    path.mkdir()
    for tool in tools:
        (path / tool).symlink_to(str(shutil.which(tool)))
    home = tmp_path / "home"
    home.mkdir()
    mark = ": spoold-test-mark"
    stdin = f"cat /proc/$$/stat; exit 4\n{mark}\nexport A=1\n{mark}\n"
    script = ssh._FUNCTIONS + ssh._START
    done = subprocess.run(
        ["/bin/sh", "-c", script, "spoold", "unit", "/bin/sh", mark],
        input=stdin.encode(),
        env={"PATH": str(path), "HOME": str(home)},
        capture_output=True,
        timeout=BOUND,
        check=False,
    )
    said = done.stdout.decode().split()
    assert done.returncode == 0 and said[-5] == "ok", done
    status = home / "unit" / "status"
    wait_for(status.exists, bound=BOUND, what="the job's end")
    assert status.read_text() == "4\n"
    stat = (home / "unit" / "out").read_text()  # of the job's shell, which perl became
    group, session = stat.rsplit(")", 1)[1].split()[2:4]
    assert stat.split()[0] == said[-3] == group == session, (said, stat)
