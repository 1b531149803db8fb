"""Drive the real daemon as a subprocess, and wait on what it does (never on wall-clock luck)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

# A ceiling for a wait, not a measurement: a wait that needs it has failed.
DEFAULT_BOUND = 60.0


def wait_for(predicate: Callable[[], T], *, bound: float = DEFAULT_BOUND, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``bound`` seconds."""
    end = time.monotonic() + bound
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


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


def wait_finished(spool: Path, job_id: str, bound: float = DEFAULT_BOUND) -> tuple[str, dict[str, Any]]:
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
    """``spoold run`` in a subprocess, started and stopped the way systemd would."""

    def __init__(self, spool: Path, config: Path, env: dict[str, str] | None = None) -> None:
        self.spool = spool
        self.config = config
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = spool.parent / "daemon.log"
        self.starts = 0

    def start(self, bound: float = DEFAULT_BOUND) -> None:
        """Start, and return once the daemon has told systemd READY=1."""
        notify_dir = tempfile.mkdtemp(prefix="spoold-notify-")
        address = os.path.join(notify_dir, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(address)
            sock.settimeout(bound)
            env = {**os.environ, **self.env, "NOTIFY_SOCKET": address, "PYTHONUNBUFFERED": "1"}
            self.starts += 1
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "spoold", "run", "--spool", str(self.spool), "--config", str(self.config)],
                    env=env,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            try:
                while True:
                    message = sock.recv(4096).decode()
                    if "READY=1" in message:
                        break
            except TimeoutError:
                self.kill()
                raise AssertionError(f"daemon did not become ready:\n{self.log()}") from None
        os.unlink(address)
        os.rmdir(notify_dir)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """kill -9, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self, bound: float = DEFAULT_BOUND) -> int:
        """SIGTERM, as systemd stop does; returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(bound)
        return int(self.process.returncode)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
