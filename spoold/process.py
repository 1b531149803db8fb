"""Run one command as its own process group: output streamed line by line, timeout, cancel.

The group, not just the shell, is what ends on timeout or cancel, so that no child of a job
outlives it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import selectors
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from spoold.clock import Clock
from spoold.errors import ExecutorError
from spoold.joblog import JobLog
from spoold.units import format_duration

_READ_SIZE = 65536
_DRAIN_QUIET_ROUNDS = 6


@dataclass(frozen=True)
class RunAs:
    """A user a job's processes run as (``run_as:``)."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str

    @classmethod
    def lookup(cls, name: str) -> RunAs:
        """The account ``name`` on this host; ExecutorError if there is none."""
        try:
            account = pwd.getpwnam(name)
        except KeyError:
            raise ExecutorError(f"run_as: there is no user {name!r} on this host") from None
        groups = os.getgrouplist(name, account.pw_gid)
        return cls(name, account.pw_uid, account.pw_gid, tuple(groups), account.pw_dir)

    def environment(self) -> dict[str, str]:
        """What a login as this user would set, so that tools look in the right home."""
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name}


@dataclass(frozen=True)
class ProcessOutcome:
    """How a process ended."""

    exit_code: int | None
    timed_out: bool = False
    cancelled: bool = False

    @property
    def error(self) -> str | None:
        if self.timed_out or self.cancelled:
            return None  # the caller words these; it knows the timeout
        if self.exit_code is None or self.exit_code == 0:
            return None
        if self.exit_code < 0:
            return f"killed by signal {signal.Signals(-self.exit_code).name}"
        return f"exit code {self.exit_code}"


def run_process(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    log: JobLog,
    clock: Clock,
    timeout: float | None,
    kill_grace: float,
    cancel: threading.Event,
    on_spawn: Callable[[int], None] | None = None,
    run_as: RunAs | None = None,
) -> ProcessOutcome:
    """Run ``argv`` to its end, writing its output into ``log``."""
    process = subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=dict(env) if run_as is None else {**env, **run_as.environment()},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
        user=None if run_as is None else run_as.uid,
        group=None if run_as is None else run_as.gid,
        extra_groups=None if run_as is None else list(run_as.groups),
    )
    if on_spawn is not None:
        on_spawn(process.pid)
    assert process.stdout is not None and process.stderr is not None
    streams = _Streams(log, process.stdout.fileno(), process.stderr.fileno())
    deadline = None if timeout is None else clock.monotonic() + timeout
    timed_out = cancelled = False
    kill_at: float | None = None
    try:
        while process.poll() is None:
            now = clock.monotonic()
            if not (timed_out or cancelled):
                if deadline is not None and now >= deadline:
                    timed_out = True
                elif cancel.is_set():
                    cancelled = True
                if timed_out or cancelled:
                    reason = (
                        f"timeout of {format_duration(timeout or 0)}" if timed_out else "cancel"
                    )
                    log.error(f"{reason}: sending SIGTERM to the job's processes")
                    _signal_group(process.pid, signal.SIGTERM)
                    kill_at = now + kill_grace
            elif kill_at is not None and now >= kill_at:
                log.error(f"still running {format_duration(kill_grace)} after SIGTERM: SIGKILL")
                _signal_group(process.pid, signal.SIGKILL)
                kill_at = None
            wait = 0.2
            if deadline is not None and not timed_out:
                wait = min(wait, max(deadline - now, 0.0))
            if streams.open:
                streams.pump(wait)
            else:  # both pipes closed: the exit is all there is left to wait for
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(wait)
    finally:
        # Whatever the shell left running in its group ends with it; this also
        # closes pipes that background children would otherwise hold open forever.
        _signal_group(process.pid, signal.SIGKILL)
        process.wait()
        streams.drain()
        process.stdout.close()
        process.stderr.close()
    return ProcessOutcome(process.returncode, timed_out=timed_out, cancelled=cancelled)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class _Streams:
    """Reads stdout and stderr without blocking and turns them into log lines."""

    def __init__(self, log: JobLog, stdout: int, stderr: int) -> None:
        self._log = log
        # poll(2) needs no kernel object of its own, unlike epoll: fewer syscalls for two fds.
        self._selector = selectors.PollSelector()
        self._partial: dict[int, bytes] = {stdout: b"", stderr: b""}
        self._is_stderr = {stdout: False, stderr: True}
        for fd in (stdout, stderr):
            os.set_blocking(fd, False)
            self._selector.register(fd, selectors.EVENT_READ)

    @property
    def open(self) -> bool:
        """Whether either stream may still deliver output."""
        return bool(self._selector.get_map())

    def pump(self, timeout: float) -> bool:
        """Read what is there, waiting up to ``timeout`` seconds; False if nothing came."""
        ready = self._selector.select(timeout)
        for key, _ in ready:
            self._read(key.fd)
        return bool(ready)

    def drain(self) -> None:
        """Read to end of file on both streams, then flush incomplete last lines.

        A process that left the job's group (setsid) may hold a pipe open for ever:
        after a few quiet seconds its output is abandoned rather than the job.
        """
        quiet_rounds = 0
        while self.open and quiet_rounds < _DRAIN_QUIET_ROUNDS:
            quiet_rounds = 0 if self.pump(0.5) else quiet_rounds + 1
        if self.open:
            self._log.error("a process that left the job's group still holds its output open")
        for fd, rest in self._partial.items():
            if rest:
                self._log.output(rest, stderr=self._is_stderr[fd])
                self._partial[fd] = b""
        self._selector.close()

    def _read(self, fd: int) -> None:
        try:
            chunk = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            return
        if not chunk:
            self._selector.unregister(fd)
            return
        lines = (self._partial[fd] + chunk).split(b"\n")
        self._partial[fd] = lines.pop()
        for line in lines:
            self._log.output(line, stderr=self._is_stderr[fd])
