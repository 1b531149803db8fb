"""What a job leaves outside its work dir, in /tmp, /var/tmp or /dev/shm, does not reach the
next job of its worker slot, which runs as the same user (SPEC 13: a job reaches no other job).

Seen before: a job wrote /tmp/<name>, and the slot's next job, a different submitter's, read
it. Now what the slot's own job user made or changed there during an attempt is removed after
it, as that user; what others own, and what the user had there before, stays.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spoold.core.config import load_config
from spoold.run.lane import SHARED_DIRS, Lane, SharedLook
from spoold.run.launcher import Chore, Launcher, Leftovers, _remove_leftovers
from spoold.run.process import RunAs
from tests.harness import (
    DaemonProcess,
    drop,
    ensure_account,
    gate_wait,
    job_log,
    local_job,
    needs_root,
    wait_finished,
    wait_for,
    write_config,
)
from tests.test_steps_round31 import _marks

#: Job users of this module's own, one for each test that runs a daemon: the sweep holds off
#: while any process of its user runs, other tests run jobs as spoold-job and spoold-job2 at
#: any time, and this module's tests may run side by side.
USER = "spoold-job-t3"
#: Uids no account and no process has, one for each unit test: their files belong to it.
NOBODY_UID = 64_123


@pytest.fixture
def own_user(request: pytest.FixtureRequest) -> str:
    """An account of the test's own (``indirect`` parametrization names it; else USER)."""
    needs_root()
    name: str = getattr(request, "param", USER)
    return ensure_account(name)


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Path]:
    """A directory like /tmp (mode 1777) for the unit tests."""
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(0o1777)
    yield directory


def _owned(path: Path, uid: int = NOBODY_UID) -> Path:
    os.chown(path, uid, uid, follow_symlinks=False)
    return path


# -- the look before and after an attempt --------------------------------------------------------


def test_only_a_directory_whose_stamp_changed_is_looked_through(shared: Path) -> None:
    ctime = shared.stat().st_ctime_ns
    look = SharedLook(since=ctime, stamps=((str(shared), ctime),))
    assert look.changed() == (), "nothing changed: not even listed"
    (shared / "made").touch()
    assert look.changed() == (str(shared),)


def test_a_stamp_too_fresh_to_trust_is_looked_through_all_the_same(shared: Path) -> None:
    """The kernel stamps with a coarse clock: a change right after the look may keep the
    stamp it saw. A directory changed just before the look is looked through after it."""
    look = SharedLook.look((str(shared), str(shared / "not-there")))
    assert look.stamps == ((str(shared), None), (str(shared / "not-there"), None))
    assert look.changed() == (str(shared),), "a directory not there has nothing to look at"
    assert look.since <= time.time_ns() - 40_000_000, "what changed just before counts too"


def test_an_adopted_attempt_looks_through_all_since_its_start(shared: Path) -> None:
    look = SharedLook.since_start(1_000_000_000_000, (str(shared),))
    assert look.changed() == (str(shared),) and look.since < 1_000_000_000_000


# -- the chore -------------------------------------------------------------------------------------


def test_the_users_new_entries_go_and_all_else_stays(shared: Path) -> None:
    needs_root()
    (shared / "before").write_text("the user's, from before the attempt")
    _owned(shared / "before")
    since = time.time_ns() + 50_000_000  # the attempt began after it was last changed
    while time.time_ns() < since + 10_000_000:  # its ctime is before since (a coarse tick)
        time.sleep(0.01)
    made = shared / "made"
    made.write_text("left by the job")
    _owned(made)
    tree = shared / "tree"
    (tree / "deep").mkdir(parents=True)
    _owned(tree)
    (tree / "deep" / "file").write_text("x")
    (tree / "deep").chmod(0o500)  # a job may leave what its user cannot write
    others = shared / "others"
    others.write_text("root's")
    target = shared.parent / "target"
    target.write_text("outside, root's")
    link = shared / "link"
    link.symlink_to(target)
    _owned(link)
    (tree / "inner-link").symlink_to(target)

    found = _remove_leftovers(NOBODY_UID, (str(shared),), since)  # this test's uid
    assert found.busy is None and found.number == 3, found
    assert set(found.names) <= {str(made), str(tree), str(link)}
    assert sorted(path.name for path in shared.iterdir()) == ["before", "others"]
    assert target.read_text() == "outside, root's", "a link is removed, not followed"
    assert shared.stat().st_mode & 0o7777 == 0o1777, "the shared directory's mode is kept"


def test_nothing_goes_while_a_process_of_the_user_runs(shared: Path) -> None:
    """Another daemon's job, or a spoold exec, may run as the same user: its files stay."""
    needs_root()
    uid = NOBODY_UID + 1
    made = shared / "made"
    made.touch()
    _owned(made, uid)
    with subprocess.Popen(["sleep", "60"], user=uid, group=uid) as other:
        try:
            wait_for(lambda: Path(f"/proc/{other.pid}").stat().st_uid == uid,
                     what="the process as its user")  # fmt: skip
            found = _remove_leftovers(uid, (str(shared),), 0)
        finally:
            other.kill()
    assert found == Leftovers(1, (str(made),), other.pid)
    assert made.exists()


def test_one_that_cannot_be_removed_keeps_no_other_and_is_said(
    shared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    needs_root()
    uid = NOBODY_UID + 2
    stuck, other = shared / "stuck", shared / "other"
    for path in (stuck, other):
        path.touch()
        _owned(path, uid)
    unlink = os.unlink

    def refuse(path: str) -> None:
        if path == str(stuck):
            raise PermissionError(1, "Operation not permitted", path)
        unlink(path)

    monkeypatch.setattr(os, "unlink", refuse)
    with pytest.raises(PermissionError, match="not permitted"):
        _remove_leftovers(uid, (str(shared),), 0)
    assert [path.name for path in shared.iterdir()] == ["stuck"]


def test_root_changes_no_mode_through_a_path_another_user_may_swap(
    shared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job may leave a directory every user can write: another user may swap what is in it
    for a link while root removes it. Root needs no modes to remove anything, and changes
    none: a chmod through that path would change the link's target (here, as it was, /etc)."""
    needs_root()
    uid = NOBODY_UID + 4
    target = tmp_path / "target"
    target.mkdir(mode=0o755)
    left = shared / "left"
    (left / "sub").mkdir(parents=True)
    (left / "sub" / "x").touch()
    left.chmod(0o777)  # the job made it everyone's to write
    _owned(left, uid)
    unlink = os.unlink

    def swapped_then_refused(name: str, *args: Any, **kwargs: Any) -> None:
        if name == "x":  # another user swaps sub for a link as root removes what is in it
            (left / "sub").rename(left / "moved")
            (left / "sub").symlink_to(target)
            raise PermissionError(1, "Operation not permitted", name)
        unlink(name, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", swapped_then_refused)
    with pytest.raises(OSError):  # what it could not remove is said
        _remove_leftovers(uid, (str(shared),), 0)
    assert target.stat().st_mode & 0o777 == 0o755, "root changed the mode of a link's target"


def test_the_launchers_fork_removes_them_as_the_user(shared: Path) -> None:
    """The package's daemon is not root: a fork of its launcher that became the job user
    removes them, and can remove nothing of anyone else's."""
    needs_root()
    uid = NOBODY_UID + 3
    user = RunAs("spoold-left-t", uid, uid, (uid,), "/nonexistent")
    made = shared / "made"
    (made / "deep").mkdir(parents=True)
    (made / "deep").chmod(0o500)
    for path in (made, made / "deep"):
        _owned(path, uid)
    (shared / "others").touch()
    launcher = Launcher(chores_here=False)
    try:
        chore = Chore("leftovers", user, str(shared), sweep=(str(shared),), since=0)
        assert launcher.chore(chore) == Leftovers(1, (str(made),))
    finally:
        launcher.close()
    assert [path.name for path in shared.iterdir()] == ["others"]


# -- whose leftovers are removed -------------------------------------------------------------------


def _lane(tmp_path: Path, **overrides: object) -> Lane:
    config = load_config(write_config(tmp_path / "c.yaml", tmp_path / "spool", **overrides), env={})
    return Lane.from_config(config, lambda: tmp_path / "own-work", switching=True)


def test_only_a_slots_own_user_is_swept(tmp_path: Path, own_user: str) -> None:
    work = str(tmp_path / "work")
    job, job2, mine = RunAs.lookup("spoold-job"), RunAs.lookup("spoold-job2"), RunAs.lookup(USER)
    lane = _lane(tmp_path, workers=2, workdir=work)
    assert lane.sweeps("0", job) and lane.sweeps("1", job2), "each slot's default account"
    assert not lane.sweeps("1", job), "not another slot's user (an adopted job's)"
    assert not lane.sweeps(f"exec-{os.getpid()}", job), "spoold exec runs as a slot's user"
    shared = _lane(tmp_path, workers=2, job_user="spoold-job", workdir=work)
    assert not shared.sweeps("0", job), "slots sharing a user: one job's files may be another's"
    named = _lane(tmp_path, workers=2, job_user=[USER, "spoold-job2"], workdir=work)
    assert named.sweeps("0", mine)
    run_as = _lane(tmp_path, workers=2, job_user=[USER, "spoold-job2"], workdir=work,
                   allowed_run_as=[USER])  # fmt: skip
    assert not run_as.sweeps("0", mine), "a run_as user may be any slot's job's"
    root = _lane(tmp_path, workers=1, job_user="root", workdir=work)
    assert not root.sweeps("0", None)


# -- a daemon ----------------------------------------------------------------------------------------


def _paths(token: str) -> list[Path]:
    return [Path(directory) / f"spoold-left-{token}" for directory in SHARED_DIRS]


def test_the_next_job_of_the_slot_finds_nothing_the_last_one_left(
    spool_dir: Path, tmp_path: Path, own_user: str
) -> None:
    token = os.urandom(4).hex()
    made = _paths(token)
    kept = Path("/tmp") / f"spoold-kept-{token}"  # root's: not the job user's to lose
    kept.write_text("root's")
    config = write_config(tmp_path / "config.yaml", spool_dir, workers=1, job_user=[own_user],
                          workdir=str(tmp_path / "work"))  # fmt: skip
    leave = [f"echo left > {made[0]}", f"mkdir -p {made[1]}/deep && chmod 500 {made[1]}/deep",
             f"echo left > {made[2]}"]  # fmt: skip
    look = " && ".join(f"test ! -e {path}" for path in made) + f" && test -e {kept}"
    daemon = DaemonProcess(spool_dir, config)
    daemon.start()
    try:
        drop(spool_dir, "leaves.yaml", local_job("leaves", leave))
        assert wait_finished(spool_dir, "leaves")[0] == "done"
        drop(spool_dir, "looks.yaml", local_job("looks", look))
        assert wait_finished(spool_dir, "looks")[0] == "done", job_log(spool_dir, "looks")
        log = job_log(spool_dir, "leaves")
        assert f"removed what the job left outside its work dir, as {own_user}: " in log
        assert all(str(path) in log for path in made), log
    finally:
        daemon.kill()
        kept.unlink()
        for path in made:
            subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.mark.parametrize("own_user", ["spoold-job-t4"], indirect=True)
def test_what_the_user_may_still_use_elsewhere_is_kept_and_said(
    spool_dir: Path, tmp_path: Path, own_user: str
) -> None:
    token = os.urandom(4).hex()
    (left, *_) = _paths(token)
    gate = tmp_path / "go"
    gate.parent.chmod(0o755)
    config = write_config(tmp_path / "config.yaml", spool_dir, workers=1, job_user=[own_user],
                          workdir=str(tmp_path / "work"))  # fmt: skip
    account = pwd.getpwnam(own_user)
    daemon = DaemonProcess(spool_dir, config)
    daemon.start()
    # Another process of the user's, as a spoold exec beside the daemon would be.
    other = subprocess.Popen(["sh", "-c", gate_wait(gate)], user=account.pw_uid,
                             group=account.pw_gid)  # fmt: skip
    try:
        drop(spool_dir, "leaves.yaml", local_job("leaves", f"echo left > {left}"))
        assert wait_finished(spool_dir, "leaves")[0] == "done", job_log(spool_dir, "leaves")
        log = job_log(spool_dir, "leaves")
        assert f"kept what the job left outside its work dir ({left})" in log, log
        assert f"{own_user} runs another process (pid {other.pid})" in log
        assert left.exists()
    finally:
        gate.touch()
        other.wait()
        daemon.kill()
        left.unlink(missing_ok=True)


@pytest.mark.parametrize("own_user", ["spoold-job-t5"], indirect=True)
def test_an_adopted_attempts_leftovers_go_too(
    spool_dir: Path, tmp_path: Path, own_user: str
) -> None:
    """Killed mid-job, the daemon that adopts the attempt looks at all the shared directories
    for what the user changed since the attempt's start, which it did not see."""
    (left, *_) = _paths(os.urandom(4).hex())
    marks = _marks(tmp_path)
    gate, started = marks / "go", marks / "started"
    config = write_config(tmp_path / "config.yaml", spool_dir, workers=1, job_user=[own_user],
                          workdir=str(tmp_path / "work"))  # fmt: skip
    first = DaemonProcess(spool_dir, config)
    first.start()
    second = DaemonProcess(spool_dir, config)
    try:
        commands = f"echo left > {left}; touch {started}; {gate_wait(gate)}"
        drop(spool_dir, "held.yaml", local_job("held", commands))
        wait_for(started.exists, what="the job to leave its file")
        first.kill(leave_jobs=True)
        second.start()
        lease = spool_dir / "running" / "held" / "lease"
        wait_for(lambda: json.loads(lease.read_text()).get("pid") == second.pid,
                 what="the job adopted")  # fmt: skip
        gate.touch()
        assert wait_finished(spool_dir, "held")[0] == "done"
        log = job_log(spool_dir, "held")
        assert f"removed what the job left outside its work dir, as {own_user}: {left}" in log
        assert not left.exists()
    finally:
        gate.touch()
        first.kill()
        second.kill()
        left.unlink(missing_ok=True)
