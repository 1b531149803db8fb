"""Drive the real daemon as a subprocess, and wait on what it does (never on wall-clock luck)."""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from spoold.core.clock import Clock, SystemClock
from spoold.core.config import Config
from spoold.core.procfs import children, process_info, process_start_time, processes_matching
from spoold.core.spool import JobDir, Spool
from spoold.core.spool.spares import SPARES_PREFIX
from spoold.intake.incoming import Accepted, Intake
from spoold.intake.validation import job_validator
from spoold.out.outbox import Callbacks
from spoold.run.launcher import Launcher
from spoold.run.registry import ExecutorRegistry
from spoold.run.worker import JobRunner

T = TypeVar("T")

# A ceiling for a wait, not a measurement: a wait that needs it has failed.
DEFAULT_BOUND = 60.0


def wait_for(
    predicate: Callable[[], T | None], *, bound: float = DEFAULT_BOUND, what: str = "condition"
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``bound`` seconds."""
    end = time.monotonic() + bound
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def gate_wait(gate: str | Path, bound: float = DEFAULT_BOUND) -> str:
    """Shell that holds a job until ``gate`` exists: it runs as long as the test needs to see
    it run, not a guessed time; bounded, so that a failed test does not leave it behind."""
    return (
        f'i=0; while [ ! -e "{gate}" ] && [ $i -lt {int(bound / 0.05)} ]; '
        "do sleep 0.05; i=$((i+1)); done"
    )


def needs_root() -> None:
    """Fail a test that needs root where CI runs it (as root), skip it elsewhere."""
    import pytest  # noqa: PLC0415 - the benchmarks import this module without pytest's

    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("needs root, as CI runs")
        pytest.skip("needs root")


def ensure_account(name: str, *options: str) -> str:
    """The system account ``name``, made (``useradd`` with ``options``) if it is missing. Two
    test workers may both find it missing: the second useradd fails, and it is there then."""
    for _ in range(50):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir",
                            "/nonexistent", "--shell", "/usr/sbin/nologin", *options, name],
                           check=False, capture_output=True)  # fmt: skip
            time.sleep(0.1)
    raise AssertionError(f"useradd did not make {name}")


def write_config(path: Path, spool: Path, **overrides: Any) -> Path:
    """A config for tests: quick scans and short grace periods."""
    config = {
        "spool": str(spool),
        "workers": 2,
        "rescan_interval": "1s",
        "poll_interval": "200ms",
        "settle_time": "1s",
        "kill_grace": "1s",
        "shutdown_grace": "2s",
        "lease_timeout": "3s",
        "heartbeat_interval": "500ms",
        # Jobs get none of spoold's environment but what pass_env names: the leak guard's
        # token (tests/conftest.py) finds the processes a test's jobs leave behind.
        "pass_env": ["SPOOLD_TEST_LEAK_GUARD"],
    }
    config.update(overrides)
    path.write_text(yaml.safe_dump(config))
    return path


def drop(spool: Path, name: str, document: dict[str, Any] | str) -> Path:
    """Drop a job file the Maildir way: write elsewhere, rename into incoming/."""
    text = document if isinstance(document, str) else yaml.safe_dump(document)
    temp = spool / "tmp" / f".drop-{name}"
    temp.write_text(text)
    target = spool / "incoming" / name
    os.rename(temp, target)
    return target


def local_job(job_id: str, commands: str | list[str], **fields: Any) -> dict[str, Any]:
    return {"job_id": job_id, "executor": "local", "product": {"commands": commands}, **fields}


def job_state(spool: Path, job_id: str) -> tuple[str, dict[str, Any]] | None:
    """(directory, status) of a job, or None if it is in no job directory."""
    for directory in ("pending", "running", "done", "failed"):
        status_file = spool / directory / job_id / "status.json"
        try:
            return directory, json.loads(status_file.read_text())
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            continue
    return None


def job_log(spool: Path, job_id: str) -> str:
    """The job's log, wherever the job is; "" while it has none."""
    found = job_state(spool, job_id)
    if found is None:
        return ""
    try:
        return (spool / found[0] / job_id / "log").read_text()
    except FileNotFoundError:
        return ""


def killed_once_logged(spool: Path, config: Path, document: dict[str, Any], line: str) -> None:
    """Start a daemon, drop the job ``document``, and kill -9 the daemon once the job's log
    holds ``line`` (what it started goes on without it)."""
    daemon = DaemonProcess(spool, config)
    daemon.start()
    try:
        drop(spool, f"{document['job_id']}.yaml", document)
        wait_for(lambda: line in job_log(spool, document["job_id"]), what=f"{line!r} logged")
    finally:
        daemon.kill()


def wait_finished(
    spool: Path, job_id: str, bound: float = DEFAULT_BOUND
) -> tuple[str, dict[str, Any]]:
    """Wait until a job is in done/ or failed/."""

    def finished() -> tuple[str, dict[str, Any]] | None:
        found = job_state(spool, job_id)
        return found if found and found[0] in ("done", "failed") else None

    return wait_for(finished, bound=bound, what=f"job {job_id} to finish")


def wait_rejected(spool: Path, name: str, bound: float = DEFAULT_BOUND) -> dict[str, Any]:
    """Wait until rejected/<name>/reason.json exists; return it."""
    reason = spool / "rejected" / name / "reason.json"
    wait_for(reason.exists, bound=bound, what=f"{name} to be rejected")
    data: dict[str, Any] = json.loads(reason.read_text())
    return data


class DaemonProcess:
    """``spoold run`` in a subprocess, started and stopped the way systemd would.

    ``prefix``: a command that runs the daemon elsewhere and execs it, so that the pid is
    spoold's (``nsenter --net=...``: in a network namespace). ``log_path``: where its output
    goes (``daemon.log`` beside the spool by default)."""

    def __init__(
        self,
        spool: Path,
        config: Path,
        env: dict[str, str] | None = None,
        *,
        prefix: Sequence[str] = (),
        log_path: Path | None = None,
    ) -> None:
        self.spool = spool
        self.config = config
        self.env = env or {}
        self.prefix = list(prefix)
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = log_path or spool.parent / "daemon.log"
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self, bound: float = DEFAULT_BOUND) -> None:
        """Start, and return once the daemon has told systemd READY=1."""
        notify_dir = tempfile.mkdtemp(prefix="spoold-notify-")
        address = os.path.join(notify_dir, "notify")
        try:
            # A socket with a path is reached through the filesystem: from any network namespace.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.bind(address)
                # PYTHONFAULTHANDLER: a daemon that does not stop is aborted (``stop``), and
                # where each of its threads stood goes to its log.
                env = {**os.environ, **self.env, "NOTIFY_SOCKET": address, "PYTHONUNBUFFERED": "1",
                       "PYTHONFAULTHANDLER": "1"}  # fmt: skip
                self.starts += 1
                with open(self.log_path, "ab") as log:
                    self.process = subprocess.Popen(
                        [
                            *self.prefix,
                            sys.executable,
                            "-m",
                            "spoold",
                            "run",
                            "--spool",
                            str(self.spool),
                            "--config",
                            str(self.config),
                        ],
                        env=env,
                        stdout=log,
                        stderr=log,
                        start_new_session=True,
                    )
                # Short receive timeouts, so that a daemon dying before READY fails at once.
                sock.settimeout(0.1)
                end = time.monotonic() + bound
                while True:
                    try:
                        if "READY=1" in sock.recv(4096).decode():
                            break
                    except TimeoutError:
                        pass
                    if self.process.poll() is not None or time.monotonic() > end:
                        self.kill()
                        raise AssertionError(f"daemon did not become ready:\n{self.log()}")
        finally:
            shutil.rmtree(notify_dir, ignore_errors=True)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self, *, leave_jobs: bool = False) -> None:
        """kill -9, as a crash would; then the jobs' supervisors are ended too (as a system
        shutdown would end them) unless ``leave_jobs``: for a next daemon to adopt them."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        if not leave_jobs:
            self._end_jobs()

    def stop(self, bound: float = DEFAULT_BOUND, *, leave_jobs: bool = False) -> int:
        """SIGTERM, as systemd stop does; returns the exit code. The jobs left running for a
        next daemon are ended then, unless ``leave_jobs``."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(bound)
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    self._stuck(f"did not stop {bound:g} s after SIGTERM")
                ) from None
        if not leave_jobs:
            self._end_jobs()
        return int(self.process.returncode)

    def _stuck(self, what: str) -> str:
        """Abort the daemon and its worker processes (their stacks go to the log: see
        ``start``) and say ``what`` with the end of the log."""
        assert self.process is not None
        for pid in [*children(self.process.pid), self.process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGABRT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        try:
            tail = self.log_path.read_bytes()[-12000:].decode(errors="replace")
        except OSError as exc:
            tail = f"(no log: {exc})"
        return f"spoold (pid {self.process.pid}) {what}; the end of its log:\n{tail}"

    def _end_jobs(self) -> None:
        """End the jobs left running, as a system shutdown would: every supervisor the spool's
        records name (this daemon's own, as no other daemon runs on the spool)."""
        end_supervisors(self.spool)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


StartDaemon = Callable[..., DaemonProcess]


def daemon_starter(spool: Path, config: Path, **defaults: Any) -> Iterator[StartDaemon]:
    """A fixture's body: start daemons on ``spool`` with a config of ``defaults`` and the
    caller's overrides (written to ``config``); every one started is killed after."""
    started: list[DaemonProcess] = []

    def start(**overrides: Any) -> DaemonProcess:
        process = DaemonProcess(spool, write_config(config, spool, **{**defaults, **overrides}))
        started.append(process)
        process.start()
        return process

    yield start
    for process in started:
        process.kill()


# -- helpers for the daemon intake, chaos and disk tests ------------------------------------------


def supervisors(spool: Path) -> list[int]:
    """The live supervisors of the spool's running jobs, as their units' records name them."""
    found = []
    for record in spool.glob("running/*/units/*"):
        if record.name.endswith(".end") or record.name.startswith("."):
            continue
        try:
            begun = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        pid, start = begun.get("pid"), begun.get("pid_start")
        if isinstance(pid, int) and process_start_time(pid) == start and running(pid):
            found.append(pid)
    return found


def spares_of_live_processes(directory: Path) -> list[str]:
    """The directories of spares (spoold.core.spool.spares) in ``directory`` (a spool's tmp/,
    a work root) whose process still runs: after a daemon's end its worker processes and
    idle supervisors wind down, each removing its own."""
    found = []
    for own in directory.glob(f"{SPARES_PREFIX}*"):
        pid, start, _ = own.name.rpartition("@")[2].split(".", 2)
        if pid.isdigit() and str(process_start_time(int(pid))) == start and running(int(pid)):
            found.append(own.name)
    return found


def running(pid: int) -> bool:
    """Alive, and not a zombie: an orphaned supervisor's parent (init) may not reap it at once.
    A process that ends while it is looked at is gone, never an error."""
    info = process_info(pid)
    return info is not None and info.state not in ("Z", "X")


#: What the command lines of a daemon's worker processes and of its launcher hold.
WORKER_PROCESS = b"serve_worker_process"
LAUNCHER = b"spoold.run.launcher import serve"


def daemon_children(daemon: DaemonProcess, marker: bytes) -> list[int]:
    """The daemon's running children whose command line holds ``marker`` (WORKER_PROCESS,
    LAUNCHER): by their command line, which is there from their start (not by their name,
    which a launcher gives itself once it has imported what it needs)."""
    assert daemon.pid is not None
    found = []
    for pid in children(daemon.pid):
        with contextlib.suppress(OSError):
            if marker in Path(f"/proc/{pid}/cmdline").read_bytes() and running(pid):
                found.append(pid)
    return found


def end_supervisors(spool: Path, bound: float = DEFAULT_BOUND) -> None:
    """SIGTERM to the spool's job supervisors (each ends its job's processes and records
    the end), and wait until they are gone: what a system shutdown does."""
    pids = supervisors(spool)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not any(running(pid) for pid in pids), bound=bound,
             what="the job supervisors to end")  # fmt: skip


@functools.cache
def _empty_config() -> Path:
    """An empty config file (every default), removed when this process ends."""
    fd, name = tempfile.mkstemp(prefix="spoold-empty-", suffix=".yaml")
    os.close(fd)
    atexit.register(os.unlink, name)
    return Path(name)


def run_cli(
    spool: Path, *args: str, bound: float = DEFAULT_BOUND, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``spoold <command> --spool SPOOL ARGS...`` as a user would type it; never hangs.

    Without ``--config``, an empty config: not /etc/spoold/config.yaml, which the package
    test installs while other tests run. ``env``: added to this process's environment."""
    command, *rest = args
    if "--config" not in rest:
        rest = [*rest, "--config", str(_empty_config())]
    return subprocess.run(
        [sys.executable, "-m", "spoold", command, "--spool", str(spool), *rest],
        capture_output=True,
        text=True,
        timeout=bound,
        check=False,
        env=None if env is None else {**os.environ, **env},
    )


def run_detached(
    spool: Path, config: Path, pidfile: Path, bound: float = DEFAULT_BOUND
) -> subprocess.CompletedProcess[str]:
    """``spoold run --daemon --pidfile PIDFILE`` as an init script would; returns once the
    command has exited (the daemon, if it detached, goes on)."""
    return subprocess.run(
        [sys.executable, "-m", "spoold", "run", "--daemon", "--pidfile", str(pidfile),
         "--spool", str(spool), "--config", str(config)],
        capture_output=True, text=True, timeout=bound, check=False,
    )  # fmt: skip


def found_in(spool: Path, job_id: str) -> list[str]:
    """Every job directory (pending, running, done, failed) that holds ``job_id``."""
    return [d for d in ("pending", "running", "done", "failed") if (spool / d / job_id).is_dir()]


def wait_rescan(spool: Path, tag: str, bound: float = DEFAULT_BOUND) -> None:
    """Return once a periodic rescan of incoming/ has offered every file named before ``zzzz``.

    The proof is a witness file that only a rescan can take:

    1. It is written through a link in tmp/ and linked into incoming/ while still open for
       writing: a link raises no event spoold listens to (and were it offered, intake would see
       the open writer and leave it).
    2. A marker file is renamed in after it; intake handles events one at a time in arrival
       order, so once the marker is accepted anything the link raised has been dealt with.
    3. The writer then closes it through the tmp/ link, so the IN_CLOSE_WRITE is reported for
       tmp/, not incoming/: no event names the witness any more.

    So the witness can only be taken by a sweep whose listing of incoming/ came after step 1;
    a sweep offers names in sorted order, and ``zzzz-rescan-*`` sorts after every name the
    tests use, so that same sweep offered each file already there before reaching the witness.
    """
    witness_id, marker_id = f"zz-rescan-{tag}", f"zz-mark-{tag}"
    staging = spool / "tmp" / f".witness-{tag}"
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, yaml.safe_dump(local_job(witness_id, "true")).encode())
        os.link(staging, spool / "incoming" / f"zzzz-rescan-{tag}.yaml")
        staging.unlink()
        drop(spool, f"zzzz-mark-{tag}.yaml", local_job(marker_id, "true"))
        wait_for(lambda: job_state(spool, marker_id), bound=bound, what=f"marker {marker_id}")
    finally:
        os.close(fd)
    wait_for(
        lambda: job_state(spool, witness_id), bound=bound, what=f"a rescan taking {witness_id}"
    )


def process_token(prefix: str) -> str:
    """A word for the command lines of a test's processes, to find them with processes_with:
    unique on this machine (tmp_path names repeat in every xdist worker, whose tests run at
    the same time and would see and kill each other's)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def sleep_command(tmp_path: Path, prefix: str) -> tuple[str, str]:
    """(a sleep command, a process_token in its command line) to find its processes."""
    token = process_token(prefix)
    sleeper = tmp_path / f"{token}-sleep"
    sleeper.symlink_to(shutil.which("sleep") or "/bin/sleep")
    return str(sleeper), token


def processes_with(token: str) -> list[int]:
    """Pids of live processes whose command line contains ``token`` (zombies have none)."""
    needle = token.encode()
    return processes_matching("cmdline", lambda cmdline: needle in cmdline)


def kill_processes_with(token: str) -> None:
    """Clean-up after a test: SIGKILL whatever still runs with ``token`` in its command line."""
    for pid in processes_with(token):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def tmp_leftovers(spool: Path) -> list[str]:
    """What tmp/ holds besides daemon locks, empty per-slot work dirs, and stages and spares
    made ahead that nothing came into (a daemon killed keeps them; the next start
    removes them): nothing, when drained."""
    tmp = spool / "tmp"
    # The API's catalogue keeps its snapshot there too: a cache, not a leftover.
    found = [n for n in os.listdir(tmp) if not n.startswith("daemon-")
             and n not in ("work", "catalogue.snapshot") and not _made_ahead(tmp / n)]  # fmt: skip
    if (tmp / "work").is_dir():
        found += [
            f"work/{s}/{n}" for s in os.listdir(tmp / "work") for n in os.listdir(tmp / "work" / s)
        ]
    return found


class RunnerBench:
    """A spool, its intake and a runner on a launcher of the test's own (``config``: more of
    the runner's config)."""

    def __init__(self, root: Path, launcher: Launcher, **config: Any) -> None:
        clock = SystemClock()
        self.config = Config(spool=root / "spool", workdir=root / "work", hostname="here",
                             worker_id="w", **config)  # fmt: skip
        self.spool = Spool(self.config.spool, host=self.config.host_id)
        self.spool.init()
        self.intake = intake_for(self.spool, clock)
        self.runner = JobRunner(self.spool, ExecutorRegistry.from_entry_points(), self.config,
                                clock, logging.getLogger("spoold.test"), launcher=launcher)  # fmt: skip

    def run(self, job_id: str, commands: str = "true") -> Path:
        """Run a job of ``commands`` to its end in done/; its directory there."""
        (self.spool.dir("incoming") / f"{job_id}.yaml").write_text(
            yaml.safe_dump(local_job(job_id, commands))
        )
        assert isinstance(self.intake.offer(f"{job_id}.yaml", complete=True), Accepted)
        job = self.runner.claim(job_id)
        assert job is not None
        final = self.runner.run(job)
        assert final is not None and final.directory == "done", final
        return final.path


@contextlib.contextmanager
def tmpfs(path: Path, size: str, mode: int = 0o755) -> Iterator[None]:
    """A tmpfs of ``size`` (``1m``) and ``mode`` mounted on ``path`` for the test (a full disk,
    another filesystem), always unmounted after (lazily if still busy). Without root it cannot
    be: a failure under CI, where every test runs, else a skip."""
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode={mode:04o}", "tmpfs", str(path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if mounted.returncode != 0:
        import pytest  # noqa: PLC0415 - the benchmarks import this module without pytest's

        message = f"cannot mount a tmpfs (root needed): {mounted.stderr.strip()}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(path)], check=False)


def intake_for(
    spool: Spool, clock: Clock, *, settle_time: float = 0.0, callbacks: Callbacks | None = None
) -> Intake:
    """An intake of ``spool`` with every installed executor's schema, as the daemon's, its
    accepted jobs handed to nobody; ``callbacks``: what announces its changes, if anything."""
    return Intake(spool, job_validator(ExecutorRegistry.from_entry_points()), clock,
                  max_file_size=1 << 20, settle_time=settle_time,
                  on_accepted=lambda job, document: None,
                  logger=logging.getLogger("spoold.test"), callbacks=callbacks)  # fmt: skip


def _made_ahead(path: Path) -> bool:
    """A stage made ahead (spoold.core.spool.stages, ``make_ready``) and never used, or a
    process's directory of spares (spoold.core.spool.spares) holding nothing written."""
    if path.name.startswith(SPARES_PREFIX):  # a process's spares: empty files or dirs
        return all(
            not os.listdir(entry) if entry.is_dir() else entry.stat().st_size == 0
            for entry in path.iterdir()
        )
    if not (path.name.startswith("in-") and path.is_dir()):
        return False
    names = os.listdir(path)
    return bool(names) and all(name.startswith(".spoold-ready-") for name in names)


def schedule_status(spool: Path, job_id: str) -> dict[str, Any]:
    """The schedule's status.json ({} until it is there)."""
    try:
        return dict(json.loads((spool / "scheduled" / job_id / "status.json").read_text()))
    except FileNotFoundError:
        return {}


def schedule_runs(spool: Path, job_id: str) -> list[str]:
    """Every run of a schedule, wherever it is, oldest first."""
    names = {p.name for d in ("pending", "running", "done", "failed")
             for p in (spool / d).glob(f"{job_id}@*")}  # fmt: skip
    return sorted(names)


def accept_and_run(
    spool: Spool, intake: Intake, runner: JobRunner, document: dict[str, Any]
) -> tuple[JobDir, dict[str, Any]]:
    """Offer ``document`` to ``intake`` as incoming/j.yaml, then claim and run the job it
    accepted to its end in this process: where the job went, and its status."""
    (spool.dir("incoming") / "j.yaml").write_text(yaml.safe_dump(document))
    outcome = intake.offer("j.yaml", complete=True)
    assert isinstance(outcome, Accepted), outcome
    claimed = runner.claim(outcome.job.job_id)
    assert claimed is not None
    final = runner.run(claimed)
    assert final is not None
    return final, spool.jobs.read_status(final)
