"""The spool module on its own: intake primitives, claims, transitions, crash leftovers."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from spoold.core import spool as spool_module
from spoold.core.errors import DuplicateJob, SpoolError
from spoold.core.spool import SPOOL_DIRECTORIES, JobDir, Spool, TakenFile, is_transient_name
from spoold.core.spool import fs as fs_module
from spoold.core.spool import stages as stages_module
from spoold.core.states import JobState
from tests.harness import run_cli

MB = 1 << 20


def _spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.init()
    return spool


def _take(spool: Spool, name: str) -> TakenFile | None:
    """As intake takes a file: the submitted file its copy replaced is removed."""
    taken = spool.stages.take_incoming(name, now=time.time(), max_size=MB)
    if taken is not None and taken.spent is not None:
        spool.stages.remove_spent(taken.spent)
    return taken


def _taken(spool: Spool, name: str) -> TakenFile:
    taken = _take(spool, name)
    assert taken is not None
    return taken


def test_init_creates_the_tree_with_safe_modes(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    for name in SPOOL_DIRECTORIES:
        assert (spool.root / name).is_dir()
    assert (spool.root / "incoming").stat().st_mode & 0o777 == 0o770
    assert (spool.root / "done").stat().st_mode & 0o777 == 0o750
    spool.check()


def test_check_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(SpoolError, match="run 'spoold init --spool"):
        Spool(tmp_path / "nothing").check()


@pytest.mark.parametrize("name", [".x.yaml", "x.yaml.tmp", "x.yaml.part", ".x.yaml.Ab12Cd"])
def test_transient_names_are_never_taken(tmp_path: Path, name: str) -> None:
    spool = _spool(tmp_path)
    (spool.dir("incoming") / name).write_text("job_id: a\n")
    assert is_transient_name(name)
    assert spool.stages.list_incoming() == []
    assert _take(spool, name) is None
    assert (spool.dir("incoming") / name).exists()


def test_a_file_open_for_writing_is_not_taken_until_closed(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    path = spool.dir("incoming") / "slow.yaml"
    with open(path, "w") as writer:
        writer.write("job_id: slow\n")
        writer.flush()
        # The lease test sees the open writer however old the file is.
        assert _take(spool, "slow.yaml") is None
        assert path.exists()
    taken = _take(spool, "slow.yaml")
    assert taken is not None and taken.data == b"job_id: slow\n"
    assert not path.exists()


def test_the_quiet_check_sees_each_change_and_can_hold_a_file_back(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    path = spool.dir("incoming") / "remote.yaml"
    path.write_text("job_id: a\n")
    seen: list[spool_module.FileSignature] = []

    def not_yet(name: str, signature: spool_module.FileSignature) -> bool:
        seen.append(signature)
        return False

    take = functools.partial(spool.stages.take_incoming, now=time.time(), max_size=MB)
    assert take("remote.yaml", quiet=not_yet) is None, "held back, though no writer is open here"
    assert take("remote.yaml", quiet=not_yet) is None
    with open(path, "a") as writer:
        writer.write("# more\n")
    assert take("remote.yaml", quiet=not_yet) is None
    assert seen[0] == seen[1] != seen[2], "an unchanged file looks the same, an appended one not"
    assert take("remote.yaml", quiet=lambda name, signature: True) is not None


def test_settle_holds_back_files_changed_recently_where_writers_cannot_be_seen(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    spool = _spool(tmp_path)
    monkeypatch.setattr(stages_module, "_has_local_writer", lambda fd: None)  # no CAP_LEASE
    path = spool.dir("incoming") / "fresh.yaml"
    path.write_text("job_id: a\n")
    mtime = path.stat().st_mtime
    assert spool.stages.take_incoming("fresh.yaml", now=mtime + 0.5, max_size=MB, settle=2) is None
    assert (
        spool.stages.take_incoming("fresh.yaml", now=mtime + 2.5, max_size=MB, settle=2) is not None
    )


def test_non_regular_files_are_taken_without_being_opened(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    incoming = spool.dir("incoming")
    os.symlink("/etc/passwd", incoming / "link.yaml")
    (incoming / "dir.yaml").mkdir()
    os.mkfifo(incoming / "fifo.yaml")
    kinds = {name: _taken(spool, name).kind for name in ("link.yaml", "dir.yaml", "fifo.yaml")}
    assert kinds == {"link.yaml": "symlink", "dir.yaml": "directory", "fifo.yaml": "fifo"}
    assert spool.stages.list_incoming() == []


def test_an_oversized_file_is_taken_without_its_content(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    (spool.dir("incoming") / "big.yaml").write_bytes(b"x" * 2000)
    taken = spool.stages.take_incoming("big.yaml", now=time.time(), max_size=1000)
    assert taken is not None and taken.data is None and taken.size == 2000


def _accept(spool: Spool, name: str, job_id: str) -> JobDir:
    (spool.dir("incoming") / name).write_text(f"job_id: {job_id}\n")
    return spool.stages.accept(
        _taken(spool, name),
        job_id,
        {"job_id": job_id, "state": "pending", "source": name},
        "accepted\n",
    )


def test_accept_moves_the_file_byte_for_byte_into_pending(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    job = _accept(spool, "a.yaml", "a")
    assert job.path == spool.dir("pending") / "a"
    assert sorted(p.name for p in job.path.iterdir()) == [
        "artifacts",
        "job.yaml",
        "log",
        "status.json",
    ]
    assert (job.path / "job.yaml").read_text() == "job_id: a\n"
    assert list(spool.dir("tmp").iterdir()) == []


def test_accept_makes_the_job_directory_durable_before_it_enters_pending(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without a journal, nothing orders metadata: each step must be synced explicitly."""
    spool = _spool(tmp_path)
    (spool.dir("incoming") / "a.yaml").write_text("job_id: a\n")
    taken = _taken(spool, "a.yaml")
    steps: list[str] = []
    real_rename = fs_module.rename_noreplace

    def rename(source: str | Path, target: str | Path) -> None:
        steps.append(f"rename {Path(source).name} -> {Path(target).parent.name}/")
        real_rename(source, target)

    def sync(path: str | Path) -> None:
        steps.append(f"sync {path}")

    monkeypatch.setattr(fs_module, "fsync_path", sync)  # the job file, the stage, pending/
    monkeypatch.setattr(stages_module, "rename_noreplace", rename)
    spool.stages.accept(taken, "a", {"job_id": "a", "state": "pending"}, "accepted\n")
    stage = taken.stage
    assert steps == [
        f"sync {stage}/job.yaml",
        f"sync {stage}",
        f"rename {stage.name} -> pending/",
        f"sync {spool.dir('pending')}",
    ]


def test_jobs_accepted_together_share_one_syncfs_and_one_fsync_of_pending(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A group commit: every job directory is durable before any is placed, and pending/ is
    synced once after all are; on a filesystem where syncfs writes everything back."""
    spool = _spool(tmp_path)
    for name in ("a", "b", "c"):
        (spool.dir("incoming") / f"{name}.yaml").write_text(f"job_id: {name}\n")
    taken = [_taken(spool, f"{name}.yaml") for name in ("a", "b", "c")]
    steps: list[str] = []
    real_rename = fs_module.rename_noreplace

    def rename(source: str | Path, target: str | Path) -> None:
        steps.append(f"rename {Path(source).name} -> {Path(target).parent.name}/")
        real_rename(source, target)

    monkeypatch.setattr(fs_module, "fsync_path", lambda path: steps.append(f"sync {path}"))
    monkeypatch.setattr(fs_module, "syncfs_path", lambda path: steps.append(f"syncfs {path}"))
    monkeypatch.setattr(stages_module, "rename_noreplace", rename)
    monkeypatch.setattr(fs_module, "filesystem_type", lambda path: "ext4")
    prepared = [
        spool.stages.prepare(t, t.name[0], {"job_id": t.name[0], "state": "pending"}, "x\n")
        for t in taken
    ]
    spool.stages.settle(prepared)
    jobs = [spool.stages.place(p, sync=False) for p in prepared]
    spool.stages.sync_placed(schedules=False)
    assert steps == [
        f"syncfs {taken[0].stage}/job.yaml",
        *(f"rename {t.stage.name} -> pending/" for t in taken),
        f"sync {spool.dir('pending')}",
    ]
    assert [job.job_id for job in jobs] == ["a", "b", "c"]
    assert all((job.path / "status.json").exists() for job in jobs)


def test_a_network_filesystem_gets_an_fsync_per_file_even_in_a_group(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """On NFS or sshfs syncfs may return having written nothing: no group syncfs there."""
    spool = _spool(tmp_path)
    for name in ("a", "b"):
        (spool.dir("incoming") / f"{name}.yaml").write_text(f"job_id: {name}\n")
    taken = [_taken(spool, f"{name}.yaml") for name in ("a", "b")]
    steps: list[str] = []
    monkeypatch.setattr(fs_module, "fsync_path", lambda path: steps.append(f"sync {path}"))
    monkeypatch.setattr(fs_module, "syncfs_path", lambda path: steps.append(f"syncfs {path}"))
    monkeypatch.setattr(fs_module, "filesystem_type", lambda path: "fuse.sshfs")
    prepared = [spool.stages.prepare(t, t.name[0], {"job_id": t.name[0]}, "") for t in taken]
    spool.stages.settle(prepared)
    assert steps == [f"sync {p}" for t in taken for p in (f"{t.stage}/job.yaml", t.stage)]


def test_a_duplicate_id_in_any_state_is_refused(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    _accept(spool, "a.yaml", "a")
    job = spool.jobs.claim("a")
    assert job is not None
    spool.jobs.finish(job, JobState.SUCCEEDED, {"job_id": "a", "state": "succeeded"})
    with pytest.raises(DuplicateJob):
        _accept(spool, "again.yaml", "a")


def test_a_schedule_holds_no_artifacts_directory_and_a_refused_one_gives_its_file_back(
    tmp_path: Path,
) -> None:
    """A schedule's definition never runs (each firing is a job with a directory of its own):
    job.yaml, status.json and log, no artifacts/. One whose id a job holds is refused with its
    stage as it was taken, ready to be rejected."""
    spool = _spool(tmp_path)
    (spool.dir("incoming") / "s.yaml").write_text("job_id: s\n")
    schedule = spool.stages.accept(
        _taken(spool, "s.yaml"), "s", {"job_id": "s", "state": "scheduled"}, "accepted\n",
        schedule=True,
    )  # fmt: skip
    assert sorted(p.name for p in schedule.path.iterdir()) == ["job.yaml", "log", "status.json"]
    job = _accept(spool, "j.yaml", "j")
    assert (job.path / "artifacts").is_dir(), "a job has one"
    (spool.dir("incoming") / "again.yaml").write_text("job_id: j\n")
    taken = _taken(spool, "again.yaml")
    with pytest.raises(DuplicateJob):
        spool.stages.accept(taken, "j", {"job_id": "j"}, "accepted\n", schedule=True)
    assert [p.name for p in taken.stage.iterdir()] == ["again.yaml"]
    assert spool.stages.reject(taken, {"code": "duplicate"}).is_dir()


def test_claim_is_won_by_exactly_one_of_many_threads(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    _accept(spool, "a.yaml", "race")
    barrier = threading.Barrier(8)
    winners = []

    def contend() -> None:
        barrier.wait()
        if spool.jobs.claim("race") is not None:
            winners.append(1)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(winners) == 1
    assert (spool.dir("running") / "race").is_dir() and not (spool.dir("pending") / "race").exists()


def test_finish_moves_a_claimed_job_and_drops_its_claim_files(tmp_path: Path) -> None:
    """Whether a move is allowed is the ledger's check (tests/test_ledger.py)."""
    spool = _spool(tmp_path)
    _accept(spool, "a.yaml", "a")
    job = spool.jobs.claim("a")
    assert job is not None
    done = spool.jobs.finish(job, JobState.FAILED, {"state": "failed"})
    assert done.directory == "failed" and not (done.path / "lease").exists()
    assert spool.jobs.find("a") == done


def test_reject_keeps_the_file_and_never_overwrites_an_earlier_rejection(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    paths = []
    for content in ("first", "second"):
        (spool.dir("incoming") / "bad.yaml").write_text(content)
        paths.append(
            spool.stages.reject(_taken(spool, "bad.yaml"), {"file": "bad.yaml", "reason": content})
        )
    assert [p.name for p in paths] == ["bad.yaml", "bad-2.yaml"]
    assert [(p / "bad.yaml").read_text() for p in paths] == ["first", "second"]
    assert json.loads((paths[1] / "reason.json").read_text())["reason"] == "second"


def test_reject_syncs_rejected_after_its_rename(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A rejection is durable before it is told (its ``rejected`` event is committed after
    ``reject`` returns): the reason is written durably, then rejected/ is synced after the
    rename into it."""
    spool = _spool(tmp_path)
    (spool.dir("incoming") / "bad.yaml").write_text("job_id: [\n")
    taken = _taken(spool, "bad.yaml")
    steps: list[str] = []
    real_fsync, real_rename = os.fsync, fs_module.rename_noreplace

    def fsync(fd: int) -> None:
        name = Path(os.readlink(f"/proc/self/fd/{fd}")).name  # a file: written aside first
        steps.append("sync reason.json" if "reason.json" in name else f"sync {name}")
        real_fsync(fd)

    def rename(source: str | Path, target: str | Path) -> None:
        steps.append(f"rename {Path(source).name} -> {Path(target).parent.name}/")
        real_rename(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(stages_module, "rename_noreplace", rename)
    target = spool.stages.reject(taken, {"file": "bad.yaml", "reason": "not YAML"})
    assert target == spool.dir("rejected") / "bad.yaml"
    assert steps == ["sync reason.json", f"rename {taken.stage.name} -> rejected/", "sync rejected"]


def test_a_file_named_reason_json_does_not_hide_its_reason(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    (spool.dir("incoming") / "reason.json").write_text("{}")
    target = spool.stages.reject(
        _taken(spool, "reason.json"), {"file": "reason.json", "reason": "r"}
    )
    assert json.loads((target / "reason.json").read_text())["reason"] == "r"
    assert (target / "reason.json.orig").read_text() == "{}"


def test_interrupted_intake_returns_the_file_to_incoming(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    (spool.dir("incoming") / "a.yaml").write_text("job_id: a\n")
    taken = _take(spool, "a.yaml")
    assert taken is not None and not (spool.dir("incoming") / "a.yaml").exists()
    # The process dies here, between taking the file and accepting it.
    assert spool.stages.recover() == [
        "returned a.yaml to incoming/ as a.yaml (intake was interrupted)"
    ]
    assert (spool.dir("incoming") / "a.yaml").read_text() == "job_id: a\n"
    assert list(spool.dir("tmp").iterdir()) == []


def test_submit_never_replaces_a_file_waiting_in_incoming(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    first = spool.stages.submit_file("job.yaml", b"one")
    second = spool.stages.submit_file("job.yaml", b"two")
    assert (first.name, second.name) == ("job.yaml", "job-2.yaml")
    assert first.read_bytes() == b"one" and second.read_bytes() == b"two"
    assert spool.stages.list_incoming() == ["job-2.yaml", "job.yaml"]


def test_job_ids_that_are_not_plain_names_never_become_paths(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    for bad in ("../etc", "a/b", "", ".hidden"):
        with pytest.raises(SpoolError):
            spool.jobs.find(bad)


def test_only_one_daemon_per_host_holds_the_spool(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    lock = spool.host_lock.acquire("h1")
    with pytest.raises(SpoolError, match="already runs"):
        spool.host_lock.acquire("h1")
    other = spool.host_lock.acquire("h2")  # another host sharing the spool
    lock.close()
    other.close()
    spool.host_lock.acquire("h1").close()


@pytest.mark.parametrize("name", ["status.json", "log", "job.yaml", "plain.yaml"])
def test_release_gives_back_the_original_whatever_its_name(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = _spool(tmp_path)
    (spool.dir("incoming") / name).write_text("the original\n")
    taken = _taken(spool, name)

    def fail_after_writing(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    # Fail at the last step of accept(), after every file beside the original was written.
    monkeypatch.setattr("spoold.core.spool.stages.rename_noreplace", fail_after_writing)
    with pytest.raises(OSError):
        spool.stages.accept(taken, "x", {"job_id": "x", "source": name}, "accepted\n")
    monkeypatch.undo()
    spool.stages.release(taken)
    assert spool.stages.list_incoming() == [name]
    assert (spool.dir("incoming") / name).read_text() == "the original\n"
    assert list(spool.dir("tmp").iterdir()) == []


def test_directory_syncs_are_shared_by_callers_that_arrive_during_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Group commit: callers arriving while a sync runs share the next one, none is skipped."""
    release = threading.Event()
    synced: list[str] = []

    def slow_fsync(path: str | Path) -> None:
        synced.append(str(path))
        if len(synced) == 1:
            release.wait(10)

    monkeypatch.setattr(fs_module, "fsync_path", slow_fsync)
    syncer = fs_module.GroupSync(str(tmp_path))
    first = threading.Thread(target=syncer.sync)
    first.start()
    wait_until(lambda: len(synced) == 1)
    late = [threading.Thread(target=syncer.sync) for _ in range(5)]
    for thread in late:
        thread.start()
    # All five wait: the running sync may have begun before their renames.
    wait_until(lambda: len(syncer._cond._waiters) == 5)  # type: ignore[attr-defined]
    release.set()
    for thread in [first, *late]:
        thread.join(10)
        assert not thread.is_alive()
    assert synced == [str(tmp_path)] * 2, "one sync for the first caller, one for the five"


def test_a_failed_directory_sync_is_raised_to_its_callers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def failing(path: str | Path) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(fs_module, "fsync_path", failing)
    with pytest.raises(OSError, match="I/O error"):
        fs_module.GroupSync(str(tmp_path)).sync()


def wait_until(predicate: Callable[[], bool], bound: float = 10.0) -> None:
    end = time.monotonic() + bound
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.001)


def test_list_jobs_skips_a_job_that_moves_on_while_listed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A worker process claims a pending job while the main process lists pending/."""
    spool = _spool(tmp_path)
    for job_id in ("stays", "claimed"):
        (tmp_path / "spool" / "pending" / job_id).mkdir()
    real_scandir = os.scandir

    class Moving:
        def __init__(self, entry: os.DirEntry[str]) -> None:
            self._entry = entry
            self.name = entry.name

        def is_dir(self, *, follow_symlinks: bool = True) -> bool:
            return self._entry.is_dir(follow_symlinks=follow_symlinks)

        def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
            if self.name == "claimed":
                raise FileNotFoundError(self.name)
            return self._entry.stat(follow_symlinks=follow_symlinks)

    @contextlib.contextmanager
    def scandir(path: str | Path) -> Iterator[list[Moving]]:
        with real_scandir(path) as entries:
            yield [Moving(entry) for entry in entries]

    monkeypatch.setattr(os, "scandir", scandir)
    assert [job.job_id for job in spool.jobs.list_jobs("pending")] == ["stays"]


def test_a_spool_others_could_write_jobs_into_is_refused(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.init()
    assert spool.unsafe_permissions() == []
    (spool.root / "incoming").chmod(0o1770)  # the submitters' group drops files: fine
    assert spool.unsafe_permissions() == []
    (spool.root / "incoming").chmod(0o770)  # but without the sticky bit they swap each other's
    assert spool.unsafe_permissions() == [
        f"{spool.root}/incoming is writable by its group without the sticky bit, so a "
        f"submitter could replace another's file: chmod +t {spool.root}/incoming"
    ]
    (spool.root / "incoming").chmod(0o1770)
    (spool.root / "pending").chmod(0o757)
    (spool.root / "done").chmod(0o770)
    assert spool.unsafe_permissions() == [
        f"{spool.root}/pending is writable by everyone: chmod o-w {spool.root}/pending",
        f"{spool.root}/done is writable by its group: chmod g-w {spool.root}/done",
    ]
    refused = run_cli(spool.root, "run")
    assert refused.returncode != 0
    assert "refusing to run: others could write jobs" in refused.stderr
    assert f"chmod o-w {spool.root}/pending" in refused.stderr


def test_a_job_file_is_taken_whole_when_reads_come_back_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FUSE (sshfs) and NFS may answer a read with fewer bytes than asked before the file's
    end (a signal, a server's short answer): intake reads on to the read that returns nothing."""
    spool = Spool(tmp_path / "spool")
    spool.init()
    data = b"job_id: long\nexecutor: local\nproduct: {commands: 'true'}\n" + b"# pad\n" * 20_000
    (spool.dir("incoming") / "long.yaml").write_bytes(data)
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, size: real_read(fd, min(size, 7_001)))
    taken = _take(spool, "long.yaml")
    assert taken is not None
    assert taken.data == data
