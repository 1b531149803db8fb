"""The command line and the daemon under an operator's hands: `wait` and `cancel` of a job
still in incoming/, Ctrl-C on `spoold exec`, SIGHUP early in `spoold run`, a retry that lost
the race to another, `cancel` with no daemon, and the host's beat on a full disk."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from spoold.core.clock import SystemClock
from spoold.core.config import Config, load_config
from spoold.core.errors import JobNotFound
from spoold.core.spool import Spool
from spoold.run.control import JobControl
from tests.harness import DaemonProcess, local_job, run_cli, wait_for, write_config
from tests.test_cli_status import make_job


@pytest.fixture
def spool_root(tmp_path: Path) -> Path:
    root = tmp_path / "spool"
    Spool(root).init()
    return root


def _spoold(*args: str) -> list[str]:
    return [sys.executable, "-m", "spoold", *args]


# -- 5. a job whose file waits in incoming/ -----------------------------------------------------


def test_wait_waits_for_a_submitted_job_not_taken_in_yet(tmp_path: Path, spool_root: Path) -> None:
    """`spoold submit w1.yaml && spoold wait w1` with no daemon yet: "no job 'w1'", exit 2."""
    config = write_config(tmp_path / "config.yaml", spool_root, workdir=str(tmp_path / "work"))
    job = tmp_path / "w1.yaml"
    job.write_text(yaml.safe_dump(local_job("w1", "echo fine")))
    assert run_cli(spool_root, "submit", str(job), "--config", str(config)).returncode == 0
    early = run_cli(spool_root, "wait", "w1", "--timeout", "0.5", "--config", str(config))
    assert early.returncode == 1, early.stderr  # at its timeout, not a usage error
    assert "job w1 is not taken in yet (incoming/w1.yaml): waiting for it" in early.stderr
    waiting = subprocess.Popen(
        _spoold("wait", "w1", "--timeout", "60", "--spool", str(spool_root), "--config",
                str(config)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    daemon = DaemonProcess(spool_root, config)
    try:
        daemon.start()
        out, err = waiting.communicate(timeout=90)
    finally:
        waiting.kill()
        daemon.stop()
    assert waiting.returncode == 0, err
    assert "job w1 succeeded" in out


def test_cancel_of_a_job_not_taken_in_yet_says_so(tmp_path: Path, spool_root: Path) -> None:
    """It said "no job 'q1'", and the job then ran when a daemon started."""
    job = tmp_path / "q1.yaml"
    job.write_text(yaml.safe_dump(local_job("q1", "true")))
    assert run_cli(spool_root, "submit", str(job)).returncode == 0
    result = run_cli(spool_root, "cancel", "q1")
    assert result.returncode == 1, result.stderr
    assert "q1: not accepted yet" in result.stderr
    assert "removing the file" in result.stderr
    unknown = run_cli(spool_root, "cancel", "q2")
    assert unknown.returncode == 2 and "no job 'q2'" in unknown.stderr


# -- 6. Ctrl-C on `spoold exec` -----------------------------------------------------------------


def test_ctrl_c_on_exec_cancels_its_job_and_exits_130(tmp_path: Path, spool_root: Path) -> None:
    config = write_config(tmp_path / "config.yaml", spool_root, workdir=str(tmp_path / "work"))
    job = tmp_path / "ex1.yaml"
    job.write_text(yaml.safe_dump(local_job("ex1", "sleep 60")))
    execute = subprocess.Popen(
        _spoold("exec", str(job), "--spool", str(spool_root), "--config", str(config)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # As a shell starts it: SIGINT at its default, whatever pytest's is.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509
    )  # fmt: skip
    try:
        wait_for((spool_root / "running" / "ex1" / "units" / "1").exists, bound=60,
                 what="the job to start")  # fmt: skip
        execute.send_signal(signal.SIGINT)
        _out, err = execute.communicate(timeout=30)
    finally:
        execute.kill()
    assert execute.returncode == 130, err
    assert "SIGINT: cancelling job ex1" in err
    assert "interrupted (SIGINT): job ex1 was cancelled" in err
    assert (spool_root / "failed" / "ex1").is_dir()
    assert not (spool_root / "running" / "ex1").exists()


# -- 7. SIGHUP while `spoold run` starts ---------------------------------------------------------


def _catches(pid: int, signum: int) -> bool:
    """Whether the process ``pid`` has a handler for ``signum`` (SigCgt in /proc)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def test_a_sighup_early_in_start_up_is_a_reload_not_an_end(
    tmp_path: Path, spool_root: Path
) -> None:
    config = write_config(tmp_path / "config.yaml", spool_root, workdir=str(tmp_path / "work"),
                          logdir=str(tmp_path / "logs"))  # fmt: skip
    daemon = subprocess.Popen(
        _spoold("run", "--spool", str(spool_root), "--config", str(config)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    log = tmp_path / "logs" / "spoold.log"
    try:
        # As soon as it catches SIGHUP (cli.main, before the imports and the set-up, where it
        # once ended the process): not after a fixed sleep, which a loaded machine outlasts
        # (the first ~60 ms, the interpreter's own start, are left out: README, Reload).
        wait_for(lambda: _catches(daemon.pid, signal.SIGHUP), bound=60,
                 what="spoold to catch SIGHUP")  # fmt: skip
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: log.exists() and "config reloaded" in log.read_text(), bound=60,
                 what="the held SIGHUP's reload")  # fmt: skip
        assert daemon.poll() is None
    finally:
        daemon.terminate()
        daemon.wait(30)
    assert daemon.returncode == 0


# -- 11. five retries at once --------------------------------------------------------------------


def test_a_retry_that_lost_the_race_says_only_that_the_job_moved(
    tmp_path: Path, spool_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from spoold.core.own_log import close_logging, configure_logging  # noqa: PLC0415
    from spoold.out.outbox import callbacks_for  # noqa: PLC0415

    make_job(spool_root, "f1", "failed", error="exit code 1")
    config = Config(spool=spool_root)
    logger = configure_logging(config)
    spool, clock = Spool(spool_root), SystemClock()

    def control() -> JobControl:
        callbacks = callbacks_for(config, spool, clock, logger)
        return JobControl(spool, clock, who="test", callbacks=callbacks)

    winner, loser = control(), control()
    opened = spool.jobs.open_log

    raced: list[bool] = []

    def open_then_lose(job: Any) -> Any:
        handle = opened(job)
        if not raced:  # the other retry moves it between the loser's look and its move
            raced.append(True)
            winner.retry("f1")
        return handle

    spool.jobs.open_log = open_then_lose  # type: ignore[method-assign]
    try:
        with pytest.raises(JobNotFound, match="moved meanwhile"):
            loser.retry("f1")
    finally:
        del spool.jobs.open_log
        close_logging()
    assert "no retrying callback" not in capsys.readouterr().err
    assert (spool_root / "pending" / "f1").is_dir()


# -- 12. cancel with no daemon on this host ------------------------------------------------------


def test_cancel_with_no_daemon_says_who_stops_the_job(spool_root: Path) -> None:
    """It said "its worker stops it", then "still running after 40s"."""
    make_job(spool_root, "r1", "running")
    result = run_cli(spool_root, "cancel", "r1", "--wait", "2")
    assert result.returncode == 0, result.stderr
    assert "its worker stops it" not in result.stderr
    assert "still running" not in result.stderr
    assert "no spoold runs on" in result.stdout and "supervisor stops it" in result.stdout
    assert (spool_root / "running" / "r1" / "cancel").is_file()


# -- 8. the host's beat on a full disk ---------------------------------------------------------


def test_a_full_disk_is_one_line_for_the_hosts_beat_and_one_for_its_end(
    tmp_path: Path, spool_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from spoold.core.own_log import close_logging  # noqa: PLC0415
    from spoold.daemon import Daemon  # noqa: PLC0415
    from tests.daemon_bench import InlineWorkers  # noqa: PLC0415

    path = write_config(tmp_path / "config.yaml", spool_root, workdir=str(tmp_path / "work"))
    daemon = Daemon.build(load_config(path, env={}), make_workers=InlineWorkers)
    assert daemon.hostbeat is not None
    written = daemon.spool.hosts.write

    def full(host: str, record: dict[str, Any]) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "hosts/x.tmp")

    try:
        daemon.spool.hosts.write = full  # type: ignore[method-assign]
        start = daemon.clock.monotonic()  # the rounds' times: a beat due at each
        for beat in range(4):
            daemon.tick(start + beat * 100)
        daemon.spool.hosts.write = written  # type: ignore[method-assign]
        daemon.tick(start + 1000)
        daemon.tick(start + 1100)
    finally:
        close_logging()
    err = capsys.readouterr().err
    assert err.count("cannot write this host's beat") == 1, err
    assert "No space left on device" in err
    assert "Traceback" not in err and "unexpected failure" not in err, err
    assert err.count("beat is written to hosts/") == 1, err
