"""A full disk under the real daemon: a 2 MB tmpfs mounted as the spool.

The daemon must not die and must not lose a job file; once there is room again, the job runs.
Needs root (mount); without it the tests skip, unless CI=true, where they fail.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import yaml

from tests.harness import (
    DaemonProcess,
    found_in,
    job_state,
    kill_processes_with,
    local_job,
    process_token,
    run_cli,
    tmpfs,
    wait_finished,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.daemon

IN_MODIFY, IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE = 0x2, 0x40, 0x80, 0x100


class Inotify:
    """What happens to the names in one directory, as the kernel reports it."""

    def __init__(self, directory: Path, mask: int) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if self._libc.inotify_add_watch(self._fd, os.fsencode(directory), mask) < 0:
            os.close(self._fd)
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {directory}")
        self.events: list[tuple[int, str]] = []

    def poll(self) -> list[tuple[int, str]]:
        """Read what arrived since the last call; return every event seen so far."""
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return self.events
            offset = 0
            while offset < len(data):
                _, mask, _, length = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16 : offset + 16 + length].rstrip(b"\0")
                self.events.append((mask, os.fsdecode(name)))
                offset += 16 + length

    def count(self, mask: int, name: str | None = None, contains: str = "") -> int:
        return sum(
            1 for m, n in self.poll() if m & mask and (name is None or n == name) and contains in n
        )

    def close(self) -> None:
        os.close(self._fd)


@pytest.fixture
def small_spool(tmp_path: Path) -> Iterator[Path]:
    """A spool and the jobs' work root alone on a 2 MB tmpfs; spoold's own log
    (tmp_path/daemon.log) stays off it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    spool = disk / "spool"
    with tmpfs(disk, "2m"):
        result = run_cli(spool, "init")
        assert result.returncode == 0, result.stderr
        yield spool


@pytest.fixture
def token() -> Iterator[str]:
    """A mark for the command lines of this test's jobs, so that none outlives the test."""
    mark = process_token("spoold-disk")
    yield mark
    kill_processes_with(mark)


def fill(path: Path) -> None:
    """Write ``path`` until the filesystem has not one byte left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    assert os.statvfs(path).f_bavail == 0


def read_if_there(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def is_full(path: Path) -> bool:
    return os.statvfs(path).f_bavail == 0


def start_daemon(spool: Path, tmp_path: Path) -> DaemonProcess:
    config = write_config(tmp_path / "config.yaml", spool, workers=1,
                          workdir=str(spool.parent / "work"))  # fmt: skip
    daemon = DaemonProcess(spool, config)
    daemon.log_path = tmp_path / "daemon.log"  # off the small disk
    daemon.start()
    return daemon


def test_full_disk_keeps_the_file_and_runs_it_once_there_is_room(
    small_spool: Path, tmp_path: Path
) -> None:
    spool = small_spool
    daemon = start_daemon(spool, tmp_path)
    watch = Inotify(spool / "incoming", IN_MOVED_FROM | IN_MOVED_TO)
    try:
        text = yaml.safe_dump(local_job("after-full", "echo ran"))
        (spool / "tmp" / ".job").write_text(text)  # written while there was room
        fill(spool / "filler")
        os.rename(spool / "tmp" / ".job", spool / "incoming" / "after-full.yaml")

        # The daemon took it (a rename out of incoming/) and, unable to write the job's
        # status on the full disk, put it back (a rename into incoming/ besides ours).
        def tried_and_returned() -> bool:
            return (
                watch.count(IN_MOVED_FROM, "after-full.yaml") >= 1
                and watch.count(IN_MOVED_TO, "after-full.yaml") >= 2
            )

        wait_for(tried_and_returned, what="the daemon to try the file and give it back")
        assert daemon.alive, daemon.log()
        # Back in incoming/, whole (read when it is there: the daemon may be trying again).
        back = wait_for(partial(read_if_there, spool / "incoming" / "after-full.yaml"))
        assert back == text
        assert job_state(spool, "after-full") is None
        assert os.listdir(spool / "rejected") == [], "a full disk is no reason to reject"

        (spool / "filler").unlink()
        directory, status = wait_finished(spool, "after-full")
        assert directory == "done", status
        assert (spool / "done" / "after-full" / "job.yaml").read_text() == text
        assert found_in(spool, "after-full") == ["done"]
        assert os.listdir(spool / "rejected") == []
        assert os.listdir(spool / "incoming") == []
        assert daemon.alive
        assert daemon.stop() == 0
        assert [
            n for n in os.listdir(spool / "tmp") if not n.startswith("daemon-") and n != "work"
        ] == []
    finally:
        watch.close()
        daemon.kill()


def test_full_disk_retries_are_paced_by_the_rescan(small_spool: Path, tmp_path: Path) -> None:
    spool = small_spool
    daemon = start_daemon(spool, tmp_path)
    # Both directions: the kernel merges an event into an identical one still unread, and
    # alternating events cannot be merged.
    watch = Inotify(spool / "incoming", IN_MOVED_FROM | IN_MOVED_TO)
    try:
        (spool / "tmp" / ".job").write_text(yaml.safe_dump(local_job("paced", "true")))
        fill(spool / "filler")
        os.rename(spool / "tmp" / ".job", spool / "incoming" / "paced.yaml")
        wait_for(lambda: watch.count(IN_MOVED_FROM, "paced.yaml"), what="a first try")
        before = watch.count(IN_MOVED_FROM, "paced.yaml")
        # A measurement window, not a wait for an outcome: with rescan_interval 1s a retry
        # per rescan makes about 3 tries in it; a busy loop makes hundreds.
        time.sleep(3.0)
        tries = watch.count(IN_MOVED_FROM, "paced.yaml") - before
        assert daemon.alive
        assert tries <= 10, f"{tries} tries in 3 s on a full disk"
    finally:
        watch.close()
        daemon.kill()


def test_job_filling_the_disk_does_not_kill_the_daemon(
    small_spool: Path, tmp_path: Path, token: str
) -> None:
    spool = small_spool
    start, go = tmp_path / "fill-now", tmp_path / "go"
    commands = [
        f": {token}",
        f'while [ ! -e "{start}" ]; do sleep 0.02; done',
        "dd if=/dev/zero of=fill bs=64k 2>/dev/null || true",  # until ENOSPC
        f'i=0; while [ ! -e "{go}" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done',
        "echo after-the-full-disk",
    ]
    daemon = start_daemon(spool, tmp_path)
    staging = spool / "tmp" / ".job"
    staging.write_text(yaml.safe_dump(local_job("filler-job", commands)))
    os.rename(staging, spool / "incoming" / "filler-job.yaml")
    job_dir = spool / "running" / "filler-job"
    wait_for(job_dir.is_dir, what="the job to run")
    watch = Inotify(job_dir, IN_CREATE | IN_MOVED_TO | IN_MODIFY)
    try:
        start.touch()
        wait_for(lambda: is_full(spool), what="the job to fill the disk")
        filled = len(watch.poll())
        # The daemon had its chance: it tried to renew the job's lease twice on the full disk.
        wait_for(
            lambda: sum("lease" in n for _, n in watch.poll()[filled:]) >= 2 or not daemon.alive,
            what="two lease renewals on the full disk",
        )
        assert daemon.alive, f"the daemon died on the full disk:\n{daemon.log()[-3000:]}"
        go.touch()
        directory, status = wait_finished(spool, "filler-job")
        # The command tolerates dd's ENOSPC and exits 0; the work dir (and the fill with it) is
        # removed before status.json is written, so there is room to record the success.
        assert directory == "done", status
        assert daemon.alive
    finally:
        go.touch()
        watch.close()
        daemon.kill()


def test_job_output_filling_the_disk_ends_the_job(
    small_spool: Path, tmp_path: Path, token: str
) -> None:
    spool = small_spool
    line = "x" * 100
    commands = f": {token}\ni=0; while [ $i -lt 40000 ]; do echo {line}; i=$((i+1)); done"
    filler = spool / "filler"
    filler.write_bytes(b"\0" * 256 * 1024)  # room to free once the disk is full
    daemon = start_daemon(spool, tmp_path)
    try:
        staging = spool / "tmp" / ".job"
        staging.write_text(yaml.safe_dump(local_job("flood", commands)))
        os.rename(staging, spool / "incoming" / "flood.yaml")  # 4 MB of output for 2 MB

        # The job runs to its end; with the disk full, its outcome cannot be written yet.
        wait_for(
            lambda: "cannot be moved yet" in daemon.log() or not daemon.alive,
            what="the flooding job to end on a full disk",
        )  # fmt: skip
        assert daemon.alive, f"the daemon died on the full disk:\n{daemon.log()[-3000:]}"
        assert job_state(spool, "flood") is not None
        assert job_state(spool, "flood")[0] == "running"  # type: ignore[index]
        filler.unlink()
        directory, status = wait_finished(spool, "flood")
        # It ran to the end: failing it would invite a second run of work already done.
        # What its log lost is said in status.
        assert directory == "done", status
        assert status["exit_code"] == 0 and status["log_lines_lost"] > 0, status
    finally:
        daemon.kill()
