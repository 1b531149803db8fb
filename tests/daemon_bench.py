"""The daemon's loop on a FakeClock: its parts built by Daemon.build, its workers in process.

The test plays every part that waits: the loop's rounds (``tick``, at the times the test moves
the clock to), APScheduler's wake-ups (``fire``, at the times its trigger names), the watcher
(``drop`` offers the file as its event would) and the worker processes (``work``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from spoold.core.config import load_config
from spoold.core.own_log import close_logging
from spoold.daemon import Daemon, Systemd
from spoold.intake.incoming import Accepted, Rejected
from spoold.run.dispatch import JobMeta
from spoold.run.observed import Observation
from spoold.wiring import Parts
from tests.fakes import FakeClock
from tests.harness import drop


class InlineWorkers:
    """The daemon's workers in this process, on its clock: what is handed over waits, in order,
    until ``work()`` runs it to its end as a worker slot would (claim, run, record).

    Nothing runs between the test's calls, so nothing is ever in flight, and no process dies.
    Priorities and concurrency limits (DispatchQueue) are not modelled: jobs run one at a time.
    """

    def __init__(
        self,
        parts: Parts,
        *,
        on_lost: Callable[[], None],
        on_deferred: Callable[[str, float], None],
        on_cancel: Callable[[str, str], None],
        on_observed: Callable[[Observation], None] | None = None,
        on_started: Callable[[], None] | None = None,
        on_told: Callable[[str], None] | None = None,
    ) -> None:
        # No process to lose, or to start; no concurrency strategy to refuse a job.
        del on_lost, on_cancel, on_started, on_told  # its commits are the daemon's process's
        self.runner = parts.runner(on_deferred=on_deferred, observe=on_observed)
        self.queued: list[str] = []
        self.adopting: set[str] = set()

    @property
    def processes(self) -> int:
        return 1

    def start(self) -> None:
        pass

    def stop(self, grace: float) -> None:
        pass

    def submit(
        self,
        job_id: str,
        document: dict[str, Any] | None = None,
        meta: JobMeta | None = None,
        *,
        adopt: bool = False,
        user: str | None = None,
    ) -> bool:
        if job_id in self.queued:
            return False
        if adopt:
            self.adopting.add(job_id)
        if document is not None:
            self.runner.remember(job_id, document)
        self.queued.append(job_id)
        return True

    def holds(self, job_id: str) -> bool:
        return job_id in self.queued

    def held(self) -> frozenset[str]:
        return frozenset(self.queued)

    def in_flight(self) -> frozenset[str]:
        return frozenset()

    def lost_any(self) -> bool:
        return False

    def replace_dead(self) -> list[str]:
        return []

    def work(self) -> list[str]:
        """Run every job handed over, one after another; return their ids."""
        ran = []
        while self.queued:
            job_id = self.queued.pop(0)
            adopt = job_id in self.adopting
            self.adopting.discard(job_id)
            job = self.runner.adopt(job_id) if adopt else self.runner.claim(job_id)
            if job is not None:
                self.runner.run(job)
                ran.append(job_id)
        return ran


class TickedDaemon:
    """A daemon built from ``config`` on ``clock``, started as ``Daemon.run`` starts it (recovery,
    then the schedules), and never waiting by itself."""

    def __init__(self, spool: Path, config: Path, clock: FakeClock) -> None:
        self.spool = spool
        self.clock = clock
        self.config = load_config(config, spool=spool)
        assert self.config.logdir is not None, "the bench reads the daemon's log from logdir"
        self.daemon = Daemon.build(self.config, clock=clock, make_workers=InlineWorkers)
        self.daemon.systemd = Systemd({})  # not the test runner's NOTIFY_SOCKET, if it has one
        workers = self.daemon.workers
        assert isinstance(workers, InlineWorkers)
        self.workers = workers
        # Registered for real, but paused: the test, not the wall clock, decides when it fires.
        self._aps = self.daemon.scheduler._aps
        self._aps.start(paused=True)
        self._woken: dict[str, datetime] = {}  # APScheduler's previous wake-up, per schedule
        self.daemon.recover()
        self.daemon.scheduler.sync()  # what Scheduler.start does, once the workers run

    def tick(self) -> float:
        """One round of the daemon's loop now; when the next one is due (monotonic)."""
        return self.daemon.tick(self.clock.monotonic())

    def advance_to(self, moment: float) -> None:
        """Move the clock to ``moment`` (monotonic), as the loop's wait would."""
        self.clock.advance(max(moment - self.clock.monotonic(), 0.0))

    def drop(self, name: str, document: dict[str, Any]) -> Accepted | Rejected | None:
        """Drop a job file into incoming/ and offer it, as the watcher's event would."""
        drop(self.spool, name, document)
        return self.daemon.intake.offer(name, complete=True)

    def work(self) -> list[str]:
        """Let the workers run what they were handed; return the ids they ran."""
        return self.workers.work()

    def registered(self, job_id: str) -> bool:
        """Whether APScheduler holds the schedule ``job_id`` (and would wake spoold for it)."""
        return self._aps.get_job(job_id) is not None

    def fire(self, job_id: str) -> datetime:
        """Move the clock to APScheduler's next wake-up for ``job_id`` and wake the scheduler
        there, as APScheduler would: its trigger asked as APScheduler asks it (without a
        previous wake-up first, then after each)."""
        job = self._aps.get_job(job_id)
        assert job is not None, f"APScheduler has no schedule {job_id}"
        moment: datetime = job.trigger.get_next_fire_time(self._woken.get(job_id), self.clock.now())
        self.clock.advance(max((moment - self.clock.now()).total_seconds(), 0.0))
        self._woken[job_id] = moment
        self.daemon.scheduler.fire(job_id)
        return moment

    def log(self) -> str:
        """The daemon's own log (logdir/spoold.log)."""
        assert self.config.logdir is not None
        for handler in logging.getLogger("spoold").handlers:
            handler.flush()
        return (self.config.logdir / "spoold.log").read_text()

    def close(self) -> None:
        """Stop APScheduler's thread and close the log; nothing else of this daemon runs on.

        No stop of the daemon's own runs: for the spool, it is gone as if killed.
        """
        self.daemon.scheduler.stop()
        if self.daemon.sweeping is not None:
            self.daemon.sweeping.join(60)
        close_logging()
