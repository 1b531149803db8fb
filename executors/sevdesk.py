"""The ``sevdesk`` executor: create or cancel one sevDesk invoice, exactly once.

sevDesk has no idempotency keys, so a retried create could bill twice. Every invoice this
executor creates carries the reference ``spoold:<job_id>`` in ``customerInternalNote``; before
creating, the contact's invoices are looked up (``GET /Invoice?contact[id]=...``) and one with
that reference is adopted instead. A cancel likewise looks for an existing cancellation invoice
(``invoiceType`` SR whose ``origin`` is the invoice) before it asks for another one.

Money is ``decimal.Decimal`` from the job file to the request body: no float arithmetic.
An invoice without ``invoice_date`` is dated the day its first attempt ran: that day is noted
in the job's log and read back by every later attempt, whose lookup and body use it too.

Every request is bounded by the attempt's timeout and ended by its cancel; an answer larger
than 8 MiB is refused. requests is imported when a job runs, never with this module.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from spoold.executors._vendor import MIB, Bound, Deadline, find_note, leave_note
from spoold.executors.base import ExecResult, Executor, RunContext, cleartext_problem

from spoold.core.errors import ExecutorError, ExecutorNotAvailable

DEFAULT_BASE_URL = "https://my.sevdesk.de/api/v1"
TYPES = ("create_invoice", "cancel_invoice")
_CENT = Decimal("0.01")
_PLACEHOLDER = re.compile(r"\$\{[^}]+\}")
_DECIMAL_TEXT = re.compile(r"-?[0-9]{1,12}(?:\.[0-9]{1,6})?\Z")
_RAW = re.compile(r'"\\u0000dec:(-?[0-9]+(?:\.[0-9]+)?)\\u0000"')
_RETRYABLE = frozenset({429, 500, 502, 503, 504})
_ZERO_RATE_RULES = frozenset({"2", "3", "4", "5", "11", "17", "18", "19", "20"})
_TIMEOUT = 30.0  # per read from the socket
_REQUEST_SECONDS = 120.0  # a whole request, answer and all
_MAX_ANSWER = 8 * MIB
#: The most an amount, a position's net or an invoice's gross may be: twelve digits before
#: the point, as the text form of an amount allows. sevDesk keeps sums as doubles (15 to 16
#: significant digits): up to here every cent stays exact, and no real invoice comes near it.
MAX_AMOUNT = Decimal("999999999999.99")
_DATE_NOTE = re.compile(r"sevdesk: invoice_date (\d{4}-\d{2}-\d{2}) \(the first attempt's day\).*")


def _requests() -> Any:
    try:
        import requests  # noqa: PLC0415 - imported when a job runs
    except ImportError as exc:
        raise ExecutorNotAvailable(
            "the sevdesk executor is not available: requests is not installed. "
            "Run `pip install requests` (a dependency of spoold)"
        ) from exc
    return requests


def reference(job_id: str) -> str:
    """The mark an invoice of this job carries, found again by a later attempt."""
    return f"spoold:{job_id}"


def decimal(value: Any, field: str) -> Decimal:
    """A job file's amount as a Decimal: from a string, an int or a YAML/JSON float's text."""
    if isinstance(value, bool):
        raise ExecutorError(f"sevdesk: {field}: {value!r} is not a decimal number")
    text = str(value).strip()  # str(19.99) == "19.99": the float's shortest repr, no arithmetic
    try:
        number = Decimal(text)
    except InvalidOperation:
        raise ExecutorError(f"sevdesk: {field}: {value!r} is not a decimal number") from None
    if not number.is_finite():
        raise ExecutorError(f"sevdesk: {field}: {value!r} is not a decimal number")
    return number


def position_totals(position: Mapping[str, Any], where: str) -> tuple[Decimal, Decimal]:
    """(net, tax) of one position, each rounded to the cent (half up)."""
    quantity = decimal(position["quantity"], f"{where}.quantity")
    price = decimal(position["price"], f"{where}.price")
    rate = decimal(position["tax_rate"], f"{where}.tax_rate")
    discount = decimal(position.get("discount", 0), f"{where}.discount")
    for field, value in (("quantity", quantity), ("price", price)):
        _within(value, f"{where}.{field}")
    net = (quantity * price * (100 - discount) / 100).quantize(_CENT, ROUND_HALF_UP)
    _within(net, f"{where}: quantity times price")
    tax = (net * rate / 100).quantize(_CENT, ROUND_HALF_UP)
    return net, tax


def _within(value: Decimal, what: str) -> None:
    if abs(value) > MAX_AMOUNT:
        raise ExecutorError(
            f"sevdesk: {what}: {value:f} is more than {MAX_AMOUNT:,} (an amount no invoice "
            "has: a typo, or a value in the wrong unit?)"
        )


def totals(positions: list[Mapping[str, Any]]) -> dict[str, str]:
    """The invoice's net, tax and gross as decimal strings."""
    net = tax = Decimal("0.00")
    for index, position in enumerate(positions):
        n, t = position_totals(position, f"invoice_data.positions[{index}]")
        net, tax = net + n, tax + t
    _within(net + tax, "invoice_data: the gross total")
    return {"net": str(net), "tax": str(tax), "gross": str(net + tax)}


def _literal(value: Any) -> bool:
    """False for a value with ``${...}`` in it: validate runs before those are filled in."""
    return not (isinstance(value, str) and _PLACEHOLDER.search(value))


class SevdeskExecutor(Executor):
    """Creates (``create_invoice``) or cancels (``cancel_invoice``) one sevDesk invoice."""

    name = "sevdesk"
    schema_resource = "sevdesk.schema.json"

    @classmethod
    def validate(cls, product: Mapping[str, Any]) -> list[str]:
        """Amounts, rates and dates the schema cannot judge."""
        problems: list[str] = []
        base_url = product.get("base_url")
        if base_url is not None and _literal(base_url):
            problem = cleartext_problem(str(base_url), "API token")
            if problem is not None:
                problems.append(problem)
        data = product.get("invoice_data")
        if not isinstance(data, Mapping):
            return problems
        positions = data.get("positions") or []
        if not positions:
            problems.append("invoice_data.positions: give at least one position")
        rule = str(data.get("tax_rule", "1"))
        for index, position in enumerate(positions):
            where = f"invoice_data.positions[{index}]"
            if not isinstance(position, Mapping):
                continue
            values: dict[str, Decimal] = {}
            for field in ("quantity", "price", "tax_rate", "discount"):
                raw = position.get(field)
                if raw is None or not _literal(raw):
                    continue
                if isinstance(raw, str) and not _DECIMAL_TEXT.match(raw.strip()):
                    problems.append(f"{where}.{field}: {raw!r} is not a decimal like 19.99")
                    continue
                try:
                    values[field] = decimal(raw, f"{where}.{field}")
                except ExecutorError as exc:
                    problems.append(str(exc).removeprefix("sevdesk: "))
                    continue
                exponent = values[field].as_tuple().exponent
                if isinstance(exponent, int) and exponent < -6:
                    problems.append(f"{where}.{field}: {raw!r} has more than 6 decimal places")
            for field in ("quantity", "price"):
                if field in values and abs(values[field]) > MAX_AMOUNT:
                    problems.append(
                        f"{where}.{field}: {values[field]:f} is more than {MAX_AMOUNT:,}"
                    )
            if "quantity" in values and values["quantity"] <= 0:
                problems.append(f"{where}.quantity: must be more than 0")
            if "price" in values and values["price"] < 0:
                problems.append(f"{where}.price: must not be negative (cancel instead)")
            if "discount" in values and not 0 <= values["discount"] <= 100:
                problems.append(f"{where}.discount: a percentage from 0 to 100")
            rate = values.get("tax_rate")
            if rate is not None:
                if rate < 0 or rate >= 100:
                    problems.append(f"{where}.tax_rate: {rate} is not a percentage")
                elif rule in _ZERO_RATE_RULES and rate != 0:
                    problems.append(
                        f"{where}.tax_rate: tax_rule {rule} bills no German VAT: give 0, not {rate}"
                    )
        if not problems:  # each amount is sound: their products and sums may still not be
            problems += _total_problems(positions)
        invoice_date, delivery = data.get("invoice_date"), data.get("delivery_date")
        for field, value in (("invoice_date", invoice_date), ("delivery_date", delivery)):
            if value is not None and _literal(value):
                try:
                    dt.date.fromisoformat(str(value))
                except ValueError:
                    problems.append(f"invoice_data.{field}: {value!r} is not a date")
        if (
            invoice_date is not None
            and delivery is not None
            and _literal(invoice_date)
            and _literal(delivery)
            and str(delivery) > str(invoice_date)
        ):
            problems.append(
                "invoice_data.delivery_date: after invoice_date: sevDesk refuses that for a "
                "regular invoice"
            )
        return problems

    def execute(self, ctx: RunContext) -> ExecResult:
        problem = cleartext_problem(
            str(ctx.product.get("base_url") or DEFAULT_BASE_URL), "API token"
        )
        if problem is not None:
            raise ExecutorError(f"sevdesk: {problem}")
        api = _Api(_requests(), ctx)
        if ctx.type == "create_invoice":
            return _create(api, ctx)
        if ctx.type == "cancel_invoice":
            return _cancel(api, ctx)
        raise ExecutorError(f"sevdesk: unknown type {ctx.type!r}: give one of {', '.join(TYPES)}")


def _total_problems(positions: Any) -> list[str]:
    """Positions and an invoice worth more than MAX_AMOUNT, where every amount is written."""
    try:
        if all(
            isinstance(p, Mapping)
            and all(p.get(f) is not None and _literal(p.get(f)) for f in ("quantity", "price"))
            and _literal(p.get("tax_rate", 0))
            and _literal(p.get("discount", 0))
            for p in positions
        ):
            totals([{"tax_rate": 0, **p} for p in positions])
    except ExecutorError as exc:
        return [str(exc).removeprefix("sevdesk: ")]
    return []


def _need(product: Mapping[str, Any], field: str, type_: str) -> Any:
    if product.get(field) in (None, ""):
        raise ExecutorError(f"sevdesk: {type_} needs {field}")
    return product[field]


def _id(value: Any, field: str) -> int:
    try:
        number = int(str(value))
    except ValueError:
        raise ExecutorError(f"sevdesk: {field} {value!r} is not a number") from None
    if number < 1:
        raise ExecutorError(f"sevdesk: {field} {value!r} is not an id")
    return number


def _create(api: _Api, ctx: RunContext) -> ExecResult:
    product = ctx.product
    contact = _id(_need(product, "contact_id", "create_invoice"), "contact_id")
    data: Mapping[str, Any] = _need(product, "invoice_data", "create_invoice")
    positions = list(data.get("positions") or [])
    if not positions:
        raise ExecutorError("sevdesk: invoice_data.positions: give at least one position")
    computed = totals(positions)  # a bad amount fails here, before anything is sent
    ref = reference(ctx.job_id)
    invoice_date = _invoice_date(ctx, data)
    found = api.find_by_reference(contact, ref, invoice_date)
    if found is not None:
        ctx.log.info(
            f"sevdesk: invoice {found.get('id')} ({found.get('invoiceNumber')}) already carries "
            f"{ref}: adopting it (an earlier attempt created it), not creating another"
        )
        return ExecResult(0, result=_result(found, ref, adopted=True))
    body = _invoice_body(contact, data, positions, ref, invoice_date)
    ctx.log.info(
        f"sevdesk: creating an invoice for contact {contact} with {len(positions)} position(s), "
        f"net {computed['net']} gross {computed['gross']} {body['invoice']['currency']}"
    )
    answer = api.call("POST", "/Invoice/Factory/saveInvoice", body=body, contact=contact)
    objects = answer.get("objects") if isinstance(answer, Mapping) else None
    invoice = objects.get("invoice") if isinstance(objects, Mapping) else None
    if not isinstance(invoice, Mapping):
        raise ExecutorError(f"sevdesk: saveInvoice answered without an invoice: {answer!r:.300}")
    ctx.log.info(f"sevdesk: created invoice {invoice.get('id')} ({invoice.get('invoiceNumber')})")
    result = _result(invoice, ref, adopted=False)
    result["computed"] = computed
    return ExecResult(0, result=result)


def _invoice_date(ctx: RunContext, data: Mapping[str, Any]) -> str:
    """The invoice's date: as written, else the first attempt's day, the same on every retry
    (a retry after midnight must neither date the invoice anew nor look on the wrong day)."""
    if data.get("invoice_date"):
        return str(data["invoice_date"])
    noted = find_note(ctx, _DATE_NOTE)
    if noted is not None:
        return noted.group(1)
    today = ctx.clock.now().date().isoformat()
    if not leave_note(ctx, f"sevdesk: invoice_date {today} (the first attempt's day), kept "
                           "for this job's retries"):  # fmt: skip
        ctx.log.error(
            "sevdesk: the invoice date cannot be kept for a retry (no job log to read back): "
            "a retry on another day looks for this job's invoice on that day only; give "
            "invoice_data.invoice_date to be sure"
        )
    return today


def _cancel(api: _Api, ctx: RunContext) -> ExecResult:
    invoice_id = _id(_need(ctx.product, "invoice_id", "cancel_invoice"), "invoice_id")
    answer = api.call("GET", f"/Invoice/{invoice_id}", invoice=invoice_id)
    found = answer.get("objects") if isinstance(answer, Mapping) else None
    if not found:
        raise ExecutorError(f"sevdesk: invoice {invoice_id} does not exist")
    invoice = found[0] if isinstance(found, list) else found
    if invoice.get("invoiceType") == "SR":
        raise ExecutorError(
            f"sevdesk: invoice {invoice_id} is itself a cancellation invoice: cancel the original"
        )
    ref = reference(ctx.job_id)
    existing = api.find_cancellation(invoice)
    if existing is not None:
        ctx.log.info(
            f"sevdesk: invoice {invoice_id} is already cancelled by {existing.get('id')} "
            f"({existing.get('invoiceNumber')}): not cancelling it twice"
        )
        result = _result(existing, ref, adopted=True)
        return ExecResult(0, result=result | {"cancelled_invoice_id": str(invoice_id)})
    ctx.log.info(f"sevdesk: cancelling invoice {invoice_id} ({invoice.get('invoiceNumber')})")
    answer = api.call("POST", f"/Invoice/{invoice_id}/cancelInvoice", invoice=invoice_id)
    created = answer.get("objects") if isinstance(answer, Mapping) else None
    if isinstance(created, list):
        created = created[0] if created else None
    if not isinstance(created, Mapping):
        raise ExecutorError(f"sevdesk: cancelInvoice answered without an invoice: {answer!r:.300}")
    ctx.log.info(f"sevdesk: cancellation invoice {created.get('id')} created")
    result = _result(created, ref, adopted=False)
    return ExecResult(0, result=result | {"cancelled_invoice_id": str(invoice_id)})


def _result(invoice: Mapping[str, Any], ref: str, *, adopted: bool) -> dict[str, Any]:
    """What status.json keeps: sevDesk's own sums, as decimal strings."""

    def amount(field: str) -> str | None:
        value = invoice.get(field)
        return None if value is None else str(decimal(value, field))

    return {
        "invoice_id": str(invoice.get("id")),
        "invoice_number": invoice.get("invoiceNumber"),
        "invoice_type": invoice.get("invoiceType"),
        "status": None if invoice.get("status") is None else str(invoice["status"]),
        "currency": invoice.get("currency"),
        "amount": {"net": amount("sumNet"), "tax": amount("sumTax"), "gross": amount("sumGross")},
        "reference": ref,
        "adopted": adopted,
    }


def _invoice_body(
    contact: int,
    data: Mapping[str, Any],
    positions: list[Mapping[str, Any]],
    ref: str,
    invoice_date: str,
) -> dict[str, Any]:
    """The body of ``POST /Invoice/Factory/saveInvoice`` (a draft, status 100)."""
    rates = [decimal(p["tax_rate"], "tax_rate") for p in positions]
    invoice: dict[str, Any] = {
        "objectName": "Invoice",
        "mapAll": True,
        "invoiceDate": invoice_date,
        "contact": {"id": contact, "objectName": "Contact"},
        "contactPerson": {
            "id": _id(data["contact_person_id"], "invoice_data.contact_person_id"),
            "objectName": "SevUser",
        },
        "discount": 0,
        "status": "100",
        "addressCountry": {
            "id": _id(data.get("country_id", 1), "country_id"),
            "objectName": "StaticCountry",
        },
        "taxRate": _Dec(max(rates)),
        "taxRule": {"id": str(data.get("tax_rule", "1")), "objectName": "TaxRule"},
        "taxText": str(data.get("tax_text", "Umsatzsteuer")),
        "taxType": "default",
        "invoiceType": "RE",
        "currency": str(data.get("currency", "EUR")),
        "header": str(data.get("header", "Rechnung")),
        "customerInternalNote": ref,
    }
    if "delivery_date" in data:
        invoice["deliveryDate"] = f"{data['delivery_date']}T00:00:00+00:00"
    for field, key in (("head_text", "headText"), ("foot_text", "footText")):
        if field in data:
            invoice[key] = str(data[field])
    if "time_to_pay" in data:
        invoice["timeToPay"] = int(data["time_to_pay"])
    saved = []
    for index, position in enumerate(positions):
        where = f"invoice_data.positions[{index}]"
        item: dict[str, Any] = {
            "objectName": "InvoicePos",
            "mapAll": True,
            "name": str(position["name"]),
            "quantity": _Dec(decimal(position["quantity"], f"{where}.quantity")),
            "price": _Dec(decimal(position["price"], f"{where}.price")),
            "taxRate": _Dec(decimal(position["tax_rate"], f"{where}.tax_rate")),
            "unity": {
                "id": _id(position.get("unit_id", 1), f"{where}.unit_id"),
                "objectName": "Unity",
            },
            "positionNumber": index,
        }
        if "discount" in position:
            item["discount"] = _Dec(decimal(position["discount"], f"{where}.discount"))
        if "text" in position:
            item["text"] = str(position["text"])
        saved.append(item)
    # The vendor's schema lists "invoicePos" as required but declares "invoicePosSave", which
    # is what sevDesk reads; discountSave and the rest are left out (nothing to delete).
    return {"invoice": invoice, "invoicePosSave": saved}


class _Dec:
    """A Decimal that goes into the JSON body as a number, digit for digit."""

    def __init__(self, value: Decimal) -> None:
        self.value = value


def _dumps(body: Any) -> str:
    def default(value: Any) -> Any:
        if isinstance(value, _Dec):
            # Fixed-point text: str() writes 1E+16, which is no JSON number.
            return f"\x00dec:{value.value:f}\x00"
        raise TypeError(f"{type(value).__name__} is not JSON")

    return _RAW.sub(r"\1", json.dumps(body, default=default))


class _Api:
    """requests against one sevDesk account; the token stays in the header, never in the log."""

    def __init__(self, requests: Any, ctx: RunContext) -> None:
        self.requests, self.ctx = requests, ctx
        self.base = str(ctx.product.get("base_url") or DEFAULT_BASE_URL).rstrip("/")
        self.session = requests.Session()
        self.session.trust_env = False  # a proxy from the environment must not see the token
        self.session.headers.update(
            {
                "Authorization": str(ctx.product["api_token"]),
                "Accept": "application/json",
                "User-Agent": "spoold sevdesk executor",
            }
        )
        self.timeout = _TIMEOUT
        bound = Bound(Deadline.of(ctx), name="sevdesk", max_body=_MAX_ANSWER,
                      request_seconds=_REQUEST_SECONDS)  # fmt: skip
        bound.mount(self.session)

    def call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        contact: int | None = None,
        invoice: int | None = None,
    ) -> Any:
        """One request; ExecutorError with the reason, retryable where a retry can help."""
        self.ctx.log.info(f"sevdesk: {method} {path}")
        errors = self.requests.exceptions
        headers = {"Content-Type": "application/json"} if body is not None else {}
        try:
            response = self.session.request(
                method,
                self.base + path,
                params=dict(params or {}),
                data=None if body is None else _dumps(body).encode(),
                headers=headers,
                timeout=self.timeout,
            )
        except errors.SSLError as exc:
            raise ExecutorError(
                f"sevdesk: the TLS certificate of {self.base} is not trusted: {exc}"
            ) from exc
        except (errors.ConnectionError, errors.Timeout) as exc:
            raise ExecutorError(
                f"sevdesk: {method} {path}: no answer from {self.base} ({type(exc).__name__}); "
                "a create may still have happened: the next attempt looks it up",
                retryable=True,
            ) from exc
        status = response.status_code
        if status < 400:
            try:
                return response.json()
            except ValueError:
                raise ExecutorError(
                    f"sevdesk: {method} {path}: the answer is not JSON", retryable=True
                ) from None
        detail = _message(response)
        text = f"sevdesk: {method} {path} failed: {status} {detail}".rstrip()
        if status == 401:
            raise ExecutorError(text + ": sevDesk refused the API token: check api_token")
        if status == 400 and contact is not None and "contact" in detail.lower():
            raise ExecutorError(
                f"{text}: contact {contact} does not exist in this sevDesk account: "
                "check contact_id"
            )
        if status in (400, 404) and invoice is not None:
            raise ExecutorError(f"{text}: check invoice_id {invoice}")
        raise ExecutorError(text, retryable=status in _RETRYABLE)

    def _invoices(self, params: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        answer = self.call("GET", "/Invoice", params=params)
        objects = answer.get("objects") if isinstance(answer, Mapping) else None
        return [o for o in objects or [] if isinstance(o, Mapping)]

    def find_by_reference(
        self, contact: int, ref: str, invoice_date: str
    ) -> Mapping[str, Any] | None:
        """The contact's invoice (of that day) that carries ``ref``, or None."""
        params: dict[str, Any] = {"contact[id]": contact, "contact[objectName]": "Contact"}
        try:
            day = dt.datetime.combine(dt.date.fromisoformat(invoice_date), dt.time(), dt.UTC)
            params |= {"startDate": int(day.timestamp()), "endDate": int(day.timestamp()) + 86399}
        except ValueError:
            pass
        mine = [
            inv
            for inv in self._invoices(params)
            if ref in str(inv.get("customerInternalNote") or "").split()
            and inv.get("invoiceType") != "SR"
        ]
        if len(mine) > 1:
            ids = ", ".join(str(inv.get("id")) for inv in mine)
            self.ctx.log.error(f"sevdesk: several invoices carry {ref}: {ids}; adopting the first")
        return min(mine, key=lambda inv: int(str(inv.get("id")))) if mine else None

    def find_cancellation(self, invoice: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """The cancellation invoice (SR) whose origin is ``invoice``, or None."""
        params: dict[str, Any] = {}
        contact = invoice.get("contact")
        if isinstance(contact, Mapping) and contact.get("id") is not None:
            params = {"contact[id]": int(str(contact["id"])), "contact[objectName]": "Contact"}
        for candidate in self._invoices(params):
            origin = candidate.get("origin")
            if (
                candidate.get("invoiceType") == "SR"
                and isinstance(origin, Mapping)
                and str(origin.get("id")) == str(invoice.get("id"))
            ):
                return candidate
        return None


def _message(response: Any) -> str:
    try:
        answer = response.json()
    except ValueError:
        return str(response.text)[:200].strip()
    error = answer.get("error") if isinstance(answer, Mapping) else None
    if isinstance(error, Mapping) and error.get("message"):
        return str(error["message"])
    return json.dumps(answer)[:200]
