"""Intake's own decisions, with a clock the test moves: when a file counts as complete."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from spoold.core.spool import Spool
from spoold.intake.incoming import Accepted, Intake, IntakeThread, Rejected
from spoold.intake.validation import job_validator
from spoold.run.registry import ExecutorRegistry
from tests.fakes import FakeClock

SETTLE = 2.0
JOB = "job_id: a\nexecutor: local\nproduct: {commands: 'true'}\n"


def _intake(tmp_path: Path) -> tuple[Spool, Intake, FakeClock]:
    spool = Spool(tmp_path / "spool")
    spool.init()
    clock = FakeClock()
    intake = Intake(spool, job_validator(ExecutorRegistry.from_entry_points()), clock,
                    max_file_size=1 << 20, settle_time=SETTLE,
                    on_accepted=lambda job, document: None,
                    logger=logging.getLogger("spoold.test"))  # fmt: skip
    return spool, intake, clock


@pytest.mark.parametrize(
    "skew", [-3600.0, 3600.0], ids=["writer-clock-behind", "writer-clock-ahead"]
)
def test_poll_mode_takes_a_file_once_unchanged_for_the_settle_time_by_our_clock(
    tmp_path: Path, skew: float
) -> None:
    """A shared filesystem's mtimes come from another host: an hour of skew changes nothing."""
    spool, intake, clock = _intake(tmp_path)
    path = spool.dir("incoming") / "upload.yaml"
    path.write_text(JOB[:20])  # an upload under way, its mtime by the writer's clock
    os.utime(path, (path.stat().st_atime + skew, path.stat().st_mtime + skew))
    assert intake.sweep(remote_writers=True) == 0
    clock.advance(SETTLE - 0.5)
    with open(path, "a") as writer:  # the upload goes on: the wait starts again
        writer.write(JOB[20:])
    os.utime(path, (path.stat().st_atime + skew, path.stat().st_mtime + skew))
    assert intake.sweep(remote_writers=True) == 0
    clock.advance(SETTLE - 0.5)
    assert intake.sweep(remote_writers=True) == 0, "quiet for less than the settle time"
    clock.advance(0.5)
    assert intake.sweep(remote_writers=True) == 1
    assert [job.job_id for job in spool.jobs.list_jobs("pending")] == ["a"]


def test_a_file_seen_closed_or_renamed_in_is_taken_at_once_in_poll_mode_too(
    tmp_path: Path,
) -> None:
    spool, intake, _ = _intake(tmp_path)
    (spool.dir("incoming") / "a.yaml").write_text(JOB)
    assert isinstance(intake.offer("a.yaml", complete=True, remote_writers=True), Accepted)


def test_a_file_gone_and_back_under_the_same_name_waits_again(tmp_path: Path) -> None:
    spool, intake, clock = _intake(tmp_path)
    path = spool.dir("incoming") / "a.yaml"
    path.write_text(JOB)
    assert intake.sweep(remote_writers=True) == 0
    path.unlink()
    assert intake.sweep(remote_writers=True) == 0  # forgets it
    clock.advance(SETTLE)
    path.write_text(JOB)
    assert intake.sweep(remote_writers=True) == 0, "a new file, seen for the first time"
    clock.advance(SETTLE)
    assert intake.sweep(remote_writers=True) == 1


def test_a_schedule_window_is_judged_by_intakes_clock(tmp_path: Path) -> None:
    """Whether a schedule can still fire is asked of the clock intake is given, not the host's."""
    spool, intake, clock = _intake(tmp_path)  # the fake clock starts on 2026-11-22
    window = "{start: '2026-11-01T00:00:00Z', end: '2026-12-01T00:00:00Z'}"
    for job_id in ("in", "late"):
        text = JOB.replace("job_id: a", f"job_id: {job_id}")
        (spool.dir("incoming") / f"{job_id}.yaml").write_text(
            f"{text}schedule: {{every: 1h, window: {window}}}\n"
        )
    assert isinstance(intake.offer("in.yaml", complete=True), Accepted)
    clock.advance(30 * 86400)  # past the window's end
    refused = intake.offer("late.yaml", complete=True)
    assert isinstance(refused, Rejected), refused
    assert "never fires" in json.dumps(refused.reason), refused.reason


def test_files_offered_together_are_each_decided_as_alone_and_in_order(tmp_path: Path) -> None:
    """A group commit changes no decision: a bad file and a duplicate id among good ones are
    rejected with their reasons, the others accepted, a schedule placed, in the given order."""
    spool, intake, _ = _intake(tmp_path)
    incoming = spool.dir("incoming")
    files = {
        "a.yaml": JOB,
        "bad.yaml": "job_id: [\n",
        "b.yaml": JOB.replace("job_id: a", "job_id: b"),
        "again.yaml": JOB,  # a's id, a second time in the same group
        "s.yaml": JOB.replace("job_id: a", "job_id: s") + "schedule: {every: 1h}\n",
    }
    for name, text in files.items():
        (incoming / name).write_text(text)
    accepted: list[str] = []
    intake._on_accepted = lambda job, document: accepted.append(job.job_id)
    outcomes = intake.offer_all(list(files), complete=True)
    kinds = [type(outcome).__name__ for outcome in outcomes]
    assert kinds == ["Accepted", "Rejected", "Accepted", "Rejected", "Accepted"]
    duplicate = outcomes[3]
    assert isinstance(duplicate, Rejected) and "already exists" in json.dumps(duplicate.reason)
    assert accepted == ["a", "b"]  # handed on in order, once all were placed
    assert [job.job_id for job in spool.jobs.list_jobs("pending")] == ["a", "b"]
    assert [job.job_id for job in spool.jobs.list_jobs("scheduled")] == ["s"]
    assert sorted(p.name for p in spool.dir("rejected").iterdir()) == ["again.yaml", "bad.yaml"]
    assert list(incoming.iterdir()) == [] and list(spool.dir("tmp").iterdir()) == []


def test_a_group_whose_commit_fails_goes_back_to_incoming_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shared sync failing (a disk error) loses nothing: every file of the group is back
    in incoming/ under its name, no id stays reserved, and the next try takes them all."""
    spool, intake, clock = _intake(tmp_path)
    names = [f"j{n}.yaml" for n in range(5)]
    for n, name in enumerate(names):
        (spool.dir("incoming") / name).write_text(JOB.replace("job_id: a", f"job_id: j{n}"))

    def broken(prepared: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(spool.stages, "settle", broken)
    assert intake.offer_all(names, complete=True) == [None] * 5
    assert sorted(p.name for p in spool.dir("incoming").iterdir()) == names
    assert list(spool.dir("tmp").iterdir()) == [] and spool.jobs.list_jobs("pending") == []
    monkeypatch.undo()
    clock.advance(1.0)  # the first backoff
    assert all(isinstance(o, Accepted) for o in intake.offer_all(names, complete=True))
    assert len(spool.jobs.list_jobs("pending")) == 5


def test_a_failure_of_spoold_itself_mid_group_puts_the_unplaced_files_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the group's own code (here: asking whether a delivery waits raises) must not
    strand staged files in tmp/ until the next start: they go back to incoming/ at once."""
    spool, intake, _ = _intake(tmp_path)
    names = [f"j{n}.yaml" for n in range(3)]
    for n, name in enumerate(names):
        (spool.dir("incoming") / name).write_text(JOB.replace("job_id: a", f"job_id: j{n}"))

    class Broken:
        def delivers(self, target: object, event: str) -> bool:
            raise TypeError("a bug")

    monkeypatch.setattr(intake, "_callbacks", Broken())
    with pytest.raises(TypeError):
        intake.offer_all(names, complete=True)
    assert sorted(p.name for p in spool.dir("incoming").iterdir()) == names
    assert list(spool.dir("tmp").iterdir()) == [] and spool.jobs.list_jobs("pending") == []


@pytest.mark.parametrize("remote_writers", [False, True], ids=["local", "shared"])
def test_intake_threads_stopped_before_they_started_stop_quietly(
    tmp_path: Path, remote_writers: bool
) -> None:
    """A daemon whose start failed (a worker process that could not start) stops what it
    built: its intake threads had not started, and stopping them must not raise over the
    reason it failed (RuntimeError: cannot join thread before it is started, seen)."""
    _, intake, _ = _intake(tmp_path)
    IntakeThread(intake, logging.getLogger("spoold.test"), remote_writers=remote_writers).stop()
