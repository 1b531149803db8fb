"""The proxmox executor against the fake Proxmox VE, which checks every request against the
vendor's API description (``fake.violations``)."""

from __future__ import annotations

import dataclasses
import io
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from spoold.executors.base import ExecResult
from spoold.executors.proxmox import SHORTCUTS, ProxmoxExecutor

from tests.fake_pve import AgentCommand, FakePVE
from tests.test_executors import _context, _Log

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def fake() -> Iterator[FakePVE]:
    with FakePVE(nodes=("pve1", "pve2")) as server:
        server.task_polls = 0  # tasks end at once unless a test says otherwise
        yield server


def _product(fake: FakePVE, **extra: Any) -> dict[str, Any]:
    return {
        "host": f"{fake.host}:{fake.port}",
        "node": "pve1",
        "token_id": fake.token_id,
        "token_secret": fake.token_secret,
        "ca_file": fake.ca_file,
        **extra,
    }


def _run(
    fake: FakePVE, tmp_path: Path, type_: str | None, product: dict[str, Any], **ctx: Any
) -> tuple[ExecResult, _Log]:
    log = _Log()
    context = _context(
        tmp_path, _product(fake, **product), log, executor="proxmox", type=type_, **ctx
    )
    return ProxmoxExecutor().run(context), log


def _agent_vm(fake: FakePVE) -> None:
    fake.add_guest(100, "qemu", status="running", config={"name": "vm100", "agent": "1"})


# type, product, the request that does the work (method, apidata template), a check of the fake.
CASES: list[tuple[str, dict[str, Any], tuple[str, str]]] = [
    ("kvm_list", {}, ("GET", "/nodes/{node}/qemu")),
    ("lxc_list", {}, ("GET", "/nodes/{node}/lxc")),
    ("kvm_create", {"vmid": 200, "params": {"name": "web", "memory": 1024}},
     ("POST", "/nodes/{node}/qemu")),
    ("lxc_create",
     {"vmid": 201, "params": {"hostname": "ct1", "ostemplate": "local:vztmpl/debian-12.tar.zst",
                              "unprivileged": True}},
     ("POST", "/nodes/{node}/lxc")),
    ("kvm_status", {"vmid": 100}, ("GET", "/nodes/{node}/qemu/{vmid}/status/current")),
    ("lxc_status", {"vmid": 101}, ("GET", "/nodes/{node}/lxc/{vmid}/status/current")),
    ("kvm_start", {"vmid": 100}, ("POST", "/nodes/{node}/qemu/{vmid}/status/start")),
    ("lxc_start", {"vmid": 101}, ("POST", "/nodes/{node}/lxc/{vmid}/status/start")),
    ("kvm_stop", {"vmid": 102}, ("POST", "/nodes/{node}/qemu/{vmid}/status/stop")),
    ("lxc_stop", {"vmid": 103}, ("POST", "/nodes/{node}/lxc/{vmid}/status/stop")),
    ("kvm_shutdown", {"vmid": 102}, ("POST", "/nodes/{node}/qemu/{vmid}/status/shutdown")),
    ("lxc_shutdown", {"vmid": 103}, ("POST", "/nodes/{node}/lxc/{vmid}/status/shutdown")),
    ("kvm_delete", {"vmid": 100, "params": {"purge": True}}, ("DELETE", "/nodes/{node}/qemu/{vmid}")),
    ("lxc_delete", {"vmid": 101}, ("DELETE", "/nodes/{node}/lxc/{vmid}")),
    ("kvm_config", {"vmid": 100}, ("GET", "/nodes/{node}/qemu/{vmid}/config")),
    ("lxc_config", {"vmid": 101, "params": {"memory": 2048}},
     ("PUT", "/nodes/{node}/lxc/{vmid}/config")),
    ("kvm_clone", {"vmid": 100, "newid": 300, "params": {"name": "copy", "full": True}},
     ("POST", "/nodes/{node}/qemu/{vmid}/clone")),
    ("lxc_clone", {"vmid": 101, "params": {"hostname": "copy"}},
     ("POST", "/nodes/{node}/lxc/{vmid}/clone")),
    ("kvm_migrate", {"vmid": 100, "params": {"target": "pve2", "online": True}},
     ("POST", "/nodes/{node}/qemu/{vmid}/migrate")),
    ("lxc_migrate", {"vmid": 101, "params": {"target": "pve2"}},
     ("POST", "/nodes/{node}/lxc/{vmid}/migrate")),
    ("kvm_resize", {"vmid": 100, "params": {"disk": "scsi0", "size": "+1G"}},
     ("PUT", "/nodes/{node}/qemu/{vmid}/resize")),
    ("lxc_resize", {"vmid": 101, "params": {"disk": "rootfs", "size": "16G"}},
     ("PUT", "/nodes/{node}/lxc/{vmid}/resize")),
    ("kvm_snapshot", {"vmid": 100, "snapname": "before_upgrade", "params": {"vmstate": False}},
     ("POST", "/nodes/{node}/qemu/{vmid}/snapshot")),
    ("lxc_snapshot", {"vmid": 101, "snapshot": "s1", "params": {"description": "nightly"}},
     ("POST", "/nodes/{node}/lxc/{vmid}/snapshot")),
    ("kvm_snapshot", {"vmid": 100, "snapshot_action": "list"},
     ("GET", "/nodes/{node}/qemu/{vmid}/snapshot")),
    ("kvm_snapshot", {"vmid": 100, "snapname": "s1", "snapshot_action": "rollback"},
     ("POST", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}/rollback")),
    ("lxc_snapshot", {"vmid": 101, "snapname": "s1", "snapshot_action": "delete"},
     ("DELETE", "/nodes/{node}/lxc/{vmid}/snapshot/{snapname}")),
    ("kvm_firewall", {"vmid": 100}, ("GET", "/nodes/{node}/qemu/{vmid}/firewall/rules")),
    ("lxc_firewall",
     {"vmid": 101, "rule": {"type": "in", "action": "ACCEPT", "proto": "tcp", "dport": "22",
                            "enable": 1}},
     ("POST", "/nodes/{node}/lxc/{vmid}/firewall/rules")),
    ("kvm_metrics", {"vmid": 100}, ("GET", "/nodes/{node}/qemu/{vmid}/rrddata")),
    ("lxc_metrics", {"vmid": 101, "timeframe": "day", "params": {"cf": "MAX"}},
     ("GET", "/nodes/{node}/lxc/{vmid}/rrddata")),
    ("kvm_agent_exec", {"vmid": 100, "command": ["uname", "-a"]},
     ("POST", "/nodes/{node}/qemu/{vmid}/agent/exec")),
    ("kvm_vncproxy", {"vmid": 100}, ("POST", "/nodes/{node}/qemu/{vmid}/vncproxy")),
    ("lxc_vncproxy", {"vmid": 101}, ("POST", "/nodes/{node}/lxc/{vmid}/vncproxy")),
    ("kvm_vncwebsocket", {"vmid": 100}, ("GET", "/nodes/{node}/qemu/{vmid}/vncwebsocket")),
    ("lxc_vncwebsocket", {"vmid": 101}, ("GET", "/nodes/{node}/lxc/{vmid}/vncwebsocket")),
]  # fmt: skip


def test_the_cases_cover_every_shortcut_but_lxc_agent_exec() -> None:
    assert {case[0] for case in CASES} == set(SHORTCUTS) - {"lxc_agent_exec"}


@pytest.mark.parametrize(
    ("type_", "product", "request_"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_each_shortcut_makes_allowed_calls(
    fake: FakePVE,
    tmp_path: Path,
    type_: str,
    product: dict[str, Any],
    request_: tuple[str, str],
) -> None:
    fake.add_guest(100, "qemu", status="running", config={"name": "vm100", "agent": "1",
                                                            "scsi0": "local:vm-100-disk-0"})  # fmt: skip
    fake.add_guest(101, "lxc", status="stopped", config={"hostname": "ct101"})
    fake.add_guest(102, "qemu", status="running", config={"name": "vm102"})
    fake.add_guest(103, "lxc", status="running", config={"hostname": "ct103"})
    if type_ == "kvm_start":
        fake.guests["pve1"][100].status = "stopped"
    if type_ == "kvm_delete":
        fake.guests["pve1"][100].status = "stopped"
    if "snapshot_action" in product and product["snapshot_action"] != "list":
        fake.guests["pve1"][int(product["vmid"])].snapshots["s1"] = {"description": ""}
    result, log = _run(fake, tmp_path, type_, product)
    assert result.succeeded, (result.error, log.text())
    assert fake.violations == []
    assert fake.auth_failures == []
    assert len(fake.requests_to(*request_)) == 1
    assert result.result["node"] == "pve1"
    if "vmid" in product:
        assert result.result["vmid"] == product["vmid"]
    upid = result.result.get("upid")
    if upid is not None and "vnc" not in type_:
        assert result.result["exitstatus"] == "OK"
        assert "task: TASK OK" in log.text()
    if type_.endswith(("_list", "_status", "_config", "_metrics", "_firewall")) and (
        request_[0] == "GET"
    ):
        assert "data" in result.result
    assert "PVEVNC:" not in log.text() + repr(result.result)  # the console ticket is a secret
    assert fake.token_secret not in log.text()


def test_create_and_clone_leave_what_they_made(fake: FakePVE, tmp_path: Path) -> None:
    fake.add_guest(100, "qemu", config={"name": "tmpl", "template": "1"})
    result, _ = _run(fake, tmp_path, "lxc_create", {
        "params": {"hostname": "auto", "ostemplate": "local:vztmpl/d.tar.zst"}})  # fmt: skip
    assert result.succeeded and result.result["vmid"] == 101  # the next free one
    assert fake.find_guest(101) is not None
    assert fake.requests_to("GET", "/cluster/nextid")
    result, _ = _run(fake, tmp_path, "kvm_clone", {"vmid": 100, "params": {"name": "c"}})
    assert result.succeeded and result.result["newid"] == 102
    found = fake.find_guest(102)
    assert found is not None and found[1].name == "c" and found[1].lock is None
    assert fake.violations == []


def test_a_task_is_polled_until_it_stops(fake: FakePVE, tmp_path: Path) -> None:
    fake.add_guest(100, "qemu")
    fake.task_polls = 4
    result, _ = _run(fake, tmp_path, "kvm_start", {"vmid": 100})
    assert result.succeeded
    polls = fake.requests_to("GET", "/nodes/{node}/tasks/{upid}/status")
    assert len(polls) == 5
    assert result.result["upid"].startswith("UPID:pve1:")
    assert fake.guests["pve1"][100].status == "running"
    assert fake.violations == []


def test_a_failed_task_fails_the_job_with_its_exit_status(fake: FakePVE, tmp_path: Path) -> None:
    fake.add_guest(100, "qemu")
    fake.fail_next_task = "start failed: QEMU exited with code 1"
    result, log = _run(fake, tmp_path, "kvm_start", {"vmid": 100})
    assert not result.succeeded and result.exit_code == 1
    assert result.error == "proxmox task qmstart failed: start failed: QEMU exited with code 1"
    assert result.result["exitstatus"] == "start failed: QEMU exited with code 1"
    assert "task: TASK ERROR: start failed" in log.text()
    assert fake.violations == []


def test_warnings_are_a_success_with_a_log_line(fake: FakePVE, tmp_path: Path) -> None:
    fake.add_guest(100, "qemu")
    fake.fail_next_task = "WARNINGS: 2"
    result, log = _run(fake, tmp_path, "kvm_start", {"vmid": 100})
    assert result.succeeded and result.result["exitstatus"] == "WARNINGS: 2"
    assert "ended with WARNINGS: 2" in log.text()


def test_a_create_run_twice_creates_once(fake: FakePVE, tmp_path: Path) -> None:
    product = {"vmid": 200, "params": {"name": "web", "memory": 1024}}
    first, _ = _run(fake, tmp_path, "kvm_create", product)
    second, log = _run(fake, tmp_path, "kvm_create", product)
    assert first.succeeded and first.result["upid"] and first.result["created"] is True
    assert second.succeeded and second.result["created"] is False
    assert "vmid 200 already exists" in log.text()
    assert len(fake.requests_to("POST", "/nodes/{node}/qemu")) == 1
    assert fake.violations == []


def test_a_retry_after_a_lost_answer_adopts_the_guest(fake: FakePVE, tmp_path: Path) -> None:
    fake.crash_after_create = True
    product = {"vmid": 201, "params": {"hostname": "ct", "ostemplate": "local:vztmpl/d.tar.zst"}}
    first, _ = _run(fake, tmp_path, "lxc_create", product)
    assert not first.succeeded and first.retryable
    second, _ = _run(fake, tmp_path, "lxc_create", product)
    assert second.succeeded and second.result["created"] is False
    assert len(fake.requests_to("POST", "/nodes/{node}/lxc")) == 1


def test_a_create_over_someone_elses_vmid_fails(fake: FakePVE, tmp_path: Path) -> None:
    fake.add_guest(200, "qemu", config={"name": "database"})
    result, _ = _run(fake, tmp_path, "kvm_create", {"vmid": 200, "params": {"name": "web"}})
    assert not result.succeeded
    assert "vmid 200 already exists" in (result.error or "")
    assert fake.requests_to("POST", "/nodes/{node}/qemu") == []
    result, _ = _run(fake, tmp_path, "lxc_create", {
        "vmid": 200, "params": {"ostemplate": "local:vztmpl/d.tar.zst"}})  # fmt: skip
    assert "vmid 200 already exists" in (result.error or "")  # a VM, not a container


def test_agent_exec_output_and_exit_code(fake: FakePVE, tmp_path: Path) -> None:
    _agent_vm(fake)
    fake.agent_commands.append(
        AgentCommand(exitcode=3, out="hello\nworld\n", err="oops\n", polls=2)
    )
    result, log = _run(fake, tmp_path, "kvm_agent_exec", {
        "vmid": 100, "command": ["sh", "-c", "echo hello; echo world; echo oops >&2; exit 3"]})  # fmt: skip
    assert (result.exit_code, result.error) == (3, "exit code 3")
    lines = log.lines()
    assert any(line.endswith(" INFO hello") for line in lines)
    assert any(line.endswith(" INFO world") for line in lines)
    assert any(line.endswith(" ERROR oops") for line in lines)
    sent = fake.requests_to("POST", "/nodes/{node}/qemu/{vmid}/agent/exec")[0]
    assert sent.params["command"] == ["sh", "-c", "echo hello; echo world; echo oops >&2; exit 3"]
    assert len(fake.requests_to("GET", "/nodes/{node}/qemu/{vmid}/agent/exec-status")) == 3
    assert fake.violations == []


def test_lxc_agent_exec_fails_clearly(fake: FakePVE, tmp_path: Path) -> None:
    result, _ = _run(fake, tmp_path, "lxc_agent_exec", {"vmid": 101, "command": ["true"]})
    assert not result.succeeded and "no guest agent for containers" in (result.error or "")
    assert fake.requests == []


def test_vncproxy_ticket_goes_only_into_the_ticket_file(fake: FakePVE, tmp_path: Path) -> None:
    _agent_vm(fake)
    result, log = _run(fake, tmp_path, "kvm_vncwebsocket", {"vmid": 100, "ticket_file": "t/vnc"})
    assert result.succeeded and result.result["port"] == "5900"
    ticket = (tmp_path / "t" / "vnc").read_text().strip()
    assert ticket.startswith("PVEVNC:") and (tmp_path / "t" / "vnc").stat().st_mode & 0o077 == 0
    assert ticket not in log.text() + repr(result.result)
    assert result.result["websocket_url"].endswith("vncwebsocket?port=5900&vncticket=<ticket>")


@pytest.mark.parametrize("stop", ["timeout", "cancel"])
def test_a_long_task_is_stopped_on_timeout_or_cancel(
    fake: FakePVE, tmp_path: Path, stop: str
) -> None:
    fake.add_guest(100, "qemu")
    fake.task_polls = 10_000
    cancel = threading.Event()
    if stop == "cancel":  # once the task is polled: it was started, and its UPID is known

        def cancel_at_a_poll(method: str, template: str) -> None:
            if (method, template) == ("GET", "/nodes/{node}/tasks/{upid}/status"):
                cancel.set()

        fake.on_request = cancel_at_a_poll
    # The timeout counts from before the TLS connect and the task's start, which a loaded
    # machine may take a second or more for: the task must be running when it runs out.
    result, log = _run(fake, tmp_path, "kvm_start", {"vmid": 100},
                       timeout=5.0 if stop == "timeout" else None, cancel=cancel)  # fmt: skip
    assert result.timed_out == (stop == "timeout") and result.cancelled == (stop == "cancel")
    assert result.error == ("timed out after 5s" if stop == "timeout" else "cancelled")
    assert len(fake.requests_to("DELETE", "/nodes/{node}/tasks/{upid}")) == 1
    assert "stopping task UPID:" in log.text()
    assert fake.violations == []


def test_the_raw_api_command(fake: FakePVE, tmp_path: Path) -> None:
    fake.add_guest(100, "qemu")
    result, _ = _run(fake, tmp_path, None, {
        "vmid": 100, "api_command": "POST /nodes/{node}/qemu/{vmid}/status/start",
        "api_params": {"skiplock": False}})  # fmt: skip
    assert result.succeeded and result.result["exitstatus"] == "OK"
    assert fake.guests["pve1"][100].status == "running"
    result, _ = _run(fake, tmp_path, None, {
        "api_command": "GET /cluster/resources", "api_params": {"type": "vm"}})  # fmt: skip
    assert result.succeeded and result.result["data"][0]["vmid"] == 100
    result, _ = _run(fake, tmp_path, None, {"api_command": "GET /nodes/{node}/no-such-thing"})
    assert not result.succeeded and "501" in (result.error or "")
    assert len(fake.violations) == 1  # that one, on purpose


@pytest.mark.filterwarnings(
    "ignore::urllib3.exceptions.InsecureRequestWarning"
)  # verify_tls: false
def test_tls_is_verified_and_pinned(fake: FakePVE, tmp_path: Path) -> None:
    def run(**tls: Any) -> tuple[ExecResult, _Log]:
        product = {**_product(fake, **tls), "vmid": 100}
        product.pop("ca_file") if "ca_file" not in tls else None
        log = _Log()
        ctx = _context(tmp_path, product, log, executor="proxmox", type="kvm_list")
        return ProxmoxExecutor().run(ctx), log

    result, _ = run()
    assert not result.succeeded and "is not trusted" in (result.error or "")
    result, _ = run(fingerprint=fake.fingerprint)
    assert result.succeeded
    wrong = ":".join(["AB"] * 32)
    result, _ = run(fingerprint=wrong)
    assert not result.succeeded and "is not trusted" in (result.error or "")
    result, log = run(verify_tls=False)
    assert result.succeeded and "TLS verification is OFF" in log.text()
    assert fake.violations == []


def test_a_bad_token_and_an_unreachable_host_are_clear(fake: FakePVE, tmp_path: Path) -> None:
    result, _ = _run(fake, tmp_path, "kvm_list", {"token_secret": "wrong"})
    assert "401" in (result.error or "") and "check token_id and token_secret" in (
        result.error or ""
    )
    assert "wrong" not in (result.error or "")
    result, _ = _run(fake, tmp_path, "kvm_list", {"host": "127.0.0.1:1"})
    assert (result.error or "").startswith("proxmox: cannot reach 127.0.0.1:1")
    assert result.retryable


@pytest.mark.parametrize(
    ("product", "problem"),
    [
        ({"ca_file": "/a", "fingerprint": "x"}, "ca_file and fingerprint: give one of them"),
        ({"fingerprint": "x", "verify_tls": False}, "verify_tls: false contradicts fingerprint"),
        ({"ca_file": "ca.pem"}, "ca_file: ca.pem is a relative path"),
        ({"api_command": "START vm"}, "is not 'METHOD /path'"),
        ({"api_command": "GET /nodes/{node}/qemu/{vmid}"}, "{vmid} is used but vmid is not given"),
        ({"api_command": "GET /nodes/{node}/{x}"}, "only {node} and {vmid} are filled in"),
    ],
)
def test_validate_says_what_the_schema_cannot(product: dict[str, Any], problem: str) -> None:
    problems = ProxmoxExecutor.validate({"node": "pve1", **product})
    assert any(problem in p for p in problems), problems


def test_an_unknown_type_names_the_shortcuts(fake: FakePVE, tmp_path: Path) -> None:
    result, _ = _run(fake, tmp_path, "kvm_explode", {"vmid": 100})
    assert "unknown type 'kvm_explode'" in (result.error or "")
    assert "kvm_vncwebsocket" in (result.error or "")


def test_a_clone_to_another_node_run_twice_clones_once(fake: FakePVE, tmp_path: Path) -> None:
    fake.add_guest(100, "qemu", config={"name": "tmpl"})
    product = {"vmid": 100, "newid": 300, "params": {"name": "copy", "target": "pve2"}}
    first, _ = _run(fake, tmp_path, "kvm_clone", product)
    second, _ = _run(fake, tmp_path, "kvm_clone", product)
    assert first.succeeded and second.succeeded and second.result["created"] is False
    assert len(fake.requests_to("POST", "/nodes/{node}/qemu/{vmid}/clone")) == 1
    assert fake.violations == []


@pytest.mark.parametrize(
    ("type_", "product", "problem"),
    [
        ("kvm_agent_exec", {"vmid": 100}, "kvm_agent_exec needs command"),
        ("kvm_status", {}, "kvm_status needs vmid"),
        ("kvm_status", {"vmid": 100, "node": "pve1/../x"}, "node 'pve1/../x' is not a valid"),
        ("kvm_snapshot", {"vmid": 100}, "kvm_snapshot needs snapname"),
        ("lxc_create", {"vmid": 200}, "lxc_create needs params.ostemplate"),
        ("kvm_list", {"api_command": "GET /version"}, "type 'kvm_list' and api_command exclude"),
    ],
)
def test_what_a_shortcut_lacks_is_named(
    fake: FakePVE, tmp_path: Path, type_: str, product: dict[str, Any], problem: str
) -> None:
    result, _ = _run(fake, tmp_path, type_, product)
    assert not result.succeeded and problem in (result.error or "")
    assert fake.requests == []


def test_without_proxmoxer_the_error_names_the_extra(
    fake: FakePVE, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "proxmoxer", None)
    result, _ = _run(fake, tmp_path, "kvm_list", {})
    assert "pip install spoold[proxmox]" in (result.error or "")


def _attempts(
    fake: FakePVE, tmp_path: Path, type_: str, product: dict[str, Any], log: _Log, **ctx: Any
) -> ExecResult:
    """One attempt of a job whose attempts share ``log``, which each reads back, as the
    daemon's job log."""
    context = _context(
        tmp_path, _product(fake, **product), log, executor="proxmox", type=type_,
        read_log=lambda: io.BytesIO(log.buffer.getvalue()), **ctx,
    )  # fmt: skip
    return ProxmoxExecutor().run(context)


def test_a_create_without_vmid_whose_answer_was_lost_is_not_made_twice(
    fake: FakePVE, tmp_path: Path
) -> None:
    fake.crash_after_create = True
    log, product = _Log(), {"params": {"name": "web", "memory": 1024}}
    first = _attempts(fake, tmp_path, "kvm_create", product, log)
    assert not first.succeeded and first.retryable
    second = _attempts(fake, tmp_path, "kvm_create", product, log)
    assert second.succeeded and second.result["created"] is False
    assert second.result["vmid"] == 100
    assert len(fake.requests_to("POST", "/nodes/{node}/qemu")) == 1
    assert list(fake.guests["pve1"]) == [100]
    assert fake.guests["pve1"][100].config["description"] == "spoold-job: t"
    assert fake.violations == []


def test_a_noted_vmid_someone_else_took_is_not_adopted(fake: FakePVE, tmp_path: Path) -> None:
    log = _Log()
    log.log.info("proxmox: vmid 100 is taken for the guest this unit creates (the next free one)")
    fake.add_guest(100, "qemu", config={"name": "theirs"})  # the first create never came
    result = _attempts(fake, tmp_path, "kvm_create", {"params": {"name": "web"}}, log)
    assert result.succeeded and result.result["created"] is True and result.result["vmid"] == 101
    assert fake.guests["pve1"][100].config == {"name": "theirs"}


def test_without_a_job_log_a_lost_create_says_the_guest_may_exist(
    fake: FakePVE, tmp_path: Path
) -> None:
    fake.crash_after_create = True
    result, _ = _run(fake, tmp_path, "kvm_create", {"params": {"name": "web"}})
    assert not result.succeeded and not result.retryable
    assert "qemu 100 may have been made" in (result.error or "")


def test_a_guest_without_this_jobs_mark_is_not_adopted(fake: FakePVE, tmp_path: Path) -> None:
    # Same vmid, type and node, no name given: nothing says it is this job's.
    fake.add_guest(200, "qemu", config={"name": "database"})
    result, _ = _run(fake, tmp_path, "kvm_create", {"vmid": 200})
    assert not result.succeeded and "vmid 200 already exists" in (result.error or "")
    assert "it is taken, and not by this job" in (result.error or "")
    # ...nor one another job made, nor one of another step of this job.
    fake.add_guest(201, "qemu", config={"description": "notes\nspoold-job: other"})
    result, _ = _run(fake, tmp_path, "kvm_create", {"vmid": 201})
    assert "vmid 201 already exists" in (result.error or "")
    assert fake.requests_to("POST", "/nodes/{node}/qemu") == []


class _EndlessLog(FakePVE):
    """A task log that answers the same full page whatever is asked."""

    def _task_log(self, upid: str, p: dict[str, str]) -> list[dict[str, Any]]:
        return [{"n": i + 1, "t": f"line {i}"} for i in range(500)]


class _LongLog(FakePVE):
    """A task log of fresh lines without end."""

    def _task_log(self, upid: str, p: dict[str, str]) -> list[dict[str, Any]]:
        start = int(p.get("start", 0))
        return [{"n": start + i + 1, "t": f"line {start + i}"} for i in range(500)]


@pytest.mark.parametrize("server", [_EndlessLog, _LongLog])
def test_a_task_log_without_end_is_copied_within_bounds(
    server: type[FakePVE], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("spoold.executors.proxmox._MAX_LOG_LINES", 2000)
    with server(nodes=("pve1",)) as fake:
        fake.task_polls = 0
        fake.add_guest(100, "qemu")
        done: list[ExecResult] = []
        log = _Log()
        context = _context(tmp_path, _product(fake, vmid=100), log, executor="proxmox",
                           type="kvm_start")  # fmt: skip
        thread = threading.Thread(target=lambda: done.append(ProxmoxExecutor().run(context)))
        thread.daemon = True
        thread.start()
        thread.join(30)
        assert not thread.is_alive(), "still copying the task log"
        assert done[0].succeeded
        copied = log.text().count("task: line ")
        if server is _EndlessLog:
            assert copied == 500  # the page once: asked again, it brought nothing new
        else:
            assert copied == 2000 and "the task log is longer than 2000 lines" in log.text()


def test_a_guest_of_this_job_still_being_made_is_waited_for(fake: FakePVE, tmp_path: Path) -> None:
    guest = fake.add_guest(200, "qemu", config={"description": "spoold-job: t"})
    guest.lock = "create"
    result, _ = _run(fake, tmp_path, "kvm_create", {"vmid": 200})
    assert not result.succeeded and result.retryable
    assert "vmid 200 is still being made by an earlier attempt" in (result.error or "")
    fake.add_guest(201, "qemu").lock = "create"  # whose, its description cannot say yet
    result, _ = _run(fake, tmp_path, "kvm_create", {"vmid": 201})
    assert result.retryable and "whether by this job its description says" in (result.error or "")
    assert fake.requests_to("POST", "/nodes/{node}/qemu") == []


@pytest.mark.parametrize(
    "description",
    ["spoold-job: t2", "spoold-job: tx step build", "spoold-job: t step build", "x spoold-job: t"],
)
def test_only_this_units_own_line_makes_a_guest_its_own(
    fake: FakePVE, tmp_path: Path, description: str
) -> None:
    """The mark is a whole line: another job whose id begins with this one's, another step of
    this job, a line that merely mentions it, none of them made this guest."""
    fake.add_guest(200, "qemu", config={"name": "theirs", "description": description})
    result, _ = _run(fake, tmp_path, "kvm_create", {"vmid": 200, "params": {"name": "web"}})
    assert not result.succeeded and "vmid 200 already exists" in (result.error or "")
    assert fake.requests_to("POST", "/nodes/{node}/qemu") == []
    assert fake.guests["pve1"][200].config["name"] == "theirs"


def test_a_locked_guest_fails_retryably_and_a_real_refusal_does_not(
    fake: FakePVE, tmp_path: Path
) -> None:
    """Proxmox answers 500 for both: a lock (a backup runs) passes, a guest already running
    stays so."""
    fake.add_guest(100, "qemu").lock = "backup"
    result, _ = _run(fake, tmp_path, "kvm_start", {"vmid": 100})
    assert not result.succeeded and "500" in (result.error or "") and result.retryable
    fake.guests["pve1"][100].lock = None
    fake.guests["pve1"][100].status = "running"
    result, _ = _run(fake, tmp_path, "kvm_start", {"vmid": 100})
    assert not result.succeeded and "already running" in (result.error or "")
    assert not result.retryable


def test_a_create_in_a_step_finds_its_noted_vmid_again(fake: FakePVE, tmp_path: Path) -> None:
    """In a step, the note of the vmid is in the step's section of the job's log: the step's
    retry reads it there, and creates no second guest."""
    fake.crash_after_create = True
    log, product = _Log(), {"params": {"name": "web"}}

    def attempt() -> ExecResult:
        context = _context(
            tmp_path, _product(fake, **product), log, executor="proxmox", type="kvm_create",
            read_log=lambda: io.BytesIO(log.buffer.getvalue()),
        )  # fmt: skip
        return ProxmoxExecutor().run(dataclasses.replace(context, log=log.log.section("deploy")))

    first = attempt()
    assert not first.succeeded and first.retryable
    second = attempt()
    assert second.succeeded and second.result["created"] is False, log.text()
    assert second.result["vmid"] == 100
    assert list(fake.guests["pve1"]) == [100]
    assert fake.guests["pve1"][100].config["description"] == "spoold-job: t step deploy"
    assert len(fake.requests_to("POST", "/nodes/{node}/qemu")) == 1
    assert fake.violations == []
