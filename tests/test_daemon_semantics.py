"""Job semantics on the real daemon (issue 3): retries across restarts, cancel, retry."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from spoold.clock import parse_rfc3339
from tests.harness import (
    DaemonProcess,
    drop,
    job_state,
    local_job,
    wait_finished,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.daemon

FLAKY = 'test "$SPOOLD_ATTEMPT" -gt 1 || exit 75'  # fails its first attempt only


def _started(status: dict[str, object], number: int) -> float:
    attempts = status["attempts"]
    assert isinstance(attempts, list)
    return parse_rfc3339(attempts[number - 1]["started_at"]).timestamp()


def _waiting_for_retry(spool_dir: Path, job_id: str) -> bool:
    found = job_state(spool_dir, job_id)
    return found is not None and found[0] == "pending" and bool(found[1].get("next_attempt_at"))


def test_a_flaky_job_is_retried_after_its_backoff(daemon: DaemonProcess, spool_dir: Path) -> None:
    drop(spool_dir, "flaky.yaml", local_job("flaky", FLAKY, retries=2, backoff="300ms"))
    directory, status = wait_finished(spool_dir, "flaky")
    assert directory == "done", status
    assert [a["exit_code"] for a in status["attempts"]] == [75, 0]
    first_end = parse_rfc3339(status["attempts"][0]["finished_at"]).timestamp()
    assert _started(status, 2) >= first_end + 0.3, "the second attempt came before its backoff"


def test_a_restart_keeps_the_retry_schedule(spool_dir: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", spool_dir)
    daemon = DaemonProcess(spool_dir, config)
    daemon.start()
    try:
        drop(spool_dir, "later.yaml", local_job("later", FLAKY, retries=1, backoff="1h"))
        drop(spool_dir, "soon.yaml", local_job("soon", FLAKY, retries=1, backoff="2s"))
        for job_id in ("later", "soon"):
            wait_for(functools.partial(_waiting_for_retry, spool_dir, job_id),
                     what=f"{job_id} to wait for a retry")  # fmt: skip
        daemon.stop()
        later_due = job_state(spool_dir, "later")[1]["next_attempt_at"]  # type: ignore[index]
        daemon.start()
        # The restarted daemon read the schedule back from status.json ...
        wait_for(lambda: "job later waits for its next attempt" in daemon.log(),
                 what="the restarted daemon to see the scheduled retry")  # fmt: skip
        # ... and keeps it: "soon" runs once due, "later" stays where it is.
        directory, status = wait_finished(spool_dir, "soon")
        assert directory == "done", status
        due = parse_rfc3339(status["attempts"][0]["finished_at"]).timestamp() + 2
        assert _started(status, 2) >= due
        found = job_state(spool_dir, "later")
        assert found is not None and found[0] == "pending"
        assert found[1]["next_attempt_at"] == later_due and len(found[1]["attempts"]) == 1
    finally:
        daemon.kill()
