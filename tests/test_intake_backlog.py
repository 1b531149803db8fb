"""A flood's names wait in the kernel's inotify queue and in incoming/, not in the daemon: the
watcher waits once ``names_held`` names wait for intake (intake stopping lets it go), and a
sweep reads incoming/ group by group."""

from __future__ import annotations

import logging
import os
import threading
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from spoold.core.clock import SystemClock
from spoold.core.spool import Spool
from spoold.intake.incoming import GROUP, Accepted, Intake, IntakeThread, Rejected
from spoold.intake.validation import job_validator
from spoold.intake.watcher import InotifyWatcher
from spoold.run.registry import ExecutorRegistry
from tests.fakes import FakeClock
from tests.harness import wait_for

NAMED = "job_id: {id}\nexecutor: local\nproduct: {{commands: 'true'}}\n"
LOG = logging.getLogger("spoold.test")


class _Gate:
    """Holds ``Intake.offer_all`` until opened: intake busy with a group while files arrive."""

    def __init__(self, intake: Intake, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open = threading.Event()
        self.entered = threading.Event()
        offer_all = intake.offer_all

        def held(names: Sequence[str], **kwargs: Any) -> list[Accepted | Rejected | None]:
            self.entered.set()
            self.open.wait()
            return offer_all(names, **kwargs)

        monkeypatch.setattr(intake, "offer_all", held)


class _Counted:
    """The names the watcher hands over: how many calls are under way, and the longest line."""

    def __init__(self, threads: IntakeThread) -> None:
        self.calls = self.returned = self.longest = 0
        self._threads = threads

    def arrived(self, name: str) -> None:
        self.calls += 1
        self._threads.arrived(name)
        self.longest = max(self.longest, self._threads._queue.qsize())
        self.returned += 1


def _spool(tmp_path: Path) -> tuple[Spool, Intake]:
    spool = Spool(tmp_path / "spool")
    spool.init()
    intake = Intake(spool, job_validator(ExecutorRegistry.from_entry_points()), FakeClock(),
                    max_file_size=1 << 20, settle_time=2.0,
                    on_accepted=lambda job, document: None, logger=LOG)  # fmt: skip
    return spool, intake


def _held_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, names_held: int
) -> tuple[Spool, _Gate, IntakeThread]:
    """Intake threads whose intake waits at a gate, with room for ``names_held`` names."""
    spool, intake = _spool(tmp_path)
    gate = _Gate(intake, monkeypatch)
    threads = IntakeThread(
        intake, LOG, clock=SystemClock(), remote_writers=False, names_held=names_held
    )
    return spool, gate, threads


def test_a_flood_waits_in_the_kernel_queue_not_in_the_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool, gate, threads = _held_up(tmp_path, monkeypatch, names_held=4)
    counted = _Counted(threads)
    watcher = InotifyWatcher(
        spool.dir("incoming"), counted.arrived, threads.request_sweep, lambda: None, LOG
    )
    stage = tmp_path / "stage"
    stage.mkdir()
    names = [f"j{n:03d}.yaml" for n in range(200)]
    for n, name in enumerate(names):
        (stage / name).write_text(NAMED.format(id=f"j{n:03d}"))
    threads.start()
    watcher.start()
    try:
        for name in names:
            os.rename(stage / name, spool.dir("incoming") / name)
        gate.entered.wait(30)
        # The watcher's thread waits in ``arrived`` with four names waiting: the other
        # ~190 are still the kernel's (intake holds the group it took before the gate).
        wait_for(lambda: counted.calls - counted.returned == 1 and threads._queue.qsize() == 4,
                 what="the watcher waiting for room")  # fmt: skip
        assert counted.returned < len(names) - 100
        assert len(os.listdir(spool.dir("incoming"))) == len(names)
        gate.open.set()
        wait_for(lambda: len(os.listdir(spool.dir("pending"))) == len(names), what="all accepted")
    finally:
        gate.open.set()
        threads.stop()
        watcher.stop()
    assert counted.longest <= 4
    assert counted.returned == len(names)


def test_intake_stopping_lets_a_waiting_watcher_go_and_its_file_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool, gate, threads = _held_up(tmp_path, monkeypatch, names_held=1)
    for n in range(3):
        (spool.dir("incoming") / f"j{n}.yaml").write_text(NAMED.format(id=f"j{n}"))
    threads.start()
    threads.arrived("j0.yaml")  # intake takes it, and waits at the gate
    gate.entered.wait(30)
    threads.arrived("j1.yaml")  # the one name that may wait
    third = threading.Thread(target=threads.arrived, args=("j2.yaml",))
    third.start()
    third.join(0.3)
    assert third.is_alive(), "a name past names_held waits for room"
    stopping = threading.Thread(target=threads.stop)
    stopping.start()
    third.join(30)
    assert not third.is_alive(), "intake stopping lets the watcher go"
    gate.open.set()
    stopping.join(30)
    assert sorted(job.job_id for job in spool.jobs.list_jobs("pending")) == ["j0", "j1"]
    assert os.listdir(spool.dir("incoming")) == ["j2.yaml"], "left for the next start's sweep"


def test_a_sweep_reads_incoming_group_by_group_not_all_names_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep of a flood (a scan, or the kernel's queue overflowing) held every name of
    incoming/ in one sorted list while it took them: ~70 bytes a file on top of the flood."""
    spool, intake = _spool(tmp_path)
    count = 3000
    for n in range(count):
        (spool.dir("incoming") / f"20261206-{n:06d}-flood.yaml").write_text("")
    offered: list[int] = []

    def counted(names: Sequence[str], **kwargs: Any) -> list[Accepted | Rejected | None]:
        offered.append(len(names))
        return [None] * len(names)

    monkeypatch.setattr(intake, "offer_all", counted)
    tracemalloc.start()
    try:
        intake.sweep()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(offered) == count and max(offered) == GROUP
    # Measured: ~14 KB, where the sorted list of all names made ~415 KB.
    assert peak < 60_000, f"{peak} bytes at the sweep's height for {count} files"


def test_a_sweep_forgets_the_backoff_of_files_gone_and_keeps_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool, intake = _spool(tmp_path)
    clock = intake._clock
    assert isinstance(clock, FakeClock)
    names = [f"j{n}.yaml" for n in range(3)]
    for n, name in enumerate(names):
        (spool.dir("incoming") / name).write_text(NAMED.format(id=f"j{n}"))

    def broken(prepared: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(spool.stages, "settle", broken)
    assert intake.sweep() == 0, "all three went back, each with a backoff"
    assert set(intake._backoff) == set(names)
    monkeypatch.undo()
    (spool.dir("incoming") / "j1.yaml").unlink()  # its submitter took it back
    assert intake.sweep() == 0, "the others wait out their backoff"
    assert set(intake._backoff) == {"j0.yaml", "j2.yaml"}
    clock.advance(1.0)
    assert intake.sweep() == 2 and not intake._backoff
