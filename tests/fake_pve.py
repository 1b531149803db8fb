"""A fake Proxmox VE API server for tests, checked against Proxmox's own API description.

Every request is matched against ``../shared/apis/pve-apidata.json`` (the data behind the PVE
api-viewer, read at run time and never copied into the project): method + path must exist, and
parameters are checked the way ``PVE::JSONSchema`` does (required, unknown, type, format,
pattern, length, minimum/maximum, enum). Anything the description does not allow is answered
400 "Parameter verification failed." (or 501 for an unknown method/path) and recorded in
``FakePVE.violations`` so that tests can assert ``fake.violations == []``.

A small state (guests per node, tasks) backs the endpoints an executor needs; every other
endpoint the description allows answers 200 ``{"data": null}``.
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import json
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache, lru_cache
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from tests.apis import api_description
from tests.loopback import MethodHandler, serve_in_thread, stop_serving

APIDATA_PATH = api_description("pve-apidata.json")  # a missing one fails the tests at import
BASE_PATH = "/api2/json"

Schema = dict[str, Any]
Params = dict[str, list[str]]

# Simple formats from PVE::JSONSchema / pve-guest-common, good enough for a fake. Formats that
# are not listed here are not checked.
_FORMATS: dict[str, re.Pattern[str]] = {
    "pve-node": re.compile(r"(?i:[a-z0-9](?:[a-z0-9\-]*[a-z0-9])?)"),
    "pve-vmid": re.compile(r"[1-9][0-9]{2,8}"),
    "pve-configid": re.compile(r"[a-z][a-z0-9_]+"),
    "pve-storage-id": re.compile(r"(?i:[a-z][a-z0-9\-_.]*[a-z0-9])"),
    "pve-poolid": re.compile(r"[A-Za-z0-9_\-]+"),
    "pve-bridge-id": re.compile(r"[-_.\w\d]+"),
    "dns-name": re.compile(
        r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9\-]*[a-zA-Z0-9])?\.)*[a-zA-Z0-9](?:[a-zA-Z0-9\-]*[a-zA-Z0-9])?"
    ),
    "mac-addr": re.compile(r"(?i:[0-9a-f]{2}(?::[0-9a-f]{2}){5})"),
    "pve-tag": re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9_\-+.]*"),
}
_INTEGER = re.compile(r"[+-]?\d+")
_NUMBER = re.compile(r"[+-]?(\d+\.\d+|\d+\.|\.\d+|\d+)([eE][+-]?\d+)?")


@cache
def _compile_perl(pattern: str) -> re.Pattern[str] | None:
    """Translate the few Perl-isms in apidata patterns; None if Python cannot compile it."""
    py = pattern.replace("(?^:", "(?:").replace("(?^i:", "(?i:")
    try:
        return re.compile(f"(?:{py})", re.DOTALL)
    except re.error:
        return None


def _split_list(value: str) -> list[str]:
    # PVE::Tools::split_list: NUL-separated, else separated by whitespace, comma or semicolon.
    if "\0" in value:
        return [v for v in value.split("\0") if v]
    return [v for v in re.split(r"[\s,;]+", value) if v]


def check_value(value: str, schema: Schema) -> str | None:
    """Check one scalar value the way PVE::JSONSchema::check_prop does; return an error text."""
    typ = schema.get("type", "string")
    if typ == "boolean" and value not in ("0", "1"):
        return f"type check ('boolean') failed - got '{value}'"
    if typ == "integer" and not _INTEGER.fullmatch(value):
        return f"type check ('integer') failed - got '{value}'"
    if typ == "number" and not _NUMBER.fullmatch(value):
        return f"type check ('number') failed - got '{value}'"
    fmt = schema.get("format")
    if isinstance(fmt, dict):
        err = check_property_string(value, fmt)
        if err:
            return f"invalid format - {err}"
    elif isinstance(fmt, str):
        err = _check_format(fmt, value)
        if err:
            return f"invalid format - {err}"
    pattern = schema.get("pattern")
    if isinstance(pattern, str):
        rx = _compile_perl(pattern)
        if rx is not None and not rx.fullmatch(value):
            return "value does not match the regex pattern"
    if "maxLength" in schema and len(value) > int(schema["maxLength"]):
        return f"value may only be {schema['maxLength']} characters long"
    if "minLength" in schema and len(value) < int(schema["minLength"]):
        return f"value must be at least {schema['minLength']} characters long"
    if _NUMBER.fullmatch(value):
        num = float(value)
        if "maximum" in schema and num > float(schema["maximum"]):
            return f"value must have a maximum value of {schema['maximum']}"
        if "minimum" in schema and num < float(schema["minimum"]):
            return f"value must have a minimum value of {schema['minimum']}"
    enum = schema.get("enum")
    if enum is not None and value not in [str(e) for e in enum]:
        return f"value '{value}' does not have a value in the enumeration '{', '.join(enum)}'"
    return None


def _check_format(fmt: str, value: str) -> str | None:
    if fmt.endswith("-list") and fmt[:-5] in _FORMATS:
        item_rx = _FORMATS[fmt[:-5]]
        bad = [v for v in _split_list(value) if not item_rx.fullmatch(v)]
        return f"value '{bad[0]}' does not look like a valid {fmt[:-5]}" if bad else None
    if fmt.endswith("-opt") and fmt[:-4] in _FORMATS:
        if not value:
            return None
        fmt = fmt[:-4]
    rx = _FORMATS.get(fmt)
    if rx is not None and not rx.fullmatch(value):
        return f"value does not look like a valid {fmt}"
    return None


def check_property_string(value: str, fmt: Schema) -> str | None:
    """Check a PVE property string (``key=value,key2=value2``) against a dict format."""
    default_key = next((k for k, s in fmt.items() if s.get("default_key")), None)
    seen: dict[str, str] = {}
    for part in value.split(","):
        if not part:
            continue
        if "=" in part:
            key, val = part.split("=", 1)
        elif default_key is not None and default_key not in seen:
            key, val = default_key, part
        else:
            return "value without key, but schema does not define a default key"
        sub = fmt.get(key)
        if sub is None:
            return f"invalid key in comma-separated list property: {key}"
        if "alias" in sub:  # e.g. net0: virtio=<mac> means model=virtio,macaddr=<mac>
            key_alias = sub.get("keyAlias")
            if key_alias:
                if key_alias in seen:
                    return f"key alias '{key_alias}' is already defined"
                seen[key_alias] = key
                err = check_value(key, fmt.get(key_alias, {}))
                if err:
                    return f"{key_alias}: {err}"
            key = sub["alias"]
            sub = fmt.get(key, {})
        if key in seen:
            return f"duplicate key in comma-separated list property: {key}"
        seen[key] = val
        err = check_value(val, sub)
        if err:
            return f"{key}: {err}"
    for key, sub in fmt.items():
        if key not in seen and not sub.get("optional") and "alias" not in sub:
            return f"{key}: property is missing and it is not optional"
    return None


@dataclass
class Endpoint:
    method: str
    path: str
    info: Schema

    @property
    def properties(self) -> dict[str, Schema]:
        props: dict[str, Schema] = self.info.get("parameters", {}).get("properties", {})
        return props


class ApiDescription:
    """The PVE API tree: find endpoints by method + path and validate parameters."""

    def __init__(self, path: Path = APIDATA_PATH) -> None:
        with path.open(encoding="utf-8") as f:
            tree = json.load(f)
        self.endpoints: dict[tuple[str, str], Endpoint] = {}
        self._paths: list[tuple[list[str], str]] = []

        def walk(node: Schema) -> None:
            self._paths.append((node["path"].strip("/").split("/"), node["path"]))
            for method, info in (node.get("info") or {}).items():
                self.endpoints[(method, node["path"])] = Endpoint(method, node["path"], info)
            for child in node.get("children") or []:
                walk(child)

        for top in tree:
            walk(top)

    def match_path(self, rel: str) -> tuple[str, dict[str, str]] | None:
        """Return (template path, path parameters) for a concrete path, literal segments first."""
        segs = [unquote(s) for s in rel.strip("/").split("/")]
        best: tuple[tuple[int, ...], str, dict[str, str]] | None = None
        for tsegs, template in self._paths:
            if len(tsegs) != len(segs):
                continue
            params: dict[str, str] = {}
            score: list[int] = []
            for t, s in zip(tsegs, segs, strict=True):
                if t.startswith("{") and t.endswith("}"):
                    if not s:
                        break
                    params[t[1:-1]] = s
                    score.append(0)
                elif t == s:
                    score.append(1)
                else:
                    break
            else:
                key = tuple(score)
                if best is None or key > best[0]:
                    best = (key, template, params)
        return None if best is None else (best[1], best[2])

    def validate(self, ep: Endpoint, params: Params) -> dict[str, str]:
        """Errors per parameter, empty if PVE would accept the parameters."""
        errors: dict[str, str] = {}
        props = ep.properties
        additional = ep.info.get("parameters", {}).get("additionalProperties")
        indexed = {
            k[: -len("[n]")]: s for k, s in props.items() if k.endswith("[n]")
        }  # net[n] -> net0, net1, ...
        for name, values in params.items():
            schema = props.get(name)
            if schema is None:
                m = re.fullmatch(r"(.*?)(\d+)", name)
                if m and m.group(1) in indexed:
                    schema = indexed[m.group(1)]
            if schema is None:
                if not additional:
                    errors[name] = (
                        "property is not defined in schema and the schema does not allow "
                        "additional properties"
                    )
                continue
            if schema.get("type") == "array":
                items = schema.get("items") or {}
                for i, v in enumerate(values):
                    err = check_value(v, items)
                    if err:
                        errors[f"{name}[{i}]"] = err
                continue
            if len(values) > 1:
                errors[name] = f"parameter given {len(values)} times"
                continue
            err = check_value(values[0], schema)
            if err:
                errors[name] = err
                continue
            requires = schema.get("requires")
            if isinstance(requires, str) and requires not in params:
                errors[requires] = f"missing property - '{name}' requires this property"
        for name, schema in props.items():
            if name.endswith("[n]") or schema.get("optional"):
                continue
            if name not in params:
                errors[name] = "property is missing and it is not optional"
        return errors


@lru_cache(maxsize=1)
def load_api(path: Path = APIDATA_PATH) -> ApiDescription:
    return ApiDescription(path)


def _make_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (also usable as its own CA bundle)."""
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return key, cert


_cert_lock = threading.Lock()
_cert_cache: list[tuple[Path, Path]] = []


def _shared_cert() -> tuple[Path, Path]:
    """One certificate per test process: RSA key generation costs ~0.5 s."""
    with _cert_lock:
        if not _cert_cache:
            directory = Path(tempfile.mkdtemp(prefix="fake-pve-cert-"))
            atexit.register(shutil.rmtree, directory, ignore_errors=True)
            _cert_cache.append(_make_cert(directory))
        return _cert_cache[0]


@dataclass
class SeenRequest:
    method: str
    path: str
    params: dict[str, str | list[str]]
    status: int = 0
    template: str | None = None


@dataclass
class Task:
    upid: str
    node: str
    type: str
    id: str
    user: str
    pid: int
    pstart: int
    starttime: int
    polls_left: int
    error: str | None
    on_success: Callable[[], object] | None = None
    on_failure: Callable[[], object] | None = None
    log: list[str] = field(default_factory=list)
    exitstatus: str | None = None
    created: float = field(default_factory=time.time)

    @property
    def running(self) -> bool:
        return self.exitstatus is None


@dataclass
class Guest:
    vmid: int
    kind: str  # "qemu" or "lxc"
    config: dict[str, str]
    status: str = "stopped"
    lock: str | None = None
    snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)
    firewall_options: dict[str, str] = field(default_factory=dict)
    firewall_rules: list[dict[str, str]] = field(default_factory=list)
    started_at: float = 0.0

    @property
    def name(self) -> str:
        return self.config.get("hostname" if self.kind == "lxc" else "name", f"guest{self.vmid}")


@dataclass
class AgentCommand:
    """What ``agent/exec`` answers in ``exec-status`` once the command has 'exited'."""

    exitcode: int = 0
    out: str = ""
    err: str = ""
    polls: int = 1  # number of exec-status answers with exited=0 before exited=1


class PveError(Exception):
    def __init__(self, status: int, message: str, errors: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors


class _DropConnection(Exception):
    """Raised by a handler to close the connection without any answer."""


_KIND_LABEL = {"lxc": "CT", "qemu": "VM"}
_CONF_DIR = {"lxc": "lxc", "qemu": "qemu-server"}
_TASK_PREFIX = {"lxc": "vz", "qemu": "qm"}


class FakePVE:
    """HTTPS fake of the PVE API on 127.0.0.1, validated against pve-apidata.json.

    Hooks (plain attributes, settable at any time):
      task_polls: status polls a task answers ``running`` before it stops (default 1; 0 makes
        tasks finish at once). A task's effect on the guests happens when it stops.
      task_seconds: if not None, a task also stops once it is that old, whether polled or not
        (checked on every request), for clients that watch the guest instead of the task.
      fail_next_task: if set, the next task started ends with this exitstatus (then reset).
      crash_after_create: if True, the next create (POST lxc/qemu) creates the guest and then
        drops the connection without answering (then reset).
      agent_commands: queue of AgentCommand consumed by agent/exec (default: exit 0, no output).
      on_request: called with (method, template) of each valid request before it is answered.
      drip: templates whose answer is sent a byte every ``drip_seconds`` (a server that never
        quite answers), until the client goes away or a minute has passed.
      padding: template -> bytes of blanks written into its answer (an answer too large).
    """

    def __init__(
        self,
        nodes: tuple[str, ...] = ("pve1",),
        *,
        user: str = "automation@pve",
        token_name: str = "spoold",
        token_secret: str | None = None,
        version: str = "9.1.3",
        apidata: Path = APIDATA_PATH,
        fresh_cert: bool = False,
    ) -> None:
        self._fresh_cert = fresh_cert
        self.api = load_api(apidata)
        self.nodes = list(nodes)
        self.user = user
        self.token_id = f"{user}!{token_name}"
        self.token_secret = token_secret or str(uuid.uuid4())
        self.version = version
        self.requests: list[SeenRequest] = []
        self.violations: list[str] = []
        self.auth_failures: list[str] = []
        self.guests: dict[str, dict[int, Guest]] = {n: {} for n in self.nodes}
        self.tasks: dict[str, Task] = {}
        self.task_polls = 1
        self.task_seconds: float | None = None
        self.fail_next_task: str | None = None
        self.crash_after_create = False
        self.agent_commands: list[AgentCommand] = []
        self.on_request: Callable[[str, str], object] | None = None
        self.drip: set[str] = set()
        self.drip_seconds = 0.5
        self.padding: dict[str, int] = {}
        self._agent_runs: dict[tuple[int, int], tuple[AgentCommand, list[int]]] = {}
        self._pid = itertools.count(0x10000)
        self._lock = threading.RLock()
        self._tmp: str | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.ca_file = ""
        self.fingerprint = ""
        self.host = "127.0.0.1"
        self.port = 0

    # ----------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}{BASE_PATH}"

    @property
    def auth_header(self) -> str:
        return f"PVEAPIToken={self.token_id}={self.token_secret}"

    def start(self) -> FakePVE:
        if self._fresh_cert:
            self._tmp = tempfile.mkdtemp(prefix="fake-pve-")
            key, cert = _make_cert(Path(self._tmp))
        else:
            key, cert = _shared_cert()
        self.ca_file = str(cert)
        der = ssl.PEM_cert_to_DER_cert(cert.read_text())
        digest = hashlib.sha256(der).hexdigest().upper()
        self.fingerprint = ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        fake = self

        class Server(ThreadingHTTPServer):
            def get_request(self) -> tuple[socket.socket, Any]:
                sock, addr = super().get_request()
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # The TLS handshake happens in the handler thread, on first read.
                return ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

        class Handler(_Handler):
            pve = fake

        self._server = Server((self.host, 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = serve_in_thread(self._server)
        return self

    def stop(self) -> None:
        if self._server is not None:
            stop_serving(self._server, self._thread)
            self._server = self._thread = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> FakePVE:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ----------------------------------------------------------------- helpers for tests
    def add_guest(
        self,
        vmid: int,
        kind: str = "qemu",
        node: str | None = None,
        *,
        status: str = "stopped",
        config: dict[str, str] | None = None,
    ) -> Guest:
        node = node or self.nodes[0]
        guest = Guest(vmid=vmid, kind=kind, config=dict(config or {}), status=status)
        if status == "running":
            guest.started_at = time.time()
        with self._lock:
            self.guests[node][vmid] = guest
        return guest

    def find_guest(self, vmid: int) -> tuple[str, Guest] | None:
        with self._lock:
            for node, guests in self.guests.items():
                if vmid in guests:
                    return node, guests[vmid]
        return None

    def requests_to(self, method: str, template: str) -> list[SeenRequest]:
        """Requests seen for an apidata path template, e.g. ('POST', '/nodes/{node}/lxc')."""
        return [r for r in self.requests if r.method == method and r.template == template]

    # ----------------------------------------------------------------- tasks
    def new_task(
        self,
        node: str,
        ttype: str,
        tid: str,
        *,
        on_success: Callable[[], object] | None = None,
        on_failure: Callable[[], object] | None = None,
    ) -> str:
        with self._lock:
            pid = next(self._pid)
            now = int(time.time())
            pstart = now & 0xFFFFFF
            upid = f"UPID:{node}:{pid:08X}:{pstart:08X}:{now:08X}:{ttype}:{tid}:{self.token_id}:"
            task = Task(
                upid=upid, node=node, type=ttype, id=tid, user=self.token_id, pid=pid,
                pstart=pstart, starttime=now, polls_left=self.task_polls,
                error=self.fail_next_task, on_success=on_success, on_failure=on_failure,
            )  # fmt: skip
            self.fail_next_task = None
            task.log.append(f"starting task {ttype} {tid}")
            self.tasks[upid] = task
            if task.polls_left <= 0:
                self._finish(task)
            return upid

    def _finish(self, task: Task) -> None:
        if task.error:
            task.log.append(f"TASK ERROR: {task.error}")
            task.exitstatus = task.error
            if task.on_failure:
                task.on_failure()
        else:
            task.log.append("TASK OK")
            task.exitstatus = "OK"
            if task.on_success:
                task.on_success()

    def _poll(self, task: Task) -> None:
        if task.running:
            task.polls_left -= 1
            if task.polls_left < 0:
                self._finish(task)

    # ----------------------------------------------------------------- dispatch
    def handle(self, method: str, template: str, pp: dict[str, str], params: Params) -> Any:
        """Answer a validated request: return the ``data`` or raise PveError/_DropConnection."""
        p = {k: v[-1] for k, v in params.items()}
        with self._lock:
            if self.task_seconds is not None:
                deadline = time.time() - self.task_seconds
                for task in list(self.tasks.values()):
                    if task.running and task.created <= deadline:
                        self._finish(task)
        node = pp.get("node")
        if node is not None and node not in self.guests:
            raise PveError(500, f"hostname lookup '{node}' failed - failed to get address info")
        parts = template.strip("/").split("/")
        with self._lock:
            if template == "/version":
                rel = ".".join(self.version.split(".")[:2])
                return {"version": self.version, "release": rel, "repoid": "e5010dce"}
            if template == "/nodes":
                return [{"node": n, "status": "online", "type": "node"} for n in self.nodes]
            if template == "/cluster/nextid":
                return self._nextid(p.get("vmid"))
            if template == "/cluster/resources":
                return self._resources(p.get("type"))
            if template == "/nodes/{node}/tasks/{upid}/status":
                return self._task_status(pp["upid"])
            if template == "/nodes/{node}/tasks/{upid}/log":
                return self._task_log(pp["upid"], p)
            if template == "/nodes/{node}/tasks/{upid}" and method == "DELETE":
                task = self._task(pp["upid"])
                if task.running:
                    task.error = "interrupted by signal"
                    task.on_failure = None
                    self._finish(task)
                return None
            if template == "/nodes/{node}/tasks" and method == "GET":
                return [self._task_entry(t) for t in self.tasks.values() if t.node == node]
            if len(parts) >= 3 and parts[0] == "nodes" and parts[2] in ("lxc", "qemu"):
                return self._guest_api(method, parts[2], "/".join(parts[4:]), node or "",
                                       pp.get("vmid"), p, params)  # fmt: skip
        return None

    def _nextid(self, wanted: str | None) -> int:
        used = {vmid for guests in self.guests.values() for vmid in guests}
        if wanted is not None:
            if int(wanted) in used:
                raise PveError(400, "Parameter verification failed.",
                               {"vmid": f"VM {wanted} already exists"})  # fmt: skip
            return int(wanted)
        return next(i for i in itertools.count(100) if i not in used)

    def _resources(self, rtype: str | None) -> list[dict[str, Any]]:
        if rtype not in (None, "vm"):
            return []
        return [
            {"id": f"{g.kind}/{g.vmid}", "vmid": g.vmid, "node": n, "type": g.kind,
             "status": g.status, "name": g.name, "template": int(g.config.get("template") == "1"),
             **({"lock": g.lock} if g.lock else {})}
            for n, guests in self.guests.items() for g in guests.values()
        ]  # fmt: skip

    def _task(self, upid: str) -> Task:
        task = self.tasks.get(upid)
        if task is None:
            if not upid.startswith("UPID:"):
                raise PveError(500, f"unable to parse worker upid '{upid}'")
            raise PveError(500, "no such task")
        return task

    def _task_status(self, upid: str) -> dict[str, Any]:
        task = self._task(upid)
        self._poll(task)
        out: dict[str, Any] = {
            "upid": task.upid, "node": task.node, "pid": task.pid, "pstart": task.pstart,
            "starttime": task.starttime, "type": task.type, "id": task.id, "user": task.user,
            "tokenid": task.user.split("!", 1)[1] if "!" in task.user else None,
            "status": "running" if task.running else "stopped",
        }  # fmt: skip
        if not task.running:
            out["exitstatus"] = task.exitstatus
        return out

    @staticmethod
    def _task_entry(task: Task) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "upid": task.upid, "node": task.node, "pid": task.pid, "pstart": task.pstart,
            "starttime": task.starttime, "type": task.type, "id": task.id, "user": task.user,
        }  # fmt: skip
        if not task.running:
            entry["status"] = task.exitstatus
            entry["endtime"] = task.starttime
        return entry

    def _task_log(self, upid: str, p: dict[str, str]) -> list[dict[str, Any]]:
        task = self._task(upid)
        start, limit = int(p.get("start", 0)), int(p.get("limit", 50))
        lines = task.log[start : start + limit]
        return [{"n": start + i + 1, "t": t} for i, t in enumerate(lines)]

    # ----------------------------------------------------------------- guests
    def _guest(self, node: str, kind: str, vmid: int) -> Guest:
        guest = self.guests[node].get(vmid)
        if guest is None or guest.kind != kind:
            raise PveError(500, f"Configuration file 'nodes/{node}/{_CONF_DIR[kind]}/{vmid}.conf'"
                           " does not exist")  # fmt: skip
        return guest

    def _guest_api(
        self,
        method: str,
        kind: str,
        rest: str,
        node: str,
        vmid_text: str | None,
        p: dict[str, str],
        params: Params,
    ) -> Any:
        label, prefix = _KIND_LABEL[kind], _TASK_PREFIX[kind]
        if vmid_text is None and method == "GET":
            return [self._status(g, node) for g in self.guests[node].values() if g.kind == kind]
        if vmid_text is None and method == "POST":
            return self._create(kind, node, p)
        if vmid_text is None:
            return None
        vmid = int(vmid_text)
        guest = self._guest(node, kind, vmid)
        if method == "DELETE" and rest == "":
            if guest.status == "running":
                raise PveError(500, f"{label} {vmid} is running - destroy failed")
            return self.new_task(node, f"{prefix}destroy", str(vmid),
                                 on_success=lambda: self.guests[node].pop(vmid, None))  # fmt: skip
        if rest == "status/current":
            return self._status(guest, node)
        if method == "POST" and rest.startswith("status/"):
            return self._power(guest, node, rest.split("/")[1])
        if rest == "config" and method == "GET":
            data: dict[str, Any] = dict(guest.config)
            data["digest"] = hashlib.sha1(json.dumps(guest.config, sort_keys=True).encode(),
                                          usedforsecurity=False).hexdigest()  # fmt: skip
            if guest.lock:
                data["lock"] = guest.lock
            return data
        if rest == "config" and method in ("PUT", "POST"):
            self._update_config(guest, p)
            return self.new_task(node, "qmconfig", str(vmid)) if method == "POST" else None
        if rest == "resize":
            return self.new_task(node, f"{prefix}resize", str(vmid),
                                 on_success=lambda: self._resize(guest, p))  # fmt: skip
        if rest == "clone":
            return self._clone(guest, node, p)
        if rest == "migrate" and method == "POST":
            return self._migrate(guest, node, p)
        if rest == "snapshot":
            return self._snapshot(guest, node, method, p)
        if rest.startswith("snapshot/"):
            return self._snapshot_item(guest, node, method, rest.split("/")[1:], p)
        if rest == "vncproxy":
            port = 5900 + vmid % 100
            return {"port": str(port), "ticket": f"PVEVNC:{uuid.uuid4().hex}", "cert": "",
                    "user": self.token_id,
                    "upid": self.new_task(node, "vncproxy", str(vmid))}  # fmt: skip
        if rest == "vncwebsocket":
            return {"port": p["port"]}
        if rest == "firewall/options":
            if method == "PUT":
                guest.firewall_options.update(
                    {k: v for k, v in p.items() if k not in ("node", "vmid", "digest", "delete")}
                )
                for key in _split_list(p.get("delete", "")):
                    guest.firewall_options.pop(key, None)
                return None
            return dict(guest.firewall_options)
        if rest == "firewall/rules":
            if method == "POST":
                rule = {k: v for k, v in p.items() if k not in ("node", "vmid", "digest")}
                guest.firewall_rules.insert(int(rule.pop("pos", len(guest.firewall_rules))), rule)
                return None
            return [dict(r, pos=i) for i, r in enumerate(guest.firewall_rules)]
        if rest == "rrddata":
            return self._rrddata(guest, p)
        if rest.startswith("agent/"):
            return self._agent(guest, rest[len("agent/") :], p, params)
        return None

    def _status(self, guest: Guest, node: str) -> dict[str, Any]:
        running = guest.status == "running"
        out: dict[str, Any] = {
            "vmid": guest.vmid, "name": guest.name, "status": guest.status,
            "uptime": int(time.time() - guest.started_at) if running else 0,
            "cpus": int(guest.config.get("cores", 1)), "cpu": 0.01 if running else 0,
            "maxmem": int(guest.config.get("memory", 512)) * 1024 * 1024,
            "mem": 64 * 1024 * 1024 if running else 0, "maxdisk": 8 * 1024**3, "disk": 0,
            "netin": 0, "netout": 0, "diskread": 0, "diskwrite": 0,
        }  # fmt: skip
        if guest.kind == "lxc":
            out["type"] = "lxc"
        else:
            out["qmpstatus"] = guest.status
            out["agent"] = int(self._agent_enabled(guest))
        if guest.lock:
            out["lock"] = guest.lock
        if guest.config.get("template") == "1":
            out["template"] = 1
        return out

    def _create(self, kind: str, node: str, p: dict[str, str]) -> str:
        vmid = int(p["vmid"])
        found = self.find_guest(vmid)
        if found is not None:
            label = _KIND_LABEL[found[1].kind]
            raise PveError(500, f"{label} {vmid} already exists on node '{found[0]}'")
        config = {
            k: v
            for k, v in p.items()
            if k
            not in (
                "node",
                "vmid",
                "start",
                "storage",
                "password",
                "ssh-public-keys",
                "pool",
                "force",
                "unique",
                "restore",
            )
        }
        if kind == "lxc":
            config.pop("ostemplate", None)
        guest = self.add_guest(vmid, kind, node, config=config)
        guest.lock = "create"
        start = p.get("start") == "1"

        def done() -> None:
            guest.lock = None
            if start:
                guest.status, guest.started_at = "running", time.time()

        upid = self.new_task(node, f"{_TASK_PREFIX[kind]}create", str(vmid), on_success=done,
                             on_failure=lambda: self.guests[node].pop(vmid, None))  # fmt: skip
        if self.crash_after_create:
            self.crash_after_create = False
            raise _DropConnection
        return upid

    def _power(self, guest: Guest, node: str, action: str) -> str:
        label, prefix = _KIND_LABEL[guest.kind], _TASK_PREFIX[guest.kind]
        if guest.lock:
            raise PveError(500, f"{label} {guest.vmid} is locked ({guest.lock})")
        running = guest.status == "running"
        if action == "start" and running:
            raise PveError(500, f"{label} {guest.vmid} already running")
        if action in ("shutdown", "reboot", "suspend") and not running:
            raise PveError(500, f"{label} {guest.vmid} not running")
        target = {
            "start": "running",
            "reboot": "running",
            "resume": "running",
            "stop": "stopped",
            "shutdown": "stopped",
            "suspend": "stopped",
        }.get(action)

        def done() -> None:
            if target is not None:
                if (target == "running" and guest.status != "running") or action == "reboot":
                    guest.started_at = time.time()
                guest.status = target

        return self.new_task(node, f"{prefix}{action}", str(guest.vmid), on_success=done)

    def _update_config(self, guest: Guest, p: dict[str, str]) -> None:
        if guest.lock:
            raise PveError(500, f"{_KIND_LABEL[guest.kind]} {guest.vmid} is locked ({guest.lock})")
        for key in _split_list(p.get("delete", "")):
            guest.config.pop(key, None)
        skip = {
            "node",
            "vmid",
            "delete",
            "digest",
            "revert",
            "skiplock",
            "force",
            "background_delay",
        }
        guest.config.update({k: v for k, v in p.items() if k not in skip})

    @staticmethod
    def _resize(guest: Guest, p: dict[str, str]) -> None:
        disk = p["disk"]
        old = guest.config.get(disk, "")
        parts = [x for x in old.split(",") if x and not x.startswith("size=")]
        guest.config[disk] = ",".join([*parts, f"size={p['size'].lstrip('+')}"])

    def _clone(self, guest: Guest, node: str, p: dict[str, str]) -> str:
        newid = int(p["newid"])
        if self.find_guest(newid) is not None:
            raise PveError(500, f"unable to create {_KIND_LABEL[guest.kind]} {newid}: "
                           "config file already exists")  # fmt: skip
        target = p.get("target", node)
        if target not in self.guests:
            raise PveError(500, f"no such cluster node '{target}'")
        config = {k: v for k, v in guest.config.items() if k != "template"}
        name = p.get("hostname" if guest.kind == "lxc" else "name")
        if name:
            config["hostname" if guest.kind == "lxc" else "name"] = name
        if "description" in p:  # else the copy keeps the source's, as Proxmox's does
            config["description"] = p["description"]
        clone = self.add_guest(newid, guest.kind, target, config=config)
        clone.lock = "clone"

        def done() -> None:
            clone.lock = None

        return self.new_task(node, f"{_TASK_PREFIX[guest.kind]}clone", str(guest.vmid),
                             on_success=done,
                             on_failure=lambda: self.guests[target].pop(newid, None))  # fmt: skip

    def _migrate(self, guest: Guest, node: str, p: dict[str, str]) -> str:
        target = p["target"]
        if target not in self.guests or target == node:
            raise PveError(400, "Parameter verification failed.",
                           {"target": f"target is local node or unknown: '{target}'"})  # fmt: skip

        def done() -> None:
            self.guests[node].pop(guest.vmid, None)
            self.guests[target][guest.vmid] = guest

        ttype = "vzmigrate" if guest.kind == "lxc" else "qmigrate"
        return self.new_task(node, ttype, str(guest.vmid), on_success=done)

    def _snapshot(self, guest: Guest, node: str, method: str, p: dict[str, str]) -> Any:
        if method == "GET":
            snaps: list[dict[str, Any]] = [dict(s, name=n) for n, s in guest.snapshots.items()]
            current: dict[str, Any] = {"name": "current", "description": "You are here!",
                                       "running": int(guest.status == "running")}  # fmt: skip
            if guest.snapshots:
                current["parent"] = list(guest.snapshots)[-1]
            return [*snaps, current]
        name = p["snapname"]
        if name in guest.snapshots:
            raise PveError(500, f"snapshot name '{name}' already used")
        parent = list(guest.snapshots)[-1] if guest.snapshots else None
        snap: dict[str, Any] = {"description": p.get("description", ""),
                                "snaptime": int(time.time())}  # fmt: skip
        if parent:
            snap["parent"] = parent

        def done() -> None:
            guest.snapshots[name] = snap

        return self.new_task(node, f"{_TASK_PREFIX[guest.kind]}snapshot", str(guest.vmid),
                             on_success=done)  # fmt: skip

    def _snapshot_item(
        self, guest: Guest, node: str, method: str, sub: list[str], p: dict[str, str]
    ) -> Any:
        name = p["snapname"]
        if name not in guest.snapshots:
            raise PveError(500, f"snapshot '{name}' does not exist")
        prefix = _TASK_PREFIX[guest.kind]
        if method == "DELETE" and len(sub) == 1:
            return self.new_task(node, f"{prefix}delsnapshot", str(guest.vmid),
                                 on_success=lambda: guest.snapshots.pop(name, None))  # fmt: skip
        if method == "POST" and sub[1:] == ["rollback"]:

            def done() -> None:
                if p.get("start") == "1":
                    guest.status, guest.started_at = "running", time.time()
                else:
                    guest.status = "stopped"

            return self.new_task(node, f"{prefix}rollback", str(guest.vmid), on_success=done)
        if method == "GET" and sub[1:] == ["config"]:
            return dict(guest.config)
        return None

    @staticmethod
    def _rrddata(guest: Guest, p: dict[str, str]) -> list[dict[str, Any]]:
        step = {"hour": 60, "day": 1800, "week": 10800, "month": 43200, "year": 604800}
        now = int(time.time())
        dt = step[p["timeframe"]]
        maxmem = int(guest.config.get("memory", 512)) * 1024 * 1024
        return [
            {"time": now - (70 - i) * dt, "cpu": 0.05, "maxcpu": int(guest.config.get("cores", 1)),
             "mem": maxmem // 4, "maxmem": maxmem, "netin": 100.0, "netout": 50.0,
             "diskread": 0.0, "diskwrite": 10.0, "disk": 0, "maxdisk": 8 * 1024**3}
            for i in range(70)
        ]  # fmt: skip

    @staticmethod
    def _agent_enabled(guest: Guest) -> bool:
        value = guest.config.get("agent", "0")
        first = value.split(",")[0]
        if first.startswith("enabled="):
            first = first[len("enabled=") :]
        return first == "1"

    def _agent(self, guest: Guest, cmd: str, p: dict[str, str], params: Params) -> Any:
        if not self._agent_enabled(guest):
            raise PveError(500, "No QEMU guest agent configured")
        if guest.status != "running":
            raise PveError(500, f"VM {guest.vmid} is not running")
        if cmd == "exec":
            pid = next(self._pid) & 0xFFFF
            todo = self.agent_commands.pop(0) if self.agent_commands else AgentCommand()
            self._agent_runs[(guest.vmid, pid)] = (todo, [todo.polls])
            return {"pid": pid}
        if cmd == "exec-status":
            run = self._agent_runs.get((guest.vmid, int(p["pid"])))
            if run is None:
                raise PveError(500, "Agent error: Invalid parameter 'pid'")
            todo, left = run
            if left[0] > 0:
                left[0] -= 1
                return {"exited": 0}
            out: dict[str, Any] = {"exited": 1, "exitcode": todo.exitcode}
            if todo.out:
                out["out-data"] = todo.out
            if todo.err:
                out["err-data"] = todo.err
            return out
        if cmd == "ping":
            return None
        return {"result": {}}


class _Handler(MethodHandler):
    pve: FakePVE
    server_version = "pve-api-daemon/3.0"

    def do_HEAD(self) -> None:
        self.close_connection = True
        self.serve("HEAD")

    def _reply(self, status: int, reason: str, body: dict[str, Any]) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status, reason.replace("\n", " ").strip())
        self.send_header("Content-Type", "application/json;charset=UTF-8")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def serve(self, method: str) -> None:
        fake = self.pve
        split = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        seen = SeenRequest(method, split.path, {})
        with fake._lock:
            fake.requests.append(seen)

        def violation(msg: str) -> None:
            with fake._lock:
                fake.violations.append(f"{method} {split.path}: {msg}")

        def fail(status: int, reason: str, errors: dict[str, str] | None = None) -> None:
            seen.status = status
            payload: dict[str, Any] = {"data": None, "message": reason}
            if errors is not None:
                payload["errors"] = errors
            self._reply(status, reason, payload)

        auth = self.headers.get("Authorization")
        if split.path == f"{BASE_PATH}/access/ticket" and method == "POST":
            # The login endpoint needs no token; the fake supports API tokens only.
            fake.auth_failures.append(f"{method} {split.path}: password login attempted")
            fail(401, "authentication failure")
            return
        if auth is None:
            fake.auth_failures.append(f"{method} {split.path}: no Authorization header")
            fail(401, "No ticket")
            return
        if auth != fake.auth_header:
            fake.auth_failures.append(f"{method} {split.path}: bad token {auth.split('=')[0]}")
            fail(401, "invalid token value!")
            return
        if not split.path.startswith(BASE_PATH + "/") and split.path != BASE_PATH:
            violation("path outside /api2/json")
            fail(404, "Not Found")
            return
        rel = split.path[len(BASE_PATH) :] or "/"
        found = fake.api.match_path(rel)
        if found is None:
            violation("no such path in the API description")
            fail(501, f"Method '{method} {rel}' not implemented")
            return
        template, path_params = found
        seen.template = template
        ep = fake.api.endpoints.get((method, template))
        if ep is None:
            violation(f"method {method} not allowed on {template}")
            fail(501, f"Method '{method} {rel}' not implemented")
            return

        params: Params = {}
        query = parse_qsl(split.query, keep_blank_values=True)
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        problems: list[str] = []
        if method in ("GET", "DELETE"):
            pairs = query
            if body:
                problems.append(f"{method} with a request body")
        else:
            if query:
                problems.append("parameters in the query string of a POST/PUT")
            if body and ctype != "application/x-www-form-urlencoded":
                problems.append(f"body is {ctype or 'untyped'}, not form-encoded")
                pairs = []
            else:
                pairs = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
            pairs = query + pairs
        for k, v in pairs:
            params.setdefault(k, []).append(v)
        seen.params = {k: v[0] if len(v) == 1 else list(v) for k, v in params.items()}
        for k, v in path_params.items():
            params[k] = [v]

        errors = fake.api.validate(ep, params)
        if problems or errors:
            for problem in problems:
                violation(problem)
            for k, msg in errors.items():
                violation(f"{k}: {msg}")
            if problems and not errors:
                errors = {"_root": "; ".join(problems)}
            fail(400, "Parameter verification failed.", errors)
            return

        try:
            if fake.on_request is not None:
                fake.on_request(method, template)
            data = fake.handle(method, template, path_params, params)
        except _DropConnection:
            seen.status = -1
            self.close_connection = True
            return
        except PveError as e:
            fail(e.status, e.message, e.errors)
            return
        except Exception as e:  # a bug in the fake: answer like PVE would, and make it visible
            violation(f"fake error: {e!r}")
            fail(500, f"fake error: {e}")
            return
        seen.status = 200
        if template in fake.drip:
            self._drip(fake.drip_seconds)
            return
        if template in fake.padding:
            self._padded(fake.padding[template], {"data": data})
            return
        self._reply(200, "OK", {"data": data})

    def _drip(self, seconds: float) -> None:
        self.close_connection = True
        self.send_response(200, "OK")
        self.send_header("Content-Type", "application/json;charset=UTF-8")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        for _ in range(int(60 / seconds)):
            try:
                self.wfile.write(b" ")
                self.wfile.flush()
            except OSError:  # the client went away
                return
            time.sleep(seconds)

    def _padded(self, blanks: int, body: dict[str, Any]) -> None:
        self.close_connection = True
        raw = json.dumps(body).encode()
        self.send_response(200, "OK")
        self.send_header("Content-Type", "application/json;charset=UTF-8")
        self.send_header("Content-Length", str(blanks + len(raw)))
        self.end_headers()
        chunk = b" " * 65536
        try:
            for _ in range(blanks // len(chunk)):
                self.wfile.write(chunk)
            self.wfile.write(b" " * (blanks % len(chunk)) + raw)
        except OSError:  # the client went away
            return


def iter_endpoints(api: ApiDescription | None = None) -> Iterator[Endpoint]:
    """All endpoints of the API description (for tests that want to look things up)."""
    yield from (api or load_api()).endpoints.values()
