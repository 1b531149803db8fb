"""spoold as a service (issue 9): systemd notifications, --daemon, the lock, signals, its log."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spoold.core.own_log import LineFormatter, stderr_is_journal
from tests.harness import (
    DEFAULT_BOUND,
    DaemonProcess,
    drop,
    end_supervisors,
    job_state,
    local_job,
    run_cli,
    run_detached,
    running,
    supervisors,
    wait_finished,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.daemon


class NotifySocket:
    """The datagram socket systemd listens on (NOTIFY_SOCKET), bound by the test."""

    def __init__(self) -> None:
        # Not under tmp_path: a Unix socket's path must stay short.
        self._dir = tempfile.mkdtemp(prefix="spoold-notify-")
        self.address = os.path.join(self._dir, "notify")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.address)
        self._sock.settimeout(0.05)
        self.received: list[str] = []

    def lines(self) -> list[str]:
        """Every notification line received so far (one datagram may hold several)."""
        while True:
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                return [line for message in self.received for line in message.splitlines()]
            self.received.append(data.decode())

    def wait(self, predicate: Callable[[list[str]], bool], what: str) -> list[str]:
        """Wait until the lines received so far satisfy ``predicate``; return them."""

        def satisfied() -> list[str] | None:
            lines = self.lines()
            return lines if predicate(lines) else None

        return wait_for(satisfied, what=what)

    def close(self) -> None:
        self._sock.close()
        os.unlink(self.address)
        os.rmdir(self._dir)


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


def _spoold_run(
    spool: Path, config: Path, env: dict[str, str], log: Path, *flags: str
) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "spoold", "run", "--spool", str(spool),
             "--config", str(config), *flags],
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=out, stderr=out, start_new_session=True,
        )  # fmt: skip


def test_systemd_hears_ready_status_watchdog_and_stopping(
    spool_dir: Path, tmp_path: Path, notify: NotifySocket
) -> None:
    config = write_config(tmp_path / "config.yaml", spool_dir)
    env = {"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "400000"}
    process = _spoold_run(spool_dir, config, env, tmp_path / "daemon.log")
    try:
        notify.wait(lambda lines: "READY=1" in lines, "READY=1")
        notify.wait(lambda lines: lines.count("WATCHDOG=1") >= 4, "repeated WATCHDOG=1")
        lines = notify.lines()
        assert "STATUS=recovering" in lines
        assert lines.index("STATUS=recovering") < lines.index("READY=1")
        drop(spool_dir, "one.yaml", local_job("one", "true"))
        assert wait_finished(spool_dir, "one")[0] == "done"
        notify.wait(
            lambda lines: any(re.fullmatch(r"STATUS=running: \d+ jobs, \d+ pending", line)
                              for line in lines),
            "a STATUS=running line",
        )  # fmt: skip
        process.send_signal(signal.SIGTERM)
        assert process.wait(DEFAULT_BOUND) == 0
        lines = notify.lines()
        assert "STOPPING=1" in lines
        assert any(line.startswith("STATUS=stopping") for line in lines)
    finally:
        process.kill()
        process.wait()


def test_no_watchdog_pings_without_watchdog_usec(
    spool_dir: Path, tmp_path: Path, notify: NotifySocket
) -> None:
    config = write_config(tmp_path / "config.yaml", spool_dir)
    process = _spoold_run(spool_dir, config, {"NOTIFY_SOCKET": notify.address},
                          tmp_path / "daemon.log")  # fmt: skip
    try:
        notify.wait(lambda lines: "READY=1" in lines, "READY=1")
        process.send_signal(signal.SIGTERM)
        assert process.wait(DEFAULT_BOUND) == 0
        assert "WATCHDOG=1" not in notify.lines()
    finally:
        process.kill()
        process.wait()


def test_daemon_flag_detaches_with_a_pidfile(spool_dir: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", spool_dir, logdir=str(tmp_path / "logs"))
    pidfile = tmp_path / "spoold.pid"
    result = run_detached(spool_dir, config, pidfile)
    assert result.returncode == 0, result.stderr
    pid = 0
    try:
        text: str = wait_for(lambda: pidfile.read_text().strip() if pidfile.exists() else "",
                             what="the pidfile")  # fmt: skip
        pid = int(text)
        assert running(pid)
        drop(spool_dir, "bg.yaml", local_job("bg", "echo detached"))
        assert wait_finished(spool_dir, "bg")[0] == "done"
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not running(pid), what="the detached daemon to stop")
        assert not pidfile.exists()
        log = (tmp_path / "logs" / "spoold.log").read_text()
        assert "spoold running on" in log and "stopped" in log
    finally:
        if pid and running(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_second_daemon_on_the_spool_says_who_runs_and_exits_2(
    daemon: DaemonProcess, spool_dir: Path
) -> None:
    assert daemon.process is not None
    result = run_cli(spool_dir, "run", "--config", str(daemon.config))
    assert result.returncode == 2, result.stderr
    assert f"pid {daemon.process.pid}, running since 20" in result.stderr
    assert "already runs on" in result.stderr
    assert daemon.alive
    drop(spool_dir, "still.yaml", local_job("still", "true"))
    assert wait_finished(spool_dir, "still")[0] == "done"


def test_sigterm_stops_at_once_and_leaves_running_jobs_to_the_next_daemon(
    spool_dir: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "config.yaml", spool_dir, shutdown_grace="60s")
    daemon = DaemonProcess(spool_dir, config)
    daemon.start()
    started, go = tmp_path / "started", tmp_path / "go"
    try:
        drop(spool_dir, "long.yaml",
             local_job("long", f"touch {started}; until [ -e {go} ]; do sleep 0.05; done"))  # fmt: skip
        wait_for(started.exists, what="the job to start")
        # Half the grace: a loaded machine's slow stop passes, a wait for the grace does not.
        assert daemon.stop(bound=30, leave_jobs=True) == 0, "no wait for the grace"
        assert "job long left running for the next daemon" in daemon.log()
        assert supervisors(spool_dir), "the job goes on"
        assert (job_state(spool_dir, "long") or ("",))[0] == "running"
        daemon.start()
        go.touch()
        directory, status = wait_finished(spool_dir, "long")
        assert (directory, status["state"], len(status["attempts"])) == ("done", "succeeded", 1)
    finally:
        daemon.kill()


def test_a_system_shutdown_interrupts_jobs_as_their_on_interrupt_says(
    spool_dir: Path, tmp_path: Path
) -> None:
    """The daemon stops and leaves its jobs; then the shutdown's SIGTERM reaches what is left
    (their supervisors): each job ends interrupted, and the next start follows on_interrupt."""
    config = write_config(tmp_path / "config.yaml", spool_dir, shutdown_grace="1s")
    daemon = DaemonProcess(spool_dir, config)
    daemon.start()
    try:
        marks = {name: tmp_path / name for name in ("fails", "requeues")}
        drop(spool_dir, "fails.yaml", local_job("fails", f"touch {marks['fails']}; sleep 60"))
        drop(spool_dir, "requeues.yaml",
             local_job("requeues", f"touch {marks['requeues']}; sleep 60",
                       on_interrupt="requeue"))  # fmt: skip
        for mark in marks.values():
            wait_for(mark.exists, what=f"{mark.name} to start")
        assert daemon.stop(leave_jobs=True) == 0
        end_supervisors(spool_dir)  # the shutdown's SIGTERM to what is left
        daemon.start()
        directory, status = wait_finished(spool_dir, "fails")
        assert directory == "failed", status
        assert "interrupted: its supervisor was stopped" in status["error"]

        def requeued() -> dict[str, Any] | None:
            found = job_state(spool_dir, "requeues")
            status = found[1] if found else {}
            attempts = status.get("attempts", [])
            return status if attempts and attempts[0].get("finished_at") else None

        status = wait_for(requeued, what="the requeue")
        assert "interrupted" in status["attempts"][0]["error"], status
        assert status["state"] in ("pending", "running"), "back in line (on_interrupt: requeue)"
    finally:
        daemon.kill()


def test_sighup_reloads_the_config_and_refuses_an_invalid_one(
    spool_dir: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "config.yaml", spool_dir, log_level="info")
    daemon = DaemonProcess(spool_dir, config)
    daemon.start()
    assert daemon.process is not None
    try:
        assert " DEBUG " not in daemon.log()
        write_config(config, spool_dir, log_level="debug", workers=3)
        daemon.process.send_signal(signal.SIGHUP)
        line = wait_for(lambda: next((x for x in daemon.log().splitlines()
                                      if "config reloaded" in x), None),
                        what="the reload")  # fmt: skip
        assert "applied log_level" in line and "need a restart: workers" in line
        # The next line of the reload's: written a moment after (waited on, not assumed).
        wait_for(lambda: "keys a reload applies: log_level" in daemon.log(), what="its keys")
        # The new level is in force: the status line of a running job is logged at debug. The
        # job runs until the test has seen that line (a gate, bounded), not for a fixed time: a
        # status sample comes every STATUS_EVERY seconds, and a loaded machine can miss a window.
        gate = tmp_path / "seen-go"
        wait = f'i=0; while [ ! -e "{gate}" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done'
        drop(spool_dir, "seen.yaml", local_job("seen", wait))
        try:
            wait_for(lambda: re.search(r" DEBUG spoold: status: running: 1 jobs", daemon.log()),
                     what="a debug line")  # fmt: skip
        finally:
            gate.touch()
        assert wait_finished(spool_dir, "seen")[0] == "done"

        config.write_text("workers: [\n")
        daemon.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "config not reloaded" in daemon.log(), what="the refusal")
        refusal = next(x for x in daemon.log().splitlines() if "config not reloaded" in x)
        assert str(config) in refusal
        assert daemon.alive
        drop(spool_dir, "after.yaml", local_job("after", "true"))
        assert wait_finished(spool_dir, "after")[0] == "done"
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def test_the_log_uses_syslog_priorities_under_journald(spool_dir: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", spool_dir)
    daemon = DaemonProcess(spool_dir, config)
    daemon.log_path.touch()
    info = os.stat(daemon.log_path)
    daemon.env = {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
    daemon.start()
    try:
        drop(spool_dir, "j.yaml", local_job("j", "true"))
        assert wait_finished(spool_dir, "j")[0] == "done"
        assert daemon.stop() == 0
        lines = daemon.log().splitlines()
        assert lines and all(re.match(r"<[0-7]>", line) for line in lines), lines
        assert any(line.startswith("<6>spoold: spoold running on") for line in lines)
    finally:
        daemon.kill()


def test_the_log_is_timestamped_elsewhere(daemon: DaemonProcess) -> None:
    assert daemon.stop() == 0
    lines = daemon.log().splitlines()
    assert lines and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ", x)
                         for x in lines), lines  # fmt: skip


def _record_with_traceback() -> logging.LogRecord:
    try:
        raise ValueError("first\nsecond")
    except ValueError:
        return logging.LogRecord(
            "spoold", logging.ERROR, __file__, 1, "it broke:\n%s", ("detail",), sys.exc_info()
        )


def test_a_traceback_stays_one_event_in_both_forms() -> None:
    record = _record_with_traceback()
    journal = LineFormatter(journal=True).format(record)
    assert "\n" not in journal
    assert journal.startswith("<3>spoold: it broke:\\ndetail\\nTraceback")
    assert "ValueError: first\\nsecond" in journal
    plain = LineFormatter().format(record).splitlines()
    assert " ERROR spoold: it broke:" in plain[0]
    assert len(plain) > 3 and all(line.startswith("    ") for line in plain[1:])


def test_priorities_follow_sd_daemon() -> None:
    formatter = LineFormatter(journal=True)
    for level, prefix in ((logging.DEBUG, "<7>"), (logging.INFO, "<6>"),
                          (logging.WARNING, "<4>"), (logging.ERROR, "<3>")):  # fmt: skip
        record = logging.LogRecord("spoold", level, __file__, 1, "x", (), None)
        assert formatter.format(record) == f"{prefix}spoold: x"


def test_journal_stream_must_name_stderr(tmp_path: Path) -> None:
    path = tmp_path / "err"
    with open(path, "w") as stream:
        info = os.stat(path)
        assert stderr_is_journal(stream, {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"})
        assert not stderr_is_journal(stream, {"JOURNAL_STREAM": f"{info.st_dev}:1"})
        assert not stderr_is_journal(stream, {})
    with contextlib.suppress(OSError), open("/dev/tty", "w") as tty:
        info = os.fstat(tty.fileno())
        assert not stderr_is_journal(tty, {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"})
