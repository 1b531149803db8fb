"""The peers' surroundings in bench_compare: what a machine running them would give them."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from benchmarks.bench_compare import SyslogSink


def test_a_syslog_sink_takes_what_is_sent_and_leaves_no_socket(tmp_path: Path) -> None:
    """incrond's syslog(3) lines go to it, not to /dev/console (~5 ms a pickup here)."""
    path = tmp_path / "log"
    sink = SyslogSink(str(path))
    assert sink.start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
            for n in range(100):  # more than a socket's queue holds: the sink reads them
                client.sendto(f"<14>incrond[1]: line {n}".encode(), str(path))
        assert sink.process is not None and sink.process.poll() is None
    finally:
        sink.stop()
    assert not path.exists() and sink.process is None


def test_a_syslog_already_there_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as theirs:
        theirs.bind(str(path))
        inode = path.lstat().st_ino
        sink = SyslogSink(str(path))
        assert not sink.start()
        sink.stop()
        assert path.lstat().st_ino == inode


def test_a_socket_replaced_meanwhile_is_not_removed(tmp_path: Path) -> None:
    """The sink removes its own socket only: a syslog daemon started since keeps its own."""
    path = tmp_path / "log"
    sink = SyslogSink(str(path))
    assert sink.start()
    os.unlink(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as theirs:
        theirs.bind(str(path))
        sink.stop()
        assert path.exists()
