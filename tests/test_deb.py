"""The Debian package (issue 9): `make deb` builds it, and it installs, runs, reinstalls,
upgrades and purges on this machine.

One test function: every step drives dpkg, which must never run twice at once under
pytest-xdist. It needs root (it installs the package system-wide); under CI=true it installs
what it lacks and never skips. It leaves the machine as it found it: the package purged and,
when they did not exist before, the spoold user and groups removed.
"""

from __future__ import annotations

import glob
import grp
import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPOOL = Path("/var/spool/spoold")
SPOOL_DIRECTORIES = (
    "incoming", "pending", "running", "done", "failed", "rejected", "scheduled", "outbox", "tmp",
)  # fmt: skip
CI = os.environ.get("CI") == "true"
APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


def run(
    *args: str, check: bool = True, timeout: float = 600, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env=APT_ENV, cwd=cwd, check=False
    )
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def installed(package: str) -> bool:
    proc = run("dpkg-query", "-W", "-f", "${Status}", package, check=False)
    return proc.stdout.strip() == "install ok installed"


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def apt_install(*packages: str) -> None:
    run("apt-get", "update", "-qq")
    run("apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages)


def check_spool_tree() -> None:
    """The tree of `spoold init`, owned by spoold; only incoming/ writable by a group."""
    uid = pwd.getpwnam("spoold").pw_uid
    submit = grp.getgrnam("spoold-submit").gr_gid
    info = SPOOL.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (uid, submit, 0o750)
    for name in SPOOL_DIRECTORIES:
        info = (SPOOL / name).stat()
        mode = stat.S_IMODE(info.st_mode)
        assert info.st_uid == uid, name
        assert not mode & stat.S_IWOTH, name
        if name == "incoming":
            assert (info.st_gid, mode) == (submit, 0o3770)
        elif name == "tmp":  # closed to submitters; setgid: job directories made there are theirs
            assert (info.st_gid, mode) == (submit, 0o2700)
        elif name == "outbox":
            assert stat.S_IMODE(info.st_mode) & 0o077 == 0o050 and info.st_gid != submit, name
        else:  # submitters list and pass: they read status.json and log, masked of secrets
            assert (info.st_gid, mode) == (submit, 0o750), name
    assert "spoold-submit" in run("id", "-nG", "spoold").stdout.split()
    assert Path("/usr/share/bash-completion/completions/spoold").is_file()
    # spoold's own check, as the service's user sees it.
    proc = run(
        "runuser", "-u", "spoold", "--", "/usr/lib/spoold/venv/bin/python3", "-I", "-c",
        "from pathlib import Path; from spoold.core.spool import Spool; "
        "print(Spool(Path('/var/spool/spoold')).unsafe_permissions())",
    )  # fmt: skip
    assert proc.stdout.strip() == "[]"


def check_submitters() -> None:
    """A member of spoold-submit (and no other group) can submit into the packaged spool;
    anyone else cannot."""
    with tempfile.TemporaryDirectory() as name:  # pytest's tmp_path is root's alone
        shared = Path(name)
        shared.chmod(0o755)
        job = shared / "submitted.yaml"
        job.write_text('job_id: submitted\nexecutor: local\nproduct:\n  commands: ["true"]\n')
        job.chmod(0o644)
        nobody = pwd.getpwnam("nobody").pw_uid
        submit = grp.getgrnam("spoold-submit").gr_gid
        outsider_gid = grp.getgrnam("nogroup").gr_gid
        as_user = ("setpriv", f"--reuid={nobody}", "--clear-groups")
        cmd = ("/usr/bin/spoold", "submit", "--spool", str(SPOOL), str(job))
        outsider = run(*as_user, f"--regid={outsider_gid}", *cmd, cwd=shared, check=False)
        assert outsider.returncode != 0
        assert "Permission denied" in outsider.stderr, outsider.stderr
        run(*as_user, f"--regid={submit}", *cmd, cwd=shared)
        # A submitter reads the spool's summary: no traceback, no "no job" for what it may see.
        summary = run(*as_user, f"--regid={submit}", "/usr/bin/spoold", "status", "--spool",
                      str(SPOOL), cwd=shared, check=False)  # fmt: skip
        assert summary.returncode == 0, summary.stderr
        assert "Traceback" not in summary.stderr
    placed = list((SPOOL / "incoming").iterdir())
    assert [p.name for p in placed] == ["submitted.yaml"]
    assert placed[0].stat().st_gid == submit  # incoming/ is setgid
    placed[0].unlink()


def bumped_copy(deb: Path, workdir: Path) -> Path:
    """The same package with a higher version: the upgrade path, without a second build."""
    tree = workdir / "bumped"
    run("dpkg-deb", "-R", str(deb), str(tree))
    control = tree / "DEBIAN" / "control"
    lines = control.read_text().splitlines()
    version = next(line.split(": ", 1)[1] for line in lines if line.startswith("Version: "))
    new = version + "+test1"
    control.write_text(
        "\n".join(f"Version: {new}" if line.startswith("Version: ") else line for line in lines)
        + "\n"
    )
    out = workdir / f"spoold_{new}.deb"
    run("dpkg-deb", "--root-owner-group", "-b", str(tree), str(out))
    return out


@pytest.mark.timeout(900)
def test_debian_package(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        if CI:
            pytest.fail("the Debian package test needs root and apt-get under CI")
        pytest.skip("needs root and apt-get (it installs the package)")
    if installed("spoold"):
        if CI:
            pytest.fail("a spoold package is installed already: the test would purge it")
        pytest.skip("a spoold package is installed already: the test would purge it")
    if shutil.which("systemd-analyze") is None:
        apt_install("systemd")
    had = {
        "user": user_exists("spoold"),
        "spoold": group_exists("spoold"),
        "spoold-submit": group_exists("spoold-submit"),
    }

    # Build (make deb installs its own build tools and fails on any lintian error).
    run("make", "deb", timeout=800)
    debs = sorted(glob.glob(str(ROOT / "dist" / "spoold_*.deb")))
    assert len(debs) == 1, debs
    deb = Path(debs[0])
    lintian = (ROOT / "build" / "deb" / "lintian.txt").read_text()
    assert not [line for line in lintian.splitlines() if line.startswith("E:")], lintian

    try:
        run("apt-get", "install", "-y", "-qq", str(deb))
        assert installed("spoold")

        # The installed command, against a spool of its own.
        assert os.path.realpath("/usr/bin/spoold") == "/usr/bin/spoold"
        version = run("/usr/bin/spoold", "--version").stdout
        assert "0.1.0" in version
        spool = tmp_path / "spool"
        run("/usr/bin/spoold", "init", "--spool", str(spool))
        job = tmp_path / "job.yaml"
        job.write_text(
            "job_id: debtest\nexecutor: local\nproduct:\n  commands:\n"
            "    - echo packaged-spoold-ran\n"
        )
        run("/usr/bin/spoold", "exec", "--spool", str(spool), str(job), cwd=tmp_path)
        status = json.loads(
            run("/usr/bin/spoold", "status", "--spool", str(spool), "--json", "debtest").stdout
        )
        assert status["state"] == "succeeded", status
        log = run("/usr/bin/spoold", "logs", "--spool", str(spool), "debtest").stdout
        assert "packaged-spoold-ran" in log

        # The unit, the man page, the conffile, the users and the spool.
        verify = run("systemd-analyze", "verify", "/lib/systemd/system/spoold.service", check=False)
        unit_lines = [x for x in verify.stderr.splitlines() if "spoold" in x]
        assert verify.returncode == 0 and not unit_lines, verify.stderr
        unit = Path("/lib/systemd/system/spoold.service").read_text()
        for setting in ("User=spoold", "ProtectSystem=strict", "ReadWritePaths=/var/spool/spoold",
                        "NoNewPrivileges=yes", "PrivateTmp=yes", "ProtectHome=yes"):  # fmt: skip
            assert setting in unit.splitlines(), setting
        assert Path("/usr/share/man/man1/spoold.1.gz").is_file()
        conffiles = run("dpkg-query", "-W", "-f", "${Conffiles}", "spoold").stdout
        assert "/etc/spoold/config.yaml" in conffiles
        assert "spool: /var/spool/spoold" in Path("/etc/spoold/config.yaml").read_text()
        assert pwd.getpwnam("spoold").pw_gid == grp.getgrnam("spoold").gr_gid
        assert group_exists("spoold-submit")
        check_spool_tree()
        check_submitters()

        # Installing the same version again keeps the admin's config and the tree.
        with Path("/etc/spoold/config.yaml").open("a") as config:
            config.write("# changed by test_deb\n")
        run("apt-get", "install", "-y", "-qq", "--reinstall", str(deb))
        assert "# changed by test_deb" in Path("/etc/spoold/config.yaml").read_text()
        check_spool_tree()

        # An upgrade to a higher version.
        bumped = bumped_copy(deb, tmp_path)
        run("apt-get", "install", "-y", "-qq", "-o", "Dpkg::Options::=--force-confold", str(bumped))
        assert "+test1" in run("dpkg-query", "-W", "-f", "${Version}", "spoold").stdout
        assert "# changed by test_deb" in Path("/etc/spoold/config.yaml").read_text()
        check_spool_tree()
        run("/usr/bin/spoold", "status", "--spool", str(spool), "debtest")
    finally:
        run("apt-get", "purge", "-y", "-qq", "spoold", check=False)
        gone_ok = not installed("spoold")
        leftovers = [p for p in ("/etc/spoold", str(SPOOL), "/usr/lib/spoold", "/usr/bin/spoold",
                                 "/lib/systemd/system/spoold.service",
                                 "/etc/systemd/system/multi-user.target.wants/spoold.service")
                     if os.path.lexists(p)]  # fmt: skip
        # Debian policy: purging keeps the system user and groups; the test removes its own.
        kept_user = user_exists("spoold")
        if not had["user"] and kept_user:
            run("deluser", "--system", "--quiet", "spoold", check=False)
        for group in ("spoold", "spoold-submit"):
            if not had[group] and group_exists(group):
                run("delgroup", "--system", "--quiet", group, check=False)
    assert gone_ok
    assert leftovers == []
    assert kept_user
