"""The ``proxmox`` executor: one Proxmox VE API call, a shortcut or a raw one, through proxmoxer.

A call that starts a task (it answers a UPID) is waited for and the task's log copied into the
job's log. Every request is bounded by the attempt's timeout and ended by its cancel (a task it
started is then stopped); an answer larger than 16 MiB is refused.

A guest this executor creates or clones carries a line ``spoold-job: <job_id>`` (and the step)
in its description: only a guest with that line is adopted as the one an earlier attempt made.
The vmid a create without one takes from ``/cluster/nextid`` is noted in the job's log before
the create is sent, so that a retry after a lost answer uses it again (Proxmox refuses a second
guest with one vmid) instead of creating another guest with the next free one.

proxmoxer and requests are imported when a job runs, never with this module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from spoold.executors._vendor import MIB, Bound, Deadline, find_note, leave_note
from spoold.executors.base import ExecResult, Executor, RunContext, Stopped, within_workdir

from spoold.core.errors import ExecutorError, ExecutorNotAvailable

GUESTS = {"kvm": "qemu", "lxc": "lxc"}
_GUEST = "/nodes/{node}/{guest}/{vmid}"
#: action -> (method, path template, kind); a shortcut is ``kvm_<action>`` or ``lxc_<action>``.
#: The kind says what happens around the call (see ``ProxmoxExecutor.execute``).
ACTIONS: dict[str, tuple[str, str, str]] = {
    "list": ("GET", "/nodes/{node}/{guest}", "call"),
    "create": ("POST", "/nodes/{node}/{guest}", "create"),
    "status": ("GET", _GUEST + "/status/current", "call"),
    "start": ("POST", _GUEST + "/status/start", "call"),
    "stop": ("POST", _GUEST + "/status/stop", "call"),
    "shutdown": ("POST", _GUEST + "/status/shutdown", "call"),
    "delete": ("DELETE", _GUEST, "call"),
    "config": ("GET", _GUEST + "/config", "config"),  # PUT (synchronous) when params are given
    "clone": ("POST", _GUEST + "/clone", "clone"),
    "migrate": ("POST", _GUEST + "/migrate", "call"),
    "resize": ("PUT", _GUEST + "/resize", "call"),
    "snapshot": ("POST", _GUEST + "/snapshot", "snapshot"),
    "firewall": ("GET", _GUEST + "/firewall/rules", "firewall"),  # POST when a rule is given
    "metrics": ("GET", _GUEST + "/rrddata", "metrics"),
    "agent_exec": ("POST", _GUEST + "/agent/exec", "agent"),
    "vncproxy": ("POST", _GUEST + "/vncproxy", "vnc"),
    "vncwebsocket": ("POST", _GUEST + "/vncproxy", "vnc"),
}
SHORTCUTS = sorted(f"{g}_{a}" for g in GUESTS for a in ACTIONS)
_API_COMMAND = re.compile(r"(GET|POST|PUT|DELETE)\s+(/[A-Za-z0-9_./{}:@!=-]*)\Z")
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_RETRYABLE_STATUS = frozenset({502, 503, 504, 595, 596, 597})
_TRANSIENT = re.compile(r"timeout|can't lock|locked|temporar", re.IGNORECASE)
_POLL_FIRST, _POLL_MAX = 0.2, 2.0
_LOG_PAGE = 500
#: Lines of a task's log copied at most: past them the log is on the node.
_MAX_LOG_LINES = 50_000
_MAX_ANSWER = 16 * MIB  # /cluster/resources of a large cluster fits
_READ_SECONDS = 30.0  # per read from the socket
_REQUEST_SECONDS = 120.0  # a whole request, answer and all
#: How long stopping a task may take once the attempt is cancelled or out of time.
_STOP_GRACE = 10.0
_VMID_NOTE = re.compile(r"proxmox: vmid (\d+) is taken for the guest this unit creates\b.*")


def _proxmoxer() -> Any:
    try:
        import proxmoxer  # type: ignore[import-untyped]  # noqa: PLC0415 - optional SDK
    except ImportError as exc:
        raise ExecutorNotAvailable(
            "the proxmox executor is not available: proxmoxer is not installed. "
            "Run `pip install spoold[proxmox]`"
        ) from exc
    return proxmoxer


class ProxmoxExecutor(Executor):
    """Runs one Proxmox VE API call (``type:`` a shortcut, or ``api_command``), waiting for its task."""

    name = "proxmox"
    schema_resource = "proxmox.schema.json"

    @classmethod
    def validate(cls, product: Mapping[str, Any]) -> list[str]:
        """TLS options that contradict each other, an ``api_command`` that cannot be sent."""
        problems = []
        tls = [f for f in ("ca_file", "fingerprint") if f in product]
        if len(tls) == 2:
            problems.append("ca_file and fingerprint: give one of them, not both")
        if product.get("verify_tls") is False and tls:
            problems.append(f"verify_tls: false contradicts {tls[0]}: drop one of them")
        if "ca_file" in product and not str(product["ca_file"]).startswith(("/", "~", "${")):
            problems.append(
                f"ca_file: {product['ca_file']} is a relative path: give an absolute one"
            )
        command = product.get("api_command")
        if command is not None:
            match = _API_COMMAND.match(str(command).strip())
            if match is None:
                problems.append(
                    f"api_command: {command!r} is not 'METHOD /path' "
                    "(GET, POST, PUT or DELETE, e.g. 'POST /nodes/{node}/qemu/{vmid}/status/start')"
                )
            else:
                for name in _PLACEHOLDER.findall(match.group(2)):
                    if name not in ("node", "vmid"):
                        problems.append(
                            f"api_command: only {{node}} and {{vmid}} are filled in, not {{{name}}}"
                        )
                    elif name not in product:
                        problems.append(f"api_command: {{{name}}} is used but {name} is not given")
        return problems

    def execute(self, ctx: RunContext) -> ExecResult:
        proxmoxer = _proxmoxer()
        product = ctx.product
        api = _Api(proxmoxer, ctx)
        node = _segment(product, "node")
        if "api_command" in product:
            if ctx.type not in (None, "api"):
                raise ExecutorError(
                    f"proxmox: type {ctx.type!r} and api_command exclude each other"
                )
            method, path = str(product["api_command"]).split(None, 1)
            path = _PLACEHOLDER.sub(lambda m: str(product[m.group(1)]), path.strip())
            answer = api.call(method, path, _form(product.get("api_params") or {}))
            return api.finish(answer, {"node": node, "vmid": _vmid(product, "vmid")})
        guest_kind, _, action = str(ctx.type or "").partition("_")
        if guest_kind not in GUESTS or action not in ACTIONS:
            raise ExecutorError(
                f"proxmox: unknown type {ctx.type!r}: give one of {', '.join(SHORTCUTS)}, "
                "or api_command"
            )
        method, template, kind = ACTIONS[action]
        guest = GUESTS[guest_kind]
        if "{vmid}" in template and kind != "create" and "vmid" not in product:
            raise ExecutorError(f"proxmox: {ctx.type} needs vmid")
        vmid = _vmid(product, "vmid")
        params = _form(product.get("params") or {})
        result: dict[str, Any] = {"node": node, "vmid": vmid}
        findable = True  # a retry can tell whether this call made its guest

        if kind in ("create", "clone"):
            key, new = ("vmid", vmid) if kind == "create" else ("newid", _vmid(product, "newid"))
            if kind == "create" and guest == "lxc" and "ostemplate" not in params:
                raise ExecutorError("proxmox: lxc_create needs params.ostemplate")
            owner = _owner(ctx)
            mine = str(params.get("description") or "").rstrip()
            params["description"] = f"{mine}\n{owner}" if mine else owner
            new, found, findable = _claim(api, guest, new, owner)
            if found is not None:
                return api.adopt(found, result | {key: new})
            params[key] = new
            result |= {key: new}
        elif kind == "config" and params:
            method = "PUT"
        elif kind == "firewall" and product.get("rule"):
            method, params = "POST", _form(product["rule"])
        elif kind == "metrics":
            params.setdefault("timeframe", str(product.get("timeframe", "hour")))
        elif kind == "snapshot":
            method, template, params = _snapshot(product, guest_kind, template, params)
        elif kind == "agent":
            if guest == "lxc":
                raise ExecutorError(
                    "proxmox: lxc_agent_exec is not possible: the Proxmox API has no guest agent "
                    "for containers (only /nodes/{node}/qemu/{vmid}/agent/exec for VMs); run "
                    "commands in a container with the ssh executor, or `pct exec` on the node"
                )
            if not product.get("command"):
                raise ExecutorError("proxmox: kvm_agent_exec needs command (a list)")
            params = {"command": [str(c) for c in product["command"]]}
            if "input" in product:
                params["input-data"] = str(product["input"])
        elif kind == "vnc" and action == "vncwebsocket":
            params["websocket"] = 1
        elif action == "migrate":
            result["target"] = params.get("target")
        path = template.format(node=node, guest=guest, vmid=vmid, **_snap(product))
        try:
            answer = api.call(method, path, params)
        except ExecutorError as exc:
            if findable or not exc.retryable:
                raise
            raise ExecutorError(
                f"{exc}; {guest} {result.get('vmid') or result.get('newid')} may have been "
                "made, and a retry could not tell (no job log to note its vmid in): look in the "
                "cluster, then run the job again with that vmid"
            ) from exc
        if kind == "agent":
            return api.agent_exec(path, int(answer["pid"]), result)
        if kind == "vnc":
            return api.vnc(answer, path, action == "vncwebsocket", result)
        outcome = api.finish(answer, result)
        if kind in ("create", "clone") and outcome.succeeded:
            outcome.result["created"] = True
        return outcome


def _owner(ctx: RunContext) -> str:
    """The line in a guest's description that says this job (this step of it) made it."""
    step = "/".join(ctx.log.sections)
    return f"spoold-job: {ctx.job_id}" + (f" step {step}" if step else "")


def _claim(
    api: _Api, guest: str, explicit: int | None, owner: str
) -> tuple[int, dict[str, Any] | None, bool]:
    """The vmid a create or clone makes; the guest with it if this job made that already (a
    retry after a lost answer); and whether a retry can find it (its vmid is kept)."""
    ctx = api.ctx
    if explicit is not None:
        found = api.find_guest(explicit)
        if found is not None and not api.owned(found, guest, owner):
            raise ExecutorError(
                f"proxmox: vmid {explicit} already exists ({_describe(found)}): it is taken, "
                f"and not by this job (its description has no line {owner!r}): choose another "
                "vmid, or leave it out to take the next free one"
            )
        return explicit, found, True
    noted = find_note(ctx, _VMID_NOTE)
    if noted is not None:
        vmid = int(noted.group(1))
        ctx.log.info(f"proxmox: an earlier attempt took vmid {vmid}: looking for its guest")
        found = api.find_guest(vmid)
        if found is None or api.owned(found, guest, owner):
            return vmid, found, True
        ctx.log.info(f"proxmox: vmid {vmid} is someone else's: the earlier create never happened")
    vmid = int(api.call("GET", "/cluster/nextid", {}))
    kept = leave_note(
        ctx, f"proxmox: vmid {vmid} is taken for the guest this unit creates (the next free one)"
    )
    if not kept and ctx.read_log is not None:  # the line was lost: a full disk
        raise ExecutorError(
            f"proxmox: cannot note vmid {vmid} in the job's log: not creating a guest that a "
            "retry could not find again",
            retryable=True,
        )
    return vmid, None, kept


def _describe(found: Mapping[str, Any]) -> str:
    return f"{found.get('type')} {found.get('vmid')} {found.get('name')!r} on {found.get('node')}"


def _vmid(product: Mapping[str, Any], field: str) -> int | None:
    value = product.get(field)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ExecutorError(f"proxmox: {field} {value!r} is not a number") from None


def _segment(product: Mapping[str, Any], field: str) -> str:
    """A value that becomes one segment of the path: a '/' in it would change the endpoint."""
    value = str(product.get(field))
    if not _SEGMENT.match(value):
        raise ExecutorError(f"proxmox: {field} {value!r} is not a valid name")
    return value


def _snap(product: Mapping[str, Any]) -> dict[str, str]:
    if "snapname" not in product and "snapshot" not in product:
        return {"snapname": ""}
    return {"snapname": _segment(product, "snapname" if "snapname" in product else "snapshot")}


def _snapshot(
    product: Mapping[str, Any], guest_kind: str, template: str, params: dict[str, Any]
) -> tuple[str, str, dict[str, Any]]:
    """The call of ``snapshot_action``: create (default), delete, rollback or list."""
    action = str(product.get("snapshot_action", "create"))
    name = _snap(product)["snapname"]
    if action != "list" and not name:
        raise ExecutorError(f"proxmox: {guest_kind}_snapshot needs snapname")
    if action == "create":
        return "POST", template, params | {"snapname": name}
    if action == "delete":
        return "DELETE", template + "/{snapname}", params
    if action == "rollback":
        return "POST", template + "/{snapname}/rollback", params
    return "GET", template, {}


def _form(params: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters as the API reads them: booleans as 1/0 (requests would send 'True')."""
    return {
        str(k): (int(v) if isinstance(v, bool) else v) for k, v in params.items() if v is not None
    }


class _Api:
    """One connection to one Proxmox VE host, with the job's log, deadline and cancel."""

    def __init__(self, proxmoxer: Any, ctx: RunContext) -> None:
        import requests  # noqa: PLC0415 - proxmoxer's own dependency

        self._requests, self._proxmoxer, self.ctx = requests, proxmoxer, ctx
        product = ctx.product
        host, _, port = str(product["host"]).rpartition(":")
        if not port.isdigit() or not host or (":" in host and not host.endswith("]")):
            host, port = str(product["host"]), "8006"
        self.host, self.port = host, int(port)
        user, _, token_name = str(product["token_id"]).partition("!")
        verify: bool | str = True
        if product.get("verify_tls") is False:
            verify = False
            ctx.log.error(
                f"proxmox: TLS verification is OFF (verify_tls: false): anyone between spoold "
                f"and {host} can read the API token; pin the certificate with fingerprint"
            )
        elif "ca_file" in product:
            verify = str(Path(str(product["ca_file"])).expanduser())
        elif "fingerprint" in product:
            verify = False  # the pin below replaces the CA check
        self.api = proxmoxer.ProxmoxAPI(
            host.strip("[]"), port=self.port, user=user, token_name=token_name,
            token_value=str(product["token_secret"]), verify_ssl=verify, backend="https",
            timeout=_READ_SECONDS,
        )  # fmt: skip
        session = self.api._store["session"]  # proxmoxer offers no other way to reach it
        session.trust_env = False  # a proxy from the environment must not see the token
        self.bound = Bound(Deadline.of(ctx), name="proxmox", max_body=_MAX_ANSWER,
                           request_seconds=_REQUEST_SECONDS)  # fmt: skip
        pin = {}
        if "fingerprint" in product:  # urllib3 compares the peer certificate's SHA-256
            pin["assert_fingerprint"] = str(product["fingerprint"]).replace(":", "").lower()
        self.bound.mount(session, pin)

    def call(
        self, method: str, path: str, params: Mapping[str, Any], *, quiet: bool = False
    ) -> Any:
        """One request; ExecutorError with the reason, retryable where a retry can help."""
        if not quiet:  # polls would fill the log of a long task
            names = f" ({', '.join(sorted(params))})" if params else ""
            self.ctx.log.info(f"proxmox: {method} {path}{names}")  # names: values may be secret
        where = f"{self.host}:{self.port}"
        errors = self._requests.exceptions
        try:
            resource = self.api(path.strip("/"))
            return getattr(resource, method.lower())(**dict(params))
        except self._proxmoxer.ResourceException as exc:
            detail = f"{exc.content}" + (f" {exc.errors}" if exc.errors else "")
            retry = exc.status_code in _RETRYABLE_STATUS or (
                exc.status_code == 500 and _TRANSIENT.search(detail) is not None
            )
            if exc.status_code == 401:
                detail += " (check token_id and token_secret)"
            message = f"proxmox: {method} {path} failed: {exc.status_code} {detail}"
            raise ExecutorError(message, retryable=retry) from exc
        except errors.SSLError as exc:
            raise ExecutorError(
                f"proxmox: the TLS certificate of {where} is not trusted: {_reason(exc)} "
                "(give ca_file, or fingerprint with the certificate's SHA-256 fingerprint)"
            ) from exc
        except (errors.ConnectionError, errors.Timeout) as exc:
            reason = _reason(exc)
            # A name that does not exist stays so; a DNS server that did not answer may not.
            unknown = "Failed to resolve" in reason and "Temporary failure" not in reason
            raise ExecutorError(
                f"proxmox: cannot reach {where}: {reason}", retryable=not unknown
            ) from exc

    def find_guest(self, vmid: int) -> dict[str, Any] | None:
        """The cluster's guest with this vmid (any node, VM or container), or None."""
        for resource in self.call("GET", "/cluster/resources", {"type": "vm"}) or []:
            if str(resource.get("vmid")) == str(vmid):
                return dict(resource)
        return None

    def owned(self, found: Mapping[str, Any], guest: str, owner: str) -> bool:
        """Whether the guest ``found`` is the one this job made: its description has the line
        ``owner``. ExecutorError (retryable) while it is still being made and cannot tell."""
        if found.get("type") != guest:
            return False
        node = _segment(found, "node")
        config = self.call("GET", f"/nodes/{node}/{guest}/{int(found['vmid'])}/config", {})
        config = config if isinstance(config, Mapping) else {}
        description = str(config.get("description") or "")
        if owner in (line.strip() for line in description.splitlines()):
            return True
        lock = config.get("lock") or found.get("lock")
        if lock in ("create", "clone"):  # its description is written when it is done
            raise ExecutorError(
                f"proxmox: vmid {found['vmid']} is being made (lock: {lock}); whether by this "
                "job its description says once that is done: a retry looks again",
                retryable=True,
            )
        return False

    def adopt(self, found: dict[str, Any], result: dict[str, Any]) -> ExecResult:
        """A create whose guest an earlier attempt of this job made (``owned``)."""
        self.ctx.log.info(f"proxmox: vmid {found.get('vmid')} already exists: {_describe(found)}")
        if found.get("lock") in ("create", "clone"):
            raise ExecutorError(
                f"proxmox: vmid {found.get('vmid')} is still being made by an earlier attempt "
                f"(lock: {found['lock']})",
                retryable=True,
            )
        self.ctx.log.info("proxmox: this job made it: not creating it again (a retry)")
        return ExecResult(0, result=result | {"created": False, "existing": found})

    def finish(self, answer: Any, result: dict[str, Any]) -> ExecResult:
        """The job's result from an answer: a task is waited for, data is kept."""
        if isinstance(answer, str) and answer.startswith("UPID:"):
            return self.wait_task(answer, result)
        result["data"] = answer
        return ExecResult(0, result=result)

    def wait_task(self, upid: str, result: dict[str, Any]) -> ExecResult:
        """Poll the task until it stops; stop it on timeout or cancel; keep its log."""
        result["upid"] = upid
        self.ctx.log.info(f"proxmox: waiting for task {upid}")
        interval = _POLL_FIRST
        while True:
            # A cancel or the timeout, come while it waited, stops the next call before it is
            # sent (the session's Bound): Stopped.
            try:
                status = self.call("GET", _task_path(upid) + "/status", {}, quiet=True)
            except Stopped as stopped:
                return self._stop_task(upid, "cancel" if stopped.cancelled else "timeout", result)
            if status.get("status") == "stopped":
                break
            self._sleep(interval)
            interval = min(interval * 2, _POLL_MAX)
        self._copy_log(upid)
        exitstatus = str(status.get("exitstatus", ""))
        result["exitstatus"] = exitstatus
        if exitstatus == "OK":
            return ExecResult(0, result=result)
        if exitstatus.startswith("WARNINGS"):
            self.ctx.log.info(f"proxmox: the task ended with {exitstatus}: see its log above")
            return ExecResult(0, result=result)
        return ExecResult(
            1, f"proxmox task {status.get('type', '')} failed: {exitstatus}", result=result
        )

    def _stop_task(self, upid: str, stop: str, result: dict[str, Any]) -> ExecResult:
        """Stop the task on a cancel or timeout, within a grace of its own; keep its log."""
        self.ctx.log.error(f"proxmox: {stop}: stopping task {upid}")
        with self.bound.grace(_STOP_GRACE):
            try:
                self.call("DELETE", _task_path(upid), {})
            except ExecutorError as exc:  # the attempt ends either way
                self.ctx.log.error(str(exc))
            self._copy_log(upid)
        return ExecResult(None, None, stop != "cancel", stop == "cancel", result)

    def agent_exec(self, path: str, pid: int, result: dict[str, Any]) -> ExecResult:
        """Wait for a guest agent command; its output into the log, its exit code the job's."""
        result["pid"] = pid
        interval = _POLL_FIRST
        while True:
            try:
                status = self.call("GET", path + "-status", {"pid": pid}, quiet=True)
            except Stopped as stopped:
                self.ctx.log.error(f"proxmox: {stopped}: leaving guest pid {pid} running")
                return stopped.result(result)
            if status.get("exited"):
                break
            self._sleep(interval)
            interval = min(interval * 2, _POLL_MAX)
        for field, stderr in (("out-data", False), ("err-data", True)):
            for line in str(status.get(field) or "").splitlines():
                self.ctx.log.output(line.encode(), stderr=stderr)
            if status.get(field.replace("data", "truncated")):
                self.ctx.log.error(f"proxmox: the guest agent truncated {field}")
        if status.get("signal") is not None:
            return ExecResult(
                None, f"the guest command was killed by signal {status['signal']}", result=result
            )
        code = int(status.get("exitcode", 0))
        result["exitcode"] = code
        return ExecResult(code, None if code == 0 else f"exit code {code}", result=result)

    def vnc(
        self, answer: dict[str, Any], path: str, websocket: bool, result: dict[str, Any]
    ) -> ExecResult:
        """A console proxy: its port in the result, its ticket only in ``ticket_file``."""
        # The ticket opens the console: it stays out of the log and status.json.
        result |= {k: answer[k] for k in ("port", "user", "upid") if k in answer}
        product = self.ctx.product
        if websocket:
            params = {"port": answer["port"], "vncticket": answer["ticket"]}
            self.call("GET", path.replace("vncproxy", "vncwebsocket"), params)
            result["websocket_url"] = (
                f"wss://{self.host}:{self.port}/api2/json{path.replace('vncproxy', 'vncwebsocket')}"
                f"?port={answer['port']}&vncticket=<ticket>"
            )
        if "ticket_file" in product:
            target = within_workdir(self.ctx, str(product["ticket_file"]))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch(mode=0o600)
            target.write_text(str(answer.get("ticket", "")) + "\n")
            result["ticket_file"] = str(product["ticket_file"])
        self.ctx.log.info(f"proxmox: console proxy on port {answer.get('port')}")
        return ExecResult(0, result=result)

    def _copy_log(self, upid: str) -> None:
        """Copy the task's log into the job's, page by page: until a page is short or brings
        no line not copied yet, at most _MAX_LOG_LINES, within the attempt's deadline."""
        base, start = _task_path(upid) + "/log", 0
        while start < _MAX_LOG_LINES:
            try:
                lines = self.call("GET", base, {"start": start, "limit": _LOG_PAGE}, quiet=True)
            except ExecutorError as exc:  # the task's outcome matters more than its log
                self.ctx.log.error(f"proxmox: cannot read the task log: {exc}")
                return
            lines = [line for line in lines or [] if isinstance(line, Mapping)]
            # Line numbers count from 1: a page of lines copied already is not progress.
            fresh = [line for line in lines if _is_new(line, start)]
            for line in fresh:
                text = str(line.get("t", ""))
                if text != "no content":
                    self.ctx.log.output(
                        f"task: {text}".encode(), stderr=text.startswith("TASK ERROR")
                    )
            if len(lines) < _LOG_PAGE or not fresh:
                return
            start += len(lines)
        self.ctx.log.error(
            f"proxmox: the task log is longer than {_MAX_LOG_LINES} lines: the rest is on the "
            f"node (pvenode task log {upid})"
        )

    def _sleep(self, seconds: float) -> None:
        left = self.bound.deadline.left()
        if left is not None:
            seconds = max(0.0, min(seconds, left))
        self.ctx.cancel.wait(seconds)


def _task_path(upid: str) -> str:
    """The API path of a task, on the node its UPID names."""
    return f"/nodes/{upid.split(':')[1]}/tasks/{upid}"


def _is_new(line: Mapping[str, Any], start: int) -> bool:
    """Whether a line of a task's log read from ``start`` is past it (a line without a
    number counts as new: _MAX_LOG_LINES still bounds them)."""
    number = line.get("n")
    return not isinstance(number, int) or number > start


def _reason(exc: Exception) -> str:
    """The innermost reason of a requests error, without its URL and pool noise."""
    cause: BaseException = (
        exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else exc
    )
    cause = getattr(cause, "reason", None) or cause  # urllib3's MaxRetryError wraps the cause
    if len(cause.args) > 1 and isinstance(cause.args[-1], BaseException):  # ProtocolError
        cause = cause.args[-1]
    text = re.sub(r"^(?:<[^>]*>|\w+\(host=[^)]*\)): ", "", str(cause))
    return text or type(cause).__name__
