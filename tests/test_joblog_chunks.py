"""Output written a chunk at a time (JobLog.output_lines, issue 23): the log says what it said
when each line was written on its own; only the stamps are shared, and past the limit lines
are only counted."""

from __future__ import annotations

import errno
import io
import random
import re
from datetime import UTC, datetime, timedelta

import pytest

from spoold.core.joblog import LINE_BOUND, JobLog, OutputStream
from spoold.core.secrets import Masker

_STAMP = re.compile(rb"^(\S+) (INFO|ERROR) ", re.MULTILINE)


class _Clock:
    """A clock that moves ``step`` seconds at each reading, and counts its readings."""

    def __init__(self, step: float = 0.0) -> None:
        self._at = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
        self._step = timedelta(seconds=step)
        self.reads = 0

    def now(self) -> datetime:
        self.reads += 1
        at = self._at
        self._at += self._step
        return at

    def monotonic(self) -> float:
        return 0.0


def _log(
    *, clock: _Clock | None = None, limit: int | None = None, masker: Masker | None = None,
    tap: list[str] | None = None, tee: io.StringIO | None = None, handle: io.BytesIO | None = None,
) -> tuple[JobLog, io.BytesIO]:  # fmt: skip
    out = io.BytesIO()
    log = JobLog(
        handle if handle is not None else out, clock or _Clock(), limit=limit, tee=tee,
        mask=None if masker is None else masker.mask_text,
        tap=None if tap is None else tap.append,
    )  # fmt: skip
    return log, out


def _fed(log: JobLog, chunks: list[bytes], *, stderr: bool = False) -> None:
    stream = OutputStream(log, stderr=stderr)
    for chunk in chunks:
        stream.feed(chunk)
    stream.close()
    log.summarize()


def _texts(out: io.BytesIO) -> list[str]:
    """The log's lines without their stamps."""
    # Not splitlines: a "\r" stays in its line. A byte that is not UTF-8 reads as U+FFFD.
    lines = out.getvalue().decode(errors="replace").split("\n")[:-1]
    return [line.split(" ", 1)[1] for line in lines]


def _chunks(data: bytes, sizes: list[int]) -> list[bytes]:
    """``data`` cut into chunks of the given sizes, in turn."""
    chunks, pos, turn = [], 0, 0
    while pos < len(data):  # bounded: every size is at least 1
        size = sizes[turn % len(sizes)]
        chunks.append(data[pos : pos + size])
        pos, turn = pos + size, turn + 1
    return chunks


# -- the same log as line by line -----------------------------------------------------------------

_SECRET = "s3cr3t-TOKEN"
_PARTS = [b"hello", b"y", b"", b"\xff\xfe", "h\u00e9llo w\u00f6rld".encode(), b"\r", b"\r\r",
          _SECRET.encode(), b"x" * 7000, b"z" * 40000, b"\t tab", "\u65e5\u672c".encode()[:4],
          b"\x00", b"vt\x0bff\x0c", b"first-line", b"second-line"]  # fmt: skip


def _random_output(rng: random.Random) -> list[bytes]:
    """Lines of every kind there is to log; none of HELD_BYTES, which would be cut as it came
    (output_start) when it comes in pieces, not as ``output`` cuts it."""
    return [
        b"".join(rng.choice(_PARTS) for _ in range(rng.randint(0, 3)))
        + rng.choice([b"", b"", b"\r"])
        for _ in range(rng.randint(1, 300))
    ]


@pytest.mark.parametrize("seed", range(12))
def test_chunks_are_logged_as_each_line_on_its_own_was(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(20):
        lines = _random_output(rng)
        data = b"\n".join(lines) + rng.choice([b"\n", b""])
        limit = rng.choice([None, 1, 300, 5000, 100_000])
        masker = rng.choice(
            [None, Masker(), Masker([_SECRET]), Masker(["first-line\nsecond-line"])]
        )
        stderr = rng.random() < 0.3
        tapped: list[str] = []
        tee = io.StringIO()
        one_by_one, expected = _log(limit=limit, masker=masker, tap=tapped, tee=tee)
        whole = data.split(b"\n")
        for line in whole[:-1] if data.endswith(b"\n") else whole:
            one_by_one.output(line, stderr=stderr)
        one_by_one.summarize()
        chunked_tap: list[str] = []
        chunked_tee = io.StringIO()
        chunked, got = _log(limit=limit, masker=masker, tap=chunked_tap, tee=chunked_tee)
        # Tiny chunks only for small outputs: a long line held a few bytes at a time is slow.
        sizes = [1, 5, 100] if len(data) < 20_000 else [4096, 65536, 1 << 20]
        _fed(chunked, _chunks(data, [rng.choice(sizes)]), stderr=stderr)
        assert got.getvalue() == expected.getvalue(), (seed, limit)
        assert chunked.tail() == one_by_one.tail()
        assert (
            "".join(chunked_tap) == "".join(tapped) == expected.getvalue().decode(errors="replace")
        )
        assert (
            chunked_tee.getvalue() == tee.getvalue() == expected.getvalue().decode(errors="replace")
        )


# -- edge cases of a chunk ------------------------------------------------------------------------


def test_the_lines_of_a_chunk_share_one_stamp() -> None:
    clock = _Clock(step=0.001)
    log, out = _log(clock=clock)
    _fed(log, [b"one\ntwo\nthree\nfou", b"r\n"])
    stamps = _STAMP.findall(out.getvalue())
    assert [level for _, level in stamps] == [b"INFO"] * 4
    assert stamps[0][0] == stamps[1][0] == stamps[2][0] < stamps[3][0]
    assert clock.reads == 2
    assert _texts(out) == ["INFO one", "INFO two", "INFO three", "INFO four"]


def test_a_chunk_with_a_secret_is_masked_line_by_line() -> None:
    log, out = _log(masker=Masker([_SECRET]))
    _fed(log, [f"one\ntoken {_SECRET} here\nthree\n".encode()])
    assert _texts(out) == ["INFO one", "INFO token *** here", "INFO three"]


def test_many_secrets_and_a_mask_of_its_own_are_applied_to_each_line_too() -> None:
    many = Masker([f"secret-number-{n}" for n in range(40)])
    log, out = _log(masker=many)
    _fed(log, [b"one\nsays secret-number-33.\nthree\n"])
    assert _texts(out) == ["INFO one", "INFO says ***.", "INFO three"]
    out = io.BytesIO()
    log = JobLog(out, _Clock(), mask=lambda text: text.replace("hidden", "******"))
    _fed(log, [b"one\nnot hidden\nthree\n"])
    assert _texts(out) == ["INFO one", "INFO not ******", "INFO three"]


def test_a_secret_added_while_the_job_runs_is_masked_from_then_on() -> None:
    masker = Masker(["early-secret"])
    log, out = _log(masker=masker)
    stream = OutputStream(log, stderr=False)
    stream.feed(b"early-secret late-secret\n")
    masker.add("late-secret")
    stream.feed(b"early-secret late-secret\n")
    stream.feed(b"late-secret alone\n")  # not in a chunk the mask is run over anyway
    stream.close()
    assert _texts(out) == ["INFO *** late-secret", "INFO *** ***", "INFO *** alone"]


def test_a_secret_split_across_chunks_never_reaches_the_log() -> None:
    secret = _SECRET.encode()
    for cut in range(1, len(secret)):
        log, out = _log(masker=Masker([_SECRET]))
        _fed(log, [b"a\nx " + secret[:cut], secret[cut:] + b" y\nb\n"])
        assert _texts(out) == ["INFO a", "INFO x *** y", "INFO b"], cut
        assert b"s3c" not in out.getvalue()


def test_a_secret_of_several_lines_is_masked_in_each_line_across_chunks() -> None:
    log, out = _log(masker=Masker(["first-line\nsecond-line"]))
    _fed(log, [b"before\nfirst-li", b"ne\nsecond-line\nafter\n"])
    assert _texts(out) == ["INFO before", "INFO ***", "INFO ***", "INFO after"]


def test_invalid_utf8_is_kept_as_written_in_its_own_line_only() -> None:
    log, out = _log()
    _fed(log, [b"good\nbad \xff\xfe\n\xe6\x97", b"\xa5\nend\n"])
    assert _texts(out) == ["INFO good", "INFO bad \ufffd\ufffd", "INFO \u65e5", "INFO end"]
    assert b" INFO bad \xff\xfe\n" in out.getvalue()  # the file has the bytes as written


def test_crlf_endings_are_stripped_and_a_lone_cr_is_kept() -> None:
    log, out = _log()
    _fed(log, [b"one\r\ntwo\r", b"\nthree\rfour\nfive\r\r\n"])
    assert _texts(out) == ["INFO one", "INFO two", "INFO three\rfour", "INFO five"]


def test_a_line_split_across_chunks_is_one_line() -> None:
    log, out = _log()
    _fed(log, [b"hel", b"lo wor", b"ld\nnext", b"\n", b"no newline at the end"], stderr=True)
    assert _texts(out) == ["ERROR hello world", "ERROR next", "ERROR no newline at the end"]


def test_sections_prefix_every_line_of_a_chunk() -> None:
    log, out = _log()
    _fed(log.section("build").section("unit"), [b"a\nb\n"])
    assert _texts(out) == ["INFO [build] [unit] a", "INFO [build] [unit] b"]


def test_lines_up_to_the_bound_are_kept_whole_and_longer_ones_cut_within_one_chunk() -> None:
    log, out = _log()
    _fed(log, [b"a" * LINE_BOUND + b"\n" + b"b" * (LINE_BOUND + 1) + b"\nshort\n"])
    assert _texts(out) == [
        "INFO " + "a" * LINE_BOUND,
        "INFO " + "b" * LINE_BOUND,
        f"ERROR spoold: a line of stdout was {LINE_BOUND + 1} bytes long: only its first "
        f"{LINE_BOUND} bytes are kept",
        "INFO short",
    ]


def test_stamps_never_go_back_when_a_chunk_mixes_plain_lines_and_masked_ones() -> None:
    clock = _Clock(step=0.001)
    log, out = _log(clock=clock, masker=Masker([_SECRET]))
    plain = b"p" * 99 + b"\n"
    _fed(log, [plain * 1000 + f"a {_SECRET}\n".encode() + plain * 1000])
    stamps = [stamp for stamp, _ in _STAMP.findall(out.getvalue())]
    assert len(stamps) == 2001 and stamps == sorted(stamps)
    assert _texts(out)[1000] == "INFO a ***"


# -- the limit ------------------------------------------------------------------------------------


def test_the_limit_reached_mid_chunk_keeps_lines_while_the_log_is_below_it() -> None:
    line = b"x" * 49 + b"\n"
    written = len("2026-12-02T10:00:00.000000Z INFO ") + len(line)  # 83 bytes a line
    for limit in (1, written - 1, written, written + 1, 10 * written, 10 * written + 1):
        log, out = _log(limit=limit)
        _fed(log, [line * 100])
        texts = _texts(out)
        kept = -(-limit // written)  # each line while the log is below the limit
        assert texts[:kept] == ["INFO " + "x" * 49] * kept, limit
        assert texts[kept].startswith(f"ERROR spoold: the log reached its limit of {limit} bytes")
        assert texts[kept + 1:] == [f"INFO spoold: {100 - kept} line(s) of output were not kept "
                                    "(log limit)"]  # fmt: skip


def test_past_the_limit_lines_are_only_counted_and_the_tail_still_follows() -> None:
    log, out = _log(limit=1000)
    chunks = [b"y\n" * 30_000] * 50 + [b"".join(b"line %d\n" % n for n in range(30)), b"last"]
    stream = OutputStream(log, stderr=False)
    stream.feed(chunks[0])
    size = len(out.getvalue())
    for chunk in chunks[1:]:
        stream.feed(chunk)
    stream.close()
    assert len(out.getvalue()) == size  # nothing more written
    assert log.tail() == [f"line {n}" for n in range(11, 30)] + ["last"]
    log.summarize()
    kept = sum(1 for text in _texts(out) if text == "INFO y")
    assert _texts(out)[-1] == (f"INFO spoold: {50 * 30_000 - kept + 31} line(s) of output were "
                               "not kept (log limit)")  # fmt: skip


# -- where the lines go ---------------------------------------------------------------------------


class _FullDisk(io.BytesIO):
    """A log file with room for ``room`` more bytes: a write takes what fits, then ENOSPC."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        taken = super().write(data[: self.room])
        self.room -= taken
        return taken


def test_a_full_disk_counts_every_line_of_a_chunk_not_written_whole() -> None:
    line = b"z" * 66 + b"\n"  # 100 bytes a line as written
    disk = _FullDisk(room=250)
    log, _ = _log(handle=disk)
    _fed(log, [line * 10])
    assert len(disk.getvalue()) == 250  # two lines and half of the third
    # Eight of the output, and the summary's line that says so: lost too, the disk still full.
    assert log.lost_lines == 9 and log.first_error == "No space left on device"


def test_lines_lost_to_a_full_disk_are_said_in_the_log_once_there_is_room_again() -> None:
    line = b"z" * 66 + b"\n"
    disk = _FullDisk(room=250)
    log, _ = _log(handle=disk)
    stream = OutputStream(log, stderr=False)
    stream.feed(line * 10)
    stream.close()
    disk.room = 10_000  # the disk has room again when the attempt ends
    log.summarize()
    log.summarize()  # said once
    # On a line of its own, after the line the full disk cut.
    *_, cut, said_line = disk.getvalue().decode().splitlines()
    assert cut.endswith("INFO " + "z" * 17)  # the third line's first 50 bytes
    said = said_line.split(" ", 1)[1]
    assert (
        said == "ERROR spoold: 8 line(s) of this log could not be written (No space left on device)"
    )
    assert disk.getvalue().decode().count("could not be written") == 1


def test_lines_another_process_lost_are_counted_and_left_to_it_to_say() -> None:
    """A job's supervisor writes the job's output into the file, and says its own losses
    there; its worker counts them for status.json and says nothing more of them."""
    log, out = _log()
    log.lost_by_another(5, "No space left on device")
    log.summarize()
    assert log.lost_lines == 5 and log.first_error == "No space left on device"
    assert out.getvalue() == b""


def test_the_tap_and_the_tee_get_the_lines_of_a_chunk_as_the_file_does() -> None:
    tapped: list[str] = []
    tee = io.StringIO()
    log, out = _log(tap=tapped, tee=tee)
    _fed(log, [b"one\ntwo\n", "dr\u00e9i\n".encode()])
    assert "".join(tapped) == tee.getvalue() == out.getvalue().decode()
    assert _texts(out) == ["INFO one", "INFO two", "INFO dr\u00e9i"]


def test_a_units_record_of_lines_its_supervisor_lost_is_counted_by_the_worker() -> None:
    from spoold.run.launcher import _outcome  # noqa: PLC0415 - the one function under test

    log, _ = _log()
    record = {"exit_code": 0, "log_lines_lost": 14012, "log_error": "No space left on device"}
    assert _outcome(record, log).exit_code == 0
    assert log.lost_lines == 14012 and log.first_error == "No space left on device"
