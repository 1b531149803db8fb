"""The jobs' own lane, tried as a hostile submitter would: a job reaches its own work dir and
the secrets its file references, and nothing of the spool, secrets_dir, another job or the
daemon. Each attempt is denied; the daemon and the records are unharmed."""

from __future__ import annotations

import builtins
import io
import json
import logging
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from spoold.core import procfs
from spoold.core.clock import SystemClock
from spoold.core.config import Config
from spoold.core.errors import ConfigError
from spoold.core.spool import Spool
from spoold.intake.incoming import Accepted, Intake
from spoold.intake.validation import job_validator
from spoold.run.lane import WORK_ROOT_MODE, Lane, default_job_users
from spoold.run.launcher import Launcher
from spoold.run.registry import ExecutorRegistry
from spoold.run.worker import JobRunner
from tests.harness import (
    DaemonProcess,
    drop,
    ensure_account,
    local_job,
    needs_root,
    wait_finished,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.daemon

SECOND_USER = "spoold-job-t2"
CI = os.environ.get("CI") == "true"
LOGGER = logging.getLogger("spoold.test")


@pytest.fixture(scope="session")
def second_job_user() -> Iterator[str]:
    """A second job user, so that two jobs running at once run as two users."""
    yield ensure_account(SECOND_USER)


def _secrets(tmp_path: Path, **values: str) -> Path:
    directory = tmp_path / "secrets"
    directory.mkdir(mode=0o700)
    for name, value in values.items():
        path = directory / name
        path.write_text(value)
        path.chmod(0o600)
    return directory


def _log(spool: Path, job_id: str) -> str:
    found = job_state_dir(spool, job_id)
    return (found / "log").read_text()


def job_state_dir(spool: Path, job_id: str) -> Path:
    for state in ("done", "failed", "running", "pending"):
        if (spool / state / job_id).is_dir():
            return spool / state / job_id
    raise AssertionError(f"no job {job_id}")


@pytest.fixture(scope="session")
def default_second_job_user() -> str:
    """The default config's second worker slot's account (``make job-user`` makes it)."""
    name = default_job_users(2)[1]
    try:
        pwd.getpwnam(name)
    except KeyError:
        if CI:
            pytest.fail(f"{name} is missing: the set-up (make job-user) makes it")
    return ensure_account(name, "--gid", "spoold-job")


@pytest.mark.parametrize("users", ["named", "default"])
def test_hostile_jobs_reach_nothing_but_their_own(
    spool_dir: Path, tmp_path: Path, users: str, request: pytest.FixtureRequest
) -> None:
    """Two jobs at once, one per worker slot: the second tries all it can on the first, the
    spool and the daemon. With job_user naming a user per slot, or none (each slot's default
    account): jobs running side by side reach nothing of each other's (SPEC 13)."""
    secrets = _secrets(tmp_path, MINE="mine-7f3a", OTHER="other-9c1d")
    if users == "named":
        second_job_user = request.getfixturevalue("second_job_user")
        chosen: dict[str, Any] = {"job_user": ["spoold-job", second_job_user]}
    else:
        second_job_user = request.getfixturevalue("default_second_job_user")
        chosen = {}
    config = write_config(tmp_path / "c.yaml", spool_dir, secrets_dir=str(secrets), **chosen)
    daemon = DaemonProcess(spool_dir, config)
    daemon.start()
    assert daemon.process is not None
    found = tmp_path / "found"  # where the jobs tell the test what they saw
    try:
        # Two jobs at once, one per slot and so one per job user: the second looks into the
        # first one's work dir, whose path the first one tells it.
        holder = tmp_path / "holder-dir"
        drop(spool_dir, "holder.yaml", local_job("holder", [
            "echo private > mine.txt",
            f"echo $$ > {tmp_path / 'holder-pid'}",
            f"pwd > {holder}",
            f"until [ -e {tmp_path / 'done-looking'} ]; do sleep 0.05; done",
        ]))  # fmt: skip
        wait_for(holder.exists, what="the first job to start")
        attacks = {
            "whoami": "id -un",
            "other-secret": f"cat {secrets}/OTHER",
            "list-secrets": f"ls {secrets}",
            "own-secret": 'printf %s "$SPOOLD_SECRET_MINE" | tr a-z A-Z',
            "status": 'echo forged > "$SPOOLD_JOB_DIR/status.json"',
            "remove-record": 'rm -rf "$SPOOLD_JOB_DIR"',
            "move-record": 'mv "$SPOOLD_JOB_DIR" "$SPOOLD_JOB_DIR/../../done/x"',
            "forge": 'mkdir "$SPOOLD_JOB_DIR/../../pending/forged"',
            "spool": f"ls {spool_dir}/done",
            "other-workdir": f'cat "$(cat {holder})/mine.txt"',
            # What a job user shared by both would allow: reading the other's environment
            # (its secrets), and ending it.
            "other-environ": f"cat /proc/$(cat {tmp_path / 'holder-pid'})/environ",
            "signal-other": f"kill -STOP $(cat {tmp_path / 'holder-pid'})",
            "signal-daemon": f"kill -TERM {daemon.process.pid}",
        }
        script = [f'out=$({command} 2>&1); rc=$?; echo "{name}:" $out "rc=$rc" >> {found}'
                  for name, command in attacks.items()]  # fmt: skip
        script.append("echo ${secret:MINE} >/dev/null")  # it references MINE, and only MINE
        drop(spool_dir, "hostile.yaml", local_job("hostile", script))
        directory, status = wait_finished(spool_dir, "hostile")
        (tmp_path / "done-looking").touch()
        assert (directory, status["state"]) == ("done", "succeeded"), status
        seen = dict(line.split(": ", 1) for line in found.read_text().splitlines())
        assert seen["whoami"].split()[0] == second_job_user, seen  # the second slot's user
        assert seen["own-secret"].split()[0] == "MINE-7F3A", "its own secret, handed over"
        for name in ("other-secret", "list-secrets", "status", "remove-record", "move-record",
                     "forge", "spool", "other-workdir", "signal-daemon", "other-environ",
                     "signal-other"):  # fmt: skip
            assert not seen[name].endswith(" rc=0"), f"{name} was allowed: {seen[name]}"
        assert "other-9c1d" not in found.read_text()
        assert "private" not in seen["other-workdir"]
        # The daemon and the records are unharmed.
        assert daemon.alive
        assert not (spool_dir / "pending" / "forged").exists()
        assert not (spool_dir / "done" / "x").exists()
        directory, status = wait_finished(spool_dir, "holder")
        assert (directory, status["state"]) == ("done", "succeeded"), status
        assert "mine.txt" not in os.listdir(tmp_path), "work dirs are not in the test's tree"
    finally:
        daemon.kill()


def test_jobs_run_as_root_only_when_the_config_says_so(spool_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ids"
    daemon = DaemonProcess(spool_dir, write_config(tmp_path / "c.yaml", spool_dir))
    try:
        daemon.start()
        drop(
            spool_dir,
            "a.yaml",
            local_job("a", f"id -u >> {out}", hooks={"post_run": f"id -u >> {out}"}),
        )
        wait_finished(spool_dir, "a")
        daemon.stop()
        daemon.config = write_config(tmp_path / "root.yaml", spool_dir, job_user="root")
        daemon.start()
        drop(spool_dir, "b.yaml", local_job("b", f"id -u >> {out}"))
        wait_finished(spool_dir, "b")
        job_uids = {str(pwd.getpwnam(user).pw_uid) for user in default_job_users(2)}
        job, hook, as_root = out.read_text().split()
        assert job == hook and job in job_uids and as_root == "0", out.read_text()
        assert "jobs run as root (job_user: root)" in daemon.log()
    finally:
        daemon.kill()


def test_a_missing_job_user_stops_spoold_at_start(tmp_path: Path) -> None:
    config = Config(spool=tmp_path / "spool", job_users=("no-such-user-x",))
    spool = Spool(config.spool)
    spool.init()
    with pytest.raises(ConfigError, match="key job_user: there is no user 'no-such-user-x'"):
        Lane.from_config(config, spool.jobs.work_root, switching=True)


def test_spoold_says_once_what_jobs_reach_when_it_cannot_switch_users(tmp_path: Path) -> None:
    config = Config(spool=tmp_path / "spool")
    spool = Spool(config.spool)
    spool.init()
    lane = Lane.from_config(config, spool.jobs.work_root, switching=False)
    assert lane.user_for("0", None) is None
    [note] = lane.notes
    assert "cannot switch users" in note and "secrets_dir" in note


def test_the_work_root_is_unlistable_and_reachable(tmp_path: Path) -> None:
    root = tmp_path / "work"
    config = Config(spool=tmp_path / "spool", workdir=root)
    Spool(config.spool).init()
    Lane.from_config(config, lambda: root, switching=True)
    assert root.stat().st_mode & 0o7777 == WORK_ROOT_MODE


def test_secrets_dir_a_job_user_could_read_is_refused(tmp_path: Path) -> None:
    secrets = _secrets(tmp_path, A="a")
    secrets.chmod(0o755)
    config = Config(spool=tmp_path / "spool", secrets_dir=secrets)
    Spool(config.spool).init()
    with pytest.raises(ConfigError, match="key secrets_dir: the job user spoold-job may read"):
        Lane.from_config(config, lambda: tmp_path / "w", switching=True)


def test_spoolds_own_user_as_the_job_user_is_refused_when_it_may_switch(tmp_path: Path) -> None:
    """The package's daemon is not root and may switch users: a job_user that is its own user
    would let jobs reach the spool, secrets_dir and the daemon. It refuses to start, saying so."""
    needs_root()
    script = textwrap.dedent(f"""\
        from pathlib import Path
        from spoold.core.config import Config
        from spoold.core.errors import ConfigError
        from spoold.run.lane import Lane
        # A work root it cannot make: were the user let through, nothing would be made.
        config = Config(spool=Path({str(tmp_path / "spool")!r}), job_users=("daemon",),
                        workdir=Path("/nonexistent/spoold-work"))
        try:
            Lane.from_config(config, lambda: Path("/nonexistent"), switching=True)
        except ConfigError as exc:
            print("REFUSED", exc)
        else:
            print("ACCEPTED")
        """)
    result = subprocess.run(
        ["setpriv", "--reuid=daemon", "--regid=daemon", "--clear-groups", sys.executable, "-c",
         script],
        capture_output=True, text=True, timeout=60, check=False, cwd="/",
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("REFUSED key job_user: daemon is spoold's own user"), (
        result.stdout
    )


def _status_reads(monkeypatch: pytest.MonkeyPatch, ambient: str | None) -> list[str]:
    """Count this process's reads of /proc/self/status (``ambient``: what its CapAmb line
    says instead of the truth)."""
    reads: list[str] = []
    real_open = builtins.open

    def counting_open(path: object, *args: object, **kwargs: object) -> object:
        if str(path) == "/proc/self/status":
            reads.append(str(path))
            if ambient is not None:
                return io.StringIO(f"Name:\tpython\nCapAmb:\t{ambient}\n")
        return real_open(path, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(builtins, "open", counting_open)
    return reads


def test_ambient_capabilities_once_dropped_are_not_read_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A supervisor drops them first; nothing raises them again, so each job it starts as
    its user need not read /proc to know there are none."""
    monkeypatch.setattr(procfs._Dropped, "ambient", False)
    reads = _status_reads(monkeypatch, ambient=None)
    assert procfs.ambient_capabilities() == 0
    assert len(reads) == 1, "read while not dropped"
    procfs.drop_ambient_capabilities()
    before = len(reads)
    assert procfs.ambient_capabilities() == 0
    assert procfs.ambient_clearer() is None
    assert len(reads) == before, "known to be none after the drop"


def test_a_drop_of_ambient_capabilities_that_failed_is_not_taken_for_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If the drop did not take (the prctl failed), every later start looks again, and
    clears them in the child."""
    monkeypatch.setattr(procfs._Dropped, "ambient", False)
    reads = _status_reads(monkeypatch, ambient="0000000000000080")  # CAP_SETUID, ambient
    monkeypatch.setattr(procfs, "ambient_clearer", lambda: lambda: -1)  # a failing prctl
    procfs.drop_ambient_capabilities()
    before = len(reads)
    assert procfs.ambient_capabilities() == 0x80
    assert len(reads) == before + 1, "still read: the drop is not remembered as done"


_JOB_AS_A_DAEMON_WITH_CAPABILITIES = """\
import ctypes, io, json, os, sys, threading
from pathlib import Path
from spoold.core import procfs
from spoold.core.clock import SystemClock
from spoold.core.joblog import JobLog
from spoold.run.lane import may_switch_users
from spoold.run.process import RunAs, run_process
assert may_switch_users()
if {drop}:
    procfs.drop_ambient_capabilities()  # what a supervisor does first
def mine():
    status = Path("/proc/self/status").read_text()
    caps = dict(line.split(":\t") for line in status.splitlines() if line.startswith("Cap"))
    return [os.getresuid(), os.getresgid(), sorted(os.getgroups()), caps["CapEff"].strip()]
before = mine()
out = io.BytesIO()
log = JobLog(out, SystemClock())
run_process(["grep", "^Cap\\|^Uid\\|^Gid\\|^Groups", "/proc/self/status"], cwd=Path("/"),
            env={{}}, log=log, clock=SystemClock(), timeout=10, kill_grace=1,
            cancel=threading.Event(), run_as=RunAs.lookup("spoold-job"),
            switch_in_place={in_place})
after = mine()
dumpable = ctypes.CDLL(None).prctl(3, 0, 0, 0, 0) == 1  # PR_GET_DUMPABLE
sys.stdout.write(out.getvalue().decode())
print("PARENT", json.dumps({{"before": before, "after": after, "dumpable": dumpable}}))
"""


@pytest.mark.parametrize(
    ("in_place", "drop"),
    [(False, False), (True, False), (True, True)],
    ids=["forked", "in-place-refused-with-ambient-capabilities", "in-place-as-a-supervisor"],
)
def test_a_job_started_by_a_daemon_with_capabilities_gets_none_of_them(
    in_place: bool, drop: bool
) -> None:
    """The package's daemon is not root: it holds CAP_SETUID, CAP_SETGID and CAP_KILL as
    ambient capabilities. A switch between two uids that are not root keeps them; the job
    must start with none, or it could make itself root. Started by a supervisor (which drops
    its ambient capabilities, then becomes the job's user for the start), the job holds the
    user's ids everywhere, and the supervisor is itself again after, capabilities and all."""
    script = _JOB_AS_A_DAEMON_WITH_CAPABILITIES.format(in_place=in_place, drop=drop)
    caps = "+setuid,+setgid,+kill"
    result = subprocess.run(
        ["setpriv", "--reuid=daemon", "--regid=daemon", "--clear-groups", f"--inh-caps={caps}",
         f"--ambient-caps={caps}", sys.executable, "-c", script],
        capture_output=True, text=True, timeout=60, check=False, cwd="/",
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    found = dict(re.findall(r"(Cap\w+):\s+([0-9a-f]+)", result.stdout))
    assert set(found) >= {"CapPrm", "CapEff", "CapAmb", "CapInh"}, result.stdout
    for name in ("CapPrm", "CapEff", "CapAmb"):
        assert int(found[name], 16) == 0, f"the job holds {name} {found[name]}"
    job = pwd.getpwnam("spoold-job")
    ids = dict(re.findall(r"(Uid|Gid):\s+([\d\s]+?)\n", result.stdout))
    assert ids["Uid"].split() == [str(job.pw_uid)] * 4, result.stdout
    assert ids["Gid"].split() == [str(job.pw_gid)] * 4, result.stdout
    parent = json.loads(result.stdout.split("PARENT ", 1)[1])
    assert parent["after"] == parent["before"], "the starting process is not itself again"
    assert int(parent["after"][3], 16) != 0, "it lost its own capabilities"
    assert parent["dumpable"], "its /proc entries are no longer its own user's"


def test_a_supervisor_switched_in_place_starts_each_job_by_vfork(tmp_path: Path) -> None:
    """The point of the in-place switch: a job user's process started without copying the
    starting process's page tables. Seen from outside: the parent takes no copy-on-write
    faults for its pages after the start (a fork makes it fault on every page it writes)."""
    script = textwrap.dedent("""\
        import io, resource, signal, sys, threading
        from pathlib import Path
        from spoold.core.clock import SystemClock
        from spoold.core.joblog import JobLog
        from spoold.run.process import RunAs, clean_signal_state, run_process
        # What a shell's background job starts with (CI's, seen): a child would need a step
        # between fork and exec to reset them. A supervisor cleans them first.
        for ignored in (signal.SIGINT, signal.SIGQUIT):
            signal.signal(ignored, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])
        clean_signal_state()
        ballast = [bytearray(4096) for _ in range(4000)]  # 16 MB the parent writes after
        user = RunAs.lookup("spoold-job")
        def faults(in_place):
            run = lambda: run_process(["true"], cwd=Path("/"), env={}, log=JobLog(io.BytesIO(),
                SystemClock()), clock=SystemClock(), timeout=10, kill_grace=1,
                cancel=threading.Event(), run_as=user, switch_in_place=in_place)
            run()
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(5):
                run()
                for page in ballast:
                    page[0] = 1
            return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
        print(faults(False), faults(True))
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
        check=False, cwd="/", env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    forked, in_place = map(float, result.stdout.split())
    assert forked > 4000, f"a fork should make the parent fault on its ballast: {forked}"
    assert in_place < 400, f"switched in place, the start should not fault it: {in_place}"


def file_work(root: Path) -> None:
    """A job that leaves a read-only artifact dir in its work dir, run in ``root``: its work
    dir made, its artifacts opened and its work dir removed (read-only parts too)."""
    spool = Spool(root / "spool")
    spool.init()
    config = Config(spool=spool.root, workdir=root / "work", hostname="here", worker_id="w")
    registry = ExecutorRegistry.from_entry_points()
    clock = SystemClock()
    intake = Intake(spool, job_validator(registry), clock, max_file_size=1 << 20, settle_time=0,
                    on_accepted=lambda job, document: None, logger=LOGGER)  # fmt: skip
    launcher = Launcher(chores_here=False)
    try:
        runner = JobRunner(spool, registry, config, clock, LOGGER, launcher=launcher)
        document = local_job("art", ["mkdir out", "echo made > out/r.txt", "chmod 0400 out/r.txt",
                                     "chmod 0500 out", "id -un > who.txt"],
                             artifacts=[{"path": "out", "type": "dir"}, {"path": "who.txt"}])  # fmt: skip
        (spool.dir("incoming") / "art.yaml").write_text(yaml.safe_dump(document))
        accepted = intake.offer("art.yaml", complete=True)
        assert isinstance(accepted, Accepted), accepted
        job = runner.claim("art")
        assert job is not None
        final = runner.run(job)
        assert final is not None and final.directory == "done", final
        kept = final.path / "artifacts"
        assert (kept / "out" / "r.txt").read_text() == "made\n"
        assert (kept / "who.txt").read_text() == "spoold-job\n"
        assert list((root / "work").iterdir()) == [], "removed, read-only parts too"
    finally:
        launcher.close()


def test_the_job_users_file_work_done_as_that_user(tmp_path: Path) -> None:
    """What the package's daemon does: the work dir made, the artifacts opened and the work
    dir removed by forks that became the job user, not by spoold's own user. Run by root here,
    which may read and remove anything: see the next test for the daemon that may not."""
    file_work(tmp_path)


def test_the_job_users_file_work_needs_no_more_than_the_packages_capabilities() -> None:
    """The same job under the package's daemon: not root, with CAP_SETUID, CAP_SETGID and
    CAP_KILL only (no CAP_DAC_OVERRIDE). Its own user can neither read the job's 0400 artifact
    nor remove its 0500 dir: only a fork that became the job user can (root passed with the
    chores done as root)."""
    needs_root()
    daemon = pwd.getpwnam("daemon")
    root = Path(tempfile.mkdtemp(prefix="spoold-capped-"))
    try:
        os.chown(root, daemon.pw_uid, daemon.pw_gid)
        root.chmod(0o711)  # the job user reaches its work dir through it
        caps = "+setuid,+setgid,+kill"
        result = subprocess.run(
            ["setpriv", "--reuid=daemon", "--regid=daemon", "--clear-groups",
             f"--inh-caps={caps}", f"--ambient-caps={caps}", sys.executable, "-c",
             f"from pathlib import Path; from tests.test_lane import file_work; "
             f"file_work(Path({str(root)!r}))"],
            capture_output=True, text=True, timeout=120, check=False, cwd="/",
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    finally:
        shutil.rmtree(root, ignore_errors=True)
