"""The ``ssh`` executor: the job's commands in one shell on another host, through paramiko.

The job runs on the host under a small supervisor, detached from spoold's connection, in a
directory of its own unit (``~/.spoold/<spool>/<job id>/<unit key>/``): the supervisor writes
its pid there, the job's output into files, and, once the job has ended, its exit status
(atomically). spoold follows the output files into the job's log. A lost connection, a spoold
that stops or dies leaves the job running; the next run of the unit (``resume``) finds it again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import os
import re
import select
import shlex
import socket
import stat
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import Any

from spoold.executors.base import ExecResult, Executor, RunContext, within_workdir
from spoold.executors.local import shell_script

from spoold.core.errors import ExecutorError, ExecutorNotAvailable
from spoold.core.joblog import JobLog, OutputStream
from spoold.core.units import format_duration, parse_duration, timeout_reason

_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SHELL = re.compile(r"/[A-Za-z0-9/._+-]*\Z")  # it is pasted into a remote command line
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_HELPER_TIMEOUT = 30.0
_DRAIN_QUIET_ROUNDS = 6  # of 0.5 s, as for local processes
#: How often the host is told how far the log has the job's output: after a crash of spoold,
#: the next one repeats at most what came in this long.
_ACK_INTERVAL = 1.0
_DETACH_ROUNDS = 50  # of 0.1 s: for the host to record that when spoold stops
#: The pauses before each try to connect again when the connection is lost while a job runs.
_RECONNECT_PAUSES = (1.0, 4.0, 15.0)
_LOSSES_BOUND = 20  # lost connections in one run of a unit, before spoold gives up on it

# The remote side, in /bin/sh. Each script is one line: the user's login shell, which hands it
# on to /bin/sh, may be csh, which takes no newline inside quotes. Values are positional
# arguments, $1 always the unit's dir relative to the remote $HOME. In the unit's dir: `pid`
# ("SUPERVISOR JOB_PGID START_TIME BOOT_ID", JOB_PGID "-" until the job is started), `out` and
# `err`, `status` (the exit status), `logged` (how far spoold's log has out and err), `work/`.
# The boot id tells a pid of this boot from a reused one after a reboot (Linux; "-" elsewhere).
# `alive`: a process that ended but was not reaped is not (kill -0 finds it; an init that
# reaps no orphans, as in some containers, leaves an ended supervisor so for good).
_FUNCTIONS = (
    "boot_id() { cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo -; }; "
    'alive() { kill -0 "$1" 2>/dev/null || return 1; '
    'if [ -r "/proc/$1/stat" ]; then read -r x < "/proc/$1/stat" 2>/dev/null || return 1; '
    'case $x in *") "[ZX]" "*) return 1 ;; esac; '
    'else case $(ps -o stat= -p "$1" 2>/dev/null) in Z*) return 1 ;; esac; fi; return 0; }; '
    # `grp`: a process of group $1 runs (a zombie does not: by /proc where there is one).
    'grp() { g=$1; [ -d /proc/self ] || { kill -0 -"$g" 2>/dev/null; return; }; '
    'for f in /proc/[0-9]*/stat; do read -r x < "$f" 2>/dev/null || continue; '
    'set -- ${x##*") "}; [ "$3" = "$g" ] && [ "$1" != Z ] && [ "$1" != X ] && return 0; done; '
    "return 1; }; "
    # Kills a unit's supervisor and job group, and waits (2 s at most) until they are gone: a
    # run that follows never overlaps them.
    'end() { [ "$2" = - ] || kill -KILL -"$2" 2>/dev/null; kill -KILL "$1" 2>/dev/null; i=0; '
    'while [ $i -lt 20 ] && { alive "$1" || { [ "$2" != - ] && grp "$2"; }; }; '
    "do sleep 0.1 2>/dev/null || sleep 1; i=$((i+1)); done; }; "
)

#: The supervisor: reads the job's environment (stdin) into memory only, starts the job in a
#: session of its own (so that a kill of the job's group spares the supervisor, which records
#: how it ended), says so on stdout and closes it, waits, ends what the job left running, and
#: renames the exit status into place. Arguments: the dir, the shell, the environment's end
#: mark, then the command that starts a new session.
_SUPERVISOR = (
    'd=$1 s=$2 n=$3; shift 3; cd "$d" || exit 125; e=$(cat); exec < /dev/null; '
    'case $e in *"$n") ;; *) echo "the environment of the job did not arrive whole"; exit 124 ;; '
    "esac; "
    "t=$(date +%s); b=$(boot_id); "
    ': > out && : > err && echo "$$ - $t $b" > pid.tmp && mv -f pid.tmp pid || exit 125; '
    'set -- "$@" "$s" ../script; '
    '(cd work && eval "$e" && exec "$@") < /dev/null > out 2> err & j=$!; e=; '
    # Set after the job started, which must not inherit it: the end of spoold's connection
    # must not kill the supervisor on its last word to it.
    'trap "" PIPE; '
    'echo "$$ $j $t $b" > pid.tmp && mv -f pid.tmp pid; echo "ok $$ $j $t $b"; '
    'exec > /dev/null 2>&1; wait "$j"; rc=$?; kill -KILL -"$j" 2>/dev/null; '
    'echo "$rc" > status.tmp && mv -f status.tmp status'
)

#: Makes the unit's dir, writes the job's commands there (stdin, up to the mark line: `read`
#: takes no byte past its line, so the rest is left for the supervisor), starts the supervisor
#: in a session of its own, out of reach of the connection's end, and prints the dir and what
#: the supervisor said. A dir already there is an earlier run of this unit that was not resumed:
#: what of it still runs is ended first (on the same boot only), so that two never run. So is
#: the unit of an earlier attempt of the same job (`job`: "JOB_KEY ATTEMPT") that another
#: host's spoold started under its own spool dir, and left running when this host took the
#: job over (printed "spoold-earlier ATTEMPT DIR"). Arguments: the unit's path, the shell, the
#: mark, the job's key ("": none), its attempt, and the job's path component.
_START = (
    f"sv={shlex.quote(_FUNCTIONS + _SUPERVISOR)}; "
    'u=$(umask); umask 077; d="$HOME/$1" s=$2 n=$3 k=$4 a=$5; '
    'if [ -e "$d" ]; then echo spoold-leftover; '
    'if { read -r w j t b < "$d/pid"; } 2>/dev/null && [ "$b" = "$(boot_id)" ]; then '
    'end "$w" "$j"; fi; '
    'rm -rf "$d"; fi; '
    'if [ -n "$k" ]; then for o in "$HOME"/.spoold/*/"$6"/*; do [ "$o" = "$d" ] && continue; '
    '{ read -r x y < "$o/job"; } 2>/dev/null || continue; '
    '[ "$x" = "$k" ] && [ "$y" -lt "$a" ] 2>/dev/null || continue; echo "spoold-earlier $y $o"; '
    'if { read -r w j t b < "$o/pid"; } 2>/dev/null && [ "$b" = "$(boot_id)" ]; then '
    'end "$w" "$j"; fi; '
    'rm -rf "$o"; rmdir "${o%/*}" 2>/dev/null && rmdir "${o%/*/*}" 2>/dev/null; done; fi; '
    'mkdir -p "$d/work" && cd "$d" || exit 125; echo "dir $PWD"; '
    '[ -z "$k" ] || echo "$k $a" > job || exit 125; '
    'while IFS= read -r l; do [ "$l" = "$n" ] && break; printf "%s\\n" "$l"; done > script; '
    '[ "$l" = "$n" ] || { echo "the commands of the job did not arrive whole"; exit 124; }; '
    'umask "$u"; '
    'if command -v setsid > /dev/null 2>&1; then set -- "$(command -v setsid)"; '
    "elif command -v perl > /dev/null 2>&1; then "
    'set -- "$(command -v perl)" -MPOSIX -e "POSIX::setsid(); exec @ARGV or die"; '
    'else echo "neither setsid nor perl is on the host: spoold needs one of them to start a job '
    'that outlives its connection"; exit 126; fi; '
    # An asynchronous command reads /dev/null unless told otherwise: fd 3 carries stdin over.
    'exec 3<&0; ack=$("$@" /bin/sh -c "$sv" spoold-unit "$d" "$s" "$n" "$@" <&3 3<&- 2>&1 &); '
    'printf "%s\\n" "$ack"'
)

#: Copies the job's output from the given offsets (out to stdout, err to stderr) until the job
#: has ended; exits 0 once it has an exit status, 1 if its supervisor is gone without one, 4 if
#: there is no unit. Lines on stdin ("OUT ERR [final]") are how far spoold's log has the
#: output: written to `logged`. The end of stdin (spoold went away) ends the follower.
_FOLLOW = (
    'd="$HOME/$1" o=$2 e=$3; '
    'cd "$d" 2>/dev/null && { read -r w j t b < pid; } 2>/dev/null || exit 4; '
    '[ "$b" = "$(boot_id)" ] || w=; exec 3<&0 < /dev/null; '
    '(while IFS= read -r a; do printf "%s\\n" "$a" > logged.tmp && mv -f logged.tmp logged; '
    'done; kill "$$") <&3 & r=$!; exec 3<&-; '
    "while :; do f=0; "
    'if [ -e status ]; then f=1; elif [ -z "$w" ] || ! alive "$w"; then f=2; '
    "[ -e status ] && f=1; fi; "
    # Sizes after the check: once the status is there, nothing of the job writes any more.
    "set -- $(wc -c out err); "
    'if [ "$1" -gt "$o" ]; then tail -c +$((o + 1)) out | head -c $(($1 - o)); o=$1; fi; '
    'if [ "$3" -gt "$e" ]; then tail -c +$((e + 1)) err | head -c $(($3 - e)) >&2; e=$3; fi; '
    '[ "$f" = 0 ] || break; sleep 0.2 2>/dev/null || sleep 1; done; '
    'kill "$r" 2>/dev/null; exit $((f - 1))'
)

#: Sends a signal to the job's process group.
_SIGNAL = '{ read -r w j t b < "$HOME/$1/pid"; } 2>/dev/null && [ "$j" != - ] && kill -"$2" -"$j"'

#: What the host holds of a unit, one "key value" line each; nothing if it has no dir.
_PROBE = (
    'cd "$HOME/$1" 2>/dev/null || exit 0; '
    'echo "dir $PWD"; echo "now $(date +%s)"; echo "boot $(boot_id)"; '
    'if { read -r w j t b < pid; } 2>/dev/null; then echo "pid $w $j $t $b"; '
    'alive "$w" && echo alive; fi; '
    '[ -f status ] && echo "status $(cat status)"; '
    # When it ended, on the host's clock (its status file's time), beside "now" on the same.
    '[ -f status ] && echo "ended $(stat -c %Y status 2>/dev/null)"; '
    '[ -f logged ] && echo "logged $(cat logged)"; exit 0'
)

#: Prints the exit status and removes the unit's dir (and its parents once empty); with
#: "kill", ends the job's group first (same boot only).
_FINISH = (
    'd="$HOME/$1"; cat "$d/status" 2>/dev/null; '
    'if [ "$2" = kill ] && { read -r w j t b < "$d/pid"; } 2>/dev/null && [ "$j" != - ] '
    '&& [ "$b" = "$(boot_id)" ]; then kill -KILL -"$j" 2>/dev/null; fi; '
    'rm -rf "$d"; rmdir "${d%/*}" 2>/dev/null && rmdir "${d%/*/*}" 2>/dev/null; exit 0'
)


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
    """Runs ``product.commands`` in one shell on ``product.host``, in a per-unit remote dir."""

    name = "ssh"
    schema_resource = "ssh.schema.json"
    script_fields = ("commands",)
    resumable = True  # the job runs on under its supervisor on the host: see the module's doc

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
        return _Unit(paramiko, ctx, shell, deadline).run()


def _connect(paramiko: Any, ctx: RunContext) -> Any:
    """A client logged in to the job's host; ExecutorError with the reason if not."""
    product = ctx.product
    host, port, user = str(product["host"]), int(product.get("port", 22)), product.get("user")
    where = f"{host}:{port}"
    # spoold's own known_hosts (the operator's: ``executors: {ssh: {known_hosts: PATH}}``) is
    # the one trust on first use writes. One a job names is read, never written: with it, a
    # job made spoold overwrite any file spoold's user may write (a job's status.json).
    own = Path(str(ctx.settings.get("known_hosts") or "~/.ssh/known_hosts")).expanduser()
    named = Path(str(product["known_hosts"])).expanduser() if product.get("known_hosts") else None
    known = named or own
    first_use = bool(ctx.settings.get("trust_on_first_use"))
    client = paramiko.SSHClient()
    if first_use and not own.exists():
        own.parent.mkdir(parents=True, exist_ok=True)
        own.touch(mode=0o600)
    try:
        if named is not None:
            client.load_system_host_keys(str(named))  # read only: paramiko saves none of it
        if named is None or first_use:
            client.load_host_keys(str(own))  # where a key trusted on first use is kept
    except (OSError, paramiko.SSHException, paramiko.hostkeys.InvalidHostKey) as exc:
        # A line paramiko cannot read is an InvalidHostKey, no SSHException.
        raise ExecutorError(f"ssh: cannot read known_hosts {known}: {exc}") from exc
    # No trust on first use, unless the operator's config says so (``executors: {ssh:
    # {trust_on_first_use: true}}``): a host key spoold has not been told about fails the job.
    # A changed key fails either way.
    if first_use:

        class TrustOnFirstUse(paramiko.AutoAddPolicy):  # type: ignore[misc]
            """Keeps the key in known_hosts (paramiko saves it there) and says so in the log."""

            def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
                super().missing_host_key(client, hostname, key)
                ctx.log.info(
                    f"ssh: trusted {hostname} on first use: {key.get_name()} "
                    f"{key.fingerprint}, kept in {own}"
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


@dataclasses.dataclass(frozen=True)
class _Found:
    """What the host holds of a unit, as the probe saw it."""

    root: str  # the unit's dir, absolute
    now: int  # the host's clock, in seconds
    boot: str
    supervisor: int | None = None  # None: no pid file, so nothing of the job was started
    started: int = 0  # on the host's clock
    started_boot: str = "-"
    alive: bool = False
    status: int | None = None
    ended: int | None = None  # on the host's clock, as ``now``
    logged: tuple[int, int] | None = None
    final: bool = False  # ``logged`` was written as spoold stopped, not along the way

    @classmethod
    def parse(cls, text: str) -> _Found | None:
        fields: dict[str, list[str]] = {}
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            fields[key] = value.split() if key != "dir" else [value]
        if "dir" not in fields:
            return None
        pid, logged = fields.get("pid", []), fields.get("logged", [])
        started = len(pid) == 4 and pid[0].isdigit()
        position = len(logged) >= 2 and logged[0].isdigit() and logged[1].isdigit()
        return cls(
            root=fields["dir"][0],
            now=_number(fields.get("now")) or 0,
            boot=_word(fields.get("boot")),
            supervisor=int(pid[0]) if started else None,
            started=(_number(pid[2:3]) or 0) if started else 0,
            started_boot=pid[3] if started else "-",
            alive="alive" in fields,
            status=_number(fields.get("status")),
            ended=_number(fields.get("ended")),
            logged=(int(logged[0]), int(logged[1])) if position else None,
            final=position and logged[2:3] == ["final"],
        )


def _number(words: Sequence[str] | None) -> int | None:
    return int(words[0]) if words and words[0].isdigit() else None


def _word(words: Sequence[str] | None) -> str:
    return words[0] if words else "-"


class _Unit:
    """One run of the executor: the unit's remote dir, its supervisor, its output so far."""

    def __init__(self, paramiko: Any, ctx: RunContext, shell: str, deadline: float | None) -> None:
        self._paramiko = paramiko
        self.ctx = ctx
        self.shell = shell
        self.deadline = deadline
        self.path = _unit_path(ctx)
        self.root = f"~/{self.path}"  # absolute once the host has said where its home is
        self.where = f"{ctx.product['host']}:{ctx.product.get('port', 22)}"
        self.client: Any = None
        self.supervisor: int | None = None
        self.rebooted = False
        self.out = _Stream(ctx.log, stderr=False)
        self.err = _Stream(ctx.log, stderr=True)
        self.acked = (0, 0)
        self.ack_at = 0.0
        self.reason: str | None = None  # of stopping the job: a timeout, a cancel
        self.sent = 0  # of SIGTERM, SIGKILL
        #: When a job that ended while no spoold watched it ended, on this host's clock.
        self.ended_at: datetime | None = None
        self.next_step_at = 0.0
        self.losses = 0

    def run(self) -> ExecResult:
        ctx = self.ctx
        self.client = _connect(self._paramiko, ctx)
        try:
            found = self._probe() if ctx.resume else None
            if found is not None and found.supervisor is not None:
                self._adopt(found)  # a cancel or a timeout now ends what runs there
            else:
                if ctx.cancel.is_set():
                    return ExecResult(None, cancelled=True)
                if ctx.resume:
                    ctx.log.info(
                        f"ssh: resuming: nothing of unit {ctx.unit_key} was started "
                        f"on {self.where}: starting it"
                    )
                if ctx.detach.is_set():  # nothing runs yet: the next spoold starts it
                    return ExecResult(None, detached=True)
                self._start()
            try:
                ending = self._watch()
            except ExecutorError:
                raise  # the connection is gone: nothing can be ended or removed
            except Exception:
                with contextlib.suppress(Exception):  # the bug's own error is the one to see
                    self._finish(kill=True)  # a bug must not leave the job running unwatched
                raise
            if ending == "detached":
                return ExecResult(None, detached=True)
            self.out.close()
            self.err.close()
            if ctx.artifacts:
                _fetch_artifacts(self.client, ctx, f"{self.root}/work")
            code = self._finish(kill=ending == "died")
            result = self._result(ending, code)
            return dataclasses.replace(result, ended_at=self.ended_at) if self.ended_at else result
        finally:
            self.client.close()

    def _probe(self) -> _Found | None:
        code, out = _remote(
            self.client, _PROBE, (self.path,), self.ctx.log, what="looking for the unit"
        )
        if code != 0:
            raise ExecutorError(
                f"ssh: cannot look for the unit on {self.where}: {out.strip() or code}",
                retryable=code < 0,
            )
        return _Found.parse(out)

    def _start(self) -> None:
        """Make the unit's dir and start the job there under its supervisor."""
        ctx = self.ctx
        mark = f": spoold-{uuid.uuid4().hex}"
        script = shell_script(ctx.before_script, ctx.product["commands"])
        stdin = f"{script}{mark}\n{_environment(ctx, mark)}".encode()
        attempt = ctx.unit_key.split(".", 1)[0]
        args = (self.path, self.shell, mark, ctx.job_key, attempt, _component(ctx.job_id))
        code, out = _remote(
            self.client, _START, args, ctx.log, stdin=stdin, what="starting the job"
        )
        lines = out.strip().splitlines()
        if "spoold-leftover" in lines and not ctx.resume:
            ctx.log.info(
                f"ssh: {self.where} held a dir of unit {ctx.unit_key} from an earlier spoold "
                "that was not resumed: ended what ran of it and removed it"
            )
        for line in lines:
            if line.startswith("spoold-earlier "):
                _, earlier, where = line.split(" ", 2)
                ctx.log.info(
                    f"ssh: {self.where} still held attempt {earlier} of this job, which "
                    f"another spoold started ({where}) before this host took the job over: "
                    "ended what ran of it and removed it, so that two never run"
                )
        root = next((line[4:] for line in lines if line.startswith("dir /")), None)
        self.root = root or self.root
        ack = lines[-1].split() if lines else []
        if code == 0 and root and len(ack) == 5 and ack[0] == "ok" and ack[1].isdigit():
            self.supervisor = int(ack[1])
            return
        if code < 0:  # whether the job started is unknown: the unit's dir stays for a resume
            raise ExecutorError(
                "ssh: the connection ended while the job was being started", retryable=True
            )
        if root:
            self._finish(kill=True)
        said = "\n".join(
            line for line in lines if not line.startswith(("spoold-leftover", "spoold-earlier "))
            and line[:4] != "dir "
        )  # fmt: skip
        raise ExecutorError(f"ssh: cannot start the job on the host: {said or code}")

    def _adopt(self, found: _Found) -> None:
        """Take up a unit an earlier spoold started: its output from where the log has it."""
        ctx = self.ctx
        self.root, self.supervisor = found.root, found.supervisor
        self.rebooted = found.started_boot != found.boot
        if found.logged is None:
            whence = "from its start: lines this log already has appear again"
        else:
            self.out.skip_to(found.logged[0])
            self.err.skip_to(found.logged[1])
            self.acked = found.logged
            whence = "from where this log left it"
            if not found.final:  # the last spoold did not stop: it died
                whence = (
                    "from where this log last recorded it: lines from the last moments "
                    "before the last spoold died may appear twice"
                )
        elapsed = max(found.now - found.started, 0)
        if found.status is not None and found.ended is not None:
            # How long before the probe it ended, by the host's clock: no two clocks compared.
            self.ended_at = ctx.clock.now() - timedelta(seconds=max(found.now - found.ended, 0))
        if found.status is not None:
            ctx.log.info(
                f"ssh: resuming: the job ended on {self.where} while no spoold "
                f"watched it (exit status {found.status}); its output {whence}"
            )
        elif found.alive and not self.rebooted:
            left = ""
            if ctx.timeout is not None:
                remaining = max(ctx.timeout - elapsed, 0.0)
                self.deadline = ctx.clock.monotonic() + remaining
                left = f", {format_duration(remaining)} of its timeout left"
            ctx.log.info(
                f"ssh: resuming: the job still runs on {self.where} (pid "
                f"{self.supervisor}, started {format_duration(elapsed)} ago{left}); "
                f"its output {whence}"
            )
        else:
            ctx.log.info(
                f"ssh: resuming: the job's supervisor on {self.where} (pid "
                f"{self.supervisor}) is gone; its output {whence}"
            )

    def _watch(self) -> str:
        """Follow the job to its end, connecting again when the connection is lost: "ended",
        "died" (no exit status), "gone" (no unit), "abandoned" or "detached"."""
        while True:
            ending = self._follow()
            if ending is not None:
                return ending
            if not self._reconnect():
                return "detached"

    def _follow(self) -> str | None:
        """Copy the job's output into the log until it ends; stop it if told to. None if the
        connection was lost."""
        ctx = self.ctx
        try:
            channel = self.client.get_transport().open_session(timeout=_HELPER_TIMEOUT)
            channel.exec_command(
                _command(_FOLLOW, (self.path, str(self.out.read), str(self.err.read)))
            )
        except Exception:  # paramiko's SSHException, EOFError, OSError: the connection is gone
            return None
        gave_up = False
        try:
            while not channel.exit_status_ready():
                now = ctx.clock.monotonic()
                if self.reason is None:
                    # Not while stopping the job: it is ending anyway, and its end is the result.
                    if ctx.detach.is_set():
                        return self._detach(channel)
                    if self.deadline is not None and now >= self.deadline:
                        self.reason = timeout_reason(ctx.timeout)
                    elif ctx.cancel.is_set():
                        self.reason = "cancel"
                    self.next_step_at = now
                if self.reason is not None and now >= self.next_step_at and not self._stop(now):
                    gave_up = True
                    break
                self._ack(channel, now)
                late = self.deadline is None or self.reason is not None
                wait = 0.2 if late else min(0.2, max((self.deadline or now) - now, 0.0))
                _pump(channel, self.out, self.err, wait)
            quiet = 0
            while not (channel.eof_received or channel.closed) and quiet < _DRAIN_QUIET_ROUNDS:
                quiet = 0 if _pump(channel, self.out, self.err, 0.5) else quiet + 1
            _pump(channel, self.out, self.err, 0)
            code = channel.recv_exit_status() if channel.exit_status_ready() else -1
        finally:
            channel.close()
        if gave_up:
            return "abandoned"
        return {0: "ended", 1: "died", 4: "gone"}.get(code)

    def _stop(self, now: float) -> bool:
        """Send the job's group the next signal of a timeout or cancel; False if none is left."""
        log = self.ctx.log
        if self.sent == 2:
            log.error(f"{self.reason}: the job's remote processes do not end; leaving them")
            return False
        what = ("sending SIGTERM to", "still running: SIGKILL to")[self.sent]
        log.error(f"{self.reason}: {what} the job's remote processes")
        signal = ("TERM", "KILL")[self.sent]
        _remote(self.client, _SIGNAL, (self.path, signal), log, what="signalling the job")
        self.sent += 1
        grace = self.ctx.kill_grace
        self.next_step_at = now + (grace if self.sent == 1 else max(grace, 5.0))
        return True

    def _ack(self, channel: Any, now: float) -> None:
        """Tell the host, now and then, how far the log has the job's output."""
        position = (self.out.logged, self.err.logged)
        if now < self.ack_at or position == self.acked:
            return
        self.ack_at = now + _ACK_INTERVAL
        try:
            channel.sendall(f"{position[0]} {position[1]}\n".encode())
        except Exception:  # a lost connection shows as the follower's end
            return
        self.acked = position

    def _detach(self, channel: Any) -> str:
        """Leave the job running for the next spoold: record where the log stands, and go."""
        ctx = self.ctx
        recorded = False
        try:
            # Whole lines only: a line begun is read again, whole, by the next spoold.
            channel.sendall(f"{self.out.logged} {self.err.logged} final\n".encode())
            channel.shutdown_write()  # the follower records it, then ends
            for _ in range(_DETACH_ROUNDS):
                if channel.exit_status_ready():
                    recorded = True
                    break
                select.select([channel], [], [], 0.1)
                while channel.recv_ready():  # past what the log has: the next spoold reads it
                    channel.recv(32768)
                while channel.recv_stderr_ready():
                    channel.recv_stderr(32768)
        except Exception:  # noqa: S110 - paramiko's own errors: recorded stays False
            pass
        finally:
            channel.close()
        if not recorded:
            ctx.log.error(
                "ssh: could not record on the host how far this log has the job's "
                "output: the next spoold may log some of it twice"
            )
        ctx.log.info(
            f"ssh: spoold stops: the job keeps running on {self.where} (pid "
            f"{self.supervisor}, in {self.root}); the next spoold resumes it"
        )
        return "detached"

    def _reconnect(self) -> bool:
        """Connect again after the connection was lost; False if spoold stops meanwhile."""
        ctx = self.ctx
        self.losses += 1
        transport = self.client.get_transport()
        if self.losses <= _LOSSES_BOUND and transport is not None and transport.is_active():
            return True  # the follower ended, not the connection: start another
        problem = "it ended"
        for number, pause in enumerate(_RECONNECT_PAUSES, 1):
            if self.losses > _LOSSES_BOUND:
                problem = f"it was lost {self.losses} times"
                break
            ctx.log.error(
                f"ssh: lost the connection to {self.where} ({problem}): connecting "
                f"again in {format_duration(pause)} (try {number} of "
                f"{len(_RECONNECT_PAUSES)})"
            )
            if ctx.detach.wait(pause):
                ctx.log.info(
                    f"ssh: spoold stops: the job may still run on {self.where} (pid "
                    f"{self.supervisor}, in {self.root}); the next spoold resumes it"
                )
                return False
            self.client.close()
            try:
                self.client = _connect(self._paramiko, ctx)
            except ExecutorError as exc:
                problem = str(exc)
                continue
            ctx.log.info(
                f"ssh: connected to {self.where} again: following the job's output "
                "from where this log has it"
            )
            return True
        raise ExecutorError(
            f"ssh: the connection to {self.where} ended before the job did and could not be "
            f"made again ({problem}); the job may still run there, in {self.root}",
            retryable=True,
        )

    def _finish(self, *, kill: bool) -> int | None:
        """Remove the unit's dir, ending the job's group first if ``kill``; its exit status."""
        args = (self.path, "kill" if kill else "-")
        code, out = _remote(
            self.client, _FINISH, args, self.ctx.log, what="removing the unit's dir"
        )
        if code < 0:
            raise ExecutorError(
                "ssh: the connection ended before the job's exit status was "
                f"read; its dir on the host stays: {self.root}",
                retryable=True,
            )
        text = out.strip()
        return int(text) if text.isdigit() else None

    def _result(self, ending: str, code: int | None) -> ExecResult:
        if self.reason is not None:
            return ExecResult(code, None, self.reason != "cancel", self.reason == "cancel")
        if ending == "died":
            why = "the host rebooted" if self.rebooted else "killed, or the host rebooted"
            raise ExecutorError(
                f"ssh: the job's supervisor on {self.where} (pid "
                f"{self.supervisor}) ended without an exit status ({why})",
                retryable=True,
            )
        if ending == "gone":
            raise ExecutorError(
                f"ssh: the unit's dir {self.root} vanished from {self.where} while the job ran"
            )
        if code is None:
            return ExecResult(None, "ssh: the job's supervisor recorded no exit status")
        return ExecResult(code, None if code == 0 else f"exit code {code}")


def _unit_path(ctx: RunContext) -> str:
    """The unit's dir, relative to the remote home: ``.spoold/<spool>/<job id>/<unit key>``."""
    return f".spoold/{_spool_id(ctx)}/{_component(ctx.job_id)}/{_component(ctx.unit_key)}"


def _spool_id(ctx: RunContext) -> str:
    """This spool among all that run jobs on a host: its host's name and a digest of that and
    of the spool's path. The same for the next spoold on the spool, which resumes the units."""
    host = (
        ctx.job_env.get("RUNNER_HOSTNAME") or ctx.env.get("RUNNER_HOSTNAME") or os.uname().nodename
    )
    job_dir = ctx.job_env.get("SPOOLD_JOB_DIR")  # <spool>/<state>/<job id>
    spool = str(PurePosixPath(job_dir).parent.parent) if job_dir else ""
    digest = hashlib.sha256(f"{host}\0{spool}".encode()).hexdigest()[:12]
    return f"{_UNSAFE.sub('_', host)[:40]}-{digest}"


def _component(name: str) -> str:
    """``name`` as one path component; a changed one gets a digest, so that none collide."""
    safe = _UNSAFE.sub("_", name)[:80]
    if safe != name or safe.startswith("."):
        safe = f"_{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return safe


def _environment(ctx: RunContext, mark: str) -> str:
    """The job's environment as shell exports, ``mark`` last: the supervisor holds it in memory
    only, so that no secret is written to a file on the host."""
    env = dict(ctx.job_env)  # not spoold's own environment: it describes this host
    env.update({str(k): str(v) for k, v in (ctx.product.get("env") or {}).items()})
    env.pop("RUNNER_WORKDIR", None)
    lines = [f"export {n}={shlex.quote(v)}" for n, v in sorted(env.items()) if _VARIABLE.match(n)]
    lines += ['export RUNNER_WORKDIR="$PWD"', mark]
    return "\n".join(lines) + "\n"


def _pump(channel: Any, stdout: _Stream, stderr: _Stream, wait: float) -> bool:
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


class _Stream:
    """One of the job's output files as the follower sends it, cut into log lines in bounded
    memory; knows how far it has read the file and how far whole lines of it are in the log."""

    def __init__(self, log: JobLog, *, stderr: bool) -> None:
        self._lines = OutputStream(log, stderr=stderr)
        self.read = 0
        self.logged = 0

    def skip_to(self, offset: int) -> None:
        self.read = self.logged = offset

    def feed(self, data: bytes) -> None:
        self._lines.feed(data)
        self.read += len(data)
        end = data.rfind(b"\n")
        if end >= 0:
            self.logged = self.read - len(data) + end + 1

    def close(self) -> None:
        self._lines.close()
        self.logged = self.read


def _command(script: str, args: Sequence[str]) -> str:
    """The command line for the host: ``script`` run by /bin/sh (the user's login shell may be
    anything: csh, fish) with ``args`` as $1...."""
    quoted = " ".join(shlex.quote(arg) for arg in args)
    return f"/bin/sh -c {shlex.quote(_FUNCTIONS + script)} spoold {quoted}"


def _remote(
    client: Any, script: str, args: Sequence[str], log: JobLog, *, stdin: bytes = b"", what: str
) -> tuple[int, str]:
    """Run a short script of spoold's own on the host; its exit status (-1 if the connection
    failed) and output."""
    try:
        channel = client.get_transport().open_session(timeout=_HELPER_TIMEOUT)
        channel.settimeout(_HELPER_TIMEOUT)
        channel.set_combine_stderr(True)
        channel.exec_command(_command(script, args))
        if stdin:
            channel.sendall(stdin)
        channel.shutdown_write()
        output = channel.makefile("rb").read().decode(errors="replace")
        code = channel.recv_exit_status()
        channel.close()
    except Exception as exc:  # paramiko raises its own errors besides OSError
        log.error(f"ssh: {what} on the host failed: {exc!r}")
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
