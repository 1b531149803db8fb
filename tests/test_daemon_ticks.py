"""The daemon's loop driven round by round on a FakeClock (Daemon.tick): its timetable, the
retries it hands out once due, and schedules fired at APScheduler's wake-ups, across restarts.

The daemon is built by Daemon.build with its workers in process (tests.daemon_bench); what
needs the real processes (signals, kill -9, worker processes, cancelling a running job) is
driven as a subprocess in the other test_daemon_* modules.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from spoold.executors.docker import LABEL_JOB, LABEL_MANAGED, LABEL_SPOOL

from spoold.core.clock import parse_rfc3339
from spoold.daemon import STATUS_EVERY, SWEEP_EVERY, Systemd
from spoold.intake.incoming import Accepted, Rejected
from tests.daemon_bench import TickedDaemon
from tests.fakes import FakeClock
from tests.harness import (
    job_state,
    local_job,
    run_cli,
    schedule_runs,
    schedule_status,
    write_config,
)

#: Where the fake clock starts: a time with a fraction of a second, as real ones have.
T = datetime(2026, 11, 22, 10, 2, 47, 160000, tzinfo=UTC)

FLAKY = 'test "$SPOOLD_ATTEMPT" -gt 1 || exit 75'  # fails its first attempt only


class Bench:
    """Daemons started one after another on one spool and one FakeClock."""

    def __init__(self, spool: Path, tmp_path: Path) -> None:
        self.spool = spool
        self.clock = FakeClock(T)
        # The host's heartbeat beats every 10 s: out of the way of the timetable's rounds.
        self.config = write_config(
            tmp_path / "config.yaml", spool, logdir=str(tmp_path / "log"),
            heartbeat_interval="10s", lease_timeout="30s",
        )  # fmt: skip
        self.current: TickedDaemon | None = None

    def start(self) -> TickedDaemon:
        """A daemon on the spool; the one before it, if any, is gone as if killed."""
        self.crash()
        self.current = TickedDaemon(self.spool, self.config, self.clock)
        return self.current

    def crash(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None


@pytest.fixture
def bench(spool_dir: Path, tmp_path: Path) -> Iterator[Bench]:
    made = Bench(spool_dir, tmp_path)
    yield made
    made.crash()


def _status(spool: Path, job_id: str) -> dict[str, Any]:
    found = job_state(spool, job_id)
    assert found is not None, f"{job_id} is in no job directory"
    return found[1]


def _started(status: dict[str, Any], number: int) -> float:
    return parse_rfc3339(status["attempts"][number - 1]["started_at"]).timestamp()


# -- the timetable ---------------------------------------------------------------------------------


def test_a_round_says_when_the_next_is_due_and_a_rescan_comes_at_once(bench: Bench) -> None:
    ticked = bench.start()
    start = bench.clock.monotonic()
    # rescan_interval 1s, a status line every STATUS_EVERY: the first scan comes a second on.
    assert ticked.tick() == start + 1.0
    assert ticked.tick() == start + 1.0, "nothing changed: the same round is due"
    ticked.drop("lost.yaml", local_job("lost", "true"))
    ticked.workers.queued.clear()  # handed over, and lost on the way: pending/ still has it
    ticked.advance_to(start + 0.5)
    ticked.daemon.rescan.set()  # SIGUSR1: `spoold retry` put a job back into pending/
    assert ticked.tick() == start + 1.5, "scanned at once; the next scan a second on"
    assert not ticked.daemon.rescan.is_set()
    assert ticked.work() == ["lost"], "the scan queued what pending/ holds"
    ticked.advance_to(start + 1.5)
    assert ticked.tick() == start + STATUS_EVERY, "scanned; the status line is due first"
    ticked.advance_to(start + STATUS_EVERY)
    assert ticked.tick() == start + 2.5


def test_a_changed_status_line_goes_out_at_each_round_it_is_due(bench: Bench) -> None:
    """CI waited 60 s for a running job's status line and never saw it. The loop reports every
    STATUS_EVERY, but the report held its own clock reading against the last one sent: when the
    last report's count of pending/ took a while and this one's did not, the line was "too soon"
    and waited a whole STATUS_EVERY more, past a short job's run. The round's time is used now,
    and a forced line (recovering) no longer holds back the first report after it."""
    ticked = bench.start()
    sent: list[tuple[float, str]] = []

    class Recording(Systemd):
        def status(self, text: str, now: float, *, force: bool = False) -> bool:
            new = super().status(text, now, force=force)
            if new:
                sent.append((now, text))
            return new

    ticked.daemon.systemd = Recording({})
    ticked.daemon.systemd.status("recovering", bench.clock.monotonic(), force=True)
    counts = itertools.count()

    def slow_then_quick(*, wall: float, now: float) -> int:
        number = next(counts)
        if number == 0:
            bench.clock.advance(0.05)  # the first count stat'ed a slow disk
        return number  # a line that changes at every report

    setattr(ticked.daemon._pending_count, "count", slow_then_quick)  # noqa: B010 - a spy
    start = bench.clock.monotonic()
    while bench.clock.monotonic() < start + 3 * STATUS_EVERY:
        ticked.advance_to(ticked.tick())
    reports = [text for _, text in sent]
    assert reports[0] == "recovering"
    assert reports[1:] == [f"running: 0 jobs, {n} pending" for n in range(len(reports) - 1)]
    assert sent[1][0] == start, "the first round's line replaced the forced one at once"
    assert len(reports) == 4, f"one line per STATUS_EVERY: {sent}"


def test_a_container_a_job_could_not_remove_is_swept_within_a_period(
    bench: Bench, dockerd: str, client: Any
) -> None:
    """A job's own clean-up could not remove its container (its engine away at the end, a
    cancel during the outage) and said "recovery removes it later": recovery swept at the
    daemon's start, and after moving a job, so it stayed until the next start. The executors
    sweep every SWEEP_EVERY now."""
    ticked = bench.start()
    start = bench.clock.monotonic()
    labels = {LABEL_JOB: "gone", LABEL_MANAGED: "1", LABEL_SPOOL: str(ticked.daemon.spool.root)}
    left = client.containers.create(dockerd, ["true"], labels=labels)
    try:
        assert ticked.tick() <= start + SWEEP_EVERY
        left.reload()  # still there: recovery swept before it was made
        ticked.advance_to(start + SWEEP_EVERY)
        ticked.tick()
        assert ticked.daemon.sweeping is not None
        ticked.daemon.sweeping.join(60)  # the loop does not wait for an engine
        assert client.containers.list(all=True, filters={"label": f"{LABEL_JOB}=gone"}) == []
    finally:
        with contextlib.suppress(Exception):
            left.remove(force=True)


def test_a_backlog_the_workers_hold_is_not_listed_at_every_round(bench: Bench) -> None:
    """Jobs held back (a full limit) can wait for hours, thousands of them: the status line
    counted pending/ every STATUS_EVERY and each scan stat'ed every pending job. Now pending/ is
    counted again only when its stamp may have changed, and a scan looks closer only at what
    the workers do not hold."""
    ticked = bench.start()
    for n in range(20):
        ticked.drop(f"held-{n:02d}.yaml", local_job(f"held-{n:02d}", "true"))
    spool = ticked.daemon.spool
    listings, looked = [], []
    count, status = spool.count, ticked.daemon._pending_status

    def counted(directory: str) -> int:
        listings.append(directory)
        return count(directory)

    def read(job: Any) -> dict[str, Any]:
        looked.append(job.job_id)
        return status(job)

    setattr(spool, "count", counted)  # noqa: B010 - spies on the instance
    setattr(ticked.daemon, "_pending_status", read)  # noqa: B010
    start = bench.clock.monotonic()
    while bench.clock.monotonic() < start + 30:  # 15 status lines, rescan_interval 1 s: 30 scans
        ticked.advance_to(ticked.tick())
    # The fake clock's wall time is before the directories' real stamps: only SETTLE seconds
    # of unchanged stamp settle it, so the first lines count until then.
    assert 1 <= len(listings) <= 4, f"pending/ listed {len(listings)} times in 30 s"
    assert looked == [], "no pending job the workers hold was read"
    ticked.workers.queued.remove("held-07")  # handed over, and lost on the way
    ticked.daemon.rescan.set()
    ticked.tick()
    assert looked == ["held-07"] and "held-07" in ticked.workers.queued, "queued again"


# -- retries (issue 3): moved from test_daemon_semantics, where they waited on the wall clock -----


def test_a_flaky_job_is_retried_after_its_backoff(bench: Bench) -> None:
    ticked = bench.start()
    flaky = local_job("flaky", FLAKY, retries=2, backoff="300ms")
    assert isinstance(ticked.drop("flaky.yaml", flaky), Accepted)
    assert ticked.work() == ["flaky"]
    waiting = _status(bench.spool, "flaky")
    due = parse_rfc3339(waiting["next_attempt_at"])
    wake_at = ticked.tick()
    assert wake_at == pytest.approx(bench.clock.monotonic() + 0.3), "the loop wakes for it"
    ticked.advance_to(wake_at - 0.001)
    ticked.tick()
    assert ticked.work() == [], "not a moment before its backoff"
    bench.clock.advance((due - bench.clock.now()).total_seconds())
    ticked.tick()
    assert ticked.work() == ["flaky"]
    directory, status = job_state(bench.spool, "flaky") or ("", {})
    assert directory == "done", status
    assert [a["exit_code"] for a in status["attempts"]] == [75, 0]
    first_end = parse_rfc3339(status["attempts"][0]["finished_at"]).timestamp()
    assert _started(status, 2) >= first_end + 0.3, "the second attempt came before its backoff"


def test_a_restart_keeps_the_retry_schedule(bench: Bench) -> None:
    ticked = bench.start()
    ticked.drop("later.yaml", local_job("later", FLAKY, retries=1, backoff="1h"))
    ticked.drop("soon.yaml", local_job("soon", FLAKY, retries=1, backoff="2s"))
    assert sorted(ticked.work()) == ["later", "soon"]
    for job_id in ("later", "soon"):
        found = job_state(bench.spool, job_id)
        assert found is not None and found[0] == "pending" and found[1].get("next_attempt_at")
    ticked.tick()
    later_due = _status(bench.spool, "later")["next_attempt_at"]
    before = len(ticked.log())
    restarted = bench.start()
    # The restarted daemon read the schedule back from status.json ...
    assert "job later waits for its next attempt" in restarted.log()[before:]
    restarted.tick()
    assert restarted.work() == [], "neither is due yet"
    # ... and keeps it: "soon" runs once due, "later" stays where it is.
    soon_due = parse_rfc3339(_status(bench.spool, "soon")["next_attempt_at"])
    bench.clock.advance((soon_due - bench.clock.now()).total_seconds())
    restarted.tick()
    assert restarted.work() == ["soon"]
    directory, status = job_state(bench.spool, "soon") or ("", {})
    assert directory == "done", status
    due = parse_rfc3339(status["attempts"][0]["finished_at"]).timestamp() + 2
    assert _started(status, 2) >= due
    found = job_state(bench.spool, "later")
    assert found is not None and found[0] == "pending"
    assert found[1]["next_attempt_at"] == later_due and len(found[1]["attempts"]) == 1


# -- schedules (issue 4): moved from test_daemon_schedules, where they waited for real firings ----


def _done_runs(spool: Path, job_id: str) -> list[str]:
    return [run for run in schedule_runs(spool, job_id) if (spool / "done" / run).is_dir()]


def _second(run: str) -> datetime:
    return datetime.strptime(run.split("@")[1], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


def _fire_and_run(ticked: TickedDaemon, job_id: str) -> None:
    """APScheduler's next wake-up for ``job_id``, a round of the loop, the workers' turn."""
    ticked.fire(job_id)
    ticked.tick()
    ticked.work()


def test_an_every_second_schedule_fires_runs_and_says_what_comes_next(bench: Bench) -> None:
    ticked = bench.start()
    spool = bench.spool
    ticked.drop("tick.yaml", local_job("tick", "echo tick $JOB_ID", schedule={"every": "1s"}))
    for _ in range(3):
        _fire_and_run(ticked, "tick")
    runs = _done_runs(spool, "tick")
    assert len(runs) == 3, schedule_runs(spool, "tick")
    assert all(run.startswith("tick@") for run in runs)
    assert {_second(b) - _second(a) for a, b in itertools.pairwise(runs)} == {timedelta(seconds=1)}
    status = job_state(spool, runs[0])
    assert status is not None and status[1]["schedule"] == "tick"
    assert f"INFO tick {runs[0]}" in (spool / "done" / runs[0] / "log").read_text()
    schedule = schedule_status(spool, "tick")
    assert schedule["state"] == "scheduled" and len(schedule["next_fire_times"]) == 3
    listing = run_cli(spool, "list", "--state", "scheduled")
    assert listing.returncode == 0 and "tick" in listing.stdout and "next: " in listing.stdout
    shown = run_cli(spool, "status", "tick")
    assert "next firing:" in shown.stdout and "run:" in shown.stdout

    removed = run_cli(spool, "unschedule", "tick")
    assert removed.returncode == 0, removed.stderr
    bench.clock.advance(1.0)  # no daemon here to wake: the next scan (rescan_interval 1s)
    ticked.tick()
    assert "schedule tick removed" in ticked.log()
    assert not ticked.registered("tick"), "APScheduler wakes spoold for it no more"
    made = set(schedule_runs(spool, "tick"))
    # Well past the next second, and a job run meanwhile: no firing came in between.
    bench.clock.advance(1.5)
    ticked.drop("after.yaml", local_job("after", "true"))
    ticked.tick()
    assert ticked.work() == ["after"]
    assert set(schedule_runs(spool, "tick")) == made
    assert not (spool / "scheduled" / "tick").exists()


@pytest.mark.parametrize("catch_up", ["all", "skip"])
def test_a_crash_and_restart_neither_loses_nor_repeats_a_firing(
    bench: Bench, catch_up: str
) -> None:
    """Moved from test_kill_9_and_restart_...: the downtime was a time.sleep(3.5)."""
    ticked = bench.start()
    spool = bench.spool
    ticked.drop("beat.yaml",
                local_job("beat", "true", schedule={"every": "1s", "catch_up": catch_up,
                                                    "overlap": "queue"}))  # fmt: skip
    _fire_and_run(ticked, "beat")
    ticked.fire("beat")  # made and queued; the crash comes before it runs
    assert len(schedule_runs(spool, "beat")) >= 2
    bench.crash()
    down = bench.clock.now()
    bench.clock.advance(3.5)  # the downtime itself: three firings fall into it
    restarted = bench.start()
    up = bench.clock.now()
    restarted.tick()
    restarted.work()  # the run left pending, and what catching up made
    while (
        len([r for r in schedule_runs(spool, "beat") if _second(r) > up + timedelta(seconds=1)]) < 2
    ):
        _fire_and_run(restarted, "beat")
    assert not [r for r in schedule_runs(spool, "beat") if not (spool / "done" / r).is_dir()]
    runs = schedule_runs(spool, "beat")
    seconds = [_second(run) for run in runs]
    gaps = [b - a for a, b in itertools.pairwise(seconds)]
    notes = " ".join(note["what"] for note in schedule_status(spool, "beat").get("notes", []))
    if catch_up == "all":
        assert set(gaps) == {timedelta(seconds=1)}, f"a firing lost: {runs}"
        assert "one run each (catch_up: all)" in notes
    else:
        assert max(gaps) >= timedelta(seconds=3), f"missed firings ran: {runs}"
        assert "firing(s) missed while spoold was down" in notes and "skipped" in notes
    assert any(s > down for s in seconds), "the restart fired again"


def test_a_schedule_that_never_fires_is_rejected_and_one_dropped_again_is_replaced(
    bench: Bench,
) -> None:
    ticked = bench.start()
    spool = bench.spool
    refused = ticked.drop("feb.yaml", local_job("feb", "true", schedule="0 0 31 2 *"))
    assert isinstance(refused, Rejected)
    reason = json.loads((spool / "rejected" / "feb.yaml" / "reason.json").read_text())
    assert "never fires" in reason["reason"]
    ticked.drop("twice.yaml", local_job("twice", "true", schedule={"every": "1h"}))
    assert (spool / "scheduled" / "twice").is_dir()
    ticked.drop("twice2.yaml", local_job("twice", "true", schedule={"every": "1s"}))
    assert ticked.fire("twice") == T + timedelta(seconds=1), "woken by the new definition"
    ticked.tick()
    ticked.work()
    assert schedule_runs(spool, "twice"), "a run of the new definition"
    schedule = schedule_status(spool, "twice")
    assert schedule["schedule"] == {"every": "1s"}
    assert any(note["what"] == "definition replaced" for note in schedule["notes"])
    duplicate = ticked.drop("plain.yaml", local_job("twice", "true"))
    assert isinstance(duplicate, Rejected)
    reason = json.loads((spool / "rejected" / "plain.yaml" / "reason.json").read_text())
    assert "already exists in scheduled/" in reason["reason"]
    for verb in ("cancel", "retry"):
        refused_cli = run_cli(spool, verb, "twice")
        assert refused_cli.returncode == 1 and "twice is a schedule" in refused_cli.stderr, (
            refused_cli.stderr
        )
    run_cli(spool, "unschedule", "twice")
