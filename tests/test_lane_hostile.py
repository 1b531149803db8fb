"""The jobs' work root, tried as another local user would: a user who may rename entries in
the work root (or above it) could put a directory of its own in place of a running job's
work dir, and so its files among the job's artifacts. spoold refuses to run on such a root,
naming the path, the owner found and the fix, and follows no link planted where it makes
its default one (in /tmp, where anyone may make an entry first)."""

from __future__ import annotations

import os
import stat
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from spoold.core.config import Config
from spoold.core.errors import ConfigError
from spoold.core.spool import Spool
from spoold.run.lane import WORK_ROOT_MODE, Lane
from tests.harness import DaemonProcess, drop, local_job, wait_finished, wait_for, write_config

OTHER = 54321  # a local user who is neither spoold's nor root (no name needed)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _theirs(path: Path, mode: int = 0o777) -> Path:
    """A directory of the other user's, of ``mode`` (0777: anyone may write it)."""
    path.mkdir()
    path.chmod(mode)
    os.chown(path, OTHER, OTHER)
    return path


def _lane(tmp_path: Path, workdir: Path | None, *, switching: bool = True) -> Lane:
    config = Config(spool=tmp_path / "spool", workdir=workdir)
    spool = Spool(config.spool)
    spool.init()
    return Lane.from_config(config, spool.jobs.work_root, switching=switching)


# -- a configured workdir ---------------------------------------------------------------------


def _of_another_user(tmp_path: Path) -> Path:
    return _theirs(tmp_path / "wdroot")  # the probe's: mkdir -m 0777; chown 54321


def _of_another_user_sticky(tmp_path: Path) -> Path:
    return _theirs(tmp_path / "wdroot", WORK_ROOT_MODE)  # the owner renames what it likes


def _below_another_users(tmp_path: Path) -> Path:
    above = _theirs(tmp_path / "theirs", 0o755)
    (above / "work").mkdir()
    return above / "work"


def _below_a_directory_anyone_writes(tmp_path: Path) -> Path:
    above = tmp_path / "open"
    above.mkdir()
    above.chmod(0o777)  # no sticky bit: anyone may rename what is in it
    return above / "work"


def _a_link(tmp_path: Path) -> Path:
    real = _theirs(tmp_path / "real")
    (tmp_path / "wdroot").symlink_to(real)
    return tmp_path / "wdroot"


def _through_another_users_link(tmp_path: Path) -> Path:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    os.lchown(tmp_path / "link", OTHER, OTHER)  # in a sticky directory: theirs to replace
    return tmp_path / "link" / "work"


#: Each case: how it is made, what the refusal says was found, and the fix it names.
HOSTILE: dict[str, tuple[Callable[[Path], Path], str, str]] = {
    "of-another-user": (_of_another_user, f"belongs to uid {OTHER}, not to root", "chown root"),
    "of-another-user-sticky": (_of_another_user_sticky, f"belongs to uid {OTHER}", "chown root"),
    "below-another-users": (
        _below_another_users,
        f"theirs, above it, belongs to uid {OTHER}",
        "chown root",
    ),
    "below-a-directory-anyone-writes": (
        _below_a_directory_anyone_writes,
        "open, above it, is mode 0777",
        "chmod go-w",
    ),
    "a-link": (_a_link, "is not a directory", "rm "),
    "through-another-users-link": (
        _through_another_users_link,
        "link, a symbolic link on the way",
        "in workdir:",
    ),
}


@pytest.mark.parametrize("switching", [True, False], ids=["switching", "not-switching"])
@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_a_workdir_another_user_could_swap_is_refused_and_left_alone(
    tmp_path: Path, case: str, switching: bool
) -> None:
    make, found, fix = HOSTILE[case]
    workdir = make(tmp_path)
    before = {p: (_mode(p), p.lstat().st_uid) for p in (workdir, *workdir.parents[:2])
              if p.is_symlink() or p.exists()}  # fmt: skip
    with pytest.raises(ConfigError) as refused:
        _lane(tmp_path, workdir, switching=switching)
    message = str(refused.value)
    assert message.startswith(f"refusing to run: key workdir: the work root {workdir}"), message
    assert found in message, message
    assert fix in message, message
    after = {p: (_mode(p), p.lstat().st_uid) for p in before}
    assert after == before, "spoold changed what it refused"
    assert not (tmp_path / "real" / "work").exists(), "a link was followed"


def test_a_workdir_of_spoolds_own_gets_its_mode_and_parents_job_users_pass(
    tmp_path: Path,
) -> None:
    """What spoold makes itself it makes right, whatever the umask: the work root 1733, the
    directories above it 0755."""
    workdir = tmp_path / "made" / "by" / "spoold" / "work"
    old = os.umask(0o077)
    try:
        lane = _lane(tmp_path, workdir)
    finally:
        os.umask(old)
    assert lane.work_root == workdir
    assert _mode(workdir) == WORK_ROOT_MODE
    for above in (workdir.parent, workdir.parent.parent, tmp_path / "made"):
        assert _mode(above) == 0o755, above


def test_a_workdir_of_spoolds_own_that_anyone_writes_is_closed_or_refused(tmp_path: Path) -> None:
    """spoold's own: jobs of users of their own get the mode spoold sets (1733); jobs that
    run as spoold itself (it cannot switch users) get no mode chosen for them: refused."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    workdir.chmod(0o777)
    with pytest.raises(ConfigError, match=r"is mode 0777: .*chmod go-w"):
        _lane(tmp_path, workdir, switching=False)
    assert _mode(workdir) == 0o777
    _lane(tmp_path, workdir, switching=True)
    assert _mode(workdir) == WORK_ROOT_MODE


def test_root_trusts_the_work_root_of_the_spools_owner(tmp_path: Path) -> None:
    """Root's ``spoold exec`` on a daemon's spool (the package's: spool and work root are the
    daemon user's): that user holds every record of the spool already. The work root is
    used as it is, not made root's."""
    config = Config(spool=tmp_path / "spool", workdir=_theirs(tmp_path / "work", WORK_ROOT_MODE))
    spool = Spool(config.spool)
    spool.init()
    os.chown(config.spool, OTHER, OTHER)
    lane = Lane.from_config(config, spool.jobs.work_root, switching=True)
    assert lane.work_root == config.workdir
    assert (_mode(lane.work_root), lane.work_root.stat().st_uid) == (WORK_ROOT_MODE, OTHER)


# -- the default work root, in /tmp -------------------------------------------------------------


@pytest.fixture
def temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A /tmp of the test's own: root's, mode 1777, anyone may make an entry first."""
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    return shared


def test_the_default_work_root_squatted_by_another_user_is_refused(
    tmp_path: Path, temp_dir: Path
) -> None:
    """Another user made /tmp/spoold-work-0 first (mode 0777, say): root must not use it."""
    squatted = _theirs(temp_dir / f"spoold-work-{os.geteuid()}")
    with pytest.raises(ConfigError) as refused:
        _lane(tmp_path, None)
    message = str(refused.value)
    assert f"the work root {squatted} (workdir's default)" in message, message
    assert f"belongs to uid {OTHER}" in message, message
    assert f"rm -rf {squatted}" in message and "set workdir:" in message, message
    assert _mode(squatted) == 0o777 and squatted.stat().st_uid == OTHER


def test_a_link_planted_as_the_default_work_root_is_not_followed(
    tmp_path: Path, temp_dir: Path
) -> None:
    target = _theirs(tmp_path / "chosen-by-them")
    planted = temp_dir / f"spoold-work-{os.geteuid()}"
    planted.symlink_to(target)
    with pytest.raises(ConfigError, match=r"is not a directory .*follows no link"):
        _lane(tmp_path, None)
    assert planted.is_symlink(), "left as found"
    assert _mode(target) == 0o777 and target.stat().st_uid == OTHER, "its target untouched"
    assert list(target.iterdir()) == []


def test_the_default_work_root_is_made_spoolds_own(tmp_path: Path, temp_dir: Path) -> None:
    lane = _lane(tmp_path, None)
    root = temp_dir / f"spoold-work-{os.geteuid()}"
    assert lane.work_root == root
    assert (root.stat().st_uid, _mode(root)) == (os.geteuid(), WORK_ROOT_MODE)
    assert _lane(tmp_path, None).work_root == root, "found again at the next start"


# -- the probe, through the daemon ----------------------------------------------------------------


@pytest.mark.daemon
def test_a_root_daemon_refuses_to_start_on_a_work_root_of_another_user(
    spool_dir: Path, tmp_path: Path
) -> None:
    """The probe: `mkdir -m 0777 wdroot; chown 54321 wdroot`, `workdir: wdroot`. The daemon
    must not start: the owner could swap a running job's work dir for one of its own."""
    wdroot = _of_another_user(tmp_path)
    daemon = DaemonProcess(spool_dir, write_config(tmp_path / "c.yaml", spool_dir,
                                                   workdir=str(wdroot)))  # fmt: skip
    try:
        with pytest.raises(AssertionError, match="did not become ready"):
            daemon.start()
        log = daemon.log()
        assert f"refusing to run: key workdir: the work root {wdroot}" in log, log
        assert f"belongs to uid {OTHER}" in log and f"chown root {wdroot}" in log, log
        assert _mode(wdroot) == 0o777, "left as found"
    finally:
        daemon.kill()


@pytest.mark.daemon
def test_another_user_cannot_swap_a_running_jobs_work_dir(spool_dir: Path, tmp_path: Path) -> None:
    """The probe's attack against a work root spoold accepts: while job wd3 runs, the other
    user tries to move its work dir away and make one of its own under that name. It cannot,
    and the kept artifact is the job's."""
    where, go = tmp_path / "where", tmp_path / "go"
    workdir = tmp_path / "work"
    daemon = DaemonProcess(spool_dir, write_config(tmp_path / "c.yaml", spool_dir,
                                                   workdir=str(workdir)))  # fmt: skip
    daemon.start()
    try:
        commands = ["echo JOB-DATA > data.txt", f"pwd > {where}",
                    f"until [ -e {go} ]; do sleep 0.05; done"]  # fmt: skip
        drop(spool_dir, "wd3.yaml", local_job("wd3", commands, artifacts=[{"path": "data.txt"}]))
        wait_for(lambda: where.exists() and where.read_text().strip(), what="wd3 to start")
        own = where.read_text().strip()
        assert Path(own).parent == workdir, own
        attack = (f'mv "{own}" "{workdir}/stolen" && mkdir "{own}" && '
                  f'echo ATTACKER-DATA > "{own}/data.txt"')  # fmt: skip
        tried = subprocess.run(
            ["setpriv", f"--reuid={OTHER}", f"--regid={OTHER}", "--clear-groups",
             "sh", "-c", attack],
            capture_output=True, text=True, timeout=60, check=False, cwd="/",
        )  # fmt: skip
        assert tried.returncode != 0, f"the swap succeeded: {tried.stdout}{tried.stderr}"
        go.touch()
        directory, status = wait_finished(spool_dir, "wd3")
        assert (directory, status["state"]) == ("done", "succeeded"), status
        kept = spool_dir / "done" / "wd3" / "artifacts" / "data.txt"
        assert kept.read_text() == "JOB-DATA\n"
    finally:
        go.touch()
        daemon.kill()
