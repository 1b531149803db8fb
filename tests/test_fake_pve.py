"""Tests of the fake Proxmox VE API server itself (tests/fake_pve.py)."""

from __future__ import annotations

import hashlib
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.fake_pve import AgentCommand, FakePVE, check_value

pytestmark = [pytest.mark.timeout(30)]

NODE = "pve1"


@pytest.fixture
def fake() -> Iterator[FakePVE]:
    with FakePVE(nodes=(NODE, "pve2")) as f:
        yield f


class Client:
    def __init__(self, fake: FakePVE, token: str | None = None) -> None:
        self.fake = fake
        self.s = requests.Session()
        self.s.headers["Authorization"] = token or fake.auth_header

    def call(self, method: str, path: str, **kw: Any) -> requests.Response:
        # verify per request: a Session.verify is overridden by $REQUESTS_CA_BUNDLE.
        return self.s.request(
            method, self.fake.url + path, timeout=5, verify=self.fake.ca_file, **kw
        )

    def data(self, method: str, path: str, **kw: Any) -> Any:
        r = self.call(method, path, **kw)
        assert r.status_code == 200, (r.status_code, r.reason, r.text)
        return r.json()["data"]

    def wait(self, upid: str, polls: int = 20) -> dict[str, Any]:
        for _ in range(polls):
            st = self.data("GET", f"/nodes/{NODE}/tasks/{upid}/status")
            if st["status"] == "stopped":
                return dict(st)
        raise AssertionError("task did not stop")


@pytest.fixture
def c(fake: FakePVE) -> Iterator[Client]:
    client = Client(fake)
    yield client
    # A connection kept alive holds one of the fake's handler threads in a read until it closes.
    client.s.close()


LXC_CREATE = {
    "vmid": "4711",
    "ostemplate": "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst",
    "hostname": "job-4711",
    "memory": "512",
    "net0": "name=eth0,bridge=vmbr0,ip=dhcp",
    "rootfs": "local-lvm:8",
    "unprivileged": "1",
    "start": "1",
}


def test_create_task_runs_then_stops(fake: FakePVE, c: Client) -> None:
    fake.task_polls = 2
    assert c.data("GET", "/cluster/nextid") == 100
    upid = c.data("POST", f"/nodes/{NODE}/lxc", data=LXC_CREATE)
    assert upid.startswith(f"UPID:{NODE}:") and upid.endswith(f":vzcreate:4711:{fake.token_id}:")
    assert len(upid.split(":")) == 9
    states = [c.data("GET", f"/nodes/{NODE}/tasks/{upid}/status")["status"] for _ in range(3)]
    assert states == ["running", "running", "stopped"]
    st = c.data("GET", f"/nodes/{NODE}/tasks/{upid}/status")
    assert st["exitstatus"] == "OK" and st["type"] == "vzcreate" and st["id"] == "4711"
    log = c.data("GET", f"/nodes/{NODE}/tasks/{upid}/log")
    assert log[-1] == {"n": len(log), "t": "TASK OK"}
    cur = c.data("GET", f"/nodes/{NODE}/lxc/4711/status/current")
    assert cur["status"] == "running" and cur["name"] == "job-4711"
    assert [g["vmid"] for g in c.data("GET", f"/nodes/{NODE}/lxc")] == [4711]
    assert c.data("GET", "/cluster/nextid") == 100
    # A second create with the same vmid fails the way PVE does.
    r = c.call("POST", f"/nodes/{NODE}/lxc", data=LXC_CREATE)
    assert r.status_code == 500 and r.reason == f"CT 4711 already exists on node '{NODE}'"
    # Stop and destroy.
    c.wait(c.data("POST", f"/nodes/{NODE}/lxc/4711/status/stop"))
    c.wait(c.data("DELETE", f"/nodes/{NODE}/lxc/4711", params={"purge": "1"}))
    assert fake.find_guest(4711) is None
    assert fake.violations == []
    assert [r.template for r in fake.requests_to("POST", "/nodes/{node}/lxc")] == [
        "/nodes/{node}/lxc"
    ] * 2


def test_failed_task_and_config(fake: FakePVE, c: Client) -> None:
    fake.task_polls = 0
    fake.add_guest(200, "qemu", config={"name": "vm", "agent": "1", "memory": "1024"})
    c.data("PUT", f"/nodes/{NODE}/qemu/200/config", data={"cores": "2", "delete": "memory"})
    conf = c.data("GET", f"/nodes/{NODE}/qemu/200/config")
    assert conf["cores"] == "2" and "memory" not in conf and "digest" in conf
    upid = c.data("POST", f"/nodes/{NODE}/qemu/200/config", data={"onboot": "1"})
    assert c.wait(upid)["exitstatus"] == "OK"
    fake.fail_next_task = "start failed: boom"
    st = c.wait(c.data("POST", f"/nodes/{NODE}/qemu/200/status/start"))
    assert st["exitstatus"] == "start failed: boom"
    assert c.data("GET", f"/nodes/{NODE}/qemu/200/status/current")["status"] == "stopped"
    c.wait(c.data("POST", f"/nodes/{NODE}/qemu/200/status/start"))
    fake.agent_commands.append(AgentCommand(exitcode=3, out="hi\n", err="oops", polls=1))
    pid = c.data("POST", f"/nodes/{NODE}/qemu/200/agent/exec",
                 data={"command": ["/bin/sh", "-c", "echo hi"]})["pid"]  # fmt: skip
    path = f"/nodes/{NODE}/qemu/200/agent/exec-status"
    assert c.data("GET", path, params={"pid": pid}) == {"exited": 0}
    assert c.data("GET", path, params={"pid": pid}) == {
        "exited": 1, "exitcode": 3, "out-data": "hi\n", "err-data": "oops",
    }  # fmt: skip
    assert fake.violations == []


@pytest.mark.parametrize(
    ("method", "path", "kw", "needle"),
    [
        ("POST", f"/nodes/{NODE}/lxc", {"data": {**LXC_CREATE, "bogus": "1"}}, "bogus"),
        ("POST", f"/nodes/{NODE}/lxc", {"data": {"vmid": "4711"}}, "ostemplate"),
        ("POST", f"/nodes/{NODE}/lxc", {"data": {**LXC_CREATE, "ostype": "windows"}}, "ostype"),
        ("POST", f"/nodes/{NODE}/lxc", {"data": {**LXC_CREATE, "start": "true"}}, "boolean"),
        ("POST", f"/nodes/{NODE}/lxc", {"data": {**LXC_CREATE, "vmid": "99"}}, "pve-vmid"),
        ("POST", f"/nodes/{NODE}/lxc", {"json": LXC_CREATE}, "form-encoded"),
        ("POST", f"/nodes/{NODE}/lxc", {"data": {**LXC_CREATE, "net0": "nmae=eth0"}}, "net0"),
        ("GET", f"/nodes/{NODE}/qemu/200/rrddata", {"params": {"timeframe": "decade"}}, "enum"),
        ("GET", f"/nodes/{NODE}/lxc/abc/status/current", {}, "integer"),
        ("GET", f"/nodes/{NODE}/lxc/4711/nonsense", {}, "no such path"),
        ("PATCH", f"/nodes/{NODE}/lxc", {}, "not allowed"),
        ("DELETE", f"/nodes/{NODE}/lxc", {}, "not allowed"),
    ],
)
def test_violations(
    fake: FakePVE, c: Client, method: str, path: str, kw: dict[str, Any], needle: str
) -> None:
    r = c.call(method, path, **kw)
    assert r.status_code in (400, 501), r.text
    assert len(fake.violations) >= 1, fake.violations
    assert needle in " ".join(fake.violations), fake.violations
    if r.status_code == 400:
        assert r.reason == "Parameter verification failed."
        assert r.json()["data"] is None and r.json()["errors"]
    assert fake.find_guest(4711) is None


def test_auth(fake: FakePVE) -> None:
    bad = Client(fake, token=f"PVEAPIToken={fake.token_id}=wrong")
    assert bad.call("GET", "/version").status_code == 401
    none = Client(fake)
    del none.s.headers["Authorization"]
    assert none.call("GET", "/version").status_code == 401
    assert len(fake.auth_failures) == 2 and fake.violations == []
    assert Client(fake).data("GET", "/version")["version"]


def test_fingerprint_matches_served_cert(fake: FakePVE) -> None:
    ctx = ssl.create_default_context(cafile=fake.ca_file)
    with (
        socket.create_connection((fake.host, fake.port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=fake.host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    digest = hashlib.sha256(der).hexdigest().upper()
    assert fake.fingerprint == ":".join(digest[i : i + 2] for i in range(0, 64, 2))
    assert len(fake.fingerprint) == 95


def test_crash_after_create(fake: FakePVE, c: Client) -> None:
    fake.crash_after_create = True
    with pytest.raises(requests.ConnectionError):
        c.call("POST", f"/nodes/{NODE}/lxc", data=LXC_CREATE)
    assert fake.find_guest(4711) is not None
    r = c.call("POST", f"/nodes/{NODE}/lxc", data=LXC_CREATE)
    assert r.status_code == 500 and "already exists" in r.reason
    assert fake.violations == []


def test_check_value_follows_pve_jsonschema() -> None:
    assert check_value("1", {"type": "boolean"}) is None
    assert check_value("true", {"type": "boolean"}) is not None
    assert check_value("-3", {"type": "integer"}) is None
    assert check_value("1.5", {"type": "integer"}) is not None
    assert check_value("1e3", {"type": "number", "maximum": 999}) is not None
    assert check_value("ab", {"type": "string", "pattern": "(?^:[a-z]+)"}) is None
    assert check_value("ab1", {"type": "string", "pattern": "(?^:[a-z]+)"}) is not None


def test_qemu_endpoints_have_state(fake: FakePVE, c: Client) -> None:
    fake.task_polls = 0
    base = f"/nodes/{NODE}/qemu"
    create = {
        "vmid": "300", "name": "tmpl", "memory": "2048", "cores": "2", "agent": "enabled=1",
        "net0": "virtio,bridge=vmbr0,firewall=1", "scsi0": "local-lvm:32,discard=on",
        "scsihw": "virtio-scsi-single", "ostype": "l26", "ipconfig0": "ip=dhcp",
        "boot": "order=scsi0", "template": "1",
    }  # fmt: skip
    c.wait(c.data("POST", base, data=create))
    r = c.call("POST", base, data=create)
    assert r.status_code == 500 and r.reason == f"VM 300 already exists on node '{NODE}'"
    c.wait(c.data("POST", f"{base}/300/clone", data={"newid": "301", "name": "job", "full": "0"}))
    assert c.data("GET", f"{base}/301/config")["name"] == "job"
    c.wait(c.data("PUT", f"{base}/301/resize", data={"disk": "scsi0", "size": "+8G"}))
    assert "size=8G" in c.data("GET", f"{base}/301/config")["scsi0"]
    c.data("PUT", f"{base}/301/firewall/options", data={"enable": "1", "policy_in": "DROP"})
    assert c.data("GET", f"{base}/301/firewall/options") == {"enable": "1", "policy_in": "DROP"}
    c.data("POST", f"{base}/301/firewall/rules", data={"type": "in", "action": "ACCEPT"})
    assert c.data("GET", f"{base}/301/firewall/rules")[0]["action"] == "ACCEPT"
    c.wait(c.data("POST", f"{base}/301/snapshot", data={"snapname": "before"}))
    assert [s["name"] for s in c.data("GET", f"{base}/301/snapshot")] == ["before", "current"]
    c.wait(c.data("POST", f"{base}/301/snapshot/before/rollback"))
    c.wait(c.data("DELETE", f"{base}/301/snapshot/before"))
    assert [s["name"] for s in c.data("GET", f"{base}/301/snapshot")] == ["current"]
    assert len(c.data("GET", f"/nodes/{NODE}/tasks")) == len(fake.tasks)
    rrd = c.data("GET", f"{base}/301/rrddata", params={"timeframe": "hour", "cf": "AVERAGE"})
    assert rrd and {"time", "cpu", "mem", "netin"} <= set(rrd[0])
    c.wait(c.data("POST", f"{base}/301/status/start"))
    vnc = c.data("POST", f"{base}/301/vncproxy", data={"websocket": "1"})
    port = c.data("GET", f"{base}/301/vncwebsocket",
                  params={"port": vnc["port"], "vncticket": vnc["ticket"]})["port"]  # fmt: skip
    assert port == vnc["port"]
    r = c.call("POST", f"{base}/301/migrate", data={"target": "pve2", "online": "1"})
    c.wait(r.json()["data"])
    found = fake.find_guest(301)
    assert found is not None and found[0] == "pve2"
    assert [g["vmid"] for g in c.data("GET", "/cluster/resources", params={"type": "vm"})] == [
        300, 301,
    ]  # fmt: skip
    r = c.call("GET", f"{base}/301/status/current")
    assert r.status_code == 500 and "does not exist" in r.reason
    r = c.call("POST", f"/nodes/{NODE}/lxc/300/status/start")  # a VM, asked as a CT
    assert r.status_code == 500
    assert fake.violations == []


def test_task_seconds_finishes_unpolled_tasks(fake: FakePVE, c: Client) -> None:
    fake.task_polls = 1000
    fake.task_seconds = 0.0
    fake.add_guest(400, "lxc", config={"hostname": "ct"})
    c.data("POST", f"/nodes/{NODE}/lxc/400/status/start")
    assert c.data("GET", f"/nodes/{NODE}/lxc/400/status/current")["status"] == "running"
    assert fake.violations == []
