"""One validated file, one job, ever: what a hostile or careless submitter can do to intake.

Each test reproduces a way in that was found open (issue 15): a hard link, a file renamed over
the one being taken, a job.yaml changed after it was accepted, two files naming one job id
while the first one moves between states, a spool below a directory anyone may write.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from spoold.core.errors import DuplicateJob, JobFileChanged
from spoold.core.job import JobSpec, JobStatus
from spoold.core.spool import Spool
from spoold.core.states import JobState
from spoold.intake.incoming import Accepted, Intake, Rejected
from tests.fakes import FakeClock
from tests.harness import (
    DaemonProcess,
    drop,
    found_in,
    intake_for,
    local_job,
    run_cli,
    tmp_leftovers,
    wait_finished,
    wait_for,
    write_config,
)

JOB = "job_id: {id}\nexecutor: local\nproduct: {{commands: 'true'}}\n"


def _intake(tmp_path: Path) -> tuple[Spool, Intake]:
    spool = Spool(tmp_path / "spool")
    spool.init()
    return spool, intake_for(spool, FakeClock())


def _stored(job_dir: Path) -> tuple[bytes, dict[str, Any]]:
    return (job_dir / "job.yaml").read_bytes(), json.loads((job_dir / "status.json").read_text())


# -- the file spoold keeps is its own copy of what it validated -----------------------------------


def test_a_hard_link_is_rejected_and_its_other_name_changes_nothing(tmp_path: Path) -> None:
    """Seen: a link dropped into incoming/ was accepted, and job.yaml stayed the submitter's
    inode: what ran on a retry was whatever they had written since."""
    spool, intake = _intake(tmp_path)
    mine = tmp_path / "mine.yaml"
    mine.write_text(JOB.format(id="linked"))
    os.link(mine, spool.dir("incoming") / "linked.yaml")
    outcome = intake.offer("linked.yaml", complete=True)
    assert isinstance(outcome, Rejected)
    assert outcome.reason["code"] == "hard_link"
    assert "hard link" in outcome.reason["reason"] and "copy the file" in outcome.reason["reason"]
    kept = outcome.path / "linked.yaml"
    assert kept.stat().st_ino != mine.stat().st_ino, "rejected/ keeps spoold's own copy"
    mine.write_text("executor: local\nproduct: {commands: 'rm -rf /'}\nbogus_field: 1\n")
    assert kept.read_text() == JOB.format(id="linked")
    assert spool.jobs.find("linked") is None


def test_a_writer_spoold_cannot_see_changes_nothing_after_the_take(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a network filesystem no lease shows an open writer: what it writes after the take
    must not reach job.yaml."""
    monkeypatch.setattr("spoold.core.spool.stages._has_local_writer", lambda fd: None)
    spool, intake = _intake(tmp_path)
    path = spool.dir("incoming") / "w.yaml"
    writer = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(writer, JOB.format(id="w").encode())
        outcome = intake.offer("w.yaml", complete=True)
        assert isinstance(outcome, Accepted)
        os.write(writer, b"bogus_field: 1\n")  # through the descriptor it kept
    finally:
        os.close(writer)
    data, status = _stored(outcome.job.path)
    assert data == JOB.format(id="w").encode()
    assert status["sha256"] == hashlib.sha256(data).hexdigest()


def test_a_file_renamed_over_the_one_being_taken_is_stored_as_validated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen: 146 of 379 accepted jobs stored another file than the one validated. The swap
    happens between intake's checks of the file and its rename out of incoming/."""
    spool, intake = _intake(tmp_path)
    incoming = spool.dir("incoming")
    (incoming / "x.yaml").write_text(JOB.format(id="first"))
    swapped: list[bool] = []

    def swap_then_answer(fd: int) -> bool:
        if not swapped:  # the other file arrives under the same name at the worst moment
            (spool.dir("tmp") / ".x").write_text(JOB.format(id="second"))
            os.rename(spool.dir("tmp") / ".x", incoming / "x.yaml")
            swapped.append(True)
        return False

    monkeypatch.setattr("spoold.core.spool.stages._has_local_writer", swap_then_answer)
    outcome = intake.offer("x.yaml", complete=True)
    assert isinstance(outcome, Accepted)
    data, status = _stored(outcome.job.path)
    document = yaml.safe_load(data)
    assert document["job_id"] == outcome.job.job_id == status["job_id"]
    assert status["sha256"] == hashlib.sha256(data).hexdigest()


def test_a_job_file_changed_after_it_was_accepted_is_never_run(tmp_path: Path) -> None:
    """Every read of job.yaml checks the sha256 status.json recorded: a changed one fails the
    job, and nothing of it runs."""
    spool, intake = _intake(tmp_path)
    marker = tmp_path / "ran"
    job = local_job("tampered", f"touch {marker}")
    drop(spool.root, "tampered.yaml", yaml.safe_dump(job))
    outcome = intake.offer("tampered.yaml", complete=True)
    assert isinstance(outcome, Accepted)
    with pytest.raises(JobFileChanged):
        (outcome.job.path / "job.yaml").write_text(yaml.safe_dump(local_job("tampered", "id")))
        spool.jobs.read_job_file(outcome.job, sha256=_stored(outcome.job.path)[1]["sha256"])
    daemon = DaemonProcess(spool.root, write_config(tmp_path / "config.yaml", spool.root))
    daemon.start()
    try:
        directory, status = wait_finished(spool.root, "tampered")
    finally:
        daemon.kill()
    assert directory == "failed"
    assert "not the file that was validated" in status["error"]
    assert not marker.exists()


# -- one job id, one job, across every state --------------------------------------------------


def _accept(spool: Spool, job_id: str, name: str | None = None) -> Path:
    """Through the spool alone: take a file and accept it as ``job_id``."""
    name = name or f"{job_id}.yaml"
    drop(spool.root, name, JOB.format(id=job_id))
    taken = spool.stages.take_incoming(name, now=0.0, max_size=1 << 20)
    assert taken is not None and taken.data is not None
    document = yaml.safe_load(taken.data)
    spec = JobSpec.from_document(document, job_id)
    sha = hashlib.sha256(taken.data).hexdigest()
    status = JobStatus.accepted(spec, source=name, now=FakeClock().now(), sha256=sha)
    try:
        return spool.stages.accept(taken, job_id, status.to_dict(), "accepted\n").path
    except DuplicateJob:
        spool.stages.release(taken)
        raise


def test_a_job_id_stays_reserved_in_every_state_until_purged(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.init()
    _accept(spool, "once")
    for state in ("pending", "running", "done"):
        with pytest.raises(DuplicateJob, match=f"in {state}/"):
            _accept(spool, "once", name="again.yaml")
        if state == "pending":
            assert spool.jobs.claim("once") is not None
        elif state == "running":
            job = spool.jobs.get("once")
            spool.jobs.finish(job, JobState.SUCCEEDED, spool.jobs.read_status(job))
    (spool.dir("incoming") / "again.yaml").unlink()
    spool.jobs.purge(spool.jobs.get("once"))
    assert not spool.reservations.reserved("once")
    _accept(spool, "once")  # its record is gone: the id is free again


def test_recovery_gives_up_only_the_reservation_its_stage_made(tmp_path: Path) -> None:
    """A crash between the reservation and the rename into pending/ leaves both behind."""
    spool = Spool(tmp_path / "spool")
    spool.init()
    drop(spool.root, "cut.yaml", JOB.format(id="cut"))
    taken = spool.stages.take_incoming("cut.yaml", now=0.0, max_size=1 << 20)
    assert taken is not None
    (taken.stage / "status.json").write_text(json.dumps({"job_id": "cut", "source": "cut.yaml"}))
    os.symlink(taken.stage.name, spool.dir("ids") / "cut")
    os.symlink("in-someone-else", spool.dir("ids") / "other")
    spool.stages.recover()
    assert not spool.reservations.reserved("cut")
    assert spool.reservations.reserved("other")
    assert (spool.dir("incoming") / "cut.yaml").read_text() == JOB.format(id="cut")


def test_a_removal_cut_short_spares_a_reservation_made_since(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.init()
    # Left by a purge killed after the rename out of the tree: the job's token was "in-old".
    (spool.dir("tmp") / "gone-in-old~mine").mkdir()
    (spool.dir("tmp") / "gone-in-old~theirs").mkdir()
    os.symlink("in-old", spool.dir("ids") / "mine")
    os.symlink("in-new", spool.dir("ids") / "theirs")  # accepted again since
    spool.stages.recover()
    assert not spool.reservations.reserved("mine")
    assert spool.reservations.reserved("theirs")
    assert tmp_leftovers(spool.root) == []


def test_a_spool_from_before_ids_existed_has_its_jobs_reserved(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.init()
    _accept(spool, "old-pending")
    _accept(spool, "old-done")
    assert spool.jobs.claim("old-done") is not None
    job = spool.jobs.get("old-done")
    spool.jobs.finish(job, JobState.SUCCEEDED, spool.jobs.read_status(job))
    for name in os.listdir(spool.dir("ids")):
        os.unlink(spool.dir("ids") / name)
    os.rmdir(spool.dir("ids"))
    spool.check()  # an older spool is still a spool
    assert spool.reservations.ensure() == 2
    with pytest.raises(DuplicateJob):
        _accept(spool, "old-done", name="new.yaml")


# -- the real daemon, as a submitter racing it ------------------------------------------------


def _daemon(tmp_path: Path, **config: Any) -> DaemonProcess:
    root = tmp_path / "spool"
    Spool(root).init()
    process = DaemonProcess(root, write_config(tmp_path / "config.yaml", root, **config))
    process.start()
    return process


def _every_job(spool: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for directory in ("pending", "running", "done", "failed"):
        for name in os.listdir(spool / directory):
            found.setdefault(name, []).append(directory)
    return found


def test_files_renamed_over_one_name_in_a_tight_loop(tmp_path: Path) -> None:
    """Reproduces the report: fresh valid files, each with a new job id, renamed over
    incoming/x.yaml for 1.5 s; every fifth one reuses an id taken before. Each job stored
    is the file validated, no id is in two places or ran twice, and nothing is stuck."""
    daemon = _daemon(tmp_path, workers=2)
    spool = daemon.spool
    written: dict[str, bytes] = {}
    stop = threading.Event()

    def rename_loop() -> None:
        n = 0
        while not stop.is_set() and n < 5000:  # bounded, whatever the machine's speed
            job_id = f"r{n // 5 * 5 - 5}" if n % 5 == 4 and n > 5 else f"r{n}"
            data = JOB.format(id=job_id).encode()
            temp = spool / "tmp" / f".loop-{n}"
            temp.write_bytes(data)
            os.rename(temp, spool / "incoming" / "x.yaml")
            written.setdefault(job_id, data)
            n += 1

    loop = threading.Thread(target=rename_loop)
    try:
        loop.start()
        stop.wait(1.5)
        stop.set()
        loop.join()
        wait_for(lambda: not os.listdir(spool / "incoming"), what="incoming/ to drain")
        wait_for(
            lambda: not os.listdir(spool / "pending") and not os.listdir(spool / "running"),
            what="every accepted job to finish",
        )
    finally:
        stop.set()
        daemon.kill()
    jobs = _every_job(spool)
    assert jobs, "the loop got some jobs in"
    for job_id, places in jobs.items():
        assert places == ["done"], f"{job_id} is in {places}"
        data, status = _stored(spool / "done" / job_id)
        assert yaml.safe_load(data)["job_id"] == job_id
        assert data == written[job_id]
        assert status["sha256"] == hashlib.sha256(data).hexdigest()
        assert len(status["attempts"]) == 1
    rejected = os.listdir(spool / "rejected")
    for name in rejected:
        reason = json.loads((spool / "rejected" / name / "reason.json").read_text())
        assert reason["code"] == "duplicate", reason
    assert tmp_leftovers(spool) == []
    print(
        f"{len(written)} ids renamed in, {len(jobs)} jobs run, {len(rejected)} duplicates refused"
    )


def test_many_files_naming_one_job_id_while_it_runs_make_one_job(tmp_path: Path) -> None:
    """Seen: the same id accepted twice 10 ms apart, once the first had left pending/."""
    daemon = _daemon(tmp_path, workers=2)
    spool = daemon.spool
    try:
        for n in range(40):
            drop(spool, f"twin-{n}.yaml", JOB.format(id="twin"))
        wait_for(lambda: len(os.listdir(spool / "rejected")) == 39, what="39 rejections")
        wait_finished(spool, "twin")
        wait_for(lambda: not os.listdir(spool / "incoming"), what="incoming/ to drain")
    finally:
        daemon.kill()
    assert found_in(spool, "twin") == ["done"]
    codes = {
        json.loads((spool / "rejected" / n / "reason.json").read_text())["code"]
        for n in os.listdir(spool / "rejected")
    }
    assert codes == {"duplicate"}


# -- the tree and the directories above it ----------------------------------------------------


def test_a_spool_below_a_directory_others_may_write_is_refused(tmp_path: Path) -> None:
    """Whoever may rename the spool's parent may put another tree, full of jobs, in its place."""
    parent = tmp_path / "shared"
    parent.mkdir()
    spool = Spool(parent / "spool")
    spool.init()
    parent.chmod(0o777)
    problems = spool.unsafe_permissions()
    assert problems == [
        f"{parent}, above the spool, is writable by everyone: chmod go-w {parent} "
        f"(or chmod +t {parent})"
    ]
    refused = run_cli(spool.root, "run")
    assert refused.returncode != 0
    assert f"chmod go-w {parent}" in refused.stderr
    parent.chmod(0o1777)  # as /tmp: nobody may rename what is not theirs
    assert spool.unsafe_permissions() == []


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_init_sets_the_modes_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    root = tmp_path / "spool"
    done = subprocess.run(
        [sys.executable, "-c", f"import os, sys; os.umask({umask}); "
         "from spoold.app import main; sys.exit(main(sys.argv[1:]))",
         "init", "--spool", str(root)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(root.stat().st_mode) == 0o750
    assert stat.S_IMODE((root / "incoming").stat().st_mode) == 0o1770
    assert stat.S_IMODE((root / "ids").stat().st_mode) == 0o750
    assert Spool(root).unsafe_permissions() == []


def test_init_tightens_a_spool_made_before(tmp_path: Path) -> None:
    """A checkout's spool/ comes as 0755, an older spoold made incoming/ without the sticky bit."""
    root = tmp_path / "spool"
    Spool(root).init()
    root.chmod(0o755)
    (root / "incoming").chmod(0o770)
    Spool(root).init()
    assert stat.S_IMODE(root.stat().st_mode) == 0o750
    assert stat.S_IMODE((root / "incoming").stat().st_mode) == 0o1770


def test_a_crash_after_a_schedule_is_replaced_never_brings_the_old_one_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exchange puts the old definition where the new one was prepared; killed before it is
    deleted, recovery gave it back to incoming/, and it replaced the new one again."""
    spool, intake = _intake(tmp_path)
    old = (
        "job_id: nightly\nexecutor: local\nproduct: {commands: 'echo old'}\nschedule: '0 2 * * *'\n"
    )
    new = old.replace("echo old", "echo new")
    drop(spool.root, "nightly.yaml", old)
    assert isinstance(intake.offer("nightly.yaml", complete=True), Accepted)
    drop(spool.root, "nightly.yaml", new)
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda path, **kw: None)  # killed here
    assert isinstance(intake.offer("nightly.yaml", complete=True), Accepted)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert [n for n in os.listdir(spool.dir("tmp")) if n.startswith("in-")], "the crash's leftover"
    spool.stages.recover()  # the restart
    assert os.listdir(spool.dir("incoming")) == []
    assert "echo new" in (spool.dir("scheduled") / "nightly" / "job.yaml").read_text()
    assert tmp_leftovers(spool.root) == []
