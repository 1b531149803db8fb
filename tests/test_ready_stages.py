"""Stages made ahead (spoold.core.spool.stages, ``make_ready``): a file taken into one costs
renames, not new inodes, and leaves no trace of having been made ahead; every other way out of
a ready stage (a rejection, a file gone, a full disk, a crash, another host) leaves what the
same way out of a new stage leaves."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from spoold.core.clock import SystemClock
from spoold.core.spool import Spool
from spoold.core.spool.stages import SPENT_PREFIX, StageLeft
from spoold.intake.incoming import READY_STAGES, Accepted, Intake, IntakeThread, Rejected
from tests.fakes import FakeClock
from tests.harness import intake_for, tmp_leftovers, wait_for

JOB = "job_id: {id}\nexecutor: local\nproduct: {{commands: 'true'}}\n"
SCHEDULE = JOB + "schedule: {{every: 60s}}\n"
MADE_AHEAD = ".spoold-ready-"
LOG = logging.getLogger("spoold.test")


def _intake(tmp_path: Path, host: str = "", root: Path | None = None) -> tuple[Spool, Intake]:
    spool = Spool(root or tmp_path / "spool", host=host)
    spool.init()
    return spool, intake_for(spool, FakeClock())


def _stages(spool: Spool) -> list[Path]:
    return sorted(p for p in spool.dir("tmp").iterdir() if p.name.startswith("in-"))


def _inodes(root: Path) -> set[int]:
    """The inode of ``root`` and of everything under it."""
    found = {root.lstat().st_ino}
    for parent, dirs, files in os.walk(root):
        found |= {os.lstat(os.path.join(parent, name)).st_ino for name in dirs + files}
    return found


def _shape(job: Path) -> dict[str, tuple[str, int]]:
    """Each entry of a job's directory: its kind and permission bits."""
    shape = {}
    for entry in os.scandir(job):
        info = entry.stat(follow_symlinks=False)
        kind = "dir" if stat.S_ISDIR(info.st_mode) else "file"
        shape[entry.name] = (kind, stat.S_IMODE(info.st_mode))
    return shape


def _drop(spool: Spool, name: str, text: str) -> str:
    (spool.dir("incoming") / name).write_text(text)
    return name


def test_a_file_taken_into_a_ready_stage_becomes_a_job_without_a_new_inode(
    tmp_path: Path,
) -> None:
    spool, intake = _intake(tmp_path)
    assert spool.stages.make_ready(1, enough=lambda: False) == 1
    (ready,) = _stages(spool)
    made = _inodes(ready)
    (result,) = intake.offer_all([_drop(spool, "a.yaml", JOB.format(id="a"))], complete=True)
    assert isinstance(result, Accepted)
    job = result.job.path
    reservation = spool.dir("ids") / "a"
    assert _inodes(job) | {reservation.lstat().st_ino} == made, "only what was made ahead"
    assert os.readlink(reservation) == ready.name, "reserved by the stage, as any"
    assert not [n for n in os.listdir(job) if n.startswith(MADE_AHEAD)]
    assert (job / "job.yaml").read_text() == JOB.format(id="a")
    assert b"accepted" in (job / "log").read_bytes()
    assert spool.jobs.read_status(result.job)["job_id"] == "a"

    # The same job through a stage made then: the same entries, with the same modes; units/
    # is there from the start (its supervisor would make it on the way to the job's start).
    (other,) = intake.offer_all([_drop(spool, "b.yaml", JOB.format(id="b"))], complete=True)
    assert isinstance(other, Accepted)
    expected = _shape(other.job.path)
    expected["units"] = ("dir", 0o750)
    assert _shape(job) == expected
    assert _stages(spool) == []


def test_a_schedule_from_a_ready_stage_gets_no_artifacts_or_units(tmp_path: Path) -> None:
    spool, intake = _intake(tmp_path)
    spool.stages.make_ready(1, enough=lambda: False)
    (result,) = intake.offer_all([_drop(spool, "s.yaml", SCHEDULE.format(id="s"))], complete=True)
    assert isinstance(result, Accepted) and result.job.directory == "scheduled"
    assert sorted(os.listdir(result.job.path)) == ["job.yaml", "log", "status.json"]


@pytest.mark.parametrize("case", ["invalid", "duplicate", "symlink", "too-large"])
def test_a_file_rejected_from_a_ready_stage_is_kept_with_its_reason_alone(
    tmp_path: Path, case: str
) -> None:
    spool, intake = _intake(tmp_path)
    holder = None
    if case == "duplicate":  # its id taken by a job accepted before, through a new stage
        (first,) = intake.offer_all([_drop(spool, "a.yaml", JOB.format(id="a"))], complete=True)
        assert isinstance(first, Accepted)
        holder = os.readlink(spool.dir("ids") / "a")
    spool.stages.make_ready(1, enough=lambda: False)
    name = "x.yaml"
    if case == "symlink":
        os.symlink("/etc/passwd", spool.dir("incoming") / name)
    elif case == "too-large":
        _drop(spool, name, JOB.format(id="big") + "#" * (1 << 20))
    else:
        _drop(spool, name, "job_id: [" if case == "invalid" else JOB.format(id="a"))
    (result,) = intake.offer_all([name], complete=True)
    assert isinstance(result, Rejected)
    assert sorted(os.listdir(result.path)) == sorted([name, "reason.json"])
    assert _stages(spool) == []
    if case == "duplicate":  # the first job's reservation stands
        assert result.reason["code"] == "duplicate"
        assert os.readlink(spool.dir("ids") / "a") == holder


def test_a_file_gone_before_its_take_leaves_the_stage_ready(tmp_path: Path) -> None:
    spool, _ = _intake(tmp_path)
    spool.stages.make_ready(1, enough=lambda: False)
    (ready,) = _stages(spool)
    assert spool.stages.take_incoming("gone.yaml", now=0.0, max_size=1 << 20) is None
    assert _stages(spool) == [ready]
    assert spool.stages.make_ready(1, enough=lambda: False) == 1, "still the one ready"


def test_recovery_removes_ready_stages_without_a_word(tmp_path: Path) -> None:
    spool, _ = _intake(tmp_path)
    spool.stages.make_ready(3, enough=lambda: False)
    (spool.dir("tmp") / "in-old").mkdir()  # an empty stage, made then: a crash's, to compare
    assert Spool(spool.root).stages.recover() == ["removed empty stage in-old"]
    assert os.listdir(spool.dir("tmp")) == []


@pytest.mark.parametrize("ahead", [True, False], ids=["ready", "made-then"])
@pytest.mark.parametrize("name", ["a.yaml", "log", "units", "reason.json"])
@pytest.mark.parametrize("moment", ["prepared", "before-its-file-was-renamed", "taken"])
def test_a_crash_in_a_stage_gives_the_file_back_whole(
    tmp_path: Path, name: str, moment: str, ahead: bool
) -> None:
    """Whatever the moment, the next start puts the submitter's bytes back into incoming/
    under their name (seen: units/, made ahead, given back in place of the job file; a file
    named like one of spoold's, alone in its stage, removed as if the stage were empty)."""
    spool, _ = _intake(tmp_path)
    if ahead:
        spool.stages.make_ready(1, enough=lambda: False)
    text = JOB.format(id="a")
    _drop(spool, name, text)
    taken = spool.stages.take_incoming(name, now=0.0, max_size=1 << 20)
    assert taken is not None and taken.ready is ahead
    if moment != "taken":
        prepared = spool.stages.prepare(taken, "a", {"job_id": "a", "source": name}, "accepted\n")
        if moment == "before-its-file-was-renamed" and name == "a.yaml":
            os.rename(prepared.job_file, prepared.original)  # its last step not taken yet
    # The daemon is killed here; the next start recovers.
    said = Spool(spool.root).stages.recover()
    assert f"returned {name} to incoming/ as {name} (intake was interrupted)" in said
    assert os.listdir(spool.dir("incoming")) == [name]
    assert (spool.dir("incoming") / name).read_text() == text
    assert os.listdir(spool.dir("ids")) == [], "its reservation given up"
    assert tmp_leftovers(spool.root) == []


def test_a_ready_stage_another_host_recovered_is_not_used(tmp_path: Path) -> None:
    a, a_intake = _intake(tmp_path, host="a")
    b, _ = _intake(tmp_path, host="b", root=a.root)
    a.stages.make_ready(1, enough=lambda: False)
    assert b.stages.recover(frozenset({"a"})) == [], "made ahead: nothing to say"
    assert _stages(a) == []
    (result,) = a_intake.offer_all([_drop(a, "j.yaml", JOB.format(id="j"))], complete=True)
    assert isinstance(result, Accepted), "taken into a stage made then"
    assert os.listdir(a.dir("incoming")) == []


def test_a_failed_take_into_a_stage_made_instead_of_a_gone_ready_one_leaves_it_to_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a shared mount a rename that failed may have happened all the same: the stage made
    in place of a ready one gone is named for intake to release, as any stage is."""
    spool, _ = _intake(tmp_path)
    spool.stages.make_ready(1, enough=lambda: False)
    (ready,) = _stages(spool)
    shutil.rmtree(ready)  # another host recovered it
    _drop(spool, "a.yaml", JOB.format(id="a"))
    real, calls = os.rename, []

    def rename(source: str, target: str) -> None:
        calls.append(target)
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error")
        real(source, target)

    monkeypatch.setattr("spoold.core.spool.stages.os.rename", rename)
    with pytest.raises(StageLeft) as left:
        spool.stages.take_incoming("a.yaml", now=0.0, max_size=1 << 20)
    assert not left.value.taken.ready
    assert left.value.taken.stage != ready and left.value.taken.stage.is_dir()


def test_making_stages_ahead_stops_when_intake_has_work(tmp_path: Path) -> None:
    spool, _ = _intake(tmp_path)
    asked = iter([False, True])
    assert spool.stages.make_ready(4, enough=lambda: next(asked)) == 1
    assert spool.stages.make_ready(1, enough=lambda: False) == 1, "enough made: none made"
    assert len(_stages(spool)) == 1


def test_a_full_disk_leaves_no_stage_half_made_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool, intake = _intake(tmp_path)
    real = os.symlink

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("spoold.core.spool.stages.os.symlink", full)
    with pytest.raises(OSError, match="No space"):
        spool.stages.make_ready(1, enough=lambda: False)
    assert os.listdir(spool.dir("tmp")) == []
    intake.make_ready(enough=lambda: False)  # intake's way: said, and files go on as before
    monkeypatch.setattr("spoold.core.spool.stages.os.symlink", real)
    (result,) = intake.offer_all([_drop(spool, "a.yaml", JOB.format(id="a"))], complete=True)
    assert isinstance(result, Accepted)


def test_a_reservation_made_ahead_is_moved_into_place_where_renameat2_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FUSE (sshfs) refuses RENAME_NOREPLACE: the symlink is linked into ids/ and unlinked,
    and a reservation held stays held."""
    from spoold.core.spool import fs  # noqa: PLC0415

    monkeypatch.setattr(fs, "_renameat2_errno", lambda *args: errno.EINVAL)
    spool, intake = _intake(tmp_path)
    spool.stages.make_ready(2, enough=lambda: False)
    (result,) = intake.offer_all([_drop(spool, "a.yaml", JOB.format(id="a"))], complete=True)
    assert isinstance(result, Accepted)
    holder = os.readlink(spool.dir("ids") / "a")
    (again,) = intake.offer_all([_drop(spool, "b.yaml", JOB.format(id="a"))], complete=True)
    assert isinstance(again, Rejected) and again.reason["code"] == "duplicate"
    assert os.readlink(spool.dir("ids") / "a") == holder
    assert sorted(os.listdir(again.path)) == ["b.yaml", "reason.json"]


def test_intake_keeps_stages_ready_off_its_path_and_a_stop_removes_them(tmp_path: Path) -> None:
    spool, intake = _intake(tmp_path)
    threads = IntakeThread(intake, LOG, clock=SystemClock(), remote_writers=False)
    threads.start()
    try:
        wait_for(lambda: len(_stages(spool)) == READY_STAGES, what="stages made ahead at start")
        for n in range(READY_STAGES + 2):
            threads.arrived(_drop(spool, f"j{n}.yaml", JOB.format(id=f"j{n}")))
        wait_for(lambda: len(os.listdir(spool.dir("pending"))) == READY_STAGES + 2,
                 what="every file accepted")  # fmt: skip
        wait_for(lambda: len(_stages(spool)) == READY_STAGES, what="stages made ahead again")
        assert tmp_leftovers(spool.root) == [], "made ahead, not left over"
    finally:
        threads.stop()
    assert os.listdir(spool.dir("tmp")) == [], "a stop removes what it made ahead"


def test_after_a_file_that_came_alone_stages_are_made_only_a_while_later(
    tmp_path: Path,
) -> None:
    """Made at once, a stage's creates took a core from the start of the job just handed on
    (two cores: the worker's claim and its supervisor's start beside them). The wait counts
    from the first file; the submitted files are removed as they come all the same."""
    spool, intake = _intake(tmp_path)
    with _two_files_taken(spool, intake, alone_after=0.0):
        # The second file's submitted copy is removed after intake said it took the first:
        # that has been heard, and no stage was made.
        wait_for(lambda: not _spent(spool), what="the submitted files removed")
        assert len(_stages(spool)) == READY_STAGES - 2
    assert os.listdir(spool.dir("tmp")) == [], "a stop removes what it made ahead"


def test_in_a_stream_of_files_stages_are_made_at_once(tmp_path: Path) -> None:
    """A file soon after the one before (``alone_after``): stages made later would meet the
    next files' starts instead, or not be made before the stream ends."""
    spool, intake = _intake(tmp_path)
    with _two_files_taken(spool, intake, alone_after=3600.0):
        wait_for(lambda: len(_stages(spool)) == READY_STAGES, what="stages made again at once")


@contextlib.contextmanager
def _two_files_taken(spool: Spool, intake: Intake, *, alone_after: float) -> Iterator[None]:
    """Intake's threads, their stages made at start, and two files accepted one after the
    other; stages made after a file alone an hour later, so never within the test."""
    threads = IntakeThread(intake, LOG, clock=SystemClock(), remote_writers=False,
                           ready_after=3600.0, alone_after=alone_after)  # fmt: skip
    threads.start()
    try:
        wait_for(lambda: len(_stages(spool)) == READY_STAGES, what="stages made ahead at start")
        for n in (1, 2):
            threads.arrived(_drop(spool, f"j{n}.yaml", JOB.format(id=f"j{n}")))
            wait_for(functools.partial(_accepted, spool, n), what=f"j{n} accepted")
        yield
    finally:
        threads.stop()


def _accepted(spool: Spool, count: int) -> bool:
    return len(os.listdir(spool.dir("pending"))) == count


def _spent(spool: Spool) -> list[str]:
    return [name for name in os.listdir(spool.dir("tmp")) if name.startswith(SPENT_PREFIX)]
