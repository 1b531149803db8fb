"""RUNNER_LOG_SOCKET: every line spoold writes into a job's log, also sent to a Unix socket.

As Fabi-Runner did, for a log shipper on the host. The socket must exist when spoold starts
(a datagram socket, or a stream socket that accepts one connection per spoold process). Each
line goes as ``<job_id> <log line>``. Sending never waits: a reader that is slow, full or gone
loses lines, the job never does; what was lost is counted.
"""

from __future__ import annotations

import errno
import socket
import threading
from pathlib import Path

# What a send may fail with when the reader is slow, full or gone: the line is dropped.
_DROPPED = (BlockingIOError, ConnectionError, FileNotFoundError)


class LogTap:
    """A non-blocking sender of log lines to one Unix socket."""

    def __init__(self, path: Path) -> None:
        self._path = str(path)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.dropped = 0  # lines not sent (the reader was slow or gone)

    @classmethod
    def open(cls, path: Path | None) -> LogTap | None:
        """A tap on ``path`` if a socket is there now, else None (spoold runs without one)."""
        if path is None or not path.is_socket():
            return None
        tap = cls(path)
        tap._connect()
        return tap

    def send(self, job_id: str, data: str) -> None:
        """Send each line of ``data`` (log lines, newline-terminated); never blocks."""
        with self._lock:
            for line in data.splitlines(keepends=True):
                payload = f"{job_id} {line}".encode()
                if self._sock is None and not self._connect():
                    self.dropped += 1
                    continue
                assert self._sock is not None
                try:
                    if self._sock.type == socket.SOCK_DGRAM:
                        self._sock.send(payload, socket.MSG_DONTWAIT)
                    elif self._sock.send(payload, socket.MSG_DONTWAIT) != len(payload):
                        self._close()  # half a line on a stream: start over on a new one
                        self.dropped += 1
                except _DROPPED:
                    self.dropped += 1
                    if self._sock.type == socket.SOCK_STREAM:
                        self._close()
                except OSError:
                    self.dropped += 1
                    self._close()

    def close(self) -> None:
        with self._lock:
            self._close()

    def _connect(self) -> bool:
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            try:
                sock.connect(self._path)
            except OSError as exc:
                sock.close()
                if exc.errno == errno.EPROTOTYPE:
                    continue  # a stream socket: try that
                return False
            self._sock = sock
            return True
        return False

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
