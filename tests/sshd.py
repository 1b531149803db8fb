"""A real OpenSSH server on 127.0.0.1 for the ssh executor's tests: its own config, keys and port.

Session-scoped: one sshd serves every test. Where none can be started the tests are skipped,
except in CI (``CI=true``), where a missing server must fail the run instead of hiding it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from tests.loopback import free_port

SSHD = "/usr/sbin/sshd"
# A ceiling for the server to come up, not a measurement.
START_BOUND = 20.0


@dataclass(frozen=True)
class SshServer:
    """Where the test sshd listens and what a client needs to log in to it."""

    host: str
    port: int
    user: str
    keyfile: Path
    known_hosts: Path
    directory: Path
    pid: int  # of the listening sshd; each connection is served by processes below it

    def product(self, **fields: object) -> dict[str, object]:
        """A ``product:`` for the ssh executor that logs in to this server."""
        base: dict[str, object] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "keyfile": str(self.keyfile),
            "known_hosts": str(self.known_hosts),
        }
        return {**base, **fields}


def keygen(path: Path) -> Path:
    """A new ed25519 key pair without a passphrase; returns the private key's path."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "spoold-test", "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return path


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"sshd for the ssh executor tests: {reason}")
    pytest.skip(f"no sshd: {reason}")


def _install_openssh_server() -> None:
    if Path(SSHD).exists():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        _unavailable(f"{SSHD} is missing and cannot be installed here")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "openssh-server"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not Path(SSHD).exists():
        _unavailable(f"apt-get install openssh-server failed: {done.stderr.strip()[-500:]}")


def _write_config(directory: Path, port: int, host_key: Path, authorized: Path) -> Path:
    config = directory / "sshd_config"
    config.write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {host_key}\n"
        f"AuthorizedKeysFile {authorized}\nPidFile {directory / 'sshd.pid'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        "UsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n"
        "Subsystem sftp internal-sftp\nLogLevel ERROR\n"
    )
    return config


def _wait_until_listening(process: subprocess.Popen[bytes], port: int, errors: Path) -> None:
    end = time.monotonic() + START_BOUND
    while time.monotonic() < end:
        if process.poll() is not None:
            _unavailable(f"sshd exited with {process.returncode}: {errors.read_text()[-500:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    _unavailable(f"sshd did not listen on port {port} within {START_BOUND}s")


def _keyscan(port: int) -> str:
    command = ["ssh-keyscan", "-T", "5", "-p", str(port), "127.0.0.1"]
    end = time.monotonic() + START_BOUND
    while time.monotonic() < end:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.stdout.strip():
            return done.stdout
        time.sleep(0.1)
    _unavailable("ssh-keyscan found no host key")


@pytest.fixture(scope="session", name="sshd")
def sshd_fixture() -> Iterator[SshServer]:
    """A private sshd on 127.0.0.1 that accepts this user with a key made for the tests."""
    _install_openssh_server()
    try:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    except OSError as exc:
        _unavailable(f"cannot make /run/sshd: {exc}")
    with tempfile.TemporaryDirectory(prefix="spoold-sshd-") as temp:
        directory = Path(temp)
        host_key = keygen(directory / "host_key")
        client_key = keygen(directory / "client_key")
        authorized = directory / "authorized_keys"
        shutil.copy(directory / "client_key.pub", authorized)
        port = free_port()
        config = _write_config(directory, port, host_key, authorized)
        errors = directory / "sshd.err"
        with errors.open("wb") as sink:
            process = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(config)], stdout=sink, stderr=sink
            )
        try:
            _wait_until_listening(process, port, errors)
            known_hosts = directory / "known_hosts"
            known_hosts.write_text(_keyscan(port))
            yield SshServer(
                host="127.0.0.1",
                port=port,
                user=pwd.getpwuid(os.getuid()).pw_name,
                keyfile=client_key,
                known_hosts=known_hosts,
                directory=directory,
                pid=process.pid,
            )
        finally:
            process.kill()
            process.wait()
