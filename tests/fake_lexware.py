"""A fake Lexware Office (lexoffice) API for tests, checked against the descriptions we have.

There is no official machine-readable description; the third party's subset in
``../shared/apis/lexoffice-*-UNOFFICIAL-apievangelist.yml`` (read in place, never copied) gives
the paths, methods and body shapes, ``../shared/FACTS.md`` the rest: Bearer auth, 2 requests
per second across all endpoints (429 beyond), ``finalize`` and ``precedingSalesVoucherId``
(missing from the subset) as query parameters. Two endpoints the subset lacks are served as the
public documentation (developers.lexware.io/docs) describes them: ``GET /v1/voucherlist`` and
the read-only ``relatedVouchers`` of an invoice. What the descriptions do not allow is answered
400 (or 404/405) and recorded in ``FakeLexware.violations``, so tests assert it is ``[]``.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from functools import cache
from http.server import ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema
import yaml

from tests.apis import api_description
from tests.loopback import MethodHandler, serve_in_thread, stop_serving

INVOICES = "lexoffice-invoices-UNOFFICIAL-apievangelist.yml"
CREDIT_NOTES = "lexoffice-credit-notes-UNOFFICIAL-apievangelist.yml"
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}\Z")
_STATUSES = {"draft", "open", "paid", "paidoff", "voided", "overdue", "accepted", "rejected"}
_CENT = Decimal("0.01")


@cache
def _description(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load(api_description(name).read_text()))


def _validator(name: str, schema: str) -> jsonschema.protocols.Validator:
    doc = _description(name)
    root = {"$ref": f"#/components/schemas/{schema}", "components": doc["components"]}
    return jsonschema.Draft7Validator(root)  # OpenAPI 3.0 schemas are draft-4/7 style


def _properties(name: str, schema: str) -> dict[str, Any]:
    """The properties a component allows, allOf flattened."""
    spec = _description(name)["components"]["schemas"][schema]
    found: dict[str, Any] = {}
    for part in spec.get("allOf", [spec]):
        if "$ref" in part:
            found |= _properties(name, part["$ref"].rsplit("/", 1)[1])
        found |= part.get("properties", {})
    return found


@dataclass
class Voucher:
    """An invoice or credit note as the fake keeps it (the JSON the API would answer)."""

    kind: str  # invoice | creditnote
    body: dict[str, Any]
    created: float = field(default_factory=time.time)


class FakeLexware:
    """HTTP fake on 127.0.0.1 (point ``base_url`` at ``fake.url``).

    Hooks (plain attributes):
      slow_create_504: seconds; the next create (invoice or credit note) is made, then answered
        504 after that delay, as the gateway does after 30 s (then reset to None).
      crash_after_create: the next create is made, then the connection is dropped without an
        answer (then reset).
      storm_429: the next N requests are answered 429 (counted down).
      rate: requests per second before 429 (2); per_second window length (1.0).
      on_request: called with (method, path) of each authorized request before it is answered.
      voucherlist_never_ends: every page of the voucher list is its first, with ``last: false``
        and ``totalPages`` as ``voucherlist_total_pages`` says (None: left out).
    """

    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key or f"lx-{uuid.uuid4().hex}"
        self.organization_id = str(uuid.uuid4())
        self.violations: list[str] = []
        self.requests: list[tuple[float, str, str]] = []  # (monotonic, method, path?query)
        self.invoices: dict[str, Voucher] = {}
        self.credit_notes: dict[str, Voucher] = {}
        self.slow_create_504: float | None = None
        self.crash_after_create = False
        self.storm_429 = 0
        self.rate, self.per_second = 2, 1.0
        self.throttled = 0
        self.on_request: Callable[[str, str], object] | None = None
        self.voucherlist_never_ends = False
        self.voucherlist_total_pages: int | None = None
        self._accepted: deque[float] = deque()
        self._numbers = {"invoice": 1000, "creditnote": 5000}
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.host, self.port = "127.0.0.1", 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FakeLexware:
        fake = self

        class Handler(_Handler):
            lexware = fake

        self._server = ThreadingHTTPServer((self.host, 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = serve_in_thread(self._server)
        return self

    def stop(self) -> None:
        if self._server is not None:
            stop_serving(self._server, self._thread)
            self._server = self._thread = None

    def __enter__(self) -> FakeLexware:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ for tests
    def add_invoice(self, body: dict[str, Any], *, finalize: bool = True) -> str:
        """An invoice made by someone else (not through the executor)."""
        with self._lock:
            return self._store("invoice", body, finalize, None)

    def max_in_window(self, seconds: float = 1.0) -> int:
        """The most requests the fake answered (not 429) within any ``seconds`` window."""
        return most_in_window([t for t, _, _ in self.requests], seconds)

    # ------------------------------------------------------------------ model
    def _store(self, kind: str, body: dict[str, Any], finalize: bool, preceding: str | None) -> str:
        vid = str(uuid.uuid4())
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000+00:00", time.gmtime())
        doc = json.loads(_dumps(body), parse_float=Decimal)
        doc |= {
            "id": vid, "organizationId": self.organization_id, "version": 1,
            "createdDate": now, "updatedDate": now, "archived": False,
            "voucherStatus": "open" if finalize else "draft",
        }  # fmt: skip
        if finalize:
            self._numbers[kind] += 1
            doc["voucherNumber"] = ("RE" if kind == "invoice" else "GS") + str(self._numbers[kind])
        net = tax = Decimal(0)
        for item in doc.get("lineItems", []):
            price = item.get("unitPrice")
            if price is None:
                continue
            amount = (Decimal(str(item["quantity"])) * Decimal(str(price["netAmount"]))).quantize(
                _CENT, ROUND_HALF_UP
            )
            item["lineItemAmount"] = amount
            price["grossAmount"] = (
                Decimal(str(price["netAmount"]))
                * (1 + Decimal(str(price["taxRatePercentage"])) / 100)
            ).quantize(Decimal("0.0001"), ROUND_HALF_UP)
            net += amount
            tax += (amount * Decimal(str(price["taxRatePercentage"])) / 100).quantize(
                _CENT, ROUND_HALF_UP
            )
        doc["totalPrice"] = {
            "currency": doc.get("totalPrice", {}).get("currency", "EUR"),
            "totalNetAmount": net, "totalTaxAmount": tax, "totalGrossAmount": net + tax,
        }  # fmt: skip
        doc["relatedVouchers"] = []
        voucher = Voucher(kind, doc)
        if kind == "invoice":
            self.invoices[vid] = voucher
        else:
            self.credit_notes[vid] = voucher
            if preceding is not None:
                doc["precedingSalesVoucherId"] = preceding
                self.invoices[preceding].body["relatedVouchers"].append(
                    {"id": vid, "voucherNumber": doc.get("voucherNumber"), "voucherType": kind}
                )
        return vid

    def _throttle(self) -> bool:
        """True if this request is over the limit (answered 429)."""
        with self._lock:
            now = time.monotonic()
            if self.storm_429 > 0:
                self.storm_429 -= 1
                self.throttled += 1
                return True
            while self._accepted and now - self._accepted[0] >= self.per_second:
                self._accepted.popleft()
            if len(self._accepted) >= self.rate:
                self.throttled += 1
                return True
            self._accepted.append(now)
            return False


def _dumps(value: Any) -> bytes:
    def default(o: Any) -> Any:
        if isinstance(o, Decimal):
            return f"@@{format(o, 'f')}@@"
        raise TypeError(type(o).__name__)

    text = json.dumps(value, default=default)
    return re.sub(r'"@@(-?[0-9.]+)@@"', r"\1", text).encode()


class _Reply(Exception):
    def __init__(self, status: int, body: Any, *, violation: str | None = None) -> None:
        super().__init__(status)
        self.status, self.body, self.violation = status, body, violation


class _Handler(MethodHandler):
    lexware: FakeLexware

    def serve(self, method: str) -> None:
        fake = self.lexware
        parts = urlsplit(self.path)
        query = dict(parse_qs(parts.query, keep_blank_values=True).items())
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            auth = self.headers.get("Authorization") or ""
            if not auth.startswith("Bearer "):  # a wrong key is the caller's, not the client's
                raise _Reply(401, {"message": "Unauthorized"},
                             violation=f"{method} {parts.path}: no Bearer Authorization")  # fmt: skip
            if auth != f"Bearer {fake.api_key}":
                raise _Reply(401, {"status": 401, "message": "Unauthorized"})
            if fake._throttle():
                raise _Reply(429, {"status": 429, "error": "Too Many Requests"})
            with fake._lock:
                fake.requests.append((time.monotonic(), method, self.path))
            if fake.on_request is not None:
                fake.on_request(method, parts.path)
            status, body = self._route(method, parts.path, query, raw)
        except _Reply as reply:
            if reply.violation is not None:
                with fake._lock:
                    fake.violations.append(reply.violation)
            status, body = reply.status, reply.body
        except _Drop:
            self.close_connection = True
            self.connection.close()
            return
        self._send(status, body)

    def _send(self, status: int, body: Any) -> None:
        data = _dumps(body)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(
        self, method: str, path: str, query: dict[str, list[str]], raw: bytes
    ) -> tuple[int, Any]:
        fake = self.lexware
        bad = f"{method} {path}"
        if path == "/v1/invoices" and method == "POST":
            self._only(query, {"finalize"}, bad)
            body = self._body(raw, INVOICES, "Invoice", bad)
            return self._create("invoice", body, query, None)
        if path == "/v1/credit-notes" and method == "POST":
            # precedingSalesVoucherId: missing from the subset, in FACTS.md and the real docs.
            self._only(query, {"finalize", "precedingSalesVoucherId"}, bad)
            body = self._body(raw, CREDIT_NOTES, "SalesDocument", bad)
            preceding = self._one(query, "precedingSalesVoucherId")
            if preceding is not None:
                with fake._lock:
                    invoice = fake.invoices.get(preceding)
                    if invoice is None:
                        raise _Reply(400, {"message": "preceding voucher not found"}, violation=bad
                                     + f": precedingSalesVoucherId {preceding} is no invoice")  # fmt: skip
                    if invoice.body["voucherStatus"] == "draft":
                        raise _Reply(
                            406, {"message": "a draft cannot be referenced"},
                            violation=f"{bad}: precedingSalesVoucherId {preceding} is a draft",
                        )  # fmt: skip
            return self._create("creditnote", body, query, preceding)
        match = re.fullmatch(r"/v1/(invoices|credit-notes)/([^/]+)", path)
        if match and method == "GET":
            self._only(query, set(), bad)
            if not _UUID.match(match.group(2)):
                raise _Reply(400, {"message": "not a uuid"}, violation=f"{bad}: id is no uuid")
            store = fake.invoices if match.group(1) == "invoices" else fake.credit_notes
            with fake._lock:
                found = store.get(match.group(2))
                if found is None:
                    return 404, {"status": 404, "message": "not found"}
                return 200, json.loads(_dumps(found.body), parse_float=Decimal)
        if path == "/v1/voucherlist" and method == "GET":
            return 200, self._voucherlist(query, bad)
        known = {"/v1/invoices", "/v1/credit-notes", "/v1/voucherlist"}
        if path in known or match:
            raise _Reply(405, {"message": "method not allowed"}, violation=f"{bad}: no such method")
        raise _Reply(404, {"message": "no such path"}, violation=f"{bad}: no such path")

    def _create(
        self, kind: str, body: dict[str, Any], query: dict[str, list[str]], preceding: str | None
    ) -> tuple[int, Any]:
        fake = self.lexware
        finalize = self._one(query, "finalize")
        if finalize not in (None, "true", "false"):
            raise _Reply(400, {"message": "finalize"}, violation=f"finalize={finalize!r}")
        with fake._lock:
            vid = fake._store(kind, body, finalize == "true", preceding)
            voucher = (fake.invoices if kind == "invoice" else fake.credit_notes)[vid]
            slow, fake.slow_create_504 = fake.slow_create_504, None
            crash, fake.crash_after_create = fake.crash_after_create, False
        if crash:
            raise _Drop
        if slow is not None:
            time.sleep(slow)
            return 504, {"message": "Gateway Timeout"}
        where = "invoices" if kind == "invoice" else "credit-notes"
        return 201, {
            "id": vid, "resourceUri": f"{fake.url}/v1/{where}/{vid}",
            "createdDate": voucher.body["createdDate"], "updatedDate": voucher.body["updatedDate"],
            "version": 1,
        }  # fmt: skip

    def _voucherlist(self, query: dict[str, list[str]], bad: str) -> dict[str, Any]:
        """GET /v1/voucherlist as developers.lexware.io/docs describes it (not in the subset)."""
        fake = self.lexware
        allowed = {
            "voucherType", "voucherStatus", "archived", "contactId", "voucherDateFrom",
            "voucherDateTo", "createdDateFrom", "createdDateTo", "updatedDateFrom",
            "updatedDateTo", "voucherNumber", "page", "size", "sort",
        }  # fmt: skip
        self._only(query, allowed, bad)
        vtype, statuses = self._one(query, "voucherType"), self._one(query, "voucherStatus")
        if not vtype or not statuses:
            raise _Reply(400, {"message": "voucherType and voucherStatus are required"},
                         violation=f"{bad}: voucherType and voucherStatus are required")  # fmt: skip
        wanted = set(statuses.split(","))
        if not wanted <= _STATUSES or not set(vtype.split(",")) <= {"invoice", "creditnote"}:
            raise _Reply(400, {"message": "bad filter"}, violation=f"{bad}: bad voucherType/Status")
        for key in ("voucherDateFrom", "voucherDateTo"):
            value = self._one(query, key)
            if value is not None and not _DAY.match(value):
                raise _Reply(
                    400, {"message": key}, violation=f"{bad}: {key}={value!r} not yyyy-MM-dd"
                )
        size = int(self._one(query, "size") or 25)
        page = int(self._one(query, "page") or 0)
        if size > 250:
            raise _Reply(400, {"message": "size"}, violation=f"{bad}: size {size} > 250")
        contact = self._one(query, "contactId")
        day_from, day_to = self._one(query, "voucherDateFrom"), self._one(query, "voucherDateTo")
        rows = []
        with fake._lock:
            vouchers = [*fake.invoices.values(), *fake.credit_notes.values()]
            for v in sorted(vouchers, key=lambda v: v.created):
                body = v.body
                day = str(body.get("voucherDate", ""))[:10]
                if v.kind not in vtype.split(",") or body["voucherStatus"] not in wanted:
                    continue
                if contact and body.get("address", {}).get("contactId") != contact:
                    continue
                if (day_from and day < day_from) or (day_to and day > day_to):
                    continue
                rows.append({
                    "id": body["id"], "voucherType": v.kind, "voucherStatus": body["voucherStatus"],
                    "voucherNumber": body.get("voucherNumber"), "voucherDate": body.get("voucherDate"),
                    "contactId": body.get("address", {}).get("contactId"),
                    "totalAmount": body["totalPrice"]["totalGrossAmount"],
                    "currency": body["totalPrice"]["currency"], "archived": False,
                })  # fmt: skip
        content = rows[page * size : (page + 1) * size]
        pages = max(1, -(-len(rows) // size))
        if fake.voucherlist_never_ends:
            endless: dict[str, Any] = {"content": rows[:size], "first": page == 0, "last": False,
                                       "size": size, "number": page}  # fmt: skip
            if fake.voucherlist_total_pages is not None:
                endless["totalPages"] = fake.voucherlist_total_pages
            return endless
        return {
            "content": content, "first": page == 0, "last": page >= pages - 1,
            "totalPages": pages, "totalElements": len(rows), "numberOfElements": len(content),
            "size": size, "number": page,
        }  # fmt: skip

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _one(query: dict[str, list[str]], key: str) -> str | None:
        values = query.get(key)
        return None if not values else values[-1]

    @staticmethod
    def _only(query: dict[str, list[str]], allowed: set[str], bad: str) -> None:
        unknown = sorted(set(query) - allowed)
        if unknown:
            raise _Reply(400, {"message": "unknown parameter"},
                         violation=f"{bad}: unknown query parameter(s) {unknown}")  # fmt: skip

    @staticmethod
    def _body(raw: bytes, description: str, schema: str, bad: str) -> dict[str, Any]:
        try:
            body = json.loads(raw, parse_float=Decimal)
        except ValueError:
            raise _Reply(400, {"message": "no JSON"}, violation=f"{bad}: body is no JSON") from None
        if not isinstance(body, dict):
            raise _Reply(400, {"message": "no object"}, violation=f"{bad}: body is no object")
        problems = []
        plain = json.loads(raw)  # jsonschema's number check does not know Decimal
        problems += [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in _validator(description, schema).iter_errors(plain)
        ]
        allowed = _properties(description, schema)
        problems += [f"unknown field {k}" for k in body if k not in allowed and k != "totalPrice"]
        problems += [f"read-only field {k}" for k in body if allowed.get(k, {}).get("readOnly")]
        # Required by the real API (developers.lexware.io/docs), not said by the subset.
        for key in ("voucherDate", "address", "lineItems", "totalPrice", "taxConditions"):
            if key not in body:
                problems.append(f"missing {key}")
        if "contactId" not in body.get("address", {}) and "name" not in body.get("address", {}):
            problems.append("address needs contactId or name")
        if "currency" not in body.get("totalPrice", {}):
            problems.append("totalPrice.currency missing")
        if "taxType" not in body.get("taxConditions", {}):
            problems.append("taxConditions.taxType missing")
        for n, item in enumerate(body.get("lineItems") or []):
            if "type" not in item or "name" not in item:
                problems.append(f"lineItems/{n}: type and name are required")
            if item.get("type") != "text":
                price = item.get("unitPrice", {})
                for key in ("quantity", "unitName"):
                    if key not in item:
                        problems.append(f"lineItems/{n}: {key} missing")
                for key in ("currency", "netAmount", "taxRatePercentage"):
                    if key not in price:
                        problems.append(f"lineItems/{n}/unitPrice: {key} missing")
                for key in ("netAmount", "grossAmount", "taxRatePercentage"):
                    if key in price and isinstance(price[key], str):
                        problems.append(f"lineItems/{n}/unitPrice: {key} is a string")
        if not body.get("lineItems"):
            problems.append("lineItems is empty")
        if problems:
            raise _Reply(400, {"message": "validation failed", "details": problems},
                         violation=f"{bad}: " + "; ".join(problems))  # fmt: skip
        return body


class _Drop(Exception):
    pass


def most_in_window(times: list[float], window: float) -> int:
    """The most of ``times`` that fall within any ``window`` seconds."""
    times = sorted(times)
    best, start = 0, 0
    for end, moment in enumerate(times):
        while moment - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best
