"""The inotify watches: a directory's changes (outbox/'s) told by name as they come and go, its
loss told once, and never held up by intake's watcher waiting for room."""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

import pytest

from spoold.intake.watcher import ChangeWatch, InotifyWatcher
from tests.harness import wait_for

LOG = logging.getLogger("spoold.test")


class _Told:
    """What a ChangeWatch told: the names, and the watch's loss."""

    def __init__(self) -> None:
        self.names: list[str | None] = []
        self.lost = threading.Event()
        self.lost_count = 0

    def named(self, name: str | None) -> None:
        self.names.append(name)

    def lose(self) -> None:
        self.lost_count += 1
        self.lost.set()


def _watch(directory: Path, told: _Told) -> ChangeWatch:
    directory.mkdir()
    watch = ChangeWatch(directory, told.named, told.lose, LOG)
    watch.start()
    return watch


def test_every_name_that_comes_or_goes_is_told(tmp_path: Path) -> None:
    """A commit by rename (its prepared name going), one by link (an exclusive prepare), a
    file written in place, and a removal are each told by name; the writer's temporary file
    too (the senders drop it)."""
    told = _Told()
    outbox = tmp_path / "outbox"
    watch = _watch(outbox, told)
    try:
        temp = outbox / ".spoold-a~1.tmp"
        temp.write_bytes(b"{}")
        os.rename(temp, outbox / "a~00000001.prepared")
        os.rename(outbox / "a~00000001.prepared", outbox / "a~00000001.json")
        wait_for(lambda: "a~00000001.json" in told.names, what="the commit told")
        assert told.names.count("a~00000001.prepared") == 2, "renamed in, then away"
        linked = outbox / ".spoold-b.tmp"
        linked.write_bytes(b"{}")
        os.link(linked, outbox / "b~00000001.prepared")
        wait_for(lambda: "b~00000001.prepared" in told.names, what="the link told")
        (outbox / "c~00000001.json").write_bytes(b"{}")
        wait_for(lambda: told.names.count("c~00000001.json") == 2, what="created, then closed")
        (outbox / "a~00000001.json").unlink()
        wait_for(lambda: told.names.count("a~00000001.json") == 2, what="the removal told")
        assert ".spoold-a~1.tmp" in told.names
    finally:
        watch.stop()
    assert not told.lost.is_set(), "a watch ended by stop is not lost"


def test_the_directory_removed_is_told_once_as_lost_and_watched_again_once_back(
    tmp_path: Path,
) -> None:
    """outbox/ removed: its watch's end was told, and the senders polled until the daemon
    restarted, though outbox/ was made again the next minute. ``rewatch`` takes it up again."""
    told = _Told()
    outbox = tmp_path / "outbox"
    watch = _watch(outbox, told)
    try:
        shutil.rmtree(outbox)
        assert told.lost.wait(10), "the watch's end told"
        assert not watch.watching and not watch.rewatch(), "nothing to watch yet"
        outbox.mkdir()
        assert watch.rewatch(), "watched again"
        (outbox / "a~00000001.json").write_bytes(b"{}")
        wait_for(lambda: "a~00000001.json" in told.names, what="a name in the new outbox/")
    finally:
        watch.stop()
    assert told.lost_count == 1


def test_the_directory_moved_away_is_lost_and_its_new_names_are_not_told(
    tmp_path: Path,
) -> None:
    """``mv outbox outbox.old; mkdir outbox``: the kernel's watch followed the old directory,
    whose names were told as if they were outbox/'s, while the new one was not watched and
    the watch was taken as whole (the senders resting for ``rescan_interval``)."""
    told = _Told()
    outbox = tmp_path / "outbox"
    watch = _watch(outbox, told)
    try:
        outbox.rename(tmp_path / "outbox.old")
        assert told.lost.wait(10), "the move told as the watch's end"
        assert not watch.watching
        (tmp_path / "outbox.old" / "old~00000001.json").write_bytes(b"{}")
        outbox.mkdir()
        assert watch.rewatch()
        (outbox / "new~00000001.json").write_bytes(b"{}")
        wait_for(lambda: "new~00000001.json" in told.names, what="a name in the new outbox/")
        assert "old~00000001.json" not in told.names, told.names
    finally:
        watch.stop()
    assert told.lost_count == 1


def test_a_flood_held_by_intake_does_not_hold_outbox_up(tmp_path: Path) -> None:
    """Intake's watcher waits while a flood fills intake's backlog: the flood waits in the
    kernel's queue. outbox/'s watch, on that watcher's descriptor, waited with it: a job's
    callback behind thousands of files not yet taken in, and their names in its queue."""
    held, release = threading.Event(), threading.Event()

    def arrived(name: str) -> None:  # intake with no room left: the watcher waits
        held.set()
        release.wait(30)

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    watcher = InotifyWatcher(incoming, arrived, lambda: None, lambda: None, LOG)
    watcher.start()
    told = _Told()
    watch = _watch(tmp_path / "outbox", told)
    try:
        (incoming / "job.yaml").write_text("job_id: x\n")
        assert held.wait(10), "intake's watcher waits for room"
        (tmp_path / "outbox" / "j~00000001.json").write_bytes(b"{}")
        wait_for(lambda: "j~00000001.json" in told.names, what="outbox/'s change told")
    finally:
        release.set()
        watcher.stop()
        watch.stop()


def test_a_failure_where_a_name_is_told_is_logged_and_the_watch_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    told = _Told()

    def fails_once(name: str | None) -> None:
        if not told.names:
            told.names.append("failed")
            raise OSError("EIO")
        told.named(name)

    outbox = tmp_path / "outbox"
    outbox.mkdir()
    watch = ChangeWatch(outbox, fails_once, told.lose, LOG)
    watch.start()
    try:
        (outbox / "first~00000001.json").write_bytes(b"{}")
        wait_for(lambda: told.names, what="the first name")
        (outbox / "next~00000001.json").write_bytes(b"{}")
        wait_for(lambda: "next~00000001.json" in told.names, what="the next name told")
    finally:
        watch.stop()
    assert any("was not told" in record.getMessage() for record in caplog.records)


def test_incoming_removed_is_lost_once_and_its_arrivals_told_once_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """intake's watcher, on the same base as outbox/'s: its watch lost (incoming/ removed) is
    told once and said; a watch ended by ``stop`` tells nothing; once incoming/ is made
    again, ``rewatch`` takes it up and arrivals are told again."""
    lost: list[str] = []
    arrived: list[str] = []
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    watcher = InotifyWatcher(incoming, arrived.append, lambda: None,
                             lambda: lost.append("lost"), LOG)  # fmt: skip
    watcher.start()
    try:
        shutil.rmtree(incoming)
        wait_for(lambda: lost, what="the watch's end told")
        incoming.mkdir()
        assert watcher.rewatch()
        (incoming / "job.yaml").write_text("job_id: x\n")
        wait_for(lambda: "job.yaml" in arrived, what="an arrival in the new incoming/")
    finally:
        watcher.stop()
    assert lost == ["lost"]
    messages = [record.getMessage() for record in caplog.records]
    assert any("was removed or unmounted: incoming files are found by scans" in message
               for message in messages), messages  # fmt: skip
    assert any("is watched again" in message for message in messages), messages
