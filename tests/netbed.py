"""A bed of several spoold "hosts" on this one machine, sharing one spool over sshfs.

One real sshd serves a local directory, ``server/spool``: the shared spool, which a test reads
directly from the server side. Each host is a network namespace joined to the root namespace by
a veth pair, with that spool mounted over sshfs from inside its namespace (the mount itself is
in the global mount namespace, so the test reads every host's view by path). A host runs its
own daemon, and its network can be cut, its processes frozen or killed.

Addresses: host N of a bed is 10.<x>.<N>.2/30 in its namespace, and the root end of its veth
10.<x>.<N>.1/30, on which the sshd and the callback receiver listen (never on 0.0.0.0). The
second octet ``x`` is picked under a lock so that beds of parallel pytest workers never overlap.

Use the ``netbed`` fixture (three hosts, one test), or ``make_bed(hosts=...)`` for a module-scoped
fixture or a benchmark. Where a piece is missing (FUSE, sshfs, the right to make namespaces) the
tests are skipped, except under ``CI=true``, where that fails them.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from spoold.core.procfs import processes_matching
from tests.harness import DEFAULT_BOUND, DaemonProcess, wait_for
from tests.receiver import Receiver
from tests.sshd import SSHD, keygen

# How every host mounts the spool (README quotes this). Why each part, as measured by
# tests/test_netbed.py (sshfs 3.7.3, FUSE 3.14, OpenSSH 9.2):
# - reconnect: a host whose connection died (cut, server restart) gets its mount back by
#   itself on its next operation (0.2-0.3 s after the link is back), as a production mount would.
# - ServerAliveInterval=1,ServerAliveCountMax=3: a dead connection is given up after 3-4.5 s;
#   the requests waiting on it then fail (EIO) instead of hanging until TCP gives up (15
#   minutes). A request issued in a shorter cut completes, late, once the link is back.
# - dir_cache=no: sshfs's own cache hides another host's new names, sizes and renames (20 s).
# - entry_timeout=0,attr_timeout=0,negative_timeout=0: so do the kernel's caches of names and
#   attributes (1 s by default): a directory renamed away on one host is still there on another.
#   Contents need nothing more: without kernel_cache or auto_cache each open reads afresh.
# - allow_other,default_permissions: users other than the mounting one (an operator, a submit
#   group writing incoming/, a daemon not run as root) reach the mount at all, and the kernel
#   checks the modes the server reports, as on a local or NFS spool: with allow_other alone a
#   job user creates files in root's 0700 directories (the server's root does it for it).
SSHFS_OPTIONS = (
    "IdentityFile={key},StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,port={port},"
    "reconnect,ServerAliveInterval=1,ServerAliveCountMax=3,"
    "dir_cache=no,entry_timeout=0,attr_timeout=0,negative_timeout=0,"
    "allow_other,default_permissions"
)

HOSTS = 3
# Ceilings for a step to happen, not measurements.
SETUP_BOUND = 20.0
STOP_BOUND = 10.0
_LOCK = Path(tempfile.gettempdir()) / "spoold-netbed.lock"
_NAME = re.compile(r"^spoold-([0-9a-f]{6})([0-9a-f]{2})-h\d+$")
_sequence = itertools.count()


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"multi-host test bed: {reason}")
    pytest.skip(f"no multi-host test bed: {reason}")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


# -- processes, as /proc says ---------------------------------------------------------------------


def _parents() -> dict[int, int]:
    """pid -> ppid of every process now (threads are not listed in /proc itself)."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue  # gone meanwhile
        # The command name may hold spaces and parentheses; the fields after it do not.
        found[int(name)] = int(stat.rsplit(b")", 1)[1].split()[1])
    return found


def tree(roots: Iterable[int]) -> set[int]:
    """``roots`` and every live process below them, by the parent links in /proc/*/stat."""
    parents = _parents()
    below: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        below.setdefault(ppid, []).append(pid)
    found = {pid for pid in roots if pid in parents}
    todo = list(found)
    while todo:
        for child in below.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def state(pid: int) -> str | None:
    """The state letter of a process (R, S, D, T for stopped, Z, ...), None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0].decode()
    except OSError:
        return None


def signal_until_stable(find: Callable[[], set[int]], signum: int) -> set[int]:
    """Send ``signum`` to what ``find`` names, again and again until it names no new process:
    one that a member forked between a look and the signal is caught by the next look.
    Returns every pid signalled."""
    done: set[int] = set()
    for _ in range(200):
        new = find() - done
        if not new:
            return done
        for pid in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        done |= new
    raise AssertionError(f"the processes kept changing while sending signal {signum}")


def not_stopped(pids: Iterable[int]) -> dict[int, str]:
    """Those of ``pids`` that may still run, with their states."""
    states = {pid: state(pid) for pid in pids}
    running = {pid: s for pid, s in states.items() if s is not None and s not in ("T", "Z")}
    if any(letter == "D" for letter in running.values()):
        # A shell waits in vfork (uninterruptibly) for its child to exec: a child stopped before
        # that holds it there, as stopped as it would be itself (its SIGSTOP stays pending).
        stopped = {pid for pid, letter in states.items() if letter == "T"}
        held = {ppid for pid, ppid in _parents().items() if pid in stopped}
        running = {
            pid: letter for pid, letter in running.items() if letter != "D" or pid not in held
        }
    return running


def _described(states: dict[int, str]) -> str:
    """pid, state and command line of each, for a message."""
    lines = []
    for pid, letter in states.items():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                command = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            command = "?"
        lines.append(f"{pid} ({letter}) {command}")
    return "; ".join(lines)


def _gone(pids: Iterable[int]) -> bool:
    return all(state(pid) in (None, "Z") for pid in pids)


# -- a host ---------------------------------------------------------------------------------------


class HostDaemon(DaemonProcess):
    """``spoold run`` inside a host's network namespace."""

    def __init__(self, host: Host, config: Path) -> None:
        log_path = host.bed.root / "logs" / f"h{host.n}-daemon.log"
        # nsenter execs: the pid is spoold's.
        super().__init__(host.spool, config, host.own_env(), prefix=host.nsenter(),
                         log_path=log_path)  # fmt: skip
        self.host = host

    def kill(self, *, leave_jobs: bool = False) -> None:
        """kill -9 of the daemon and every process below it (its workers, the jobs' supervisors
        and the jobs), each stopped first so that none forks meanwhile; of the daemon alone
        with ``leave_jobs`` (for another host to adopt its jobs)."""
        process = self.process
        if leave_jobs or process is None or process.poll() is not None:
            # Once reaped, its pid may be another's: no tree to look for.
            super().kill(leave_jobs=True)
            return
        pids = signal_until_stable(lambda: tree([process.pid]), signal.SIGSTOP)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait(STOP_BOUND)
        wait_for(lambda: _gone(pids), bound=STOP_BOUND, what=f"h{self.host.n}'s processes to end")

    def _end_jobs(self) -> None:
        """Nothing: the shared spool's records name every host's supervisors, and the others'
        are not this host's to end. Its own end with the host (Host.kill9), as at a machine's
        shutdown."""


class Host:
    """One host of the bed: a network namespace, its mount of the spool, and its daemon."""

    def __init__(self, bed: Bed, n: int) -> None:
        self.bed = bed
        self.n = n
        self.name = f"h{n}"
        self.netns = f"spoold-{bed.tag}-h{n}"
        self.veth = "eth0"  # the host end, in the namespace
        self.root_veth = f"sv{bed.tag}{n}"
        self.server_address = f"10.{bed.octet}.{n}.1"  # the root end: sshd, receiver
        self.address = f"10.{bed.octet}.{n}.2"
        self.spool = bed.root / "mnt" / self.name
        self.mount_process: subprocess.Popen[bytes] | None = None
        self.daemon: HostDaemon | None = None

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.netns} {self.address}>"

    def nsenter(self) -> list[str]:
        """The prefix that runs a command in this host's network namespace, and in every other
        respect (the mounts above all) as this process: unlike ``ip netns exec``."""
        return ["nsenter", f"--net=/run/netns/{self.netns}"]

    def popen(self, command: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``command`` on this host."""
        return subprocess.Popen([*self.nsenter(), *command], **kwargs)

    def run(self, command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run ``command`` on this host, with its output as text; never hangs."""
        kwargs.setdefault("timeout", DEFAULT_BOUND)
        return subprocess.run(
            [*self.nsenter(), *command], capture_output=True, text=True, check=False, **kwargs
        )

    def own_env(self) -> dict[str, str]:
        """What this host's daemon (and its CLI) has besides this process's environment: its
        own runner id and host name, since all hosts share this machine's name."""
        return {"RUNNER_ID": self.name, "RUNNER_HOSTNAME": self.name}

    def env(self) -> dict[str, str]:
        """The environment for this host's daemon (and its CLI)."""
        return {**os.environ, **self.own_env(), "PYTHONUNBUFFERED": "1"}

    @property
    def callback_url(self) -> str:
        """Where this host reaches the bed's receiver."""
        return self.bed.receiver.url_for(self.n)

    def start_daemon(self, config: Path, bound: float = DEFAULT_BOUND) -> HostDaemon:
        """``spoold run --spool <its mount> --config CONFIG`` in this host, once it is ready."""
        if self.daemon is not None and self.daemon.alive:
            raise AssertionError(f"{self.name} runs a daemon already")
        if self.daemon is None or self.daemon.config != config:
            self.daemon = HostDaemon(self, config)
        self.daemon.start(bound)
        return self.daemon

    # -- the network --

    def cut(self) -> None:
        """Take this host off the network: its end of the veth goes down."""
        _ip("-n", self.netns, "link", "set", self.veth, "down")

    def restore(self) -> None:
        """Put it back (its mount reconnects on its next operation), with its route to the
        other hosts' root ends, which the kernel dropped with the link."""
        _ip("-n", self.netns, "link", "set", self.veth, "up")
        self.route()

    def route(self) -> None:
        """Every root-end address through its own link, as one network would carry them: a
        callback adopted from another host goes to the URL that host's config named."""
        _ip("-n", self.netns, "route", "replace", f"10.{self.bed.octet}.0.0/16",
            "via", self.server_address)  # fmt: skip

    # -- its processes --

    def _members(self) -> set[int]:
        """Every process in this host's network namespace."""
        try:
            wanted = os.stat(f"/run/netns/{self.netns}").st_ino
        except FileNotFoundError:
            return set()
        found = set()
        for name in os.listdir("/proc"):
            if name.isdigit():
                with contextlib.suppress(OSError):
                    if os.stat(f"/proc/{name}/ns/net").st_ino == wanted:
                        found.add(int(name))
        return found

    def mount_processes(self) -> set[int]:
        """sshfs and its ssh: sshfs starts ssh through a double fork (ssh's parent is init,
        not sshfs), so they are told by the bed's key on their command line."""
        key = str(self.bed.client_key).encode()
        found = set()
        for pid in self._members():
            with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as handle:
                if key in handle.read():
                    found.add(pid)
        return found

    def processes(self) -> set[int]:
        """Every process of this host except its mount's (sshfs, ssh): the daemon and all below
        it, by the parent links, and whatever else runs in its network namespace (a supervisor
        orphaned by its launcher's death, a command started with ``popen``)."""
        found = self._members()
        daemon = self.daemon.process if self.daemon is not None else None
        if daemon is not None and daemon.poll() is None:  # not reaped: its pid is still its own
            found |= tree([daemon.pid])
        return found - self.mount_processes() - {os.getpid()}

    def freeze(self) -> set[int]:
        """SIGSTOP every process of the host (not its mount); returns their pids once each
        has stopped (or ended: one that ended just before is a zombie its stopped parent
        does not reap)."""
        pids = signal_until_stable(self.processes, signal.SIGSTOP)
        end = time.monotonic() + STOP_BOUND
        while running := not_stopped(pids):
            if time.monotonic() > end:
                raise AssertionError(f"{self.name}'s processes did not stop: {_described(running)}")
            # A paused machine stops all at once; one signal after another lets a worker not
            # yet stopped continue a supervisor it finds stopped (as it must for a job's
            # SIGSTOP), so whatever runs again is stopped again until nothing is left to.
            for pid in running:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
            time.sleep(0.01)
        return pids

    def thaw(self) -> set[int]:
        """SIGCONT every process of the host."""
        return signal_until_stable(self.processes, signal.SIGCONT)

    def kill9(self) -> None:
        """SIGKILL every process of the host (not its mount), frozen first so that none forks
        meanwhile, and wait until they are gone."""
        pids = self.freeze()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.daemon is not None and self.daemon.process is not None:
            self.daemon.process.wait(STOP_BOUND)
        wait_for(lambda: _gone(pids), bound=STOP_BOUND, what=f"{self.name}'s processes to end")

    def stop(self, bound: float = DEFAULT_BOUND) -> int | None:
        """Stop the daemon as systemd would (SIGTERM); then kill what is left of the host's
        processes. Returns the daemon's exit code (None if none ran)."""
        code = None
        if self.daemon is not None and self.daemon.process is not None:
            code = self.daemon.stop(bound)
        self.kill9()
        return code

    # -- its mount --

    def mount(self) -> None:
        self.spool.mkdir(mode=0o755)
        options = SSHFS_OPTIONS.format(key=self.bed.client_key, port=self.bed.ssh_port)
        source = f"root@{self.server_address}:{self.bed.server_spool}"
        log = self.bed.root / "logs" / f"{self.name}-sshfs.log"
        with open(log, "ab") as sink:
            # -f: sshfs stays this process's child, so that it is found and ended by its pid.
            self.mount_process = self.popen(
                ["sshfs", "-f", source, str(self.spool), "-o", options],
                stdout=sink, stderr=sink, start_new_session=True,
            )  # fmt: skip
        end = time.monotonic() + SETUP_BOUND
        while not os.path.ismount(self.spool):
            if self.mount_process.poll() is not None or time.monotonic() > end:
                _unavailable(f"sshfs did not mount {self.name}: {log.read_text()[-500:]}")
            time.sleep(0.02)

    def unmount(self) -> None:
        if self.mount_process is None:
            return
        subprocess.run(["fusermount3", "-uz", str(self.spool)], capture_output=True, check=False)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.mount_process.wait(STOP_BOUND)
        if self.mount_process.poll() is None:
            self.mount_process.kill()
            self.mount_process.wait(STOP_BOUND)
        # Its ssh ends as its pipe closes; one that does not is ended here.
        left = self.mount_processes()
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda: _gone(left), bound=STOP_BOUND, what=f"{self.name}'s ssh to end")


# -- the bed --------------------------------------------------------------------------------------


class Bed:
    """The server, the hosts and the receiver of one bed."""

    def __init__(self, root: Path, tag: str, octet: int, hosts: int) -> None:
        self.root = root
        self.tag = tag
        self.octet = octet
        self.server_spool = root / "server" / "spool"
        self.hosts = [Host(self, n) for n in range(1, hosts + 1)]
        self.sshd: subprocess.Popen[bytes] | None = None
        self.ssh_port = 0
        self.client_key = root / "sshd" / "client_key"  # the hosts log in with it
        self._receiver: Receiver | None = None

    def host(self, n: int) -> Host:
        """Host ``n``, counted from 1."""
        return self.hosts[n - 1]

    @property
    def receiver(self) -> Receiver:
        assert self._receiver is not None
        return self._receiver


def _in_use(octet: int, taken: str) -> bool:
    return re.search(rf"\b10\.{octet}\.", taken) is not None


def _pick_octet(salt: int) -> int:
    """A second octet no address or route of the root namespace uses (under the lock)."""
    taken = _ip("-4", "-o", "addr").stdout + _ip("-4", "route").stdout
    for step in range(190):
        octet = 64 + (salt + step) % 190
        if not _in_use(octet, taken):
            return octet
    raise RuntimeError("no free 10.x.0.0/16 for a test bed")


def _sweep_dead_beds() -> None:
    """Remove what beds of processes that no longer run left behind (a pytest killed -9):
    their processes (each names the bed's directory), mounts, links, namespaces, files."""
    names = [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line]
    dead: dict[str, list[str]] = {}
    for name in names:
        found = _NAME.match(name)
        if found is not None and not Path(f"/proc/{int(found.group(1), 16)}").exists():
            dead.setdefault(found.group(1) + found.group(2), []).append(name)
    for tag, namespaces in dead.items():
        marker = f"/spoold-netbed-{tag}-"
        for pid in processes_matching("cmdline", marker.encode().__contains__):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for line in Path("/proc/mounts").read_text().splitlines():
            if marker in line.split()[1]:
                subprocess.run(["fusermount3", "-uz", line.split()[1]], check=False)
        for name in namespaces:
            _ip("link", "del", f"sv{tag}{name.rsplit('-h', 1)[1]}", check=False)
            _ip("netns", "del", name, check=False)
        for directory in Path(tempfile.gettempdir()).glob(f"spoold-netbed-{tag}-*"):
            shutil.rmtree(directory, ignore_errors=True)


def _require() -> None:
    for program in ("sshfs", "fusermount3", "nsenter", "ip", "ssh"):
        if shutil.which(program) is None:
            _unavailable(f"{program} is not installed (make system-deps)")
    if not Path(SSHD).exists():
        _unavailable(f"{SSHD} is not installed")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        _unavailable("/dev/fuse is missing or not ours")
    if os.geteuid() != 0:
        _unavailable("network namespaces and veths need root")


def _network(bed: Bed, stack: contextlib.ExitStack) -> None:
    for host in bed.hosts:
        done = _ip("netns", "add", host.netns, check=False)
        if done.returncode != 0:
            _unavailable(f"ip netns add: {done.stderr.strip()}")
        stack.callback(_ip, "netns", "del", host.netns, check=False)
        # Its peer goes with it; deleted explicitly since a namespace's end is asynchronous.
        stack.callback(_ip, "link", "del", host.root_veth, check=False)
        _ip("link", "add", host.root_veth, "type", "veth",
            "peer", "name", host.veth, "netns", host.netns)  # fmt: skip
        _ip("addr", "add", f"{host.server_address}/30", "dev", host.root_veth)
        _ip("link", "set", host.root_veth, "up")
        _ip("-n", host.netns, "addr", "add", f"{host.address}/30", "dev", host.veth)
        _ip("-n", host.netns, "link", "set", host.veth, "up")
        _ip("-n", host.netns, "link", "set", "lo", "up")
        host.route()


def _common_port(addresses: list[str]) -> int:
    """A port that no socket uses on any of ``addresses`` right now."""
    for _ in range(50):
        with contextlib.ExitStack() as held:
            port = 0
            try:
                for address in addresses:
                    sock = held.enter_context(socket.socket())
                    sock.bind((address, port))
                    port = sock.getsockname()[1]
            except OSError:
                continue
            return port
    raise RuntimeError("no port free on every host address")


def _sshd(bed: Bed, stack: contextlib.ExitStack) -> None:
    """Start the server, with a key for the hosts to log in with."""
    directory = bed.root / "sshd"
    directory.mkdir()
    host_key = keygen(directory / "host_key")
    keygen(bed.client_key)
    authorized = directory / "authorized_keys"
    shutil.copy(directory / "client_key.pub", authorized)
    addresses = [host.server_address for host in bed.hosts]
    errors = directory / "sshd.err"
    for _ in range(5):  # another port if one was taken between the look and sshd's bind
        port = _common_port(addresses)
        config = directory / "sshd_config"
        config.write_text(
            "".join(f"ListenAddress {address}:{port}\n" for address in addresses)
            + f"HostKey {host_key}\nAuthorizedKeysFile {authorized}\n"
            f"PidFile {directory / 'sshd.pid'}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
            "UsePAM no\nStrictModes no\nPermitRootLogin yes\nSubsystem sftp internal-sftp\n"
            "MaxStartups 100\nLogLevel ERROR\n"
        )
        with errors.open("ab") as sink:
            process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)],
                                       stdout=sink, stderr=sink, start_new_session=True)  # fmt: skip
        bed.sshd, bed.ssh_port = process, port
        stack.callback(_end, process)
        end = time.monotonic() + SETUP_BOUND
        while process.poll() is None and time.monotonic() < end:
            try:
                for address in addresses:
                    socket.create_connection((address, port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.02)
    _unavailable(f"sshd did not listen on the hosts' addresses: {errors.read_text()[-500:]}")


def _end(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a server and the processes below it (an sshd's sessions)."""
    pids = tree([process.pid])
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait(STOP_BOUND)
    wait_for(lambda: _gone(pids), bound=STOP_BOUND, what="the bed's sshd to end")


def _leftovers(bed: Bed) -> list[str]:
    names = set(_ip("netns", "list").stdout.split())
    links = _ip("-br", "link").stdout.split()
    mounts = Path("/proc/mounts").read_text()
    found = [f"namespace {h.netns}" for h in bed.hosts if h.netns in names]
    found += [f"link {h.root_veth}" for h in bed.hosts if any(
        link.split("@")[0] == h.root_veth for link in links)]  # fmt: skip
    found += [f"mount {h.spool}" for h in bed.hosts if f" {h.spool} " in mounts]
    return found


@contextlib.contextmanager
def make_bed(hosts: int = HOSTS) -> Iterator[Bed]:
    """A bed of ``hosts`` hosts, torn down in reverse whatever happens; a leftover namespace,
    link or mount after that fails the caller."""
    if not 1 <= hosts <= 250:
        raise ValueError(f"hosts: 1 to 250, not {hosts}")
    _require()
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    tag = f"{os.getpid():06x}{next(_sequence) % 256:02x}"
    root = Path(tempfile.mkdtemp(prefix=f"spoold-netbed-{tag}-"))
    root.chmod(0o711)  # the job user passes through to its job's files on a mount
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        with open(_LOCK, "a") as lock:
            # From the pick of the octet until its addresses are there, for no other bed to
            # take the same one.
            fcntl.flock(lock, fcntl.LOCK_EX)
            _sweep_dead_beds()
            bed = Bed(root, tag, _pick_octet(os.getpid() * 7 + int(tag[-2:], 16)), hosts)
            _network(bed, stack)
        for part in ("server/spool", "mnt", "logs"):
            (root / part).mkdir(parents=True)
        (root / "mnt").chmod(0o711)
        _sshd(bed, stack)
        # A host cut off, or whose namespace is gone, never closes its connections: idle ones
        # are closed after a second.
        addresses = {h.n: h.server_address for h in bed.hosts}
        bed._receiver = Receiver(addresses=addresses, idle=1.0).start()
        stack.callback(bed.receiver.stop)
        for host in bed.hosts:
            stack.callback(host.unmount)
            host.mount()
        # First of all at the end: the hosts' processes, which may hold their mounts busy.
        for host in bed.hosts:
            stack.callback(host.kill9)
        yield bed
    if left := _leftovers(bed):
        raise AssertionError(f"the test bed left behind: {', '.join(left)}")


@pytest.fixture(name="netbed")
def netbed_fixture() -> Iterator[Bed]:
    """A bed of three hosts for one test."""
    with make_bed() as bed:
        yield bed
