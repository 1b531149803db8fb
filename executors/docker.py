"""The ``docker`` executor: the job's script in a fresh container, removed at the end.

A container outlives the daemon that started it: on ``detach`` spoold leaves it running, and the
next daemon resumes the unit, finding the container by its labels (spool, job, unit).

The docker SDK is imported when a job runs, never with this module: spoold must load (and list
its executors) on hosts without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import heapq
import http.client
import io
import json
import logging
import math
import operator
import os
import posixpath
import shutil
import socket
import tarfile
import tempfile
import threading
import urllib.parse
import uuid
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import Any

from spoold.executors.base import ExecResult, Executor, RunContext, taken_elsewhere
from spoold.executors.local import shell_script

from spoold.core.clock import parse_rfc3339, rfc3339
from spoold.core.errors import ExecutorError, ExecutorNotAvailable
from spoold.core.joblog import JobLog
from spoold.core.units import format_duration, timeout_reason
from spoold.core.usage import Usage

#: Where the job's commands run, inside the container; artifacts are relative to it.
WORKDIR = "/spoold/work"
LABEL_JOB = "spoold.job"
LABEL_MANAGED = "spoold.managed"
LABEL_WORKER = "spoold.worker"
LABEL_SPOOL = "spoold.spool"  # whose recovery may remove it: several spools can share an engine
LABEL_UNIT = "spoold.unit"  # which run of the job's executor (RunContext.unit_key) started it
LABEL_HOST = "spoold.host"  # whose claim (RunContext.host): a host that took it over is not it
_ALIVE = frozenset({"created", "running", "restarting", "paused"})
_KILLED = 128 + 9  # the exit code of a container whose process got SIGKILL
_POLL = 0.05  # seconds between looks at cancel and the timeout
#: Seconds between readings of a running container's stats (``EngineUsage``): each costs the
#: engine a read of the container's cgroup.
_STATS_EVERY = 0.5
MAX_LINE = 64 * 1024  # a longer run of output without a newline is logged in pieces
_GLOB = frozenset("*?[")
#: spoold's line in the job's log just before it starts a container, with the container's name:
#: a resumed unit finds there where its output begins in the log, and its step's prefix.
_STARTING = "starting container "
#: How far behind the engine an earlier daemon may have been in writing the output to the log:
#: on resume, the engine's lines from this long before the last one logged are compared.
_LAG = timedelta(seconds=10)
_SKEW = timedelta(seconds=1)  # see _Logged.holds
_KEPT = 4096  # lines of the job's log held before those older than _LAG are dropped


def sdk() -> Any:
    try:
        import docker  # type: ignore[import-untyped]  # noqa: PLC0415 - only jobs need it
    except ImportError:
        raise ExecutorNotAvailable(
            "the docker executor needs the docker SDK: pip install spoold[docker]"
        ) from None
    return docker


class DockerExecutor(Executor):
    """Runs ``before_script`` then ``script`` (or ``commands``) with /bin/sh in a new container."""

    name = "docker"
    schema_resource = "docker.schema.json"
    reports_start = True
    resumable = True  # a container outlives spoold: a next daemon re-attaches by its labels
    script_fields = ("before_script", "script", "commands")

    @classmethod
    def validate(cls, product: Mapping[str, Any]) -> list[str]:
        """Mounts the engine would refuse only when the job runs."""
        problems, targets = [], set()
        for mount in product.get("mounts") or ():
            source, target = str(mount).split(":")[:2]
            if source.startswith("."):
                problems.append(
                    f"mounts: {source} is a relative path: give an absolute one or a volume name"
                )
            if target.rstrip("/") in targets:
                problems.append(f"mounts: {target} is mounted twice")
            targets.add(target.rstrip("/"))
        return problems

    @classmethod
    def recover(cls, spool_root: Path, running: Collection[str], log: logging.Logger) -> None:
        """Remove the containers of this spool's jobs that no longer run (a kill -9 of spoold)."""
        _recover(spool_root, running, log)

    def execute(self, ctx: RunContext) -> ExecResult:
        if ctx.detach.is_set():  # spoold stops before the unit began: the next daemon starts it
            return ExecResult(None, detached=True)
        docker = sdk()
        import requests  # noqa: PLC0415 - worker processes load it only to run such jobs

        failures = (docker.errors.DockerException, requests.RequestException)
        image = str(ctx.product["image"])
        try:
            client = docker.from_env()
            # Attached output may pause for longer than any API call may take: no read timeout.
            streams = docker.from_env(timeout=None)
        except failures as exc:
            raise ExecutorError(f"cannot reach the docker engine: {exc}", retryable=True) from exc
        try:
            container = _adopt(client, ctx) if ctx.resume else None
            resumed = container is not None
            if container is None:
                _ensure_image(client, image, ctx.log)
                container = client.containers.create(image, **_options(ctx))
            result: ExecResult | None = None
            try:
                if resumed:
                    result = _resume(container, streams, ctx)
                else:
                    if ctx.product.get("user") is not None:
                        _open_workdir(container)
                    result = _run(container, streams, ctx)
                return result
            finally:
                if result is not None and result.detached:
                    ctx.log.info(f"container {container.name} left running for the next daemon")
                else:
                    remove_container(container, ctx.log)
        except failures as exc:
            # Not a 5xx: the engine answers 500 for what no retry mends too (a runtime that
            # cannot start the image).
            raise ExecutorError(f"docker: {explain(exc)}", retryable=transient(exc)) from exc
        finally:
            client.close()
            streams.close()


def transient(exc: BaseException) -> bool:
    """Whether the engine was away (a connection refused, reset or timed out: restarting), so
    that another attempt may find it. Not an answer it gave: the SDK's APIError is a
    ``requests`` error too."""
    import requests  # noqa: PLC0415 - as the SDK: only where such jobs run

    return isinstance(exc, (requests.ConnectionError, requests.Timeout))


def _ensure_image(client: Any, image: str, log: JobLog) -> None:
    """Pull the image only when this host lacks it: a tag here wins over the registry's."""
    docker = sdk()
    try:
        client.images.get(image)
        return
    except docker.errors.ImageNotFound:
        pass
    log.info(f"image {image} is not on this host: pulling it")
    try:
        client.images.pull(image)  # the tag in the name, or latest: never every tag
    except docker.errors.DockerException as exc:
        raise ExecutorError(
            f"image {image} is not on this host and cannot be pulled: {explain(exc)}"
        ) from exc


def _options(ctx: RunContext) -> dict[str, Any]:
    product = ctx.product
    labels = identity_labels(ctx)
    if worker := ctx.env.get("RUNNER_ID"):
        labels[LABEL_WORKER] = worker
    if ctx.host:
        labels[LABEL_HOST] = ctx.host
    namespace = product.get("namespace")
    if namespace:
        labels["spoold.namespace"] = str(namespace)
    options: dict[str, Any] = {
        # The entrypoint, not the command: an image's own ENTRYPOINT would swallow the script.
        "entrypoint": ["/bin/sh", "-c", script_of(ctx)],
        "working_dir": WORKDIR,
        "environment": environment(ctx),
        "labels": labels,
        "name": f"{namespace or 'spoold'}-{ctx.job_id}-{uuid.uuid4().hex[:8]}",
        # PID 1 ignores SIGTERM unless it installs a handler, as sh does not: with an init,
        # `stop` ends the job within the grace period instead of always waiting all of it.
        "init": True,
        "tty": bool(product.get("tty", False)),
        "volumes": [str(mount) for mount in product.get("mounts") or ()],
    }
    # Without `network:`, the engine's default (bridge), as `docker run` gives: jobs fetch
    # packages and call APIs, and the local executor has this host's network anyway, so "none"
    # by default would break jobs without isolating spoold's. `network: none` cuts a job off.
    if product.get("network"):
        options["network_mode"] = str(product["network"])
    if product.get("user") is not None:
        options["user"] = str(product["user"])
    memory = product.get("memory") or (ctx.limits.memory if ctx.limits else None)
    if memory:
        options["mem_limit"] = memory
        options["memswap_limit"] = memory  # no swap on top: the limit means what it says
    if product.get("cpus"):
        options["nano_cpus"] = int(float(product["cpus"]) * 1e9)
    if product.get("pids"):
        options["pids_limit"] = int(product["pids"])
    return options


def _open_workdir(container: Any) -> None:
    """Docker makes the work dir root's: like /tmp, so that any ``user:`` can write to it."""
    info = tarfile.TarInfo(posixpath.basename(WORKDIR))
    info.type, info.mode = tarfile.DIRTYPE, 0o1777
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.addfile(info)
    container.put_archive(posixpath.dirname(WORKDIR), buffer.getvalue())


def script_of(ctx: RunContext) -> str:
    """The shell script of the job's ``before_script``, ``script`` and ``commands``, after the
    config's ``global_before_script``: what ``/bin/sh -c`` runs in the container."""
    product = ctx.product
    commands = [*_lines(product.get("before_script")), *_lines(product.get("script"))]
    commands += _lines(product.get("commands"))
    return shell_script(ctx.before_script, commands)


def _lines(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(line) for line in value]


def environment(ctx: RunContext) -> dict[str, str]:
    env = dict(ctx.job_env)  # not spoold's own environment: it describes this host
    env["RUNNER_WORKDIR"] = WORKDIR  # the host's path means nothing in the container
    env.update({str(k): str(v) for k, v in (ctx.product.get("env") or {}).items()})
    return env


def identity_labels(ctx: RunContext) -> dict[str, str]:
    """The labels that name the container of this unit of this job of this spool."""
    labels = {LABEL_MANAGED: "1", LABEL_JOB: ctx.job_id, LABEL_UNIT: ctx.unit_key}
    if job_dir := ctx.job_env.get("SPOOLD_JOB_DIR"):
        labels[LABEL_SPOOL] = str(Path(job_dir).parent.parent)
    return labels


class Pumps:
    """The threads that copy a container's output streams into the job's log."""

    def __init__(self, name: str) -> None:
        self.name = name
        #: The container's output streams, closed by ``stop``.
        self.streams: list[Any] = []
        #: Every thread has returned: the container's output is all in the log.
        self.done = threading.Event()
        #: Set before the streams are closed to leave the service running (swarm's): a line it
        #: has half printed is not logged, the next daemon copies it whole.
        self.leaving = threading.Event()
        #: How to log the last line of each stream that ended without a newline: done once the
        #: container ended (``flush``). Where the stream was dropped, or the container left to
        #: the next daemon, the engine's log gives that line whole.
        self.held: list[Callable[[], None]] = []
        self._threads: list[threading.Thread] = []

    def start(self, targets: Sequence[Callable[[], None]]) -> None:
        """Run each target in a thread of its own; ``done`` once all have returned (those of
        an earlier start included: they have, or this is not called)."""
        self.done.clear()
        left = len(targets)
        lock = threading.Lock()

        def run(target: Callable[[], None]) -> None:
            nonlocal left
            try:
                target()
            finally:
                with lock:
                    left -= 1
                    if not left:
                        self.done.set()

        for target in targets:
            thread = threading.Thread(target=run, args=(target,), name=self.name, daemon=True)
            self._threads.append(thread)
            thread.start()

    def flush(self) -> None:
        """Log the last lines held (``held``): the container ended, they will not go on."""
        held, self.held = self.held, []
        for log in held:
            log()

    def stop(self) -> None:
        """Close the streams and let the threads end (bounded: an engine may not answer)."""
        for stream in self.streams:
            stream.close()
        for thread in self._threads:
            thread.join(5)


def _run(container: Any, streams: Any, ctx: RunContext) -> ExecResult:
    # Attached before the start, with the output so far: not one line is missed.
    output = streams.api.attach(
        container.id, stdout=True, stderr=True, stream=True, logs=True, demux=True
    )
    pumps = Pumps(f"docker-{ctx.job_id}")
    pumps.streams.append(output)
    pumps.start([functools.partial(_pump, output, ctx.log, pumps)])
    try:
        ctx.log.info(f"{_STARTING}{container.name}")  # before its first line: see _STARTING
        container.start()
        if ctx.on_start is not None:
            ctx.on_start(None)
        return _watch(container, streams, pumps, ctx, ctx.timeout)
    finally:
        pumps.stop()


def _watch(
    container: Any, streams: Any, pumps: Pumps, ctx: RunContext, limit: float | None
) -> ExecResult:
    """Follow a started container to its end, within ``limit`` seconds from now."""
    meter = EngineUsage(container)
    meter.start()
    try:
        ended = _wait(container, streams, pumps, ctx, limit)
    finally:
        meter.stop()
    if ended == "detach":  # its last lines held are left to the next daemon (``Pumps.held``)
        return ExecResult(None, detached=True)
    if ended is not None:
        _stop(container, ctx.kill_grace)
        pumps.done.wait(ctx.kill_grace + 10)  # the rest of the output, up to the very end
    pumps.flush()
    container.reload()
    usage = meter.usage()
    state = container.attrs["State"]
    try:
        copy_artifacts(container, ctx)
    except Exception as exc:  # the job ran, its result stands; spoold says what is missing
        ctx.log.error(f"could not copy the artifacts out of the container: {explain(exc)}")
    code = state.get("ExitCode")
    if ended is not None:
        return ExecResult(
            code, timed_out=ended == "timeout", cancelled=ended == "cancel", usage=usage
        )
    memory = container.attrs["HostConfig"].get("Memory")
    if state.get("OOMKilled") or (code == _KILLED and memory):
        error = f"the container ran out of memory (memory limit {memory} bytes)"
        if not state.get("OOMKilled") and not _oom_event(container, state):
            # The engine may miss the kernel's report (cgroup v1: 2 of 40 containers killed so
            # here said neither OOMKilled nor an oom event): the limit is the likely cause.
            error = (f"exit code {code}: killed, out of memory (memory limit {memory} bytes) "
                     "unless something else killed it: the engine did not say")  # fmt: skip
        ctx.log.error(error)
        return ExecResult(code, error, usage=usage)
    return ExecResult(code, None if code == 0 else f"exit code {code}", usage=usage)


def _oom_event(container: Any, state: Mapping[str, Any]) -> bool:
    """Whether the engine's events tell of the container running out of memory, up to a
    second after its end (the engine may mark its end before the kernel's report is in)."""
    try:
        since = parse_rfc3339(state["StartedAt"]).timestamp()
        until = parse_rfc3339(state["FinishedAt"]).timestamp() + 1
        events = container.client.api.events(
            since=f"{since:.6f}", until=f"{until:.6f}", decode=True,
            filters={"container": container.id, "event": "oom"},
        )  # fmt: skip
        return any(event.get("status") == "oom" for event in events)
    except (sdk().errors.DockerException, OSError, KeyError, ValueError):  # requests' are OSError
        return False  # what is left is the hedged message


class EngineUsage:
    """What a container cost, as its engine accounts for it (``GET /containers/ID/stats``),
    read every ``_STATS_EVERY`` seconds while it runs: its cgroup, and the engine's figures,
    go with it, so the last reading before its end is what there is (up to that long short).

    CPU user and system seconds are the cgroup's. The peak is the cgroup's own maximum where
    the engine reports one (``memory_stats.max_usage``: cgroup v1) and the largest usage
    read otherwise (cgroup v2, where Docker reports no maximum): ``source`` says which. Both
    count the page cache the container's files use, as the cgroup does. A container that
    ended before its first reading has none (wall time and output only).
    """

    def __init__(self, container: Any) -> None:
        self._container = container
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cpu: tuple[float, float] | None = None  # user, system: seconds
        self._peak: int | None = None
        self._maximum = False  # the peak is the engine's max_usage, not a reading's usage

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._read_until_stopped, name=f"docker-stats-{self._container.name}",
            daemon=True,
        )  # fmt: skip
        self._thread.start()

    def stop(self) -> None:
        """Stop reading (bounded: an engine may not answer)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(_STATS_EVERY + 10)

    def usage(self) -> Usage | None:
        """What the readings say; None if there was none."""
        if self._cpu is None and self._peak is None:
            return None
        user, system = self._cpu if self._cpu is not None else (None, None)
        return Usage(
            cpu_user_seconds=user, cpu_system_seconds=system, peak_memory_bytes=self._peak,
            source="docker" if self._maximum else "docker-sampled",
        )  # fmt: skip

    def _read_until_stopped(self) -> None:
        while True:  # bounded by the container's life: stop() ends it
            # Ended, or the engine went: the readings so far stand.
            with contextlib.suppress(Exception):
                api = self._container.client.api
                self.read(api.stats(self._container.id, stream=False, one_shot=True))
            if self._stop.wait(_STATS_EVERY):
                return

    def read(self, stats: Mapping[str, Any]) -> None:
        """Take one reading of ``GET /containers/ID/stats`` (an ended container's are empty)."""
        cpu = (stats.get("cpu_stats") or {}).get("cpu_usage") or {}
        user, system = cpu.get("usage_in_usermode"), cpu.get("usage_in_kernelmode")
        if isinstance(user, int) and isinstance(system, int) and cpu.get("total_usage"):
            self._cpu = (user / 1e9, system / 1e9)
        memory = stats.get("memory_stats") or {}
        maximum, usage = memory.get("max_usage"), memory.get("usage")
        if isinstance(maximum, int) and maximum > 0:
            self._peak, self._maximum = max(self._peak or 0, maximum), True
        elif isinstance(usage, int) and usage > 0:
            self._peak = max(self._peak or 0, usage)


def _pump(output: Iterable[tuple[bytes | None, bytes | None]], log: JobLog, pumps: Pumps) -> None:
    """Log the container's output line by line as it comes; stderr as errors; a last line
    without its newline held (``Pumps.held``)."""
    pending = {False: b"", True: b""}
    try:
        for chunks in output:
            for is_err, chunk in zip((False, True), chunks, strict=True):
                if not chunk:
                    continue
                log.count_output(len(chunk))
                *lines, rest = (pending[is_err] + chunk).split(b"\n")
                for line in lines:
                    log.output(line, stderr=is_err)
                if len(rest) > MAX_LINE:
                    log.output(rest, stderr=is_err)
                    rest = b""
                pending[is_err] = rest
    except Exception:  # noqa: S110 - closed at the end, or the engine went: _wait tells which
        pass
    finally:
        for is_err, rest in pending.items():
            if rest:
                pumps.held.append(functools.partial(log.output, rest, stderr=is_err))


class Outage:
    """Says once that the engine cannot be reached, and once that it answers again: a dockerd
    restarting with live-restore leaves its containers running, and a job waits for it."""

    def __init__(self, log: JobLog, what: str) -> None:
        self._log, self._what = log, what
        self._error: str | None = None
        self._owed = False  # a stop waiting for the engine was said

    def missed(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = explain(exc)
            self._log.error(f"the docker engine cannot be reached ({self._error}): waiting for "
                            f"it, {self._what} may run on")  # fmt: skip

    @property
    def missing(self) -> bool:
        """The engine could not be reached at the last try."""
        return self._error is not None

    def answered(self) -> None:
        self._owed = False
        if self._error is not None:
            self._log.info("the docker engine answers again")
            self._error = None

    def owed(self, ctx: RunContext, deadline: float | None) -> None:
        """Say once that a cancel, or the timeout that fell at ``deadline`` (monotonic), stops
        the job only once the engine answers: until then nothing can stop what runs on."""
        if ctx.cancel.is_set():
            reason = "cancel"
        elif deadline is not None and ctx.clock.monotonic() >= deadline:
            reason = timeout_reason(ctx.timeout)
        else:
            return
        if not self._owed:
            self._owed = True
            self._log.error(f"{reason}: stopping {self._what} waits until the docker engine "
                            "answers")  # fmt: skip


def _wait(
    container: Any, streams: Any, pumps: Pumps, ctx: RunContext, limit: float | None
) -> str | None:
    """Until the container ends (None), ``limit`` seconds pass, or the job is cancelled or left
    running for the next daemon."""
    import requests  # noqa: PLC0415 - as the SDK: only where such jobs run

    deadline = None if limit is None else ctx.clock.monotonic() + limit
    outage = Outage(ctx.log, "the container")
    behind = False  # the job's log may lack output: its stream ended before the container
    while True:
        if pumps.done.wait(_POLL):
            try:
                container.reload()
            except requests.ConnectionError as exc:  # a dockerd restarting (live-restore)
                behind = True
                outage.missed(exc)
                # A cancel or a timeout cannot stop the container until the engine answers
                # (asking on at once spun); a daemon stopping leaves it to the next, as ever.
                if ctx.detach.wait(0.5):
                    return "detach"
                outage.owed(ctx, deadline)
                continue
            outage.answered()
            alive = container.status in _ALIVE
            if not alive and not behind:
                return None  # its stream ended with it: all its output is in
            # The stream was dropped (a proxy's timeout, the engine gone meanwhile): the rest
            # comes from the engine's log, which ends with the container. Twice a second at
            # most while it runs on; at once when it is to be stopped, for its output up to then.
            ending = _due(ctx, deadline) is not None
            if (not alive or ending or not ctx.cancel.wait(0.5)) and not ctx.detach.is_set():
                _follow_again(container, streams, pumps, ctx)
                behind = False
        if (due := _due(ctx, deadline)) is not None:
            return due


def _due(ctx: RunContext, deadline: float | None) -> str | None:
    """What ends the wait for a container now: "cancel", "detach", "timeout"; None: nothing."""
    if ctx.cancel.is_set():
        return "cancel"
    if ctx.detach.is_set():
        return "detach"
    if deadline is not None and ctx.clock.monotonic() >= deadline:
        return "timeout"
    return None


def _adopt(client: Any, ctx: RunContext) -> Any | None:
    """The container an earlier daemon started for this unit; None if it started none."""
    labels = [f"{key}={value}" for key, value in identity_labels(ctx).items()]
    started = None
    for container in client.containers.list(all=True, filters={"label": labels},
                                            ignore_removed=True):  # fmt: skip
        if container.status == "created":  # its daemon died before the start: nothing ran
            remove_container(container, ctx.log)
        elif started is None:  # the engine lists the newest first
            started = container
    if started is None:
        ctx.log.info(f"no container of unit {ctx.unit_key} to re-attach to: starting one")
    return started


def _resume(container: Any, streams: Any, ctx: RunContext) -> ExecResult:
    """Follow the container an earlier daemon started to its end, or say how it ended, with
    the output the job's log lacks."""
    state = container.attrs["State"]
    started = parse_rfc3339(state["StartedAt"])
    running = container.status in _ALIVE
    logged = logged_output(ctx, _STARTING + container.name)  # before this run writes to it
    ended = ctx.clock.now() if running else parse_rfc3339(state["FinishedAt"])
    ran = max(0.0, (ended - started).total_seconds())  # clocks apart, or a dead one's zero end
    if running:
        said = f"re-attached to container {container.name}, running for {format_duration(ran)}"
    else:
        said = (
            f"container {container.name} ended while no daemon watched, after "
            f"{format_duration(ran)}, with exit code {state.get('ExitCode')}"
        )
        if ctx.timeout is not None and ran > ctx.timeout:
            said += f" (past its timeout of {format_duration(ctx.timeout)}: its result stands)"
    pumps = Pumps(f"docker-{ctx.job_id}")
    try:
        if not running:  # all in the engine's log, or the job fails saying why not
            targets = _replay(container, streams, ctx.log, logged, pumps)
            unread = None
        else:
            targets, unread = _follow(container, streams, ctx.log, logged, pumps)
        if unread is not None:
            how = (
                f"the engine cannot give back its output ({explain(unread)}): what it printed "
                "while no daemon watched is missing, its output from now on follows"
            )
        elif logged is None:
            how = (
                "its output since its start follows from the engine's log; lines the job's "
                "log already holds may repeat"
            )
        else:
            how = "the output the job's log lacks follows from the engine's log"
        ctx.log.info(f"{said}: {how}")
        if ctx.on_start is not None:
            ctx.on_start(None)
        pumps.start(targets)
        limit = None  # an ended container's result stands
        if running and ctx.timeout is not None:
            # Its start counts: a resumed unit does not get a fresh timeout.
            limit = max(0.0, ctx.timeout - (ctx.clock.now() - started).total_seconds())
        result = _watch(container, streams, pumps, ctx, limit)
        # Ended while no daemon watched: its end is the engine's, not this adoption's.
        return result if running else dataclasses.replace(result, ended_at=ended)
    finally:
        pumps.stop()


def _follow(
    container: Any, streams: Any, log: JobLog, logged: LoggedOutput | None, pumps: Pumps
) -> tuple[list[Callable[[], None]], Exception | None]:
    """Follow a running container's output from where the job's log may lack lines
    (``_replay``), or, where its log driver cannot be read back, from now on (with the
    engine's error)."""
    try:
        return _replay(container, streams, log, logged, pumps), None
    except sdk().errors.APIError as exc:
        output = streams.api.attach(container.id, stdout=True, stderr=True, stream=True,
                                    demux=True)  # fmt: skip
        pumps.streams.append(output)
        return [functools.partial(_pump, output, log, pumps)], exc


def _follow_again(container: Any, streams: Any, pumps: Pumps, ctx: RunContext) -> None:
    """The engine stopped streaming a running container's output: follow it again, from
    what the job's log holds. Its half-printed last line comes whole from the engine's log."""
    pumps.held.clear()
    logged = logged_output(ctx, _STARTING + container.name)
    targets, unread = _follow(container, streams, ctx.log, logged, pumps)
    how = (
        "it follows again from the engine's log"
        if unread is None
        else f"the engine cannot give back its output ({explain(unread)}): what it printed "
        "meanwhile is missing, its output from now on follows"
    )
    ctx.log.info(f"the engine stopped streaming the container's output: {how}")
    pumps.start(targets)


def _replay(
    container: Any, streams: Any, log: JobLog, logged: LoggedOutput | None, pumps: Pumps
) -> list[Callable[[], None]]:
    """Open the engine's log of the container from where the job's log may lack lines, one
    stream at a time (only so are stdout and stderr told apart), to follow it to the end."""
    tty = bool(container.attrs["Config"].get("Tty"))  # a tty merged stderr into stdout
    since = None if logged is None else logged.since

    def hold(last: tuple[str, bool, bytes]) -> None:
        pumps.held.append(functools.partial(_copy, [last], log, logged))

    lines = []
    for is_err in (False,) if tty else (False, True):
        chunks = streams.api.logs(
            container.id, stdout=not is_err, stderr=is_err, stream=True, follow=True,
            timestamps=True, since=since,
        )  # fmt: skip
        pumps.streams.append(chunks)
        entries = _tty_entries(chunks) if tty else chunks
        lines.append(_stamped_lines(entries, is_err, hold))
    if container.status not in _ALIVE:
        # Its streams end, so they can be merged: its lines keep their order across them.
        lines = [heapq.merge(*lines, key=operator.itemgetter(0))]
    # A running one's are followed side by side: a line on one may pass a line on the other.
    return [functools.partial(_copy, each, log, logged) for each in lines]


def _copy(
    lines: Iterable[tuple[str, bool, bytes]], log: JobLog, logged: LoggedOutput | None
) -> None:
    """Log the lines of the engine's log that the job's log does not hold."""
    try:
        for stamp, is_err, line in lines:
            text = line.decode("utf-8", errors="replace").rstrip("\r\n")  # as JobLog has it
            if logged is None or not logged.lines[is_err].holds(stamp, text):
                if stamp:  # the job's line, its newline taken off (not the engine's words)
                    log.count_output(len(line) + 1)
                log.output(line, stderr=is_err)
    except Exception:  # noqa: S110 - closed at the end, or the engine went: _wait tells which
        pass


def _stamped_lines(
    entries: Iterable[bytes], is_err: bool, hold: Callable[[tuple[str, bool, bytes]], None]
) -> Iterator[tuple[str, bool, bytes]]:
    """(stamp, is_err, line) from the entries of one stream of the engine's log with
    timestamps, ``STAMP text``; a last line without its newline to ``hold``.

    A line longer than the engine's buffer comes in several entries, each but the last without
    a newline; the line has the stamp of its first.
    """
    stamp, held = "", b""
    for entry in entries:
        raw, _, text = entry.partition(b" ")
        if not held:
            try:
                stamp = rfc3339(parse_rfc3339(raw.decode()))  # as the job's log writes stamps
            except ValueError:  # the engine's own words ("Error grabbing logs: ..."): no stamp
                yield "", is_err, entry.removesuffix(b"\n")
                continue
        held += text
        if held.endswith(b"\n") or len(held) > MAX_LINE:
            yield stamp, is_err, held.removesuffix(b"\n")
            held = b""
    if held:
        hold((stamp, is_err, held))


def _tty_entries(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The entries of a tty's log, which the engine sends unframed: split at newlines (so an
    entry without one, a part of a long line, stays inside the next)."""
    held = bytearray()
    for chunk in chunks:
        held += chunk
        if b"\n" in chunk or len(held) > MAX_LINE:
            *entries, rest = bytes(held).split(b"\n")
            yield from (entry + b"\n" for entry in entries)
            held = bytearray(rest)
    if held:
        yield bytes(held)


class _Logged:
    """Lines of one stream of a container that the job's log holds, near its end."""

    def __init__(self) -> None:
        self._lines: deque[tuple[str, str]] = deque()  # (stamp, text), as written, in order

    def add(self, stamp: str, text: str) -> None:
        self._lines.append((stamp, text))

    def holds(self, stamp: str, text: str) -> bool:
        """Whether the log holds the line that the engine stamped ``stamp``; each logged line
        answers for one line of the engine's."""
        lines = self._lines
        # Logged before the engine had this line: gone. The engine stamps a line when its log
        # driver reads it, which may be after spoold got it through an attached stream (and a
        # swarm node's clock is not this host's): within _SKEW, a logged line still counts.
        horizon = rfc3339(parse_rfc3339(stamp) - _SKEW)
        while lines and lines[0][0] < horizon:
            lines.popleft()
        for index, (_, logged) in enumerate(lines):
            if logged == text:
                del lines[index]
                return True
        return False


class LoggedOutput:
    """What the job's log holds of a container's output, from ``_LAG`` before its last line."""

    def __init__(self, lines: Sequence[tuple[str, str, str]]) -> None:
        """``lines``: (stamp, level, text) of the container's output in the log, in order."""
        self.lines = {False: _Logged(), True: _Logged()}  # by stream: stderr is True
        #: Where the engine's log is read from (seconds since the epoch); None: the start.
        self.since = None if not lines else (parse_rfc3339(lines[-1][0]) - _LAG).timestamp()
        for stamp, level, text in lines:
            self.lines[level == "ERROR"].add(stamp, text)


def logged_output(ctx: RunContext, starting: str) -> LoggedOutput | None:
    """What the job's log holds of the output of what spoold started saying ``starting`` (the
    line it logged just before, as ``ctx.log.info`` wrote it); None if it cannot say (no log,
    or no such line)."""
    if ctx.read_log is None:
        return None
    starting = f"spoold: {starting}"
    prefix: str | None = None  # of the unit's lines: its step's section, if it is a step
    kept: deque[tuple[str, str, str]] = deque()
    bound = _KEPT
    try:
        with ctx.read_log() as log:
            for raw in log:
                stamp, _, rest = raw.decode("utf-8", errors="replace").partition(" ")
                level, _, content = rest.removesuffix("\n").partition(" ")
                if prefix is None:
                    if content.endswith(starting):
                        prefix = content[: -len(starting)]
                    continue
                text = content[len(prefix) :]
                # spoold's own lines say nothing of what the container printed, and a later
                # daemon's would move the comparison past what was printed while none watched.
                if not content.startswith(prefix) or text.startswith("spoold: "):
                    continue
                kept.append((stamp, level, text))
                if len(kept) > bound:
                    _forget_before(kept, stamp)
                    bound = max(_KEPT, 2 * len(kept))
        if prefix is None:
            return None
        if kept:
            _forget_before(kept, kept[-1][0])
        return LoggedOutput(kept)
    except (OSError, ValueError):  # no log, or a line torn by a crash where a stamp should be
        return None


def _forget_before(lines: deque[tuple[str, str, str]], last: str) -> None:
    """Drop the lines logged more than ``_LAG`` before ``last``."""
    horizon = rfc3339(parse_rfc3339(last) - _LAG)
    while lines and lines[0][0] < horizon:
        lines.popleft()


def _stop(container: Any, grace: float) -> None:
    docker = sdk()
    try:
        container.stop(timeout=math.ceil(grace))  # SIGTERM, and SIGKILL after the grace period
    except docker.errors.NotFound:
        return
    except Exception:  # an engine that does not answer in time: kill without asking again
        with contextlib.suppress(docker.errors.APIError):
            container.kill()


def remove_container(container: Any, log: JobLog) -> None:
    docker = sdk()
    try:
        container.remove(force=True)
    except docker.errors.NotFound:
        pass
    except Exception as exc:  # the job's result stands; recovery removes it later
        log.error(f"could not remove container {container.name}: {explain(exc)}")


def copy_artifacts(container: Any, ctx: RunContext) -> None:
    """Copy what the declared globs match out of the container's work dir into ctx.workdir."""
    if not ctx.artifacts:
        return
    docker = sdk()
    with tempfile.TemporaryDirectory(dir=ctx.workdir, prefix=".spoold-docker-") as tmp:
        staging = Path(tmp)
        work = staging / WORKDIR.lstrip("/")
        work.mkdir(parents=True)
        prefixes = {_fixed_prefix(spec.path) for spec in ctx.artifacts}
        for prefix in sorted(p for p in prefixes if p is not None):
            # Only the part of the work dir a glob can match is fetched, not all of it.
            source = posixpath.join(WORKDIR, prefix) if prefix else WORKDIR
            try:
                chunks, _ = container.get_archive(source)
            except docker.errors.NotFound:
                continue  # spoold says "nothing matched"
            _extract(chunks, staging / posixpath.dirname(source).lstrip("/"))
        for spec in ctx.artifacts:
            if _fixed_prefix(spec.path) is None:
                continue
            for match in sorted(work.glob(spec.path)):
                target = ctx.workdir / match.relative_to(work)
                target.parent.mkdir(parents=True, exist_ok=True)
                if match.is_dir():
                    shutil.copytree(match, target, dirs_exist_ok=True)
                elif match.exists():  # not moved by an earlier glob already
                    os.replace(match, target)


def _fixed_prefix(pattern: str) -> str | None:
    """The leading path of a glob without wildcards; None for a glob that leaves the work dir."""
    path = PurePosixPath(pattern)
    if path.is_absolute() or ".." in path.parts:
        return None
    fixed = []
    for part in path.parts:
        if _GLOB & set(part):
            break
        fixed.append(part)
    return "/".join(fixed)


def _extract(chunks: Iterator[bytes], into: Path) -> None:
    """Unpack regular files and directories only, never outside ``into``.

    Links are skipped (spoold keeps none as artifacts), and so are absolute names and `..`:
    the archive comes from a container that the job, not spoold, controls. (Python 3.11.2's
    tarfile has no extraction filters to do this.)
    """
    with tempfile.TemporaryFile() as archive:
        for chunk in chunks:
            archive.write(chunk)
        archive.seek(0)
        with tarfile.open(fileobj=archive, mode="r:") as tar:
            for member in tar:
                name = PurePosixPath(member.name)
                if name.is_absolute() or ".." in name.parts:
                    continue
                target = into.joinpath(*name.parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                elif member.isfile() and (source := tar.extractfile(member)) is not None:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with source, target.open("wb") as out:
                        shutil.copyfileobj(source, out)


def explain(exc: BaseException) -> str:
    return str(getattr(exc, "explanation", None) or exc)


def engine_for_recovery(log: logging.Logger, executor: str, timeout: float) -> Any | None:
    """A client of this host's engine for a recovery; None (said at debug level) when there is
    no SDK or no engine here: then nothing of ours runs on it either."""
    try:
        client = sdk().from_env(timeout=timeout)
        client.ping()
    except Exception as exc:  # any failure: no engine to look at
        log.debug("%s recovery: no engine to look at (%s)", executor, exc)
        return None
    return client


def nothing_left(paths: Sequence[str], spool: Path, running: Collection[str]) -> bool:
    """Whether the engine surely holds nothing of this spool's jobs that no longer run, in
    these listings (``/containers/json?all=1``, ``/services``, ...), asked without the SDK.

    Recovery runs in the daemon's main process: the SDK (requests, urllib3, cryptography)
    would add ~20 MB to it for good, to learn, nearly always, that there is nothing to do.
    False when that cannot be told this way (an engine over TCP or SSH, an odd answer).
    """
    wanted = {"label": [f"{LABEL_MANAGED}=1", f"{LABEL_SPOOL}={spool}"]}
    for path in paths:
        listed = engine_listing(path, wanted)
        if listed is None:
            return False
        for item in listed:
            labels = item.get("Labels") or item.get("Spec", {}).get("Labels") or {}
            if taken_elsewhere(running, labels.get(LABEL_JOB), labels.get(LABEL_HOST)):
                return False
    return True


def engine_listing(path: str, filters: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """A listing of the engine (``/containers/json``, ``/networks``, ...) on its local socket,
    asked without the SDK; [] where no engine answers; None where
    this cannot ask (an engine over TCP or SSH, an error)."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        return None
    query = urllib.parse.urlencode({"filters": json.dumps(filters)})
    connection = _UnixConnection(host.removeprefix("unix://"))
    try:
        connection.request("GET", f"{path}{'&' if '?' in path else '?'}{query}")
        response = connection.getresponse()
        body = response.read()
    except (FileNotFoundError, ConnectionRefusedError):
        return []  # no engine here: nothing of ours runs on it
    except OSError:
        return None
    finally:
        connection.close()
    if response.status == 503:  # a swarm listing on an engine that manages none
        return []
    try:
        listed = json.loads(body) if response.status == 200 else None
    except ValueError:
        return None
    return listed if isinstance(listed, list) else None


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over the engine's unix socket."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _recover(spool_root: Path, running: Collection[str], log: logging.Logger) -> None:
    if nothing_left(["/containers/json?all=1"], spool_root, running):
        return
    client = engine_for_recovery(log, "docker", 10)
    if client is not None:
        with contextlib.closing(client):
            remove_leftovers(client, log, running=running, spool=str(spool_root))


def remove_leftovers(
    client: Any, log: logging.Logger, *, running: Collection[str] = (), spool: str | None = None
) -> list[str]:
    """Remove spoold's containers whose job is not in ``running`` (after a kill -9 of spoold),
    or whose job another host holds now (``RunningJobs``: taken over while this host's daemon
    was down, and run there).

    ``spool`` limits this to the containers of one spool's jobs, so that several spools (and
    their daemons) can share an engine. Returns the names of the containers removed.
    """
    docker = sdk()
    labels = [f"{LABEL_MANAGED}=1"] + ([f"{LABEL_SPOOL}={spool}"] if spool else [])
    removed = []
    # One removed meanwhile (its own removal racing this) is not an error: ignore_removed.
    for container in client.containers.list(all=True, filters={"label": labels},
                                            ignore_removed=True):  # fmt: skip
        if not taken_elsewhere(
            running, container.labels.get(LABEL_JOB), container.labels.get(LABEL_HOST)
        ):
            continue
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            continue
        except docker.errors.APIError as exc:
            log.warning("could not remove leftover container %s: %s", container.name, exc)
            continue
        log.info(
            "removed leftover container %s of job %s",
            container.name,
            container.labels.get(LABEL_JOB),
        )
        removed.append(container.name)
    return removed
