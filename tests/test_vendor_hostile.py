"""The HTTP API executors (proxmox, sevdesk, lexware) against servers that misbehave: one that
drips its answer a byte at a time, one whose answer has no end, and a cancel that comes just
before a create. Each request ends within the attempt's timeout or at its cancel, no answer is
read past its cap, and nothing is created once the job is cancelled."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from spoold.executors.base import ExecResult, Executor
from spoold.executors.lexware import LexwareExecutor
from spoold.executors.proxmox import ProxmoxExecutor
from spoold.executors.sevdesk import SevdeskExecutor

from tests.fake_lexware import FakeLexware
from tests.fake_pve import FakePVE
from tests.fake_sevdesk import FakeSevdesk
from tests.loopback import MethodHandler, serve_in_thread, stop_serving
from tests.test_executors import _context, _Log

pytestmark = pytest.mark.timeout(90)

UUID = "5a0a5b4c-1111-4222-8333-944445555666"
#: Longer than any bound under test, shorter than the test's own timeout: a run still going
#: after it would have waited for the server.
_HOLD = 30.0


class _Served:
    """A plain-http server on loopback, serving with ``handler`` until closed."""

    def __init__(self, handler: type[MethodHandler]) -> None:
        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

        self.server = Server(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = serve_in_thread(self.server)

    def close(self) -> None:
        stop_serving(self.server, self.thread)


class _Hostile(_Served):
    """A plain-http server on loopback that answers every request in one bad way (``mode``):
    ``drip`` (a byte every 0.2 s of an answer it says is 100 kB long), ``long`` (it says its
    answer is 1 GiB long), ``endless`` (a chunked answer that never ends)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.started = threading.Event()  # the first bad answer has begun
        self.requests: list[tuple[str, str]] = []
        hostile = self

        class Handler(MethodHandler):
            def serve(self, method: str) -> None:
                hostile.requests.append((method, self.path))
                self.close_connection = True
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                if hostile.mode == "endless":
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    length = 1 << 30 if hostile.mode == "long" else 100_000
                    self.send_header("Content-Length", str(length))
                self.end_headers()
                hostile.started.set()
                if hostile.mode == "long":
                    return
                chunk = b" " if hostile.mode == "drip" else b" " * 65536
                framed = chunk if hostile.mode == "drip" else b"10000\r\n" + chunk + b"\r\n"
                until = time.monotonic() + _HOLD
                while time.monotonic() < until:
                    try:
                        self.wfile.write(framed)
                        self.wfile.flush()
                    except OSError:  # the client went away: what it should do
                        return
                    if hostile.mode == "drip":
                        time.sleep(0.2)

        super().__init__(Handler)


@pytest.fixture(params=["drip", "long", "endless"])
def hostile(request: pytest.FixtureRequest) -> Iterator[_Hostile]:
    server = _Hostile(request.param)
    yield server
    server.close()


def _set_when(started: threading.Event, cancel: threading.Event) -> None:
    if started.wait(_HOLD):
        cancel.set()


def _set_if(condition: bool, cancel: threading.Event) -> None:
    if condition:
        cancel.set()


def _in_thread(run: Callable[[], ExecResult]) -> ExecResult:
    """``run()``'s result; fails the test if it is still running after _HOLD seconds."""
    results: list[ExecResult] = []
    thread = threading.Thread(target=lambda: results.append(run()), daemon=True)
    thread.start()
    thread.join(_HOLD)
    assert not thread.is_alive(), "the executor is still waiting for the server"
    return results[0]


def _invoicing(
    name: str, base: str, tmp_path: Path, **ctx: Any
) -> tuple[Executor, dict[str, Any], dict[str, Any]]:
    """An executor that cancels an invoice (its first request is a GET), its product and
    its context's fields."""
    if name == "sevdesk":
        product = {"api_token": "T", "base_url": base + "/api/v1", "invoice_id": 5}
        return SevdeskExecutor(), product, {"type": "cancel_invoice", **ctx}
    product = {"api_key": "K", "base_url": base, "invoice_id": UUID}
    settings = {"rate_dir": str(tmp_path / "rate"), "settle_seconds": [0.1]}
    return LexwareExecutor(), product, {"type": "cancel_invoice", "settings": settings, **ctx}


@pytest.mark.parametrize("name", ["sevdesk", "lexware"])
def test_a_bad_answer_ends_within_the_timeout(hostile: _Hostile, tmp_path: Path, name: str) -> None:
    executor, product, ctx = _invoicing(name, hostile.url, tmp_path, timeout=2.0)
    log = _Log()
    context = _context(tmp_path, product, log, executor=name, job_id="hostile", **ctx)
    result = _in_thread(lambda: executor.run(context))
    assert not result.succeeded
    if hostile.mode == "drip":
        assert result.timed_out and not result.retryable
    else:
        assert "larger than 8 MiB: refused" in (result.error or "")
    assert len(hostile.requests) == 1  # an answer that is no answer is not asked for again


@pytest.mark.parametrize("name", ["sevdesk", "lexware"])
def test_a_cancel_ends_a_dripping_request_at_once(tmp_path: Path, name: str) -> None:
    server = _Hostile("drip")
    try:
        cancel = threading.Event()
        threading.Thread(target=lambda: _set_when(server.started, cancel)).start()
        executor, product, ctx = _invoicing(name, server.url, tmp_path, cancel=cancel)
        log = _Log()
        context = _context(tmp_path, product, log, executor=name, job_id="hostile", **ctx)
        result = _in_thread(lambda: executor.run(context))  # no timeout: only the cancel
        assert result.cancelled and not result.timed_out
    finally:
        cancel.set()
        server.close()


# ---------------------------------------------------------------------- proxmox (TLS, the fake)
@pytest.fixture
def fake_pve() -> Iterator[FakePVE]:
    with FakePVE(nodes=("pve1",)) as server:
        server.task_polls = 0
        server.drip_seconds = 0.2
        server.add_guest(100, "qemu", config={"name": "vm100"})
        yield server


def _proxmox(fake: FakePVE, tmp_path: Path, type_: str, **ctx: Any) -> ExecResult:
    product = {"host": f"{fake.host}:{fake.port}", "node": "pve1", "token_id": fake.token_id,
               "token_secret": fake.token_secret, "ca_file": fake.ca_file, "vmid": 100}  # fmt: skip
    context = _context(tmp_path, product, _Log(), executor="proxmox", type=type_, **ctx)
    return _in_thread(lambda: ProxmoxExecutor().run(context))


def test_proxmox_a_dripping_answer_ends_within_the_timeout(
    fake_pve: FakePVE, tmp_path: Path
) -> None:
    fake_pve.drip.add("/nodes/{node}/qemu/{vmid}/status/current")
    result = _proxmox(fake_pve, tmp_path, "kvm_status", timeout=2.0)
    assert result.timed_out and not result.succeeded


def test_proxmox_a_dripping_poll_still_stops_the_task(fake_pve: FakePVE, tmp_path: Path) -> None:
    fake_pve.task_polls = 1000
    fake_pve.drip.add("/nodes/{node}/tasks/{upid}/status")
    result = _proxmox(fake_pve, tmp_path, "kvm_start", timeout=2.0)
    assert result.timed_out
    assert fake_pve.requests_to("DELETE", "/nodes/{node}/tasks/{upid}")  # stopped, in its grace
    assert fake_pve.guests["pve1"][100].status == "stopped"


def test_proxmox_a_cancel_ends_a_dripping_request(fake_pve: FakePVE, tmp_path: Path) -> None:
    cancel = threading.Event()
    fake_pve.drip.add("/nodes/{node}/qemu/{vmid}/status/current")
    fake_pve.on_request = lambda method, template: cancel.set()
    result = _proxmox(fake_pve, tmp_path, "kvm_status", cancel=cancel)
    assert result.cancelled and not result.timed_out


def test_proxmox_an_answer_past_the_cap_is_refused(fake_pve: FakePVE, tmp_path: Path) -> None:
    fake_pve.padding["/nodes/{node}/qemu/{vmid}/status/current"] = 17 << 20
    result = _proxmox(fake_pve, tmp_path, "kvm_status")
    assert "larger than 16 MiB: refused" in (result.error or "")


# ---------------------------------------------------------------------- cancel before a create
def test_sevdesk_sends_no_create_once_cancelled(tmp_path: Path) -> None:
    cancel = threading.Event()

    class CancelledDuringLookup(FakeSevdesk):
        def handle(self, method: str, raw_path: str, headers: Any, body: bytes) -> Any:
            if method == "GET":
                cancel.set()  # the cancel comes while the lookup is answered
            return super().handle(method, raw_path, headers, body)

    with CancelledDuringLookup() as fake:
        product = {"api_token": fake.token, "base_url": fake.base_url, "contact_id": 1001,
                   "invoice_data": {"contact_person_id": 7, "invoice_date": "2026-11-20",
                                    "positions": [{"name": "x", "quantity": 1, "price": "1.00",
                                                   "tax_rate": 19}]}}  # fmt: skip
        context = _context(tmp_path, product, _Log(), executor="sevdesk",
                           type="create_invoice", cancel=cancel)  # fmt: skip
        result = SevdeskExecutor().run(context)
        assert result.cancelled
        assert [m for m, _ in fake.requests if m == "POST"] == []
        assert fake.count() == 0


def test_lexware_sends_no_create_once_cancelled(tmp_path: Path) -> None:
    cancel = threading.Event()
    with FakeLexware() as fake:
        fake.on_request = lambda method, path: _set_if(path == "/v1/voucherlist", cancel)
        data = {"voucherDate": "2026-11-20", "lineItems": [
            {"name": "x", "quantity": 1, "unitPrice": {"netAmount": "1.00",
                                                       "taxRatePercentage": 19}}]}  # fmt: skip
        product = {"api_key": fake.api_key, "base_url": fake.url, "customer_id": UUID,
                   "invoice_data": data}  # fmt: skip
        context = _context(tmp_path, product, _Log(), executor="lexware", type="create_invoice",
                           cancel=cancel, settings={"rate_dir": str(tmp_path / "rate")})  # fmt: skip
        result = LexwareExecutor().run(context)
        assert result.cancelled
        assert [m for _, m, _ in fake.requests if m == "POST"] == []


def test_proxmox_sends_no_create_once_cancelled(fake_pve: FakePVE, tmp_path: Path) -> None:
    cancel = threading.Event()
    fake_pve.on_request = lambda method, template: _set_if(template == "/cluster/nextid", cancel)
    product = {"host": f"{fake_pve.host}:{fake_pve.port}", "node": "pve1",
               "token_id": fake_pve.token_id, "token_secret": fake_pve.token_secret,
               "ca_file": fake_pve.ca_file, "params": {"name": "web"}}  # fmt: skip
    context = _context(tmp_path, product, _Log(), executor="proxmox", type="kvm_create",
                       cancel=cancel)  # fmt: skip
    result = ProxmoxExecutor().run(context)
    assert result.cancelled
    assert fake_pve.requests_to("POST", "/nodes/{node}/qemu") == []
    assert list(fake_pve.guests["pve1"]) == [100]


# ---------------------------------------------------------------------- a proxy in the environment
class _Proxy(_Served):
    """A proxy on loopback that records what reaches it (a request line and its Authorization
    header, or a CONNECT) and answers 502."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None]] = []
        proxy = self

        class Handler(MethodHandler):
            def serve(self, method: str) -> None:
                proxy.seen.append((method, self.path, self.headers.get("Authorization")))
                self.close_connection = True
                self.send_response(502)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_CONNECT(self) -> None:
                self.serve("CONNECT")

        super().__init__(Handler)


@pytest.mark.parametrize("name", ["sevdesk", "lexware", "proxmox"])
def test_a_proxy_in_spoolds_environment_never_sees_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """A proxy set for spoold's own process (HTTPS_PROXY in its unit) would get the API token
    in every request to a plain-http base_url, and each host name: the vendor executors go to
    the server directly."""
    proxy = _Proxy()
    for variable in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(variable, proxy.url)
    for variable in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    try:
        if name == "sevdesk":
            with FakeSevdesk() as sevdesk:
                product = {"api_token": sevdesk.token, "base_url": sevdesk.base_url,
                           "invoice_id": 4242}  # fmt: skip
                context = _context(tmp_path, product, _Log(), executor=name,
                                   type="cancel_invoice")  # fmt: skip
                result, answered = SevdeskExecutor().run(context), "check invoice_id 4242"
        elif name == "lexware":
            with FakeLexware() as lexware:
                product = {"api_key": lexware.api_key, "base_url": lexware.url,
                           "invoice_id": UUID}  # fmt: skip
                context = _context(tmp_path, product, _Log(), executor=name,
                                   type="cancel_invoice", timeout=10.0,
                                   settings={"rate_dir": str(tmp_path / "rate")})  # fmt: skip
                result, answered = LexwareExecutor().run(context), "failed: 404"
        else:
            with FakePVE(nodes=("pve1",)) as pve:
                product = {"host": f"{pve.host}:{pve.port}", "node": "pve1",
                           "token_id": pve.token_id, "token_secret": pve.token_secret,
                           "ca_file": pve.ca_file}  # fmt: skip
                context = _context(tmp_path, product, _Log(), executor=name, type="kvm_list")
                result, answered = ProxmoxExecutor().run(context), ""
    finally:
        proxy.close()
    assert proxy.seen == []
    assert answered in (result.error or ""), result.error  # the fake itself answered
    assert result.succeeded == (name == "proxmox"), result.error
