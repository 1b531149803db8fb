"""A job's log: one timestamped, INFO/ERROR-prefixed line per line of output or event.

Bounded whatever the output's shape: a line keeps at most ``LINE_BOUND`` bytes (the log says
how long it was), ``OutputStream`` holds at most ``JobLog.hold`` of an unfinished line, and past
``limit`` no more output is kept.

The job's bytes are written as they came, a byte that is not UTF-8 included: such bytes are
decoded as lone surrogates (``surrogateescape``), which the mask leaves alone and encoding
turns back into the same bytes. The tee and the tap, text for a terminal and a socket, get
U+FFFD for them instead.

At disk speed: the lines of a chunk of output share one stamp, and where nothing but the stamp
is to be added (no mask to apply, no line to cut) they are written with bytes
operations, not one by one; past the limit they are only counted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import IO

from spoold.core.clock import Clock, rfc3339
from spoold.core.secrets import MASK, MAX_FORM_SIZE, Masker

_TAIL_LINES = 20
_TAIL_CHARS = 4096  # of each line in the tail: what limits.explain looks for is near the start

#: The most of one line of output the log keeps, in bytes as written (masked).
LINE_BOUND = 64 * 1024
#: Lines up to this many bytes cannot exceed LINE_BOUND once written: each byte is written as
#: it came, and masking at most triples a text (a 1-character secret).
_SHORT_LINE = LINE_BOUND // 3
#: How output is decoded to be masked: a byte that is not UTF-8 becomes a lone surrogate that
#: encoding with the same handler turns back into that byte.
_BYTES = "surrogateescape"
#: The most an OutputStream holds of a line before it cuts it (``JobLog.hold``): the bound, and
#: past it enough to see whole any secret that starts before the cut, in any form the mask
#: knows (its hex or escaped form is longer than the value), so that no part of one is written.
HELD_BYTES = LINE_BOUND + MAX_FORM_SIZE
#: Past the bound, what the cut must see of a character it splits (UTF-8: 4 bytes at most).
_CHAR_ROOM = 3


def format_line(stamp: str, level: str, text: str) -> str:
    """One log line as spoold writes it."""
    return f"{stamp} {level} {text}\n"


def split_line(line: str) -> tuple[str, str]:
    """A line of a log read back: what spoold put before the text (its stamp and level, with
    the space after them), and the text; ``("", line)`` for a line not in that form."""
    stamp, _, rest = line.partition(" ")
    level, space, text = rest.partition(" ")
    if space and level in ("INFO", "ERROR") and stamp[:1].isdigit():
        return line[: len(line) - len(text)], text
    return "", line


class _Sink:
    """The log file, shared by a job's log and its steps' sections."""

    # A plain class, not a dataclass: a job's supervisor imports this module, and each
    # supervisor counts again what its launcher imported (dataclasses brings inspect: ~1.2 MiB).
    __slots__ = ("cut_lines", "first_error", "handle", "limit", "lock", "lost_elsewhere",
                 "lost_lines", "said_lost", "size", "tap", "tee", "torn")  # fmt: skip

    def __init__(
        self,
        handle: IO[bytes],
        tee: IO[str] | None,
        tap: Callable[[str], None] | None = None,
        limit: int | None = None,  # bytes of log a job's output may fill
    ) -> None:
        self.handle = handle
        self.tee = tee
        self.tap = tap
        self.limit = limit
        self.size = 0  # of the file, as written
        self.cut_lines = 0  # output lines not kept, past the limit
        self.lock = threading.Lock()
        self.lost_lines = 0
        self.lost_elsewhere = 0  # lines another process (a supervisor) lost of this file
        self.said_lost = 0  # of lost_lines, how many a line of the log has told of
        self.torn = False  # the file ends in part of a line (a write cut short)
        self.first_error: str | None = None


class JobLog:
    """Appends lines to a job's log file; safe to share between threads.

    ``tee`` receives the same lines (``spoold exec`` shows the log while it runs).
    """

    def __init__(
        self,
        handle: IO[bytes],
        clock: Clock,
        *,
        tee: IO[str] | None = None,
        mask: Callable[[str], str] | None = None,
        tap: Callable[[str], None] | None = None,
        limit: int | None = None,
    ) -> None:
        """``mask`` rewrites each line before it is written (secrets become ``***``); ``tap``
        gets each written line too (RUNNER_LOG_SOCKET); past ``limit`` bytes, the job's own
        output is no longer kept (spoold's lines still are), and the log says so."""
        self._sink = _Sink(handle, tee, tap, limit)
        if limit is not None:
            with contextlib.suppress(OSError):
                self._sink.size = os.fstat(handle.fileno()).st_size
        self._clock = clock
        self._mask = mask
        # A Masker's own mask changes only text that holds one of its values.
        owner = getattr(mask, "__self__", None)
        self._masker = owner if isinstance(owner, Masker) and mask == owner.mask_text else None
        self._prefix = ""
        self._sections: tuple[str, ...] = ()
        # What the job printed last: what a limit it hit looks like ("Too many open files").
        self._tail: deque[str] = deque(maxlen=_TAIL_LINES)
        # Whole lines of output, (data, start, end), not yet decoded into the tail.
        self._recent: tuple[bytes, int, int] | None = None
        # Bytes of output the job wrote through this view, kept or not (``count_output``).
        self._output_bytes = 0

    @property
    def hold(self) -> int:
        """How much of a line that has not ended an OutputStream holds before it cuts it: the
        bound, and past it enough to see whole any form of a secret that starts before the cut
        (``output_start``): the longest form its Masker knows, HELD_BYTES for a mask that is
        no Masker's (a hex or escaped form of a 64 KiB secret would make every stream hold
        that much, where most jobs have no secret or short ones)."""
        if self._mask is None:
            return LINE_BOUND + _CHAR_ROOM
        if self._masker is None:
            return HELD_BYTES
        return LINE_BOUND + max(_CHAR_ROOM, min(self._masker.longest_form, MAX_FORM_SIZE))

    def section(self, name: str) -> JobLog:
        """The same log, each line of it starting with ``[name]``: one step's section."""
        view = JobLog(self._sink.handle, self._clock, tee=self._sink.tee, mask=self._mask)
        view._sink = self._sink  # one file, one lock, one count of lost lines
        view._prefix = f"{self._prefix}[{name}] "
        view._sections = (*self._sections, name)
        return view

    @property
    def sections(self) -> tuple[str, ...]:
        """The names of the sections this view is in (``section``), outermost first."""
        return self._sections

    def tee_fd(self) -> int | None:
        """The descriptor the lines are shown on too, if any (``spoold exec``'s terminal)."""
        tee = self._sink.tee
        return None if tee is None else tee.fileno()

    def written_elsewhere(self) -> None:
        """Another process appended to the file (a job's supervisor): count what it wrote
        against the limit, and take its lines as its own to summarize."""
        with contextlib.suppress(OSError):
            self._sink.size = os.fstat(self._sink.handle.fileno()).st_size

    def count_output(self, size: int) -> None:
        """The job wrote ``size`` more bytes to its stdout or stderr, as they came (before
        lines are cut, masked or left out past the limit). Called by whatever reads the
        output: ``OutputStream``, an executor that splits a stream itself."""
        with self._sink.lock:  # several readers (stdout and stderr threads) may count at once
            self._output_bytes += size

    @property
    def output_bytes(self) -> int:
        """Bytes of output counted through this view so far (``count_output``)."""
        return self._output_bytes

    @property
    def lost_lines(self) -> int:
        """Lines that could not be written (a full disk), here and by the processes that
        wrote into the same file for it (``lost_elsewhere``)."""
        return self._sink.lost_lines + self._sink.lost_elsewhere

    def lost_by_another(self, lines: int, error: str | None) -> None:
        """Another process that appended to the file for this job (its supervisor) could not
        write ``lines`` of it (``error``): counted with this log's own."""
        with self._sink.lock:
            self._sink.lost_elsewhere += lines
            self._sink.first_error = self._sink.first_error or error

    @property
    def first_error(self) -> str | None:
        """Why the first lost line was lost."""
        return self._sink.first_error

    def info(self, text: str) -> None:
        """A line of spoold's own about the job."""
        self._write("INFO", f"spoold: {text}")

    def error(self, text: str) -> None:
        """An error line of spoold's own about the job."""
        self._write("ERROR", f"spoold: {text}")

    def output(self, line: bytes, *, stderr: bool) -> None:
        """A line the job printed: stdout as INFO, stderr as ERROR.

        A line longer than ``LINE_BOUND`` is cut there, and the next log line says so.
        """
        if len(line) > _SHORT_LINE:
            self._long_output(line, stderr)
            return
        text = line.decode("utf-8", _BYTES).rstrip("\r\n")
        self._tail_add(text)
        if self._reached_limit():
            return
        self._write("ERROR" if stderr else "INFO", text)

    def output_lines(
        self, data: bytes, *, stderr: bool, start: int = 0, end: int | None = None
    ) -> None:
        """Whole lines the job printed, ``data[start:end]``, each ending in a newline: logged as
        ``output`` logs them one by one, except that lines read together share one stamp.

        Where nothing but the stamp needs adding (no ``\\r\\n``, no line to cut, nothing to
        mask) the lines are written with bytes operations, not one by one; past
        the limit they are only counted.
        """
        end = len(data) if end is None else end
        level = "ERROR" if stderr else "INFO"
        head: bytes | None = None  # the stamp, level and section: one clock read for them all
        pos = start
        while pos < end:  # bounded: each round takes one line or more
            if self._full():
                self._not_kept(data, pos, end)
                return
            # Pieces of at most LINE_BOUND + 1 bytes hold no line to cut, and written they
            # stay small (2-byte lines grow 17-fold).
            stop = data.rfind(b"\n", pos, min(pos + LINE_BOUND + 1, end))
            if stop < 0:  # a line longer than LINE_BOUND, to cut as output cuts it
                stop = data.index(b"\n", pos, end)
                self.output(data[pos:stop], stderr=stderr)
                head, pos = None, stop + 1  # that read the clock: the next stamp is no older
                continue
            piece = data[pos : stop + 1]
            if not self._plain(piece):
                for line in piece.split(b"\n")[:-1]:
                    self.output(line, stderr=stderr)
                head, pos = None, stop + 1
                continue
            if head is None:
                head = f"{rfc3339(self._clock.now())} {level} {self._prefix}".encode()
            pos += self._output_plain(piece, head)

    def _plain(self, piece: bytes) -> bool:
        """Whether ``piece`` (whole lines) is logged as it is, a stamp before each line and
        nothing else changed, as ``output`` would log it line by line."""
        if b"\r" in piece and b"\r\n" in piece:  # the first is memchr: no "\r" costs least
            return False  # output strips a line's "\r" before its newline
        if self._mask is None:
            return True  # bytes that are not UTF-8 too: output writes them back as they came
        if self._masker is not None:
            return not self._masker.in_output(piece)  # without decoding, at any number of values
        text = piece.decode("utf-8", _BYTES)
        # A mask that leaves all of the text alone leaves each line of it alone.
        return self._mask(text) == text

    def _output_plain(self, piece: bytes, head: bytes) -> int:
        """Log ``piece`` (whole lines, none longer than LINE_BOUND, ``_plain``) with bytes
        operations; how many bytes of it were taken (fewer than all when the limit is reached
        among them: the rest is for ``_not_kept``)."""
        sink = self._sink
        if sink.limit is not None:
            room, width = sink.limit - sink.size, len(head)
            # Each line is a byte at least: most pieces fit without counting their lines.
            if len(piece) * (width + 1) >= room and (
                len(piece) + piece.count(b"\n") * width >= room
            ):
                piece = piece[: _fitting(piece, room, width)]
        self._remember(piece, 0, len(piece))
        self._emit(b"".join((head, piece[:-1].replace(b"\n", b"\n" + head), b"\n")), None)
        return len(piece)

    def _full(self) -> bool:
        """Whether the output's share of the log is used up."""
        sink = self._sink
        return sink.limit is not None and sink.size >= sink.limit

    def _not_kept(self, data: bytes, start: int, end: int) -> None:
        """Whole lines of output past the limit, ``data[start:end]``: counted, the last ones
        remembered, nothing more."""
        self._remember(data, start, end)
        sink = self._sink
        first = sink.cut_lines == 0
        sink.cut_lines += data.count(b"\n", start, end)
        if first:
            self._said_full()

    def _remember(self, data: bytes, start: int, end: int) -> None:
        """The last lines of ``data[start:end]`` (whole lines) go to the tail, as ``output``
        puts them there; decoded only when the tail is read or more goes in one by one."""
        first = end - 1  # where the last lines start: after a newline, or at start
        for _ in range(_TAIL_LINES):
            first = data.rfind(b"\n", start, first)
            if first < 0:
                break
        if first >= 0:  # a whole tail's worth: what came before it is of no more use
            self._recent = (data, first + 1, end)
        else:
            self._flush_recent()
            self._recent = (data, start, end)

    def _flush_recent(self) -> None:
        """Decode into the tail the lines ``_remember`` kept as bytes."""
        if self._recent is None:
            return
        data, start, end = self._recent
        self._recent = None
        for line in data[start : end - 1].split(b"\n"):
            text = line.decode("utf-8", errors="replace").rstrip("\r\n")
            self._tail.append(text if len(line) <= _SHORT_LINE else text[:_TAIL_CHARS])

    def _tail_add(self, text: str) -> None:
        self._flush_recent()
        self._tail.append(text)

    def output_start(self, start: bytes, *, stderr: bool) -> bool:
        """The first ``hold`` bytes of a line too long to hold whole: its first ``LINE_BOUND``
        bytes are written, masked as the whole line would be. True if they were written
        (call ``line_cut`` once the line has ended), False if the log is full."""
        near = self._masked(start[:LINE_BOUND].decode("utf-8", _BYTES))
        far = self._masked(start.decode("utf-8", _BYTES))
        self._tail_add(near[:_TAIL_CHARS])
        if not far.startswith(near):
            # Its end is not what the longer text masks to: the start of a secret that runs
            # past the cut, or a character the cut split. Only what both agree on is kept.
            agreed = _common_prefix(near, far)
            near = near[:agreed] + (MASK if far.startswith(MASK, agreed) else "")
        if self._reached_limit():
            return False
        self._write("ERROR" if stderr else "INFO", _cut(near)[0], masked=True)
        return True

    def line_cut(self, length: int, *, stderr: bool) -> None:
        """Say that the line ``output_start`` wrote the start of ended after ``length`` bytes."""
        stream = "stderr" if stderr else "stdout"
        self.error(f"a line of {stream} was {length} bytes long: only its first "
                   f"{LINE_BOUND} bytes are kept")  # fmt: skip

    def _long_output(self, line: bytes, stderr: bool) -> None:
        text = line.decode("utf-8", _BYTES).rstrip("\r\n")
        self._tail_add(text[:_TAIL_CHARS])
        if self._reached_limit():
            return
        # Masked whole, then cut: a cut first could leave the start of a secret standing.
        kept, cut = _cut(self._masked(text))
        self._write("ERROR" if stderr else "INFO", kept, masked=True)
        if cut:
            self.line_cut(len(line), stderr=stderr)

    def _reached_limit(self) -> bool:
        """Whether the output's share of the log is used up (counting the line not kept)."""
        sink = self._sink
        if sink.limit is None or sink.size < sink.limit:
            return False
        sink.cut_lines += 1
        if sink.cut_lines == 1:
            self._said_full()
        return True

    def _said_full(self) -> None:
        self.error(f"the log reached its limit of {self._sink.limit} bytes: output from here "
                   "on is not kept (limits.max_log_size)")  # fmt: skip

    def _masked(self, text: str) -> str:
        return text if self._mask is None else self._mask(text)

    def tail(self) -> list[str]:
        """The job's last lines of output (unmasked: for spoold to read, never to write), a
        byte that is not UTF-8 as U+FFFD (they go into status.json)."""
        self._flush_recent()
        return [text if text.isascii() else _shown(text) for text in self._tail]

    def _write(self, level: str, text: str, *, masked: bool = False) -> None:
        stamp = rfc3339(self._clock.now())
        if self._mask is not None and not masked:
            text = self._mask(text)
        prefix = self._prefix
        data = "".join(format_line(stamp, level, prefix + part) for part in text.split("\n"))
        try:
            self._emit(data.encode(), data)
        except UnicodeEncodeError:  # output's bytes that are not UTF-8, as _BYTES decoded them
            self._emit(_written(data), None)

    def _emit(self, data: bytes, text: str | None) -> None:
        """Log lines into the file, the tee and the tap; ``text``: ``data`` decoded, if at hand."""
        sink = self._sink
        with sink.lock:
            if text is None and (sink.tee is not None or sink.tap is not None):
                text = data.decode("utf-8", "replace")
            if sink.tee is not None:
                assert text is not None
                sink.tee.write(text)
                sink.tee.flush()
            done = 0
            # The file ends in a line cut by a full disk: the next line starts on its own.
            written_data = b"\n" + data if sink.torn else data
            try:
                # A regular file takes less than all only when it is full: the next write
                # says why. Bounded: each round writes something or raises.
                while done < len(written_data):
                    written = sink.handle.write(written_data[done:] if done else written_data)
                    if not written:  # 0, or None from a non-blocking file that would block
                        raise OSError(errno.EIO, "the log took none of a write")
                    done += written
                    sink.size += written
                sink.torn = False
            except OSError as exc:
                # The job must not die of its log: what is lost is counted and reported.
                sink.lost_lines += written_data.count(b"\n", max(done, 1 if sink.torn else 0))
                sink.torn = sink.torn if done == 0 else written_data[done - 1 : done] != b"\n"
                sink.first_error = sink.first_error or exc.strerror or str(exc)
            if sink.tap is not None:
                assert text is not None
                sink.tap(text)

    def sync(self) -> None:
        """fsync what was written; a failure counts as lost lines would."""
        try:
            os.fsync(self._sink.handle.fileno())
        except OSError as exc:
            self._sink.first_error = self._sink.first_error or exc.strerror or str(exc)

    def summarize(self) -> None:
        """Say, at the end of the attempt, how much output the limit kept out of the log, and
        how many lines this process could not write into it (a full disk, since passed:
        else this line is lost too, and counted)."""
        if self._sink.cut_lines:
            self.info(f"{self._sink.cut_lines} line(s) of output were not kept (log limit)")
            self._sink.cut_lines = 0
        if (lost := self._sink.lost_lines - self._sink.said_lost) > 0:
            self.error(f"{lost} line(s) of this log could not be written "
                       f"({self._sink.first_error})")  # fmt: skip
            self._sink.said_lost = self._sink.lost_lines  # this line too, if it was lost

    def close(self) -> None:
        try:
            self._sink.handle.close()
        except OSError as exc:
            self._sink.first_error = self._sink.first_error or exc.strerror or str(exc)


class OutputStream:
    """One of a job's output streams (stdout or stderr) turned into log lines, in bounded memory.

    Between calls it holds at most ``JobLog.hold`` (``HELD_BYTES`` at most) of a line that has
    not ended; a line longer
    than that is written up to ``LINE_BOUND`` as soon as that much has come, and the rest of it
    is only counted.
    """

    def __init__(self, log: JobLog, *, stderr: bool) -> None:
        self._log = log
        self._stderr = stderr
        self._partial = b""
        self._cut_length: int | None = None  # of a line being cut: its bytes so far
        self._start_written = False

    def feed(self, data: bytes) -> None:
        """More of the stream."""
        self._log.count_output(len(data))
        if self._cut_length is not None:
            end = data.find(b"\n")
            if end < 0:
                self._cut_length += len(data)
                return
            self._end_cut(self._cut_length + end)
            data = data[end + 1 :]
        last = data.rfind(b"\n")
        if last < 0:
            self._partial += data
        else:
            # All the whole lines at once (JobLog.output_lines), in place if none was held.
            if self._partial:
                lines = b"".join((self._partial, memoryview(data)[: last + 1]))
                self._log.output_lines(lines, stderr=self._stderr)
            else:
                self._log.output_lines(data, stderr=self._stderr, end=last + 1)
            self._partial = data[last + 1 :]
        hold = self._log.hold
        if len(self._partial) >= hold:
            self._start_written = self._log.output_start(self._partial[:hold], stderr=self._stderr)
            self._cut_length = len(self._partial)
            self._partial = b""

    def close(self) -> None:
        """The stream ended: its last line, if it had no newline, is written now."""
        if self._cut_length is not None:
            self._end_cut(self._cut_length)
        elif self._partial:
            self._log.output(self._partial, stderr=self._stderr)
        self._partial = b""

    def _end_cut(self, length: int) -> None:
        if self._start_written:
            self._log.line_cut(length, stderr=self._stderr)
        self._cut_length = None
        self._start_written = False


def _written(text: str) -> bytes:
    """``text`` as the file takes it: the bytes _BYTES decoded as lone surrogates as they were
    (any other lone surrogate, which no output decodes to, as ``?``)."""
    try:
        return text.encode("utf-8", _BYTES)
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace")


def _shown(text: str) -> str:
    """``text`` for a reader of text: each byte that is not UTF-8 as U+FFFD."""
    return _written(text).decode("utf-8", "replace")


def _cut(text: str) -> tuple[str, bool]:
    """``text`` cut to at most LINE_BOUND bytes as written (never inside a character), and
    whether it was cut."""
    if len(text) <= LINE_BOUND // 4:
        return text, False
    data = _written(text)
    if len(data) <= LINE_BOUND:
        return text, False
    end = start = LINE_BOUND
    while start > LINE_BOUND - 3 and 0x80 <= data[start - 1] < 0xC0:  # continuation bytes
        start -= 1
    start -= 1  # where the last character before the cut starts, if it is one
    first = data[start]
    length = 2 if first < 0xE0 else 3 if first < 0xF0 else 4
    if first >= 0xC2 and start + length > end and _valid(data[start : start + length]):
        end = start  # a character the cut would split: left out whole
    return data[:end].decode("utf-8", _BYTES), True


def _valid(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def _fitting(data: bytes, room: int, width: int) -> int:
    """How many bytes of ``data`` (whole lines) fit in ``room``: as ``output`` would write them,
    each line while what went before it is less than ``room``, each ``width`` bytes longer
    as written (its stamp)."""
    # Written before the line that starts at offset m: m + width * (newlines before m). That
    # grows with m: halving finds where it reaches room, each step one count in C.
    low, high = 0, len(data)
    while low < high:  # bounded: halves each round
        middle = (low + high) // 2
        if middle + width * data.count(b"\n", 0, middle) >= room:
            high = middle
        else:
            low = middle + 1
    if low == 0 or data[low - 1] == 0x0A:
        return low
    return data.index(b"\n", low) + 1  # the line that crosses room is written whole


def _common_prefix(a: str, b: str) -> int:
    """How many characters ``a`` and ``b`` start with in common (comparisons in C, halving)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle - 1
    return low
