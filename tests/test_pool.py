"""How the daemon spreads its workers over worker processes (the processes themselves are
driven for real here, in test_daemon_chaos and in test_daemon_intake)."""

from __future__ import annotations

import logging
import marshal
import threading
import time
from collections.abc import Callable
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
import yaml

from spoold.core.clock import SystemClock
from spoold.core.config import Config, load_config
from spoold.core.errors import WorkerProcessError
from spoold.core.spool import Spool
from spoold.intake.incoming import Accepted, Intake
from spoold.intake.validation import job_validator
from spoold.run import pool
from spoold.run.pool import (
    DOCUMENTS_KEPT,
    Done,
    Leaving,
    LinkedSlots,
    ParentLink,
    Ready,
    Returned,
    Revoke,
    RunJob,
    Stop,
    Told,
    WorkerProcesses,
    plan_slots,
    receive_message,
    send_message,
    serve_jobs,
)
from spoold.run.registry import ExecutorRegistry
from tests.fakes import FakeClock
from tests.harness import DEFAULT_BOUND, local_job, wait_finished, wait_for, write_config
from tests.worker_entries import REFUSE


@pytest.mark.parametrize(
    ("workers", "processes", "plan"),
    [
        (2, 2, [("0",), ("1",)]),
        (1, 4, [("0",)]),  # never a process without a slot
        (5, 2, [("0", "2", "4"), ("1", "3")]),
        (3, 1, [("0", "1", "2")]),
    ],
)
def test_slots_are_spread_round_robin(
    workers: int, processes: int, plan: list[tuple[str, ...]]
) -> None:
    assert plan_slots(workers, processes) == plan
    slots = [slot for group in plan for slot in group]
    assert sorted(slots, key=int) == [str(n) for n in range(workers)], "each slot once"


def test_messages_cross_intact() -> None:
    ours, theirs = Pipe()
    document = {"job_id": "a", "product": {"commands": ["x", "y"]}, "retries": 2, "on": True}
    for message in (RunJob("a", document), RunJob("b"), Stop(2.5), Ready(), Leaving(), Done("a"),
                    Told(("a~1.json", "b~2.json"))):  # fmt: skip
        send_message(ours, message)
        assert receive_message(theirs) == message


def test_a_document_marshal_cannot_take_goes_without_it() -> None:
    ours, theirs = Pipe()
    send_message(ours, RunJob("a", {"odd": object()}))
    assert receive_message(theirs) == RunJob("a", None)  # the worker reads job.yaml itself


def test_junk_on_the_wire_is_an_error_not_a_crash() -> None:
    ours, theirs = Pipe()
    for junk in (b"\xff\x00garbage", marshal.dumps(("launch", "missiles")),
                 marshal.dumps(("told", ("a", 3)))):  # fmt: skip
        ours.send_bytes(junk)
        with pytest.raises(WorkerProcessError):
            receive_message(theirs)
    ours.close()
    with pytest.raises(EOFError):
        receive_message(theirs)


def test_a_worker_process_that_cannot_start_again_is_tried_again_its_job_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker process left while idle; the next job needs one, and it cannot start: that is
    said, the job waits in the queue (not lost, not failed), and the next round starts one."""
    root = tmp_path / "spool"
    spool = Spool(root)
    spool.init()
    config = load_config(write_config(tmp_path / "config.yaml", root, workers=1,
                                      worker_idle_exit="200ms"), spool=root)  # fmt: skip
    asked: list[bool] = []
    trimmed: list[bool] = []
    monkeypatch.setattr(pool, "release_memory", lambda: trimmed.append(True))
    workers = WorkerProcesses(
        config, logging.getLogger("spoold.test"), processes=1,
        entry="tests.worker_entries:serve_unless_refused", clock=SystemClock(),
        on_lost=lambda: asked.append(True),
        on_deferred=lambda job_id, due: None, on_cancel=lambda job_id, why: None,
    )  # fmt: skip
    workers.start()
    try:
        wait_for(lambda: workers._links == [None], what="the idle worker process to leave")
        assert not workers.lost_any() and not asked, "leaving is not dying"
        wait_for(lambda: trimmed == [True], what="the main process at rest trimming its heap")
        intake = Intake(spool, job_validator(ExecutorRegistry.from_entry_points()), SystemClock(),
                        max_file_size=1 << 20, settle_time=0, logger=logging.getLogger("spoold.test"),
                        on_accepted=lambda job, document: None)  # fmt: skip
        (root / "incoming" / "j.yaml").write_text(yaml.safe_dump(local_job("j", "true")))
        assert isinstance(intake.offer("j.yaml", complete=True), Accepted)
        monkeypatch.setenv(REFUSE, "1")
        workers.submit("j")
        assert asked and workers.lost_any(), "a job waits: one is wanted"
        assert workers.replace_dead() == []  # said, not raised
        assert workers.lost_any() and workers.holds("j") and workers._links == [None]
        monkeypatch.delenv(REFUSE)
        assert workers.replace_dead() == []
        assert wait_finished(root, "j")[0] == "done"
    finally:
        workers.stop(5.0)


def _refusing_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_accepted: Callable[..., None]
) -> tuple[Path, WorkerProcesses, Intake]:
    """A spool, its intake (``on_accepted``) and a pool of one worker process that is not
    started yet: what is submitted waits in the queue until REFUSE is unset and it starts."""
    root = tmp_path / "spool"
    spool = Spool(root)
    spool.init()
    config = load_config(write_config(tmp_path / "config.yaml", root, workers=1), spool=root)
    monkeypatch.setenv(REFUSE, "1")
    workers = WorkerProcesses(
        config, logging.getLogger("spoold.test"), processes=1,
        entry="tests.worker_entries:serve_unless_refused", clock=SystemClock(), on_lost=lambda: None,
        on_deferred=lambda job_id, due: None, on_cancel=lambda job_id, why: None,
    )  # fmt: skip
    intake = Intake(spool, job_validator(ExecutorRegistry.from_entry_points()), SystemClock(),
                    max_file_size=1 << 20, settle_time=0, logger=logging.getLogger("spoold.test"),
                    on_accepted=on_accepted)  # fmt: skip
    return root, workers, intake


def _accept(root: Path, intake: Intake, job_id: str, commands: str) -> None:
    (root / "incoming" / f"{job_id}.yaml").write_text(yaml.safe_dump(local_job(job_id, commands)))
    assert isinstance(intake.offer(f"{job_id}.yaml", complete=True), Accepted)


def test_a_long_queue_keeps_the_documents_of_its_first_jobs_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flood's thousands of parsed job files held while their jobs wait were most of the
    main process's peak memory, and left its heap fragmented after: the jobs queued behind
    the first ones keep none, and their worker process reads job.yaml."""
    documents: dict[str, dict[str, object]] = {}
    root, workers, intake = _refusing_pool(
        tmp_path, monkeypatch, lambda job, document: documents.update({job.job_id: document})
    )
    ids = [f"j{n:03d}" for n in range(DOCUMENTS_KEPT + 6)]
    for job_id in ids:
        _accept(root, intake, job_id, "true")
    try:
        for job_id in ids:
            workers.submit(job_id, documents[job_id])
        # A job queued without its document waits as its id alone.
        held = {job_id: workers._queue._ids[job_id].payload for job_id in ids}
        kept = [job_id for job_id, job in held.items() if job is not None and job.document]
        assert all(held[job_id] is None for job_id in ids[DOCUMENTS_KEPT:])
        assert kept == ids[:DOCUMENTS_KEPT]
        monkeypatch.delenv(REFUSE)
        workers.start()
        for job_id in ids:
            assert wait_finished(root, job_id)[0] == "done", job_id
    finally:
        workers.stop(5.0)


def test_jobs_waiting_packed_are_held_and_each_runs_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the queue's ``held`` a waiting job is packed: the pool still says it holds it (a
    scan of pending/ must not queue it again), and each runs once, in order."""
    root, workers, intake = _refusing_pool(tmp_path, monkeypatch, lambda job, document: None)
    workers._queue._held = 3
    ids = [f"j{n:03d}" for n in range(40)]
    for job_id in ids:
        _accept(root, intake, job_id, "true")
    try:
        for job_id in ids:
            assert workers.submit(job_id)
        assert len(workers._queue._ids) == 3, "the others wait packed"
        assert workers.held() == set(ids) and workers.holds(ids[-1])
        assert not workers.submit(ids[0]), "waiting as an object: not queued again"
        monkeypatch.delenv(REFUSE)
        workers.start()
        statuses = [wait_finished(root, job_id) for job_id in ids]
    finally:
        workers.stop(5.0)
    assert [(state, len(status["attempts"])) for state, status in statuses] == [("done", 1)] * 40
    started = [status["started_at"] for _, status in statuses]
    assert started == sorted(started), "in the order queued (one slot: one at a time)"


class _Slots:
    """What serve_jobs asks of a worker process's slots and runner: busy while ``working``,
    idle since ``ended`` when not; how often it asked."""

    def __init__(self) -> None:
        self.working = True
        self.looks = 0
        self.ended = 0.0

    @property
    def idle_since(self) -> float | None:
        self.looks += 1
        return None if self.working else self.ended

    def end(self, at: float) -> None:
        """Its last job ended ``at`` (time.monotonic); nothing wakes the loop for it."""
        self.ended, self.working = at, False

    def start(self) -> None: ...

    def active_ids(self) -> list[str]:
        return []

    def revoke(self) -> list[str]:
        return []

    def stop(self, grace: float, clock: object) -> None: ...


class _Beat:
    """No lease to keep: its next round is an hour away."""

    next_due = time.monotonic() + 3600

    def restart(self, now: float) -> None: ...

    def tick(self, now: float) -> None: ...


class _NoSupervisors:
    def expire(self, now: float) -> None: ...


def _serving(slots: _Slots, linger: float) -> tuple[Connection, threading.Thread]:
    """serve_jobs over ``slots`` in a thread, its Ready read; the main process's end."""
    ours, theirs = Pipe()
    parent = ParentLink(theirs)
    serving = threading.Thread(target=serve_jobs, args=(
        theirs, parent, slots, slots, _Beat(),
    ), kwargs={"launcher": _NoSupervisors(), "slots": LinkedSlots(parent, {}),
               "config": Config(shutdown_grace=1.0), "clock": SystemClock(),
               "linger": linger})  # fmt: skip
    serving.start()
    assert _next(ours) == Ready()
    wait_for(lambda: slots.looks >= 1, what="its first look")  # busy: then it waits
    return ours, serving


def _stop(ours: Connection, serving: threading.Thread) -> None:
    send_message(ours, Stop(1.0))
    serving.join(DEFAULT_BOUND)
    assert not serving.is_alive()


def _next(conn: Connection) -> object:
    assert conn.poll(DEFAULT_BOUND), "a message in time"
    return receive_message(conn)


def test_a_worker_process_leaves_a_linger_after_its_last_job_with_nothing_to_wake_it() -> None:
    """A job's end wakes no one in a worker process, and its next lease heartbeat may be far
    off (10 s by default, an hour here): it looks at least once a linger while busy, so
    Leaving comes a linger after the end, not a heartbeat later."""
    slots, linger = _Slots(), 0.4
    ours, serving = _serving(slots, linger)
    try:
        ended = time.monotonic()
        slots.end(ended)
        assert _next(ours) == Leaving()
        assert time.monotonic() - ended >= linger, "never early"
    finally:
        _stop(ours, serving)


def test_a_worker_process_counts_its_linger_from_no_sooner_than_it_last_saw_work() -> None:
    """The pool says when its last job ended; the stay never counts from before the loop last
    saw work here (the runner may have held a job outside the pool's slots): an end the pool
    dates an hour back, seen right after a busy look, still leaves a whole linger later."""
    slots, linger = _Slots(), 0.4
    before = time.monotonic()
    ours, serving = _serving(slots, linger)  # its first look, after ``before``, was busy
    try:
        slots.end(time.monotonic() - 3600)
        send_message(ours, Revoke())  # wakes it: it looks, idle
        assert _next(ours) == Returned(())
        assert _next(ours) == Leaving()
        assert time.monotonic() - before >= linger
    finally:
        _stop(ours, serving)


def test_a_worker_process_with_no_linger_never_says_leaving() -> None:
    """The second Revoke is read by a poll that followed a look made after the first was
    answered, so after the end: any Leaving would come before the second Returned. (How many
    looks were made when the first Returned was read is a race; it is never asked.)"""
    slots = _Slots()
    ours, serving = _serving(slots, 0.0)
    try:
        slots.end(time.monotonic() - 3600)
        send_message(ours, Revoke())
        assert _next(ours) == Returned(())
        send_message(ours, Revoke())
        assert _next(ours) == Returned(()), "no Leaving before it"
        assert slots.looks >= 2, "its first look, busy, and one idle"
    finally:
        _stop(ours, serving)


def test_worker_processes_stay_longer_each_time_a_job_soon_needed_one_again() -> None:
    """The first stay is short; a start soon after a leave doubles it, up to the ceiling
    (``worker_idle_exit``); a start long after the last leave begins again; processes started
    together are one start."""
    linger = pool.Linger(30.0, 5.0)
    assert linger.starting(0.0) == 5.0  # the daemon's start
    assert linger.starting(0.0) == 5.0, "no leave in between: as it was"
    stays = []
    now = 100.0
    for _ in range(5):
        linger.left(now)
        now += 3.0  # a job 3 s after it left: the leave saved little
        stays.append(linger.starting(now))
        assert linger.starting(now) == stays[-1], "its sibling started with it"
        now += stays[-1] + 1.0
    assert stays == [10.0, 20.0, 30.0, 30.0, 30.0]
    linger.left(now)
    assert linger.starting(now + 30.0) == 5.0, "a quiet spell as long as the ceiling: anew"
    linger.left(now)
    assert linger.starting(now + 29.0) == 10.0
    assert pool.Linger(2.0, 5.0).starting(0.0) == 2.0, "never more than the ceiling"
    assert pool.Linger(0.0, 5.0).starting(0.0) == 0.0, "0: for the daemon's life"


def _lingering(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, worker_idle_exit: object
) -> tuple[Path, WorkerProcesses, FakeClock, list[float], Callable[[str], pool._Link]]:
    """One worker process, its first stay 0.2 s: the spool, the processes, their clock, when
    each started, and how to hand one a job (returning its link)."""
    root = tmp_path / "spool"
    spool = Spool(root)
    spool.init()
    config = load_config(write_config(tmp_path / "config.yaml", root, workers=1,
                                      worker_idle_exit=worker_idle_exit), spool=root)  # fmt: skip
    monkeypatch.setattr(pool, "LINGER_FIRST", 0.2)
    clock = FakeClock()
    started: list[float] = []
    workers = WorkerProcesses(
        config, logging.getLogger("spoold.test"), processes=1,
        entry="tests.worker_entries:serve_unless_refused", clock=clock, on_lost=lambda: None,
        on_deferred=lambda job_id, due: None, on_cancel=lambda job_id, why: None,
        on_started=lambda: started.append(clock.monotonic()),
    )  # fmt: skip
    intake = Intake(spool, job_validator(ExecutorRegistry.from_entry_points()), SystemClock(),
                    max_file_size=1 << 20, settle_time=0, logger=logging.getLogger("spoold.test"),
                    on_accepted=lambda job, document: None)  # fmt: skip

    def submit(job_id: str) -> pool._Link:
        (root / "incoming" / f"{job_id}.yaml").write_text(yaml.safe_dump(local_job(job_id, "true")))
        assert isinstance(intake.offer(f"{job_id}.yaml", complete=True), Accepted)
        workers.submit(job_id)
        assert workers.replace_dead() == []  # what the daemon's round does when one is wanted
        link = workers._links[0]
        assert link is not None
        return link

    return root, workers, clock, started, submit


def test_worker_idle_exit_0_keeps_the_worker_processes_for_the_daemons_life(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``worker_idle_exit: 0`` is "stay", not a ceiling of 0 s nor the default: the process
    is sent no stay, and is there still five first stays after its job."""
    root, workers, _clock, _started, submit = _lingering(tmp_path, monkeypatch, 0)
    workers.start()
    try:
        link = submit("a")
        assert link.linger == 0.0
        assert wait_finished(root, "a")[0] == "done"
        pid = link.process.pid
        time.sleep(5 * pool.LINGER_FIRST)  # a process sent any stay would have left by now
        assert workers._links[0] is link and link.process.poll() is None, pid
    finally:
        workers.stop(5.0)


def test_a_worker_process_started_again_soon_after_one_left_is_sent_a_longer_linger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Driven for real: the processes the main process starts carry the stay ``Linger`` gives
    them, and leave after it."""
    root, workers, clock, started, submit = _lingering(tmp_path, monkeypatch, "2s")
    stays: list[float] = []

    def one_job(job_id: str) -> None:
        link = submit(job_id)
        stays.append(link.linger)
        assert wait_finished(root, job_id)[0] == "done"
        wait_for(
            lambda: workers._links == [None], what=f"the worker process to leave after {job_id}"
        )

    workers.start()
    try:
        link = workers._links[0]
        assert link is not None and link.linger == 0.2
        wait_for(lambda: workers._links == [None], what="the idle worker process to leave")
        one_job("a")  # soon after: twice as long
        one_job("b")
        clock.advance(2.0)  # a quiet spell as long as worker_idle_exit
        one_job("c")
        assert stays == [0.4, 0.8, 0.2]
        assert len(started) == 4, "each start told (the metrics count them)"
    finally:
        workers.stop(5.0)
