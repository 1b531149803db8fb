"""Schedules on the real daemon (issue 4): `every: 1s`, kill -9 and restart, overlap policies."""

from __future__ import annotations

import itertools
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    DaemonProcess,
    drop,
    job_state,
    local_job,
    run_cli,
    wait_finished,
    wait_for,
    wait_rejected,
    write_config,
)

pytestmark = pytest.mark.daemon


def _schedule(spool: Path, job_id: str) -> dict[str, Any]:
    """The schedule's status.json ({} until it is there)."""
    try:
        return dict(json.loads((spool / "scheduled" / job_id / "status.json").read_text()))
    except FileNotFoundError:
        return {}


def _runs(spool: Path, job_id: str) -> list[str]:
    """Every run of a schedule, wherever it is, oldest first."""
    names = {p.name for d in ("pending", "running", "done", "failed")
             for p in (spool / d).glob(f"{job_id}@*")}  # fmt: skip
    return sorted(names)


def _done_runs(spool: Path, job_id: str) -> list[str]:
    return [run for run in _runs(spool, job_id) if (spool / "done" / run).is_dir()]


def _second(run: str) -> datetime:
    return datetime.strptime(run.split("@")[1], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


def test_an_every_second_schedule_fires_runs_and_says_what_comes_next(
    daemon: DaemonProcess, spool_dir: Path
) -> None:
    drop(spool_dir, "tick.yaml", local_job("tick", "echo tick $JOB_ID", schedule={"every": "1s"}))
    wait_for(lambda: len(_done_runs(spool_dir, "tick")) >= 3, what="three runs")
    runs = _done_runs(spool_dir, "tick")
    assert all(run.startswith("tick@") for run in runs)
    assert {_second(b) - _second(a) for a, b in itertools.pairwise(runs)} == {timedelta(seconds=1)}
    status = job_state(spool_dir, runs[0])
    assert status is not None and status[1]["schedule"] == "tick"
    assert f"INFO tick {runs[0]}" in (spool_dir / "done" / runs[0] / "log").read_text()
    schedule = _schedule(spool_dir, "tick")
    assert schedule["state"] == "scheduled" and len(schedule["next_fire_times"]) == 3
    listing = run_cli(spool_dir, "list", "--state", "scheduled")
    assert listing.returncode == 0 and "tick" in listing.stdout and "next: " in listing.stdout
    shown = run_cli(spool_dir, "status", "tick")
    assert "next firing:" in shown.stdout and "run:" in shown.stdout

    removed = run_cli(spool_dir, "unschedule", "tick")
    assert removed.returncode == 0, removed.stderr
    wait_for(lambda: "schedule tick removed" in daemon.log(), what="the daemon to drop it")
    made = set(_runs(spool_dir, "tick"))
    # A job dropped now finishes well after the next second: no firing came in between.
    drop(spool_dir, "after.yaml", local_job("after", "sleep 1.5"))
    wait_finished(spool_dir, "after")
    assert set(_runs(spool_dir, "tick")) == made
    assert not (spool_dir / "scheduled" / "tick").exists()


@pytest.mark.parametrize("catch_up", ["all", "skip"])
def test_kill_9_and_restart_neither_loses_nor_repeats_a_firing(
    spool_dir: Path, tmp_path: Path, catch_up: str
) -> None:
    daemon = DaemonProcess(spool_dir, write_config(tmp_path / "config.yaml", spool_dir))
    daemon.start()
    try:
        drop(spool_dir, "beat.yaml",
             local_job("beat", "true", schedule={"every": "1s", "catch_up": catch_up,
                                                "overlap": "queue"}))  # fmt: skip
        wait_for(lambda: len(_runs(spool_dir, "beat")) >= 2, what="two runs")
        daemon.kill()
        down = datetime.now(UTC)
        time.sleep(3.5)  # the downtime itself: three firings fall into it
        daemon.start()
        up = datetime.now(UTC)
        wait_for(lambda: len([r for r in _runs(spool_dir, "beat")
                              if _second(r) > up + timedelta(seconds=1)]) >= 2,
                 what="runs after the restart")  # fmt: skip
    finally:
        daemon.kill()
    runs = _runs(spool_dir, "beat")
    seconds = [_second(run) for run in runs]
    gaps = [b - a for a, b in itertools.pairwise(seconds)]
    notes = " ".join(note["what"] for note in _schedule(spool_dir, "beat").get("notes", []))
    if catch_up == "all":
        assert set(gaps) == {timedelta(seconds=1)}, f"a firing lost: {runs}"
        assert "one run each (catch_up: all)" in notes
    else:
        assert max(gaps) >= timedelta(seconds=3), f"missed firings ran: {runs}"
        assert "firing(s) missed while spoold was down" in notes and "skipped" in notes
    assert any(s > down for s in seconds), "the restart fired again"


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
    wait_for(lambda: len(_schedule(spool_dir, "slow").get("notes", [])) >= 2,
             what="two skipped firings")  # fmt: skip
    notes = [note["what"] for note in _schedule(spool_dir, "slow")["notes"]]
    first = _runs(spool_dir, "slow")[0]
    assert all(f"skipped: run {first} is still going (overlap: skip)" in n for n in notes)
    assert _runs(spool_dir, "slow") == [first]
    run_cli(spool_dir, "unschedule", "slow")
    release.touch()
    assert wait_finished(spool_dir, first)[0] == "done"


def test_overlap_queue_runs_every_firing_one_after_another(
    daemon: DaemonProcess, spool_dir: Path, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    drop(spool_dir, "queued.yaml", _blocking("queued", release, "queue"))
    wait_for(lambda: len(_runs(spool_dir, "queued")) >= 3, what="three runs, two waiting")
    run_cli(spool_dir, "unschedule", "queued")
    wait_for(lambda: "schedule queued removed" in daemon.log(), what="the schedule's removal")
    runs = _runs(spool_dir, "queued")
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
    wait_for(lambda: len(_runs(spool_dir, "fresh")) >= 2, what="a second firing")
    first = _runs(spool_dir, "fresh")[0]
    directory, status = wait_finished(spool_dir, first)
    assert (directory, status["state"]) == ("failed", "cancelled")
    assert (
        "(overlap: replace)" in status["error"] and "replaced by the firing at" in status["error"]
    )
    run_cli(spool_dir, "unschedule", "fresh")
    release.touch()


def test_a_schedule_that_never_fires_is_rejected_and_one_dropped_again_is_replaced(
    daemon: DaemonProcess, spool_dir: Path
) -> None:
    drop(spool_dir, "feb.yaml", local_job("feb", "true", schedule="0 0 31 2 *"))
    reason = wait_rejected(spool_dir, "feb.yaml")
    assert "never fires" in reason["reason"]
    drop(spool_dir, "twice.yaml", local_job("twice", "true", schedule={"every": "1h"}))
    wait_for((spool_dir / "scheduled" / "twice").is_dir, what="the schedule")
    drop(spool_dir, "twice2.yaml", local_job("twice", "true", schedule={"every": "1s"}))
    wait_for(lambda: _runs(spool_dir, "twice"), what="a run of the new definition")
    schedule = _schedule(spool_dir, "twice")
    assert schedule["schedule"] == {"every": "1s"}
    assert any(note["what"] == "definition replaced" for note in schedule["notes"])
    duplicate = drop(spool_dir, "plain.yaml", local_job("twice", "true"))
    assert "already exists in scheduled/" in wait_rejected(spool_dir, duplicate.name)["reason"]
    for verb in ("cancel", "retry"):
        refused = run_cli(spool_dir, verb, "twice")
        assert refused.returncode == 1 and "twice is a schedule" in refused.stderr, refused.stderr
    run_cli(spool_dir, "unschedule", "twice")
