"""The executor plugin API: one small base class with a template method.

``Executor.run`` keeps the invariants every executor must honour (log lines, errors turned into
a failed result, never an exception into the worker); a subclass fills in ``execute``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, ClassVar
from urllib.parse import urlsplit

from spoold.core.clock import Clock, parse_rfc3339
from spoold.core.config import is_loopback
from spoold.core.errors import ExecutorError, NotStarted, SpooldError
from spoold.core.job import ArtifactSpec
from spoold.core.joblog import JobLog
from spoold.core.limits import Limits
from spoold.core.units import format_duration
from spoold.core.usage import Usage
from spoold.run.process import Processes, RunAs


@dataclass(frozen=True)
class RunContext:
    """Everything an executor may use to run one attempt of a job."""

    job_id: str
    executor: str
    type: str | None
    product: Mapping[str, Any]
    workdir: Path
    env: Mapping[str, str]
    log: JobLog
    clock: Clock
    timeout: float | None
    kill_grace: float
    cancel: threading.Event
    before_script: tuple[str, ...] = ()
    #: Call once the job's work has begun, with the pid of its process if it has one: spoold
    #: then records the job as running (and the process, so that recovery can end it).
    on_start: Callable[[int | None], None] | None = None
    #: Resource limits for the job's local processes (``limits:``), or None.
    limits: Limits | None = None
    #: The user the job's local processes run as (``run_as:``), or None: spoold's own.
    run_as: RunAs | None = None
    #: The artifacts declared for this unit (globs relative to the work dir). spoold collects
    #: them from ``workdir`` after ``execute``: an executor that runs elsewhere (a container,
    #: another host) copies the matching files from there into ``workdir`` first.
    artifacts: tuple[ArtifactSpec, ...] = ()
    #: The part of ``env`` that is the job's own: its variables, its secrets' variables and
    #: spoold's about the job (``JOB_ID``, ``SPOOLD_*``, ``RUNNER_*``). ``env`` adds what of
    #: this host a local process needs (``PATH``, the locale, ``TZ``, the user's ``HOME``,
    #: what the config's ``pass_env`` names: never the rest of spoold's own environment): an
    #: executor that runs elsewhere (a container, another host) passes on only ``job_env``.
    job_env: Mapping[str, str] = field(default_factory=dict)
    #: The operator's settings for this executor: the config's ``executors: {NAME: {...}}``.
    settings: Mapping[str, Any] = field(default_factory=dict)
    #: Names this run of the executor among all of the job's: the attempt, and the step and
    #: its try where there are steps (``3``, ``3.build.2``). What an executor starts elsewhere
    #: carries it (a container's label, a remote pid file's name), so that ``resume`` finds it.
    unit_key: str = "1"
    #: The host whose claim the job runs under (its host id): what an executor starts elsewhere
    #: carries it (a container's label), so that a host's recovery tells its own leftovers
    #: from the work of a host that took the job over (``RunningJobs``). "": not known.
    host: str = ""
    #: Names the job among the jobs of every spool, the same on every host that shares its
    #: spool (``JobStatus.identity``): what an executor starts elsewhere may carry it, so that
    #: the host that took the job over finds an earlier attempt's work its first host left
    #: running, and ends it before it starts the job again. "": not known.
    job_key: str = ""
    #: This unit may have been started under an earlier daemon that died or stopped (the job
    #: was adopted): attach to what ``unit_key`` started if it is still there, or report how it
    #: ended; start the work only if nothing of it was started.
    resume: bool = False
    #: Set when spoold stops and leaves the job running for the next daemon to adopt: an
    #: executor whose work outlives spoold (a supervised process, a container, a remote
    #: process) stops watching it and returns ``ExecResult(None, detached=True)`` at once,
    #: leaving it running. One whose work cannot outlive spoold ignores it; ``cancel`` follows
    #: after the stop's grace.
    detach: threading.Event = field(default_factory=threading.Event)
    #: How ``run_local_process`` starts the job's processes: in the daemon and ``spoold exec``
    #: under a supervisor that outlives spoold (``spoold.run.launcher.Supervised``).
    processes: Processes = field(default_factory=Processes)
    #: Opens the job's log for reading, as written so far (what an executor that resumes
    #: compares with what its work printed while no daemon watched); None outside the daemon.
    read_log: Callable[[], IO[bytes]] | None = None
    #: The values of the secrets this attempt read (``${secret:NAME}``), by name. They are in
    #: ``env`` and ``job_env`` already (``SPOOLD_SECRET_NAME``, or inside a variable): an
    #: executor that hands the work to a system with a secret store of its own (Swarm) finds
    #: with these what it must pass through that store instead of an environment it records.
    secrets: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ExecResult:
    """What one attempt came to."""

    exit_code: int | None
    error: str | None = None
    timed_out: bool = False
    cancelled: bool = False
    result: dict[str, Any] = field(default_factory=dict)
    #: The failure is transient (a server busy or away, a connection lost): a retry can help.
    #: The job's ``retry:`` policy still decides whether one comes; status.json's attempt and
    #: ``spoold status`` say so.
    retryable: bool = False
    #: The executor stopped watching work it left running (``RunContext.detach``): the job
    #: stays in running/ for the next daemon, which resumes the unit.
    detached: bool = False
    #: Ended by a stop that was not the job's doing (its supervisor was stopped at a system
    #: shutdown, or died): the job's ``on_interrupt`` decides, as after a crash.
    interrupted: bool = False
    #: What the unit cost, as far as the executor can tell (CPU and memory from the kernel or
    #: the engine that ran it); ``Executor.run`` adds the wall time and the output it counted
    #: where the executor left them out. None only for a unit left running (``detached``).
    usage: Usage | None = None
    #: When its work ended, where that was before this daemon saw it end: a unit resumed
    #: that had ended while no daemon watched (its engine's record). None: as it is returned.
    ended_at: datetime | None = None
    #: Its work did not begin (``NotStarted``: its start could not be recorded): the job goes
    #: back to pending, tried again later, not failed for it.
    not_started: bool = False

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0 and self.error is None and not (self.timed_out or self.cancelled)

    @property
    def failure(self) -> str:
        """Why it did not succeed, in words: its error, else its exit code (never ``None``)."""
        if self.error:
            return self.error
        if self.exit_code is None:
            return "the executor gave no exit code"
        return f"exit code {self.exit_code}"


class Stopped(ExecutorError):
    """The attempt was cancelled or ran out of time, before or while its executor did a part
    of its work (a request): ``Executor.run`` makes it the attempt's result, cancelled or
    timed out, as a process ended by either would be."""

    def __init__(self, *, cancelled: bool) -> None:
        super().__init__("cancelled" if cancelled else "out of time")
        self.cancelled = cancelled

    def result(self, result: dict[str, Any] | None = None) -> ExecResult:
        """What the attempt came to: cancelled, or timed out."""
        return ExecResult(
            None, timed_out=not self.cancelled, cancelled=self.cancelled, result=result or {}
        )


class Executor(ABC):
    """Base class of every executor; subclasses are registered under ``spoold.executors``."""

    #: The name job files use in ``executor:``.
    name: ClassVar[str]
    #: Where the JSON sub-schema of ``product:`` lives (importlib.resources package and file).
    schema_package: ClassVar[str] = "spoold.schemas.executors"
    schema_resource: ClassVar[str]
    #: True when ``execute`` calls ``ctx.on_start`` itself (with the pid of a process it
    #: starts); otherwise ``run`` calls it just before ``execute``.
    reports_start: ClassVar[bool] = False
    #: Fields of ``product:`` that are programs (a shell script, a script file): spoold pastes
    #: no values into them, the program reads variables and secrets from its environment.
    script_fields: ClassVar[tuple[str, ...]] = ()
    #: True when its work is processes on this host started through ``run_local_process``:
    #: each runs under a supervisor that outlives spoold and records the unit itself, and
    #: the work dir is the job user's.
    supervised: ClassVar[bool] = False
    #: True when ``execute`` honours ``ctx.resume`` and ``ctx.detach`` (its work outlives
    #: spoold: a container, a remote process). A unit of another executor that was under way
    #: when its daemon died is not run again: the job's ``on_interrupt`` decides.
    resumable: ClassVar[bool] = False

    def run(self, ctx: RunContext) -> ExecResult:
        """Run one attempt; never raises, a failure to run is a failed result."""
        began, written = ctx.clock.monotonic(), ctx.log.output_bytes
        try:
            if not self.reports_start and ctx.on_start is not None:
                ctx.on_start(None)
            result = self.execute(ctx)
        except Stopped as stop:
            result = stop.result()
        except SpooldError as exc:
            retryable = isinstance(exc, ExecutorError) and exc.retryable
            ctx.log.error(str(exc) + (" (retryable)" if retryable else ""))
            result = ExecResult(exit_code=None, error=str(exc), retryable=retryable,
                                not_started=isinstance(exc, NotStarted))  # fmt: skip
        # A plugin bug must fail the job, not the worker: a sys.exit() or a KeyboardInterrupt
        # raised by a plugin too (a worker process disregards SIGINT: none comes from a
        # signal), which would otherwise end the worker with the job left in running/.
        except (Exception, SystemExit, KeyboardInterrupt) as exc:
            ctx.log.error(f"executor {self.name!r} failed unexpectedly: {exc!r}")
            result = ExecResult(exit_code=None, error=f"executor error: {exc!r}")
        if not result.detached:
            # A supervised unit's output is read by its supervisor, which counts it: none
            # passes through this log (None: not known, if the supervisor could not say).
            output = None if self.supervised else ctx.log.output_bytes - written
            result = measured(result, ctx.clock.monotonic() - began, output)
        if result.timed_out and result.error is None:
            limit = format_duration(ctx.timeout or 0)
            result = dataclasses.replace(result, error=f"timed out after {limit}", cancelled=False)
        elif result.cancelled and result.error is None:
            result = dataclasses.replace(result, error="cancelled", timed_out=False)
        return result

    @classmethod
    def validate(cls, product: Mapping[str, Any]) -> list[str]:
        """What is wrong with a ``product:`` its sub-schema accepted, in words; [] if nothing.

        For what a schema cannot say (two fields that exclude each other in a way it cannot
        express, a value's meaning). Intake, ``spoold validate`` and ``exec`` refuse the job
        with these messages. Runs on the document as written, before ``${NAME}`` is filled in.
        """
        return []

    @classmethod
    def recover(cls, spool_root: Path, running: Collection[str], log: logging.Logger) -> None:
        """After a crash: remove what this executor's jobs left outside spoold's process tree
        (containers, ...) for the jobs of ``spool_root`` that are no longer in ``running``,
        and for those another host holds now (``running`` is a ``RunningJobs``: see
        ``taken_elsewhere``, and ``RunContext.host`` for what to label the work with).

        Recovery calls it at start and whenever it ended jobs whose worker died (their
        processes on this host are killed before), and the daemon every 10 minutes, in a
        thread of its own (what a job's own clean-up could not remove). The default has
        nothing to remove.
        """
        return

    @abstractmethod
    def execute(self, ctx: RunContext) -> ExecResult:
        """Run the job's work; may raise SpooldError with a message for the log."""


class RunningJobs(frozenset[str]):
    """The ids of the jobs in running/, as ``Executor.recover`` gets them, with the host whose
    claim each is under (its lease's ``host``), where one is known (``holders``).

    What an executor started for a job under one host's claim (a container labelled with that
    host) is a leftover once another host holds the claim: it took the job over while this
    host's daemon was down, and runs it itself. A plain set (an older caller) says no holder.
    """

    holders: Mapping[str, str]

    def __new__(cls, holders: Mapping[str, str | None]) -> RunningJobs:
        jobs = super().__new__(cls, holders)
        jobs.holders = {job: host for job, host in holders.items() if host}
        return jobs


def taken_elsewhere(running: Collection[str], job: str | None, started_by: str | None) -> bool:
    """Whether work that host ``started_by`` started for ``job`` is left over: the job is no
    longer running, or another host holds its claim now (``RunningJobs``)."""
    if job not in running:
        return True
    holder = getattr(running, "holders", {}).get(job)
    return holder is not None and started_by is not None and started_by != holder


def measured(result: ExecResult, wall_seconds: float, output_bytes: int | None) -> ExecResult:
    """``result`` with the wall time and output bytes its executor did not measure itself
    (an API executor's work: these are all there is)."""
    usage = result.usage or Usage()
    if usage.wall_seconds is not None and (usage.output_bytes is not None or output_bytes is None):
        return result
    usage = usage._replace(
        wall_seconds=usage.wall_seconds if usage.wall_seconds is not None else wall_seconds,
        output_bytes=usage.output_bytes if usage.output_bytes is not None else output_bytes,
    )
    return dataclasses.replace(result, usage=usage)


def resumed(result: ExecResult, begun: Mapping[str, Any], now: datetime) -> ExecResult:
    """A resumed unit's result with its wall time from its start as recorded (``begun``'s
    ``started_at``), not from this daemon's adoption of it, to its end (``ended_at``, where it
    ended before this daemon saw it, else ``now``)."""
    try:
        start = parse_rfc3339(str(begun.get("started_at")))
    except ValueError:
        return result
    if result.usage is None:
        return result
    wall = max(((result.ended_at or now) - start).total_seconds(), 0.0)
    return dataclasses.replace(result, usage=result.usage._replace(wall_seconds=wall))


def run_local_process(ctx: RunContext, argv: list[str], cwd: Path | None = None) -> ExecResult:
    """Run a process on this host with the context's environment, limits and log."""
    if ctx.limits is not None:
        ctx.log.info(f"limits: {ctx.limits.describe()}")
        argv = ctx.limits.wrap(argv)
    outcome = ctx.processes.run(
        argv,
        key=ctx.unit_key,
        detach=ctx.detach,
        cwd=cwd or ctx.workdir,
        env=ctx.env,
        log=ctx.log,
        clock=ctx.clock,
        timeout=ctx.timeout,
        kill_grace=ctx.kill_grace,
        cancel=ctx.cancel,
        on_spawn=ctx.on_start,
        run_as=ctx.run_as,
    )
    if outcome.detached:
        return ExecResult(None, detached=True)
    if outcome.interrupted:
        why = outcome.why or (
            "its supervisor was stopped" if outcome.exit_code is not None else "its supervisor died"
        )
        return ExecResult(outcome.exit_code, why, interrupted=True, usage=outcome.usage)
    error = outcome.error
    if error is not None and ctx.limits is not None and outcome.exit_code is not None:
        # Not for a timeout or a cancel: spoold's own SIGKILL would look like the CPU limit.
        tail = outcome.tail or tuple(ctx.log.tail())
        hit = ctx.limits.explain(outcome.exit_code, "\n".join(tail))
        if hit is not None:
            ctx.log.error(hit)
            error = f"{hit} ({error})"
    return ExecResult(
        outcome.exit_code,
        error,
        outcome.timed_out,
        outcome.cancelled,
        usage=outcome.usage,
        ended_at=outcome.ended_at,
    )


def cleartext_problem(base_url: str, credential: str) -> str | None:
    """Why ``base_url`` would send ``credential`` in clear text, or None: plain http is for a
    loopback address only (a local test server, a tunnel)."""
    url = urlsplit(base_url)
    if url.scheme == "http" and not is_loopback(url.hostname or ""):
        return (
            f"base_url: {base_url} is plain http: the {credential} would travel in clear text; "
            "use https (only a loopback address may use http)"
        )
    return None


def within_workdir(ctx: RunContext, relative: str) -> Path:
    """A path inside the work dir; raise ExecutorError if ``relative`` would leave it."""
    path = (ctx.workdir / relative).resolve()
    if not path.is_relative_to(ctx.workdir.resolve()):
        raise ExecutorError(f"{relative!r} leaves the job's work dir")
    return path
