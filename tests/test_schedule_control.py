"""Run now, pause and resume a schedule (issue 19), and the schedules as the faces list them.

The faces (``spoold.face.schedules``) write requests into the spool; a real Scheduler, on a
FakeClock, acts on them at its sync (what SIGUSR1 makes the daemon do at once) or its next
firing. APScheduler is registered for real but paused: the tests call ``fire`` at the
firings, as APScheduler would.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from spoold.core.clock import parse_rfc3339, rfc3339
from spoold.core.errors import InvalidTransition, JobNotFound
from spoold.core.spool import Spool
from spoold.core.states import JobState
from spoold.face.schedules import (
    LAST_RUNS_SHOWN,
    NEXT_SHOWN,
    pause,
    resume,
    run_now,
    schedule_row,
    schedule_rows,
    wake_daemon,
)
from spoold.intake.incoming import Accepted, Intake
from spoold.intake.validation import JobValidator, job_validator
from spoold.run.control import JobControl
from spoold.run.dispatch import JobMeta
from spoold.run.registry import ExecutorRegistry
from spoold.schedule.scheduler import Scheduler
from tests.fakes import FakeClock
from tests.harness import local_job

#: Dropped at a time with a fraction of a second, as real drops are.
T = datetime(2026, 11, 22, 10, 2, 47, 160000, tzinfo=UTC)
PERIOD = timedelta(seconds=20)
ALICE, BOB = "alice on host1", "token ops-bot"


class Bench:
    """A spool, intake and a scheduler on one FakeClock; what the scheduler queued, and the
    lags it reported."""

    def __init__(self, root: Path, clock: FakeClock) -> None:
        self.spool = Spool(root)
        self.spool.init()
        self.clock = clock
        self.queued: list[str] = []
        self.lags: list[float] = []
        logger = logging.getLogger("spoold.test")
        self.scheduler = Scheduler(
            self.spool, clock, logger, queue=self._queue,
            defer=lambda run, when: None, cancel=lambda run, why: None, draw=lambda: 0.0,
            on_fired=self.lags.append,
        )  # fmt: skip
        self.scheduler._aps.start(paused=True)  # the test, not the wall clock, fires
        self.intake = Intake(
            self.spool, _validator(), clock,
            max_file_size=1 << 20, settle_time=0.0, on_accepted=lambda job, document: None,
            logger=logger, on_scheduled=lambda placed: self.scheduler.sync(),
        )  # fmt: skip

    def _queue(self, run: str, document: dict[str, Any], meta: JobMeta) -> None:
        self.queued.append(run)

    def drop(self, job_id: str, schedule: dict[str, Any] | None, **fields: Any) -> None:
        path = self.spool.dir("incoming") / f"{job_id}.yaml"
        if schedule is not None:
            fields["schedule"] = schedule
        path.write_text(yaml.safe_dump(local_job(job_id, "true", **fields)))
        assert isinstance(self.intake.offer(path.name, complete=True), Accepted)

    def status(self, job_id: str) -> dict[str, Any]:
        return dict(self.spool.jobs.read_status(self.spool.jobs.get(job_id)))

    def notes(self, job_id: str) -> list[str]:
        return [note["what"] for note in self.status(job_id).get("notes", [])]

    def runs(self, job_id: str) -> list[str]:
        """Every run of the schedule, wherever it is, oldest first."""
        return sorted(
            job.job_id
            for directory in ("pending", "running", "done", "failed")
            for job in self.spool.jobs.list_jobs(directory)
            if job.job_id.startswith(f"{job_id}@")
        )

    def at(self, moment: datetime, job_id: str) -> None:
        """Move the clock to ``moment`` and wake the scheduler there, as APScheduler would."""
        self.clock.advance((moment - self.clock.now()).total_seconds())
        self.scheduler.fire(job_id)

    def finish(self, run: str, state: JobState) -> None:
        """End a pending run as a worker would have (claimed, then finished)."""
        claimed = self.spool.jobs.claim(run)
        assert claimed is not None
        status = {**self.spool.jobs.read_status(claimed), "state": state.value}
        self.spool.jobs.finish(claimed, state, status)


@functools.cache
def _validator() -> JobValidator:
    return job_validator(ExecutorRegistry.from_entry_points())


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    made = Bench(tmp_path / "spool", FakeClock(T))
    yield made
    made.scheduler.stop()


def _firing(k: int) -> datetime:
    """The k-th firing (from 1) of an ``every: 20s`` schedule dropped at T."""
    return T + k * PERIOD


def _run_of(job_id: str, moment: datetime) -> str:
    return f"{job_id}@{moment.astimezone(UTC).strftime('%Y%m%dT%H%M%SZ')}"


# -- pause and resume -------------------------------------------------------------------------


def test_a_paused_schedule_makes_no_runs_and_notes_each_firing_it_skips(bench: Bench) -> None:
    bench.drop("beat", {"every": "20s", "catch_up": "all", "overlap": "allow"})
    done = pause(bench.spool, "beat", who=ALICE, now=bench.clock.now())
    assert done == {"job_id": "beat", "paused": True, "paused_at": rfc3339(T),
                    "paused_by": ALICE, "changed": True}  # fmt: skip
    again = pause(bench.spool, "beat", who=BOB)
    assert (again["changed"], again["paused_by"]) == (False, ALICE), "the first pause holds"

    bench.scheduler.sync()  # as SIGUSR1 makes the daemon do
    status = bench.status("beat")
    assert (status["paused"], status["paused_by"], status["next_fire_times"]) == (True, ALICE, [])
    assert any(f"paused by {ALICE}" in note for note in bench.notes("beat"))

    for k in (1, 2, 3):
        bench.at(_firing(k), "beat")
    assert bench.queued == [] and bench.runs("beat") == []
    skipped = [note for note in bench.notes("beat") if "while paused" in note]
    assert len(skipped) == 1, "one note per pause, counted on"
    assert skipped[0].startswith("skipped 3 firing(s) while paused") and ALICE in skipped[0]
    status = bench.status("beat")
    assert status["last_fired"] == rfc3339(_firing(3)), "each firing dealt with"
    assert status["next_fire_times"] == []
    log = bench.spool.jobs.read_log(bench.spool.jobs.get("beat")).read().decode()
    assert log.count("firing(s) skipped while paused") == 3


def test_a_pause_holds_from_the_next_firing_without_a_sync(bench: Bench) -> None:
    """Another host paused it and could not wake this daemon: the firing looks for itself."""
    bench.drop("beat", {"every": "20s"})
    pause(bench.spool, "beat", who=ALICE, now=T)
    bench.at(_firing(1), "beat")
    assert bench.queued == []
    assert bench.status("beat")["paused"] is True


def test_resume_runs_the_next_firing_and_does_not_catch_up_the_paused_ones(bench: Bench) -> None:
    bench.drop("beat", {"every": "20s", "catch_up": "all", "overlap": "allow"})
    pause(bench.spool, "beat", who=ALICE, now=T)
    bench.scheduler.sync()
    bench.at(_firing(1), "beat")
    bench.at(_firing(2), "beat")
    bench.clock.advance(5)
    ended = resume(bench.spool, "beat", who=BOB, now=bench.clock.now())
    assert (ended["changed"], ended["was_paused"]["by"]) == (True, ALICE)
    assert resume(bench.spool, "beat", who=BOB)["changed"] is False, "not paused any more"

    bench.scheduler.sync()
    status = bench.status("beat")
    assert (status["paused"], status["paused_at"], status["paused_by"]) == (False, None, None)
    assert status["next_fire_times"][0] == rfc3339(_firing(3))
    assert any(note.startswith(f"resumed by {BOB}") for note in bench.notes("beat"))
    assert bench.queued == [], "nothing caught up at the resume"
    assert not (bench.spool.jobs.get("beat").path / "resumed").exists(), "noted, then removed"

    bench.at(_firing(3), "beat")
    assert bench.queued == [_run_of("beat", _firing(3))]
    assert bench.runs("beat") == [_run_of("beat", _firing(3))]


def test_a_resume_seen_after_a_downtime_skips_the_paused_firings_and_catches_up_the_rest(
    bench: Bench, tmp_path: Path
) -> None:
    bench.drop("beat", {"every": "20s", "catch_up": "all", "overlap": "allow"})
    pause(bench.spool, "beat", who=ALICE, now=T)
    bench.scheduler.sync()
    bench.scheduler.stop()
    # Down from here to after firing 6; resumed (on another host) between firings 3 and 4.
    resume(bench.spool, "beat", who=BOB, now=_firing(3) + timedelta(seconds=1))
    bench.clock.advance((_firing(6) + timedelta(seconds=90) - T).total_seconds())
    again = Bench(tmp_path / "spool", bench.clock)
    try:
        again.scheduler.sync()
        assert again.queued == [_run_of("beat", _firing(k)) for k in (4, 5, 6, 7, 8, 9, 10)]
        notes = again.notes("beat")
        assert any(n.startswith("skipped 3 firing(s) while paused") for n in notes), notes
        assert any(n.startswith(f"resumed by {BOB}") for n in notes), notes
        assert any("caught up" in n and "(catch_up: all)" in n for n in notes), notes
    finally:
        again.scheduler.stop()


def test_a_definition_replaced_while_paused_is_not_paused(bench: Bench) -> None:
    bench.drop("beat", {"every": "20s"})
    pause(bench.spool, "beat", who=ALICE, now=T)
    bench.scheduler.sync()
    bench.drop("beat", {"every": "30s"})
    status = bench.status("beat")
    assert status["paused"] is False and status["next_fire_times"]
    assert any("definition replaced while paused" in note for note in bench.notes("beat"))


# -- run now ----------------------------------------------------------------------------------


def test_run_now_makes_one_run_at_once_named_by_its_time(bench: Bench) -> None:
    bench.drop("beat", {"every": "20s", "overlap": "allow"})
    bench.clock.advance(3.5)
    asked_at = bench.clock.now()
    run = run_now(bench.spool, "beat", who=BOB, now=asked_at)
    assert run == _run_of("beat", asked_at)
    # Asked again in that second: a run of its own, named by the next second (three in one
    # second were one run, and each caller was told "asked for").
    again = run_now(bench.spool, "beat", who=ALICE, now=asked_at)
    assert again == _run_of("beat", asked_at + timedelta(seconds=1)), "a run of its own"
    assert schedule_row(bench.spool, "beat", now=asked_at)["run_now_asked"] == [
        {"run_id": run, "by": BOB, "at": rfc3339(asked_at)},
        {"run_id": again, "by": ALICE, "at": rfc3339(asked_at)},
    ]
    assert bench.queued == [], "the daemon makes them, at its sync"
    assert wake_daemon(bench.spool, "host1") is False, "none runs here: it acts when it starts"

    bench.clock.advance(0.01)
    bench.scheduler.sync()
    assert bench.queued == [run, again] and bench.runs("beat") == [run, again]
    assert bench.lags == [], "a run now is no firing: no lag"
    made = bench.status(run)
    assert (made["schedule"], made["state"]) == ("beat", "pending")
    assert bench.status("beat")["runs"][-2] == {"run_id": run, "fired_at": rfc3339(
        asked_at.replace(microsecond=0)), "requested_by": BOB}  # fmt: skip
    assert schedule_row(bench.spool, "beat", now=bench.clock.now())["run_now_asked"] == []
    log = bench.spool.jobs.read_log(bench.spool.jobs.get(run)).read().decode()
    assert f"run now of schedule beat, asked for by {BOB}" in log

    bench.scheduler.sync()
    bench.at(_firing(1), "beat")
    assert bench.queued == [run, again, _run_of("beat", _firing(1))], "the firings go on"


def test_a_run_now_request_seen_twice_makes_one_run(bench: Bench, tmp_path: Path) -> None:
    bench.drop("beat", {"every": "20s"})
    asked_at = bench.clock.now()
    run = run_now(bench.spool, "beat", who=BOB, now=asked_at)
    schedule = bench.spool.jobs.get("beat")
    record = {"by": BOB, "at": rfc3339(asked_at), "run_id": run}

    # A crash after the run was made, before status.json recorded it.
    real_write = bench.spool.jobs.write_status

    def crash(job: Any, status: dict[str, Any], *, durable: bool = False) -> None:
        if job.job_id == "beat":
            raise OSError("killed")
        real_write(job, status, durable=durable)

    bench.spool.jobs.write_status = crash  # type: ignore[method-assign]
    bench.scheduler.sync()
    assert bench.runs("beat") == [run] and bench.queued == []
    assert bench.spool.jobs.schedule_requests(schedule).run_now, "the request is still there"

    again = Bench(tmp_path / "spool", bench.clock)  # the restart
    try:
        again.scheduler.sync()
        assert again.runs("beat") == [run], "not made twice"
        assert [r["run_id"] for r in again.status("beat")["runs"]] == [run], "recorded now"
        assert not again.spool.jobs.schedule_requests(schedule).run_now, "then removed"
        # A crash after the record, before the request went: seen again, made nothing.
        assert again.spool.jobs.request_run_now(schedule, run, record)
        again.scheduler.sync()
        assert again.runs("beat") == [run]
        assert [r["run_id"] for r in again.status("beat")["runs"]] == [run]
        assert not again.spool.jobs.schedule_requests(schedule).run_now
    finally:
        again.scheduler.stop()


def test_a_paused_schedule_still_runs_when_asked_to_run_now(bench: Bench) -> None:
    bench.drop("beat", {"every": "20s"})
    pause(bench.spool, "beat", who=ALICE, now=T)
    run = run_now(bench.spool, "beat", who=BOB, now=bench.clock.now())
    bench.scheduler.sync()
    assert bench.queued == [run]
    assert bench.status("beat")["paused"] is True
    bench.at(_firing(1), "beat")
    assert bench.queued == [run], "its firings stay paused"


def test_run_now_keeps_the_overlap_rule_of_a_firing(bench: Bench) -> None:
    bench.drop("slow", {"every": "20s"})  # overlap: skip, the default
    bench.at(_firing(1), "slow")
    [going] = bench.queued
    with pytest.raises(InvalidTransition, match=f"run {going} is still going"):
        run_now(bench.spool, "slow", who=BOB, now=bench.clock.now())
    # Asked while nothing ran, acted on once a firing's run is going: skipped, and said.
    schedule = bench.spool.jobs.get("slow")
    asked = _run_of("slow", bench.clock.now() + timedelta(seconds=2))
    bench.spool.jobs.request_run_now(schedule, asked, {"by": BOB, "at": rfc3339(T)})
    bench.scheduler.sync()
    assert bench.queued == [going] and bench.runs("slow") == [going]
    assert any(
        note.startswith(f"run now asked for by {BOB}") and f"skipped: run {going}" in note
        for note in bench.notes("slow")
    )
    assert not bench.spool.jobs.schedule_requests(schedule).run_now, "dealt with: removed"

    bench.finish(going, JobState.SUCCEEDED)
    bench.clock.advance(3)  # not in the second of that firing: that run would be this one
    run = run_now(bench.spool, "slow", who=BOB, now=bench.clock.now())
    bench.scheduler.sync()
    assert bench.queued == [going, run]


def test_overlap_skip_looks_back_past_the_newest_run_as_the_face_does(bench: Bench) -> None:
    """A run that is not the newest may be going again: one of the last five, failed and
    retried after four more ran. Its schedule's next firing is skipped, as the face refuses a
    run now for it: both look at the same five newest runs."""
    bench.drop("slow", {"every": "20s"})  # overlap: skip, the default
    runs = []
    for k in range(1, 6):
        bench.at(_firing(k), "slow")
        runs.append(bench.queued[-1])
        bench.finish(runs[-1], JobState.FAILED if k == 1 else JobState.SUCCEEDED)
    oldest = runs[0]
    JobControl(bench.spool, bench.clock, who=BOB).retry(oldest)
    with pytest.raises(InvalidTransition, match=f"run {oldest} is still going"):
        run_now(bench.spool, "slow", who=BOB, now=bench.clock.now())
    bench.at(_firing(6), "slow")
    assert bench.queued == runs, "a firing made a run beside the one going"
    assert bench.notes("slow")[-1] == (
        f"firing at {rfc3339(_firing(6))} skipped: run {oldest} is still going (overlap: skip)"
    )


@pytest.mark.parametrize("action", ["run", "pause", "resume"])
def test_what_is_not_a_schedule_cannot_be_run_paused_or_resumed(bench: Bench, action: str) -> None:
    bench.drop("plain", None)
    bench.drop("beat", {"every": "20s"})
    bench.at(_firing(1), "beat")
    do = {"run": run_now, "pause": pause, "resume": resume}[action]
    with pytest.raises(JobNotFound, match="plain is a job \\(in pending/\\), not a schedule"):
        do(bench.spool, "plain", who=BOB)
    with pytest.raises(JobNotFound, match="no job 'nothing'"):
        do(bench.spool, "nothing", who=BOB)
    [run] = bench.queued
    with pytest.raises(JobNotFound, match=f"{run} is a run of schedule beat"):
        do(bench.spool, run, who=BOB)
    with pytest.raises(JobNotFound):
        schedule_row(bench.spool, "plain")
    assert not (bench.spool.jobs.get("plain").path / "paused").exists()


# -- the listing, and the lag -----------------------------------------------------------------


def test_schedule_rows_show_each_schedule_soonest_first(bench: Bench) -> None:
    bench.drop("hourly", {"cron": "0 * * * *"})  # next: 11:00
    bench.drop("beat", {"every": "20s", "overlap": "allow"})  # next: 10:03:07.16
    bench.drop("held", {"every": "1m"})
    bench.drop("daily", {"cron": "30 2 * * *"})  # next: 02:30 tomorrow
    pause(bench.spool, "held", who=ALICE, now=T)
    for k in range(1, 8):
        bench.at(_firing(k), "beat")
    runs = [_run_of("beat", _firing(k)) for k in range(1, 8)]
    bench.finish(runs[-1], JobState.SUCCEEDED)
    bench.finish(runs[-2], JobState.CANCELLED)
    bench.finish(runs[-3], JobState.FAILED)
    bench.spool.jobs.purge(bench.spool.jobs.get(runs[-3]))  # retention took it
    now = bench.clock.now()

    rows = schedule_rows(bench.spool, now=now)
    assert [row["job_id"] for row in rows] == ["beat", "hourly", "daily", "held"]
    beat, hourly, daily, held = rows
    expected = [rfc3339(_firing(k)) for k in range(8, 8 + NEXT_SHOWN)]
    assert beat["next_fire_times"] == expected
    assert hourly["next_fire_times"][:2] == ["2026-11-22T11:00:00.000000Z",
                                             "2026-11-22T12:00:00.000000Z"]  # fmt: skip
    assert daily["next_fire_times"][0] == "2026-11-23T02:30:00.000000Z"
    assert (held["paused"], held["paused_by"], held["next_fire_times"]) == (True, ALICE, [])
    assert beat["paused"] is False and beat["paused_by"] is None
    assert [(r["run_id"], r["state"]) for r in beat["last_runs"]] == [
        (runs[6], "succeeded"), (runs[5], "cancelled"), (runs[4], "gone"), (runs[3], "pending"),
        (runs[2], "pending"),
    ][:LAST_RUNS_SHOWN]  # fmt: skip
    assert beat["last_runs"][0]["fired_at"] == rfc3339(_firing(7))
    # Its status.json as `spoold status beat --json` prints it, under what the row adds.
    for key, value in bench.status("beat").items():
        if key not in ("next_fire_times", "paused_at", "paused_by"):
            assert beat[key] == value, key
    assert hourly["last_runs"] == [] and hourly["run_now_asked"] == []


def test_the_next_firings_shown_are_right_with_the_daemon_down(bench: Bench) -> None:
    bench.drop("beat", {"every": "20s"})
    bench.at(_firing(1), "beat")
    later = _firing(50) + timedelta(seconds=3)  # no scheduler ran since firing 1
    [row] = schedule_rows(bench.spool, now=later)
    assert [parse_rfc3339(t) for t in row["next_fire_times"]] == [
        _firing(k) for k in range(51, 51 + NEXT_SHOWN)
    ]


def test_on_fired_hears_the_lag_of_each_run_a_firing_makes(bench: Bench) -> None:
    bench.drop("beat", {"every": "20s", "overlap": "allow", "catch_up": "once"})
    bench.at(_firing(1) + timedelta(milliseconds=250), "beat")
    assert bench.lags == [pytest.approx(0.25)]
    bench.at(_firing(2), "beat")
    assert bench.lags[1:] == [0.0]
    # Down for 65 s: of the firings at +60, +80 and +100 s, the one at +100 s is on time (5 s
    # late: less than a period), and the one run (catch_up: once).
    bench.clock.advance(65)
    bench.scheduler.fire("beat")
    assert bench.lags[2:] == [pytest.approx(5.0)]
    pause(bench.spool, "beat", who=ALICE, now=bench.clock.now())
    bench.at(_firing(7), "beat")
    assert len(bench.lags) == 3, "a skipped firing makes no run, so no lag"
