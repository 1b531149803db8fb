"""The ``docker`` executor: the job's script in a fresh container, removed at the end.

The docker SDK is imported when a job runs, never with this module: spoold must load (and list
its executors) on hosts without it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import posixpath
import shutil
import tarfile
import tempfile
import threading
import uuid
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from spoold.executors.base import ExecResult, Executor, RunContext
from spoold.executors.local import shell_script

from spoold.core.errors import ExecutorError, ExecutorNotAvailable
from spoold.core.joblog import JobLog

#: Where the job's commands run, inside the container; artifacts are relative to it.
WORKDIR = "/spoold/work"
LABEL_JOB = "spoold.job"
LABEL_MANAGED = "spoold.managed"
LABEL_WORKER = "spoold.worker"
LABEL_SPOOL = "spoold.spool"  # whose recovery may remove it: several spools can share an engine
_ALIVE = frozenset({"created", "running", "restarting", "paused"})
_POLL = 0.05  # seconds between looks at cancel and the timeout
_MAX_LINE = 64 * 1024  # a longer run of output without a newline is logged in pieces
_GLOB = frozenset("*?[")


def _sdk() -> Any:
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
        docker = _sdk()
        import requests  # noqa: PLC0415 - worker processes load it only to run such jobs

        failures = (docker.errors.DockerException, requests.RequestException)
        image = str(ctx.product["image"])
        try:
            client = docker.from_env()
            # Attached output may pause for longer than any API call may take: no read timeout.
            streams = docker.from_env(timeout=None)
        except failures as exc:
            raise ExecutorError(f"cannot reach the docker engine: {exc}") from exc
        try:
            _ensure_image(client, image, ctx.log)
            container = client.containers.create(image, **_options(ctx))
            try:
                if ctx.product.get("user") is not None:
                    _open_workdir(container)
                return _run(container, streams, ctx)
            finally:
                _remove(container, ctx.log)
        except failures as exc:
            raise ExecutorError(f"docker: {_explain(exc)}") from exc
        finally:
            client.close()
            streams.close()


def _ensure_image(client: Any, image: str, log: JobLog) -> None:
    """Pull the image only when this host lacks it: a tag here wins over the registry's."""
    docker = _sdk()
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
            f"image {image} is not on this host and cannot be pulled: {_explain(exc)}"
        ) from exc


def _options(ctx: RunContext) -> dict[str, Any]:
    product = ctx.product
    commands = [*_lines(product.get("before_script")), *_lines(product.get("script"))]
    commands += _lines(product.get("commands"))
    labels = {LABEL_JOB: ctx.job_id, LABEL_MANAGED: "1"}
    if worker := ctx.env.get("RUNNER_ID"):
        labels[LABEL_WORKER] = worker
    if job_dir := ctx.job_env.get("SPOOLD_JOB_DIR"):
        labels[LABEL_SPOOL] = str(Path(job_dir).parent.parent)
    namespace = product.get("namespace")
    if namespace:
        labels["spoold.namespace"] = str(namespace)
    options: dict[str, Any] = {
        # The entrypoint, not the command: an image's own ENTRYPOINT would swallow the script.
        "entrypoint": ["/bin/sh", "-c", shell_script(ctx.before_script, commands)],
        "working_dir": WORKDIR,
        "environment": _environment(ctx),
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


def _lines(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(line) for line in value]


def _environment(ctx: RunContext) -> dict[str, str]:
    env = dict(ctx.job_env)  # not spoold's own environment: it describes this host
    env["RUNNER_WORKDIR"] = WORKDIR  # the host's path means nothing in the container
    env.update({str(k): str(v) for k, v in (ctx.product.get("env") or {}).items()})
    return env


def _run(container: Any, streams: Any, ctx: RunContext) -> ExecResult:
    # Attached before the start, with the output so far: not one line is missed.
    output = streams.api.attach(
        container.id, stdout=True, stderr=True, stream=True, logs=True, demux=True
    )
    done = threading.Event()
    pump = threading.Thread(
        target=_pump, args=(output, ctx.log, done), name=f"docker-{ctx.job_id}", daemon=True
    )
    pump.start()
    try:
        container.start()
        if ctx.on_start is not None:
            ctx.on_start(None)
        ended = _wait(container, done, ctx)
        if ended is not None:
            _stop(container, ctx.kill_grace)
            done.wait(ctx.kill_grace + 10)  # the rest of the output, up to the very end
        container.reload()
        state = container.attrs["State"]
        try:
            _copy_artifacts(container, ctx)
        except Exception as exc:  # the job ran, its result stands; spoold says what is missing
            ctx.log.error(f"could not copy the artifacts out of the container: {_explain(exc)}")
    finally:
        output.close()
        pump.join(5)
    code = state.get("ExitCode")
    if ended is not None:
        return ExecResult(code, timed_out=ended == "timeout", cancelled=ended == "cancel")
    if state.get("OOMKilled"):
        limit = container.attrs["HostConfig"].get("Memory")
        error = f"the container ran out of memory (memory limit {limit} bytes)"
        ctx.log.error(error)
        return ExecResult(code, error)
    return ExecResult(code, None if code == 0 else f"exit code {code}")


def _pump(
    output: Iterable[tuple[bytes | None, bytes | None]], log: JobLog, done: threading.Event
) -> None:
    """Log the container's output line by line as it comes; stderr as errors."""
    pending = {False: b"", True: b""}
    try:
        for chunks in output:
            for is_err, chunk in zip((False, True), chunks, strict=True):
                if not chunk:
                    continue
                *lines, rest = (pending[is_err] + chunk).split(b"\n")
                for line in lines:
                    log.output(line, stderr=is_err)
                if len(rest) > _MAX_LINE:
                    log.output(rest, stderr=is_err)
                    rest = b""
                pending[is_err] = rest
    except Exception:  # noqa: S110 - closed at the end, or the engine went: _wait tells which
        pass
    finally:
        for is_err, rest in pending.items():
            if rest:
                log.output(rest, stderr=is_err)
        done.set()


def _wait(container: Any, done: threading.Event, ctx: RunContext) -> str | None:
    """Until the container ends (None), the timeout passes or the job is cancelled."""
    deadline = None if ctx.timeout is None else ctx.clock.monotonic() + ctx.timeout
    while True:
        if done.wait(_POLL):
            container.reload()
            if container.status not in _ALIVE:
                return None
            # The output stream ended but the container runs on (the engine dropped it): poll.
            ctx.cancel.wait(0.5)
        if ctx.cancel.is_set():
            return "cancel"
        if deadline is not None and ctx.clock.monotonic() >= deadline:
            return "timeout"


def _stop(container: Any, grace: float) -> None:
    docker = _sdk()
    try:
        container.stop(timeout=math.ceil(grace))  # SIGTERM, and SIGKILL after the grace period
    except docker.errors.NotFound:
        return
    except Exception:  # an engine that does not answer in time: kill without asking again
        with contextlib.suppress(docker.errors.APIError):
            container.kill()


def _remove(container: Any, log: JobLog) -> None:
    docker = _sdk()
    try:
        container.remove(force=True)
    except docker.errors.NotFound:
        pass
    except Exception as exc:  # the job's result stands; recovery removes it later
        log.error(f"could not remove container {container.name}: {_explain(exc)}")


def _copy_artifacts(container: Any, ctx: RunContext) -> None:
    """Copy what the declared globs match out of the container's work dir into ctx.workdir."""
    if not ctx.artifacts:
        return
    docker = _sdk()
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


def _explain(exc: BaseException) -> str:
    return str(getattr(exc, "explanation", None) or exc)


def _recover(spool_root: Path, running: Collection[str], log: logging.Logger) -> None:
    try:
        client = _sdk().from_env(timeout=10)
        client.ping()
    except Exception as exc:  # no SDK or no engine here: then no container of ours either
        log.debug("docker recovery: no engine to look at (%s)", exc)
        return
    with contextlib.closing(client):
        remove_leftovers(client, log, running=running, spool=str(spool_root))


def remove_leftovers(
    client: Any, log: logging.Logger, *, running: Collection[str] = (), spool: str | None = None
) -> list[str]:
    """Remove spoold's containers whose job is not in ``running`` (after a kill -9 of spoold).

    ``spool`` limits this to the containers of one spool's jobs, so that several spools (and
    their daemons) can share an engine. Returns the names of the containers removed.
    """
    docker = _sdk()
    labels = [f"{LABEL_MANAGED}=1"] + ([f"{LABEL_SPOOL}={spool}"] if spool else [])
    removed = []
    for container in client.containers.list(all=True, filters={"label": labels}):
        if container.labels.get(LABEL_JOB) in running:
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
