"""Job supervisors kept for a next unit: reused while jobs come, let go when none does."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

import spoold
from spoold.core.procfs import descendants
from spoold.run.launcher import (
    IDLE_SUPERVISOR_FOR,
    Chore,
    Launcher,
    LauncherError,
    _receive,
    _remove_tree,
    _send,
)
from spoold.run.process import RunAs
from tests.harness import (
    WORKER_PROCESS,
    DaemonProcess,
    RunnerBench,
    daemon_children,
    drop,
    local_job,
    running,
    wait_finished,
    wait_for,
    write_config,
)

LOGGER = logging.getLogger("spoold.test")


def _supervisor_of(final: Path) -> int:
    """The pid of the supervisor that ran the job's one unit, as its record names it."""
    [record] = [p for p in (final / "units").iterdir() if not p.name.endswith(".end")]
    pid = json.loads(record.read_text())["pid"]
    assert isinstance(pid, int)
    return pid


def test_a_supervisor_runs_the_next_unit_and_is_let_go_after_waiting_idle(tmp_path: Path) -> None:
    launcher = Launcher()
    try:
        bench = RunnerBench(tmp_path, launcher)
        first = _supervisor_of(bench.run("one"))
        assert _supervisor_of(bench.run("two")) == first, "the idle supervisor runs the next job"
        released = time.monotonic()
        due = launcher.expire(released)
        assert due is not None and released < due <= released + IDLE_SUPERVISOR_FOR
        assert launcher.expire(due - 0.5) == due, "kept until it has waited that long"
        assert running(first)
        assert launcher.expire(due) is None, "none kept once it has"
        wait_for(lambda: not running(first), what="the idle supervisor to end")
        assert _supervisor_of(bench.run("three")) != first, "a new one for the next job"
    finally:
        launcher.close()


def test_a_work_dir_is_removed_empty_or_full_and_a_gone_one_is_said(tmp_path: Path) -> None:
    """Most jobs leave their work dir empty: one rmdir; what a job left, modes and all, goes
    through rmtree."""
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _remove_tree(str(empty)) is True and not empty.exists()
    assert _remove_tree(str(empty)) is False, "nothing was there"
    full = tmp_path / "full"
    (full / "out").mkdir(parents=True)
    (full / "out" / "r.txt").write_text("made\n")
    (full / "out").chmod(0o500)
    assert _remove_tree(str(full)) is True and not full.exists()


def test_a_work_dir_left_before_it_was_given_to_its_user_is_finished_on_adoption(
    tmp_path: Path,
) -> None:
    """Root makes a job user's work dir, then gives it to them: a daemon killed between the
    two left it root's, and the next one failed the adopted job ("exists and is not this
    job's work dir", seen in the kill -9 chaos test). It finishes the making instead; a
    directory of another user, or a file, is still refused."""
    if os.geteuid() != 0:
        pytest.fail("this test runs as root (it makes a directory for another user)")
    user = RunAs.lookup("spoold-job")
    work = tmp_path / "work"
    work.mkdir()
    left = work / "j.1.abc"
    left.mkdir(mode=0o755)  # made, not yet chmodded nor chowned: the daemon was killed here
    launcher = Launcher(chores_here=True)
    assert launcher.chore(Chore("mkdir", user, str(left), mode=0o700)) is True
    info = left.stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (user.uid, user.gid, 0o700)
    assert launcher.chore(Chore("mkdir", user, str(left), mode=0o700)) is False, "adopted as it is"
    other = work / "j.2.def"
    other.mkdir()
    os.chown(other, 1, 1)  # daemon: not root's, not the job user's
    file = work / "j.3.ghi"
    file.write_text("")
    for path in (other, file):
        with pytest.raises(LauncherError, match="exists and is not this job's work dir"):
            launcher.chore(Chore("mkdir", user, str(path), mode=0o700))


def test_a_message_and_its_descriptors_arrive_whole_when_a_send_falls_short() -> None:
    """A frame (length and pickle) goes in one system call; one that does not fit at once
    (here: a socket that sends only what its buffer takes) is finished after, and the
    descriptors that rode on its start arrive with it."""
    ours, theirs = socket.socketpair()
    read_end, write_end = os.pipe()
    message = {"kind": "large", "data": os.urandom(4 << 20)}  # far beyond the socket's buffer
    ours.settimeout(30.0)  # sendmsg then returns once what fits is sent
    received: list[tuple[object, list[int]]] = []
    reader = threading.Thread(target=lambda: received.append(_receive(theirs)))
    try:
        reader.start()
        _send(ours, message, (write_end,))
        reader.join(30.0)
        [(got, fds)] = received
        assert got == message
        assert len(fds) == 1
        os.write(fds[0], b"!")
        assert os.read(read_end, 1) == b"!", "the descriptor is the pipe's write end"
        os.close(fds[0])
    finally:
        for fd in (read_end, write_end):
            os.close(fd)
        ours.close()
        theirs.close()


def test_the_longest_idle_goes_first() -> None:
    launcher = Launcher()
    old, old_end = socket.socketpair()
    new, new_end = socket.socketpair()
    with old_end, new_end:
        launcher.release(old, 100.0)
        launcher.release(new, 103.0)
        assert launcher.expire(104.0) == 100.0 + IDLE_SUPERVISOR_FOR
        assert launcher.expire(100.0 + IDLE_SUPERVISOR_FOR) == 103.0 + IDLE_SUPERVISOR_FOR
        assert old_end.recv(1) == b"", "let go: its supervisor reads end of file"
        new_end.setblocking(False)
        with pytest.raises(BlockingIOError):
            new_end.recv(1)  # still kept
        launcher.close()
        assert new_end.recv(1) == b""


@pytest.mark.daemon
def test_an_idle_daemon_lets_its_job_supervisors_go(spool_dir: Path, tmp_path: Path) -> None:
    """After a burst of jobs, the daemon keeps no supervisor waiting for a job that does not
    come: each holds ~7 MiB of its own."""
    daemon = DaemonProcess(spool_dir, write_config(tmp_path / "c.yaml", spool_dir))
    try:
        daemon.start()
        for n in range(4):
            drop(spool_dir, f"b{n}.yaml", local_job(f"b{n}", "true"))
        pids = set()
        for n in range(4):
            directory, status = wait_finished(spool_dir, f"b{n}")
            assert status["state"] == "succeeded", status
            pids.add(_supervisor_of(spool_dir / directory / f"b{n}"))
        wait_for(lambda: not any(running(pid) for pid in pids), bound=IDLE_SUPERVISOR_FOR + 20,
                 what="the idle supervisors to end")  # fmt: skip
        assert daemon.alive
    finally:
        daemon.stop()


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _launchers(daemon: DaemonProcess) -> list[int]:
    assert daemon.pid is not None
    return [
        pid for pid in descendants([daemon.pid]) if _comm(pid) == "spoold-launcher" and running(pid)
    ]  # fmt: skip


def _the_launcher(daemon: DaemonProcess) -> int:
    """The daemon's one launcher, once it has named itself: READY does not wait for that (the
    worker processes queue their requests on its socket meanwhile)."""
    [launcher] = wait_for(lambda: _launchers(daemon), what="the launcher to name itself")
    return launcher


def _run_together(spool: Path, tmp_path: Path, prefix: str, count: int = 4) -> set[int]:
    """Run ``count`` jobs at once (each waits for all to have started: both worker processes
    run some); the supervisors that ran them."""
    gate = tmp_path / f"{prefix}-gate"
    gate.mkdir()
    gate.chmod(0o777)  # the jobs' user writes here
    for n in range(count):
        wait = (f"touch {gate}/{n} && i=0 && while [ $(ls {gate} | wc -l) -lt 2 ]; do "
                "sleep 0.05; i=$((i+1)); [ $i -lt 400 ] || exit 9; done")  # fmt: skip
        drop(spool, f"{prefix}{n}.yaml", local_job(f"{prefix}{n}", wait))
    found = set()
    for n in range(count):
        directory, status = wait_finished(spool, f"{prefix}{n}")
        assert status["state"] == "succeeded", status
        found.add(_supervisor_of(spool / directory / f"{prefix}{n}"))
    return found


@pytest.mark.daemon
def test_the_worker_processes_share_one_launcher(spool_dir: Path, tmp_path: Path) -> None:
    """One launcher for the daemon, not one per worker process (an interpreter, ~16 MiB RSS,
    fewer each); a worker process that replaces a dead one is handed a socket to it too."""
    # Kept for the test's life: one that left while idle would start a launcher anew.
    config = write_config(tmp_path / "c.yaml", spool_dir, worker_processes=2, worker_idle_exit=0)
    daemon = DaemonProcess(spool_dir, config)
    try:
        daemon.start()
        assert len(daemon_children(daemon, WORKER_PROCESS)) == 2
        launcher = _the_launcher(daemon)
        # ps -o comm and top tell the roles apart (and the benchmarks count CPU by them)
        workers = daemon_children(daemon, WORKER_PROCESS)
        wait_for(lambda: {_comm(pid) for pid in workers} == {"spoold-worker"},
                 what="the worker processes to name themselves")  # fmt: skip
        supervisors = _run_together(spool_dir, tmp_path, "a")
        assert len(supervisors) >= 2, "the jobs ran side by side"
        alive = [pid for pid in supervisors if running(pid)]  # idle, for a next job
        assert alive, supervisors
        assert {_parent(pid) for pid in alive} == {launcher}, "forked by the one launcher"
        dead = daemon_children(daemon, WORKER_PROCESS)[0]
        os.kill(dead, signal.SIGKILL)
        wait_for(lambda: dead not in daemon_children(daemon, WORKER_PROCESS)
                 and len(daemon_children(daemon, WORKER_PROCESS)) == 2, what="the worker process replaced")  # fmt: skip
        _run_together(spool_dir, tmp_path, "b")
        assert _launchers(daemon) == [launcher], "the replacement uses the daemon's launcher"
    finally:
        daemon.stop()


@pytest.mark.daemon
def test_a_launcher_carries_neither_site_nor_the_jobs_model(
    spool_dir: Path, tmp_path: Path
) -> None:
    """Each job supervisor is a fork of the launcher and counts again every page it holds
    (a flood starts two): the launcher starts without site, and imports what a unit cost
    (``spoold.core.usage``), not the job's model, its limits and its retry policy; and no
    dataclasses (inspect with it, and each class's methods compiled at import: ~1.2 MiB).

    Its own command line, run with ``serve()`` replaced by a look at what it imported."""
    config = write_config(tmp_path / "c.yaml", spool_dir, worker_processes=1, worker_idle_exit=0)
    daemon = DaemonProcess(spool_dir, config)
    try:
        daemon.start()
        argv = Path(f"/proc/{_the_launcher(daemon)}/cmdline").read_bytes().split(b"\0")[:-1]
    finally:
        daemon.stop()
    *interpreter, code, _socket = (arg.decode() for arg in argv)
    assert interpreter[-2:] == ["-S", "-c"], interpreter
    look = "import json; print(json.dumps([sorted(sys.modules), spoold.__file__]))"
    assert code.endswith("serve()")
    probe = subprocess.run([*interpreter, f"{code.removesuffix('serve()')}import spoold; {look}"],
                           capture_output=True, text=True, check=True, cwd="/", timeout=60)  # fmt: skip
    modules, where = json.loads(probe.stdout)
    assert "site" not in modules
    assert "spoold.core.usage" in modules
    assert not {"spoold.core.job", "spoold.core.limits", "spoold.core.retry"} & set(modules)
    assert not {"dataclasses", "inspect"} & set(modules)
    assert where == spoold.__file__, "the very spoold the daemon runs"


@pytest.mark.daemon
def test_a_worker_process_imports_only_the_executors_it_runs(
    spool_dir: Path, tmp_path: Path
) -> None:
    """The daemon checked every plugin; its worker processes import one when a job needs it.
    The docker and invoicing executors' modules bring http.client and with it ssl (~3 MiB
    and ~16 ms of each start): a worker process that ran only local jobs has not mapped it."""
    # Kept for the test's life: counted after the jobs.
    config = write_config(tmp_path / "c.yaml", spool_dir, worker_processes=2, worker_idle_exit=0)
    daemon = DaemonProcess(spool_dir, config)
    try:
        daemon.start()
        supervisors = _run_together(spool_dir, tmp_path, "a")
        assert len(supervisors) >= 2, "both worker processes ran a job"
        workers = daemon_children(daemon, WORKER_PROCESS)
        assert len(workers) == 2
        for pid in workers:
            maps = Path(f"/proc/{pid}/maps").read_text()
            assert "/_ssl." not in maps, f"worker process {pid} imported ssl"
            assert "/_yaml." in maps, "the check can see an extension module"
        assert "/_ssl." in Path(f"/proc/{daemon.pid}/maps").read_text(), "the daemon loads all"
    finally:
        daemon.stop()


@pytest.mark.daemon
def test_a_worker_process_whose_launcher_is_gone_starts_its_own(
    spool_dir: Path, tmp_path: Path
) -> None:
    daemon = DaemonProcess(spool_dir, write_config(tmp_path / "c.yaml", spool_dir))
    try:
        daemon.start()
        launcher = _the_launcher(daemon)
        os.kill(launcher, signal.SIGKILL)  # the OOM killer, before any job ran
        wait_for(lambda: launcher not in _launchers(daemon), what="the launcher gone")
        _run_together(spool_dir, tmp_path, "c")
        assert daemon.alive
        assert launcher not in _launchers(daemon) and _launchers(daemon), "their own now"
    finally:
        daemon.stop()


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
