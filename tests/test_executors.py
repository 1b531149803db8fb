"""One contract for every executor, then what local and custom do beyond it."""

from __future__ import annotations

import io
import os
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest
from spoold.executors.base import ExecResult, Executor, RunContext
from spoold.executors.custom import CustomExecutor
from spoold.executors.local import LocalExecutor

from spoold.core.clock import SystemClock
from spoold.core.errors import PluginError
from spoold.core.joblog import JobLog
from spoold.intake.validation import job_validator
from spoold.run.registry import ExecutorRegistry
from tests.fake_pve import AgentCommand, FakePVE
from tests.harness import running, wait_for
from tests.loopback import free_port


class _Log:
    """A JobLog over memory, so tests can read what an executor wrote."""

    def __init__(self) -> None:
        self.buffer = io.BytesIO()
        self.log = JobLog(self.buffer, SystemClock())

    def lines(self) -> list[str]:
        return self.buffer.getvalue().decode().splitlines()

    def text(self) -> str:
        return "\n".join(
            line.split(" ", 2)[2] if line.count(" ") >= 2 else line for line in self.lines()
        )


def _context(workdir: Path, product: dict[str, Any], log: _Log, **overrides: Any) -> RunContext:
    fields: dict[str, Any] = {
        "job_id": "t",
        "executor": "local",
        "type": None,
        "product": product,
        "workdir": workdir,
        "env": {**os.environ, "GREETING": "hi"},
        "job_env": {"GREETING": "hi"},
        "log": log.log,
        "clock": SystemClock(),
        "timeout": None,
        "kill_grace": 1.0,
        "cancel": threading.Event(),
    }
    fields.update(overrides)
    return RunContext(**fields)


# What each executor needs to succeed, print a line, and fail with exit code 3.
CONTRACT: dict[str, dict[str, dict[str, Any]]] = {
    "local": {
        "ok": {"commands": "echo contract-ok"},
        "fail": {"commands": ["echo before", "exit 3", "echo never"]},
        "hang": {"commands": "sleep 60"},
    },
    "custom": {
        "ok": {"script": "#!/bin/sh\necho contract-ok\n"},
        "fail": {"script": ["echo before", "exit 3"]},
        "hang": {"script": "sleep 60"},
    },
    "docker": {
        "ok": {"script": "echo contract-ok"},
        "fail": {"commands": ["echo before", "exit 3", "echo never"]},
        "hang": {"script": "sleep 60"},
    },
    "swarm": {
        "ok": {"script": "echo contract-ok"},
        "fail": {"commands": ["echo before", "exit 3", "echo never"]},
        "hang": {"script": "sleep 60"},
    },
    "ssh": {
        "ok": {"commands": "echo contract-ok"},
        "fail": {"commands": ["echo before", "exit 3", "echo never"]},
        "hang": {"commands": "sleep 60"},
    },
    # A command run by the guest agent of a VM on the fake Proxmox VE (what it prints and
    # returns is the fake's, set by Server.prepare).
    "proxmox": {
        "ok": {"command": ["echo"]},
        "fail": {"command": ["false"]},
        "hang": {"command": ["sleep"]},
    },
}


@dataclass(frozen=True)
class Server:
    """What points an executor at its real (or, for a vendor's API, fake) server."""

    product: dict[str, Any] = field(default_factory=dict)
    type: str | None = None
    prepare: Callable[[str], None] = lambda case: None  # before a case runs


def _proxmox(request: pytest.FixtureRequest) -> Server:
    fake: FakePVE = request.getfixturevalue("fake_pve")
    fake.add_guest(100, "qemu", status="running", config={"name": "vm100", "agent": "1"})
    outcomes = {
        "ok": AgentCommand(0, "contract-ok\n"),
        "fail": AgentCommand(3, "before\n"),
        "hang": AgentCommand(0, polls=1_000_000),
    }
    product = {
        "host": f"{fake.host}:{fake.port}", "node": "pve1", "vmid": 100, "ca_file": fake.ca_file,
        "token_id": fake.token_id, "token_secret": fake.token_secret,
    }  # fmt: skip
    return Server(
        product, "kvm_agent_exec", lambda case: fake.agent_commands.append(outcomes[case])
    )


SERVERS: dict[str, Callable[[pytest.FixtureRequest], Server]] = {
    "docker": lambda request: Server({"image": request.getfixturevalue("dockerd")}),
    "swarm": lambda request: Server({"image": request.getfixturevalue("swarm")}),
    "ssh": lambda request: Server(dict(request.getfixturevalue("sshd").product())),
    "proxmox": _proxmox,
}


@pytest.fixture
def fake_pve() -> Iterator[FakePVE]:
    with FakePVE() as server:
        server.task_polls = 0
        yield server
        assert server.violations == []


@dataclass(frozen=True)
class Contracted:
    """An executor under the contract, and the context of each case for it."""

    name: str
    instance: Executor
    server: Server

    def context(self, case: str, workdir: Path, log: _Log, **overrides: Any) -> RunContext:
        self.server.prepare(case)
        product = {**self.server.product, **CONTRACT[self.name][case]}
        return _context(workdir, product, log, type=self.server.type, **overrides)


@pytest.fixture(params=sorted(CONTRACT))
def executor(request: pytest.FixtureRequest) -> Contracted:
    registry = ExecutorRegistry.from_entry_points()
    server = SERVERS[request.param](request) if request.param in SERVERS else Server()
    return Contracted(request.param, registry.create(request.param), server)


# Executors that call a business API and run no program: they have no output to print and no
# exit code to give, so the cases above do not apply. Their part of the contract: a failure to
# reach their server is a retryable result, never an exception.
API_EXECUTORS: dict[str, tuple[str, dict[str, Any]]] = {
    "sevdesk": ("create_invoice", {"api_token": "t", "contact_id": 1, "invoice_data": {
        "invoice_date": "2026-11-22", "contact_person_id": 1,
        "positions": [{"name": "Hosting", "quantity": 1, "price": "9.99", "tax_rate": 19}],
    }}),
    "lexware": ("create_invoice", {"api_key": "k", "customer_id": "c", "invoice_data": {
        "voucherDate": "2026-11-22",
        "lineItems": [{"name": "Hosting", "quantity": 1,
                       "unitPrice": {"netAmount": "9.99", "taxRatePercentage": 19}}],
    }}),
}  # fmt: skip


def test_every_installed_executor_is_covered_by_the_contract() -> None:
    assert set(ExecutorRegistry.from_entry_points().names()) <= set(CONTRACT) | set(API_EXECUTORS)


@pytest.mark.parametrize("name", sorted(API_EXECUTORS))
def test_an_api_executor_that_cannot_reach_its_server_fails_retryably(
    name: str, tmp_path: Path
) -> None:
    type_, product = API_EXECUTORS[name]
    log = _Log()
    ctx = _context(
        tmp_path, {**product, "base_url": f"http://127.0.0.1:{free_port()}"}, log,
        executor=name, type=type_, timeout=5.0,
    )  # fmt: skip
    result = ExecutorRegistry.from_entry_points().create(name).run(ctx)
    assert not result.succeeded and result.error is not None
    assert result.retryable, result.error


def test_contract_success_output_and_exit_code(executor: Contracted, tmp_path: Path) -> None:
    log = _Log()
    result = executor.instance.run(executor.context("ok", tmp_path, log))
    assert result.succeeded and result.exit_code == 0
    assert any(line.endswith(" INFO contract-ok") for line in log.lines())


def test_contract_failure_is_a_result_not_an_exception(
    executor: Contracted, tmp_path: Path
) -> None:
    log = _Log()
    result = executor.instance.run(executor.context("fail", tmp_path, log))
    assert (result.exit_code, result.succeeded, result.error) == (3, False, "exit code 3")
    assert "never" not in log.text()


def test_contract_timeout_ends_the_attempt(executor: Contracted, tmp_path: Path) -> None:
    result = executor.instance.run(executor.context("hang", tmp_path, _Log(), timeout=0.3))
    assert result.timed_out and result.error == "timed out after 300ms"


def test_contract_cancel_ends_the_attempt(executor: Contracted, tmp_path: Path) -> None:
    cancel = threading.Event()
    spawned = threading.Event()
    ctx = executor.context(
        "hang", tmp_path, _Log(), cancel=cancel, on_start=lambda pid: spawned.set()
    )

    def cancel_once_spawned() -> None:
        if spawned.wait(10):
            cancel.set()

    threading.Thread(target=cancel_once_spawned).start()
    result = executor.instance.run(ctx)
    assert result.cancelled and result.error == "cancelled"


@pytest.mark.parametrize(
    "raised", [RuntimeError("boom"), SystemExit("boom"), KeyboardInterrupt("boom")],
    ids=["error", "sys.exit", "KeyboardInterrupt"],
)  # fmt: skip
def test_a_plugin_bug_fails_the_job_and_not_the_worker(
    tmp_path: Path, raised: BaseException
) -> None:
    class Broken(Executor):
        name = "broken"
        schema_resource = "local.schema.json"

        def execute(self, ctx: RunContext) -> ExecResult:
            raise raised

    log = _Log()
    result = Broken().run(_context(tmp_path, {}, log))
    assert not result.succeeded and "boom" in (result.error or "")
    assert "executor 'broken' failed unexpectedly" in log.text()


def test_local_stdout_is_info_and_stderr_is_error(tmp_path: Path) -> None:
    log = _Log()
    LocalExecutor().run(
        _context(tmp_path, {"commands": "echo out; echo err >&2; printf partial"}, log)
    )
    levels = {line.split(" ", 2)[2]: line.split(" ", 2)[1] for line in log.lines()}
    assert levels == {"out": "INFO", "err": "ERROR", "partial": "INFO"}


def test_local_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    marker = tmp_path / "child-pid"
    product = {"commands": f"sleep 60 & echo $! > {marker}; wait"}
    # Ample time for the child's start and its pid written first, on a loaded machine too.
    result = LocalExecutor().run(_context(tmp_path, product, _Log(), timeout=3.0))
    assert result.timed_out
    child = int(marker.read_text())
    # SIGKILL is delivered asynchronously; a zombie awaiting its reaper counts as gone.
    wait_for(lambda: not running(child), what="the background child to die")


def test_a_term_ignoring_job_is_killed_after_the_grace(tmp_path: Path) -> None:
    log = _Log()
    cancel = threading.Event()

    # Stopped once its trap is set (it says so), not after a time the shell may not get to it in.
    def cancel_once_ignoring() -> None:
        wait_for(lambda: "term-ignored" in log.text(), what="the job's trap")
        cancel.set()

    canceller = threading.Thread(target=cancel_once_ignoring, daemon=True)
    canceller.start()
    product = {"commands": "trap '' TERM; echo term-ignored; sleep 60"}
    result = LocalExecutor().run(_context(tmp_path, product, log, cancel=cancel, kill_grace=0.3))
    canceller.join(10)
    assert result.cancelled, log.text()
    assert "SIGKILL" in log.text()


def test_a_cancel_sends_sigterm_to_a_process_of_the_job_outside_its_group(tmp_path: Path) -> None:
    """Run without a supervisor's cgroup (a plugin's executor, ``spoold exec``), a cancel's
    SIGTERM reaches a process the job moved into a session of its own too, not only the job's
    process group: its trap runs, and nothing needs the SIGKILL of kill_grace."""
    log = _Log()
    cancel = threading.Event()
    heard = tmp_path / "heard-TERM"

    def cancel_once_ready() -> None:
        wait_for(lambda: "both-ready" in log.text(), what="the job's traps")
        cancel.set()

    canceller = threading.Thread(target=cancel_once_ready, daemon=True)
    canceller.start()
    ready = tmp_path / "escaper-ready"
    # The job waits (bounded) for its escaper to say it heard SIGTERM, then ends as a shell
    # would; an escaper never told would leave the job to end at the bound, heard not made.
    product = {
        "commands": (
            f'setsid sh -c \'trap ": > {heard}; exit 0" TERM; : > {ready}; '
            "sleep 60 & wait' &\n"
            f"n=0; until [ -e {ready} ] || [ $n -ge 400 ]; do sleep 0.05; n=$((n+1)); done\n"
            f"trap 'n=0; until [ -e {heard} ] || [ $n -ge 100 ]; do sleep 0.05; n=$((n+1)); "
            "done; exit 143' TERM\n"
            "echo both-ready\n"
            "sleep 60 & wait"
        )
    }
    result = LocalExecutor().run(_context(tmp_path, product, log, cancel=cancel, kill_grace=30.0))
    canceller.join(10)
    assert result.cancelled, log.text()
    assert heard.exists(), "the process outside the job's group got no SIGTERM"
    assert "after SIGTERM: SIGKILL" not in log.text(), log.text()


def test_a_job_killed_by_a_signal_says_which(tmp_path: Path) -> None:
    log = _Log()
    result = LocalExecutor().run(_context(tmp_path, {"commands": "kill -9 $$"}, log))
    assert (result.exit_code, result.error) == (-9, "killed by signal SIGKILL"), log.text()


def test_background_children_do_not_keep_a_finished_job_alive(tmp_path: Path) -> None:
    # The shell exits at once; its background child holds stdout open and must not block the job.
    result = LocalExecutor().run(
        _context(tmp_path, {"commands": "sleep 60 & echo started"}, _Log())
    )
    assert result.succeeded


def test_local_global_before_script_and_environment(tmp_path: Path) -> None:
    log = _Log()
    ctx = _context(
        tmp_path, {"commands": ["echo $GREETING $PREFIX"]}, log, before_script=("PREFIX=pre",)
    )
    assert LocalExecutor().run(ctx).succeeded
    assert "hi pre" in log.text()


def test_local_cwd_must_stay_inside_the_work_dir(tmp_path: Path) -> None:
    log = _Log()
    result = LocalExecutor().run(_context(tmp_path, {"commands": "pwd", "cwd": "../.."}, log))
    assert not result.succeeded and "leaves the job's work dir" in (result.error or "")


def test_custom_runs_by_interpreter_with_args(tmp_path: Path) -> None:
    log = _Log()
    product = {
        "script": "import sys; print('py', sys.argv[1:])",
        "interpreter": "python3",
        "args": ["a", "b"],
    }
    assert CustomExecutor().run(_context(tmp_path, product, log)).succeeded
    assert "py ['a', 'b']" in log.text()


def test_custom_before_script_runs_first(tmp_path: Path) -> None:
    log = _Log()
    ctx = _context(
        tmp_path, {"script": "#!/bin/sh\necho script\n"}, log, before_script=("echo before",)
    )
    assert CustomExecutor().run(ctx).succeeded
    assert log.text().splitlines() == ["before", "script"]


def _point(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group="spoold.executors")


class Abstract(Executor):  # forgets execute()
    name = "abstract"
    schema_resource = "local.schema.json"


class NoSchema(LocalExecutor):
    name = "noschema"
    schema_resource = "missing.schema.json"


def test_plugins_are_checked_when_loaded() -> None:
    local = "spoold.executors.local:LocalExecutor"
    with pytest.raises(PluginError, match="two executor plugins are named 'local'"):
        ExecutorRegistry.from_entry_points([_point("local", local), _point("local", "x.y:Z")])
    with pytest.raises(PluginError, match="abstract: it must implement execute"):
        ExecutorRegistry.from_entry_points([_point("abstract", f"{__name__}:Abstract")])
    registry = ExecutorRegistry.from_entry_points([_point("noschema", f"{__name__}:NoSchema")])
    with pytest.raises(PluginError, match="'noschema': cannot read its schema"):
        registry.schemas()


def test_a_registry_of_references_imports_each_executor_when_first_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a worker process gets from the daemon: names and classes, nothing imported yet."""
    (tmp_path / "lazy_plugin.py").write_text(
        "from spoold.executors.local import LocalExecutor\n"
        "class Later(LocalExecutor):\n    name = 'later'\n"
        "class Misnamed(LocalExecutor):\n    name = 'other'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lazy_plugin", raising=False)
    daemons = ExecutorRegistry.from_entry_points()
    references = (*daemons.references(), ("later", "lazy_plugin:Later"),
                  ("misnamed", "lazy_plugin:Misnamed"), ("gone", "no_such_module:X"))  # fmt: skip
    assert ("docker", "spoold.executors.docker:DockerExecutor") in references
    registry = ExecutorRegistry({}, references)
    assert registry.names() == sorted([*daemons.names(), "later", "misnamed", "gone"])
    assert "lazy_plugin" not in sys.modules, "nothing is imported before it is used"
    assert registry.get("later").__name__ == "Later"
    assert "lazy_plugin" in sys.modules
    assert registry.get("local") is daemons.get("local")
    assert registry.references() == tuple(sorted(references))
    with pytest.raises(PluginError, match=r"'gone' \(no_such_module:X\) failed to load"):
        registry.get("gone")
    with pytest.raises(PluginError, match="calls itself 'other'"):
        registry.get("misnamed")
    with pytest.raises(PluginError, match="unknown executor 'nope'"):
        registry.get("nope")


def test_an_executor_checks_what_its_schema_cannot(tmp_path: Path) -> None:
    checker = job_validator(ExecutorRegistry.from_entry_points())
    text = (
        b"executor: ssh\nsteps:\n  - {id: s, product: {host: h, commands: x, keyfile: id_rsa}}\n"
        b"  - {id: a, executor: docker, product: {image: x, script: y, mounts: ['./d:/a', 'v:/a/']}}\n"
    )
    assert [(i.path, i.message) for i in checker.check(text, "a.yaml")] == [
        ("steps[0].product", "keyfile: id_rsa is a relative path: give an absolute one (or ~/...)"),
        (
            "steps[1].product",
            "mounts: ./d is a relative path: give an absolute one or a volume name",
        ),
        ("steps[1].product", "mounts: /a/ is mounted twice"),
    ]
    assert (
        checker.check(b"executor: ssh\nproduct: {host: h, commands: x, keyfile: ~/k}\n", "b") == []
    )
