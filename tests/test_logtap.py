"""RUNNER_LOG_SOCKET's sender: datagram and stream sockets, and readers that are gone."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

from spoold.run.log_socket import LogTap


def _path() -> Path:
    return Path(tempfile.mkdtemp(prefix="spoold-tap-")) / "s"  # sun_path is short


def test_no_socket_no_tap() -> None:
    assert LogTap.open(None) is None
    assert LogTap.open(_path()) is None


def test_lines_reach_a_stream_socket_each_with_its_job_id() -> None:
    path = _path()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(1)
        tap = LogTap.open(path)
        assert tap is not None
        tap.send("job-1", "t INFO one\nt INFO two\n")
        conn, _ = server.accept()
        conn.settimeout(10)
        received = b""
        while received.count(b"\n") < 2:
            received += conn.recv(4096)
        conn.close()
        tap.close()
    assert received == b"job-1 t INFO one\njob-1 t INFO two\n"


def test_a_reader_that_is_gone_loses_lines_and_holds_nothing_up() -> None:
    path = _path()
    reader = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    reader.bind(str(path))
    tap = LogTap.open(path)
    assert tap is not None
    reader.close()
    path.unlink()
    tap.send("job-2", "a\nb\nc\n")
    assert tap.dropped == 3
