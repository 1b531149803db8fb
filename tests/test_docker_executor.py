"""The docker executor against a real Docker engine (tests/dockerd.py starts one)."""

from __future__ import annotations

import importlib
import json
import logging
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from spoold.executors.base import ExecResult, RunContext
from spoold.executors.docker import (
    LABEL_JOB,
    LABEL_MANAGED,
    LABEL_SPOOL,
    DockerExecutor,
    nothing_left,
    remove_leftovers,
    transient,
)

from spoold.core.job import ArtifactSpec
from spoold.intake.validation import JobValidator, compose_job_schema, load_base_schema
from spoold.run.registry import ExecutorRegistry
from tests.harness import wait_for
from tests.test_executors import _context, _Log


def _job_id() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def _ctx(
    image: str, tmp_path: Path, log: _Log, product: dict[str, Any], **overrides: Any
) -> RunContext:
    return _context(
        tmp_path, {"image": image, **product}, log, executor="docker", job_id=_job_id(), **overrides
    )


def _left(client: Any, job_id: str) -> list[Any]:
    return list(client.containers.list(all=True, filters={"label": f"{LABEL_JOB}={job_id}"}))


def _run(ctx: RunContext) -> ExecResult:
    return DockerExecutor().run(ctx)


def test_output_is_streamed_into_the_log_and_the_container_removed(
    dockerd: str, client: Any, tmp_path: Path
) -> None:
    log = _Log()
    started: list[int | None] = []
    ctx = _ctx(
        dockerd,
        tmp_path,
        log,
        {"before_script": "echo before", "script": ["echo out", "echo err >&2"]},
        on_start=started.append,
    )
    result = _run(ctx)
    assert result.succeeded and result.exit_code == 0, log.text()
    assert started == [None]
    lines = log.lines()
    assert any(line.endswith(" INFO before") for line in lines)
    assert any(line.endswith(" INFO out") for line in lines)
    assert any(line.endswith(" ERROR err") for line in lines)
    assert _left(client, ctx.job_id) == []


def test_exit_code_is_the_jobs_and_a_list_stops_at_its_first_failure(
    dockerd: str, tmp_path: Path
) -> None:
    log = _Log()
    result = _run(_ctx(dockerd, tmp_path, log, {"commands": ["echo before", "exit 3", "echo no"]}))
    assert (result.exit_code, result.succeeded, result.error) == (3, False, "exit code 3")
    assert "before" in log.text() and "no" not in log.text().split()


def test_environment_is_the_jobs_and_not_the_hosts(
    dockerd: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOST_ONLY", "must-not-leak")
    nasty = "a'b\"c $(echo no) `echo no` ; exit 9 \\n*"
    log = _Log()
    ctx = _ctx(
        dockerd,
        tmp_path,
        log,
        {
            "script": 'printf "%s|%s|%s|%s\\n" "$NASTY" "$GREETING" "$HOST_ONLY" "$JOB_ID"',
            "env": {"NASTY": nasty},
        },
        env={"HOST_ONLY": "must-not-leak", "GREETING": "hi", "JOB_ID": "j-1", "PATH": "/nowhere"},
        job_env={"GREETING": "hi", "JOB_ID": "j-1"},
    )
    result = _run(ctx)
    assert result.succeeded, log.text()
    assert f"{nasty}|hi||j-1" in log.text()


def test_a_missing_image_fails_clearly(dockerd: str, client: Any, tmp_path: Path) -> None:
    log = _Log()
    ctx = _ctx("local/x:1", tmp_path, log, {"script": "true"})
    result = _run(ctx)
    assert result.exit_code is None
    assert (result.error or "").startswith(
        "image local/x:1 is not on this host and cannot be pulled: "
    )
    assert _left(client, ctx.job_id) == []


def test_artifacts_are_copied_out_of_the_container(dockerd: str, tmp_path: Path) -> None:
    log = _Log()
    script = [
        "mkdir -p out/sub other",
        "echo report > out/report.txt",
        "echo deep > out/sub/deep.txt",
        "echo skip > other/skip.txt",
        "ln -s /etc/passwd out/link.txt",
    ]
    ctx = _ctx(
        dockerd,
        tmp_path,
        log,
        {"script": script},
        artifacts=(ArtifactSpec("out/*.txt"), ArtifactSpec("out/sub", "dir"), ArtifactSpec("no/x")),
    )
    result = _run(ctx)
    assert result.succeeded, log.text()
    assert (tmp_path / "out" / "report.txt").read_text() == "report\n"
    assert (tmp_path / "out" / "sub" / "deep.txt").read_text() == "deep\n"
    assert not (tmp_path / "other").exists()
    assert not (tmp_path / "out" / "link.txt").exists()  # links are never copied out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging dir left


def test_another_user_can_write_to_the_work_dir(dockerd: str, tmp_path: Path) -> None:
    log = _Log()
    script = ["id -u", "mkdir out", "id -u > out/uid.txt"]
    ctx = _ctx(
        dockerd, tmp_path, log, {"script": script, "user": "65534:65534"},
        artifacts=(ArtifactSpec("out/uid.txt"),),
    )  # fmt: skip
    result = _run(ctx)
    assert result.succeeded, log.text()
    assert (tmp_path / "out" / "uid.txt").read_text() == "65534\n"


def test_timeout_stops_and_removes_the_container(dockerd: str, client: Any, tmp_path: Path) -> None:
    ctx = _ctx(dockerd, tmp_path, _Log(), {"script": "sleep 60"}, timeout=1.0, kill_grace=1.0)
    result = _run(ctx)
    assert result.timed_out and result.error == "timed out after 1s"
    assert _left(client, ctx.job_id) == []


def test_cancel_stops_and_removes_the_container(dockerd: str, client: Any, tmp_path: Path) -> None:
    log = _Log()
    cancel = threading.Event()
    ctx = _ctx(dockerd, tmp_path, log, {"script": "echo ready; sleep 60"}, cancel=cancel)

    def cancel_once_running() -> None:
        wait_for(lambda: "ready" in log.text(), bound=30, what="the first line")
        cancel.set()

    canceller = threading.Thread(target=cancel_once_running)
    canceller.start()
    result = _run(ctx)
    canceller.join(30)
    assert result.cancelled and result.error == "cancelled"
    assert _left(client, ctx.job_id) == []


def test_memory_limit_is_set_and_enforced(dockerd: str, client: Any, tmp_path: Path) -> None:
    log = _Log()
    # The container is gone afterwards: the job looks at its own cgroup to show the limit.
    show = "cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/memory.max 2>/dev/null"
    ctx = _ctx(dockerd, tmp_path, log, {"script": show, "memory": "32m", "pids": 50})
    _run(ctx)
    assert str(32 * 1024 * 1024) in log.text()
    # A shell variable of 200 MB cannot fit in 32 MB.
    hog = {
        "script": "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived",
        "memory": "32m",
    }
    result = _run(_ctx(dockerd, tmp_path, _Log(), hog))
    # The engine's word, or, where it missed the kernel's report (2 in 40 here), the likely
    # cause: either way the limit is named.
    assert (result.exit_code, result.succeeded) == (137, False)
    assert f"out of memory (memory limit {32 << 20} bytes)" in (result.error or ""), result


def test_a_container_killed_from_outside_is_not_said_to_have_run_out_of_memory_for_sure(
    dockerd: str, client: Any, tmp_path: Path
) -> None:
    log = _Log()
    ctx = _ctx(dockerd, tmp_path, log, {"script": "echo up; sleep 60", "memory": "64m"})
    running = threading.Thread(target=lambda: results.append(_run(ctx)))
    results: list[ExecResult] = []
    running.start()
    wait_for(lambda: "up" in log.text(), what="the container's first line")
    (container,) = _left(client, ctx.job_id)
    container.kill()
    running.join(60)
    (result,) = results
    assert result.exit_code == 137
    assert result.error is not None and "unless something else killed it" in result.error


def test_output_survives_a_silence_longer_than_the_api_timeout(
    dockerd: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docker = importlib.import_module("docker")  # only once the fixture found the SDK

    # As if the API timeout were 1 s, for the streamed requests of a client that has one:
    # only a client without one (timeout=None) follows output through a longer silence. The
    # other calls keep theirs: a loaded engine may take over a second to create a container.
    timed = docker.APIClient._set_request_timeout

    def streams_time_out_soon(client: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if kwargs.get("stream") and client.timeout is not None:
            kwargs.setdefault("timeout", 1)
        return dict(timed(client, kwargs))

    monkeypatch.setattr(docker.APIClient, "_set_request_timeout", streams_time_out_soon)
    # This SDK waits for attached output in poll() with no timeout and lifts the socket's own
    # before it follows logs: it never times a stream out. As if it did (another version or
    # transport), the executor's own choice of client is the only guard left, and is tested.
    sockets = importlib.import_module("docker.utils.socket")

    def read_timed(sock: Any, n: int = 4096) -> bytes:
        return bytes(sock.recv(n) if hasattr(sock, "recv") else sock.read(n))

    monkeypatch.setattr(sockets, "read", read_timed)
    monkeypatch.setattr(docker.APIClient, "_disable_socket_timeout", lambda _client, _sock: None)
    log = _Log()
    result = _run(_ctx(dockerd, tmp_path, log, {"script": "echo a; sleep 2; echo b"}))
    assert result.succeeded, log.text()
    assert log.text().endswith("a\nb")


def test_an_engine_that_cannot_be_reached_fails_the_attempt_retryable(
    dockerd: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing listens at the engine's socket (a dockerd restarting): the attempt failed as
    for good, where ``retries:`` could have run it once the engine was back."""
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'nobody.sock'}")
    result = _run(_ctx(dockerd, tmp_path, _Log(), {"script": "true"}))
    assert result.exit_code is None and result.retryable, result


def test_an_answer_of_the_engine_is_no_transient_failure(dockerd: str) -> None:
    """The SDK's APIError is a ``requests`` error too: swarm took any answer of the engine's
    (a 400 for a spec it refuses) for a connection lost, and retried it."""
    docker, requests = importlib.import_module("docker"), importlib.import_module("requests")
    assert transient(requests.ConnectionError("refused"))
    assert transient(requests.ReadTimeout("slow"))
    assert not transient(docker.errors.APIError("400 Client Error: bad spec"))
    assert not transient(docker.errors.NotFound("404: no such container"))


def test_without_the_sdk_the_error_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "docker", None)  # import docker raises ImportError
    result = _run(_ctx("any", tmp_path, _Log(), {"script": "true"}))
    assert result.error == "the docker executor needs the docker SDK: pip install spoold[docker]"


@pytest.mark.parametrize(
    ("product", "problem"),
    [
        ({"image": "a", "script": "x"}, None),
        ({"image": "a", "commands": ["x"], "mounts": ["/srv:/srv:ro"], "memory": "64m"}, None),
        ({"image": "a"}, "missing required field 'script' or 'commands'"),
        ({"image": "a", "script": "x", "commands": "y"}, "give only one of"),
        ({"image": "a", "script": "x", "mounts": ["/srv"]}, "does not match"),
    ],
)
def test_the_sub_schema(product: dict[str, Any], problem: str | None) -> None:
    schemas = ExecutorRegistry.from_entry_points().schemas()
    validator = JobValidator(compose_job_schema(load_base_schema(), schemas))
    document = json.dumps({"executor": "docker", "product": product}).encode()
    issues = validator.check(document, "job.json")
    if problem is None:
        assert issues == []
    else:
        assert len(issues) == 1 and problem in issues[0].message


def test_remove_leftovers_removes_a_stopped_labelled_container(dockerd: str, client: Any) -> None:
    # Its own spool label: other tests' containers (other xdist workers) are not leftovers.
    job, running, spool = _job_id(), _job_id(), _job_id()
    labels = {LABEL_JOB: job, LABEL_MANAGED: "1", LABEL_SPOOL: spool}
    client.containers.create(dockerd, ["true"], labels=labels).start()
    client.containers.create(dockerd, ["true"], labels={**labels, LABEL_JOB: running})
    try:
        removed = remove_leftovers(
            client, logging.getLogger("test"), running={running}, spool=spool
        )
        assert len(removed) == 1
        assert _left(client, job) == []
        assert len(_left(client, running)) == 1
    finally:
        for container in _left(client, running):
            container.remove(force=True)


def test_recovery_and_validation_ask_the_engine_without_the_sdk(
    dockerd: str, client: Any, tmp_path: Path
) -> None:
    # Recovery runs in the daemon's main process: the SDK would stay there for good.
    program = (
        "import logging, sys; from pathlib import Path\n"
        "from spoold.executors.docker import DockerExecutor\n"
        "from spoold.executors.swarm import SwarmExecutor\n"
        "for executor in (DockerExecutor, SwarmExecutor):\n"
        "    executor.recover(Path(sys.argv[1]), set(), logging.getLogger())\n"
        "assert SwarmExecutor.validate({'image': 'x', 'script': 'y', 'networks': ['bridge']})\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('docker', 'requests')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program, str(tmp_path)], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]", done.stderr
    # One container of the spool's: its job running, nothing is left; not running, it is.
    job = _job_id()
    labels = {LABEL_JOB: job, LABEL_MANAGED: "1", LABEL_SPOOL: str(tmp_path)}
    container = client.containers.create(dockerd, ["true"], labels=labels)
    try:
        listing = ["/containers/json?all=1"]
        assert nothing_left(listing, tmp_path, {job})
        assert not nothing_left(listing, tmp_path, set())
    finally:
        container.remove(force=True)
