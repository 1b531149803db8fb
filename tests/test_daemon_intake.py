"""Intake through the real daemon: how files arrive in incoming/, what is taken, what is refused.

Every test starts ``spoold run`` as a subprocess on its own spool (tmp_path) and waits on what
the daemon does, with a bound. Where a test shows that something does NOT happen, it first
waits for ``wait_rescan``: proof that a periodic rescan offered the file to intake.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from spoold.intake.admission import display_name
from tests.harness import (
    DaemonProcess,
    drop,
    found_in,
    job_state,
    local_job,
    run_cli,
    tmp_leftovers,
    wait_finished,
    wait_for,
    wait_rejected,
    wait_rescan,
    write_config,
)

pytestmark = pytest.mark.daemon

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z (INFO|ERROR) (.*)$")
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z$")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def assert_log_lines(text: str) -> list[tuple[str, str]]:
    """Every line of a job log is timestamped and INFO/ERROR prefixed; return (level, text)."""
    lines = text.splitlines()
    assert lines, "the log is empty"
    parsed = []
    for line in lines:
        match = LOG_LINE.match(line)
        assert match, f"log line without timestamp and level: {line!r}"
        parsed.append((match.group(1), match.group(2)))
    return parsed


def still_works(daemon: DaemonProcess, tag: str) -> None:
    """The daemon is alive and still runs a valid job to its end."""
    assert daemon.alive, f"the daemon died:\n{daemon.log()}"
    job_id = f"ok-after-{tag}"
    drop(daemon.spool, f"{job_id}.yaml", local_job(job_id, f"echo {job_id}"))
    directory, status = wait_finished(daemon.spool, job_id)
    assert (directory, status["state"]) == ("done", "succeeded")
    assert daemon.alive


@pytest.fixture
def small_daemon(spool_dir: Path, tmp_path: Path) -> Iterator[DaemonProcess]:
    """A daemon whose file size limit is 1 kB (1000 bytes)."""
    config = write_config(tmp_path / "config.yaml", spool_dir, limits={"max_file_size": "1k"})
    process = DaemonProcess(spool_dir, config)
    process.start()
    yield process
    process.kill()


# -- a good job, the Maildir way ---------------------------------------------------------------


def test_drop_by_rename_runs_the_job_with_status_log_and_artifacts(
    daemon: DaemonProcess, spool_dir: Path
) -> None:
    commands = [
        "echo to-stdout",
        "echo to-stderr >&2",
        "mkdir -p out/tree/sub",
        "printf alpha > out/a.txt",
        "printf beta-beta > out/b.txt",
        "printf gamma > out/tree/sub/c.bin",
        "printf delta > out/tree/d.bin",
        # A link to a secret file inside the work dir, matched by the glob: never copied.
        "ln -s /etc/passwd out/passwd.txt",
        # A directory link leading out of the work dir: neither it nor files under it.
        "ln -s /etc out/etclink",
        "ln -s /etc out/tree/etclink",
        "printf not-declared > out/other.log",
    ]
    artifacts = [
        {"path": "out/*.txt"},
        {"path": "out/tree", "type": "dir"},
        {"path": "out/etclink", "type": "dir"},
        {"path": "out/etclink/passwd"},
    ]
    document = local_job("maildir", commands, artifacts=artifacts)
    target = drop(spool_dir, "maildir-job.yaml", document)
    submitted = yaml.safe_dump(document).encode()

    directory, status = wait_finished(spool_dir, "maildir")
    assert directory == "done", status
    assert not target.exists()
    assert found_in(spool_dir, "maildir") == ["done"]
    job_dir = spool_dir / "done" / "maildir"

    assert status["job_id"] == "maildir"
    assert status["state"] == "succeeded"
    assert status["executor"] == "local"
    assert status["exit_code"] == 0
    assert status["error"] is None
    assert status["source"] == "maildir-job.yaml"
    assert status["worker"]
    for key in ("submitted_at", "started_at", "finished_at"):
        assert RFC3339.match(status[key]), (key, status[key])
    assert status["submitted_at"] <= status["started_at"] <= status["finished_at"]
    assert len(status["attempts"]) == 1
    attempt = status["attempts"][0]
    assert attempt["number"] == 1
    assert attempt["exit_code"] == 0
    assert attempt["error"] is None
    assert RFC3339.match(attempt["started_at"]) and RFC3339.match(attempt["finished_at"])

    # job.yaml is the file as submitted, byte for byte.
    assert (job_dir / "job.yaml").read_bytes() == submitted

    lines = assert_log_lines((job_dir / "log").read_text())
    assert ("INFO", "to-stdout") in lines
    assert ("ERROR", "to-stderr") in lines

    expected = {
        "out/a.txt": b"alpha",
        "out/b.txt": b"beta-beta",
        "out/tree/sub/c.bin": b"gamma",
        "out/tree/d.bin": b"delta",
    }
    recorded = {a["path"]: a for a in status["artifacts"]}
    assert set(recorded) == set(expected), recorded
    for relative, content in expected.items():
        assert recorded[relative]["size"] == len(content)
        assert recorded[relative]["sha256"] == hashlib.sha256(content).hexdigest()
        copy = job_dir / "artifacts" / relative
        assert not copy.is_symlink()
        assert copy.read_bytes() == content
    kept = {
        p.relative_to(job_dir / "artifacts").as_posix()
        for p in (job_dir / "artifacts").rglob("*")
        if not p.is_dir() or p.is_symlink()
    }
    assert kept == set(expected), f"copied more than declared and safe: {kept}"
    assert not (job_dir / "work").exists(), "the work dir is removed after the run"


# -- writers that take their time ----------------------------------------------------------------

FIRST_HALF = (
    "job_id: scp-job\nexecutor: local\nproduct:\n  commands:\n    - echo first-half\n"
)  # fmt: skip
SECOND_HALF = "    - echo second-half\n"


def test_slow_in_place_write_is_taken_only_once_closed(
    daemon: DaemonProcess, spool_dir: Path, tmp_path: Path
) -> None:
    # The truncated file is itself a valid job: taken early, it would run the wrong thing.
    truncated = tmp_path / "scp-job.yaml"
    truncated.write_text(FIRST_HALF)
    assert run_cli(spool_dir, "validate", str(truncated)).returncode == 0

    path = spool_dir / "incoming" / "scp-job.yaml"
    with open(path, "wb") as handle:  # scp (SFTP) writes the target in place, in bursts
        handle.write(FIRST_HALF.encode())
        handle.flush()
        os.fsync(handle.fileno())
        # A rescan offered scp-job.yaml while it was open (see wait_rescan): it was not taken.
        wait_rescan(spool_dir, "scp")
        assert path.exists(), "a file still open for writing was taken"
        assert job_state(spool_dir, "scp-job") is None
        assert not (spool_dir / "rejected" / "scp-job.yaml").exists()
        handle.write(SECOND_HALF.encode())
    directory, status = wait_finished(spool_dir, "scp-job")
    assert directory == "done", status
    job_dir = spool_dir / "done" / "scp-job"
    assert (job_dir / "job.yaml").read_text() == FIRST_HALF + SECOND_HALF
    outputs = [text for _, text in assert_log_lines((job_dir / "log").read_text())]
    assert "first-half" in outputs and "second-half" in outputs
    assert os.listdir(spool_dir / "rejected") == []


def test_poll_mode_takes_files_by_scanning(spool_dir: Path, tmp_path: Path) -> None:
    """watch: poll, as on NFS: no events; a scan finds the file, which must stay unchanged
    for settle_time before it is taken, whatever its mtime says."""
    config = write_config(tmp_path / "poll.yaml", spool_dir, watch="poll", settle_time="300ms")
    daemon = DaemonProcess(spool_dir, config)
    daemon.start()
    try:
        assert "watching by poll" in daemon.log()
        target = drop(spool_dir, "polled.yaml", local_job("polled", "echo polled"))
        # Its mtime an hour ahead, as a writer with a fast clock would leave it.
        os.utime(target, (target.stat().st_atime + 3600, target.stat().st_mtime + 3600))
        directory, status = wait_finished(spool_dir, "polled")
        assert directory == "done", status
        assert daemon.alive
    finally:
        daemon.kill()


def _lose(directory: Path, how: str) -> None:
    """What an operator does by mistake (or a remount does): the directory moved away or
    removed."""
    if how == "moved":
        directory.rename(directory.with_name(f"{directory.name}.old"))
    else:
        shutil.rmtree(directory)


@pytest.mark.parametrize("how", ["moved", "removed"])
def test_incoming_made_again_is_watched_again(spool_dir: Path, tmp_path: Path, how: str) -> None:
    """incoming/ moved away (the watch followed it) or removed, and made again: files dropped
    in the new one waited for the next rescan, an hour here; a lost watch did not even make
    the scans more frequent. It is taken up again; what came meanwhile is found at once."""
    config = write_config(tmp_path / "c.yaml", spool_dir, poll_interval="1h", rescan_interval="1h")
    daemon = DaemonProcess(spool_dir, config)
    daemon.start()
    try:
        _lose(spool_dir / "incoming", how)
        # The scan the loss asked for is over (it found no incoming/); the next is an hour
        # away. The new incoming/ comes with a file in it: only taking up the watch finds it.
        wait_for(lambda: "incoming is missing" in daemon.log(), what="the lost incoming/ scanned")
        made = tmp_path / "incoming.new"
        made.mkdir()
        (made / "meanwhile.yaml").write_text(yaml.safe_dump(local_job("meanwhile", "true")))
        made.rename(spool_dir / "incoming")
        assert wait_finished(spool_dir, "meanwhile")[0] == "done"
        wait_for(lambda: "incoming is watched again" in daemon.log(), what="watched again")
        drop(spool_dir, "after.yaml", local_job("after", "echo after"))
        assert wait_finished(spool_dir, "after")[0] == "done"
        assert daemon.alive
        assert "intake failed" not in daemon.log()  # a traceback at each scan meanwhile
    finally:
        daemon.kill()


def test_rsync_style_temp_names_are_left_alone_until_renamed(
    daemon: DaemonProcess, spool_dir: Path
) -> None:
    incoming = spool_dir / "incoming"
    transient = {
        ".rsync-job.yaml.AbC123": local_job("rsync-job", "echo rsync-job"),
        "part-job.yaml.part": local_job("part-job", "true"),
        "tmp-job.yaml.tmp": local_job("tmp-job", "true"),
    }
    for name, document in transient.items():
        # Written in place and closed: IN_CREATE and IN_CLOSE_WRITE both name the file.
        (incoming / name).write_text(yaml.safe_dump(document))
    # A rescan has offered everything in incoming/ since (see wait_rescan).
    wait_rescan(spool_dir, "rsync")
    assert sorted(n for n in os.listdir(incoming) if not n.startswith("zzzz")) == sorted(transient)
    for job_id in ("rsync-job", "part-job", "tmp-job"):
        assert job_state(spool_dir, job_id) is None
    assert os.listdir(spool_dir / "rejected") == []

    os.rename(incoming / ".rsync-job.yaml.AbC123", incoming / "rsync-job.yaml")
    directory, status = wait_finished(spool_dir, "rsync-job")
    assert directory == "done"
    assert status["source"] == "rsync-job.yaml"
    # The rename event and the next rescan both offer it: taken once, no duplicate anywhere.
    wait_rescan(spool_dir, "after-rename")
    assert found_in(spool_dir, "rsync-job") == ["done"]
    assert os.listdir(spool_dir / "rejected") == []
    assert len(json.loads((spool_dir / "done/rsync-job/status.json").read_text())["attempts"]) == 1
    assert sorted(n for n in os.listdir(incoming) if not n.startswith("zzzz")) == [
        "part-job.yaml.part",
        "tmp-job.yaml.tmp",
    ]


def test_real_rsync_delivers_many_files(
    daemon: DaemonProcess, spool_dir: Path, tmp_path: Path
) -> None:
    rsync = shutil.which("rsync")
    if rsync is None:
        if in_ci():
            pytest.fail("rsync is not installed, and CI=true: install it (make system-deps)")
        pytest.skip("rsync is not installed")
    source = tmp_path / "outgoing"
    source.mkdir()
    ids = [f"rsynced-{n}" for n in range(6)]
    for job_id in ids:
        # Big enough that rsync's temporary file is a real write, not an instant.
        padding = {"description": "x" * 4000}
        (source / f"{job_id}.yaml").write_text(
            yaml.safe_dump(local_job(job_id, f"echo {job_id}", **padding))
        )
    subprocess.run(
        [rsync, "-r", f"{source}/", f"{spool_dir / 'incoming'}/"], check=True, timeout=60
    )
    for job_id in ids:
        directory, status = wait_finished(spool_dir, job_id)
        assert directory == "done"
        assert status["source"] == f"{job_id}.yaml"
        assert (spool_dir / "done" / job_id / "job.yaml").read_bytes() == (
            source / f"{job_id}.yaml"
        ).read_bytes()
    # A temporary file taken early would be a truncated job: rejected, or a duplicate of one.
    assert os.listdir(spool_dir / "rejected") == []


# -- bad input ------------------------------------------------------------------------------------

BILLION_LAUGHS = "".join(
    [
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n',
        *(
            f"{x}: &{x} [{', '.join([f'*{p}'] * 9)}]\n"
            for p, x in zip("abcdefgh", "bcdefghi", strict=True)
        ),
    ]
)


@dataclass(frozen=True)
class Bad:
    """One kind of bad input and what its rejection must say."""

    name: bytes
    code: str
    content: bytes | None = None  # a regular file with this content
    make: Callable[[Path, Path], None] | None = None  # (path in tmp/, scratch dir) otherwise
    reason: str = ""  # a piece of the human reason
    errors: list[dict[str, Any]] = field(default_factory=list)  # entries errors must contain


def make_symlink(path: Path, scratch: Path) -> None:
    real = scratch / "real.yaml"
    real.write_text(yaml.safe_dump(local_job("via-link", "true")))
    path.symlink_to(real)


def make_directory(path: Path, scratch: Path) -> None:
    path.mkdir()
    (path / "inner.yaml").write_text(yaml.safe_dump(local_job("inner", "true")))


def make_fifo(path: Path, scratch: Path) -> None:
    os.mkfifo(path)


def make_device(path: Path, scratch: Path) -> None:
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # like /dev/null


BAD_INPUTS = {
    "yaml-syntax": Bad(
        b"syntax.yaml",
        "invalid",
        b"job_id: syntax\nexecutor: local\nproduct: {commands: [unclosed\n",
        errors=[{}],
    ),
    "unknown-field": Bad(
        b"typo.yaml",
        "invalid",
        b"job_id: typo\nexecutor: local\nproduct: {commands: 'true'}\ntimeuot: 10s\n",
        reason="timeuot",
        errors=[
            {
                "path": "timeuot",
                "line": 4,
                "column": 1,
                "message": "unknown field 'timeuot' (did you mean 'timeout'?)",
            }
        ],
    ),
    "wrong-type": Bad(
        b"wrongtype.yaml",
        "invalid",
        b"job_id: wrongtype\nexecutor: local\nretries: three\nproduct: {commands: 'true'}\n",
        errors=[{"path": "retries", "line": 3, "column": 10}],
    ),
    "nested-wrong-type": Bad(
        b"nested.yaml",
        "invalid",
        b"job_id: nested\nexecutor: local\nproduct:\n  commands: 'true'\n  cwd: 5\n",
        errors=[{"path": "product.cwd", "line": 5, "column": 8}],
    ),
    "empty": Bad(b"empty.yaml", "invalid", b"", reason="empty"),
    "binary": Bad(b"binary.yaml", "invalid", bytes(range(128, 256)) * 2, reason="UTF-8"),
    "oversized": Bad(
        b"big.yaml",
        "too_large",
        yaml.safe_dump(local_job("big", "true")).encode() + b"#" * 2000 + b"\n",
        reason="max_file_size",
    ),
    "symlink": Bad(b"link.yaml", "not_a_file", make=make_symlink, reason="symbolic link"),
    "directory": Bad(b"dir.yaml", "not_a_file", make=make_directory, reason="directory"),
    "fifo": Bad(b"fifo.yaml", "not_a_file", make=make_fifo, reason="pipe"),
    "device": Bad(b"device.yaml", "not_a_file", make=make_device, reason="device"),
    "job-id-dotdot": Bad(
        b"dotdot.yaml",
        "invalid",
        b"job_id: ../etc\nexecutor: local\nproduct: {commands: 'true'}\n",
        errors=[{"path": "job_id", "line": 1, "column": 9}],
    ),
    "job-id-slash": Bad(
        b"slash.yaml",
        "invalid",
        b"job_id: a/b\nexecutor: local\nproduct: {commands: 'true'}\n",
        errors=[{"path": "job_id", "line": 1, "column": 9}],
    ),
    "no-job-suffix": Bad(
        b"job.txt",
        "file_name",
        yaml.safe_dump(local_job("txt", "true")).encode(),
        reason=".yaml",
    ),
    "billion-laughs": Bad(b"laughs.yaml", "invalid", BILLION_LAUGHS.encode()),
    "multi-document": Bad(
        b"multi.yaml",
        "invalid",
        b"job_id: m1\nexecutor: local\nproduct: {commands: 'true'}\n---\njob_id: m2\n",
        errors=[{"line": 4}],
    ),
    "top-level-list": Bad(
        b"list.yaml", "invalid", b"- job_id: l\n- executor: local\n", reason="mapping"
    ),
    "json-syntax": Bad(
        b"broken.json",
        "invalid",
        b'{"job_id": "broken", "executor": "local",\n  "product": {"commands": "true"}\n',
        errors=[{"line": 3}],
    ),
    "newline-in-name": Bad(b"new\nline.yaml", "file_name", b"job_id: [\n"),
    "non-utf8-name": Bad(b"caf\xe9-\xff.yaml", "file_name", b"job_id: [\n"),
    "named-reason.json": Bad(b"reason.json", "invalid", b'{"job_id": '),
}


def place(spool: Path, scratch: Path, bad: Bad) -> bytes:
    """Create the bad entry in tmp/ and rename it into incoming/; return its path as bytes."""
    staging = spool / "tmp" / "staging"
    if bad.content is not None:
        staging.write_bytes(bad.content)
    else:
        assert bad.make is not None
        bad.make(staging, scratch)
    target = os.fsencode(spool / "incoming") + b"/" + bad.name
    os.rename(staging, target)
    return target


def assert_kept(kept: bytes, bad: Bad, scratch: Path) -> None:
    """The rejected entry is the original one, unchanged."""
    mode = os.lstat(kept).st_mode
    if bad.content is not None:
        assert stat.S_ISREG(mode)
        with open(kept, "rb") as handle:
            assert handle.read() == bad.content
    elif bad.make is make_symlink:
        assert stat.S_ISLNK(mode) and os.readlink(kept) == os.fsencode(scratch / "real.yaml")
    elif bad.make is make_directory:
        assert stat.S_ISDIR(mode)
        assert os.listdir(kept) == [b"inner.yaml"]
        with open(kept + b"/inner.yaml", "rb") as handle:
            assert yaml.safe_load(handle.read()) == local_job("inner", "true")
    elif bad.make is make_fifo:
        assert stat.S_ISFIFO(mode)
    elif bad.make is make_device:
        assert stat.S_ISCHR(mode) and os.lstat(kept).st_rdev == os.makedev(1, 3)
    else:  # pragma: no cover - a case without a check
        raise AssertionError(f"no check for {bad}")


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_is_rejected_with_reason_and_kept(
    case: str, small_daemon: DaemonProcess, spool_dir: Path, tmp_path: Path
) -> None:
    bad = BAD_INPUTS[case]
    place(spool_dir, tmp_path, bad)
    rejected = os.fsencode(spool_dir / "rejected") + b"/" + bad.name
    reason_path = rejected + b"/reason.json"
    wait_for(lambda: os.path.exists(reason_path), what=f"{bad.name!r} to be rejected")
    with open(reason_path, "rb") as handle:
        reason = json.loads(handle.read())

    assert reason["code"] == bad.code, reason
    assert isinstance(reason["reason"], str) and reason["reason"], reason
    assert bad.reason in reason["reason"], reason
    # Shown as one line of text: control characters escaped, undecodable bytes replaced.
    assert reason["file"] == display_name(os.fsdecode(bad.name)), reason
    assert "\n" not in reason["file"]
    assert isinstance(reason["errors"], list)
    for entry in reason["errors"]:
        assert set(entry) >= {"message", "path", "line", "column"}, entry
    if bad.errors:
        assert reason["errors"], reason
        for expected in bad.errors:
            matching = [e for e in reason["errors"] if expected.items() <= e.items()]
            assert matching, f"no error like {expected} in {reason['errors']}"
            assert isinstance(matching[0]["line"], int) and isinstance(matching[0]["column"], int)

    others = [n for n in os.listdir(rejected) if n != b"reason.json"]
    assert len(others) == 1, f"rejected/{bad.name!r} holds {others}"
    assert_kept(rejected + b"/" + others[0], bad, tmp_path)
    if bad.name != b"reason.json":
        assert others == [bad.name]
    assert bad.name not in os.listdir(os.fsencode(spool_dir / "incoming"))
    # Nothing else came of it: no job, no stage left behind.
    assert os.listdir(spool_dir / "pending") == os.listdir(spool_dir / "running") == []
    still_works(small_daemon, case.replace(".", "-"))
    assert tmp_leftovers(spool_dir) == []


def test_unreadable_file(daemon: DaemonProcess, spool_dir: Path) -> None:
    """Mode 000: root (CAP_DAC_OVERRIDE) reads it anyway, so it is an ordinary job for root.

    Not faked: as root the daemon cannot tell such a file from any other, and it runs it. As
    another user the open fails and the file is rejected as unreadable.
    """
    staging = spool_dir / "tmp" / "staging"
    staging.write_text(yaml.safe_dump(local_job("mode000", "echo read-anyway")))
    staging.chmod(0)
    os.rename(staging, spool_dir / "incoming" / "mode000.yaml")
    if os.geteuid() == 0:
        directory, status = wait_finished(spool_dir, "mode000")
        assert directory == "done", status
    else:  # pragma: no cover - the test suite runs as root here
        reason = wait_rejected(spool_dir, "mode000.yaml")
        assert reason["code"] == "not_a_file" and "cannot be read" in reason["reason"]
    still_works(daemon, "mode000")


def test_duplicate_job_id_of_a_finished_job_is_rejected(
    daemon: DaemonProcess, spool_dir: Path
) -> None:
    drop(spool_dir, "first.yaml", local_job("twice", "echo first-run"))
    directory, first = wait_finished(spool_dir, "twice")
    assert directory == "done"
    log_before = (spool_dir / "done/twice/log").read_bytes()
    again = yaml.safe_dump(local_job("twice", "echo second-run"))
    drop(spool_dir, "second.yaml", again)
    reason = wait_rejected(spool_dir, "second.yaml")
    assert reason["code"] == "duplicate"
    assert "twice" in reason["reason"]
    assert (spool_dir / "rejected/second.yaml/second.yaml").read_text() == again
    # The finished job is untouched.
    assert found_in(spool_dir, "twice") == ["done"]
    assert json.loads((spool_dir / "done/twice/status.json").read_text()) == first
    assert (spool_dir / "done/twice/log").read_bytes() == log_before
    still_works(daemon, "duplicate")


def test_file_named_like_the_stage_directory_is_rejected(
    daemon: DaemonProcess, spool_dir: Path
) -> None:
    drop(spool_dir, "orig", "job_id: orig\n")
    reason = wait_rejected(spool_dir, "orig")
    assert reason["code"] == "file_name"
    assert (spool_dir / "rejected/orig/orig").read_text() == "job_id: orig\n"
    still_works(daemon, "orig")


def test_valid_job_in_a_file_name_with_a_newline_is_rejected(
    daemon: DaemonProcess, spool_dir: Path
) -> None:
    drop(spool_dir, "new\nline.yaml", local_job("newline-name", "true"))
    wait_for(
        lambda: (
            (spool_dir / "rejected" / "new\nline.yaml").is_dir()
            or job_state(spool_dir, "newline-name")
        ),
        what="the file to be handled",
    )
    if job_state(spool_dir, "newline-name"):
        _, status = wait_finished(spool_dir, "newline-name")
        job_dir = spool_dir / "done" / "newline-name"
        # What goes wrong when it is accepted: the log breaks its own format.
        assert_log_lines((job_dir / "log").read_text())
        pytest.fail(f"accepted as a job with source {status['source']!r}")
    reason = json.loads((spool_dir / "rejected" / "new\nline.yaml" / "reason.json").read_text())
    assert reason["code"]


def test_valid_job_in_a_non_utf8_file_name_is_rejected(
    daemon: DaemonProcess, spool_dir: Path
) -> None:
    name = b"caf\xe9-\xff.yaml"
    staging = spool_dir / "tmp" / "staging"
    staging.write_text(yaml.safe_dump(local_job("latin1-name", "true")))
    os.rename(staging, os.fsencode(spool_dir / "incoming") + b"/" + name)
    rejected = os.fsencode(spool_dir / "rejected") + b"/" + name
    wait_for(
        lambda: os.path.isdir(rejected) or job_state(spool_dir, "latin1-name"),
        what="the file to be handled",
    )
    found = job_state(spool_dir, "latin1-name")
    assert found is None, f"accepted as a job with source {found[1]['source']!r}"


# -- the command line -----------------------------------------------------------------------------


def test_submit_valid_and_invalid(daemon: DaemonProcess, spool_dir: Path, tmp_path: Path) -> None:
    good = tmp_path / "submitted.yaml"
    good.write_text(yaml.safe_dump(local_job("via-submit", "echo submitted")))
    result = run_cli(spool_dir, "submit", str(good))
    assert result.returncode == 0, result.stderr
    directory, status = wait_finished(spool_dir, "via-submit")
    assert directory == "done"
    assert status["source"] == "submitted.yaml"
    assert (spool_dir / "done/via-submit/job.yaml").read_bytes() == good.read_bytes()

    bad = tmp_path / "invalid.yaml"
    bad.write_text("job_id: nope\nexecutor: local\nproduct: {commands: 'true'}\ntimeuot: 1s\n")
    result = run_cli(spool_dir, "submit", str(bad))
    assert result.returncode == 1
    assert f"{bad}:4:1: timeuot: unknown field 'timeuot'" in result.stderr
    # Nothing was placed, not even a temporary file: anything placed before submit exited
    # would have been offered by the rescan below, and rejected (it is invalid) or left.
    wait_rescan(spool_dir, "submit")
    assert [n for n in os.listdir(spool_dir / "incoming") if not n.startswith("zzzz")] == []
    assert job_state(spool_dir, "nope") is None
    assert os.listdir(spool_dir / "rejected") == []


def test_submit_the_same_name_twice_while_stopped(spool_dir: Path, tmp_path: Path) -> None:
    job = tmp_path / "same.yaml"
    job.write_text(yaml.safe_dump({"executor": "local", "product": {"commands": "echo same"}}))
    printed = []
    for _ in range(2):
        result = run_cli(spool_dir, "submit", str(job))
        assert result.returncode == 0, result.stderr
        printed.append(result.stdout.split("(job ")[1].split(")")[0])
    names = sorted(os.listdir(spool_dir / "incoming"))
    assert len(names) == 2, names
    assert "same.yaml" in names
    # Each placed as written, with the id submit printed added as its first key.
    placed = sorted((spool_dir / "incoming" / name).read_bytes() for name in names)
    given = sorted(f"job_id: {job_id}\n".encode() + job.read_bytes() for job_id in printed)
    assert placed == given
    assert all(name.endswith(".yaml") for name in names), "still job files once renamed"
    # Both run once the daemon starts, each under the id submit printed.
    daemon = DaemonProcess(spool_dir, write_config(tmp_path / "config.yaml", spool_dir))
    daemon.start()
    try:

        def two_done() -> list[str] | None:
            done = os.listdir(spool_dir / "done")
            return done if len(done) == 2 else None

        done = wait_for(two_done, what="both submissions to run")
        sources = sorted(
            json.loads((spool_dir / "done" / d / "status.json").read_text())["source"] for d in done
        )
        assert sources == names and sorted(done) == sorted(printed)
        assert os.listdir(spool_dir / "rejected") == []
    finally:
        daemon.kill()


def test_validate_exit_codes_and_messages(spool_dir: Path, tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(local_job("good", "true")))
    result = run_cli(spool_dir, "validate", str(good))
    assert result.returncode == 0, result.stderr
    assert f"{good}: valid" in result.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "job_id: bad\n"
        "executor: local\n"
        "product:\n"
        "  commands: 'true'\n"
        "artifacts:\n"
        "  - path: ../secret\n"
        "timeuot: 5s\n"
    )
    syntax = tmp_path / "syntax.yaml"
    syntax.write_text("job_id: [\n")
    missing = tmp_path / "missing.yaml"
    result = run_cli(spool_dir, "validate", str(good), str(bad), str(syntax), str(missing))
    assert result.returncode == 1
    assert f"{good}: valid" in result.stdout
    lines = result.stderr.splitlines()
    line_format = re.compile(
        r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?:(?P<path>\S+): )?(?P<msg>.+)$"
    )
    parsed = [m.groupdict() for m in map(line_format.match, lines) if m]
    from_bad = [p for p in parsed if p["file"] == str(bad)]
    assert len(from_bad) == 2, lines
    by_path = {p["path"]: p for p in from_bad}
    assert (by_path["artifacts[0].path"]["line"], by_path["artifacts[0].path"]["col"]) == (
        "6",
        "11",
    )
    assert by_path["timeuot"]["line"] == "7"
    assert by_path["timeuot"]["msg"] == "unknown field 'timeuot' (did you mean 'timeout'?)"
    # A syntax error has a position but no path in the document.
    assert [p["path"] for p in parsed if p["file"] == str(syntax)] == [None], lines
    assert any(line.startswith(f"{missing}: ") for line in lines), lines
    assert len(parsed) + 1 == len(lines), lines


def test_status_list_and_logs(daemon: DaemonProcess, spool_dir: Path) -> None:
    for job_id in ("first", "second", "third"):
        drop(spool_dir, f"{job_id}.yaml", local_job(job_id, f"echo out-{job_id}"))
        wait_finished(spool_dir, job_id)
    drop(spool_dir, "failing.yaml", local_job("failing", "echo oops >&2; exit 3"))
    directory, _ = wait_finished(spool_dir, "failing")
    assert directory == "failed"

    result = run_cli(spool_dir, "status", "first", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status == json.loads((spool_dir / "done/first/status.json").read_text())
    assert status["state"] == "succeeded" and status["job_id"] == "first"

    result = run_cli(spool_dir, "status", "failing", "--json")
    assert json.loads(result.stdout)["exit_code"] == 3
    assert json.loads(result.stdout)["state"] == "failed"

    result = run_cli(spool_dir, "status", "no-such-job", "--json")
    assert result.returncode != 0
    assert "no-such-job" in result.stderr

    result = run_cli(spool_dir, "list", "--json")
    assert result.returncode == 0, result.stderr
    listed = [row["job_id"] for row in json.loads(result.stdout)]
    assert listed == ["failing", "third", "second", "first"]

    result = run_cli(spool_dir, "list", "--state", "failed", "--json")
    assert [row["job_id"] for row in json.loads(result.stdout)] == ["failing"]

    result = run_cli(spool_dir, "logs", "second")
    assert result.returncode == 0
    assert result.stdout == (spool_dir / "done/second/log").read_text()
    assert ("INFO", "out-second") in assert_log_lines(result.stdout)
    assert ("ERROR", "oops") in assert_log_lines(run_cli(spool_dir, "logs", "failing").stdout)


def test_list_is_newest_submission_first(
    daemon: DaemonProcess, spool_dir: Path, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    waiting = f'while [ ! -e "{go}" ]; do sleep 0.02; done'
    drop(spool_dir, "older.yaml", local_job("older", waiting))
    wait_for(lambda: found_in(spool_dir, "older") == ["running"], what="older to run")
    drop(spool_dir, "newer.yaml", local_job("newer", "true"))
    wait_finished(spool_dir, "newer")
    go.touch()
    wait_finished(spool_dir, "older")
    rows = json.loads(run_cli(spool_dir, "list", "--json").stdout)
    assert rows[0]["submitted_at"] > rows[1]["submitted_at"]
    assert [row["job_id"] for row in rows] == ["newer", "older"]


def test_logs_follow_a_running_job_until_it_ends(
    daemon: DaemonProcess, spool_dir: Path, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    commands = f'echo started; while [ ! -e "{go}" ]; do sleep 0.02; done; echo finished'
    drop(spool_dir, "follow.yaml", local_job("follow", commands))
    log = spool_dir / "running" / "follow" / "log"
    wait_for(lambda: log.exists() and "started" in log.read_text(), what="the job to start")

    follower = subprocess.Popen(
        [sys.executable, "-m", "spoold", "logs", "follow", "-f", "--spool", str(spool_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.SimpleQueue[str] = queue.SimpleQueue()
    seen: list[str] = []
    assert follower.stdout is not None

    def read_lines() -> None:
        for line in follower.stdout or ():
            lines.put(line)

    reader = threading.Thread(target=read_lines)
    reader.start()
    try:

        def saw(text: str) -> bool:
            while not lines.empty():
                seen.append(lines.get())
            return any(text in line for line in seen)

        wait_for(lambda: saw("INFO started"), what="logs -f to print the first output")
        # The job waits for `go`, which only this test creates: it is still running, and so
        # logs -f must still be following.
        assert follower.poll() is None
        assert found_in(spool_dir, "follow") == ["running"]
        go.touch()
        assert follower.wait(timeout=30) == 0
        reader.join(timeout=30)
        saw("")
        assert any(line.endswith("INFO finished\n") for line in seen), seen
        assert any("attempt 1 succeeded" in line for line in seen), seen
        assert "".join(seen) == (spool_dir / "done/follow/log").read_text()
    finally:
        go.touch()
        if follower.poll() is None:
            follower.kill()
        follower.wait()
        reader.join(timeout=30)
        for stream in (follower.stdout, follower.stderr):
            if stream is not None:
                stream.close()


def test_schema_lists_the_executors(spool_dir: Path) -> None:
    result = run_cli(spool_dir, "schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert schema["properties"]["executor"] == {"$ref": "#/$defs/executor"}
    assert {"local", "custom"} <= set(schema["$defs"]["executor"]["enum"])
