"""The ``ssh`` executor: the job's commands in one shell on another host, through paramiko."""

from __future__ import annotations

import glob
import re
import select
import shlex
import socket
import stat
from collections.abc import Mapping
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import Any

from spoold.executors.base import ExecResult, Executor, RunContext, within_workdir
from spoold.executors.local import shell_script

from spoold.core.errors import ExecutorError, ExecutorNotAvailable
from spoold.core.joblog import JobLog, OutputStream
from spoold.core.units import format_duration, parse_duration

_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SHELL = re.compile(r"/[A-Za-z0-9/._+-]*\Z")  # it is pasted into a remote command line
_HEADER = b"spoold-pgid "
_HEADER_BOUND = 64  # a first line longer than this is the job's own output, not the header
_HELPER_TIMEOUT = 30.0
_DRAIN_QUIET_ROUNDS = 6  # of 0.5 s, as for local processes


def _paramiko() -> Any:
    try:
        import paramiko  # type: ignore[import-untyped]  # noqa: PLC0415 - optional SDK
    except ImportError as exc:
        raise ExecutorNotAvailable(
            "the ssh executor is not available: paramiko is not installed. "
            "Run `pip install spoold[ssh]`"
        ) from exc
    return paramiko


class SshExecutor(Executor):
    """Runs ``product.commands`` in one shell on ``product.host``, in a per-job remote work dir."""

    name = "ssh"
    schema_resource = "ssh.schema.json"
    script_fields = ("commands",)

    @classmethod
    def validate(cls, product: Mapping[str, Any]) -> list[str]:
        """Paths that would depend on the directory spoold was started in."""
        return [
            f"{field}: {product[field]} is a relative path: give an absolute one (or ~/...)"
            for field in ("keyfile", "known_hosts")
            if field in product and not str(product[field]).startswith(("/", "~"))
        ]

    def execute(self, ctx: RunContext) -> ExecResult:
        paramiko = _paramiko()
        # The timeout is the attempt's: connecting and preparing count towards it.
        deadline = None if ctx.timeout is None else ctx.clock.monotonic() + ctx.timeout
        shell = str(ctx.product.get("shell", "/bin/sh"))
        if not _SHELL.match(shell):
            raise ExecutorError(f"ssh: shell {shell!r} must be an absolute path")
        client = _connect(paramiko, ctx)
        if ctx.cancel.is_set():
            client.close()
            return ExecResult(None, cancelled=True)
        try:
            root = _prepare(client, ctx)
            try:
                result = _run(client, ctx, root, shell, deadline)
                if ctx.artifacts:
                    _fetch_artifacts(client, ctx, f"{root}/work")
                return result
            finally:
                _helper(client, f"rm -rf {root}", ctx.log)
        finally:
            client.close()


def _connect(paramiko: Any, ctx: RunContext) -> Any:
    """A client logged in to the job's host; ExecutorError with the reason if not."""
    product = ctx.product
    host, port, user = str(product["host"]), int(product.get("port", 22)), product.get("user")
    where = f"{host}:{port}"
    known = Path(str(product.get("known_hosts") or "~/.ssh/known_hosts")).expanduser()
    client = paramiko.SSHClient()
    if ctx.settings.get("trust_on_first_use") and not known.exists():
        known.parent.mkdir(parents=True, exist_ok=True)
        known.touch(mode=0o600)
    try:
        client.load_host_keys(str(known))
    except (OSError, paramiko.SSHException) as exc:
        raise ExecutorError(f"ssh: cannot read known_hosts {known}: {exc}") from exc
    # No trust on first use, unless the operator's config says so (``executors: {ssh:
    # {trust_on_first_use: true}}``): a host key spoold has not been told about fails the job.
    # A changed key fails either way.
    if ctx.settings.get("trust_on_first_use"):

        class TrustOnFirstUse(paramiko.AutoAddPolicy):  # type: ignore[misc]
            """Keeps the key in known_hosts (paramiko saves it there) and says so in the log."""

            def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
                super().missing_host_key(client, hostname, key)
                ctx.log.info(
                    f"ssh: trusted {hostname} on first use: {key.get_name()} "
                    f"{key.fingerprint}, kept in {known}"
                )

        client.set_missing_host_key_policy(TrustOnFirstUse())
    else:
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
    keyfile = Path(str(product["keyfile"])).expanduser() if product.get("keyfile") else None
    if keyfile is not None and not keyfile.is_file():
        client.close()
        raise ExecutorError(f"ssh: keyfile {keyfile} does not exist")
    timeout = parse_duration(product.get("connect_timeout", 10))
    retryable = False
    try:
        client.connect(
            host, port, None if user is None else str(user),
            key_filename=None if keyfile is None else str(keyfile),
            look_for_keys=keyfile is None, allow_agent=keyfile is None,
            timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
        )  # fmt: skip
    except paramiko.BadHostKeyException as exc:
        message = (
            f"ssh: the host key of {where} has CHANGED: {exc.key.get_name()} "
            f"{exc.key.fingerprint} is not the key known_hosts {known} has for it; "
            "if the host was really re-keyed, replace its entry there"
        )
    except paramiko.AuthenticationException as exc:
        message = f"ssh: authentication as {user} on {where} failed: {exc}"
    except paramiko.SSHException as exc:
        if "not found in known_hosts" in str(exc):
            message = (
                f"ssh: the host key of {where} is unknown: no entry in known_hosts {known} "
                f"(add one after checking it, e.g. ssh-keyscan -p {port} {host})"
            )
        else:  # paramiko says "No existing session" when the server never finished its hello
            limit = format_duration(timeout)
            message = f"ssh: no SSH handshake with {where} within {limit} ({exc})"
            retryable = True
    except socket.gaierror as exc:
        message = f"ssh: cannot resolve {host}: {exc.strerror}"
        retryable = exc.errno == socket.EAI_AGAIN  # "try again", not "no such host"
    except paramiko.ssh_exception.NoValidConnectionsError as exc:
        reasons = {e.strerror or str(e) for e in exc.errors.values()}
        message = f"ssh: cannot connect to {where}: {', '.join(sorted(reasons))}"
        retryable = True
    except TimeoutError:
        message = f"ssh: cannot connect to {where}: no answer in {format_duration(timeout)}"
        retryable = True
    except OSError as exc:
        message = f"ssh: cannot connect to {where}: {exc.strerror or exc}"
        retryable = True
    else:
        transport = client.get_transport()
        transport.set_keepalive(30)  # quiet jobs must outlive NAT and firewalls
        # Each channel request is one small packet: Nagle held every one back 40 ms.
        transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client
    client.close()
    raise ExecutorError(message, retryable=retryable)


def _prepare(client: Any, ctx: RunContext) -> str:
    """Make the remote work dir and write the job's script there; returns the dir."""
    label = re.sub(r"[^A-Za-z0-9._-]", "_", ctx.job_id)[:64]
    # The remote shell reads the script from stdin: no quoting of the commands is needed.
    command = (
        f"umask 077 && d=$(mktemp -d /tmp/spoold-{label}-XXXXXX) && mkdir $d/work "
        '&& cat > $d/script && echo "$d"'
    )
    code, out = _helper(client, command, ctx.log, _script(ctx).encode())
    root = out.strip()
    if code != 0 or not root.startswith("/tmp/spoold-"):
        raise ExecutorError(f"ssh: cannot make a work dir on the host: {out.strip() or code}")
    return root


def _script(ctx: RunContext) -> str:
    """The remote script: its process group first, the job's environment, then its commands."""
    lines = ['printf "spoold-pgid %s\\n" "${_SPOOLD_PGID:-$$}"']
    env = dict(ctx.job_env)  # not spoold's own environment: it describes this host
    env.update({str(k): str(v) for k, v in (ctx.product.get("env") or {}).items()})
    env.pop("RUNNER_WORKDIR", None)
    lines += [f"export {n}={shlex.quote(v)}" for n, v in sorted(env.items()) if _VARIABLE.match(n)]
    lines.append('export RUNNER_WORKDIR="$PWD"')
    return "\n".join(lines) + "\n" + shell_script(ctx.before_script, ctx.product["commands"])


def _run(client: Any, ctx: RunContext, root: str, shell: str, deadline: float | None) -> ExecResult:
    """Run the script to its end, its output into the log; stop its process group if told to."""
    # setsid gives the script a process group of its own, which is what a timeout or cancel
    # kills: closing the channel would leave it running. Without setsid, sshd's own group is.
    command = (
        f"cd {root}/work || exit 125; if command -v setsid >/dev/null 2>&1; then "
        f"setsid {shell} ../script </dev/null & p=$!; wait $p; rc=$?; "
        "kill -KILL -$p 2>/dev/null; exit $rc; fi; "  # what it left running ends with it
        '_SPOOLD_PGID=$(ps -o pgid= -p $$ | tr -d " ") '
        f"exec {shell} ../script </dev/null"
    )
    channel = client.get_transport().open_session(timeout=_HELPER_TIMEOUT)
    channel.exec_command(f"/bin/sh -c {shlex.quote(command)}")
    stdout, stderr = _Lines(ctx.log, stderr=False), _Lines(ctx.log, stderr=True)
    reason: str | None = None
    stopped_at = next_step_at = 0.0
    sent = 0  # of SIGTERM, SIGKILL
    while not channel.exit_status_ready():
        now = ctx.clock.monotonic()
        if reason is None:
            stopped_at = next_step_at = now
            if deadline is not None and now >= deadline:
                reason = f"timeout of {format_duration(ctx.timeout or 0)}"
            elif ctx.cancel.is_set():
                reason = "cancel"
        if reason is not None and now >= next_step_at:
            if stdout.pgid is not None and sent < 2:
                what = ("sending SIGTERM to", "still running: SIGKILL to")[sent]
                ctx.log.error(f"{reason}: {what} the job's remote processes")
                _helper(client, f"kill -{('TERM', 'KILL')[sent]} -{stdout.pgid}", ctx.log)
                sent += 1
                next_step_at = now + (ctx.kill_grace if sent == 1 else max(ctx.kill_grace, 5.0))
            elif sent == 2 or now >= stopped_at + max(ctx.kill_grace, 5.0):
                ctx.log.error(f"{reason}: the job's remote processes do not end; leaving them")
                break
        wait = 0.2 if deadline is None or reason else min(0.2, max(deadline - now, 0.0))
        _pump(channel, stdout, stderr, wait)
    quiet = 0
    while not (channel.eof_received or channel.closed) and quiet < _DRAIN_QUIET_ROUNDS:
        quiet = 0 if _pump(channel, stdout, stderr, 0.5) else quiet + 1
    _pump(channel, stdout, stderr, 0)
    stdout.flush()
    stderr.flush()
    code = channel.recv_exit_status() if channel.exit_status_ready() else -1
    channel.close()
    if reason is not None:
        return ExecResult(None if code < 0 else code, None, reason != "cancel", reason == "cancel")
    if code < 0 and not client.get_transport().is_active():
        raise ExecutorError("ssh: the connection ended before the job did", retryable=True)
    if code < 0:  # OpenSSH sends exit-signal instead of exit-status
        return ExecResult(None, "the remote shell was killed by a signal")
    return ExecResult(code, None if code == 0 else f"exit code {code}")


def _pump(channel: Any, stdout: _Lines, stderr: _Lines, wait: float) -> bool:
    """Read what output there is, waiting up to ``wait`` seconds; False if none came."""
    if wait > 0 and not (channel.recv_ready() or channel.recv_stderr_ready()):
        select.select([channel], [], [], wait)
    got = False
    for _ in range(64):  # a bound: a chatty job must not keep its timeout from being seen
        if not (channel.recv_ready() or channel.recv_stderr_ready()):
            break
        got = True
        if channel.recv_ready():
            stdout.feed(channel.recv(32768))
        if channel.recv_stderr_ready():
            stderr.feed(channel.recv_stderr(32768))
    return got


class _Lines:
    """Cuts one remote stream into log lines, in bounded memory; on stdout, takes the script's
    header out first."""

    def __init__(self, log: JobLog, *, stderr: bool) -> None:
        self._stream = OutputStream(log, stderr=stderr)
        self._head: bytes | None = None if stderr else b""  # stdout's first line, until it ends
        self.pgid: int | None = None

    def feed(self, data: bytes) -> None:
        if self._head is not None:
            self._head += data
            end = self._head.find(b"\n")
            if end < 0 and len(self._head) <= _HEADER_BOUND:
                return
            data, self._head = self._head, None
            line = data[:end] if end >= 0 else b""
            if line.startswith(_HEADER) and line[len(_HEADER) :].strip().isdigit():
                self.pgid = int(line[len(_HEADER) :])
                data = data[end + 1 :]
        self._stream.feed(data)

    def flush(self) -> None:
        if self._head:
            self._stream.feed(self._head)
            self._head = None
        self._stream.close()


def _helper(client: Any, command: str, log: JobLog, stdin: bytes = b"") -> tuple[int, str]:
    """Run a short command of spoold's own on the host; its exit status and output."""
    try:
        channel = client.get_transport().open_session(timeout=_HELPER_TIMEOUT)
        channel.settimeout(_HELPER_TIMEOUT)
        channel.set_combine_stderr(True)
        # Through /bin/sh: the user's login shell may be anything (csh, fish).
        channel.exec_command(f"/bin/sh -c {shlex.quote(command)}")
        if stdin:
            channel.sendall(stdin)
        channel.shutdown_write()
        output = channel.makefile("rb").read().decode(errors="replace")
        code = channel.recv_exit_status()
        channel.close()
    except Exception as exc:  # paramiko raises its own errors besides OSError
        log.error(f"ssh: {command.split(maxsplit=1)[0]} on the host failed: {exc!r}")
        return -1, ""
    return code, output


def _fetch_artifacts(client: Any, ctx: RunContext, remote: str) -> None:
    """Copy the remote files that match the declared artifacts into the local work dir."""
    try:
        sftp = client.open_sftp()
    except Exception as exc:  # paramiko's SSHException: the host has no SFTP subsystem
        ctx.log.error(f"ssh: no artifacts fetched: SFTP is not available on the host ({exc})")
        return
    try:
        for spec in ctx.artifacts:
            files: list[str] = []
            try:
                for relative, mode in _remote_glob(sftp, remote, spec.path):
                    if spec.type == "dir" and stat.S_ISDIR(mode):
                        below = _remote_glob(sftp, remote, f"{glob.escape(relative)}/**/*")
                        files += [name for name, kind in below if stat.S_ISREG(kind)]
                    elif stat.S_ISREG(mode):
                        files.append(relative)
                for name in files:
                    local = within_workdir(ctx, name)
                    local.parent.mkdir(parents=True, exist_ok=True)
                    sftp.get(f"{remote}/{name}", str(local))
            except Exception as exc:  # IOError or paramiko's SFTPError: the job's result stands
                ctx.log.error(f"artifact {spec.path!r}: cannot fetch it from the host: {exc}")
    finally:
        sftp.close()


def _remote_glob(sftp: Any, root: str, pattern: str) -> list[tuple[str, int]]:
    """What ``pattern`` matches under ``root`` (relative path, mode); symlinks are not followed,
    so nothing outside ``root`` can match."""
    parts = [p for p in PurePosixPath(pattern).parts if p != "."]
    if not parts or parts[0] == "/" or ".." in parts:
        return []
    found: dict[str, int] = {}

    def walk(relative: str, mode: int, index: int) -> None:
        if index == len(parts):
            found.setdefault(relative, mode)
            return
        if not stat.S_ISDIR(mode):
            return
        part = parts[index]
        if part == "**":
            walk(relative, mode, index + 1)
        for entry in sftp.listdir_attr(f"{root}/{relative}" if relative else root):
            child = f"{relative}/{entry.filename}" if relative else entry.filename
            if stat.S_ISLNK(entry.st_mode or 0):
                continue
            if part == "**" and stat.S_ISDIR(entry.st_mode or 0):
                walk(child, entry.st_mode or 0, index)
            elif part != "**" and fnmatchcase(entry.filename, part):
                walk(child, entry.st_mode or 0, index + 1)

    walk("", stat.S_IFDIR, 0)
    return sorted(found.items())
