"""What /proc says about processes: start times (to tell a live pid from a reused one), groups,
sessions, children, environments and signal state; and the cgroup v2 directories that hold a
run's processes whatever they do (``cgroup_home``, ``kill_cgroup``)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

# Indexes into the fields of /proc/<pid>/stat after the command name (field 3 is index 0).
_STATE, _PGRP, _SESSION, _STARTTIME = 0, 2, 3, 19
_BLOCKED, _IGNORED = 29, 30  # the calling thread's signal mask; the process's ignored signals
_PR_SET_NAME = 15
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_DUMPABLE = 4


def _stat_fields(pid: int | str) -> list[str] | None:
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        stat = os.read(fd, 4096).decode(errors="replace")
    except OSError:
        return None
    finally:
        os.close(fd)
    return _fields_of(stat)


def _fields_of(stat: str) -> list[str]:
    # The command name (field 2) may contain spaces and parentheses; the fields after it do not.
    return stat.rsplit(")", 1)[1].split()


def process_start_time(pid: int) -> int | None:
    """The start time of a process in clock ticks since boot, or None if it is gone."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[_STARTTIME])


def started_at(ticks: int) -> datetime | None:
    """The wall-clock time of a process start time (``process_start_time``: clock ticks since
    boot); None if /proc does not say when it booted."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            boot = next(int(line.split()[1]) for line in stat if line.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return None
    return datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"), UTC)


def led_by(leaders: Mapping[int, int]) -> list[int]:
    """Processes in a group or a session of ``leaders`` (an id, with the start time in clock
    ticks of the process whose pid it is) that started no earlier than that leader: a later
    group or session of the same id is another's, made once the first had no member left."""

    def member(stat: bytes) -> bool:
        try:
            fields = _fields_of(stat.decode(errors="replace"))
            group, session = int(fields[_PGRP]), int(fields[_SESSION])
            start = int(fields[_STARTTIME])
        except (IndexError, ValueError):
            return False
        return any(
            (led := leaders.get(leader)) is not None and start >= led for leader in (group, session)
        )

    return processes_matching("stat", member)


def processes_matching(part: str, matches: Callable[[bytes], bool]) -> list[int]:
    """Processes whose /proc/<pid>/``part`` (cmdline, environ, ...) satisfies ``matches``."""
    found = []
    with os.scandir("/proc") as entries:
        for proc in entries:
            if not proc.name.isdigit():
                continue
            try:
                with open(f"/proc/{proc.name}/{part}", "rb") as handle:
                    content = handle.read()
            except OSError:
                continue  # gone, or not ours to read
            if matches(content):
                found.append(int(proc.name))
    return found


def process_of_user(uid: int) -> int | None:
    """A process of ``uid``'s that runs now, other than this one; None if none does (as far
    as /proc shows: each entry belongs to its process's user, root for one not dumpable)."""
    me = str(os.getpid())
    with os.scandir("/proc") as entries:
        for proc in entries:
            if not proc.name.isdigit() or proc.name == me:
                continue
            try:
                owner = proc.stat(follow_symlinks=False).st_uid
            except OSError:
                continue  # gone
            if owner == uid:
                return int(proc.name)
    return None


def processes_with_environment(entry: str) -> list[int]:
    """Processes whose environment holds ``entry`` ("NAME=value") as it was at their start.

    Every job process of spoold's starts with ``SPOOLD_JOB_DIR`` naming its job: its
    processes are found even when no lease names them (a crash right after the spawn) and
    when they left the job's process group.
    """
    wanted = entry.encode()
    return processes_matching("environ", lambda environment: wanted in environment.split(b"\0"))


class ProcessInfo(NamedTuple):
    """What /proc/<pid>/stat says about one process."""

    pid: int
    state: str  # R, S, D, Z, ...
    pgrp: int
    session: int
    start: int  # clock ticks since boot

    @property
    def zombie(self) -> bool:
        """Ended, waiting for its parent to reap it."""
        return self.state == "Z"


def process_info(pid: int) -> ProcessInfo | None:
    """The process ``pid``, or None if it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return ProcessInfo(
        pid, fields[_STATE], int(fields[_PGRP]), int(fields[_SESSION]), int(fields[_STARTTIME])
    )


def children(pid: int, thread: int | None = None) -> list[int]:
    """The child processes of ``pid``: of all its threads, or of ``thread`` alone.

    Linux lists a child under the thread that started it, and an adopted orphan under the
    first live thread of its new parent: the main thread.
    """
    threads = [thread] if thread is not None else _threads(pid)
    found: list[int] = []
    for tid in threads:
        try:
            fd = os.open(f"/proc/{pid}/task/{tid}/children", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # the thread or the process is gone
        try:
            found.extend(int(child) for child in _read_all(fd).split())
        except OSError:
            continue
        finally:
            os.close(fd)
    return found


def descendants(pids: Iterable[int]) -> list[int]:
    """Every process below ``pids`` (children, their children, ...), ``pids`` not included."""
    found: list[int] = []
    seen = set(pids)
    todo = list(seen)
    while todo:
        for child in children(todo.pop()):
            if child not in seen:
                seen.add(child)
                found.append(child)
                todo.append(child)
    return found


def environment_value(pid: int, name: str) -> str | None:
    """The value of ``name`` in the environment ``pid`` started with; None if it has none, or
    if that cannot be read (gone, a zombie, or not ours to read)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            environment = handle.read()
    except OSError:
        return None
    prefix = name.encode() + b"="
    for entry in environment.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix) :].decode(errors="replace")
    return None


def signal_state() -> tuple[int, int] | None:
    """(blocked, ignored) signals of the calling thread, as bit masks (bit n-1 is signal n);
    None if /proc cannot tell."""
    fields = _stat_fields("thread-self")
    if fields is None:
        return None
    return int(fields[_BLOCKED]), int(fields[_IGNORED])


class _Dropped:
    """Whether drop_ambient_capabilities has run here: then there are none, for good (spoold
    never raises one, and a change of user only takes them away), and a supervisor's start
    of each job as its user needs no read of /proc to know it."""

    ambient = False


def ambient_capabilities() -> int:
    """This process's ambient capabilities (a bit mask; 0 if /proc cannot tell)."""
    if _Dropped.ambient:
        return 0
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            line = next((line for line in status if line.startswith("CapAmb:")), "CapAmb: 0")
    except OSError:
        return 0
    return int(line.split()[1], 16)


def ambient_clearer() -> Callable[[], object] | None:
    """What drops every ambient capability, for a child between fork and exec (one C call,
    prepared here); None when this process has none to drop.

    For a child about to exec a job as another user: the daemon of the Debian package holds
    CAP_SETUID, CAP_SETGID and CAP_KILL as ambient capabilities, and a change between two
    uids that are not root keeps them, so a job would run with them (and could become root).
    """
    if not ambient_capabilities():
        return None
    return functools.partial(_libc().prctl, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)


def drop_ambient_capabilities() -> None:
    """Drop this process's ambient capabilities for good (its permitted and effective ones
    stay): nothing it execs from now on inherits them."""
    clear = ambient_clearer()
    if clear is not None:
        clear()
    _Dropped.ambient = not ambient_capabilities()


def make_dumpable() -> None:
    """Mark this process dumpable again, as it was before a change of its effective user id
    reset the mark (which makes its /proc entries root's and bars its own user from them)."""
    _libc().prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)


@functools.cache
def _libc() -> Any:
    import ctypes  # noqa: PLC0415 - only processes that call into the C library need it

    return ctypes.CDLL(None, use_errno=True)


def become_child_subreaper() -> bool:
    """Make this process the parent of its descendants' orphans (PR_SET_CHILD_SUBREAPER),
    instead of init; False, changing nothing, where that is not possible or where Linux
    cannot list a thread's children (CONFIG_PROC_CHILDREN), which finding them needs."""
    if not Path(f"/proc/self/task/{os.getpid()}/children").exists():
        return False
    return int(_libc().prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0


def _threads(pid: int) -> list[str]:
    try:
        with os.scandir(f"/proc/{pid}/task") as entries:
            return [entry.name for entry in entries]
    except OSError:
        return []


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


#: The name of every cgroup spoold makes starts so: none other is ever killed or removed.
CGROUP_PREFIX = "spoold-"


@functools.cache
def cgroup_home() -> str | None:
    """The directory of this process's cgroup in the cgroup v2 hierarchy, where one is mounted
    (a systemd host's /sys/fs/cgroup, a hybrid one's /sys/fs/cgroup/unified) and this process
    may make cgroups in it (root, or a service with ``Delegate=yes``); None otherwise. Read
    once: the process it is asked for does not move (a supervisor steps into a run's cgroup
    only for the moment of a start)."""
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as handle:
            own = next((line[3:].rstrip("\n") for line in handle if line.startswith("0::")), None)
        with open("/proc/self/mountinfo", encoding="utf-8") as handle:
            mounts = [line.split() for line in handle]
    except (OSError, UnicodeDecodeError):
        return None
    for fields in mounts:
        if "-" in fields and fields[fields.index("-") + 1 :][:1] == ["cgroup2"]:
            root, mount = fields[3], fields[4]
            break
    else:
        return None
    if own is None or not own.startswith("/") or own.endswith(" (deleted)"):
        return None
    if root != "/":  # a mount of part of the tree: own is relative to the whole
        if own != root and not own.startswith(root + "/"):
            return None
        own = own[len(root) :] or "/"
    home = mount.rstrip("/") + (own if own != "/" else "")
    return home if os.access(home, os.W_OK | os.X_OK) else None


def is_spoold_cgroup(path: str) -> bool:
    """Whether ``path`` is a cgroup spoold made (see ``make_cgroup``) in this process's own
    cgroup (``cgroup_home``): a record of a run names one, and nothing else is killed or
    removed for it (not another service's, nor one of another spoold's runs elsewhere)."""
    home = cgroup_home()
    return (
        home is not None
        and os.path.normpath(path) == path
        and str(Path(path).parent) == home
        and Path(path).name.startswith(CGROUP_PREFIX)
        and Path(f"{path}/cgroup.kill").is_file()
    )


def make_cgroup(home: str, name: str) -> str | None:
    """A new cgroup ``CGROUP_PREFIX + name`` in ``home``; None if it cannot be made."""
    path = f"{home}/{CGROUP_PREFIX}{name}"
    try:
        Path(path).mkdir()
    except OSError:
        return None
    return path


def _write_cgroup_file(path: str, data: bytes) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        os.write(fd, data)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def enter_cgroup(path: str) -> bool:
    """Move this whole process (every thread) into the cgroup at ``path``; False if it stays
    where it is. A child it starts meanwhile is born there, out of reach of its parent's
    cgroup, and so is all it starts in turn."""
    return _write_cgroup_file(f"{path}/cgroup.procs", b"0")


def cgroup_members(path: str) -> list[int]:
    """The processes in the cgroup at ``path`` now (not its zombies); [] if it is gone."""
    try:
        fd = os.open(f"{path}/cgroup.procs", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        return [int(pid) for pid in _read_all(fd).split()]
    except OSError:
        return []
    finally:
        os.close(fd)


def cgroup_populated(path: str) -> bool:
    """Whether a live process is in the cgroup at ``path`` (False if it is gone)."""
    return b"populated 1" in _cgroup_events(path)


def _cgroup_events(path: str) -> bytes:
    """The cgroup's cgroup.events ("populated 1", "frozen 0" lines); empty if it is gone."""
    try:
        with open(f"{path}/cgroup.events", "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def freeze_cgroup(path: str, frozen: bool) -> bool:
    """Freeze (or thaw) every process in the cgroup at ``path`` (cgroup.freeze, Linux 5.2),
    those it starts meanwhile with them; False where the kernel cannot. A frozen process runs
    no code of its own: it can neither fork nor leave, and what is signalled to it waits for
    the thaw, SIGKILL apart. The freeze takes effect asynchronously: ``cgroup_frozen`` says
    when it has."""
    return _write_cgroup_file(f"{path}/cgroup.freeze", b"1" if frozen else b"0")


def cgroup_frozen(path: str) -> bool:
    """Whether every process in the cgroup at ``path`` is frozen now (False if it is gone)."""
    return b"frozen 1" in _cgroup_events(path)


def kill_cgroup(path: str) -> bool:
    """SIGKILL every process in the cgroup at ``path`` at once (cgroup.kill, Linux 5.14): one
    that forks meanwhile cannot get a child past it, as a sweep over pids can. False where
    the kernel has no cgroup.kill; the caller then signals ``cgroup_members`` one by one."""
    return _write_cgroup_file(f"{path}/cgroup.kill", b"1")


def remove_cgroup(path: str) -> bool:
    """Remove the cgroup at ``path``, which must be empty; False if it is not (or is gone)."""
    try:
        Path(path).rmdir()
    except OSError:
        return False
    return True


def boot_id() -> str | None:
    """This boot's id: a process recorded under another boot cannot be running now."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return None


class Machine(NamedTuple):
    """Which machine, boot and process namespace a record was written in: where its pids mean
    something. Two hosts given one host id (cloned VMs, a copied config) differ here."""

    machine_id: str | None
    boot_id: str | None
    pid_ns: int | None

    def fields(self) -> dict[str, str | int | None]:
        """As a lease or a host record holds it."""
        return {"machine_id": self.machine_id, "boot_id": self.boot_id, "pid_ns": self.pid_ns}

    def relation(self, record: Mapping[str, object]) -> str:
        """Where ``record`` (a lease, a host record) was written, seen from this machine:
        ``here`` (its pids are this machine's), ``before`` (this machine, an earlier boot:
        nothing of it runs) or ``elsewhere`` (another machine, or another process namespace
        on this kernel: nothing here says whether it runs). A field a record lacks (written
        by an older spoold) is taken as this machine's."""
        machine = record.get("machine_id")
        if machine is not None and self.machine_id is not None and machine != self.machine_id:
            return "elsewhere"
        if (boot := record.get("boot_id")) is not None and boot != self.boot_id:
            return "before"
        ns = record.get("pid_ns")
        return "elsewhere" if ns is not None and ns != self.pid_ns else "here"


def this_machine() -> Machine:
    """This process's ``Machine``: /etc/machine-id, the boot id, its pid namespace."""
    machine = None
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path, encoding="ascii") as handle:
                machine = handle.read().strip() or None
        except (OSError, ValueError):
            continue
        if machine:
            break
    try:
        ns: int | None = Path("/proc/self/ns/pid").stat().st_ino
    except OSError:
        ns = None
    return Machine(machine, boot_id(), ns)


def name_process(name: str) -> None:
    """Set this process's name as ps and top show it (``comm``, at most 15 bytes)."""
    _libc().prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def release_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim), after a burst of
    short-lived allocations (compiling a validator, a large intake) that would otherwise stay
    in the process's resident size; nothing where the C library has no malloc_trim."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)
