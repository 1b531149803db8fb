"""What a submitter may read, tried as a real unprivileged user (made here, as root) against a
spool laid out as the Debian package lays it out: every job's status and log, nothing else;
and a user who may not look is told so, never "no job"."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from spoold.core.spool import Spool
from tests.test_cli_status import make_job

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("useradd") is None or shutil.which("runuser") is None,
    reason="needs root, useradd and runuser to try it as other users",
)

STATE_DIRS = ("pending", "running", "done", "failed", "rejected", "scheduled")


@dataclass(frozen=True)
class Users:
    group: str  # the submitters' group (spoold-submit on the package)
    submitter: str
    outsider: str


@pytest.fixture
def users() -> Iterator[Users]:
    tag = f"sdt{os.getpid() % 100000}{os.urandom(2).hex()}"
    made = Users(f"{tag}g", f"{tag}s", f"{tag}o")
    subprocess.run(["groupadd", "--system", made.group], check=True)
    try:
        for name, extra in ((made.submitter, ["-G", made.group]), (made.outsider, [])):
            subprocess.run(["useradd", "--system", "-M", "-U", "-s", "/usr/sbin/nologin",
                            *extra, name], check=True)  # fmt: skip
        yield made
    finally:
        for name in (made.submitter, made.outsider):
            subprocess.run(["userdel", name], check=False, capture_output=True)
        subprocess.run(["groupdel", made.group], check=False, capture_output=True)


@pytest.fixture
def spool_root() -> Iterator[Path]:
    top = Path(tempfile.mkdtemp(prefix="spoold-access-"))  # pytest's tmp_path is root's alone
    top.chmod(0o755)
    root = top / "spool"
    Spool(root).init()
    yield root
    shutil.rmtree(top, ignore_errors=True)


def lay_out_as_the_package(root: Path, group: str) -> None:
    """packaging/debian/postinst's modes (root stands in for the spoold user)."""
    gid = int(subprocess.run(["getent", "group", group], capture_output=True, text=True,
                             check=True).stdout.split(":")[2])  # fmt: skip
    modes = {"": 0o750, "incoming": 0o3770, "tmp": 0o2700, **dict.fromkeys(STATE_DIRS, 0o750)}
    for name, mode in modes.items():
        os.chown(root / name, 0, gid)
        (root / name).chmod(mode)


def as_user(user: str, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``spoold ARGS --spool ROOT`` as ``user`` would type it."""
    command, *rest = args
    return subprocess.run(
        ["runuser", "-u", user, "--", sys.executable, "-m", "spoold", command,
         "--spool", str(root), *rest],
        capture_output=True, text=True, timeout=60, check=False, cwd=root.parent,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )  # fmt: skip


def test_a_submitter_reads_status_and_logs_in_the_packaged_layout(
    users: Users, spool_root: Path
) -> None:
    lay_out_as_the_package(spool_root, users.group)
    make_job(spool_root, "waiting")
    make_job(spool_root, "over", "succeeded", exit_code=0, log="2026-12-02T10:00:01Z INFO hi\n")
    summary = as_user(users.submitter, spool_root, "status")
    assert summary.returncode == 0, summary.stderr
    assert "pending/    1" in summary.stdout and "done/       1" in summary.stdout, summary.stdout
    assert "Traceback" not in summary.stderr
    listed = as_user(users.submitter, spool_root, "list")
    assert listed.returncode == 0, listed.stderr
    assert "waiting" in listed.stdout and "over" in listed.stdout, listed.stdout
    shown = as_user(users.submitter, spool_root, "status", "over")
    assert shown.returncode == 0 and "state:           succeeded" in shown.stdout, shown.stderr
    log = as_user(users.submitter, spool_root, "logs", "over")
    assert log.returncode == 0 and "INFO hi" in log.stdout, log.stderr
    waited = as_user(users.submitter, spool_root, "wait", "over")
    assert waited.returncode == 0 and "job over succeeded" in waited.stdout, waited.stderr
    # What a submitter may not do is said as such: the state directories are spoold's.
    cancel = as_user(users.submitter, spool_root, "cancel", "waiting")
    assert cancel.returncode == 2, cancel.stderr
    assert "Permission denied" in cancel.stderr and "may not do this here" in cancel.stderr
    assert "Traceback" not in cancel.stderr


def test_whoever_may_not_look_is_told_so_never_no_job(users: Users, spool_root: Path) -> None:
    """The layout before issue 16 (state directories spoold:spoold 0750): a submitter passes the
    spool's root but may not look into pending/ and the rest; an outsider not even that."""
    lay_out_as_the_package(spool_root, users.group)
    for name in STATE_DIRS:
        os.chown(spool_root / name, 0, 0)
    make_job(spool_root, "hidden")
    shown = as_user(users.submitter, spool_root, "status", "hidden")
    assert shown.returncode == 2, shown.stderr
    assert "no job" not in shown.stderr, shown.stderr
    assert (
        f"user {users.submitter}" in shown.stderr and "may not look into pending/" in shown.stderr
    )
    assert "owned by root:root, mode 0750" in shown.stderr, shown.stderr
    log = as_user(users.submitter, spool_root, "logs", "hidden")
    assert log.returncode == 2 and "may not look into pending/" in log.stderr, log.stderr
    listed = as_user(users.submitter, spool_root, "list")
    assert listed.returncode == 2 and "cannot list jobs" in listed.stderr, listed.stderr
    summary = as_user(users.submitter, spool_root, "status")
    assert summary.returncode == 0, summary.stderr
    assert "pending/    ?" in summary.stdout and "may not look into" in summary.stdout
    for command in (("status", "hidden"), ("status",), ("list",)):
        outsider = as_user(users.outsider, spool_root, *command)
        assert outsider.returncode == 2, (command, outsider.stderr)
        assert "may not enter the spool" in outsider.stderr and "no job" not in outsider.stderr
        assert "Traceback" not in outsider.stderr


def test_a_submitter_reads_no_job_file_and_no_artifact(users: Users, spool_root: Path) -> None:
    """job.yaml may hold inline secrets, artifacts are unmasked output: spoold's alone."""
    lay_out_as_the_package(spool_root, users.group)
    job = make_job(spool_root, "private", "succeeded", exit_code=0)
    (job.path / "artifacts" / "out.txt").write_text("unmasked\n")

    def readable(path: Path) -> bool:
        probe = subprocess.run(["runuser", "-u", users.submitter, "--", "cat", str(path)],
                               capture_output=True, check=False)  # fmt: skip
        return probe.returncode == 0

    assert readable(job.path / "status.json") and readable(job.path / "log")
    assert not readable(job.path / "job.yaml")
    assert not readable(job.path / "artifacts" / "out.txt")
