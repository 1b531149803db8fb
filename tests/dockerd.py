"""A real Docker engine for the docker executor's tests, started once per session.

The daemon listens on the default socket, so the executor finds it as it would in production.
No registry is reachable here: the test image is a busybox rootfs imported from this host.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from spoold.core.procfs import process_info

SOCKET = "/var/run/docker.sock"
IMAGE = "local/busybox:test"
_STATE_DIR = Path(tempfile.gettempdir()) / "spoold-test-dockerd"
_NO_REGISTRY = "http://127.0.0.1:9"  # the discard port: nothing listens, a pull fails at once
_START_BOUND = 60.0  # seconds; it is up in about one, but a cold overlay2 set-up takes longer


def _unavailable(reason: str) -> NoReturn:
    """A missing engine fails the run in CI (it must be tested there) and skips it elsewhere."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"docker engine unavailable: {reason}")
    pytest.skip(f"docker engine unavailable: {reason}")


def _answers() -> bool:
    if not Path(SOCKET).exists():
        return False
    try:
        done = subprocess.run(["docker", "info"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _install() -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-qq", "--no-install-recommends"]
    done = subprocess.run(
        [*command, "docker.io", "busybox-static"], env=env, capture_output=True, check=False
    )
    if done.returncode != 0:
        _unavailable(f"apt-get install docker.io failed: {done.stderr.decode()[-500:]}")


def _busybox_rootfs() -> bytes:
    """A tar of /bin/busybox and its applets as symlinks: enough for sh, sleep, head, ..."""
    busybox = shutil.which("busybox")
    if busybox is None:
        _unavailable("no busybox binary to build the test image from")
    with tempfile.TemporaryDirectory() as tmp:
        bin_dir = Path(tmp, "bin")
        bin_dir.mkdir()
        shutil.copy2(str(busybox), bin_dir / "busybox")
        listed = subprocess.run([busybox, "--list"], capture_output=True, check=True, text=True)
        for applet in listed.stdout.split():
            # Relative links: `busybox --install -s` would point them at this host's path.
            if applet != "busybox":
                (bin_dir / applet).symlink_to("busybox")
        Path(tmp, "tmp").mkdir(mode=0o1777)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            tar.add(tmp, arcname=".")
    return buffer.getvalue()


def _import_image() -> None:
    have = subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True, check=False)
    if have.returncode == 0:
        return
    done = subprocess.run(
        ["docker", "import", "-", IMAGE], input=_busybox_rootfs(), capture_output=True, check=False
    )
    if done.returncode != 0:
        _unavailable(f"docker import failed: {done.stderr.decode()}")


def _stop(pid: int) -> None:
    """SIGTERM, then SIGKILL: dockerd stops its containerd and containers first."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if _ended(pid):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)  # a zombie of ours, when this process started it
                return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _ended(pid: int) -> bool:
    """Gone, or a zombie that the xdist worker which started it has yet to reap."""
    info = process_info(pid)
    return info is None or info.zombie


@contextlib.contextmanager
def _shared_state(name: str = "state") -> Iterator[dict[str, Any]]:
    """The users of the daemon (or of its swarm) across pytest-xdist workers, under a lock:
    each worker runs its own session fixture, and only one may start dockerd (or make the
    swarm), and only the last out stop it."""
    _STATE_DIR.mkdir(exist_ok=True)
    with (_STATE_DIR / "lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = _STATE_DIR / f"{name}.json"
        state: dict[str, Any] = {"users": 0, "pid": None}
        if path.exists() and path.read_text():
            state = json.loads(path.read_text())
        yield state
        path.write_text(json.dumps(state))


def _start(log_dir: Path) -> int:
    if shutil.which("dockerd") is None:
        _install()
    if shutil.which("dockerd") is None:
        _unavailable("dockerd is not installed")
    # Pulls go to a proxy on loopback that refuses them: no test may reach another address,
    # and an engine (a swarm task above all) tries the registry even for an image it has.
    # Go never proxies loopback addresses, so the swarm's own traffic is untouched.
    env = {**os.environ, "HTTPS_PROXY": _NO_REGISTRY, "HTTP_PROXY": _NO_REGISTRY, "NO_PROXY": ""}
    with (log_dir / "dockerd.log").open("wb") as log:
        process = subprocess.Popen(
            ["dockerd", "--pidfile", str(log_dir / "dockerd.pid")],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    deadline = time.monotonic() + _START_BOUND
    while not _answers():
        if process.poll() is not None or time.monotonic() > deadline:
            if process.poll() is None:
                _stop(process.pid)
            tail = (log_dir / "dockerd.log").read_text(errors="replace")[-2000:]
            _unavailable(f"dockerd did not come up (exit {process.poll()}):\n{tail}")
        time.sleep(0.1)
    return process.pid


@pytest.fixture(scope="session")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A running Docker engine with the test image; yields the image's name.

    A daemon that already answers is used and left running; one started here is stopped when
    the last test session using it ends.
    """
    try:
        import docker  # type: ignore[import-untyped]  # noqa: F401, PLC0415 - say so first
    except ImportError:
        _unavailable("the docker SDK is not installed (pip install spoold[docker])")
    with _shared_state() as state:
        if not _answers():
            state["users"], state["pid"] = 0, _start(tmp_path_factory.mktemp("dockerd"))
        _import_image()
        state["users"] += 1
    try:
        yield IMAGE
    finally:
        with _shared_state() as state:
            state["users"] -= 1
            if state["users"] <= 0 and state["pid"] is not None:
                _stop(state["pid"])
                state["users"], state["pid"] = 0, None


def _swarm_state() -> str:
    done = subprocess.run(
        ["docker", "info", "--format", "{{.Swarm.LocalNodeState}}"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    return done.stdout.strip()


def _docker(*args: str) -> None:
    done = subprocess.run(["docker", *args], capture_output=True, timeout=60, check=False)
    if done.returncode != 0:
        _unavailable(f"docker {' '.join(args)} failed: {done.stderr.decode()[-500:]}")


@pytest.fixture(scope="session")
def swarm(dockerd: str) -> Iterator[str]:
    """A single-node Docker Swarm on the test engine; yields the test image's name.

    A swarm that is already active is used and left as it is; one made here (`docker swarm
    init --advertise-addr 127.0.0.1`) is left again when the last test session using it ends,
    so that the engine is as it was found.
    """
    with _shared_state("swarm") as state:
        if not state["users"]:
            state["made"] = False
            if _swarm_state() != "active":
                _docker("swarm", "init", "--advertise-addr", "127.0.0.1")
                state["made"] = True
        state["users"] += 1
    try:
        yield dockerd
    finally:
        with _shared_state("swarm") as state:
            state["users"] -= 1
            if state["users"] <= 0:
                if state.get("made"):
                    _docker("swarm", "leave", "--force")
                state["users"], state["made"] = 0, False


@pytest.fixture
def client(dockerd: str) -> Iterator[Any]:
    """A docker SDK client of the test engine."""
    docker = importlib.import_module("docker")  # only once the fixture found the SDK
    engine = docker.from_env()
    yield engine
    engine.close()


class EngineLink:
    """A socket in front of the engine's, as the executor's way to it: ``cut`` closes every
    connection and takes none (the engine gone, as a client sees a dockerd restarting with
    ``live-restore``: its containers run on), ``mend`` takes them again."""

    def __init__(self, path: Path, engine: str = SOCKET) -> None:
        self.path, self._engine = path, engine
        self._up = threading.Event()
        self._up.set()
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._server = socket.socket(socket.AF_UNIX)
        self._server.bind(str(path))
        self._server.listen(16)
        self._spawn(self._accept)

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name="test-engine-link", daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self._server.accept()
            except OSError:  # closed: the test is over
                return
            if not self._up.is_set():
                near.close()
                continue
            far = socket.socket(socket.AF_UNIX)
            far.connect(self._engine)
            with self._lock:
                self._open += [near, far]
            self._spawn(self._copy, near, far)
            self._spawn(self._copy, far, near)

    @staticmethod
    def _copy(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for each in (source, sink):
            with contextlib.suppress(OSError):
                each.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self._up.clear()
        with self._lock:
            cut, self._open = self._open, []
        for each in cut:
            with contextlib.suppress(OSError):
                each.shutdown(socket.SHUT_RDWR)

    def mend(self) -> None:
        self._up.set()

    def close(self) -> None:
        self.cut()
        self._server.shutdown(socket.SHUT_RDWR)  # wakes its accept(), which close() would not
        self._server.close()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(10)
        with self._lock:
            for each in self._open:
                each.close()
