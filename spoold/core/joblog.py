"""A job's log: one timestamped, INFO/ERROR-prefixed line per line of output or event.

Bounded whatever the output's shape: a line keeps at most ``LINE_BOUND`` bytes (the log says
how long it was), ``OutputStream`` holds at most ``HELD_BYTES`` of an unfinished line, and past
``limit`` no more output is kept.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from spoold.core.clock import Clock, rfc3339
from spoold.core.secrets import MASK, MAX_SECRET_SIZE

_TAIL_LINES = 20
_TAIL_CHARS = 4096  # of each line in the tail: what limits.explain looks for is near the start

#: The most of one line of output the log keeps, in bytes as written (decoded and masked).
LINE_BOUND = 64 * 1024
#: Lines up to this many bytes cannot exceed LINE_BOUND once written: each byte becomes at
#: most 3 (an invalid byte's U+FFFD), and masking at most triples a text (a 1-character secret).
_SHORT_LINE = LINE_BOUND // 9
#: What an OutputStream holds of a line before it cuts it: the bound, and past it enough to
#: see whole any secret that starts before the cut (a secret file holds at most
#: MAX_SECRET_SIZE), so that no part of one is written.
HELD_BYTES = LINE_BOUND + MAX_SECRET_SIZE


def format_line(stamp: str, level: str, text: str) -> str:
    """One log line as spoold writes it."""
    return f"{stamp} {level} {text}\n"


@dataclass
class _Sink:
    """The log file, shared by a job's log and its steps' sections."""

    handle: IO[bytes]
    tee: IO[str] | None
    tap: Callable[[str], None] | None = None
    limit: int | None = None  # bytes of log a job's output may fill
    size: int = 0  # of the file, as written
    cut_lines: int = 0  # output lines not kept, past the limit
    lock: threading.Lock = field(default_factory=threading.Lock)
    lost_lines: int = 0
    first_error: str | None = None


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
        self._prefix = ""
        self._sections: tuple[str, ...] = ()
        # What the job printed last: what a limit it hit looks like ("Too many open files").
        self._tail: deque[str] = deque(maxlen=_TAIL_LINES)

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

    @property
    def lost_lines(self) -> int:
        """Lines that could not be written (a full disk)."""
        return self._sink.lost_lines

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
        text = line.decode("utf-8", errors="replace").rstrip("\r\n")
        self._tail.append(text)
        if self._reached_limit():
            return
        self._write("ERROR" if stderr else "INFO", text)

    def output_start(self, start: bytes, *, stderr: bool) -> bool:
        """The first ``HELD_BYTES`` of a line too long to hold whole: its first ``LINE_BOUND``
        bytes are written, masked as the whole line would be. True if they were written
        (call ``line_cut`` once the line has ended), False if the log is full."""
        near = self._masked(start[:LINE_BOUND].decode("utf-8", errors="replace"))
        far = self._masked(start.decode("utf-8", errors="replace"))
        self._tail.append(near[:_TAIL_CHARS])
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
        text = line.decode("utf-8", errors="replace").rstrip("\r\n")
        self._tail.append(text[:_TAIL_CHARS])
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
            self.error(f"the log reached its limit of {sink.limit} bytes: output from here "
                       "on is not kept (limits.max_log_size)")  # fmt: skip
        return True

    def _masked(self, text: str) -> str:
        return text if self._mask is None else self._mask(text)

    def tail(self) -> list[str]:
        """The job's last lines of output (unmasked: for spoold to read, never to write)."""
        return list(self._tail)

    def _write(self, level: str, text: str, *, masked: bool = False) -> None:
        stamp = rfc3339(self._clock.now())
        if self._mask is not None and not masked:
            text = self._mask(text)
        prefix = self._prefix
        data = "".join(format_line(stamp, level, prefix + part) for part in text.split("\n"))
        sink = self._sink
        with sink.lock:
            if sink.tee is not None:
                sink.tee.write(data)
                sink.tee.flush()
            encoded = data.encode()
            try:
                sink.handle.write(encoded)
                sink.size += len(encoded)
            except OSError as exc:
                # The job must not die of its log: what is lost is counted and reported.
                sink.lost_lines += data.count("\n")
                sink.first_error = sink.first_error or exc.strerror or str(exc)
            if sink.tap is not None:
                sink.tap(data)

    def sync(self) -> None:
        """fsync what was written; a failure counts as lost lines would."""
        try:
            os.fsync(self._sink.handle.fileno())
        except OSError as exc:
            self._sink.first_error = self._sink.first_error or exc.strerror or str(exc)

    def summarize(self) -> None:
        """Say, at the end of the attempt, how much output the limit kept out of the log."""
        if self._sink.cut_lines:
            self.info(f"{self._sink.cut_lines} line(s) of output were not kept (log limit)")
            self._sink.cut_lines = 0

    def close(self) -> None:
        try:
            self._sink.handle.close()
        except OSError as exc:
            self._sink.first_error = self._sink.first_error or exc.strerror or str(exc)


class OutputStream:
    """One of a job's output streams (stdout or stderr) turned into log lines, in bounded memory.

    Between calls it holds at most ``HELD_BYTES`` of a line that has not ended; a line longer
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
        if self._cut_length is not None:
            end = data.find(b"\n")
            if end < 0:
                self._cut_length += len(data)
                return
            self._end_cut(self._cut_length + end)
            data = data[end + 1 :]
        lines = data.split(b"\n")
        rest = lines.pop()
        if lines:
            if self._partial:
                lines[0] = self._partial + lines[0]
            for line in lines:
                self._log.output(line, stderr=self._stderr)
            self._partial = rest
        else:
            self._partial += rest
        if len(self._partial) >= HELD_BYTES:
            self._start_written = self._log.output_start(
                self._partial[:HELD_BYTES], stderr=self._stderr
            )
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


def _cut(text: str) -> tuple[str, bool]:
    """``text`` cut to at most LINE_BOUND bytes of UTF-8 (never inside a character), and
    whether it was cut."""
    if len(text) <= LINE_BOUND // 4:
        return text, False
    data = text.encode()
    if len(data) <= LINE_BOUND:
        return text, False
    return data[:LINE_BOUND].decode("utf-8", errors="ignore"), True


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
