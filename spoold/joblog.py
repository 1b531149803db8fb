"""A job's log: one timestamped, INFO/ERROR-prefixed line per line of output or event."""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from spoold.clock import Clock, rfc3339

_TAIL_LINES = 20


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
        # What the job printed last: what a limit it hit looks like ("Too many open files").
        self._tail: deque[str] = deque(maxlen=_TAIL_LINES)

    def section(self, name: str) -> JobLog:
        """The same log, each line of it starting with ``[name]``: one step's section."""
        view = JobLog(self._sink.handle, self._clock, tee=self._sink.tee, mask=self._mask)
        view._sink = self._sink  # one file, one lock, one count of lost lines
        view._prefix = f"{self._prefix}[{name}] "
        return view

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
        """A line the job printed: stdout as INFO, stderr as ERROR."""
        text = line.decode("utf-8", errors="replace").rstrip("\r\n")
        self._tail.append(text)
        sink = self._sink
        if sink.limit is not None and sink.size >= sink.limit:
            sink.cut_lines += 1
            if sink.cut_lines == 1:
                self.error(f"the log reached its limit of {sink.limit} bytes: output from here "
                           "on is not kept (limits.max_log_size)")  # fmt: skip
            return
        self._write("ERROR" if stderr else "INFO", text)

    def tail(self) -> list[str]:
        """The job's last lines of output (unmasked: for spoold to read, never to write)."""
        return list(self._tail)

    def _write(self, level: str, text: str) -> None:
        stamp = rfc3339(self._clock.now())
        if self._mask is not None:
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
