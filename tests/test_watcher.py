"""The inotify watcher: incoming/'s arrivals, and a second directory (outbox/) watched on the
same descriptor, its names told as they are written, its loss told once."""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

from spoold.intake.watcher import InotifyWatcher
from tests.harness import wait_for

LOG = logging.getLogger("spoold.test")


class _Told:
    """What the watcher told: incoming/'s names, the other directory's, and its loss."""

    def __init__(self) -> None:
        self.arrived: list[str] = []
        self.names: list[str | None] = []
        self.lost = threading.Event()

    def named(self, name: str | None) -> None:
        self.names.append(name)


def _watching(tmp_path: Path, told: _Told) -> tuple[InotifyWatcher, Path, Path]:
    incoming, outbox = tmp_path / "incoming", tmp_path / "outbox"
    incoming.mkdir()
    outbox.mkdir()
    watcher = InotifyWatcher(incoming, told.arrived.append, lambda: None, LOG)
    watcher.start()
    watcher.also(outbox, told.named, told.lost.set)
    return watcher, incoming, outbox


def test_a_second_directory_tells_every_name_written_there(tmp_path: Path) -> None:
    """A commit by rename, one by link (an exclusive prepare), and a file written in place
    are each told by name; the writer's temporary file too (the senders drop it). incoming/'s
    watch goes on as before, and the other's names never reach intake."""
    told = _Told()
    watcher, incoming, outbox = _watching(tmp_path, told)
    try:
        temp = outbox / ".spoold-a~1.tmp"
        temp.write_bytes(b"{}")
        os.rename(temp, outbox / "a~00000001.json")
        wait_for(lambda: "a~00000001.json" in told.names, what="the rename told")
        linked = outbox / ".spoold-b.tmp"
        linked.write_bytes(b"{}")
        os.link(linked, outbox / "b~00000001.prepared")
        wait_for(lambda: "b~00000001.prepared" in told.names, what="the link told")
        (outbox / "c~00000001.json").write_bytes(b"{}")
        wait_for(lambda: told.names.count("c~00000001.json") == 2, what="created, then closed")
        assert ".spoold-a~1.tmp" in told.names
        (incoming / "job.yaml").write_text("job_id: x\n")
        wait_for(lambda: told.arrived == ["job.yaml"], what="incoming/'s arrival")
        assert "job.yaml" not in told.names and not told.lost.is_set()
    finally:
        watcher.stop()
    assert not told.lost.is_set(), "a watch ended by stop is not lost"


def test_the_second_directory_removed_is_told_once_as_lost(tmp_path: Path) -> None:
    told = _Told()
    watcher, incoming, outbox = _watching(tmp_path, told)
    try:
        shutil.rmtree(outbox)
        assert told.lost.wait(10), "the watch's end told"
        (incoming / "job.yaml").write_text("job_id: x\n")
        wait_for(lambda: told.arrived == ["job.yaml"], what="incoming/ still watched")
    finally:
        watcher.stop()
