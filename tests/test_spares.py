"""Spares (spoold.core.spool.spares): what a job's start writes, made ahead while nothing waits.

A job started by a worker that made ahead gets its status.json "started", its lease, its work
dir and its unit's record from them: renames and links, no new inode on its way. A spare gone
(swept) is a file made then; a spare is never anyone else's, and none outlives its process
for longer than the next start."""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from spoold.core.spool import Spool
from spoold.core.spool.fs import write_file
from spoold.core.spool.spares import SPARES_PREFIX, Spares, sweep_spares
from spoold.run.launcher import Launcher, _make_workdir
from tests.harness import (
    DaemonProcess,
    RunnerBench,
    drop,
    local_job,
    spares_of_live_processes,
    wait_finished,
    wait_for,
    write_config,
)


def _spares(directory: Path, pid: int | None = None) -> dict[str, int]:
    """The spares made under ``directory`` (by process ``pid`` only, if given), each by its
    path from there, with their inodes."""
    mark = "" if pid is None else f"@{pid}."
    return {
        str(spare.relative_to(directory)): spare.lstat().st_ino
        for own in directory.iterdir()
        if own.name.startswith(SPARES_PREFIX) and mark in own.name
        for spare in own.iterdir()
    }


def _none_alive(directory: Path) -> bool:
    return not spares_of_live_processes(directory)


def _dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_job_started_after_its_worker_made_ahead_takes_what_it_made(tmp_path: Path) -> None:
    """Its status.json "started", its lease and its work dir are the worker's spares; its
    unit's record is its supervisor's, made after the unit before."""
    launcher = Launcher()
    try:
        # As root: jobs run as root here, so that this one can look at its own directory.
        bench = RunnerBench(tmp_path, launcher, job_users=("root",), runner_id="h1")
        tmp, work = bench.spool.dir("tmp"), tmp_path / "work"
        first = bench.run("one")
        pid = json.loads((first / "units" / "1").read_bytes())["pid"]
        supervisor = wait_for(lambda: _spares(tmp, pid), what="the supervisor's spare")
        bench.runner.make_ahead(1)
        mine = _spares(tmp, os.getpid())
        assert len(mine) == 2, "status.json and the lease of one job"
        (workdir,) = _spares(work).values()
        looked = 'cd "$SPOOLD_JOB_DIR" && stat -c "%n=%i" status.json lease units/1 "$OLDPWD"'
        job = bench.run("two", looked)
        seen = dict(re.findall(r"(\S+)=(\d+)", (job / "log").read_text()))
        inodes = {name: int(value) for name, value in seen.items()}
        assert {inodes["status.json"], inodes["lease"]} == set(mine.values())
        assert inodes["units/1"] == next(iter(supervisor.values()))
        assert [v for k, v in inodes.items() if k.startswith(str(work))] == [workdir]
        assert _spares(tmp, os.getpid()) == {} and _spares(work) == {}, "all taken"
        made = [*supervisor, *mine, *_spares(tmp)]
        assert all(name.startswith(f"{SPARES_PREFIX}h1@") for name in made), "the host's id"
    finally:
        launcher.close()


def test_a_spare_gone_is_a_file_made_then(tmp_path: Path) -> None:
    target = tmp_path / "status.json"
    write_file(target, b"{}", durable=False, spare=str(tmp_path / "gone"))
    assert target.read_bytes() == b"{}"
    assert sorted(os.listdir(tmp_path)) == ["status.json"], "no temporary left"


def test_a_spare_that_cannot_be_renamed_into_place_is_removed(tmp_path: Path) -> None:
    spares = Spares(str(tmp_path), "h")
    assert spares.fill(1) == 1
    spare = spares.take()
    assert spare is not None
    with pytest.raises(FileNotFoundError):  # its directory gone: a job moved on meanwhile
        write_file(tmp_path / "moved" / "status.json", b"{}", durable=False, spare=spare)
    assert not os.path.lexists(spare)


def test_a_work_dir_from_a_spare_is_the_job_users_with_its_mode(tmp_path: Path) -> None:
    spares = Spares(str(tmp_path), "h", dirs=True, mode=0o700)
    spares.fill(1)
    spare = spares.take()
    assert spare is not None
    inode = os.lstat(spare).st_ino
    path = tmp_path / "job.1.abc"
    assert _make_workdir(str(path), 0o755, 65534, chown=True, spare=spare) is True
    assert path.lstat().st_ino == inode and path.stat().st_mode & 0o777 == 0o755
    # An adoption's work dir, left before it was given to its user: the spare is removed.
    spares.fill(1)
    again = spares.take()
    assert again is not None
    assert _make_workdir(str(path), 0o755, 65534, chown=True, spare=again) is True
    assert path.lstat().st_ino == inode and not os.path.lexists(again)


def test_a_fork_does_not_take_the_spares_of_the_process_it_came_from(tmp_path: Path) -> None:
    spares = Spares(str(tmp_path), "h")
    assert spares.fill(2) == 2
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child's word comes through the pipe)
        os.write(write, b"none" if spares.take() is None else b"took")
        os._exit(0)
    os.close(write)
    assert os.read(read, 4) == b"none"
    os.waitpid(child, 0)
    assert spares.take() is not None, "still the parent's"


def test_a_sweep_removes_only_the_spares_of_processes_gone(tmp_path: Path) -> None:
    tmp = str(tmp_path)
    Spares(tmp, "here").fill(1)
    mine = set(os.listdir(tmp_path))
    dead = _dead_pid()
    for name in (f"here@{dead}.1.aa", "there@1.1.bb", "gone@1.1.cc", f"here@{dead}.1.dd"):
        (tmp_path / f"{SPARES_PREFIX}{name}" / "1").mkdir(parents=True)  # a work dir made ahead
    (tmp_path / f"{SPARES_PREFIX}here@{dead}.1.aa" / "2").touch()
    assert sweep_spares(tmp, "here", stale={"gone"}) == 3
    assert set(os.listdir(tmp_path)) == {f"{SPARES_PREFIX}there@1.1.bb", *mine}


def test_recovery_sweeps_the_spares_of_a_worker_killed(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", host="here")
    spool.init()
    tmp = spool.dir("tmp")
    dead = tmp / f"{SPARES_PREFIX}here@{_dead_pid()}.1.aa"
    dead.mkdir()
    (dead / "1").touch()
    spool.jobs.spares.fill(1)
    assert spool.stages.recover() == [], "nothing to say"
    assert not dead.exists() and len(_spares(tmp, os.getpid())) == 1, "a live one kept"


def test_a_full_disk_leaves_the_start_to_make_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spares = Spares(str(tmp_path), "h")

    def full(*args: object, **kwargs: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "open", full)
    with pytest.raises(OSError, match="No space"):
        spares.fill(2)
    monkeypatch.undo()
    assert spares.take() is None
    spares.drop()
    assert os.listdir(tmp_path) == [], "its directory too"


def test_a_daemon_stopped_leaves_no_spare(spool_dir: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    daemon = DaemonProcess(spool_dir, write_config(tmp_path / "config.yaml", spool_dir,
                                                   workdir=str(work)))  # fmt: skip
    daemon.start()
    try:
        drop(spool_dir, "a.yaml", local_job("a", "true"))
        wait_finished(spool_dir, "a")
        wait_for(lambda: _spares(spool_dir / "tmp") and _spares(work), what="spares made ahead")
    finally:
        daemon.stop()
    # Its idle supervisors end after it, at the end of their workers' sockets.
    for directory in (spool_dir / "tmp", work):
        wait_for(functools.partial(_none_alive, directory), what="its processes to end")
    assert _spares(spool_dir / "tmp") == {} and _spares(work) == {}
