"""The sevdesk executor against the fake sevDesk, which checks every request against the vendor's
OpenAPI description (``fake.violations``)."""

from __future__ import annotations

import datetime as dt
import io
import json
import time
from collections.abc import Iterator, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from spoold.executors.base import ExecResult
from spoold.executors.sevdesk import SevdeskExecutor, _Dec, _dumps, decimal, totals

from spoold.intake.validation import job_validator
from spoold.run.registry import ExecutorRegistry
from tests.fake_sevdesk import FakeSevdesk
from tests.test_executors import _context, _Log

pytestmark = pytest.mark.timeout(60)

INVOICE: dict[str, Any] = {
    "contact_person_id": 7,
    "invoice_date": "2026-11-20",
    "currency": "EUR",
    "positions": [{"name": "Hosting", "quantity": 3, "price": "19.99", "tax_rate": 19}],
}


@pytest.fixture
def fake() -> Iterator[FakeSevdesk]:
    with FakeSevdesk() as server:
        yield server


def _run(
    fake: FakeSevdesk, tmp_path: Path, type_: str, job_id: str = "job-1", **product: Any
) -> tuple[ExecResult, _Log]:
    log = _Log()
    full = {"api_token": fake.token, "base_url": fake.base_url, **product}
    context = _context(tmp_path, full, log, executor="sevdesk", type=type_, job_id=job_id)
    return SevdeskExecutor().run(context), log


def _create(fake: FakeSevdesk, tmp_path: Path, **extra: Any) -> tuple[ExecResult, _Log]:
    product = {"contact_id": 1001, "invoice_data": INVOICE, **extra}
    return _run(fake, tmp_path, "create_invoice", **product)


def test_create_invoice_result_and_exact_decimal_totals(fake: FakeSevdesk, tmp_path: Path) -> None:
    result, log = _create(fake, tmp_path)
    assert result.succeeded, result.error
    r = result.result
    assert r["adopted"] is False and r["reference"] == "spoold:job-1"
    assert r["invoice_id"] in {str(i) for i in fake.invoices}
    assert r["invoice_number"] == "RE-0001" and r["status"] == "100"
    # 3 x 19.99 = 59.97 net; 19 % = 11.3943 -> 11.39; gross 71.36: no float residue
    assert r["amount"] == {"net": "59.97", "tax": "11.39", "gross": "71.36"}
    assert r["computed"] == {"net": "59.97", "tax": "11.39", "gross": "71.36"}
    assert fake.count() == 1
    assert fake.token not in log.text()
    json.dumps(r)  # status.json can hold it
    assert fake.violations == []


def test_totals_use_decimal_arithmetic() -> None:
    positions: list[Mapping[str, Any]] = [
        {"quantity": "0.1", "price": "0.2", "tax_rate": "7"},
        {"quantity": 3, "price": 19.99, "tax_rate": 19, "discount": "10"},
    ]
    # 0.02 net, 0.00 tax; 53.973 -> 53.97 net, 10.2543 -> 10.25 tax
    assert totals(positions) == {"net": "53.99", "tax": "10.25", "gross": "64.24"}


def test_the_body_carries_numbers_digit_for_digit(fake: FakeSevdesk, tmp_path: Path) -> None:
    data = INVOICE | {"positions": [{"name": "x", "quantity": "2.5", "price": "0.10",
                                     "tax_rate": "7", "discount": 5, "unit_id": 2,
                                     "text": "per GB"}],
                      "delivery_date": "2026-11-20", "head_text": "Hi", "foot_text": "Bye",
                      "time_to_pay": 14, "header": "Rechnung 11/2026"}  # fmt: skip
    result, _ = _create(fake, tmp_path, invoice_data=data)
    assert result.succeeded, result.error
    assert result.result["amount"] == {"net": "0.24", "tax": "0.02", "gross": "0.26"}
    assert fake.violations == []


def test_a_crash_between_request_and_answer_then_a_rerun_adopts(
    fake: FakeSevdesk, tmp_path: Path
) -> None:
    fake.crash_after_create = True
    first, _ = _create(fake, tmp_path)
    assert not first.succeeded and first.retryable
    assert fake.count() == 1  # it was created, the answer was lost
    second, log = _create(fake, tmp_path)
    assert second.succeeded, second.error
    assert second.result["adopted"] is True
    assert second.result["invoice_id"] == str(next(iter(fake.invoices)))
    assert second.result["amount"]["gross"] == "71.36"
    assert "adopting" in log.text()
    assert fake.count() == 1
    assert fake.violations == []


def test_a_retry_after_504_adopts_the_invoice_that_was_created(
    fake: FakeSevdesk, tmp_path: Path
) -> None:
    fake.answer_after_create = 504
    first, _ = _create(fake, tmp_path)
    assert not first.succeeded and "504" in (first.error or "")
    assert first.retryable
    second, _ = _create(fake, tmp_path)
    assert second.succeeded and second.result["adopted"] is True
    assert fake.count() == 1
    assert fake.violations == []


def test_another_job_for_the_same_contact_creates_its_own_invoice(
    fake: FakeSevdesk, tmp_path: Path
) -> None:
    assert _create(fake, tmp_path)[0].succeeded
    other, _ = _run(fake, tmp_path, "create_invoice", job_id="job-2",
                    contact_id=1001, invoice_data=INVOICE)  # fmt: skip
    assert other.succeeded and other.result["adopted"] is False
    assert fake.count() == 2
    assert fake.violations == []


def test_a_429_storm_is_a_retryable_failure_and_creates_nothing(
    fake: FakeSevdesk, tmp_path: Path
) -> None:
    fake.fail_with, fake.fail_count = 429, 100
    result, _ = _create(fake, tmp_path)
    assert not result.succeeded
    assert "429" in (result.error or "") and result.retryable
    assert fake.count() == 0
    assert fake.violations == []


def test_a_refused_token_says_so_and_is_not_logged(fake: FakeSevdesk, tmp_path: Path) -> None:
    log = _Log()
    product = {"api_token": "wrong-token-abc", "base_url": fake.base_url, "contact_id": 1001,
               "invoice_data": INVOICE}  # fmt: skip
    ctx = _context(tmp_path, product, log, executor="sevdesk", type="create_invoice")
    result = SevdeskExecutor().run(ctx)
    assert not result.succeeded and "401" in (result.error or "")
    assert "check api_token" in (result.error or "")
    assert not result.retryable
    assert "wrong-token-abc" not in log.text() and "wrong-token-abc" not in str(result)
    assert fake.violations == []


def test_a_missing_contact_is_named(fake: FakeSevdesk, tmp_path: Path) -> None:
    result, _ = _create(fake, tmp_path, contact_id=999)
    assert not result.succeeded
    assert "contact 999 does not exist" in (result.error or "")
    assert not result.retryable
    assert fake.count() == 0
    assert fake.violations == []


def test_an_unreachable_server_is_retryable(tmp_path: Path) -> None:
    with FakeSevdesk() as server:
        base, token = server.base_url, server.token
    log = _Log()
    product = {"api_token": token, "base_url": base, "contact_id": 1001, "invoice_data": INVOICE}
    ctx = _context(tmp_path, product, log, executor="sevdesk", type="create_invoice")
    result = SevdeskExecutor().run(ctx)
    assert not result.succeeded and result.retryable


def test_cancel_once_and_a_second_cancel_adopts(fake: FakeSevdesk, tmp_path: Path) -> None:
    created, _ = _create(fake, tmp_path)
    invoice_id = created.result["invoice_id"]
    first, _ = _run(fake, tmp_path, "cancel_invoice", job_id="c-1", invoice_id=invoice_id)
    assert first.succeeded, first.error
    assert first.result["adopted"] is False and first.result["invoice_type"] == "SR"
    assert first.result["cancelled_invoice_id"] == invoice_id
    assert first.result["amount"]["gross"] == "-71.36"
    again, log = _run(fake, tmp_path, "cancel_invoice", job_id="c-1", invoice_id=invoice_id)
    assert again.succeeded and again.result["adopted"] is True
    assert again.result["invoice_id"] == first.result["invoice_id"]
    assert "not cancelling it twice" in log.text()
    assert fake.count("SR") == 1
    cancels = [p for m, p in fake.requests if p.endswith("/cancelInvoice")]
    assert len(cancels) == 1
    assert fake.violations == []


def test_cancel_of_an_unknown_invoice_fails_clearly(fake: FakeSevdesk, tmp_path: Path) -> None:
    result, _ = _run(fake, tmp_path, "cancel_invoice", invoice_id=424242)
    assert not result.succeeded and "424242" in (result.error or "")
    assert fake.violations == []


def _job(product: dict[str, Any], type_: str = "create_invoice") -> bytes:
    doc = {"job_id": "inv-1", "executor": "sevdesk", "type": type_, "product": product}
    return json.dumps(doc).encode()


def test_the_validator_accepts_a_good_job_and_rejects_bad_invoice_data() -> None:
    validator = job_validator(ExecutorRegistry.from_entry_points())
    good = {"api_token": "${secret:SEVDESK}", "contact_id": 1001, "invoice_data": INVOICE}
    assert validator.check(_job(good), "job.json") == []
    bad_cases: list[dict[str, Any]] = [
        INVOICE | {"positions": []},
        INVOICE | {"positions": [{"name": "x", "quantity": 1, "price": "19,99", "tax_rate": 19}]},
        INVOICE
        | {
            "positions": [
                {"name": "x", "quantity": 1, "price": "1", "tax_rate": 19, "colour": "red"}
            ]
        },
        INVOICE | {"positions": [{"name": "x", "quantity": 0, "price": "1", "tax_rate": 19}]},
        INVOICE | {"positions": [{"name": "x", "quantity": 1, "price": 1, "tax_rate": "150"}]},
        INVOICE | {"tax_rule": "11"},  # a small business bills no VAT: 19 % contradicts it
        INVOICE | {"delivery_date": "2026-12-01"},
        {k: v for k, v in INVOICE.items() if k != "contact_person_id"},
    ]
    for data in bad_cases:
        issues = validator.check(_job(good | {"invoice_data": data}), "job.json")
        assert issues, data
    cancel = {"api_token": "t", "invoice_id": "5001"}
    assert validator.check(_job(cancel, "cancel_invoice"), "job.json") == []


def test_validate_names_the_problem() -> None:
    data = INVOICE | {"tax_rule": "11", "delivery_date": "2026-12-01"}
    problems = SevdeskExecutor.validate({"api_token": "t", "invoice_data": data})
    assert any("tax_rule 11" in p for p in problems)
    assert any("delivery_date" in p for p in problems)
    placeholders = INVOICE | {"positions": [{"name": "x", "quantity": "${Q}", "price": "${P}",
                                             "tax_rate": 19}]}  # fmt: skip
    assert SevdeskExecutor.validate({"api_token": "t", "invoice_data": placeholders}) == []


def test_an_unknown_type_fails(fake: FakeSevdesk, tmp_path: Path) -> None:
    result, _ = _run(fake, tmp_path, "delete_invoice", invoice_id=1)
    assert not result.succeeded and "create_invoice" in (result.error or "")
    assert fake.violations == []


def test_a_crash_after_cancel_then_a_rerun_does_not_cancel_twice(
    fake: FakeSevdesk, tmp_path: Path
) -> None:
    invoice_id = _create(fake, tmp_path)[0].result["invoice_id"]
    fake.crash_after_cancel = True
    first, _ = _run(fake, tmp_path, "cancel_invoice", job_id="c-1", invoice_id=invoice_id)
    assert not first.succeeded and first.retryable
    second, _ = _run(fake, tmp_path, "cancel_invoice", job_id="c-1", invoice_id=invoice_id)
    assert second.succeeded and second.result["adopted"] is True
    assert fake.count("SR") == 1
    assert fake.violations == []


def test_plain_http_is_refused_except_on_loopback(tmp_path: Path) -> None:
    product = {"api_token": "t", "base_url": "http://sevdesk.example.net/api/v1"}
    assert any("plain http" in p for p in SevdeskExecutor.validate(product))
    for loopback in ("127.0.0.1:8080", "127.0.0.2", "localhost", "[::1]:80"):
        url = f"http://{loopback}/api/v1"
        assert SevdeskExecutor.validate(product | {"base_url": url}) == [], loopback
    for other in ("127.0.0.1.example.net", "[::2]", "128.0.0.1"):
        url = f"http://{other}/api/v1"
        assert any("plain http" in p for p in SevdeskExecutor.validate(product | {"base_url": url}))
    log = _Log()
    ctx = _context(tmp_path, product | {"invoice_id": 1}, log, executor="sevdesk",
                   type="cancel_invoice")  # fmt: skip
    result = SevdeskExecutor().run(ctx)
    assert not result.succeeded and "clear text" in (result.error or "")


def test_the_fake_records_what_the_description_does_not_allow(fake: FakeSevdesk) -> None:
    import requests  # noqa: PLC0415

    auth = {"Authorization": fake.token}
    requests.get(fake.base_url + "/Invoice", params={"colour": "red"}, headers=auth, timeout=5)
    requests.get(fake.base_url + "/Invoice", params={"status": "7"}, headers=auth, timeout=5)
    requests.post(fake.base_url + "/Invoice/Factory/saveInvoice",
                  json={"invoice": {"sumNet": 1}}, headers=auth, timeout=5)  # fmt: skip
    requests.delete(fake.base_url + "/Invoice/Factory/saveInvoice", headers=auth, timeout=5)
    requests.get(fake.base_url + "/Invoice", timeout=5)
    text = "\n".join(fake.violations)
    assert "unknown query parameter 'colour'" in text and "status: '7'" in text
    assert "body.invoice.sumNet: read-only" in text and "body.invoice.contact: required" in text
    assert "body.invoicePosSave: required" in text  # the vendor lists invoicePos: see the fake
    assert "DELETE /Invoice/Factory/saveInvoice" in text and "no Authorization" in text
    assert len(fake.violations) == 5


class _At:
    """A clock that stands at one moment (its monotonic time runs)."""

    def __init__(self, now: dt.datetime) -> None:
        self.moment = now

    def now(self) -> dt.datetime:
        return self.moment

    def monotonic(self) -> float:
        return time.monotonic()


def test_a_retry_after_midnight_keeps_the_first_attempts_date(
    fake: FakeSevdesk, tmp_path: Path
) -> None:
    undated = {k: v for k, v in INVOICE.items() if k != "invoice_date"}
    product = {"api_token": fake.token, "base_url": fake.base_url, "contact_id": 1001,
               "invoice_data": undated}  # fmt: skip
    log = _Log()  # the job's log, which each attempt reads back

    def attempt(now: dt.datetime) -> ExecResult:
        context = _context(tmp_path, product, log, executor="sevdesk", type="create_invoice",
                           job_id="job-1", clock=_At(now),
                           read_log=lambda: io.BytesIO(log.buffer.getvalue()))  # fmt: skip
        return SevdeskExecutor().run(context)

    fake.crash_after_create = True
    first = attempt(dt.datetime(2026, 12, 6, 23, 59, 59, tzinfo=dt.UTC))
    assert not first.succeeded and fake.count() == 1
    second = attempt(dt.datetime(2026, 12, 7, 0, 0, 30, tzinfo=dt.UTC))
    assert second.succeeded and second.result["adopted"] is True
    assert fake.count() == 1
    assert [inv["invoiceDate"][:10] for inv in fake.invoices.values()] == ["2026-12-06"]


def test_an_amount_in_exponent_form_goes_out_as_a_plain_number(
    fake: FakeSevdesk, tmp_path: Path
) -> None:
    assert _dumps({"q": _Dec(decimal(1e16, "q")), "p": _Dec(Decimal("1E-2"))}) == (
        '{"q": 10000000000000000, "p": 0.01}'
    )
    data = INVOICE | {"positions": [{"name": "x", "quantity": 1e3, "price": "2.5E+2",
                                     "tax_rate": 19}]}  # fmt: skip
    result, _ = _create(fake, tmp_path, invoice_data=data)
    assert result.succeeded, result.error
    assert result.result["amount"]["net"] == "250000.00"
    assert fake.violations == []


@pytest.mark.parametrize(
    ("position", "problem"),
    [
        ({"quantity": 1e16, "price": "1.00"}, "quantity: 10000000000000000 is more than"),
        ({"quantity": 1, "price": 1e13}, "price: 10000000000000.0 is more than"),
        ({"quantity": 1e6, "price": 1e7}, "quantity times price: 10000000000000.00 is more than"),
    ],
)
def test_absurd_amounts_are_refused(
    fake: FakeSevdesk, tmp_path: Path, position: dict[str, Any], problem: str
) -> None:
    data = INVOICE | {"positions": [{"name": "x", "tax_rate": 19, **position}]}
    assert any(problem in p for p in SevdeskExecutor.validate({"invoice_data": data}))
    result, _ = _create(fake, tmp_path, invoice_data=data)  # ${...} filled in: at run time too
    assert problem in (result.error or "")
    assert fake.requests == []


def test_a_job_whose_id_begins_another_jobs_makes_its_own_invoice(
    fake: FakeSevdesk, tmp_path: Path
) -> None:
    """``spoold:job-1`` is in ``spoold:job-10``'s note as text, not as its reference: job-1
    adopting job-10's invoice would leave its own customer unbilled."""
    other, _ = _run(fake, tmp_path, "create_invoice", job_id="job-10",
                    contact_id=1001, invoice_data=INVOICE)  # fmt: skip
    mine, log = _create(fake, tmp_path)  # job-1
    assert other.succeeded and mine.succeeded, mine.error
    assert mine.result["adopted"] is False, log.text()
    assert mine.result["invoice_id"] != other.result["invoice_id"]
    assert fake.count() == 2
    assert fake.violations == []


def test_a_cancel_adopts_only_the_cancellation_of_its_own_invoice(
    fake: FakeSevdesk, tmp_path: Path
) -> None:
    """Two invoices of one contact, the first cancelled: cancelling the second makes its own
    cancellation invoice, it does not take the first's for it."""
    first = _create(fake, tmp_path)[0].result["invoice_id"]
    second = _run(fake, tmp_path, "create_invoice", job_id="job-2",
                  contact_id=1001, invoice_data=INVOICE)[0].result["invoice_id"]  # fmt: skip
    assert _run(fake, tmp_path, "cancel_invoice", job_id="c-1", invoice_id=first)[0].succeeded
    result, log = _run(fake, tmp_path, "cancel_invoice", job_id="c-2", invoice_id=second)
    assert result.succeeded, result.error
    assert result.result["adopted"] is False, log.text()
    assert result.result["cancelled_invoice_id"] == second
    assert fake.invoices[int(result.result["invoice_id"])]["origin"]["id"] == second
    assert int(second) in fake.cancelled and fake.count("SR") == 2
    assert fake.violations == []


def test_a_cancellation_invoice_is_not_cancelled(fake: FakeSevdesk, tmp_path: Path) -> None:
    invoice_id = _create(fake, tmp_path)[0].result["invoice_id"]
    cancelled, _ = _run(fake, tmp_path, "cancel_invoice", job_id="c-1", invoice_id=invoice_id)
    sr = cancelled.result["invoice_id"]
    result, _ = _run(fake, tmp_path, "cancel_invoice", job_id="c-2", invoice_id=sr)
    assert not result.succeeded and not result.retryable
    assert "is itself a cancellation invoice" in (result.error or "")
    assert [p for _, p in fake.requests if p.endswith("/cancelInvoice")] == [
        f"/api/v1/Invoice/{invoice_id}/cancelInvoice"
    ]
    assert fake.count("SR") == 1
    assert fake.violations == []
