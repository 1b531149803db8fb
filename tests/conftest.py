"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from spoold.spool import Spool
from tests.dockerd import dockerd  # noqa: F401 - the real servers, one each per session
from tests.harness import DaemonProcess, write_config
from tests.sshd import sshd_fixture  # noqa: F401


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    """An initialised, empty spool."""
    root = tmp_path / "spool"
    Spool(root).init()
    return root


@pytest.fixture
def daemon(spool_dir: Path, tmp_path: Path) -> Iterator[DaemonProcess]:
    """A running daemon on ``spool_dir``; killed at the end whatever happened."""
    process = DaemonProcess(spool_dir, write_config(tmp_path / "config.yaml", spool_dir))
    process.start()
    yield process
    process.kill()
