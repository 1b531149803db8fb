"""A file replaced in a job's directory while the directory is moved on (a worker's claim, a
retry): the write fails, and leaves no half-written temporary file behind, wherever the
directory went (seen possible in a retry racing the daemon's claim)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spoold.core.spool import fs


@pytest.mark.parametrize("durable", [False, True])
def test_a_replace_whose_directory_moved_meanwhile_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool
) -> None:
    pending, running = tmp_path / "pending" / "j1", tmp_path / "running" / "j1"
    pending.mkdir(parents=True)
    running.parent.mkdir()
    (pending / "status.json").write_text('{"state": "pending"}\n')
    replace = os.replace

    def claimed_first(source: str, target: str) -> None:
        os.rename(pending, running)  # the worker's claim, between the write and its rename
        replace(source, target)

    monkeypatch.setattr(os, "replace", claimed_first)
    with pytest.raises(FileNotFoundError):
        fs.write_file(pending / "status.json", b'{"state": "pending", "retry": 1}\n',
                      durable=durable)  # fmt: skip
    assert sorted(p.name for p in running.iterdir()) == ["status.json"]
    assert (running / "status.json").read_text() == '{"state": "pending"}\n'


def test_a_failed_replace_in_place_removes_its_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(source: str, target: str) -> None:
        raise PermissionError(13, "refused", target)

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(PermissionError):
        fs.write_file(tmp_path / "status.json", b"{}\n", durable=False)
    assert list(tmp_path.iterdir()) == []
