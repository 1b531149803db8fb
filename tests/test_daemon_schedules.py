"""Schedules on the real daemon (issue 4): overlap policies, on real worker processes.

Firings, what status says of them, a crash and restart, and replaced definitions are driven
round by round on a FakeClock in test_daemon_ticks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    DaemonProcess,
    drop,
    local_job,
    run_cli,
    schedule_runs,
    schedule_status,
    wait_finished,
    wait_for,
)

pytestmark = pytest.mark.daemon


def _blocking(job_id: str, release: Path, overlap: str, **fields: Any) -> dict[str, Any]:
    """A schedule whose runs hold on until ``release`` exists; overlapping runs fail (exit 9)."""
    script = (f"mkdir {release}.lock 2>/dev/null || exit 9; "
              f"while [ ! -e {release} ]; do sleep 0.02; done; rmdir {release}.lock")  # fmt: skip
    return local_job(job_id, script, schedule={"every": "1s", "overlap": overlap}, **fields)


def test_overlap_skip_records_each_firing_it_skips(
    daemon: DaemonProcess, spool_dir: Path, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    drop(spool_dir, "slow.yaml", _blocking("slow", release, "skip"))
    wait_for(lambda: len(schedule_status(spool_dir, "slow").get("notes", [])) >= 2,
             what="two skipped firings")  # fmt: skip
    notes = [note["what"] for note in schedule_status(spool_dir, "slow")["notes"]]
    first = schedule_runs(spool_dir, "slow")[0]
    assert all(f"skipped: run {first} is still going (overlap: skip)" in n for n in notes)
    assert schedule_runs(spool_dir, "slow") == [first]
    run_cli(spool_dir, "unschedule", "slow")
    release.touch()
    assert wait_finished(spool_dir, first)[0] == "done"


def test_overlap_queue_runs_every_firing_one_after_another(
    daemon: DaemonProcess, spool_dir: Path, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    drop(spool_dir, "queued.yaml", _blocking("queued", release, "queue"))
    wait_for(lambda: len(schedule_runs(spool_dir, "queued")) >= 3, what="three runs, two waiting")
    run_cli(spool_dir, "unschedule", "queued")
    wait_for(lambda: "schedule queued removed" in daemon.log(), what="the schedule's removal")
    runs = schedule_runs(spool_dir, "queued")
    assert sum(1 for r in runs if (spool_dir / "pending" / r).is_dir()) >= 2
    release.touch()
    for run in runs:
        directory, status = wait_finished(spool_dir, run)
        assert directory == "done", status  # none overlapped another (that one exits 9)


def test_overlap_replace_cancels_the_run_still_going(
    daemon: DaemonProcess, spool_dir: Path, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    drop(spool_dir, "fresh.yaml", _blocking("fresh", release, "replace"))
    wait_for(lambda: len(schedule_runs(spool_dir, "fresh")) >= 2, what="a second firing")
    first = schedule_runs(spool_dir, "fresh")[0]
    directory, status = wait_finished(spool_dir, first)
    assert (directory, status["state"]) == ("failed", "cancelled")
    assert (
        "(overlap: replace)" in status["error"] and "replaced by the firing at" in status["error"]
    )
    run_cli(spool_dir, "unschedule", "fresh")
    release.touch()
