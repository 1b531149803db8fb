"""The ``lexware`` executor: invoices in Lexware Office (formerly lexoffice), exactly once.

``create_invoice`` creates one invoice (finalized unless ``draft``); ``cancel_invoice`` cancels
one with a credit note that refers to it (the API has no cancel endpoint). The API has no
idempotency keys and a create may answer 504 after 30 s and still have succeeded, so:

- the invoice carries a reference derived from the job id (a line ``spoold-job: <job_id>`` in
  its ``remark``); before a create, and before repeating one whose answer was lost, the
  customer's invoices of that ``voucherDate`` are looked up (``GET /v1/voucherlist``, then each
  one's remark); one found is adopted instead of created again;
- a cancel first reads the invoice's ``relatedVouchers``: a credit note already there is the
  cancel, adopted.

All lexware jobs of the machine share the API's limit of 2 requests per second through
``spoold.core.ratelimit`` (the workers are separate processes). 429 and 5xx answers are retried
within the attempt (Retry-After honoured), bounded by the job's timeout; each request is
bounded by it as a whole and ended by a cancel, and an answer larger than 8 MiB is refused. Money
is ``decimal.Decimal`` throughout, written to JSON as the exact decimal text.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator, Mapping
from decimal import Decimal, InvalidOperation
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from spoold.executors._vendor import MIB, Bound, Deadline
from spoold.executors.base import ExecResult, Executor, RunContext, Stopped, cleartext_problem

from spoold.core.errors import ExecutorError
from spoold.core.ratelimit import RateLimiter

DEFAULT_BASE_URL = "https://api.lexware.io"
TYPES = ("create_invoice", "cancel_invoice")
RATE, PER_SECOND = 2, 1.0
_BERLIN = ZoneInfo("Europe/Berlin")
_STATUSES = "draft,open,paid,paidoff,voided,overdue"
_REQUEST_TIMEOUT = 60.0  # the gateway itself gives up after 30 s (504)
_MAX_ANSWER = 8 * MIB
#: Pages of the voucher list read at most (250 a page): one customer's invoices of one day.
_MAX_PAGES = 40
_BACKOFF_FIRST, _BACKOFF_MAX, _TRIES_WITHOUT_TIMEOUT = 0.5, 16.0, 8
_CREATES = 3  # creates sent at most per attempt (each after a lookup found nothing)
_SETTLE = (2.0, 5.0)  # waits before the lookups after a lost create answer
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}\Z")


class _Lost(Exception):
    """A create was sent but its answer was lost (5xx, dropped connection, read timeout)."""


class LexwareExecutor(Executor):
    """Creates an invoice (``type: create_invoice``) or cancels one (``type: cancel_invoice``)."""

    name = "lexware"
    schema_resource = "lexware.schema.json"

    @classmethod
    def validate(cls, product: Mapping[str, Any]) -> list[str]:
        """Fields of the two operations mixed, amounts that are not exact, impossible dates."""
        problems: list[str] = []
        if "invoice_id" in product and ("invoice_data" in product or "customer_id" in product):
            problems.append(
                "invoice_id (cancel_invoice) and customer_id/invoice_data (create_invoice) "
                "exclude each other: one job does one of them"
            )
        if "customer_id" in product and "invoice_data" not in product:
            problems.append("customer_id is given but invoice_data is not")
        if "invoice_data" in product and "customer_id" not in product:
            problems.append("invoice_data is given but customer_id is not")
        base = product.get("base_url")
        if isinstance(base, str) and "${" not in base:
            parts = urlsplit(base)
            if (problem := cleartext_problem(base, "API key")) is not None:
                problems.append(problem)
            if parts.path not in ("", "/"):
                problems.append(f"base_url: {base} has a path: give only scheme://host[:port]")
        data = product.get("invoice_data")
        if isinstance(data, Mapping):
            for key in ("voucherDate", "shippingDate"):
                day = data.get(key)
                if isinstance(day, str) and _DAY.match(day):
                    try:
                        dt.date.fromisoformat(day)
                    except ValueError:
                        problems.append(f"invoice_data.{key}: {day} is not a date")
            for n, item in enumerate(data.get("lineItems") or []):
                if not isinstance(item, Mapping):
                    continue
                price = item.get("unitPrice") or {}
                for where, value in (
                    ("quantity", item.get("quantity")),
                    ("unitPrice.netAmount", price.get("netAmount")),
                    ("unitPrice.taxRatePercentage", price.get("taxRatePercentage")),
                    ("discountPercentage", item.get("discountPercentage")),
                ):
                    problem = _decimal_problem(value)
                    if problem is not None:
                        problems.append(f"invoice_data.lineItems[{n}].{where}: {problem}")
        return problems

    def execute(self, ctx: RunContext) -> ExecResult:
        if ctx.type not in TYPES:
            raise ExecutorError(
                f"lexware: unknown type {ctx.type!r}: give one of {', '.join(TYPES)}"
            )
        problems = self.validate(ctx.product)
        if problems:
            raise ExecutorError("lexware: " + "; ".join(problems))
        api = _Api(ctx)
        try:
            if ctx.type == "create_invoice":
                return _create_invoice(api, ctx)
            return _cancel_invoice(api, ctx)
        finally:
            api.close()


# ---------------------------------------------------------------------- the two operations
def reference(job_id: str) -> str:
    """The line in an invoice's remark that says which job made it."""
    return f"spoold-job: {job_id}"


def _create_invoice(api: _Api, ctx: RunContext) -> ExecResult:
    product = ctx.product
    for field in ("customer_id", "invoice_data"):
        if field not in product:
            raise ExecutorError(f"lexware: create_invoice needs {field}")
    customer = str(product["customer_id"])
    data = product["invoice_data"]
    draft = bool(product.get("draft", False))
    ref = reference(ctx.job_id)
    body = invoice_body(customer, data, ref)  # raises on bad amounts before anything is sent
    day = str(data["voucherDate"])
    found = api.find_invoice(ref, customer, day)
    if found is not None:
        ctx.log.info(f"lexware: invoice {found['id']} already carries {ref!r}: adopting it")
        return _invoice_result(api, str(found["id"]), ref, adopted=True)
    params = {} if draft else {"finalize": "true"}
    for n in range(_CREATES):
        try:
            created = api.call("POST", "/v1/invoices", params=params, body=body, create=True)
        except _Lost as lost:
            ctx.log.error(f"lexware: the answer to the create was lost ({lost}): looking it up")
            found = api.settle_and_find(lambda: api.find_invoice(ref, customer, day))
            if found is not None:
                ctx.log.info(f"lexware: the create had succeeded: invoice {found['id']}")
                return _invoice_result(api, str(found["id"]), ref, adopted=True)
            if n + 1 == _CREATES:
                raise ExecutorError(
                    f"lexware: {_CREATES} creates lost their answer and none is found",
                    retryable=True,
                ) from None
            ctx.log.info("lexware: no invoice carries the reference: creating it again")
            continue
        ctx.log.info(f"lexware: created invoice {created.get('id')}")
        return _invoice_result(api, str(created["id"]), ref, adopted=False)
    raise AssertionError("unreachable")


def _invoice_result(api: _Api, invoice_id: str, ref: str, *, adopted: bool) -> ExecResult:
    invoice = api.call("GET", f"/v1/invoices/{_uuid(invoice_id)}")
    result = {
        "invoice_id": invoice_id,
        "number": invoice.get("voucherNumber"),
        "status": invoice.get("voucherStatus"),
        "amount": _amount(invoice.get("totalPrice") or {}),
        "reference": ref,
        "adopted": adopted,
    }
    api.ctx.log.info(
        f"lexware: invoice {result['number'] or '(draft, no number yet)'} "
        f"{result['amount'].get('gross')} {result['amount'].get('currency')} ({result['status']})"
    )
    return ExecResult(0, result=result)


def _cancel_invoice(api: _Api, ctx: RunContext) -> ExecResult:
    if "invoice_id" not in ctx.product:
        raise ExecutorError("lexware: cancel_invoice needs invoice_id")
    invoice_id = _uuid(str(ctx.product["invoice_id"]))
    ref = reference(ctx.job_id)
    invoice = api.call("GET", f"/v1/invoices/{invoice_id}")
    if invoice.get("voucherStatus") == "draft":
        raise ExecutorError(
            f"lexware: invoice {invoice_id} is a draft: there is nothing to cancel with a credit "
            "note (delete the draft in Lexware Office)"
        )
    existing = _credit_note_of(invoice)
    if existing is not None:
        ctx.log.info(f"lexware: invoice {invoice_id} already has credit note {existing}: adopting")
        return _credit_result(api, invoice_id, existing, ref, adopted=True)
    body = credit_note_body(invoice, ref, now=ctx.clock.now())
    params = {"precedingSalesVoucherId": invoice_id, "finalize": "true"}
    for n in range(_CREATES):
        try:
            created = api.call("POST", "/v1/credit-notes", params=params, body=body, create=True)
        except _Lost as lost:
            ctx.log.error(f"lexware: the answer to the credit note was lost ({lost}): looking")
            found = api.settle_and_find(
                lambda: _credit_note_of(api.call("GET", f"/v1/invoices/{invoice_id}"))
            )
            if found is not None:
                return _credit_result(api, invoice_id, found, ref, adopted=True)
            if n + 1 == _CREATES:
                raise ExecutorError(
                    f"lexware: {_CREATES} credit notes lost their answer and none is found",
                    retryable=True,
                ) from None
            continue
        ctx.log.info(f"lexware: created credit note {created.get('id')} for {invoice_id}")
        return _credit_result(api, invoice_id, str(created["id"]), ref, adopted=False)
    raise AssertionError("unreachable")


def _credit_note_of(invoice: Mapping[str, Any]) -> str | None:
    for related in invoice.get("relatedVouchers") or []:
        if str(related.get("voucherType", "")).lower() in ("creditnote", "credit-note"):
            return str(related["id"])
    return None


def _credit_result(
    api: _Api, invoice_id: str, note_id: str, ref: str, *, adopted: bool
) -> ExecResult:
    note = api.call("GET", f"/v1/credit-notes/{_uuid(note_id)}")
    result = {
        "invoice_id": invoice_id,
        "credit_note_id": note_id,
        "credit_note_number": note.get("voucherNumber"),
        "amount": _amount(note.get("totalPrice") or {}),
        "reference": ref,
        "adopted": adopted,
    }
    return ExecResult(0, result=result)


# ---------------------------------------------------------------------- bodies
def invoice_body(customer_id: str, data: Mapping[str, Any], ref: str) -> dict[str, Any]:
    """The JSON of ``POST /v1/invoices`` from ``invoice_data`` (amounts as Decimal)."""
    currency = str(data.get("currency", "EUR"))
    tax_type = str(data.get("taxType", "net"))
    if tax_type == "gross":
        raise ExecutorError("lexware: taxType gross is not supported: give net prices")
    items = []
    for n, item in enumerate(data["lineItems"]):
        price = item["unitPrice"]
        line: dict[str, Any] = {
            "type": str(item.get("type", "custom")),
            "name": str(item["name"]),
            "quantity": to_decimal(item["quantity"], f"lineItems[{n}].quantity"),
            "unitName": str(item.get("unitName", "Stück")),
            "unitPrice": {
                "currency": currency,
                "netAmount": to_decimal(price["netAmount"], f"lineItems[{n}].unitPrice.netAmount"),
                "taxRatePercentage": to_decimal(
                    price["taxRatePercentage"], f"lineItems[{n}].unitPrice.taxRatePercentage"
                ),
            },
        }
        if "description" in item:
            line["description"] = str(item["description"])
        if "discountPercentage" in item:
            line["discountPercentage"] = to_decimal(
                item["discountPercentage"], f"lineItems[{n}].discountPercentage"
            )
        items.append(line)
    day = str(data["voucherDate"])
    remark = "\n".join(filter(None, [str(data.get("remark", "")).rstrip(), ref]))
    body: dict[str, Any] = {
        "voucherDate": lexware_date(day),
        "language": str(data.get("language", "de")),
        "address": {"contactId": customer_id},
        "lineItems": items,
        "totalPrice": {"currency": currency},
        "taxConditions": {"taxType": tax_type},
        "shippingConditions": {
            "shippingType": str(data.get("shippingType", "service")),
            "shippingDate": lexware_date(str(data.get("shippingDate", day))),
        },
        "remark": remark,
    }
    for key in ("title", "introduction"):
        if key in data:
            body[key] = str(data[key])
    if "paymentTermLabel" in data or "paymentTermDuration" in data:
        body["paymentConditions"] = {
            k: data[k] for k in ("paymentTermLabel", "paymentTermDuration") if k in data
        }
    return body


def credit_note_body(invoice: Mapping[str, Any], ref: str, *, now: dt.datetime) -> dict[str, Any]:
    """A credit note over the whole invoice (its line items, address and tax conditions),
    dated the day ``now`` is in Berlin."""
    items = []
    for item in invoice.get("lineItems") or []:
        line = {k: item[k] for k in ("type", "name", "description", "quantity", "unitName",
                                     "discountPercentage") if k in item}  # fmt: skip
        if "unitPrice" in item:
            price = item["unitPrice"]
            line["unitPrice"] = {
                k: price[k] for k in ("currency", "netAmount", "taxRatePercentage") if k in price
            }
        items.append(line)
    address = invoice.get("address") or {}
    if "contactId" in address:
        address = {"contactId": address["contactId"]}
    number = invoice.get("voucherNumber") or invoice.get("id")
    today = now.astimezone(_BERLIN).date().isoformat()
    return {
        "voucherDate": lexware_date(today),
        "language": invoice.get("language", "de"),
        "address": dict(address),
        "lineItems": items,
        "totalPrice": {"currency": (invoice.get("totalPrice") or {}).get("currency", "EUR")},
        "taxConditions": dict(invoice.get("taxConditions") or {"taxType": "net"}),
        "title": "Rechnungskorrektur",
        "introduction": f"Storno der Rechnung {number}",
        "remark": ref,
    }


def lexware_date(day: str) -> str:
    """YYYY-MM-DD as the API's timestamp: midnight in Europe/Berlin."""
    try:
        date = dt.date.fromisoformat(day)
    except ValueError:
        raise ExecutorError(f"lexware: {day!r} is not a date (YYYY-MM-DD)") from None
    moment = dt.datetime(date.year, date.month, date.day, tzinfo=_BERLIN)
    return moment.isoformat(timespec="milliseconds")


def to_decimal(value: Any, where: str) -> Decimal:
    """An amount as Decimal; a float is taken as the shortest text that reads back as it."""
    problem = _decimal_problem(value)
    if problem is not None:
        raise ExecutorError(f"lexware: {where}: {problem}")
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value))


def _decimal_problem(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and "${" in value):
        return None
    if isinstance(value, bool):
        return f"{value!r} is not a number"
    try:
        number = Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value))
    except InvalidOperation:
        return f"{value!r} is not a decimal number"
    if not number.is_finite():
        return f"{value!r} is not a finite number"
    exponent = number.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -4:
        return f"{value!r} has more than 4 decimal places"
    return None


def _amount(total: Mapping[str, Any]) -> dict[str, str | None]:
    def text(key: str) -> str | None:
        value = total.get(key)
        return None if value is None else str(Decimal(str(value)))

    return {
        "currency": total.get("currency"),
        "net": text("totalNetAmount"),
        "tax": text("totalTaxAmount"),
        "gross": text("totalGrossAmount"),
    }


def _uuid(value: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F-]{36}", value):
        raise ExecutorError(f"lexware: {value!r} is not an id (a UUID)")
    return value.lower()


def dumps(value: Any) -> bytes:
    """JSON with each Decimal as its exact decimal text (json.dumps knows only float)."""
    marks: list[str] = []

    def default(o: Any) -> Any:
        if isinstance(o, Decimal):
            marks.append(format(o, "f"))
            return f"\0decimal{len(marks) - 1}\0"
        raise TypeError(f"{type(o).__name__} is not JSON")

    text = json.dumps(value, default=default, ensure_ascii=False)
    text = re.sub(r'"\\u0000decimal(\d+)\\u0000"', lambda m: marks[int(m.group(1))], text)
    return text.encode()


# ---------------------------------------------------------------------- the API
class _Api:
    """Requests to one Lexware API, rate-limited, retried, with the job's deadline and cancel."""

    def __init__(self, ctx: RunContext) -> None:
        import requests  # noqa: PLC0415 - only when a job runs

        self.ctx, self._requests = ctx, requests
        self.base = str(ctx.product.get("base_url") or DEFAULT_BASE_URL).rstrip("/")
        self.session = requests.Session()
        self.session.trust_env = False  # a proxy from the environment must not see the key
        self.session.headers.update(
            {
                "Authorization": f"Bearer {ctx.product['api_key']}",
                "Accept": "application/json",
                "User-Agent": "spoold-lexware",
            }
        )
        settings = ctx.settings or {}
        self.limiter = RateLimiter(
            "lexware", RATE, PER_SECOND, directory=settings.get("rate_dir"),
            margin=float(settings.get("rate_margin", 0.05)),
        )  # fmt: skip
        self.settle = tuple(float(s) for s in settings.get("settle_seconds", _SETTLE))
        self.bound = Bound(Deadline.of(ctx), name="lexware", max_body=_MAX_ANSWER,
                           request_seconds=_REQUEST_TIMEOUT)  # fmt: skip
        self.bound.mount(self.session)

    def close(self) -> None:
        self.session.close()

    def left(self) -> float | None:
        return self.bound.deadline.left()

    def call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        create: bool = False,
    ) -> Any:
        """One request, retried on 429/5xx; a create whose answer is lost raises _Lost."""
        # Here, on the URL as it is sent: validate sees `${...}` unfilled, and skips it.
        if (clear := cleartext_problem(self.base, "API key")) is not None:
            raise ExecutorError(f"lexware: {clear}")
        errors = self._requests.exceptions
        query = "&".join(f"{k}={v}" for k, v in (params or {}).items())
        shown = f"{method} {path}" + (f"?{query}" if query else "")
        data = None if body is None else dumps(body)
        delay = _BACKOFF_FIRST
        for tries in range(1, 10_000):
            self.bound.deadline.check()
            left = self.left()
            # The limiter's deadline is on its own clock, the one its processes share.
            until = None if left is None else self.limiter.clock() + left
            try:
                self.limiter.acquire(self.ctx.cancel, until)
            except ExecutorError:
                self.bound.deadline.check()  # a cancel is a cancel, not a failure
                raise
            self.ctx.log.info(f"lexware: {shown}")
            try:  # the session's adapter bounds it by the time left (Bound)
                answer = self.session.request(
                    method, self.base + path, params=params, data=data, timeout=_REQUEST_TIMEOUT,
                    headers={"Content-Type": "application/json"} if data is not None else None,
                )  # fmt: skip
            except (errors.ConnectionError, errors.Timeout) as exc:
                sent = not isinstance(exc, errors.ConnectTimeout)
                if create and sent:
                    raise _Lost(type(exc).__name__) from None
                why = f"cannot reach {self.base}: {type(exc).__name__}"
                self._wait_before_retry(shown, why, delay, None, tries)
                delay = min(delay * 2, _BACKOFF_MAX)
                continue
            status = answer.status_code
            if 200 <= status < 300:
                if not answer.content:
                    return {}
                return json.loads(answer.content, parse_float=Decimal)
            if status == 429 or status >= 500:
                if create and status != 429:  # a 429 was refused; a 5xx may have been done
                    raise _Lost(f"{status}")
                hint = _retry_after(answer.headers.get("Retry-After"), self.ctx.clock.now())
                self._wait_before_retry(shown, f"answered {status}", delay, hint, tries)
                delay = min(delay * 2, _BACKOFF_MAX)
                continue
            detail = _detail(answer)
            if status == 401:
                detail += " (check api_key)"
            raise ExecutorError(f"lexware: {shown} failed: {status} {detail}")
        raise AssertionError("unreachable")

    def _wait_before_retry(
        self, shown: str, why: str, delay: float, hint: float | None, tries: int
    ) -> None:
        left = self.left()
        if left is None and tries >= _TRIES_WITHOUT_TIMEOUT:
            raise ExecutorError(f"lexware: {shown}: {why}, {tries} times", retryable=True)
        wait = delay if hint is None else max(hint, 0.0)
        if left is not None and wait >= left:
            raise ExecutorError(f"lexware: {shown}: {why}; no time left to retry", retryable=True)
        self.ctx.log.info(f"lexware: {shown}: {why}; retrying in {wait:.1f}s")
        if self.ctx.cancel.wait(wait):
            raise Stopped(cancelled=True)

    def settle_and_find(self, look: Any) -> Any:
        """Look for what a lost create may have made, after each settle wait."""
        for wait in (0.0, *self.settle):
            left = self.left()
            if left is not None and wait >= left:
                break
            if wait and self.ctx.cancel.wait(wait):
                raise Stopped(cancelled=True)
            found = look()
            if found is not None:
                return found
        return None

    def find_invoice(self, ref: str, customer: str, day: str) -> dict[str, Any] | None:
        """The customer's invoice of ``day`` whose remark carries ``ref``, or None."""
        found, seen = [], set()
        for row in self._voucherlist(customer, day):
            if str(row.get("id")) in seen:
                continue
            seen.add(str(row.get("id")))
            invoice = self.call("GET", f"/v1/invoices/{_uuid(str(row['id']))}")
            if ref in str(invoice.get("remark") or "").splitlines():
                found.append(invoice)
        if len(found) > 1:
            ids = ", ".join(str(f["id"]) for f in found)
            raise ExecutorError(f"lexware: several invoices carry {ref!r}: {ids}; resolve by hand")
        return found[0] if found else None

    def _voucherlist(self, customer: str, day: str) -> Iterator[Mapping[str, Any]]:
        pages = _MAX_PAGES
        for page in range(_MAX_PAGES):
            if page >= pages:
                break
            params = {
                "voucherType": "invoice", "voucherStatus": _STATUSES, "contactId": customer,
                "voucherDateFrom": day, "voucherDateTo": day, "size": "250", "page": str(page),
            }  # fmt: skip
            answer = self.call("GET", "/v1/voucherlist", params=params)
            yield from answer.get("content") or []
            if answer.get("last", True) or not answer.get("content"):
                return
            total = answer.get("totalPages")
            if isinstance(total, int) and not isinstance(total, bool):
                pages = min(pages, total)
        # Not knowing the whole list, a lookup cannot say the invoice is not there.
        raise ExecutorError(
            f"lexware: the voucher list of customer {customer} on {day} did not end after "
            f"{pages} page(s) (the server said there were more): cannot tell whether this "
            "job's invoice exists, so none is created; look in Lexware Office"
        )


def _retry_after(value: str | None, now: dt.datetime) -> float | None:
    """Seconds to wait as a Retry-After header says, at most 120; None for a header that is
    not one (RFC 7231 7.1.3: delay-seconds, or an HTTP-date in any of its three forms)."""
    text = (value or "").strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():  # not float(): "nan", "1e9", "-5" are no delay
        return min(float(text), 120.0)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" and the asctime form: HTTP-dates are all in GMT
        when = when.replace(tzinfo=dt.UTC)
    return min(max(0.0, (when - now).total_seconds()), 120.0)


def _detail(answer: Any) -> str:
    try:
        doc = answer.json()
    except ValueError:
        return str(answer.text)[:300]
    if isinstance(doc, dict):
        text = str(doc.get("message") or doc.get("error") or "")
        details = doc.get("details")
        if details:
            text += f" {details}"
        return text[:500]
    return str(doc)[:300]
