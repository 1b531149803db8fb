"""A job's log: one timestamped, INFO/ERROR-prefixed line per line of output or event."""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from typing import IO

from spoold.clock import Clock, rfc3339

_TAIL_LINES = 20


def format_line(stamp: str, level: str, text: str) -> str:
    """One log line as spoold writes it."""
    return f"{stamp} {level} {text}\n"


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
    ) -> None:
        """``mask`` rewrites each line before it is written (secrets become ``***``)."""
        self._handle = handle
        self._clock = clock
        self._tee = tee
        self._mask = mask
        # What the job printed last: what a limit it hit looks like ("Too many open files").
        self._tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self._lock = threading.Lock()
        #: Lines that could not be written (a full disk), and why the first one failed.
        self.lost_lines = 0
        self.first_error: str | None = None

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
        self._write("ERROR" if stderr else "INFO", text)

    def tail(self) -> list[str]:
        """The job's last lines of output (unmasked: for spoold to read, never to write)."""
        return list(self._tail)

    def _write(self, level: str, text: str) -> None:
        stamp = rfc3339(self._clock.now())
        if self._mask is not None:
            text = self._mask(text)
        data = "".join(format_line(stamp, level, part) for part in text.split("\n"))
        with self._lock:
            if self._tee is not None:
                self._tee.write(data)
                self._tee.flush()
            try:
                self._handle.write(data.encode())
            except OSError as exc:
                # The job must not die of its log: what is lost is counted and reported.
                self.lost_lines += data.count("\n")
                self.first_error = self.first_error or exc.strerror or str(exc)

    def sync(self) -> None:
        """fsync what was written; a failure counts as lost lines would."""
        try:
            os.fsync(self._handle.fileno())
        except OSError as exc:
            self.first_error = self.first_error or exc.strerror or str(exc)

    def close(self) -> None:
        try:
            self._handle.close()
        except OSError as exc:
            self.first_error = self.first_error or exc.strerror or str(exc)
