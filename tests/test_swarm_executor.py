"""The swarm executor against the real engine of the test set-up, as a single-node swarm."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from spoold.executors.base import ExecResult, RunContext
from spoold.executors.swarm import LABEL_JOB, SwarmExecutor, constraint_problem, judge

from spoold.core.clock import SystemClock
from spoold.core.job import ArtifactSpec
from spoold.core.joblog import JobLog
from spoold.intake.validation import job_validator
from spoold.run.registry import ExecutorRegistry
from tests.dockerd import EngineLink
from tests.harness import wait_for
from tests.test_executors import _context, _Log
from tests.test_usage_docker import SCRIPT, open_after_a_reading

# Ends at once on SIGTERM (sh runs a trap only between commands: the sleep goes in background);
# "up" says the trap is set.
_UNTIL_TERM = "trap 'echo ended; exit 9' TERM; echo up; sleep 60 & wait"


def _job_id() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def _ctx(
    image: str, tmp_path: Path, log: _Log, product: dict[str, Any], **overrides: Any
) -> RunContext:
    fields: dict[str, Any] = {"executor": "swarm", "job_id": _job_id(), **overrides}
    return _context(tmp_path, {"image": image, **product}, log, **fields)


def _run(ctx: RunContext) -> ExecResult:
    return SwarmExecutor().run(ctx)


def _when(condition: Callable[[], bool], event: threading.Event) -> None:
    """Set ``event`` once ``condition`` holds (in a thread of its own)."""

    def watch() -> None:
        wait_for(condition, what="the condition")
        event.set()

    threading.Thread(target=watch, daemon=True).start()


def _services(client: Any, job_id: str) -> list[Any]:
    return list(client.services.list(filters={"label": f"{LABEL_JOB}={job_id}"}))


def _left(client: Any, job_id: str) -> list[str]:
    """What of a job is still on the engine: services, secrets, containers."""
    label = {"label": f"{LABEL_JOB}={job_id}"}
    services = [f"service {s.name}" for s in client.services.list(filters=label)]
    secrets = [f"secret {s.name}" for s in client.secrets.list(filters=label)]
    containers = [f"container {c.name}" for c in client.containers.list(all=True, filters=label)]
    return services + secrets + containers


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Path]:
    """A directory every task mounts (one node: a bind mount is shared by all its tasks)."""
    path = tmp_path / "shared"
    path.mkdir(mode=0o777)
    yield path


def test_output_reaches_the_log_and_nothing_is_left(
    swarm: str, client: Any, tmp_path: Path
) -> None:
    log = _Log()
    started: list[int | None] = []
    product = {"before_script": "echo before", "script": ["echo out", "echo err >&2"]}
    ctx = _ctx(swarm, tmp_path, log, product, on_start=started.append)
    result = _run(ctx)
    assert result.succeeded and result.exit_code == 0, log.text()
    assert started == [None]
    lines = log.lines()
    assert any(line.endswith(" INFO before") for line in lines)
    assert any(line.endswith(" INFO out") for line in lines)
    assert any(line.endswith(" ERROR err") for line in lines)
    assert _left(client, ctx.job_id) == []


def test_what_the_tasks_cost_comes_from_this_nodes_engine(
    swarm: str, client: Any, tmp_path: Path, shared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 24: each task's container here is read while it runs; two replicas' CPU adds up,
    the peak is the larger; a task gone before its first reading makes no figure up."""
    log = _Log()

    def worked() -> bool:
        return sum(line.endswith("] abc") for line in log.text().splitlines()) == 2

    open_after_a_reading(monkeypatch, shared / "go", worked, 2)
    script = SCRIPT.replace("/gate/", "/shared/")
    product = {"script": script, "replicas": 2, "mounts": [f"{shared}:/shared"]}
    result = _run(_ctx(swarm, tmp_path, log, product))
    assert result.succeeded, log.text()
    usage = result.usage
    assert usage is not None and usage.source in ("docker", "docker-sampled"), usage
    assert usage.peak_memory_bytes is not None and usage.peak_memory_bytes >= 100 * 2**20
    assert usage.cpu_user_seconds is not None and usage.cpu_system_seconds is not None
    assert usage.cpu_user_seconds + usage.cpu_system_seconds > 0.1
    assert usage.wall_seconds is not None and usage.wall_seconds >= 1.5
    quick = _run(_ctx(swarm, tmp_path, _Log(), {"script": "true"}))
    assert quick.succeeded and quick.usage is not None and quick.usage.wall_seconds is not None
    if quick.usage.source == "wall":
        assert quick.usage.cpu_user_seconds is None and quick.usage.peak_memory_bytes is None


def test_a_failure_is_its_exit_code_and_is_not_run_again(
    swarm: str, client: Any, tmp_path: Path, shared: Path
) -> None:
    # Swarm starts a failed task of a job again whatever the restart policy says: spoold ends
    # the service at the first failure, so the script runs once.
    log = _Log()
    product = {"script": "echo run >> /shared/runs; exit 4", "mounts": [f"{shared}:/shared"]}
    ctx = _ctx(swarm, tmp_path, log, product)
    result = _run(ctx)
    assert (result.exit_code, result.error, result.retryable) == (4, "exit code 4", False)
    assert (shared / "runs").read_text() == "run\n"
    assert _left(client, ctx.job_id) == []


def test_a_timeout_stops_the_task_with_sigterm_and_removes_the_service(
    swarm: str, client: Any, tmp_path: Path
) -> None:
    log = _Log()
    # The timeout counts from the service's creation: long enough for a loaded machine to
    # start the task and set its trap, which "up" then says.
    ctx = _ctx(swarm, tmp_path, log, {"script": _UNTIL_TERM}, timeout=15.0)
    result = _run(ctx)
    assert result.timed_out and result.error == "timed out after 15s", log.text()
    assert "up" in log.text().splitlines()
    assert "ended" in log.text().splitlines()  # its trap ran: SIGTERM first, within the grace
    assert _left(client, ctx.job_id) == []


def test_a_cancel_stops_the_task_and_removes_the_service(
    swarm: str, client: Any, tmp_path: Path
) -> None:
    log = _Log()
    cancel = threading.Event()
    ctx = _ctx(swarm, tmp_path, log, {"script": _UNTIL_TERM}, cancel=cancel)
    _when(lambda: "up" in log.text(), cancel)
    result = _run(ctx)
    assert result.cancelled and result.error == "cancelled", log.text()
    assert _left(client, ctx.job_id) == []


def test_replicas_all_succeed_and_their_lines_say_which_task(
    swarm: str, client: Any, tmp_path: Path
) -> None:
    log = _Log()
    ctx = _ctx(swarm, tmp_path, log, {"replicas": 3, "script": "echo hello"})
    result = _run(ctx)
    assert result.succeeded, log.text()
    said = sorted(line for line in log.text().splitlines() if line.endswith("hello"))
    assert said == ["[task 1] hello", "[task 2] hello", "[task 3] hello"]
    assert "all 3 tasks succeeded" in log.text()
    assert _left(client, ctx.job_id) == []


def test_one_of_three_replicas_failing_fails_the_job_and_ends_the_others(
    swarm: str, client: Any, tmp_path: Path, shared: Path
) -> None:
    log = _Log()
    script = (
        # The first task to make the directory fails; the others wait to be ended.
        "trap 'echo ended; exit 9' TERM; "
        "if mkdir /shared/first 2>/dev/null; then echo failing; exit 4; fi; "
        "echo waiting; sleep 60 & wait"
    )
    product = {"replicas": 3, "script": script, "mounts": [f"{shared}:/shared"]}
    ctx = _ctx(swarm, tmp_path, log, product)
    result = _run(ctx)
    assert result.exit_code == 4 and not result.succeeded, log.text()
    assert result.error is not None and result.error.startswith("exit code 4 (task ")
    assert result.error.endswith(" of 3)")
    text = log.text()
    assert text.count("failing") == 1, text  # not started again by the cluster
    assert "failed with exit code 4: the others were ended" in text
    assert text.count("ended") - text.count("were ended") == text.count("waiting"), text
    assert _left(client, ctx.job_id) == []


def test_a_secret_reaches_the_task_as_a_swarm_secret_only(
    swarm: str, client: Any, tmp_path: Path
) -> None:
    value = f"s3cr3t-{uuid.uuid4().hex}"
    log = _Log()
    seen: dict[str, Any] = {}

    def inspect(pid: int | None) -> None:  # while the service exists
        (service,) = _services(client, ctx.job_id)
        seen["spec"] = json.dumps(service.attrs)
        seen["secrets"] = [s.name for s in client.secrets.list()]

    # EXPECTED_VALUE as the worker gives a field that is no program: with the value filled in.
    product = {
        "script": 'test "$SPOOLD_SECRET_TOKEN" = "$EXPECTED_VALUE" && echo matched',
        "env": {"EXPECTED_VALUE": value},
    }
    ctx = _ctx(
        swarm, tmp_path, log, product, on_start=inspect,
        secrets={"TOKEN": value},
        env={"SPOOLD_SECRET_TOKEN": value}, job_env={"SPOOLD_SECRET_TOKEN": value},
    )  # fmt: skip
    result = _run(ctx)
    assert result.succeeded, log.text()
    assert "matched" in log.text()
    assert value not in seen["spec"]
    env = json.loads(seen["spec"])["Spec"]["TaskTemplate"]["ContainerSpec"].get("Env", [])
    assert not [v for v in env if v.startswith(("SPOOLD_SECRET_TOKEN=", "EXPECTED_VALUE="))]
    assert len([name for name in seen["secrets"] if name.startswith("spoold-")]) >= 2
    assert value not in log.text()
    assert _left(client, ctx.job_id) == []


def test_a_secret_value_in_another_field_is_refused(
    swarm: str, client: Any, tmp_path: Path
) -> None:
    value = f"s3cr3t-{uuid.uuid4().hex}"
    log = _Log()
    product = {"script": "true", "placement": {"constraints": [f"node.labels.k=={value}"]}}
    ctx = _ctx(swarm, tmp_path, log, product, secrets={"TOKEN": value})
    result = _run(ctx)
    assert not result.succeeded
    assert "secret TOKEN would be in the service's spec" in (result.error or "")
    assert _left(client, ctx.job_id) == []


def test_artifacts_come_back_from_every_task(swarm: str, client: Any, tmp_path: Path) -> None:
    log = _Log()
    script = ["mkdir -p out", 'echo "from $(hostname)" > "out/$(hostname).txt"']
    ctx = _ctx(
        swarm, tmp_path, log, {"replicas": 2, "script": script},
        artifacts=(ArtifactSpec("out/*.txt"),),
    )  # fmt: skip
    result = _run(ctx)
    assert result.succeeded, log.text()
    copied = sorted((tmp_path / "out").glob("*.txt"))
    assert len(copied) == 2
    assert all(path.read_text() == f"from {path.stem}\n" for path in copied)
    assert _left(client, ctx.job_id) == []


def test_a_constraint_no_node_matches_fails_with_the_reason(
    swarm: str, client: Any, tmp_path: Path
) -> None:
    log = _Log()
    product = {"script": "true", "placement": {"constraints": ["node.labels.zone==nowhere"]}}
    # The timeout only bounds a failure of this test: the job must fail long before it.
    ctx = _ctx(swarm, tmp_path, log, product, timeout=120.0)
    result = _run(ctx)
    assert not result.timed_out, log.text()
    assert result.error == (
        "the cluster cannot place the task: no suitable node "
        "(scheduling constraints not satisfied on 1 node)"
    )
    assert result.retryable  # a node that matches may come back, or join
    assert _left(client, ctx.job_id) == []


def test_an_image_no_node_has_is_rejected_with_the_reason(
    swarm: str, client: Any, tmp_path: Path
) -> None:
    # The test engine pulls through a proxy on loopback that refuses: the pull fails at once.
    log = _Log()
    ctx = _ctx("local/absent:1", tmp_path, log, {"script": "true"}, timeout=120.0)
    result = _run(ctx)
    assert result.error == "the cluster rejected the task: No such image: local/absent:1"
    assert result.exit_code is None and not result.retryable
    assert _left(client, ctx.job_id) == []


def test_an_engine_that_is_no_swarm_manager_is_said_so(
    dockerd: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import docker  # type: ignore[import-untyped]  # noqa: PLC0415 - the fixture found it

    real = docker.from_env

    def no_swarm(**kwargs: Any) -> Any:
        client = real(**kwargs)
        info = client.info()
        client.info = lambda: {**info, "Swarm": {"LocalNodeState": "inactive"}}
        return client

    monkeypatch.setattr(docker, "from_env", no_swarm)
    log = _Log()
    result = _run(_ctx(dockerd, tmp_path, log, {"script": "true"}))
    assert "is no swarm manager: run `docker swarm init`" in (result.error or "")


class _Unit:
    """A swarm job's unit as the worker gives it: a JobLog on the job's log file."""

    def __init__(self, root: Path, image: str, product: dict[str, Any]) -> None:
        self.job_id = _job_id()
        self.dir = root / "spool" / "running" / self.job_id
        self.dir.mkdir(parents=True)
        self.product = {"image": image, **product}

    def context(self, **overrides: Any) -> RunContext:
        log = JobLog(open(self.dir / "log", "ab", buffering=0), SystemClock())
        fields: dict[str, Any] = {
            "job_id": self.job_id, "executor": "swarm", "type": None, "product": self.product,
            "workdir": self.dir.parent, "env": {}, "job_env": {"SPOOLD_JOB_DIR": str(self.dir)},
            "log": log, "clock": SystemClock(), "timeout": None, "kill_grace": 1.0,
            "cancel": threading.Event(), "read_log": lambda: (self.dir / "log").open("rb"),
        }  # fmt: skip
        fields.update(overrides)
        return RunContext(**fields)

    def output(self) -> list[str]:
        """The log's lines of output (not spoold's), without stamps."""
        lines = [line.split(" ", 1)[1] for line in (self.dir / "log").read_text().splitlines()]
        return [line for line in lines if not line.split(" ", 1)[1].startswith("spoold: ")]


def test_detach_leaves_the_service_and_resume_re_attaches_without_repeating(
    swarm: str, client: Any, tmp_path: Path, shared: Path
) -> None:
    script = [
        "echo one", "echo two >&2", "until [ -e /shared/go ]; do sleep 0.1; done", "echo three",
    ]  # fmt: skip
    unit = _Unit(tmp_path, swarm, {"script": script, "mounts": [f"{shared}:/shared"]})
    detach = threading.Event()
    first = unit.context(detach=detach)
    _when(lambda: "ERROR two" in unit.output(), detach)
    assert _run(first).detached
    assert len(_services(client, unit.job_id)) == 1  # left running for the next daemon
    (shared / "go").touch()
    second = unit.context(resume=True)
    result = _run(second)
    assert result.succeeded, unit.output()
    # Each line once; stdout and stderr are followed side by side, so their order may differ.
    assert sorted(unit.output()) == ["ERROR two", "INFO one", "INFO three"]
    assert _left(client, unit.job_id) == []


#: Prints "one", then "two" on stderr once /shared/go is there (and marks /shared/printed),
#: then "three" once /shared/end is there.
_GATED = ["echo one", "until [ -e /shared/go ]; do sleep 0.1; done", "echo two >&2",
          ": > /shared/printed", "until [ -e /shared/end ]; do sleep 0.1; done",
          "echo three"]  # fmt: skip


def _printed_while_cut(unit: _Unit, link: EngineLink, shared: Path) -> Path:
    """Once a ``_GATED`` unit printed "one", cut the way to the engine; once the unit says
    so, let it print "two" meanwhile. Its log's path."""
    wait_for(lambda: "INFO one" in unit.output(), what="'one' in the log")
    link.cut()
    log = unit.dir / "log"
    wait_for(lambda: "cannot be reached" in log.read_text(), what="the engine missed")
    (shared / "go").touch()
    wait_for((shared / "printed").exists, what="'two' printed")
    return log


def test_a_job_rides_out_a_manager_it_cannot_reach_while_its_tasks_run_on(
    swarm: str, client: Any, tmp_path: Path, shared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manager's engine could not be reached for a while (restarting: a service's tasks
    run on): the job failed at once with the connection's error. It waits for the engine
    now, and once it answers its log has what the task printed meanwhile."""
    unit = _Unit(tmp_path, swarm, {"script": _GATED, "mounts": [f"{shared}:/shared"]})
    link = EngineLink(tmp_path / "engine.sock")
    try:
        monkeypatch.setenv("DOCKER_HOST", f"unix://{link.path}")
        ctx = unit.context()
        results: list[ExecResult] = []
        running = threading.Thread(target=lambda: results.append(_run(ctx)))
        running.start()
        log = _printed_while_cut(unit, link, shared)
        link.mend()
        wait_for(lambda: "answers again" in log.read_text(), what="the engine back")
        # Read once the engine answers, while the task runs on (not only at its end).
        wait_for(lambda: "ERROR two" in unit.output(), what="'two' in the log")
        (shared / "end").touch()
        running.join(60)
    finally:
        link.close()
    (result,) = results
    assert result.succeeded, log.read_text()
    assert sorted(unit.output()) == ["ERROR two", "INFO one", "INFO three"]
    assert _left(client, unit.job_id) == []


def test_a_cancel_while_the_manager_is_away_stops_the_tasks_once_it_answers(
    swarm: str, client: Any, tmp_path: Path, shared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel while the manager's engine could not be reached failed the job at once with
    the connection's error (the stop's scaling could not be asked for), its tasks running on.
    Now the stop waits for the engine, and the job ends cancelled, its output whole."""
    unit = _Unit(tmp_path, swarm, {"script": _GATED, "mounts": [f"{shared}:/shared"]})
    ctx = unit.context()
    link = EngineLink(tmp_path / "engine.sock")
    results: list[ExecResult] = []
    running = threading.Thread(target=lambda: results.append(_run(ctx)))
    try:
        monkeypatch.setenv("DOCKER_HOST", f"unix://{link.path}")
        running.start()
        log = _printed_while_cut(unit, link, shared)
        ctx.cancel.set()
        wait_for(lambda: "cancel: stopping its tasks waits" in log.read_text(),
                 what="the stop said to wait")  # fmt: skip
        assert running.is_alive() and not results, log.read_text()
        link.mend()
        running.join(60)
    finally:
        ctx.detach.set()  # a failed test's run ends too
        link.close()
    (result,) = results
    assert result.cancelled, log.read_text()
    assert "answers again" in log.read_text()
    assert sorted(unit.output()) == ["ERROR two", "INFO one"], log.read_text()  # not "three"
    assert _left(client, unit.job_id) == []


def test_resume_with_no_service_starts_one(swarm: str, client: Any, tmp_path: Path) -> None:
    unit = _Unit(tmp_path, swarm, {"script": "echo only"})
    result = _run(unit.context(resume=True))
    assert result.succeeded
    assert unit.output() == ["INFO only"]
    assert _left(client, unit.job_id) == []


def test_validate_refuses_what_the_cluster_would(swarm: str, client: Any) -> None:
    name = f"spoold-test-{uuid.uuid4().hex[:6]}"
    client.networks.create(name, driver="overlay", attachable=True)
    try:
        checker = job_validator(ExecutorRegistry.from_entry_points())
        text = json.dumps({
            "executor": "swarm",
            "product": {
                "image": "x", "script": "true",
                "placement": {
                    "constraints": ["node.labels.zone==eu", "zone=eu", "node.role==boss"],
                    "preferences": ["spread=node.labels.zone", "spread=node.id"],
                },
                "networks": [name, "bridge", "no-such-network"],
                "cpus": 1, "reserve": {"cpus": 2},
            },
        }).encode()  # fmt: skip
        assert [issue.message for issue in checker.check(text, "a.json")] == [
            "placement.constraints: 'zone=eu': a constraint is KEY==VALUE or KEY!=VALUE "
            "(node.labels.zone==eu)",
            "placement.constraints: 'node.role==boss': node.role is manager or worker, not 'boss'",
            "placement.preferences: 'spread=node.id': swarm spreads over node.labels.NAME or "
            "engine.labels.NAME",
            "reserve.cpus: 2 is more than the limit cpus: 1",
            "networks: bridge is a local network: a service attaches to swarm networks only "
            "(docker network create -d overlay --attachable NAME)",
            "networks: no-such-network is no network of this swarm",
        ]
    finally:
        client.networks.get(name).remove()


def test_networks_placement_and_resources_reach_the_service(
    swarm: str, client: Any, tmp_path: Path
) -> None:
    network = client.networks.create(
        f"spoold-test-{uuid.uuid4().hex[:6]}", driver="overlay", attachable=True
    )
    specs: list[dict[str, Any]] = []
    try:
        log = _Log()
        product = {
            "replicas": 2, "script": "echo placed", "networks": [network.name],
            "placement": {
                "constraints": ["node.role==manager"], "preferences": ["spread=node.labels.zone"],
                "max_per_node": 2,
            },
            "memory": "64m", "cpus": 0.5, "reserve": {"memory": "32m", "cpus": 0}, "pids": 64,
        }  # fmt: skip
        job = _job_id()
        ctx = _ctx(
            swarm, tmp_path, log, product, job_id=job,
            on_start=lambda pid: specs.extend(s.attrs["Spec"] for s in _services(client, job)),
        )  # fmt: skip
        result = _run(ctx)
        assert result.succeeded, log.text()
        assert log.text().count("placed") == 2
    finally:
        network.remove()
    template = specs[0]["TaskTemplate"]
    assert [n["Target"] for n in template["Networks"]] == [network.id]
    assert template["Placement"] == {
        "Constraints": ["node.role==manager"],
        "Preferences": [{"Spread": {"SpreadDescriptor": "node.labels.zone"}}],
        "MaxReplicas": 2,
    }
    assert template["Resources"]["Limits"] == {
        "NanoCPUs": 500_000_000, "MemoryBytes": 64 * 2**20, "Pids": 64,
    }  # fmt: skip
    assert template["Resources"]["Reservations"] == {"MemoryBytes": 32 * 2**20}
    assert _left(client, job) == []


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("node.labels.zone==eu", None),
        ("node.hostname != h1", None),
        ("engine.labels.ssd==true", None),
        ("node.ip==10.0.0.0/8", None),
        ("node.platform.arch==x86_64", None),
        ("nodes.labels.zone==eu", "no key swarm matches"),
        ("node.labels.==eu", "names no label"),
        ("node.ip==not-an-address", "node.ip takes an address or a network"),
        ("node.labels.zone==e<u", "is no constraint value"),
        ("9zone==eu", "is no constraint key"),
        ("node.labels.zone=eu", "a constraint is KEY==VALUE"),
    ],
)
def test_constraints_are_checked_as_swarm_parses_them(text: str, problem: str | None) -> None:
    found = constraint_problem(text)
    assert (found is None) if problem is None else (problem in (found or "")), found


def _task(state: str, slot: int = 0, created: str = "1", **status: Any) -> dict[str, Any]:
    return {"Slot": slot, "CreatedAt": created, "Status": {"State": state, **status}}


def test_judge_takes_each_task_once() -> None:
    assert judge([_task("running"), _task("complete", 1)], 2).outcome is None
    assert judge([_task("complete"), _task("complete", 1)], 2).outcome == "succeeded"
    # The cluster's second run of a failed task does not hide the first failure.
    failed = _task("failed", created="1", ContainerStatus={"ExitCode": 4})
    verdict = judge([_task("complete", created="2"), failed], 1)
    assert (verdict.outcome, verdict.task) == ("failed", failed)
    # A rejected task may report exit code 0: it failed all the same.
    rejected = _task("rejected", Err="No such image: x", ContainerStatus={"ExitCode": 0})
    assert judge([rejected], 1).reason == "No such image: x"


def test_judge_tells_unplaceable_from_waiting_for_resources() -> None:
    nowhere = "no suitable node (scheduling constraints not satisfied on 3 nodes)"
    assert judge([_task("pending", Err=nowhere)], 1).outcome == "unplaceable"
    busy = "no suitable node (insufficient resources on 2 nodes)"
    assert judge([_task("pending", Err=busy)], 1).outcome is None
    both = "no suitable node (insufficient resources on 1 node; 1 node not available for new tasks)"
    assert judge([_task("pending", Err=both)], 1).outcome == "unplaceable"


def test_a_container_the_agent_removes_while_it_is_listed_is_no_error() -> None:
    """Swarm's agent reaps a service's task containers as the service goes: one listed, then
    gone before the SDK looks at it, is one fewer to remove (seen in CI: its NotFound
    replaced a timed-out job's result)."""
    import docker  # noqa: PLC0415 - the SDK's own error, as the engine gives it
    from spoold.executors.swarm import _remove_service  # noqa: PLC0415 - the one function

    class Containers:
        def list(self, *, all: bool, filters: Any, ignore_removed: bool = False) -> list[Any]:
            if not ignore_removed:
                raise docker.errors.NotFound("No such container: 487c4011")
            return []

    class Client:
        containers = Containers()

    class Service:
        id, name = "s1", "spoold-t-1"

        def remove(self) -> None:
            pass

    _remove_service(Client(), Service(), _Log(), SystemClock())  # type: ignore[arg-type]
