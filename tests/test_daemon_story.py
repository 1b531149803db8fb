"""The daemon's own log tells each job's story (issue 16): one line per end, a WARNING per
failure, cancel and retry; on standard error (journald) and in logdir's spoold.log alike."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from spoold.core.config import Config
from spoold.core.errors import ConfigError
from spoold.daemon import check_detach
from tests.harness import (
    DaemonProcess,
    drop,
    local_job,
    run_cli,
    run_detached,
    wait_finished,
    wait_for,
    write_config,
)

DURATION = r"\d+\.\d s"
#: Each job's lines, as the plain log (spoold.log, a terminal) shows them after the timestamp.
EXPECTED = {
    "ok": [rf"INFO spoold: job ok succeeded \(exit 0, {DURATION}, attempt 1\)$"],
    "bad": [rf"WARNING spoold: job bad failed \(exit 3, {DURATION}, attempt 1\)$"],
    "slow": [
        rf"WARNING spoold: job slow failed: timed out after 1s \(exit -15, {DURATION}, "
        r"attempt 1\)$"
    ],
    "flaky": [
        rf"WARNING spoold: job flaky attempt 1 of 2 failed \(exit 3, {DURATION}\); retry: "
        r"attempt 2 of 2 due at 20\d\d-\d\d-\d\dT[\d:.]+Z$",
        r"INFO spoold: job flaky attempt 2 of 2 started \(a retry\)$",
        rf"WARNING spoold: job flaky failed \(exit 3, {DURATION}, attempt 2 of 2\)$",
    ],
    "stopped": [
        rf"WARNING spoold: job stopped cancelled by root on \S+ \(exit -15, {DURATION}, "
        r"attempt 1\)$"
    ],
}
#: What no line may say: Python's None, a doubled exit code, "is succeeded".
NEVER = re.compile(r"None|exit code \d+ \(exit|is succeeded|failed: exit code")


def _story(text: str, job_id: str) -> list[str]:
    """The lines of spoold's own log about one job, without their timestamps."""
    found = []
    for line in text.splitlines():
        body = re.sub(r"^\d{4}-\d\d-\d\d [\d:,]+ ", "", line)  # the plain form's asctime
        if re.search(rf"\bjob {re.escape(job_id)}\b", body):
            found.append(body)
    return found


def _ends(text: str, job_id: str) -> list[str]:
    """Its lines but intake's: how its attempts and the job ended, and a retry's start."""
    return [line for line in _story(text, job_id) if " accepted " not in line]


@pytest.mark.daemon
def test_each_job_ends_with_one_line_in_the_daemons_log_and_journal(
    spool_dir: Path, tmp_path: Path
) -> None:
    logdir = tmp_path / "logs"
    config = write_config(tmp_path / "config.yaml", spool_dir, logdir=str(logdir))
    daemon = DaemonProcess(spool_dir, config)
    # Standard error as journald would connect it: JOURNAL_STREAM names that very file.
    daemon.log_path.touch()
    stat = daemon.log_path.stat()
    daemon.env = {"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}
    try:
        daemon.start()
        drop(spool_dir, "ok.yaml", local_job("ok", "true"))
        drop(spool_dir, "bad.yaml", local_job("bad", "echo oops; exit 3"))
        drop(spool_dir, "slow.yaml", local_job("slow", "sleep 30", timeout="1s"))
        drop(spool_dir, "flaky.yaml", local_job("flaky", "exit 3", retries=1, backoff="200ms"))
        drop(spool_dir, "stopped.yaml", local_job("stopped", "sleep 30 & wait"))
        wait_for((spool_dir / "running" / "stopped" / "lease").exists, what="stopped to run")
        # Waits its default, kill_grace + 30 s, for the job to end.
        assert run_cli(spool_dir, "cancel", "stopped").returncode == 0
        for job_id in EXPECTED:
            wait_finished(spool_dir, job_id)
        plain = logdir / "spoold.log"
        wait_for(lambda: all(len(_ends(plain.read_text(), j)) >= len(lines)
                             for j, lines in EXPECTED.items()),
                 what="every job's lines in spoold.log")  # fmt: skip
        wait_for(lambda: "job stopped cancelled" in daemon.log(), what="the journal")
    finally:
        daemon.kill()

    text = plain.read_text()
    for job_id, patterns in EXPECTED.items():
        story = _ends(text, job_id)
        assert len(story) == len(patterns), (job_id, story)
        for line, pattern in zip(story, patterns, strict=True):
            assert re.match(pattern, line), (pattern, line)
            assert not NEVER.search(line), line

    # The journal's form: a priority instead of a time; WARNING is 4, INFO 6. The lines come
    # from the worker processes: they reach the daemon's standard error as its own do.
    journal = daemon.log()
    assert "<6>spoold: job ok succeeded (exit 0, " in journal
    assert "<4>spoold: job bad failed (exit 3, " in journal
    assert "<4>spoold: job flaky attempt 1 of 2 failed (exit 3, " in journal
    assert "<6>spoold: job flaky attempt 2 of 2 started (a retry)" in journal
    assert "<4>spoold: job stopped cancelled by root on " in journal


def test_detaching_without_a_logdir_is_refused_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^logdir: spoold run --daemon needs a logdir"):
        check_detach(Config(spool=tmp_path))
    check_detach(Config(spool=tmp_path, logdir=tmp_path / "logs"))  # where its log goes


@pytest.mark.daemon
def test_run_daemon_without_a_logdir_says_why_and_does_not_detach(
    spool_dir: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "config.yaml", spool_dir)
    pidfile = tmp_path / "spoold.pid"
    result = run_detached(spool_dir, config, pidfile)
    try:
        assert result.returncode == 2, result.stderr
        assert "logdir" in result.stderr and "--daemon" in result.stderr
        assert not pidfile.exists()
    finally:
        if result.returncode == 0:  # it did detach: stop it once its pidfile names it
            text = wait_for(lambda: pidfile.read_text().strip() if pidfile.exists() else "",
                            what="the detached daemon's pidfile")  # fmt: skip
            os.kill(int(text), signal.SIGTERM)
            wait_for(lambda: not pidfile.exists(), what="the detached daemon to stop")
