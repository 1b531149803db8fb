"""Retention: which finished jobs (done/, failed/) are removed, by age and by count.

The config's ``retention:`` sets ``max_age`` and ``max_count`` per state directory, and
``executors:`` gives some executors a longer (or shorter) ``max_age``: the invoices of a
billing executor outlive the logs of a nightly cleanup. A job's age is the time it entered its
directory (the directory's ctime: the rename that finished it). Deciding is pure; the spool
removes (moved out of the tree first, so that no half-deleted job is ever seen).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from spoold.core.errors import SpooldError
from spoold.core.units import parse_duration

if TYPE_CHECKING:
    from spoold.core.spool import JobDir, Spool

STATES = ("done", "failed")


class Rule(NamedTuple):
    max_age: float | None = None  # seconds
    max_count: int | None = None


class Retention(NamedTuple):
    """The config's ``retention:``; empty keeps everything (the default)."""

    states: Mapping[str, Rule] = {}
    executors: Mapping[str, float] = {}  # executor -> max_age

    @classmethod
    def from_document(cls, value: Mapping[str, Any] | None) -> Retention:
        value = value or {}
        states = {
            state: Rule(
                max_age=None if "max_age" not in rule else parse_duration(rule["max_age"]),
                max_count=rule.get("max_count"),
            )
            for state, rule in value.items()
            if state in STATES
        }
        executors = {
            name: parse_duration(rule["max_age"])
            for name, rule in (value.get("executors") or {}).items()
            if "max_age" in rule
        }
        return cls(states, executors)

    @property
    def active(self) -> bool:
        return bool(self.states or self.executors)

    def expired(
        self,
        state: str,
        jobs: Iterable[tuple[str, float]],
        now: float,
        executor_of: Callable[[str], str | None],
    ) -> list[str]:
        """The job ids of one state directory to remove; ``jobs`` are (id, entered) pairs.

        ``executor_of`` is asked only for jobs old enough for some rule to matter.
        """
        rule = self.states.get(state, Rule())
        ordered = sorted(jobs, key=lambda job: job[1])  # oldest first
        ages = [(job_id, now - entered) for job_id, entered in ordered]
        shortest = min([a for a in [rule.max_age, *self.executors.values()] if a is not None],
                       default=None)  # fmt: skip
        doomed: list[str] = []
        keep_from = 0
        if rule.max_count is not None and len(ordered) > rule.max_count:
            keep_from = len(ordered) - rule.max_count
        for index, (job_id, age) in enumerate(ages):
            too_many = index < keep_from
            if not too_many and (shortest is None or age <= shortest):
                continue
            executor = executor_of(job_id)
            limit = self.executors.get(executor or "", rule.max_age)
            # An executor's own max_age also protects its jobs from the count rule.
            if executor in self.executors:
                too_many = False
            if too_many or (limit is not None and age > limit):
                doomed.append(job_id)
        return doomed


def apply_retention(
    spool: Spool,
    retention: Retention,
    now: float,
    *,
    states: Iterable[str] = STATES,
    dry_run: bool = False,
) -> list[JobDir]:
    """Remove the finished jobs of ``states`` that ``retention`` says to; return them.

    ``dry_run``: remove nothing, return what would go. A job another process removed
    meanwhile (the daemon's hourly pass, a ``spoold purge``) is left out. The daemon's
    retention and ``spoold purge`` both come here.
    """
    if not retention.active:
        return []
    gone: list[JobDir] = []
    for state in states:
        entered = spool.jobs.entered_times(state)
        jobs = {job.job_id: job for job, _ in entered}

        def executor_of(job_id: str, jobs: dict[str, JobDir] = jobs) -> str | None:
            try:
                found = spool.jobs.read_status(jobs[job_id])
            except (OSError, SpooldError, ValueError):
                return None
            return str(found.get("executor") or "") or None

        ages = [(job.job_id, when) for job, when in entered]
        for job_id in retention.expired(state, ages, now, executor_of):
            if not dry_run:
                try:
                    spool.jobs.purge(jobs[job_id])
                except FileNotFoundError:
                    continue
            gone.append(jobs[job_id])
    return gone
