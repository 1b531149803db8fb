"""Each executor's `type`: `spoold validate` refuses what the executor would refuse at run time.

The sub-schemas declare the types (``$defs/type``, an enum) and what each one needs of the
product (``$defs/by_type``); compose_job_schema turns them into clauses of the job's schema.
This walks every installed executor's every type: a minimal job is valid, and without any
field it has, it is refused with a message that names the field.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from spoold.executors import lexware, proxmox, sevdesk
from spoold.executors.lexware import LexwareExecutor

from spoold.core.errors import ValidationIssue
from spoold.core.job import interpolate
from spoold.intake.validation import (
    JobValidator,
    compose_job_schema,
    job_validator,
    load_base_schema,
)
from spoold.run.registry import ExecutorRegistry
from tests.loopback import MethodHandler, serve_in_thread, stop_serving
from tests.test_executors import _context, _Log

REGISTRY = ExecutorRegistry.from_entry_points()
SCHEMAS = REGISTRY.schemas()
#: Every installed executor that declares its types, with them.
TYPED = {
    name: list(schema["$defs"]["type"]["enum"])
    for name, schema in SCHEMAS.items()
    if "type" in schema.get("$defs", {})
}

CUSTOMER = "5a0a5b4c-1111-4222-8333-944445555666"
INVOICE = "0b0c0d0e-1111-4222-8333-944445555666"
_GUEST = {"vmid": 100}
#: What every job of an executor has, and what each of its types adds: together the least a
#: job of that type can say. Every field in them is needed (the walk below checks that too).
PRODUCTS: dict[str, tuple[dict[str, Any], dict[str, dict[str, Any]]]] = {
    "proxmox": (
        {"host": "pve1.example.net", "node": "pve1", "token_id": "automation@pve!spoold",
         "token_secret": "${secret:PVE_TOKEN}"},
        {
            **{f"{g}_list": {} for g in ("kvm", "lxc")},
            "kvm_create": {},
            "lxc_create": {"params": {"ostemplate": "local:vztmpl/debian-12.tar.zst"}},
            **{f"{g}_{a}": _GUEST for g in ("kvm", "lxc") for a in (
                "status", "start", "stop", "shutdown", "delete", "config", "clone", "firewall",
                "metrics", "vncproxy", "vncwebsocket")},
            **{f"{g}_migrate": {**_GUEST, "params": {"target": "pve2"}} for g in ("kvm", "lxc")},
            **{f"{g}_resize": {**_GUEST, "params": {"disk": "scsi0", "size": "+1G"}}
               for g in ("kvm", "lxc")},
            **{f"{g}_snapshot": {**_GUEST, "snapname": "s1"} for g in ("kvm", "lxc")},
            "kvm_agent_exec": {**_GUEST, "command": ["uname", "-a"]},
            "api": {"api_command": "GET /version"},
        },
    ),
    "sevdesk": (
        {"api_token": "${secret:SEVDESK}"},
        {
            "create_invoice": {"contact_id": 1001, "invoice_data": {
                "invoice_date": "2026-11-20", "contact_person_id": 7,
                "positions": [{"name": "Hosting", "quantity": 1, "price": "9.99",
                               "tax_rate": 19}]}},
            "cancel_invoice": {"invoice_id": 5},
        },
    ),
    "lexware": (
        {"api_key": "${secret:LEXWARE}"},
        {
            "create_invoice": {"customer_id": CUSTOMER, "invoice_data": {
                "voucherDate": "2026-11-20",
                "lineItems": [{"name": "Hosting", "quantity": "1",
                               "unitPrice": {"netAmount": "9.99", "taxRatePercentage": 19}}]}},
            "cancel_invoice": {"invoice_id": INVOICE},
        },
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def validator() -> JobValidator:
    return job_validator(REGISTRY)


def _job(executor: str, type_: str | None, product: dict[str, Any], **extra: Any) -> bytes:
    document: dict[str, Any] = {"executor": executor}
    if type_ is not None:
        document["type"] = type_
    return yaml.safe_dump({**document, "product": product, **extra}, sort_keys=False).encode()


def _product(executor: str, type_: str) -> dict[str, Any]:
    common, by_type = PRODUCTS[executor]
    return copy.deepcopy({**common, **by_type[type_]})


def _fields(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The path of every key in a product, nested ones too (in list items as well)."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield (*path, key)
            yield from _fields(inner, (*path, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            yield from _fields(inner, (*path, index))


def _without(product: dict[str, Any], path: tuple[Any, ...]) -> dict[str, Any]:
    copied = copy.deepcopy(product)
    parent: Any = copied
    for step in path[:-1]:
        parent = parent[step]
    del parent[path[-1]]
    return copied


def _refusals(validator: JobValidator, data: bytes) -> list[ValidationIssue]:
    issues = validator.check(data, "job.yaml")
    assert issues, f"accepted:\n{data.decode()}"
    return issues


def _one(validator: JobValidator, data: bytes) -> ValidationIssue:
    issues = _refusals(validator, data)
    assert len(issues) == 1, issues
    return issues[0]


# --- every type of every executor -------------------------------------------------------------


def test_the_typed_executors_are_the_ones_with_types() -> None:
    built_in = {name for name in TYPED if REGISTRY.get(name).__module__.startswith("spoold.")}
    assert built_in == {"proxmox", "sevdesk", "lexware"} == set(PRODUCTS)


def _products_of(executor: str) -> None:
    if executor not in PRODUCTS:  # an installed plugin: its own tests know its products
        pytest.skip(f"no products of the {executor} plugin here")


@pytest.mark.parametrize("executor", sorted(TYPED))
def test_the_schema_lists_the_types_the_executor_runs(executor: str) -> None:
    _products_of(executor)
    declared = TYPED[executor]
    assert len(declared) == len(set(declared))
    assert set(PRODUCTS[executor][1]) == set(declared), "a type without a product above"
    by_type = SCHEMAS[executor]["$defs"].get("by_type", {})
    assert set(by_type) <= set(declared), "rules for a type that is not one"
    runs = {
        "proxmox": {*proxmox.SHORTCUTS, "api"} - {"lxc_agent_exec"},
        "sevdesk": set(sevdesk.TYPES),
        "lexware": set(lexware.TYPES),
    }
    assert set(declared) == runs[executor]


@pytest.mark.parametrize(
    ("executor", "type_"), [(name, t) for name, types in sorted(TYPED.items()) for t in types]
)
def test_every_type_takes_its_least_job_and_needs_each_field_of_it(
    validator: JobValidator, executor: str, type_: str
) -> None:
    _products_of(executor)
    product = _product(executor, type_)
    assert validator.check(_job(executor, type_, product), "job.yaml") == []
    # As a step it is the same, inheriting the job's executor and type or naming its own.
    step = {"id": "only", "product": product}
    inherited = yaml.safe_dump({"executor": executor, "type": type_, "steps": [step]}).encode()
    assert validator.check(inherited, "job.yaml") == []
    named = {"executor": "local", "steps": [{**step, "executor": executor, "type": type_}]}
    assert validator.check(yaml.safe_dump(named).encode(), "job.yaml") == []

    for path in _fields(product):
        issues = _refusals(validator, _job(executor, type_, _without(product, path)))
        where = ".".join(str(p) for p in path)
        field = path[-1]
        assert any(f"'{field}'" in issue.message and issue.line is not None for issue in issues), (
            f"{executor} {type_} without {where}: {issues}"
        )


def test_executors_without_types_leave_type_free(validator: JobValidator) -> None:
    for executor in sorted(set(SCHEMAS) - set(TYPED)):
        assert "by_type" not in SCHEMAS[executor].get("$defs", {})
    local = {"commands": "true"}
    assert validator.check(_job("local", "anything_at_all", local), "job.yaml") == []
    assert validator.check(_job("local", None, local), "job.yaml") == []


def test_a_plugin_schema_without_types_keeps_working() -> None:
    plugin = {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}
    checker = JobValidator(compose_job_schema(load_base_schema(), {"plugin": plugin}))
    assert checker.check(b"executor: plugin\ntype: whatever\nproduct: {path: x}\n", "j.yaml") == []
    assert checker.check(b"executor: plugin\nproduct: {path: x}\n", "j.yaml") == []


# --- the cases of issue 15 ----------------------------------------------------------------------


def _proxmox(type_: str | None, **fields: Any) -> bytes:
    product = {**PRODUCTS["proxmox"][0], **fields}
    return _job("proxmox", type_, product)


def test_an_unknown_proxmox_type_lists_the_types(validator: JobValidator) -> None:
    issue = _one(validator, _proxmox("kvm_explode", vmid=100))
    assert (issue.path, issue.line, issue.column) == ("type", 2, 7)
    assert issue.message.startswith("must be one of: kvm_list, kvm_create, kvm_status, ")
    assert issue.message.endswith(", api (got 'kvm_explode')")
    assert "lxc_agent_exec" not in issue.message


@pytest.mark.parametrize(
    ("type_", "fields", "missing"),
    [
        ("kvm_status", {}, "vmid"),
        ("lxc_start", {}, "vmid"),
        ("kvm_clone", {"newid": 300}, "vmid"),
        ("kvm_agent_exec", {"vmid": 100}, "command"),
        ("lxc_create", {}, "params"),
        ("lxc_create", {"params": {"hostname": "ct1"}}, "ostemplate"),
        ("kvm_migrate", {"vmid": 100}, "params"),
        ("kvm_resize", {"vmid": 100, "params": {"disk": "scsi0"}}, "size"),
        ("api", {}, "api_command"),
    ],
)
def test_a_shortcut_without_what_it_needs_is_refused(
    validator: JobValidator, type_: str, fields: dict[str, Any], missing: str
) -> None:
    issue = _one(validator, _proxmox(type_, **fields))
    assert issue.message == f"missing required field '{missing}'"
    if "params" in fields:
        assert issue.path == "product.params" and issue.line is not None
    else:
        assert (issue.path, issue.line) == ("product", 4)


def test_a_clone_without_newid_takes_the_next_free_one(validator: JobValidator) -> None:
    """Not refused: the executor asks /cluster/nextid (README; test_proxmox_executor)."""
    assert validator.check(_proxmox("kvm_clone", vmid=100), "job.yaml") == []


def test_a_snapshot_needs_its_name_unless_it_lists(validator: JobValidator) -> None:
    issue = _one(validator, _proxmox("kvm_snapshot", vmid=100))
    assert issue.message == "missing required field 'snapname' or 'snapshot'"
    assert validator.check(_proxmox("kvm_snapshot", vmid=100, snapshot="s1"), "j.yaml") == []
    listing = _proxmox("lxc_snapshot", vmid=100, snapshot_action="list")
    assert validator.check(listing, "job.yaml") == []


def test_lxc_agent_exec_is_refused_naming_what_to_use(validator: JobValidator) -> None:
    issue = _one(validator, _proxmox("lxc_agent_exec", vmid=101, command=["uname"]))
    assert (issue.path, issue.line, issue.column) == ("type", 2, 7)
    assert issue.message.startswith("'lxc_agent_exec' is not allowed here: containers have no")
    assert "ssh executor" in issue.message and "pct exec" in issue.message


def test_a_proxmox_job_names_a_type_or_an_api_command(validator: JobValidator) -> None:
    issue = _one(validator, _proxmox(None, vmid=100))
    assert (issue.message, issue.path, issue.line) == ("missing required field 'type'", "", 1)
    assert validator.check(_proxmox(None, api_command="GET /version"), "job.yaml") == []
    both = _one(validator, _proxmox("kvm_list", api_command="GET /version"))
    assert both.path == "product.api_command"
    assert "exclude each other; leave type out (or write type: api)" in both.message


@pytest.mark.parametrize("executor", ["sevdesk", "lexware"])
def test_an_invoice_job_has_a_known_type(validator: JobValidator, executor: str) -> None:
    product = _product(executor, "cancel_invoice")
    issue = _one(validator, _job(executor, "delete_invoice", product))
    assert issue.message == "must be one of: create_invoice, cancel_invoice (got 'delete_invoice')"
    assert (issue.path, issue.line) == ("type", 2)
    missing = _one(validator, _job(executor, None, product))
    assert (missing.message, missing.line) == ("missing required field 'type'", 1)


@pytest.mark.parametrize(
    ("executor", "type_", "path", "field"),
    [
        ("sevdesk", "cancel_invoice", ("invoice_id",), "invoice_id"),
        ("lexware", "cancel_invoice", ("invoice_id",), "invoice_id"),
        ("sevdesk", "create_invoice", ("contact_id",), "contact_id"),
        ("lexware", "create_invoice", ("customer_id",), "customer_id"),
        ("sevdesk", "create_invoice", ("invoice_data", "positions"), "positions"),
        ("lexware", "create_invoice", ("invoice_data", "lineItems"), "lineItems"),
        ("sevdesk", "create_invoice", ("invoice_data",), "invoice_data"),
        ("lexware", "create_invoice", ("invoice_data",), "invoice_data"),
    ],
)
def test_an_invoice_job_without_what_its_type_needs_is_refused(
    validator: JobValidator, executor: str, type_: str, path: tuple[str, ...], field: str
) -> None:
    product = _without(_product(executor, type_), path)
    issue = _one(validator, _job(executor, type_, product))
    assert issue.message == f"missing required field '{field}'"
    assert issue.path == ".".join(("product", *path[:-1])) and issue.line is not None


# --- steps run with the job's executor and type unless they name their own -----------------------


def test_steps_are_checked_with_the_type_they_run_with(validator: JobValidator) -> None:
    common = PRODUCTS["proxmox"][0]
    job = {
        "executor": "proxmox",
        "type": "kvm_status",
        "steps": [
            {"id": "a", "product": common},  # kvm_status, inherited: needs vmid
            {"id": "b", "needs": ["a"], "type": "kvm_list", "product": common},  # fine
            {"id": "c", "type": "lxc_agent_exec", "product": {**common, "vmid": 101}},
            {"id": "d", "executor": "sevdesk", "product": {"api_token": "t"}},  # kvm_status?
            {"id": "e", "executor": "local", "product": {"commands": "true"}},  # type is free
        ],
    }
    issues = _refusals(validator, yaml.safe_dump(job, sort_keys=False).encode())
    found = {(issue.path, issue.message.split(":")[0]) for issue in issues}
    assert found == {
        ("steps[0].product", "missing required field 'vmid'"),
        ("steps[2].type", "'lxc_agent_exec' is not allowed here"),
        ("steps[3]", "missing required field 'type'"),
    }, issues


def test_a_step_of_another_executor_runs_with_the_job_s_type(validator: JobValidator) -> None:
    step = {"id": "copy", "executor": "lexware", "product": {"api_key": "k"}}
    job = {"executor": "sevdesk", "type": "create_invoice", "steps": [step]}
    issues = _refusals(validator, yaml.safe_dump(job).encode())
    assert {(i.path, i.message) for i in issues} == {
        ("steps[0].product", "missing required field 'customer_id'"),
        ("steps[0].product", "missing required field 'invoice_data'"),
    }
    step["product"] = _product("lexware", "create_invoice")
    assert validator.check(yaml.safe_dump(job).encode(), "job.yaml") == []


def test_a_job_of_steps_needs_no_type_when_its_steps_name_theirs(validator: JobValidator) -> None:
    steps = [
        {"id": "a", "type": "cancel_invoice", "product": _product("sevdesk", "cancel_invoice")},
        {"id": "b", "product": _product("sevdesk", "cancel_invoice")},
    ]
    job = yaml.safe_dump({"executor": "sevdesk", "steps": steps}).encode()
    issue = _one(validator, job)
    assert (issue.path, issue.message) == ("steps[1]", "missing required field 'type'")


# --- the command line ---------------------------------------------------------------------------


def test_spoold_validate_prints_file_line_column_path_and_message(tmp_path: Path) -> None:
    explode = tmp_path / "explode.yaml"
    explode.write_bytes(_proxmox("kvm_explode", vmid=100))
    status = tmp_path / "status.yaml"
    status.write_bytes(_proxmox("kvm_status"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOOLD_")}
    spoold = Path(sys.executable).parent / "spoold"
    for path, expected in (
        (explode, f"{explode}:2:7: type: must be one of: kvm_list, kvm_create, "),
        (status, f"{status}:4:3: product: missing required field 'vmid'"),
    ):
        run = subprocess.run(
            [str(spoold), "validate", str(path)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert run.returncode == 1, run.stdout + run.stderr
        assert run.stderr.startswith(expected), run.stderr


# --- lexware: plain http is refused where the request is made ------------------------------------


class _Counting(MethodHandler):
    """Counts every request that reaches it, whatever it is."""

    seen: list[str]

    def serve(self, method: str) -> None:
        self.seen.append(f"{method} {self.path}")
        self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def listening() -> Iterator[tuple[int, list[str]]]:
    seen: list[str] = []
    handler = type("Handler", (_Counting,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = serve_in_thread(server)
    yield server.server_address[1], seen
    stop_serving(server, thread)


def test_lexware_refuses_a_base_url_that_resolves_to_plain_http(
    validator: JobValidator, listening: tuple[int, list[str]], tmp_path: Path
) -> None:
    port, seen = listening
    # 127.1 is 127.0.0.1 to the resolver but no loopback name to the check: the request would
    # reach the server above if nothing stopped it. (The schema wants the scheme written out.)
    variables = {"API_HOST": "127.1"}
    written = {**_product("lexware", "cancel_invoice"), "base_url": f"http://${{API_HOST}}:{port}"}
    job = _job("lexware", "cancel_invoice", written, variables=variables)
    assert validator.check(job, "job.yaml") == []  # the host is not known before the run
    product = interpolate(written, variables, lambda name: "the-key")
    log = _Log()
    context = _context(
        tmp_path, product, log, executor="lexware", type="cancel_invoice", timeout=10.0,
        settings={"rate_dir": str(tmp_path / "rate")},
    )  # fmt: skip
    result = LexwareExecutor().run(context)
    assert not result.succeeded
    assert f"base_url: http://127.1:{port} is plain http" in str(result.error)
    assert seen == []


def test_every_lexware_request_checks_its_url(
    listening: tuple[int, list[str]], tmp_path: Path
) -> None:
    port, seen = listening
    product = {"api_key": "the-key", "base_url": f"http://127.1:{port}"}
    context = _context(tmp_path, product, _Log(), executor="lexware", type="cancel_invoice",
                       settings={"rate_dir": str(tmp_path / "rate")})  # fmt: skip
    api = lexware._Api(context)
    try:
        with pytest.raises(Exception, match="plain http: the API key would travel in clear"):
            api.call("GET", f"/v1/invoices/{INVOICE}")
    finally:
        api.close()
    assert seen == []


def test_the_composed_schema_shows_the_types(validator: JobValidator) -> None:
    """`spoold schema` (and an editor using it) sees the enum and the per-type rules."""
    schema = compose_job_schema(load_base_schema(), SCHEMAS)
    text = json.dumps(schema)
    assert schema["$defs"]["product.proxmox"]["$defs"]["type"]["enum"] == TYPED["proxmox"]
    assert "by_type" not in schema["$defs"]["product.proxmox"]["$defs"]
    assert '"required": ["vmid"]' in text
