"""The ``swarm`` executor: the job as a one-shot service (``replicated-job``) on a Docker Swarm.

The service is labelled like the docker executor's containers (spool, job, unit), so that a next
daemon re-attaches to it after a ``kill -9`` and recovery removes the services of jobs that no
longer run. What the cluster does on its own that a job runner must not let it do, seen on
Docker 20.10 (README, "Swarm jobs"): it starts a failed task of a job again and again whatever
the restart policy says, and removing a job service stops none of its tasks. So spoold judges
each task once, and ends a service by scaling it to zero (its tasks get SIGTERM and the stop
grace period) before removing it.

The docker SDK is imported when a job runs, never with this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import ipaddress
import logging
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from spoold.executors.base import ExecResult, Executor, RunContext, taken_elsewhere
from spoold.executors.docker import (
    LABEL_HOST,
    LABEL_JOB,
    LABEL_MANAGED,
    LABEL_SPOOL,
    LABEL_UNIT,
    LABEL_WORKER,
    MAX_LINE,
    WORKDIR,
    DockerExecutor,
    EngineUsage,
    LoggedOutput,
    Outage,
    Pumps,
    copy_artifacts,
    engine_for_recovery,
    engine_listing,
    environment,
    explain,
    identity_labels,
    logged_output,
    nothing_left,
    remove_container,
    script_of,
    sdk,
    transient,
)

from spoold.core.clock import Clock, parse_rfc3339, rfc3339
from spoold.core.errors import ExecutorError
from spoold.core.joblog import JobLog
from spoold.core.units import format_duration
from spoold.core.usage import Usage

#: spoold's line in the job's log just before it creates the service, with the service's name:
#: a resumed unit finds there where the service's output begins in the log.
_STARTING = "starting service "
_RUNNING = frozenset({"new", "allocated", "pending", "assigned", "accepted", "preparing"})
_RUNNING |= {"ready", "starting", "running"}
#: A task in one of these states failed the job; ``shutdown`` counts only where spoold did
#: not ask for it (a drained or lost node).
_FAILED = frozenset({"failed", "rejected", "orphaned", "shutdown"})
# Seconds between looks at the tasks: often while a short job may end (the engine tells of no
# task's change but by being asked), then less and less.
_POLL_FIRST, _POLL_MOST, _POLL_OFTEN_FOR = 0.1, 1.0, 3.0
_REMOVAL_BOUND = 15.0  # how long a unit's end waits for the engine to remove its containers
#: Tasks whose engine figures are read while they run (a thread each); past it, none is.
_METERED_MOST = 16
_LABEL_SERVICE = "com.docker.swarm.service.id"  # the engine's label on a task's container
_SECRETS_DIR = "/run/secrets"
_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_MIN_SECRET = 4  # shorter values are found inside others by chance (as the masker's rule)

# What swarmkit's constraint parser accepts (manager/constraint/constraint.go): a key, == or
# !=, a value; and the keys it matches against (any other key matches no node, silently).
_CONSTRAINT_KEY = re.compile(r"[a-z_][a-z0-9\-_.]+\Z", re.IGNORECASE)
_CONSTRAINT_VALUE = re.compile(r"[a-z0-9:\-_\s.*()?+\[\]\\^$|/]+\Z", re.IGNORECASE)
_CONSTRAINT_KEYS = (
    "node.id", "node.hostname", "node.ip", "node.role", "node.platform.os", "node.platform.arch",
)  # fmt: skip
_LABEL_KEYS = ("node.labels.", "engine.labels.")
_ROLES = ("manager", "worker")
#: How long what the engine said about its networks is taken as still true, for validation.
_NETWORKS_FRESH = 30.0


class SwarmExecutor(Executor):
    """Runs the docker executor's script as the tasks of a ``replicated-job`` service."""

    name = "swarm"
    schema_resource = "swarm.schema.json"
    reports_start = True
    resumable = True  # a service outlives spoold: a next daemon re-attaches by its labels
    script_fields = DockerExecutor.script_fields

    #: (monotonic time, {network name: scope}) of the engine's networks, for ``validate``.
    _networks: ClassVar[tuple[float, dict[str, str]] | None] = None

    @classmethod
    def validate(cls, product: Mapping[str, Any]) -> list[str]:
        """What the cluster would refuse, or never place, and can be known before it runs."""
        problems = DockerExecutor.validate(product)
        placement = product.get("placement") or {}
        problems += [
            f"placement.constraints: {text!r}: {problem}"
            for text in placement.get("constraints") or ()
            if (problem := constraint_problem(str(text))) is not None
        ]
        problems += [
            f"placement.preferences: {text!r}: {problem}"
            for text in placement.get("preferences") or ()
            if (problem := _preference_problem(str(text))) is not None
        ]
        problems += _reserve_problems(product)
        problems += cls._network_problems([str(n) for n in product.get("networks") or ()])
        return problems

    @classmethod
    def _network_problems(cls, names: Sequence[str]) -> list[str]:
        asked = [name for name in names if "${" not in name]
        if not asked:
            return []
        known = cls._known_networks()
        if known is None:  # no engine to ask here: the cluster says it when the job runs
            return []
        problems = []
        for name in asked:
            scope = known.get(name)
            if scope is None:
                problems.append(f"networks: {name} is no network of this swarm")
            elif scope != "swarm":
                problems.append(
                    f"networks: {name} is a {scope} network: a service attaches to swarm "
                    "networks only (docker network create -d overlay --attachable NAME)"
                )
        return problems

    @classmethod
    def _known_networks(cls) -> dict[str, str] | None:
        """The engine's networks by name and id, with their scope; None if it cannot be asked."""
        now = time.monotonic()
        if cls._networks is not None and now - cls._networks[0] < _NETWORKS_FRESH:
            return cls._networks[1]
        # On the engine's socket first: intake validates in the daemon's main process, which
        # the SDK would stay in for good (see docker.nothing_left).
        found = engine_listing("/networks", {})
        if found is None:
            try:
                client = sdk().from_env(timeout=5)
                with contextlib.closing(client):
                    found = client.api.networks()
            except Exception:  # no SDK, no engine: validation cannot ask, the run will tell
                return None
        if not found:  # an engine has its bridge, host and none networks: none answered
            return None
        known = {}
        for network in found:
            known[network["Name"]] = known[network["Id"]] = network.get("Scope", "local")
        cls._networks = (now, known)
        return known

    @classmethod
    def recover(cls, spool_root: Path, running: Collection[str], log: logging.Logger) -> None:
        """End and remove the services (and secrets) of this spool's jobs that no longer run."""
        if nothing_left(["/services", "/secrets"], spool_root, running):
            return
        client = engine_for_recovery(log, "swarm", 30)
        if client is None:
            return
        with contextlib.closing(client):
            if not _is_manager(client):
                return
            remove_leftover_services(client, log, running=running, spool=str(spool_root))

    def execute(self, ctx: RunContext) -> ExecResult:
        if ctx.detach.is_set():  # spoold stops before the unit began: the next daemon starts it
            return ExecResult(None, detached=True)
        docker = sdk()
        import requests  # noqa: PLC0415 - worker processes load it only to run such jobs

        failures = (docker.errors.DockerException, requests.RequestException)
        try:
            client = docker.from_env()
            streams = docker.from_env(timeout=None)  # followed output may pause for long
        except failures as exc:
            raise ExecutorError(f"cannot reach the docker engine: {exc}", retryable=True) from exc
        try:
            if not _is_manager(client):
                raise ExecutorError(
                    "this docker engine is no swarm manager: run `docker swarm init` here, or "
                    "point spoold (DOCKER_HOST) at a manager of the cluster",
                )
            service = _adopt(client, ctx) if ctx.resume else None
            run = _ServiceRun(client, streams, ctx)
            result: ExecResult | None = None
            try:
                result = run.resume(service) if service is not None else run.start()
                return result
            finally:
                if result is not None and result.detached:
                    ctx.log.info(f"service {run.name} left running for the next daemon")
                else:
                    run.remove()
        except failures as exc:
            retryable = transient(exc) or _server_side(exc)
            raise ExecutorError(f"swarm: {explain(exc)}", retryable=retryable) from exc
        finally:
            client.close()
            streams.close()


def _server_side(exc: BaseException) -> bool:
    """An engine that answered 5xx (a manager without quorum, a leader election): transient."""
    response = getattr(exc, "response", None)
    return response is not None and getattr(response, "status_code", 0) >= 500


def _is_manager(client: Any) -> bool:
    swarm = client.info().get("Swarm") or {}
    return swarm.get("LocalNodeState") == "active" and bool(swarm.get("ControlAvailable"))


def constraint_problem(text: str) -> str | None:
    """What swarm would refuse in a placement constraint, or never match; None if nothing."""
    for operator in ("==", "!="):  # in swarmkit's order: "a!=b==c" is key "a!=b"
        if operator in text:
            key, value = (part.strip() for part in text.split(operator, 1))
            break
    else:
        return "a constraint is KEY==VALUE or KEY!=VALUE (node.labels.zone==eu)"
    if not _CONSTRAINT_KEY.match(key):
        return f"{key!r} is no constraint key"
    if not _CONSTRAINT_VALUE.match(value):
        return f"{value!r} is no constraint value (letters, digits and :-_.*()?+[]\\^$|/ only)"
    lowered = key.lower()
    if lowered.startswith(_LABEL_KEYS):
        if lowered in _LABEL_KEYS:
            return f"{key!r} names no label"
        return None
    if lowered not in _CONSTRAINT_KEYS:
        known = ", ".join([*_CONSTRAINT_KEYS, "node.labels.NAME", "engine.labels.NAME"])
        return f"{key!r} is no key swarm matches (one of {known}): no node would ever match"
    if lowered == "node.role" and value.lower() not in _ROLES:
        return f"node.role is manager or worker, not {value!r}"
    if lowered == "node.ip":
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            return f"node.ip takes an address or a network (10.0.0.0/8), not {value!r}"
    return None


def _preference_problem(text: str) -> str | None:
    strategy, _, descriptor = text.partition("=")
    if strategy.strip() != "spread":
        return "a preference is spread=node.labels.NAME (the only strategy swarm has)"
    if not descriptor.strip().lower().startswith(_LABEL_KEYS) or descriptor.strip().endswith("."):
        return "swarm spreads over node.labels.NAME or engine.labels.NAME"
    return None


def _reserve_problems(product: Mapping[str, Any]) -> list[str]:
    reserve = product.get("reserve") or {}
    problems = []
    limit, wanted = product.get("cpus"), reserve.get("cpus")
    if limit is not None and wanted is not None and float(wanted) > float(limit):
        problems.append(f"reserve.cpus: {wanted} is more than the limit cpus: {limit}")
    limit, wanted = product.get("memory"), reserve.get("memory")
    if limit is not None and wanted is not None and _bytes(wanted) > _bytes(limit):
        problems.append(f"reserve.memory: {wanted} is more than the limit memory: {limit}")
    return problems


def _bytes(value: int | str) -> int:
    """Bytes of a size as docker writes it (``512m``: powers of 1024, unlike
    ``spoold.core.units.parse_size``)."""
    if isinstance(value, int):
        return value
    units = {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
    text = value.lower()
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


@dataclass(frozen=True)
class Verdict:
    """What a job service's tasks came to so far."""

    #: None while it runs; "succeeded", "failed" or "unplaceable" once it is decided.
    outcome: str | None
    task: Mapping[str, Any] | None = None  # the task that decided it, if one did
    reason: str = ""


def judge(tasks: Iterable[Mapping[str, Any]], replicas: int) -> Verdict:
    """The job's outcome from its service's tasks, each judged once.

    A task that failed (or that the cluster rejected, lost or shut down) fails the job: swarm
    would start it again whatever the restart policy says. All ``replicas`` complete: done.
    A task that no node can take (no node matches) fails it too; one that waits for resources
    that a node will free waits.
    """
    tasks = sorted(tasks, key=lambda task: str(task.get("CreatedAt", "")))
    failed = [task for task in tasks if _state(task) in _FAILED]
    if failed:
        return Verdict("failed", failed[0], _task_error(failed[0]))
    completed = {_slot(task) for task in tasks if _state(task) == "complete"}
    if len(completed) >= replicas:
        return Verdict("succeeded")
    for task in tasks:
        reason = str(task.get("Status", {}).get("Err") or "")
        if _state(task) == "pending" and _unplaceable(reason):
            return Verdict("unplaceable", task, reason)
    return Verdict(None)


def _state(task: Mapping[str, Any]) -> str:
    return str(task.get("Status", {}).get("State", ""))


def _slot(task: Mapping[str, Any]) -> int:
    return int(task.get("Slot") or 0)  # slot 0 is left out of the engine's JSON


def _exit_code(task: Mapping[str, Any]) -> int | None:
    code = task.get("Status", {}).get("ContainerStatus", {}).get("ExitCode")
    return None if code is None else int(code)


def _task_error(task: Mapping[str, Any]) -> str:
    status = task.get("Status", {})
    return str(status.get("Err") or status.get("Message") or _state(task))


def _unplaceable(reason: str) -> bool:
    """Whether swarm's scheduler says no node can take the task (not: none can take it now)."""
    if not reason.startswith("no suitable node"):
        return False
    causes = reason.partition("(")[2].rstrip(")").split(";")
    waiting = ("insufficient resources", "max replicas per node")
    return not all(any(word in cause for word in waiting) for cause in causes)


class _ServiceRun:
    """One unit of a swarm job: its service, secrets and output, from creation to removal."""

    def __init__(self, client: Any, streams: Any, ctx: RunContext) -> None:
        self.client, self.streams, self.ctx = client, streams, ctx
        self.replicas = int(ctx.product.get("replicas", 1))
        self.service: Any = None
        self.name = ""
        self.tasks: dict[str, Mapping[str, Any]] = {}
        self._stopped = False  # spoold scaled the service to zero: its tasks shut down
        #: The engine's figures of each task whose container is on this node, read while it
        #: runs; the tasks whose container is not here (another node's) are only counted.
        self._meters: dict[str, EngineUsage] = {}
        self._elsewhere: set[str] = set()
        self._unread: set[str] = set()  # here, but past _METERED_MOST

    def start(self) -> ExecResult:
        """Create the service (and the secrets it reads) and follow it to its end."""
        ctx = self.ctx
        _remove_secrets(self.client, ctx.log, _unit_filter(ctx))  # of a daemon that died
        slug = re.sub(r"[^A-Za-z0-9]+", "-", ctx.job_id).strip("-")[:34] or "job"
        self.name = f"{ctx.product.get('namespace') or 'spoold'}-{slug}-{uuid.uuid4().hex[:8]}"
        image = _pinned_image(self.client, str(ctx.product["image"]), ctx.log)
        spec = _ServiceSpec(ctx, self.name, image)
        secrets = _create_secrets(
            self.client, ctx, self.name, {name: spec.env[name] for name in spec.secret_variables}
        )
        ctx.log.info(f"{_STARTING}{self.name}")  # before its first line: see _STARTING
        try:
            created = self.client.api.create_service(**spec.arguments(secrets))
        except BaseException:
            _remove_secrets(self.client, ctx.log, _unit_filter(ctx))
            raise
        self.service = self.client.services.get(created["ID"])
        if ctx.on_start is not None:
            ctx.on_start(None)
        output = _Output(self, since=0, logged=None)
        return self._watch(output, ctx.timeout)

    def resume(self, service: Any) -> ExecResult:
        """Follow the service an earlier daemon made to its end, or say how it ended."""
        ctx = self.ctx
        self.service, self.name = service, service.name
        logged = logged_output(ctx, _STARTING + self.name)  # before this run writes to it
        created = parse_rfc3339(service.attrs["CreatedAt"])
        self._look()
        running = judge(self.tasks.values(), self.replicas).outcome is None
        ran = format_duration(max(0.0, (ctx.clock.now() - created).total_seconds()))
        said = (
            f"re-attached to service {self.name}, made {ran} ago"
            if running
            else f"service {self.name} ended while no daemon watched"
        )
        how = (
            "its output since it began follows from the engine's log; lines the job's log "
            "already holds may repeat"
            if logged is None
            else "the output the job's log lacks follows from the engine's log"
        )
        ctx.log.info(f"{said}: {how}")
        if ctx.on_start is not None:
            ctx.on_start(None)
        limit = None
        if running and ctx.timeout is not None:  # its start counts: no fresh timeout
            limit = max(0.0, ctx.timeout - (ctx.clock.now() - created).total_seconds())
        since = 0 if logged is None or logged.since is None else int(logged.since)
        return self._watch(_Output(self, since=since, logged=logged), limit)

    def _watch(self, output: _Output, limit: float | None) -> ExecResult:
        output.follow()
        try:
            ended, verdict = self._wait(limit, output)
            if ended == "detach":
                output.leave()
                return ExecResult(None, detached=True)
            if ended is not None or verdict.outcome != "succeeded":
                self.stop()
            output.finish()
        finally:
            output.close()
            usage = self._usage()
        self._copy_artifacts()
        if ended is not None:
            return ExecResult(None, timed_out=ended == "timeout", cancelled=ended == "cancel",
                              usage=usage)  # fmt: skip
        return dataclasses.replace(self._result(verdict), usage=usage)

    def _meter_new_tasks(self) -> None:
        """Start reading the engine's figures of each task that got a container since the
        last look, where that container is on this node."""
        for task_id, task in self.tasks.items():
            if task_id in self._meters or task_id in self._elsewhere or task_id in self._unread:
                continue
            container_id = task.get("Status", {}).get("ContainerStatus", {}).get("ContainerID")
            if not container_id:
                continue  # not started yet
            try:
                container = self.client.containers.get(container_id)
            except Exception:  # another node's (or gone already): not measured from here
                self._elsewhere.add(task_id)
                continue
            if len(self._meters) >= _METERED_MOST:  # a thread each: bounded
                self._unread.add(task_id)
                continue
            meter = self._meters[task_id] = EngineUsage(container)
            meter.start()

    def _usage(self) -> Usage | None:
        """What the tasks cost, as the engine of this node accounts for them: their CPU added
        up, the largest peak; None (wall time and output only) unless every task was read."""
        for meter in self._meters.values():
            meter.stop()
        figures = [meter.usage() for meter in self._meters.values()]
        if self._unread:
            self.ctx.log.info(
                f"what it cost: more than {_METERED_MOST} tasks, whose stats are not read "
                "one by one: wall time and output only"
            )
            return None
        if self._elsewhere or not figures or None in figures:
            if self._elsewhere:
                self.ctx.log.info(
                    f"what it cost: {len(self._elsewhere)} task(s) ran on other nodes, whose "
                    "CPU and memory this node's engine cannot tell: wall time and output only"
                )
            return None
        return functools.reduce(Usage.plus, (usage for usage in figures if usage is not None))

    def _wait(self, limit: float | None, output: _Output) -> tuple[str | None, Verdict]:
        """Until the tasks decide the job (None), or ``limit`` seconds pass, or the job is
        cancelled or left running for the next daemon."""
        import requests  # noqa: PLC0415 - as the SDK: only where such jobs run

        ctx = self.ctx
        begun = ctx.clock.monotonic()
        deadline = None if limit is None else begun + limit
        pause, said_waiting = _POLL_FIRST, ""
        outage = Outage(ctx.log, "its tasks")
        verdict = judge((), self.replicas)
        while True:
            try:
                self._look()
            except requests.ConnectionError as exc:  # a manager restarting: its tasks run on
                outage.missed(exc)
                away = True
            else:
                # What the tasks printed meanwhile is read before a cancel may stop them (a
                # task scaled away takes its log with it); then they are followed again.
                away = outage.missing and not output.follow_again()
                if not away:
                    outage.answered()
                    verdict = judge(self.tasks.values(), self.replicas)
            if verdict.outcome is not None:
                return None, verdict
            waiting = self._waiting_for()
            if waiting and waiting != said_waiting:
                ctx.log.info(f"waiting for the cluster: {waiting}")
            said_waiting = waiting
            if away:
                # A cancel or a timeout cannot stop the tasks until the manager answers (the
                # stop's scaling failed, the tasks ran on); a daemon stopping leaves them.
                if ctx.detach.wait(max(pause, _POLL_FIRST)):
                    return "detach", verdict
                outage.owed(ctx, deadline)
                continue
            if deadline is not None:
                pause = min(pause, max(0.0, deadline - ctx.clock.monotonic()))
            if ctx.cancel.wait(pause):
                return "cancel", verdict
            if ctx.detach.is_set():
                return "detach", verdict
            if deadline is not None and ctx.clock.monotonic() >= deadline:
                return "timeout", verdict
            if ctx.clock.monotonic() - begun > _POLL_OFTEN_FOR:
                pause = min(_POLL_MOST, pause * 1.5 or _POLL_FIRST)
            else:
                pause = _POLL_FIRST

    def _waiting_for(self) -> str:
        reasons = {
            str(task.get("Status", {}).get("Err") or "")
            for task in self.tasks.values()
            if _state(task) == "pending"
        }
        return "; ".join(sorted(reason for reason in reasons if reason))

    def _look(self) -> None:
        """Read the service's tasks afresh."""
        self.tasks = {task["ID"]: task for task in self.service.tasks()}
        self._meter_new_tasks()

    def slot_of(self, task_id: str) -> int | None:
        """The slot of one of the service's tasks (asking the engine for one not seen yet)."""
        task = self.tasks.get(task_id)
        if task is None:
            try:
                task = self.client.api.inspect_task(task_id)
            except Exception:
                return None
            self.tasks = {**self.tasks, task_id: task}
        return _slot(task)

    def stop(self) -> None:
        """End the service's tasks: scaled to zero, swarm stops each (SIGTERM, the stop grace
        period, SIGKILL). Removing a job service would leave them running."""
        if self._stopped:
            return
        self._stopped = True
        _scale_to_zero(self.client, self.service)
        bound = self.ctx.clock.monotonic() + self.ctx.kill_grace + 15
        pause = _POLL_FIRST
        while self.ctx.clock.monotonic() < bound:
            self._look()
            if not any(_state(task) in _RUNNING for task in self.tasks.values()):
                return
            time.sleep(pause)
            pause = min(_POLL_MOST, pause * 1.5)
        self.ctx.log.error(f"the tasks of service {self.name} did not stop in time")

    def _result(self, verdict: Verdict) -> ExecResult:
        ctx, task = self.ctx, verdict.task
        if verdict.outcome == "succeeded":
            if self.replicas > 1:
                ctx.log.info(f"all {self.replicas} tasks succeeded")
            return ExecResult(0)
        assert task is not None
        which = f"task {_slot(task) + 1} of {self.replicas}" if self.replicas > 1 else "the task"
        if verdict.outcome == "unplaceable":
            error = f"the cluster cannot place {which}: {verdict.reason}"
            ctx.log.error(error)
            return ExecResult(None, error, retryable=True)  # a node may come back, or join
        state, code = _state(task), _exit_code(task)
        if state == "failed" and code not in (None, 0):
            if self.replicas > 1:
                ctx.log.error(f"{which} failed with exit code {code}: the others were ended")
                return ExecResult(code, f"exit code {code} ({which})")
            return ExecResult(code, f"exit code {code}")
        if state == "rejected":  # its exit code says nothing: a rejected task may report 0
            error = f"the cluster rejected {which}: {verdict.reason}"
            ctx.log.error(error)
            return ExecResult(None, error)
        error = f"{which} ended as {state} on the cluster's side: {verdict.reason}"
        ctx.log.error(error)
        return ExecResult(None, error, retryable=True)  # a node lost or drained

    def _copy_artifacts(self) -> None:
        """From each task's container that is on this node: in slot order, a later task's file
        replaces an earlier one's of the same name."""
        ctx = self.ctx
        if not ctx.artifacts:
            return
        docker = sdk()
        node: str | None = None
        for task in sorted(self.tasks.values(), key=lambda t: (_slot(t), t.get("CreatedAt", ""))):
            container_id = task.get("Status", {}).get("ContainerStatus", {}).get("ContainerID")
            if not container_id:
                continue
            try:
                container = self.client.containers.get(container_id)
            except docker.errors.NotFound:
                node = node or (self.client.info().get("Swarm") or {}).get("NodeID")
                if task.get("NodeID") != node:
                    ctx.log.error(
                        f"artifacts: task {_slot(task) + 1} ran on node {task.get('NodeID')}, "
                        "not this one: its files cannot be copied from here (see the README)"
                    )
                continue
            try:
                copy_artifacts(container, ctx)
            except Exception as exc:  # the job ran, its result stands; spoold says what's missing
                ctx.log.error(f"could not copy the artifacts out of a task: {explain(exc)}")

    def remove(self) -> None:
        """Remove the service, its tasks' containers on this node and its secrets."""
        ctx = self.ctx
        if self.service is not None:
            if not self._stopped and any(_state(task) in _RUNNING for task in self.tasks.values()):
                self.stop()  # an engine error mid-way: nothing of the job may go on
            _remove_service(self.client, self.service, ctx.log, ctx.clock)
        _remove_secrets(self.client, ctx.log, _unit_filter(ctx))


class _ServiceSpec:
    """What ``create_service`` is given for a unit of a job."""

    def __init__(self, ctx: RunContext, name: str, image: str) -> None:
        self.ctx, self.name, self.image = ctx, name, image
        self.env = environment(ctx)
        #: The variables that hold a secret: read from Swarm secret files, never in the spec.
        self.secret_variables = _secret_variables(ctx, self.env)

    def arguments(self, secrets: Sequence[Any]) -> dict[str, Any]:
        docker = sdk()
        types = docker.types
        ctx, product = self.ctx, self.ctx.product
        labels = identity_labels(ctx)
        if worker := ctx.env.get("RUNNER_ID"):
            labels[LABEL_WORKER] = worker
        if ctx.host:
            labels[LABEL_HOST] = ctx.host
        if product.get("namespace"):
            labels["spoold.namespace"] = str(product["namespace"])
        plain = {k: v for k, v in self.env.items() if k not in self.secret_variables}
        container = types.ContainerSpec(
            self.image,
            command=["/bin/sh", "-c", _secret_prelude(self.secret_variables) + script_of(ctx)],
            env=[f"{key}={value}" for key, value in plain.items()],
            workdir=WORKDIR,
            user=str(product["user"]) if product.get("user") is not None else None,
            # Not spoold.managed: the docker executor's recovery would take them for its own.
            labels={k: v for k, v in labels.items() if k != LABEL_MANAGED},
            mounts=[types.Mount.parse_mount_string(str(m)) for m in product.get("mounts") or ()],
            stop_grace_period=int(ctx.kill_grace * 1e9),
            secrets=list(secrets),
            init=True,  # PID 1 ignores SIGTERM unless it installs a handler, as sh does not
        )
        placement = product.get("placement") or {}
        template = types.TaskTemplate(
            container,
            resources=self._resources(),
            restart_policy=types.RestartPolicy(condition="none"),
            placement=types.Placement(
                constraints=[str(c) for c in placement.get("constraints") or ()] or None,
                preferences=[_preference(str(p)) for p in placement.get("preferences") or ()]
                or None,
                maxreplicas=placement.get("max_per_node"),
            ),
            networks=[
                types.NetworkAttachmentConfig(str(name)) for name in product.get("networks") or ()
            ]
            or None,
            # The engine gives a service's output back only from these two drivers.
            log_driver=types.DriverConfig("json-file"),
        )
        arguments = {
            "task_template": template,
            "name": self.name,
            "labels": labels,
            "mode": types.ServiceMode(
                "replicated-job", replicas=self.replicas, concurrency=self.replicas
            ),
        }
        _refuse_secret_values(arguments, ctx.secrets)
        return arguments

    @property
    def replicas(self) -> int:
        return int(self.ctx.product.get("replicas", 1))

    def _resources(self) -> Any:
        ctx, product = self.ctx, self.ctx.product
        docker = sdk()
        memory = product.get("memory") or (ctx.limits.memory if ctx.limits else None)
        cpus = product.get("cpus")
        reserve = product.get("reserve") or {}
        # The limits are reserved too unless `reserve` says otherwise: the scheduler then puts
        # a task only where it fits, and a node is not promised more than it has.
        reserved_memory = reserve.get("memory", memory)
        reserved_cpus = reserve.get("cpus", cpus)
        resources = docker.types.Resources(
            cpu_limit=int(float(cpus) * 1e9) if cpus else None,
            mem_limit=_bytes(memory) if memory else None,
            cpu_reservation=int(float(reserved_cpus) * 1e9) if reserved_cpus else None,
            mem_reservation=_bytes(reserved_memory) if reserved_memory else None,
        )
        if product.get("pids"):  # the SDK's Resources has no field for it (API 1.41)
            resources.setdefault("Limits", {})["Pids"] = int(product["pids"])
        return resources


def _preference(text: str) -> tuple[str, str]:
    strategy, _, descriptor = text.partition("=")
    return (strategy.strip(), descriptor.strip())


def _secret_variables(ctx: RunContext, env: Mapping[str, str]) -> list[str]:
    """The variables of ``env`` that hold one of the job's secret values."""
    values = [value for value in ctx.secrets.values() if value]
    found = []
    for name, value in env.items():
        if any(v == value or (len(v) >= _MIN_SECRET and v in value) for v in values):
            if not _SHELL_NAME.match(name):
                raise ExecutorError(
                    f"env: {name!r} holds a secret but is no shell variable name: the task "
                    "reads it from a Swarm secret file into a variable of that name"
                )
            found.append(name)
    return sorted(found)


def _secret_prelude(names: Sequence[str]) -> str:
    """Shell lines that set each variable from its Swarm secret file (its value exactly: the
    ``.`` keeps trailing newlines from ``$(...)``)."""
    lines = [
        f'{name}="$(cat {_SECRETS_DIR}/{name} && echo .)" || exit 125; '
        f'{name}="${{{name}%.}}"; export {name}'
        for name in names
    ]
    return "".join(line + "\n" for line in lines)


def _refuse_secret_values(arguments: Mapping[str, Any], secrets: Mapping[str, str]) -> None:
    """A secret's value must not reach the spec, which any client of the cluster can read."""
    text = repr(arguments)
    for name, value in secrets.items():
        if len(value) >= _MIN_SECRET and value in text:
            raise ExecutorError(
                f"secret {name} would be in the service's spec, which the cluster shows to "
                "every client: use it in env or the script, not in another field"
            )


def _unit_filter(ctx: RunContext) -> dict[str, Any]:
    return {"label": [f"{key}={value}" for key, value in identity_labels(ctx).items()]}


def _create_secrets(
    client: Any, ctx: RunContext, service: str, variables: Mapping[str, str]
) -> list[Any]:
    """A Swarm secret per variable that holds a secret, made for this unit (removed after)."""
    docker = sdk()
    references = []
    for index, (name, value) in enumerate(variables.items()):
        secret = client.secrets.create(
            name=f"{service}-{index}",
            data=value.encode(),
            labels=identity_labels(ctx),
        )
        references.append(
            docker.types.SecretReference(secret.id, f"{service}-{index}", filename=name)
        )
    if variables:
        said = ", ".join(variables)
        ctx.log.info(f"{len(variables)} secret(s) handed over as Swarm secrets: {said}")
    return references


def _remove_secrets(client: Any, log: JobLog | logging.Logger, filters: Mapping[str, Any]) -> None:
    docker = sdk()
    for secret in client.secrets.list(filters=dict(filters)):
        try:
            secret.remove()
        except docker.errors.NotFound:
            continue
        except docker.errors.APIError as exc:  # still in use: recovery removes it later
            _say(log, f"could not remove secret {secret.name}: {explain(exc)}")


def _say(log: JobLog | logging.Logger, message: str) -> None:
    if isinstance(log, JobLog):
        log.error(message)
    else:
        log.warning("%s", message)


def _pinned_image(client: Any, image: str, log: JobLog) -> str:
    """The image as every task runs it: pinned to what this node has, so that all tasks run
    the same content and no node pulls what this one has."""
    docker = sdk()
    try:
        local = client.images.get(image)
    except docker.errors.ImageNotFound:
        log.info(f"image {image} is not on this node: the node that runs a task pulls it")
        return image
    digests = local.attrs.get("RepoDigests") or []
    if digests:
        return str(digests[0])  # NAME@sha256:...: a node that lacks it pulls exactly that
    log.info(
        f"image {image} has no registry digest (built or imported here): the tasks run it "
        f"by its id {local.id}, which only nodes that have it can"
    )
    return str(local.id)


def _scale_to_zero(client: Any, service: Any) -> None:
    """Ask for no completions: swarm then shuts every task of the job down (the SDK's update
    adds an update config, which a job service may not have, so the spec goes as it is)."""
    docker = sdk()
    for _ in range(5):  # another writer (a second daemon's recovery) may bump the version
        service.reload()
        spec = service.attrs["Spec"]
        spec["Mode"] = {"ReplicatedJob": {"MaxConcurrent": 0, "TotalCompletions": 0}}
        api = client.api
        response = api._post_json(
            api._url("/services/{0}/update", service.id),
            data=spec,
            params={"version": service.attrs["Version"]["Index"]},
        )
        try:
            api._raise_for_status(response)
            return
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:
            if "out of sequence" not in explain(exc):
                raise


def _remove_service(
    client: Any, service: Any, log: JobLog | logging.Logger, clock: Clock | None = None
) -> None:
    """Remove a job's service and its tasks' containers on this node; with ``clock`` (a
    unit's end), wait until the engine has none of them left (bounded)."""
    docker = sdk()
    try:
        service.remove()
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as exc:  # the job's result stands; recovery removes it
        _say(log, f"could not remove service {service.name}: {explain(exc)}")
    # Swarm leaves the containers of a job's ended tasks behind: this node's go with it. Its
    # agent may be removing one already (the service's tasks are reaped as it goes): a second
    # removal is refused, and the container is listed a moment longer (seen in CI); or gone
    # between the listing and the SDK's look at each listed one (ignore_removed: seen in CI,
    # where the NotFound replaced a timed-out job's result).
    filters = {"label": f"{_LABEL_SERVICE}={service.id}"}
    deadline = None if clock is None else clock.monotonic() + _REMOVAL_BOUND
    pause = _POLL_FIRST
    while left := client.containers.list(all=True, filters=filters, ignore_removed=True):
        for container in left:
            if container.status == "removing":
                continue
            if isinstance(log, JobLog):
                remove_container(container, log)
            else:
                with contextlib.suppress(docker.errors.APIError):
                    container.remove(force=True)
        if clock is None or deadline is None:  # recovery's clean-up: one pass, no wait
            return
        if clock.monotonic() >= deadline:
            _say(log, f"{len(left)} container(s) of service {service.name} still on the "
                      f"engine after {_REMOVAL_BOUND:.0f}s")  # fmt: skip
            return
        time.sleep(pause)
        pause = min(_POLL_MOST, pause * 1.5)


def _adopt(client: Any, ctx: RunContext) -> Any | None:
    """The service an earlier daemon made for this unit; None if it made none."""
    found = sorted(
        client.services.list(filters=_unit_filter(ctx)),
        key=lambda service: str(service.attrs.get("CreatedAt", "")),
    )
    for extra in found[:-1]:  # cannot be made twice, but one is enough
        _scale_to_zero(client, extra)
        _remove_service(client, extra, ctx.log)
    if not found:
        ctx.log.info(f"no service of unit {ctx.unit_key} to re-attach to: starting one")
        return None
    return found[-1]


def remove_leftover_services(
    client: Any, log: logging.Logger, *, running: Collection[str] = (), spool: str | None = None
) -> list[str]:
    """End and remove spoold's services (and secrets) whose job is not in ``running``, or
    whose job another host holds now (``RunningJobs``: taken over, and run there).

    ``spool`` limits this to one spool's jobs, so that several spools can share a cluster.
    Returns the names of the services removed.
    """
    labels = [f"{LABEL_MANAGED}=1"] + ([f"{LABEL_SPOOL}={spool}"] if spool else [])
    removed = []
    for service in client.services.list(filters={"label": labels}):
        service_labels = service.attrs["Spec"].get("Labels", {})
        job = service_labels.get(LABEL_JOB)
        if not taken_elsewhere(running, job, service_labels.get(LABEL_HOST)):
            continue
        # Scaled to zero first, swarm ends its tasks on every node even once it is removed;
        # this node's containers go at once (no job of spoold's waits for their output).
        _scale_to_zero(client, service)
        _remove_service(client, service, log)
        log.info("removed leftover service %s of job %s", service.name, job)
        removed.append(service.name)
    for secret in client.secrets.list(filters={"label": labels}):
        if secret.attrs["Spec"].get("Labels", {}).get(LABEL_JOB) not in running:
            _remove_secrets(client, log, {"id": secret.id})
    return removed


class _Output:
    """Copies a service's output into the job's log as its tasks produce it.

    Two followed streams (stdout, stderr: only so are they told apart) while it runs; once its
    tasks ended, one more read of each, which gives what the followers had yet to get. Each
    reader counts the entries of each task it read: per task and stream the engine gives them
    in one order, so an entry another reader wrote already is known by its place.
    """

    def __init__(self, run: _ServiceRun, *, since: int, logged: LoggedOutput | None) -> None:
        self.run, self.since, self.logged = run, since, logged
        self.log = run.ctx.log
        self.pumps = Pumps(f"swarm-{run.ctx.job_id}")
        self.written: Counter[tuple[str, bool]] = Counter()  # entries, per task and stream
        self._said: set[str] = set()
        self._lock = threading.Lock()

    def follow(self) -> None:
        targets = []
        for is_err in (False, True):
            stream = self._open(is_err, follow=True)
            self.pumps.streams.append(stream)
            targets.append(functools.partial(self._copy, stream, is_err, self.pumps.leaving))
        self.pumps.start(targets)

    def leave(self) -> None:
        """Stop following, leaving a half-printed line to the next daemon."""
        self.pumps.leaving.set()
        self.pumps.stop()

    def finish(self) -> None:
        """The tasks ended: log what the followers have yet to get, then stop them."""
        for failed in self.catch_up(ended=True):
            self._engine_said(f"the rest of the output cannot be read: {explain(failed)}")
        self.pumps.stop()

    def follow_again(self) -> bool:
        """After the engine could not be reached: log what the tasks printed meanwhile, and
        follow them again; False if it cannot be reached for that (the next look tries again).
        """
        import requests  # noqa: PLC0415 - as the SDK: only where such jobs run

        failed = self.catch_up()
        if not failed:
            try:
                self.follow()
            except Exception as exc:  # another error: the end reads what the followers miss
                failed.append(exc)
        return not any(isinstance(exc, requests.ConnectionError) for exc in failed)

    def catch_up(self, *, ended: bool = False) -> list[Exception]:
        """Log what the service printed so far that the followers have yet to get; return
        why a stream could not be read (the engine gone again: its next answer reads it).
        A line half printed is left to the followers unless its tasks ``ended``."""
        failed = []
        partial = threading.Event()
        if not ended:
            partial.set()
        for is_err in (False, True):
            try:
                stream = self._open(is_err, follow=False)
                with contextlib.closing(stream):
                    self._copy(stream, is_err, partial)
            except Exception as exc:
                failed.append(exc)
        return failed

    def close(self) -> None:
        self.pumps.stop()

    def _open(self, is_err: bool, *, follow: bool) -> Any:
        docker = sdk()
        api = self.run.streams.api
        params = {
            "details": True, "follow": follow, "stdout": not is_err, "stderr": is_err,
            "since": self.since, "timestamps": True, "tail": "all",
        }  # fmt: skip
        # The SDK's service_logs gives a generator that another thread cannot close.
        response = api._get(
            api._url("/services/{0}/logs", self.run.service.id),
            params=params,
            stream=True,
        )
        lines = api._get_result_tty(True, response, False)
        return docker.types.daemon.CancellableStream(lines, response)

    def _copy(self, entries: Iterable[bytes], is_err: bool, leaving: threading.Event) -> None:
        read: Counter[str] = Counter()  # entries of each task this reader has read
        try:
            for stamp, task, count, line in _lines(entries, leaving):
                if not stamp:
                    self._engine_said(line.decode("utf-8", errors="replace"))
                    continue
                place, read[task] = read[task], read[task] + count
                text = self._prefix(task) + line.decode("utf-8", errors="replace")
                with self._lock:
                    if place < self.written[(task, is_err)]:
                        continue  # another reader wrote it
                    self.written[(task, is_err)] = place + count
                    self.log.count_output(len(line) + 1)  # its newline was taken off
                    if self.logged is None or not self.logged.lines[is_err].holds(
                        stamp, text.rstrip("\r\n")
                    ):
                        self.log.output(text.encode(), stderr=is_err)
        except Exception:  # noqa: S110 - closed at the end, or the engine went: _wait tells
            pass

    def _engine_said(self, text: str) -> None:
        """The engine's own words in the stream: said once, as spoold's, not as output. That
        a task has no log yet because it was never scheduled is no news."""
        with self._lock:
            if text in self._said or "has not been scheduled" in text:
                return
            self._said.add(text)
        self.log.info(f"the engine's log of service {self.run.name}: {text}")

    def _prefix(self, task: str) -> str:
        if self.run.replicas == 1 or not task:
            return ""
        slot = self.run.slot_of(task)
        return "" if slot is None else f"[task {slot + 1}] "


def _lines(
    entries: Iterable[bytes], leaving: threading.Event
) -> Iterator[tuple[str, str, int, bytes]]:
    """(stamp, task id, entries, line) from a service's log with timestamps and details,
    ``STAMP k=v,...,com.docker.swarm.task.id=ID,... text``.

    A line longer than the engine's buffer comes in several entries, each but the last without
    a newline; the line has the stamp of its first.
    """
    held: dict[str, tuple[str, int, bytes]] = {}
    for entry in entries:
        raw, _, rest = entry.partition(b" ")
        try:
            stamp = rfc3339(parse_rfc3339(raw.decode()))  # as the job's log writes stamps
        except ValueError:  # the engine's own words ("Error grabbing logs: ..."): no stamp
            yield "", "", 0, entry.removesuffix(b"\n")
            continue
        details, _, text = rest.partition(b" ")
        task = _task_id(details)
        first, count, line = held.pop(task, (stamp, 0, b""))
        line += text
        count += 1
        if line.endswith(b"\n") or len(line) > MAX_LINE:
            yield first, task, count, line.removesuffix(b"\n")
        else:
            held[task] = (first, count, line)
    if not leaving.is_set():
        for task, (first, count, line) in held.items():
            yield first, task, count, line


def _task_id(details: bytes) -> str:
    for pair in details.decode("utf-8", errors="replace").split(","):
        key, _, value = pair.partition("=")
        if key == "com.docker.swarm.task.id":
            return value
    return ""


__all__ = [
    "LABEL_JOB",
    "LABEL_SPOOL",
    "LABEL_UNIT",
    "SwarmExecutor",
    "Verdict",
    "constraint_problem",
    "judge",
    "remove_leftover_services",
]
