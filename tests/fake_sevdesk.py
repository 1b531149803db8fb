"""A fake sevDesk API for tests, checked against sevDesk's own OpenAPI description.

Every request is matched against ``../shared/apis/sevdesk-openapi-2025-07-28.yaml`` (read at
run time, never copied into the project): method + path must exist, query parameters must be
declared with a value of their type, a JSON body must follow the operation's request schema
(required fields, types, enums, no readOnly or undeclared fields). What the description does
not allow is answered 400 and recorded in ``FakeSevdesk.violations``; tests assert it is [].

One quirk of the vendor's file: ``saveInvoice`` lists ``invoicePos`` as required but declares
``invoicePosSave`` (what sevDesk reads); the fake requires the declared one.

State: contacts and invoices, enough for saveInvoice, GET /Invoice (filters by contact and
date), GET /Invoice/{id} and cancelInvoice. Hooks: ``crash_after_create`` (the next create is
stored, then the connection is dropped unanswered; ``crash_after_cancel`` likewise for
cancelInvoice), ``answer_after_create`` (the next create is
stored, then answered with this status), ``fail_with`` + ``fail_count`` (the next N requests
answer that status without doing anything).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import re
import threading
from decimal import ROUND_HALF_UP, Decimal
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import yaml

from tests.apis import api_description
from tests.loopback import serve_in_thread, stop_serving

SPEC_PATH = api_description("sevdesk-openapi-2025-07-28.yaml")
BASE_PATH = "/api/v1"
_CENT = Decimal("0.01")
Schema = dict[str, Any]


@cache
def spec() -> dict[str, Any]:
    """The vendor's OpenAPI document, parsed once."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with SPEC_PATH.open(encoding="utf-8") as file:
        return dict(yaml.load(file, Loader=loader))


@cache
def _routes() -> list[tuple[re.Pattern[str], str]]:
    routes = []
    for template in spec()["paths"]:
        rx = re.sub(r"\\\{[^}]+\\\}", r"[^/]+", re.escape(template))
        routes.append((re.compile(rx + r"\Z"), template))
    return routes


def _resolve(schema: Schema) -> Schema:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = spec()["components"]["schemas"][name]
    return schema


def check_body(value: Any, schema: Schema, where: str) -> list[str]:
    """Problems of a JSON value against an OpenAPI 3.0 schema (the parts a client gets wrong)."""
    schema = _resolve(schema)
    if value is None:
        return [] if schema.get("nullable") else [f"{where}: null is not allowed"]
    typ = schema.get("type") or ("object" if "properties" in schema else None)
    problems: list[str] = []
    if typ == "object":
        if not isinstance(value, dict):
            return [f"{where}: expected an object, got {type(value).__name__}"]
        props = schema.get("properties") or {}
        for listed in schema.get("required") or []:
            # saveInvoice requires invoicePos but declares invoicePosSave (what sevDesk reads)
            name = f"{listed}Save" if listed not in props and f"{listed}Save" in props else listed
            if name in props and name not in value:
                problems.append(f"{where}.{name}: required")
        for name, item in value.items():
            if name not in props:
                problems.append(f"{where}.{name}: not in the schema")
                continue
            sub = _resolve(props[name])
            if sub.get("readOnly"):
                problems.append(f"{where}.{name}: read-only")
            problems += check_body(item, sub, f"{where}.{name}")
    elif typ == "array":
        if not isinstance(value, list):
            return [f"{where}: expected an array"]
        for index, item in enumerate(value):
            problems += check_body(item, schema.get("items") or {}, f"{where}[{index}]")
    elif typ == "string" and not isinstance(value, str):
        problems.append(f"{where}: expected a string, got {value!r}")
    elif typ == "integer" and (isinstance(value, bool) or not isinstance(value, int)):
        problems.append(f"{where}: expected an integer, got {value!r}")
    elif typ == "number" and (
        isinstance(value, bool) or not isinstance(value, int | Decimal | float)
    ):
        problems.append(f"{where}: expected a number, got {value!r}")
    elif typ == "boolean" and not isinstance(value, bool):
        problems.append(f"{where}: expected a boolean, got {value!r}")
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: {value!r} is not one of {schema['enum']}")
    return problems


def check_query(value: str, schema: Schema, where: str) -> list[str]:
    typ = schema.get("type", "string")
    if typ == "integer" and not re.fullmatch(r"-?\d+", value):
        return [f"{where}: {value!r} is not an integer"]
    if typ == "number" and not re.fullmatch(r"-?\d+(?:\.\d+)?", value):
        return [f"{where}: {value!r} is not a number"]
    if "enum" in schema and value not in [str(e) for e in schema["enum"]]:
        return [f"{where}: {value!r} is not one of {schema['enum']}"]
    return []


class FakeSevdesk:
    """The fake on 127.0.0.1 over plain HTTP; ``base_url`` is what a product points to."""

    def __init__(self, token: str = "0123456789abcdef0123456789abcdef") -> None:
        self.token = token
        self.violations: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self.contacts: set[int] = {1001, 1002}
        self.invoices: dict[int, dict[str, Any]] = {}
        self.cancelled: set[int] = set()
        self.crash_after_create = False
        self.crash_after_cancel = False
        self.answer_after_create: int | None = None
        #: Set: a create is stored, then its answer waits for the event (a daemon killed meanwhile).
        self.hold_after_create: threading.Event | None = None
        self.fail_with: int | None = None
        self.fail_count = 0
        self._ids = itertools.count(5001)
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}{BASE_PATH}"
        self._thread: threading.Thread | None = None

    def __enter__(self) -> FakeSevdesk:
        self._thread = serve_in_thread(self._server)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        stop_serving(self._server, self._thread)

    def count(self, invoice_type: str = "RE") -> int:
        return sum(1 for inv in self.invoices.values() if inv["invoiceType"] == invoice_type)

    # -- the API -------------------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, headers: Any, body: bytes) -> tuple[int, Any]:
        """(status, JSON answer); status 0 means: drop the connection without answering."""
        url = urlsplit(raw_path)
        path = url.path
        self.requests.append((method, path))
        if not path.startswith(BASE_PATH):
            return self._violation(404, f"{method} {path}: not under {BASE_PATH}")
        path = path[len(BASE_PATH) :]
        template = next((t for rx, t in _routes() if rx.match(path)), None)
        operation = spec()["paths"].get(template or "", {}).get(method.lower())
        if operation is None:
            return self._violation(404, f"{method} {path}: not in the description")
        problems = self._check(operation, url.query, body, f"{method} {template}")
        if problems:
            return self._violation(400, "; ".join(problems))
        auth = headers.get("Authorization")
        if auth is None:
            return self._violation(401, f"{method} {path}: no Authorization header")
        if auth != self.token:
            return 401, {"error": {"message": "Authentication required", "code": None}}
        if self.fail_count > 0 and self.fail_with is not None:
            self.fail_count -= 1
            return self.fail_with, {"error": {"message": "injected failure"}}
        query = dict(parse_qsl(url.query))
        data = json.loads(body, parse_float=Decimal) if body else None
        with self._lock:
            return self._dispatch(method, template or "", path, query, data)

    def _check(self, operation: Schema, query: str, body: bytes, where: str) -> list[str]:
        problems: list[str] = []
        params = {p["name"]: p for p in operation.get("parameters") or [] if p["in"] == "query"}
        for name, value in parse_qsl(query, keep_blank_values=True):
            if name not in params:
                problems.append(f"{where}: unknown query parameter {name!r}")
            else:
                problems += check_query(value, params[name].get("schema") or {}, name)
        content = (operation.get("requestBody") or {}).get("content") or {}
        schema = (content.get("application/json") or {}).get("schema")
        if body:
            if schema is None:
                problems.append(f"{where}: takes no JSON body")
            else:
                try:
                    data = json.loads(body, parse_float=Decimal)
                except ValueError:
                    return [f"{where}: the body is not JSON"]
                problems += check_body(data, schema, "body")
        elif schema is not None and (operation.get("requestBody") or {}).get("required"):
            problems.append(f"{where}: a body is required")
        return problems

    def _violation(self, status: int, text: str) -> tuple[int, Any]:
        self.violations.append(text)
        return status, {"error": {"message": text}}

    def _dispatch(
        self, method: str, template: str, path: str, query: dict[str, str], data: Any
    ) -> tuple[int, Any]:
        if (method, template) == ("POST", "/Invoice/Factory/saveInvoice"):
            return self._save(data)
        if (method, template) == ("GET", "/Invoice"):
            return 200, {"objects": [inv for inv in self.invoices.values() if _match(inv, query)]}
        invoice_id = int(path.split("/")[2]) if path.count("/") >= 2 else 0
        invoice = self.invoices.get(invoice_id)
        if (method, template) == ("GET", "/Invoice/{invoiceId}"):
            if invoice is None:
                return 400, {"error": {"message": "Invoice not found"}}
            return 200, {"objects": [invoice]}
        if (method, template) == ("POST", "/Invoice/{invoiceId}/cancelInvoice"):
            if invoice is None:
                return 400, {"error": {"message": "Invoice not found"}}
            if invoice_id in self.cancelled:
                return 400, {"error": {"message": "Invoice is already cancelled"}}
            cancellation = self._cancellation(invoice)
            if self.crash_after_cancel:
                self.crash_after_cancel = False
                return 0, None
            return 201, {"objects": cancellation}
        return 200, {"objects": None}

    def _save(self, data: dict[str, Any]) -> tuple[int, Any]:
        head = data["invoice"]
        contact = int(head["contact"]["id"])
        if contact not in self.contacts:
            return 400, {"error": {"message": f"Contact with id {contact} not found"}}
        net = tax = Decimal("0.00")
        for pos in data.get("invoicePosSave") or []:
            discount = Decimal(pos.get("discount") or 0)
            line = Decimal(pos["quantity"]) * Decimal(pos["price"]) * (100 - discount) / 100
            line = line.quantize(_CENT, ROUND_HALF_UP)
            net += line
            tax += (line * Decimal(pos["taxRate"]) / 100).quantize(_CENT, ROUND_HALF_UP)
        invoice_id = next(self._ids)
        invoice = self._invoice(invoice_id, "RE", contact, head, net, tax)
        self.invoices[invoice_id] = invoice
        if self.hold_after_create is not None:
            self.hold_after_create.wait(60)
        if self.crash_after_create:
            self.crash_after_create = False
            return 0, None
        if self.answer_after_create is not None:
            status, self.answer_after_create = self.answer_after_create, None
            return status, {"error": {"message": "Gateway Timeout"}}
        return 201, {"objects": {"invoice": invoice, "invoicePos": []}}

    def _invoice(
        self, invoice_id: int, kind: str, contact: int, head: dict[str, Any], net: Any, tax: Any
    ) -> dict[str, Any]:
        return {
            "id": str(invoice_id),
            "objectName": "Invoice",
            "invoiceNumber": f"{'SR' if kind == 'SR' else 'RE'}-{next(self._numbers):04d}",
            "invoiceType": kind,
            "contact": {"id": str(contact), "objectName": "Contact"},
            "invoiceDate": head["invoiceDate"],
            "status": "100" if kind == "RE" else "1000",
            "currency": head["currency"],
            "sumNet": str(net),
            "sumTax": str(tax),
            "sumGross": str(Decimal(net) + Decimal(tax)),
            "customerInternalNote": head.get("customerInternalNote"),
        }

    def _cancellation(self, invoice: dict[str, Any]) -> dict[str, Any]:
        self.cancelled.add(int(invoice["id"]))
        new_id = next(self._ids)
        head = {"invoiceDate": invoice["invoiceDate"], "currency": invoice["currency"]}
        neg = f"-{invoice['sumNet']}", f"-{invoice['sumTax']}"
        sr = self._invoice(new_id, "SR", int(invoice["contact"]["id"]), head, *map(Decimal, neg))
        sr["origin"] = {"id": invoice["id"], "objectName": "Invoice"}
        self.invoices[new_id] = sr
        return sr


def _match(invoice: dict[str, Any], query: dict[str, str]) -> bool:
    if "contact[id]" in query and invoice["contact"]["id"] != query["contact[id]"]:
        return False
    if "invoiceNumber" in query and invoice["invoiceNumber"] != query["invoiceNumber"]:
        return False
    if "startDate" in query or "endDate" in query:
        day = dt.datetime.combine(
            dt.date.fromisoformat(invoice["invoiceDate"][:10]), dt.time(), dt.UTC
        ).timestamp()
        if day < int(query.get("startDate", "0")) or day > int(
            query.get("endDate", "999999999999")
        ):
            return False
    return True


def _handler(fake: FakeSevdesk) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            status, answer = fake.handle(self.command, self.path, self.headers, body)
            if status == 0:  # the crash: stored, never answered
                self.close_connection = True
                self.connection.close()
                return
            data = json.dumps(answer, default=str).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            with contextlib.suppress(OSError):  # the client went away (a cancel ended it)
                self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

    return Handler
