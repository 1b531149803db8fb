"""The Debian package (issue 9): `make deb` builds it, and it installs, runs, reinstalls,
upgrades and purges on this machine; its service runs jobs as the job user, and a job running
through an upgrade is adopted by the new daemon (issue 18); it serves the HTTP API on loopback
with an admin token made at install, root's alone, kept through a reinstall and an upgrade
(issue 19). Its maintainer scripts follow no link the spoold user plants in the spool; its
unit writes the log directory its config offers, which its logrotate file rotates under the
running daemon; and a purge after the API listed jobs removes the spool its caches are left in.

One test function: every step drives dpkg, which must never run twice at once under
pytest-xdist. It needs root (it installs the package system-wide); under CI=true it installs
what it lacks and never skips. It leaves the machine as it found it: the package purged and,
when they did not exist before, the spoold and spoold-job users and their groups removed.
"""

from __future__ import annotations

import contextlib
import glob
import grp
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
SPOOL = Path("/var/spool/spoold")
SPOOL_DIRECTORIES = (
    "incoming", "pending", "running", "done", "failed", "rejected", "scheduled", "outbox", "tmp",
)  # fmt: skip
CI = os.environ.get("CI") == "true"
APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
UNIT = Path("/lib/systemd/system/spoold.service")
JOB_USER = "spoold-job"
#: The default config's job users: one per worker slot (workers: 2), all in JOB_USER's group.
JOB_USERS = (JOB_USER, "spoold-job2")
WORKDIR = Path("/var/lib/spoold/work")
# Starting jobs as other users and ending them: the daemon's capabilities, and no more.
DAEMON_CAPABILITIES = {"CAP_SETUID", "CAP_SETGID", "CAP_KILL"}
LEAK_TOKEN = "SPOOLD_TEST_LEAK_GUARD"  # tests/conftest.py: found in what the test started
API_PORT = 8420  # the package's config.yaml: api: {listen: 127.0.0.1:8420}
API_TOKEN = Path("/etc/spoold/api-token")  # postinst's: admin scope, named local-admin
TOKEN_LINE = re.compile(r"spoold_(?P<id>[0-9a-f]{12})_[A-Za-z0-9_-]{43}\n")
API_JOB = "via-api"
LOGDIR = Path("/var/log/spoold")  # the unit's LogsDirectory=, config.yaml's suggested logdir
LOGROTATE = Path("/etc/logrotate.d/spoold")


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


def unit_settings() -> dict[str, list[str]]:
    """The installed unit's [Service] settings, each with every value it is given, in order."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def check_unit_privileges() -> None:
    """Exactly the three capabilities, ambient and bounding; the supervisors survive a restart
    (KillMode=process); the jobs' work dirs writable under ProtectSystem=strict."""
    settings = unit_settings()
    for key in ("AmbientCapabilities", "CapabilityBoundingSet"):
        values = settings.get(key, [])
        assert len(values) == 1 and set(values[0].split()) == DAEMON_CAPABILITIES, (key, values)
    assert settings["User"] == ["spoold"]
    assert settings["KillMode"] == ["process"]
    writable = [Path(p) for value in settings.get("ReadWritePaths", []) for p in value.split()]
    writable += [Path("/var/lib", d) for v in settings.get("StateDirectory", []) for d in v.split()]
    assert any(p == WORKDIR or p in WORKDIR.parents for p in writable), writable
    # The logdir config.yaml suggests: writable under ProtectSystem=strict, spoold's alone.
    writable += [Path("/var/log", d) for v in settings.get("LogsDirectory", []) for d in v.split()]
    assert LOGDIR in writable, writable
    assert settings.get("LogsDirectoryMode") == ["0750"], settings.get("LogsDirectoryMode")


def check_job_user() -> None:
    """postinst's job users, one per worker slot of the default config: in their own group
    and no other, no login, no home; and the work dir."""
    for user in JOB_USERS:
        account = pwd.getpwnam(user)
        assert grp.getgrgid(account.pw_gid).gr_name == JOB_USER
        assert (account.pw_dir, account.pw_shell) == ("/nonexistent", "/usr/sbin/nologin")
        assert run("id", "-nG", user).stdout.split() == [JOB_USER]
    assert not os.path.exists("/nonexistent")
    # The job user may make its own work dir there; only spoold may list them, and the sticky
    # bit keeps each job user from removing another's.
    spoold = pwd.getpwnam("spoold")
    info = WORKDIR.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (
        spoold.pw_uid, spoold.pw_gid, 0o1733
    )  # fmt: skip
    parent = WORKDIR.parent.stat()
    assert parent.st_uid == 0 and not stat.S_IMODE(parent.st_mode) & 0o022
    config = yaml.safe_load(Path("/etc/spoold/config.yaml").read_text())
    # No job_user: one account per worker slot, those above.
    assert (config.get("job_user"), config["workdir"]) == (None, str(WORKDIR)), config


class UnitService:
    """The installed unit's daemon, started and stopped as systemd does it from the unit.

    This container has no systemd as PID 1, so the maintainer scripts start and restart
    nothing (debhelper's snippets look for /run/systemd/system); the test does what systemd
    would from the unit's settings, read at each start: ExecStartPre, then ExecStart as User=
    and Group= with its supplementary groups, the AmbientCapabilities and
    CapabilityBoundingSet, NoNewPrivileges, UMask, working directory /, and READY=1 on
    NOTIFY_SOCKET. A stop (KillMode=process) sends SIGTERM to the main process only, and
    SIGKILL to it only after TimeoutStopSec. The mount namespaces (ProtectSystem, PrivateTmp,
    ...) are not made here.
    """

    def __init__(self, journal: Path) -> None:
        self.journal = journal  # the daemon's standard output and error, as journald has them
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def tail(self) -> str:
        text = self.journal.read_text(errors="replace") if self.journal.exists() else ""
        return "\n".join(text.splitlines()[-40:])

    def start(self, bound: float = 120) -> None:
        """ExecStartPre, then ExecStart; return once the daemon has sent READY=1."""
        settings = unit_settings()
        user = pwd.getpwnam(settings["User"][-1])
        umask = int(settings.get("UMask", ["0022"])[-1], 8)
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "HOME": user.pw_dir,
            "USER": user.pw_name,
            "LOGNAME": user.pw_name,
            "SHELL": user.pw_shell,
            "STATE_DIRECTORY": ":".join(
                f"/var/lib/{d}" for v in settings.get("StateDirectory", []) for d in v.split()
            ),
        }
        if LEAK_TOKEN in os.environ:
            env[LEAK_TOKEN] = os.environ[LEAK_TOKEN]
        logs = [Path("/var/log", d) for v in settings.get("LogsDirectory", []) for d in v.split()]
        for path in logs:  # as systemd makes them: the unit's user's, LogsDirectoryMode
            path.mkdir(parents=True, exist_ok=True)
            os.chown(path, user.pw_uid, grp.getgrnam(settings["Group"][-1]).gr_gid)
            path.chmod(int(settings.get("LogsDirectoryMode", ["0755"])[-1], 8))
        if logs:
            env["LOGS_DIRECTORY"] = ":".join(map(str, logs))
        as_unit = self._credentials(settings)
        for line in settings.get("ExecStartPre", []):
            pre = subprocess.run(
                [*as_unit, *shlex.split(line)], env=env, cwd="/", umask=umask,
                capture_output=True, text=True, timeout=bound, check=False,
            )  # fmt: skip
            assert pre.returncode == 0, f"ExecStartPre={line}: {pre.stdout}{pre.stderr}"
        # The socket systemd listens on; the daemon's user must be able to send to it.
        notify_dir = tempfile.mkdtemp(prefix="spoold-notify-")
        os.chmod(notify_dir, 0o755)
        address = os.path.join(notify_dir, "notify")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.bind(address)
                os.chmod(address, 0o777)
                sock.settimeout(0.1)
                with self.journal.open("ab") as journal:
                    self.process = subprocess.Popen(
                        [*as_unit, *shlex.split(settings["ExecStart"][-1])],
                        env={**env, "NOTIFY_SOCKET": address}, cwd="/", umask=umask,
                        stdout=journal, stderr=journal, start_new_session=True,
                    )  # fmt: skip
                end = time.monotonic() + bound
                while True:
                    try:
                        if "READY=1" in sock.recv(4096).decode():
                            return
                    except TimeoutError:
                        pass
                    if self.process.poll() is not None or time.monotonic() > end:
                        self.kill()
                        pytest.fail(f"the service did not become ready:\n{self.tail()}")
        finally:
            shutil.rmtree(notify_dir, ignore_errors=True)

    @staticmethod
    def _credentials(settings: dict[str, list[str]]) -> list[str]:
        def caps(key: str) -> str:
            names = settings.get(key, [""])[-1].split()
            return ",".join(["-all", *(f"+{n.removeprefix('CAP_').lower()}" for n in names)])

        credentials = [
            "setpriv", f"--reuid={settings['User'][-1]}", f"--regid={settings['Group'][-1]}",
            "--init-groups", f"--inh-caps={caps('AmbientCapabilities')}",
            f"--ambient-caps={caps('AmbientCapabilities')}",
            f"--bounding-set={caps('CapabilityBoundingSet')}",
        ]  # fmt: skip
        if settings.get("NoNewPrivileges", ["no"])[-1] == "yes":
            credentials.append("--no-new-privs")
        return [*credentials, "--"]

    def stop(self) -> int:
        """KillMode=process: SIGTERM to the main process, SIGKILL after TimeoutStopSec."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(float(unit_settings().get("TimeoutStopSec", ["90"])[-1]))
            except subprocess.TimeoutExpired:
                self.kill()
        return int(self.process.returncode)

    def restart(self) -> int:
        """systemctl restart, as postinst asks for it after an upgrade; the stop's exit code."""
        code = self.stop()
        self.start()
        return code

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def wait_until(predicate: Callable[[], object], what: str, service: UnitService,
               bound: float = 120) -> None:  # fmt: skip
    """Poll until ``predicate`` holds; fail at once if the service died, or after ``bound``."""
    end = time.monotonic() + bound
    while not predicate():
        if not service.alive or time.monotonic() > end:
            state = "running" if service.alive else "dead"
            pytest.fail(f"timed out waiting for {what} (service {state}):\n{service.tail()}")
        time.sleep(0.05)


def job_directories(job_id: str) -> list[str]:
    return [d for d in ("pending", "running", "done", "failed") if (SPOOL / d / job_id).is_dir()]


UPGRADE_JOB = "through-upgrade"


def started(job_id: str, share: Path, service: UnitService) -> bool:
    """Whether the job has begun its waiting; fails at once if it ended instead."""
    for where in set(job_directories(job_id)) & {"done", "failed"}:
        log = (SPOOL / where / job_id / "log").read_text(errors="replace")
        pytest.fail(f"the job ended in {where}/ before it began to wait:\n{log}\n{service.tail()}")
    return (share / "marks" / "runs").exists()


def adopted(job_id: str, service: UnitService) -> bool:
    """Whether the running job's log says a daemon adopted it; fails once it is not running."""
    where = job_directories(job_id)
    if where != ["running"]:
        pytest.fail(f"the job left running/ before it was adopted: {where}\n{service.tail()}")
    with contextlib.suppress(FileNotFoundError):
        return "adopted" in (SPOOL / "running" / job_id / "log").read_text(errors="replace")
    return False


def submit_waiting_job(share: Path) -> None:
    """A local job, submitted by a member of spoold-submit, that marks its start and then waits
    for the test's release file (a bound, not a guess: it gives up after 300 s)."""
    job_user = pwd.getpwnam(JOB_USER)
    marks = share / "marks"
    marks.mkdir()
    os.chown(marks, job_user.pw_uid, job_user.pw_gid)
    marks.chmod(0o770)  # for the job user of whichever worker slot runs it
    commands = [
        f"grep -E '^Cap(Prm|Eff|Amb):' /proc/self/status > {marks}/caps",
        f"echo started >> {marks}/runs",
        f"i=0; while [ ! -e {share}/release ] && [ $i -lt 3000 ]; do sleep 0.1; i=$((i+1)); done",
        f"test -e {share}/release",
        "echo released $((6 * 7))",
    ]
    job = share / "job.yaml"
    job.write_text(yaml.safe_dump(
        {"job_id": UPGRADE_JOB, "executor": "local", "product": {"commands": commands}}
    ))  # fmt: skip
    job.chmod(0o644)
    nobody = pwd.getpwnam("nobody").pw_uid
    submit = grp.getgrnam("spoold-submit").gr_gid
    run("setpriv", f"--reuid={nobody}", f"--regid={submit}", "--clear-groups",
        "/usr/bin/spoold", "submit", "--spool", str(SPOOL), str(job), cwd=share)  # fmt: skip


def check_job_through_upgrade(share: Path, service: UnitService) -> None:
    """The job ran once, as the job user without the daemon's capabilities, and finished under
    the new daemon, which adopted it: in done/ only, one attempt, its output once."""
    assert job_directories(UPGRADE_JOB) == ["done"], (job_directories(UPGRADE_JOB), service.tail())
    status = json.loads((SPOOL / "done" / UPGRADE_JOB / "status.json").read_text())
    log = (SPOOL / "done" / UPGRADE_JOB / "log").read_text()
    assert status["state"] == "succeeded", (status, log)
    assert len(status["attempts"]) == 1, status["attempts"]
    assert (share / "marks" / "runs").read_text() == "started\n"
    assert len([line for line in log.splitlines() if line.endswith("released 42")]) == 1, log
    assert "adopted" in log, f"no adoption by the new daemon in the job's log:\n{log}"
    runs = (share / "marks" / "runs").stat()
    job_uids = {pwd.getpwnam(user).pw_uid for user in JOB_USERS}
    assert runs.st_uid in job_uids, "the job did not run as a job user"
    caps = {}
    for line in (share / "marks" / "caps").read_text().splitlines():
        name, _, value = line.partition(":")
        caps[name] = value.strip()
    assert all(int(value, 16) == 0 for value in caps.values()), (
        f"the job holds capabilities: {caps}"
    )


def check_api_token() -> str:
    """postinst's token: /etc/spoold/api-token, root's alone, one line; its record, the only
    token of the spool, named local-admin with the admin scope, the daemon's user's to read.
    Returns the token (never put in an assertion's message)."""
    info = API_TOKEN.lstat()
    assert stat.S_ISREG(info.st_mode)
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, 0o600)
    assert not Path(f"{API_TOKEN}.new").exists()
    text = API_TOKEN.read_text()
    shape = TOKEN_LINE.fullmatch(text)
    assert shape is not None, "/etc/spoold/api-token holds no token line"
    listed = json.loads(run("/usr/bin/spoold", "token", "list", "--json", "--spool", str(SPOOL),
                            "--config", "/etc/spoold/config.yaml", cwd=Path("/")).stdout)  # fmt: skip
    assert [(t["id"], t["name"], t["scopes"]) for t in listed] == [
        (shape["id"], "local-admin", ["admin"])
    ], listed
    spoold = pwd.getpwnam("spoold").pw_uid
    for path, mode in (
        (SPOOL / "tokens", 0o700),
        (SPOOL / "tokens" / f"{shape['id']}.json", 0o600),
    ):
        info = path.stat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (spoold, mode), path
    return text.strip()


def not_shown(token: str, *outputs: subprocess.CompletedProcess[str]) -> None:
    """The token appears in no output of the maintainer scripts (apt's, which has them)."""
    for proc in outputs:
        assert token not in proc.stdout + proc.stderr, "the token was shown"


def api_port() -> int:
    """The package's port, unless something on this machine holds it (the test's daemon runs
    in the host's network, as the service does): then one the kernel has free."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the daemon binds
        try:
            probe.bind(("127.0.0.1", API_PORT))
        except OSError:
            pass
        else:
            return API_PORT
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        return int(free.getsockname()[1])


def move_api(port: int) -> None:
    """The installed config's api.listen to ``port``, as an admin would edit it."""
    config = Path("/etc/spoold/config.yaml")
    text = config.read_text()
    packaged = f"  listen: 127.0.0.1:{API_PORT}\n"
    assert text.count(packaged) == 1, text
    config.write_text(text.replace(packaged, f"  listen: 127.0.0.1:{port}\n"))


class ApiClient:
    """Requests to the service's API on 127.0.0.1 (no proxy from the environment)."""

    def __init__(self, port: int, token: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.token = token
        self.session = requests.Session()
        self.session.trust_env = False

    def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
    ) -> requests.Response:
        """One request, with ``token`` (default: the install's; "" for none)."""
        presented = self.token if token is None else token
        sent = dict(headers or {})
        if presented:
            sent["Authorization"] = f"Bearer {presented}"
        return self.session.request(method, self.base + path, headers=sent, data=data, timeout=30)

    def close(self) -> None:
        self.session.close()


def check_api(api: ApiClient) -> None:
    """/healthz without a token; /api/v1/status with the install's token only."""
    health = api.call("GET", "/healthz", token="")
    assert (health.status_code, health.json()) == (200, {"status": "ok"}), health.text
    status = api.call("GET", "/api/v1/status")
    assert status.status_code == 200, status.text
    assert isinstance(status.json(), dict), status.text
    assert api.call("GET", "/api/v1/status", token="").status_code == 401
    wrong = f"spoold_{'0' * 12}_{'x' * 43}"
    assert api.call("GET", "/api/v1/status", token=wrong).status_code == 401


def check_api_job(api: ApiClient, service: UnitService) -> None:
    """A job POSTed with the install's token runs to success, its submitter that token, its
    output in its log (read through the API too)."""
    job = f"job_id: {API_JOB}\nexecutor: local\nproduct:\n  commands: ['echo api-job $((6*7))']\n"
    made = api.call("POST", "/api/v1/jobs", data=job.encode(),
                    headers={"Content-Type": "application/yaml"})  # fmt: skip
    assert made.status_code == 201, made.text
    assert made.headers["Location"].endswith(f"/api/v1/jobs/{API_JOB}"), made.headers
    assert made.json()["job_id"] == API_JOB, made.text
    states: list[str] = []

    def ended() -> bool:
        answer = api.call("GET", f"/api/v1/jobs/{API_JOB}")
        assert answer.status_code == 200, answer.text
        states.append(answer.json()["state"])
        return states[-1] in ("succeeded", "failed", "cancelled")

    wait_until(ended, "the API's job to end", service)
    assert states[-1] == "succeeded", states
    status = api.call("GET", f"/api/v1/jobs/{API_JOB}").json()
    assert "local-admin" in json.dumps(status.get("submitter")), status
    log = api.call("GET", f"/api/v1/jobs/{API_JOB}/log")
    assert log.status_code == 200 and "api-job 42" in log.text, log.text
    assert job_directories(API_JOB) == ["done"]
    # Listing jobs leaves the catalogue's cache in tmp/ (catalogue.snapshot): no job for purge.
    listed = api.call("GET", "/api/v1/jobs")
    assert listed.status_code == 200, listed.text
    assert API_JOB in [row["job_id"] for row in listed.json()["jobs"]], listed.text


def end_leftovers(token: str) -> None:
    """After a failure: SIGKILL what still runs with ``token`` in its command line (the job)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmdline = Path("/proc", name, "cmdline").read_bytes()
        except OSError:
            continue
        if token.encode() in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(name), signal.SIGKILL)


def as_spoold(script: str) -> None:
    """A shell script as the spoold user, in the spool: what that user may do there."""
    run("runuser", "-u", "spoold", "--", "sh", "-ec", script, cwd=SPOOL)


class Outside:
    """Files and directories of root's outside the spool, that links the spoold user plants
    in it lead to: none may change owner, group or mode, nor go, through the maintainer
    scripts (a root that follows such a link gives the spoold user /etc)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="spoold-outside-"))
        self.root.chmod(0o755)  # the spoold user may pass, as it may pass /etc
        self._made: dict[Path, tuple[int, int, int]] = {}

    def make(self, name: str, *, directory: bool) -> Path:
        path = self.root / name
        if directory:
            path.mkdir(0o755)
            (path / "inside").write_text("root's\n")
            (path / "inside").chmod(0o644)
            (path / ".spoold-ready-copy").write_text("")  # a ready stage's entry, if followed
            path.chmod(0o755)
        else:
            path.write_text("root's\n")
            path.chmod(0o644)
        info = path.stat()
        self._made[path] = (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode))
        return path

    def changed(self) -> list[str]:
        """What changed of what ``make`` made (a directory's entries included)."""
        found = []
        for path, was in self._made.items():
            try:
                info = path.stat()
            except FileNotFoundError:
                found.append(f"{path}: gone")
                continue
            now = (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode))
            if now != was:
                found.append(f"{path}: (uid, gid, mode) {was} became {now}")
            if path.is_dir() and not (path / "inside").is_file():
                found.append(f"{path}/inside: gone")
        return found

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def plant_for_configure(outside: Outside) -> None:
    """As the spoold user: outbox/ and scheduled/ replaced by links to root's directories, and
    a kept job's directory whose status.json and log link to root's files, and a link named as
    a job's directory, for postinst's owner, group and mode resets to follow if they would."""
    as_spoold(
        f"mv outbox outbox.kept; ln -s {outside.make('outbox', directory=True)} outbox\n"
        f"mv scheduled scheduled.kept\n"
        f"ln -s {outside.make('scheduled', directory=True)} scheduled\n"
        f"mkdir done/planted\n"
        f"ln -s {outside.make('status.json', directory=False)} done/planted/status.json\n"
        f"ln -s {outside.make('log', directory=False)} done/planted/log\n"
        f"ln -s {outside.make('job-directory', directory=True)} done/planted-link\n"
    )


def unplant_for_configure() -> None:
    as_spoold(
        "rm outbox scheduled done/planted-link; rm -r done/planted\n"
        "mv outbox.kept outbox; mv scheduled.kept scheduled\n"
    )


def plant_for_purge(outside: Outside) -> None:
    """As the spoold user, in tmp/: what a daemon that was killed leaves there (a spares
    directory, a ready stage, a submitted file after its copy, a snapshot cut short), and links
    named like each, to root's files and directories, for postrm to follow if it would."""
    as_spoold(
        "mkdir tmp/.spoold-spares-test@1.2.ab; : > tmp/.spoold-spares-test@1.2.ab/.spoold-spare\n"
        "mkdir tmp/in-test@0123456789abcdef; : > tmp/in-test@0123456789abcdef/.spoold-ready-copy\n"
        "ln -s in-test@0123456789abcdef tmp/in-test@0123456789abcdef/.spoold-ready-id\n"
        "mkdir tmp/in-test@0123456789abcdef/.spoold-ready-artifacts\n"
        ": > tmp/spent-0123456789abcdef; : > tmp/.spoold-catalogue.snapshot.1.2.tmp\n"
        f"ln -s {outside.make('lock', directory=False)} tmp/daemon-planted.lock\n"
        f"ln -s {outside.make('snapshot', directory=False)} tmp/planted.snapshot\n"
        f"ln -s {outside.make('spent', directory=False)} tmp/spent-planted\n"
        f"ln -s {outside.make('stage', directory=True)} tmp/in-planted@00\n"
        f"ln -s {outside.make('spares', directory=True)} tmp/.spoold-spares-planted\n"
    )


def logrotate_command(workdir: Path) -> list[str]:
    """This machine's logrotate, or Debian's unpacked into ``workdir``: installing it would
    bring a cron daemon to the machine."""
    found = shutil.which("logrotate")
    if found is not None:
        return [found]
    if run("apt-get", "download", "-qq", "logrotate", cwd=workdir, check=False).returncode:
        run("apt-get", "update", "-qq")
        run("apt-get", "download", "-qq", "logrotate", cwd=workdir)
    (deb,) = workdir.glob("logrotate_*.deb")
    run("dpkg-deb", "-x", str(deb), str(workdir / "logrotate"))
    return [str(workdir / "logrotate" / "usr" / "sbin" / "logrotate")]


def check_own_log(*names: str) -> str:
    """The daemon's spoold.log in the unit's log directory: spoold's, 0640, naming ``names``."""
    log = LOGDIR / "spoold.log"
    info = log.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (pwd.getpwnam("spoold").pw_uid, 0o640)
    text = log.read_text(errors="replace")
    for name in names:
        assert name in text, text
    return text


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
        **{f"job-user {user}": user_exists(user) for user in JOB_USERS},
        "spoold": group_exists("spoold"),
        "spoold-submit": group_exists("spoold-submit"),
        JOB_USER: group_exists(JOB_USER),
        "spool": SPOOL.exists(),
        "state": WORKDIR.parent.exists(),
    }

    # Build (make deb installs its own build tools and fails on any lintian error).
    run("make", "deb", timeout=800)
    debs = sorted(glob.glob(str(ROOT / "dist" / "spoold_*.deb")))
    assert len(debs) == 1, debs
    deb = Path(debs[0])
    lintian = (ROOT / "build" / "deb" / "lintian.txt").read_text()
    assert not [line for line in lintian.splitlines() if line.startswith("E:")], lintian

    service = UnitService(tmp_path / "journal")
    api: ApiClient | None = None
    # The job's files and the release: readable by the job user (tmp_path is root's alone).
    share = Path(tempfile.mkdtemp(prefix="spoold-upgrade-"))
    share.chmod(0o755)
    outside = Outside()
    try:
        first = run("apt-get", "install", "-y", "-qq", str(deb))
        assert installed("spoold")
        token = check_api_token()
        not_shown(token, first)

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
        # Root's jobs in a work root of its own: the package's (/var/lib/spoold/work) is the
        # spoold user's, who must not be able to swap a root job's work dir.
        own = tmp_path / "exec.yaml"
        own.write_text(f"workdir: {tmp_path / 'work'}\n")
        run("/usr/bin/spoold", "exec", "--spool", str(spool), "--config", str(own), str(job),
            cwd=tmp_path)  # fmt: skip
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
        check_unit_privileges()
        assert Path("/usr/share/man/man1/spoold.1.gz").is_file()
        conffiles = run("dpkg-query", "-W", "-f", "${Conffiles}", "spoold").stdout
        assert "/etc/spoold/config.yaml" in conffiles
        assert str(LOGROTATE) in conffiles
        rotation = LOGROTATE.stat()
        assert (rotation.st_uid, stat.S_IMODE(rotation.st_mode)) == (0, 0o644)
        assert "spool: /var/spool/spoold" in Path("/etc/spoold/config.yaml").read_text()
        assert pwd.getpwnam("spoold").pw_gid == grp.getgrnam("spoold").gr_gid
        assert group_exists("spoold-submit")
        # The HTTP API on loopback, on the port the issue names.
        config = yaml.safe_load(Path("/etc/spoold/config.yaml").read_text())
        assert config["api"] == {"listen": f"127.0.0.1:{API_PORT}"}, config["api"]
        check_spool_tree()
        check_job_user()
        check_submitters()

        # Installing the same version again keeps the admin's config, the tree and the token
        # (postinst makes none while /etc/spoold/api-token exists).
        port = api_port()
        if port != API_PORT:  # held on this machine: the service's API moves, as an admin would
            move_api(port)
        with Path("/etc/spoold/config.yaml").open("a") as config_file:  # its suggested logdir
            config_file.write(f"# changed by test_deb\nlogdir: {LOGDIR}\n")
        # The spoold user's links in its spool: the reinstall's postinst follows none.
        plant_for_configure(outside)
        again = run("apt-get", "install", "-y", "-qq", "--reinstall", str(deb))
        assert outside.changed() == [], again.stdout + again.stderr
        for name in ("outbox", "scheduled"):  # dpkg's pty: the scripts' stderr in apt's stdout
            assert f"{SPOOL / name} is a link" in again.stdout + again.stderr, again.stdout
        unplant_for_configure()
        assert "# changed by test_deb" in Path("/etc/spoold/config.yaml").read_text()
        assert check_api_token() == token, "the reinstall replaced the API token"
        not_shown(token, again)
        check_spool_tree()
        check_job_user()

        # The service serves the API with the install's token, and runs a job POSTed with it.
        service.start()
        api = ApiClient(port, token)
        check_api(api)
        check_api_job(api, service)
        check_own_log(API_JOB)

        # An upgrade to a higher version while a job runs under the service.
        submit_waiting_job(share)
        wait_until(lambda: started(UPGRADE_JOB, share, service), "the job to start", service)
        assert job_directories(UPGRADE_JOB) == ["running"]
        bumped = bumped_copy(deb, tmp_path)
        upgrade = run("apt-get", "install", "-y", "-qq", "-o", "Dpkg::Options::=--force-confold",
                      str(bumped))  # fmt: skip
        assert "+test1" in run("dpkg-query", "-W", "-f", "${Version}", "spoold").stdout
        assert "# changed by test_deb" in Path("/etc/spoold/config.yaml").read_text()
        assert check_api_token() == token, "the upgrade replaced the API token"
        not_shown(token, upgrade)
        check_spool_tree()
        check_job_user()
        # Under systemd, postinst restarts the service now (debhelper's default for an upgrade).
        stopped = service.restart()
        assert stopped == 0, f"the old daemon's stop: exit {stopped}\n{service.tail()}"
        assert job_directories(UPGRADE_JOB) == ["running"], service.tail()
        wait_until(
            lambda: adopted(UPGRADE_JOB, service), "the new daemon to adopt the job", service
        )
        check_api(api)  # the new daemon, with the kept token
        # The package's logrotate file rotates spoold.log under the running daemon, which
        # writes on into the new one.
        rotate = logrotate_command(tmp_path)
        run(*rotate, "-f", "-s", str(tmp_path / "logrotate.state"), str(LOGROTATE))
        assert UPGRADE_JOB in (LOGDIR / "spoold.log.1").read_text(errors="replace")
        (share / "release").touch()
        wait_until(
            lambda: set(job_directories(UPGRADE_JOB)) & {"done", "failed"},
            "the job to finish under the new daemon", service,
        )  # fmt: skip
        stopped = service.stop()
        assert stopped == 0, f"the new daemon's stop: exit {stopped}\n{service.tail()}"
        check_job_through_upgrade(share, service)
        check_own_log(f"{UPGRADE_JOB} succeeded")
        assert (SPOOL / "tmp" / "catalogue.snapshot").is_file()  # the API's listing's cache
        run("/usr/bin/spoold", "status", "--spool", str(spool), "debtest")
        # Jobs are data: purge keeps a spool that holds any. The test's go first.
        run("runuser", "-u", "spoold", "--", "/usr/bin/spoold", "purge", "--spool", str(SPOOL),
            "--older-than", "0s", cwd=Path("/"))  # fmt: skip
        # What is left in tmp/ is spoold's caches and locks, and the spoold user's links.
        plant_for_purge(outside)
    finally:
        if api is not None:
            api.close()
        service.kill()
        end_leftovers(str(share))  # the job, after a failure
        shutil.rmtree(share, ignore_errors=True)
        purged = run("apt-get", "purge", "-y", "-qq", "spoold", check=False)
        gone_ok = not installed("spoold")
        followed = outside.changed()
        outside.remove()
        leftovers = [p for p in ("/etc/spoold", str(SPOOL), str(WORKDIR.parent),
                                 str(LOGDIR), str(LOGROTATE),
                                 "/usr/lib/spoold", "/usr/bin/spoold",
                                 "/lib/systemd/system/spoold.service",
                                 "/etc/systemd/system/multi-user.target.wants/spoold.service")
                     if os.path.lexists(p)]  # fmt: skip
        # What purge kept after a failure (a job, a work dir): the machine as it was.
        for path, key in ((SPOOL, "spool"), (WORKDIR.parent, "state")):
            if not had[key] and path.exists() and not installed("spoold"):
                shutil.rmtree(path, ignore_errors=True)
        # Debian policy: purging keeps the system users and groups; the test removes its own.
        kept_user = user_exists("spoold")
        kept_job_user = all(user_exists(user) for user in JOB_USERS)
        for user, key in (("spoold", "user"), *((u, f"job-user {u}") for u in JOB_USERS)):
            if not had[key] and user_exists(user):
                run("deluser", "--system", "--quiet", user, check=False)
        for group in ("spoold", "spoold-submit", JOB_USER):
            if not had[group] and group_exists(group):
                run("delgroup", "--system", "--quiet", group, check=False)
    assert gone_ok
    assert leftovers == [], purged.stdout + purged.stderr
    assert "left in place" not in purged.stderr, purged.stderr
    assert followed == [], followed
    assert kept_user and kept_job_user
