"""Intake's own decisions, with a clock the test moves: when a file counts as complete."""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from pathlib import Path

import pytest

from spoold.core.clock import SystemClock
from spoold.core.secrets import SecretStore
from spoold.core.spool import Prepared, Spool
from spoold.core.spool import fs as fs_module
from spoold.intake.incoming import Accepted, Intake, IntakeThread, Rejected
from spoold.out.outbox import Callbacks
from tests.fakes import FakeClock
from tests.harness import intake_for, wait_for

SETTLE = 2.0
JOB = "job_id: a\nexecutor: local\nproduct: {commands: 'true'}\n"


def _intake(tmp_path: Path, host: str = "") -> tuple[Spool, Intake, FakeClock]:
    """``host``: the intake of that host, on a spool hosts share."""
    spool = Spool(tmp_path / "spool", host=host)
    spool.init()
    clock = FakeClock()
    return spool, intake_for(spool, clock, settle_time=SETTLE), clock


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


@pytest.mark.parametrize("taken_over", [0, 2], ids=["the-first", "one-in-the-middle"])
def test_a_stage_another_host_took_over_costs_the_group_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, taken_over: int
) -> None:
    """Seen with three hosts on sshfs: h2 was frozen mid-intake past its lease; another host
    recovered h2's stages (their files back to incoming/, run there); h2 thawed with a group
    of files taken, found one stage gone, and the release of that stage raised too (it was
    gone): the group's other files stayed in h2's stages, which no host recovers while h2 is
    alive: 14 jobs never ran. The stage another host took is that host's to finish; the
    others of the group are placed, and nothing stays in tmp/."""
    spool, intake, _ = _intake(tmp_path, host="h2")
    other = Spool(spool.root, host="h1")
    names = [f"j{n}.yaml" for n in range(5)]
    for n, name in enumerate(names):
        (spool.dir("incoming") / name).write_text(JOB.replace("job_id: a", f"job_id: j{n}"))
    settle = spool.stages.settle

    def then_taken_over(prepared: list[Prepared]) -> None:
        settle(prepared)
        # What h1's recovery of a stale host's stages does: the stage renamed to one of its
        # own (so that its maker, should it wake, finds it gone), then recovered.
        stage = prepared[taken_over].stage
        os.rename(stage, spool.dir("tmp") / f"in-h1@{os.urandom(8).hex()}")
        other.stages.recover()

    monkeypatch.setattr(spool.stages, "settle", then_taken_over)
    outcomes = intake.offer_all(names, complete=True)
    placed = [n for n, outcome in enumerate(outcomes) if isinstance(outcome, Accepted)]
    assert placed == [n for n in range(5) if n != taken_over]
    assert outcomes[taken_over] is None
    # h1 gave that file back to incoming/: whoever takes it next runs it, once.
    assert [p.name for p in spool.dir("incoming").iterdir()] == [names[taken_over]]
    assert list(spool.dir("tmp").iterdir()) == []


def test_a_stage_left_by_a_failure_is_recovered_while_the_host_lives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever failure leaves a stage of this host behind (a release that failed itself: an
    I/O error on a cut-off mount), the host finds it on its next sweep and finishes it, as
    it would at its next start and as other hosts would if it died: no file waits for a
    restart."""
    spool, intake, clock = _intake(tmp_path, host="h2")
    names = [f"j{n}.yaml" for n in range(3)]
    for n, name in enumerate(names):
        (spool.dir("incoming") / name).write_text(JOB.replace("job_id: a", f"job_id: j{n}"))

    def broken(prepared: object) -> None:
        raise OSError(5, "Input/output error")

    def release_broken(taken: object) -> str:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(spool.stages, "settle", broken)
    monkeypatch.setattr(spool.stages, "release", release_broken)
    assert intake.offer_all(names, complete=True) == [None] * 3
    assert len(list(spool.dir("tmp").iterdir())) == 3  # the mount is back; the stages stay
    monkeypatch.undo()
    clock.advance(60.0)  # past every backoff
    intake.sweep(remote_writers=True)  # finds them, gives them back to incoming/
    clock.advance(60.0)
    intake.sweep(remote_writers=True)
    clock.advance(60.0)
    intake.sweep(remote_writers=True)
    assert sorted(job.job_id for job in spool.jobs.list_jobs("pending")) == ["j0", "j1", "j2"]
    assert list(spool.dir("tmp").iterdir()) == [] and list(spool.dir("incoming").iterdir()) == []


def test_a_take_whose_answer_was_lost_leaves_no_file_staged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a network mount a rename can happen on the server while its answer is lost (EIO):
    the file is in the stage though the take failed. It goes back to incoming/ at once, and
    is taken next time."""
    spool, intake, clock = _intake(tmp_path, host="h2")
    (spool.dir("incoming") / "j.yaml").write_text(JOB)
    rename = os.rename
    lost: list[str] = []

    def answer_lost(source: str, target: str) -> None:
        rename(source, target)
        if "/incoming/" in str(source) and not lost:
            lost.append(str(target))
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "rename", answer_lost)
    assert intake.offer("j.yaml", complete=True) is None
    assert lost and [p.name for p in spool.dir("incoming").iterdir()] == ["j.yaml"]
    assert list(spool.dir("tmp").iterdir()) == []
    clock.advance(1.0)  # the first backoff
    assert isinstance(intake.offer("j.yaml", complete=True), Accepted)


@pytest.mark.parametrize("remote_writers", [False, True], ids=["local", "shared"])
def test_intake_threads_stopped_before_they_started_stop_quietly(
    tmp_path: Path, remote_writers: bool
) -> None:
    """A daemon whose start failed (a worker process that could not start) stops what it
    built: its intake threads had not started, and stopping them must not raise over the
    reason it failed (RuntimeError: cannot join thread before it is started, seen)."""
    _, intake, _ = _intake(tmp_path)
    IntakeThread(intake, logging.getLogger("spoold.test"), clock=SystemClock(),
                 remote_writers=remote_writers).stop()  # fmt: skip


def test_the_user_database_is_asked_once_per_owner_and_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """glibc reads /etc/passwd at every lookup: a group of files taken together asks once
    per owner; the next group asks again, and sees a user renamed since."""
    import pwd  # noqa: PLC0415

    asked: list[int] = []
    names = iter(["alice", "bob"])

    def getpwuid(uid: int) -> pwd.struct_passwd:
        asked.append(uid)
        return pwd.struct_passwd((next(names), "x", uid, uid, "", "/", "/bin/sh"))

    monkeypatch.setattr(pwd, "getpwuid", getpwuid)
    spool, intake, _ = _intake(tmp_path)
    first = [f"a{n}.yaml" for n in range(3)]
    for name in [*first, "b.yaml"]:
        job_id = name.removesuffix(".yaml")
        (spool.dir("incoming") / name).write_text(JOB.replace("job_id: a", f"job_id: {job_id}"))
    outcomes = intake.offer_all(first, complete=True)
    assert all(isinstance(outcome, Accepted) for outcome in outcomes)
    assert asked == [os.geteuid()], "one lookup for the three files of one owner"
    assert isinstance(intake.offer("b.yaml", complete=True), Accepted)
    assert len(asked) == 2, "the next group asks again"
    submitters = [
        json.loads((spool.dir("pending") / job_id / "status.json").read_text())["submitter"]
        for job_id in ("a0", "a1", "a2", "b")
    ]
    assert submitters == ["alice", "alice", "alice", "bob"]


# -- pending/'s fsync and the hand-on -------------------------------------------------------------


def _order_of_hand_on_and_sync(
    spool: Spool, intake: Intake, monkeypatch: pytest.MonkeyPatch, names: list[str]
) -> list[str]:
    """Offer ``names`` together; what happened in order: each job handed on, each fsync of
    pending/ (done for real)."""
    events: list[str] = []
    real_fsync = fs_module.fsync_path
    pending = str(spool.dir("pending"))

    def fsync(path: str | Path) -> None:
        real_fsync(path)
        if str(path) == pending:
            events.append("sync pending/")

    monkeypatch.setattr(fs_module, "fsync_path", fsync)
    intake._on_accepted = lambda job, document: events.append(f"hand on {job.job_id}")
    for name in names:
        job_id = name.removesuffix(".yaml")
        (spool.dir("incoming") / name).write_text(JOB.replace("job_id: a", f"job_id: {job_id}"))
    assert all(isinstance(o, Accepted) for o in intake.offer_all(names, complete=True))
    return events


@pytest.mark.parametrize("count", [1, 3], ids=["alone", "together"])
def test_a_job_is_handed_on_before_pending_is_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, count: int
) -> None:
    """The worker's wake-up meets the fsync of pending/ instead of following it: its claim
    fsyncs running/ before the job starts, so nothing runs that a power loss could undo."""
    spool, intake, _ = _intake(tmp_path)
    names = [f"j{n}.yaml" for n in range(count)]
    events = _order_of_hand_on_and_sync(spool, intake, monkeypatch, names)
    assert events == [*(f"hand on j{n}" for n in range(count)), "sync pending/"]


@pytest.mark.parametrize("count", [1, 3], ids=["alone", "together"])
def test_a_job_with_an_accepted_delivery_is_fsynced_into_pending_before_it_is_handed_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, count: int
) -> None:
    """Its ``accepted`` delivery is committed as it is placed (spoold.run.ledger): pending/
    is synced first, as before."""
    spool = Spool(tmp_path / "spool")
    spool.init()
    clock = FakeClock()
    callbacks = Callbacks(spool, clock, SecretStore(None), logger=logging.getLogger("spoold.test"),
                          default_url="http://127.0.0.1:9/d", default_secret="d")  # fmt: skip
    intake = intake_for(spool, clock, callbacks=callbacks)
    names = [f"j{n}.yaml" for n in range(count)]
    events = _order_of_hand_on_and_sync(spool, intake, monkeypatch, names)
    assert events == [*(["sync pending/"] * count), *(f"hand on j{n}" for n in range(count))]


def test_a_failed_fsync_of_pending_after_the_hand_on_is_said_and_the_job_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The job is placed and handed on already: it runs, and the error is logged."""
    spool, intake, _ = _intake(tmp_path)
    pending = str(spool.dir("pending"))
    real_fsync = fs_module.fsync_path

    def fsync(path: str | Path) -> None:
        if str(path) == pending:
            raise OSError(errno.EIO, "Input/output error", pending)
        real_fsync(path)

    monkeypatch.setattr(fs_module, "fsync_path", fsync)
    handed: list[str] = []
    intake._on_accepted = lambda job, document: handed.append(job.job_id)
    (spool.dir("incoming") / "a.yaml").write_text(JOB)
    with caplog.at_level(logging.ERROR, logger="spoold.test"):
        assert isinstance(intake.offer("a.yaml", complete=True), Accepted)
    assert handed == ["a"] and [j.job_id for j in spool.jobs.list_jobs("pending")] == ["a"]
    assert "fsync after accepting 1 job(s) failed" in caplog.text


# -- the submitted file its private copy replaces -------------------------------------------------

NAMED = "job_id: {id}\nexecutor: local\nproduct: {{commands: 'true'}}\n"


def test_the_submitted_file_is_set_aside_for_later_where_names_can_be_swapped(
    tmp_path: Path,
) -> None:
    """Removing a file can wait on the disk (``discard``): the take swaps spoold's copy in and
    moves the submitter's file aside, whole, to be removed off intake's path; a crash before
    that leaves it to the next start's recovery."""
    spool, _, _ = _intake(tmp_path)
    path = spool.dir("incoming") / "a.yaml"
    path.write_text(NAMED.format(id="a"))
    submitted = path.stat().st_ino
    taken = spool.stages.take_incoming("a.yaml", now=0.0, max_size=1 << 20)
    assert taken is not None and taken.spent is not None
    spent = Path(taken.spent)
    assert spent.parent == spool.dir("tmp")
    assert spent.stat().st_ino == submitted and spent.read_text() == NAMED.format(id="a")
    assert taken.original.stat().st_ino != submitted, "the stage holds spoold's copy"
    assert taken.original.read_text() == NAMED.format(id="a")
    assert [e.name for e in os.scandir(taken.stage)] == ["a.yaml"]
    spool.stages.remove_spent(taken.spent)
    assert not spent.exists()
    spool.stages.remove_spent(taken.spent)  # gone already: nothing to do

    (spool.dir("incoming") / "b.yaml").write_text(NAMED.format(id="b"))
    left = spool.stages.take_incoming("b.yaml", now=0.0, max_size=1 << 20)
    assert left is not None and left.spent is not None  # then the daemon was killed
    restarted = Spool(spool.root)
    assert "removed 1 submitted file(s) left after their copy" in restarted.stages.recover()
    assert not Path(left.spent).exists()


def test_where_names_cannot_be_swapped_the_copy_replaces_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FUSE (sshfs) has no RENAME_EXCHANGE: the copy replaces the file there, and the take
    stops asking after the first refusal."""
    asked: list[str] = []

    def refuse(source: str, target: str) -> None:
        asked.append(target)
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr("spoold.core.spool.stages.rename_exchange", refuse)
    spool, _, _ = _intake(tmp_path)
    for name in ("a", "b"):
        (spool.dir("incoming") / f"{name}.yaml").write_text(NAMED.format(id=name))
        taken = spool.stages.take_incoming(f"{name}.yaml", now=0.0, max_size=1 << 20)
        assert taken is not None and taken.spent is None
        assert taken.original.read_text() == NAMED.format(id=name)
        assert not [n for n in os.listdir(spool.dir("tmp")) if n.startswith("spent-")]
    assert len(asked) == 1


def test_intake_threads_leave_removing_the_submitted_files_to_a_thread_of_their_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool, intake, _ = _intake(tmp_path)
    removed: dict[str, str] = {}
    remove = spool.stages.remove_spent

    def record(path: str) -> None:
        removed[path] = threading.current_thread().name
        remove(path)

    monkeypatch.setattr(spool.stages, "remove_spent", record)
    threads = IntakeThread(intake, logging.getLogger("spoold.test"), clock=SystemClock(),
                           remote_writers=False)  # fmt: skip
    threads.start()
    try:
        for n in range(5):
            (spool.dir("incoming") / f"j{n}.yaml").write_text(NAMED.format(id=f"j{n}"))
            threads.arrived(f"j{n}.yaml")
        wait_for(lambda: len(os.listdir(spool.dir("pending"))) == 5, what="the five accepted")
    finally:
        threads.stop()
    assert len(removed) == 5
    assert set(removed.values()) == {"spoold-intake-spent"}
    assert not [n for n in os.listdir(spool.dir("tmp")) if n.startswith("spent-")]


@pytest.mark.parametrize("remote_writers", [False, True])
def test_a_missing_incoming_is_said_once_not_with_a_traceback_at_each_scan(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, remote_writers: bool
) -> None:
    """incoming/ moved away or removed: each scan (every ``poll_interval`` while its watch is
    lost, or on a polled spool) failed with FileNotFoundError, which the intake thread logged
    with its traceback, "intake failed", each second until it was back."""
    spool, intake, _ = _intake(tmp_path)
    (spool.root / "incoming").rename(tmp_path / "incoming.old")
    with caplog.at_level(logging.WARNING, logger="spoold.test"):
        for _ in range(3):
            assert intake.sweep(remote_writers=remote_writers) == 0
        said = [record.getMessage() for record in caplog.records]
        assert said == [f"{spool.root / 'incoming'} is missing: files are taken again once it "
                        "is there"]  # fmt: skip
        (tmp_path / "incoming.old").rename(spool.root / "incoming")
        for _ in range(2):
            assert intake.sweep(remote_writers=remote_writers) == 0
    said = [record.getMessage() for record in caplog.records]
    assert said[1:] == ["incoming/ is there again: its files are taken"]
