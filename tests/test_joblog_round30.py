"""A job's output bytes reach its log file as written (round 30): a byte that is not UTF-8 is
kept, not replaced by U+FFFD, while masking, the line cut and the log limit still apply, in
bytes; the tee and the tap (text for a terminal and a socket) get U+FFFD for it."""

from __future__ import annotations

import io
import json
import os
import re
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from spoold.core.clock import SystemClock
from spoold.core.config import Config
from spoold.core.joblog import HELD_BYTES, LINE_BOUND, JobLog
from spoold.core.own_log import close_logging, configure_logging
from spoold.core.secrets import Masker
from spoold.core.spool import Spool
from spoold.face.waits import show_log
from spoold.intake.incoming import Accepted, Intake
from spoold.intake.validation import job_validator
from spoold.run.registry import ExecutorRegistry
from spoold.run.worker import JobRunner
from tests.fakes import FakeClock
from tests.test_joblog_chunks import _fed

_STAMP = re.compile(rb"^\S+ (INFO|ERROR) ")


def _log(
    *, masker: Masker | None = None, limit: int | None = None, tap: list[str] | None = None,
    tee: io.StringIO | None = None,
) -> tuple[JobLog, io.BytesIO]:  # fmt: skip
    out = io.BytesIO()
    log = JobLog(
        out, FakeClock(datetime(2026, 12, 2, tzinfo=UTC)), limit=limit, tee=tee,
        mask=None if masker is None else masker.mask_text,
        tap=None if tap is None else tap.append,
    )  # fmt: skip
    return log, out


def _lines(out: io.BytesIO) -> list[bytes]:
    """The log's lines as bytes, their stamps left out (the level stays)."""
    lines = out.getvalue().split(b"\n")[:-1]
    for line in lines:
        assert _STAMP.match(line), line
    return [line.split(b" ", 1)[1] for line in lines]


def test_bytes_that_are_not_utf8_are_kept_as_written_chunked_or_line_by_line() -> None:
    chunked, out = _log()
    _fed(chunked, [b"good\nbad utf8: \xff\xfe\n\xe6\x97", b"\xa5\nhalf \xe6\x97\nend\xff"])
    expected = [b"INFO good", b"INFO bad utf8: \xff\xfe", "INFO \u65e5".encode(),
                b"INFO half \xe6\x97", b"INFO end\xff"]  # fmt: skip
    assert _lines(out) == expected
    one_by_one, single = _log()
    for line in (b"good", b"bad utf8: \xff\xfe", "\u65e5".encode(), b"half \xe6\x97", b"end\xff"):
        one_by_one.output(line, stderr=False)
    assert single.getvalue() == out.getvalue()


@pytest.mark.parametrize("secrets", [["s3cr3t"], [f"other-{n}" for n in range(20)] + ["s3cr3t"]])
def test_a_secret_beside_bytes_that_are_not_utf8_is_masked_and_the_bytes_kept(
    secrets: list[str],
) -> None:
    log, out = _log(masker=Masker(secrets))
    _fed(log, [b"\xffs3cr3t\xfe\n", b"plain \xc3\n", b"s3cr\n", b"\xe6s3cr3t\n"])
    assert _lines(out) == [b"INFO \xff***\xfe", b"INFO plain \xc3", b"INFO s3cr", b"INFO \xe6***"]


def test_a_long_line_of_such_bytes_is_cut_at_the_bound_in_bytes() -> None:
    log, out = _log()
    log.output(b"\xff" * (LINE_BOUND + 10), stderr=True)
    kept, said = _lines(out)
    assert kept == b"ERROR " + b"\xff" * LINE_BOUND
    assert b"was 65546 bytes long" in said


@pytest.mark.parametrize("streamed", [False, True])
def test_the_cut_of_a_long_line_never_splits_a_character(streamed: bool) -> None:
    wide = "\U0001f600".encode()  # 4 bytes
    for lead in range(1, 6):
        line = b"a" * lead + wide * (HELD_BYTES // 4)  # the bound falls inside one, or not
        log, out = _log(masker=Masker(["zz"]))
        if streamed:
            _fed(log, [line[:5000], line[5000:], b"\n"])
        else:
            log.output(line, stderr=False)
        kept = _lines(out)[0].removeprefix(b"INFO ")
        assert kept == line[: LINE_BOUND - (LINE_BOUND - lead) % 4], lead
        kept.decode()  # whole characters only


def test_the_limit_counts_bytes_as_written() -> None:
    log, out = _log(limit=200)
    _fed(log, [b"\xff" * 60 + b"\n"] * 10)
    written = out.getvalue()
    kept = [line for line in _lines(out) if line.startswith(b"INFO \xff")]
    # 87 bytes a line as written (20 of stamp): the third starts below 200 bytes.
    assert kept == [b"INFO " + b"\xff" * 60] * 3
    assert b"reached its limit of 200 bytes" in written
    assert b"7 line(s) of output were not kept" in written


def test_the_tee_the_tap_and_the_tail_get_text_with_the_replacement_character() -> None:
    tapped: list[str] = []
    tee = io.StringIO()
    log, out = _log(tap=tapped, tee=tee, masker=Masker(["s3cr3t"]))
    _fed(log, [b"ok\n\xffs3cr3t\n", b"\xfe" * (HELD_BYTES + 1) + b"\n"])
    shown = out.getvalue().decode("utf-8", "replace")
    assert "".join(tapped) == tee.getvalue() == shown
    assert "\ufffd***" in shown
    for line in log.tail():  # status.json and limits.explain read it: no lone surrogate
        line.encode()
    assert log.tail()[:2] == ["ok", "\ufffds3cr3t"]


def test_spoold_logs_shows_such_a_byte_as_an_escape_and_the_file_keeps_it(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    spool = Spool(tmp_path / "spool")
    spool.init()
    config = Config(spool=spool.root, hostname="here", worker_id="w1", kill_grace=0.5)
    registry = ExecutorRegistry.from_entry_points()
    clock = SystemClock()
    logger = __import__("logging").getLogger("spoold.test")
    intake = Intake(spool, job_validator(registry), clock, max_file_size=config.max_file_size,
                    settle_time=0, on_accepted=lambda job, document: None, logger=logger)  # fmt: skip
    runner = JobRunner(spool, registry, config, clock, logger)
    document: dict[str, Any] = {
        "job_id": "bad-utf8",
        "executor": "local",
        "product": {"commands": ["printf 'bad utf8: \\377\\376\\n'"]},
    }
    (spool.dir("incoming") / "j.yaml").write_text(yaml.safe_dump(document))
    accepted = intake.offer("j.yaml", complete=True)
    assert isinstance(accepted, Accepted)
    claimed = runner.claim("bad-utf8")
    assert claimed is not None
    final = runner.run(claimed)
    assert final is not None
    assert json.loads((final.path / "status.json").read_text())["state"] == "succeeded"
    assert b" INFO bad utf8: \xff\xfe\n" in final.log_path.read_bytes()
    capsysbinary.readouterr()
    assert show_log(spool, "bad-utf8", follow=False) == 0
    shown = capsysbinary.readouterr().out
    assert b"bad utf8: \\xff\\xfe\n" in shown
    assert "\ufffd".encode() not in shown


# -- spoold's own log: not for every local user to read ----------------------------------------


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)  # root's usual umask, which the bug report ran under
    try:
        yield
    finally:
        os.umask(old)
        close_logging()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("umask_022")
def test_a_logdir_spoold_makes_and_its_log_are_for_spoold_and_its_group_only(
    tmp_path: Path,
) -> None:
    logdir = tmp_path / "newlogs" / "sub"
    logger = configure_logging(Config(spool=tmp_path / "spool", logdir=logdir))
    logger.info("job j1 accepted")
    assert (_mode(tmp_path / "newlogs"), _mode(logdir)) == (0o750, 0o750)
    assert _mode(logdir / "spoold.log") == 0o640
    assert "may be read by every local user" not in (logdir / "spoold.log").read_text()
    # logrotate's rotation by rename: the file made anew is as closed
    (logdir / "spoold.log").rename(logdir / "spoold.log.1")
    logger.info("job j2 accepted")
    assert _mode(logdir / "spoold.log") == 0o640
    assert "j2" in (logdir / "spoold.log").read_text()


def test_the_log_file_is_0640_under_a_stricter_umask_too(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        configure_logging(Config(spool=tmp_path / "spool", logdir=tmp_path / "logs"))
    finally:
        os.umask(old)
        close_logging()
    assert (_mode(tmp_path / "logs"), _mode(tmp_path / "logs" / "spoold.log")) == (0o750, 0o640)


@pytest.mark.usefixtures("umask_022")
def test_an_operators_logdir_readable_by_all_is_warned_of_and_left_as_it_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logdir = tmp_path / "logs"
    logdir.mkdir(mode=0o755)
    (logdir / "spoold.log").touch(mode=0o644)
    configure_logging(Config(spool=tmp_path / "spool", logdir=logdir))
    written = (logdir / "spoold.log").read_text()
    for path in (logdir, logdir / "spoold.log"):
        assert f"may be read by every local user (mode 0{_mode(path):o})" in written
        assert f"run chmod o-rwx {path}" in written
    assert written.count("WARNING") == 2
    assert "chmod o-rwx" in capsys.readouterr().err
    assert (_mode(logdir), _mode(logdir / "spoold.log")) == (0o755, 0o644)
    close_logging()
    configure_logging(Config(spool=tmp_path / "spool", logdir=logdir), warn=False)
    assert (logdir / "spoold.log").read_text().count("WARNING") == 2
