"""The lexware executor against the fake Lexware Office API, which checks every request against
the (third-party, partial) API description and FACTS.md (``fake.violations``)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from spoold.executors.base import ExecResult
from spoold.executors.lexware import (
    LexwareExecutor,
    _retry_after,
    credit_note_body,
    dumps,
    reference,
)

from tests.fake_lexware import FakeLexware
from tests.test_executors import _context, _Log

pytestmark = pytest.mark.timeout(90)

CUSTOMER = "5a0a5b4c-1111-4222-8333-944445555666"


@pytest.fixture
def fake() -> Iterator[FakeLexware]:
    with FakeLexware() as server:
        yield server
        # The executor keeps to the limit by itself: the fake never had to refuse it...
        assert server.max_in_window(1.0) <= 2


def _invoice_data(**extra: Any) -> dict[str, Any]:
    return {
        "voucherDate": "2026-11-20",
        "title": "Rechnung",
        "lineItems": [
            {"name": "Hosting", "quantity": "3", "unitPrice": {"netAmount": "0.1",
                                                                "taxRatePercentage": 19}},
            {"name": "Support", "quantity": 1.5, "unitName": "Stunde",
             "unitPrice": {"netAmount": "19.99", "taxRatePercentage": "19"}},
        ],
        **extra,
    }  # fmt: skip


def _product(fake: FakeLexware, **extra: Any) -> dict[str, Any]:
    return {"api_key": fake.api_key, "base_url": fake.url, **extra}


def _run(
    fake: FakeLexware,
    tmp_path: Path,
    type_: str,
    product: dict[str, Any],
    job_id: str = "invoice-4711",
    **ctx: Any,
) -> tuple[ExecResult, _Log]:
    log = _Log()
    settings = {"rate_dir": str(tmp_path / "rate"), "settle_seconds": [0.2]}
    context = _context(
        tmp_path, _product(fake, **product), log, executor="lexware", type=type_,
        job_id=job_id, settings=settings, **ctx,
    )  # fmt: skip
    return LexwareExecutor().run(context), log


def _create(fake: FakeLexware, tmp_path: Path, **extra: Any) -> tuple[ExecResult, _Log]:
    product = {"customer_id": CUSTOMER, "invoice_data": _invoice_data(), **extra}
    return _run(fake, tmp_path, "create_invoice", product, timeout=60.0)


def _posts(fake: FakeLexware, path: str) -> list[str]:
    return [p for _, m, p in fake.requests if m == "POST" and p.split("?")[0] == path]


def test_create_finalized(fake: FakeLexware, tmp_path: Path) -> None:
    result, log = _create(fake, tmp_path)
    assert result.succeeded, log.text()
    assert len(fake.invoices) == 1
    invoice = next(iter(fake.invoices.values())).body
    assert result.result == {
        "invoice_id": invoice["id"],
        "number": invoice["voucherNumber"],
        "status": "open",
        "amount": {"currency": "EUR", "net": "30.29", "tax": "5.76", "gross": "36.05"},
        "reference": "spoold-job: invoice-4711",
        "adopted": False,
    }
    assert _posts(fake, "/v1/invoices") == ["/v1/invoices?finalize=true"]
    assert invoice["address"] == {"contactId": CUSTOMER}
    assert invoice["remark"].splitlines()[-1] == reference("invoice-4711")
    assert invoice["voucherDate"] == "2026-11-20T00:00:00.000+01:00"
    assert fake.throttled == 0
    assert fake.violations == []


def test_create_draft(fake: FakeLexware, tmp_path: Path) -> None:
    result, log = _create(fake, tmp_path, draft=True)
    assert result.succeeded, log.text()
    assert result.result["status"] == "draft" and result.result["number"] is None
    assert _posts(fake, "/v1/invoices") == ["/v1/invoices"]
    assert len(fake.invoices) == 1
    assert fake.violations == []


def test_decimals_are_exact_on_the_wire_and_in_the_result(
    fake: FakeLexware, tmp_path: Path
) -> None:
    data = _invoice_data(lineItems=[
        {"name": "a", "quantity": "7", "unitPrice": {"netAmount": "0.1", "taxRatePercentage": 7}},
        {"name": "b", "quantity": 1, "unitPrice": {"netAmount": 1.1, "taxRatePercentage": 19}},
        {"name": "c", "quantity": "0.333", "unitPrice": {"netAmount": "0.0001",
                                                         "taxRatePercentage": "0"}},
    ])  # fmt: skip
    result, log = _run(
        fake, tmp_path, "create_invoice", {"customer_id": CUSTOMER, "invoice_data": data}
    )
    assert result.succeeded, log.text()
    items = next(iter(fake.invoices.values())).body["lineItems"]
    # The fake parses numbers as Decimal: 0.1 and 1.1 arrived as written, not as binary floats.
    assert [i["unitPrice"]["netAmount"] for i in items] == [
        Decimal("0.1"),
        Decimal("1.1"),
        Decimal("0.0001"),
    ]
    assert result.result["amount"] == {
        "currency": "EUR",
        "net": "1.80",
        "tax": "0.26",
        "gross": "2.06",
    }  # 0.70 + 1.10 + 0.00; tax 0.049 -> 0.05, 0.209 -> 0.21
    assert all(isinstance(v, str) for k, v in result.result["amount"].items())
    assert dumps({"x": Decimal("0.10"), "y": [Decimal("1E+1")]}) == b'{"x": 0.10, "y": [10]}'
    assert fake.violations == []


def test_a_504_after_a_successful_create_adopts_it(fake: FakeLexware, tmp_path: Path) -> None:
    fake.slow_create_504 = 0.3
    result, log = _create(fake, tmp_path)
    assert result.succeeded, log.text()
    assert len(fake.invoices) == 1
    assert len(_posts(fake, "/v1/invoices")) == 1
    assert result.result["adopted"] is True
    assert result.result["invoice_id"] in fake.invoices
    assert "504" in log.text()
    assert fake.violations == []


def test_a_crash_after_create_then_a_rerun_adopts(fake: FakeLexware, tmp_path: Path) -> None:
    fake.crash_after_create = True
    first, log = _create(fake, tmp_path)
    assert first.succeeded, log.text()  # the lost answer is looked up within the attempt
    rerun, log = _create(fake, tmp_path)  # the same job again (as after a crash of spoold)
    assert rerun.succeeded, log.text()
    assert rerun.result["adopted"] is True
    assert rerun.result["invoice_id"] == first.result["invoice_id"]
    assert len(fake.invoices) == 1 and len(_posts(fake, "/v1/invoices")) == 1
    assert fake.violations == []


def test_another_job_on_the_same_day_is_not_adopted(fake: FakeLexware, tmp_path: Path) -> None:
    first, _ = _create(fake, tmp_path)
    second, log = _run(
        fake, tmp_path, "create_invoice",
        {"customer_id": CUSTOMER, "invoice_data": _invoice_data()}, job_id="invoice-4712",
    )  # fmt: skip
    assert second.succeeded, log.text()
    assert second.result["adopted"] is False
    assert second.result["invoice_id"] != first.result["invoice_id"]
    assert len(fake.invoices) == 2
    assert fake.violations == []


def test_a_429_storm_is_waited_out_within_the_timeout(fake: FakeLexware, tmp_path: Path) -> None:
    fake.storm_429 = 4
    result, log = _create(fake, tmp_path)
    assert result.succeeded, log.text()
    assert fake.throttled == 4 and len(fake.invoices) == 1
    assert "answered 429" in log.text()
    assert fake.violations == []


def test_a_storm_longer_than_the_timeout_fails_retryable(fake: FakeLexware, tmp_path: Path) -> None:
    fake.storm_429 = 1000
    product = {"customer_id": CUSTOMER, "invoice_data": _invoice_data()}
    result, _ = _run(fake, tmp_path, "create_invoice", product, timeout=2.0)
    assert not result.succeeded and result.retryable
    assert fake.invoices == {}
    assert fake.violations == []


def test_two_jobs_at_once_share_the_limit(fake: FakeLexware, tmp_path: Path) -> None:
    results: list[ExecResult] = []

    def job(n: int) -> None:
        product = {"customer_id": CUSTOMER, "invoice_data": _invoice_data()}
        results.append(_run(fake, tmp_path, "create_invoice", product, job_id=f"j{n}")[0])

    threads = [threading.Thread(target=job, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [r.succeeded for r in results] == [True] * 3
    assert fake.throttled == 0 and len(fake.invoices) == 3
    assert fake.violations == []


def test_cancel_makes_one_credit_note_and_a_second_cancel_none(
    fake: FakeLexware, tmp_path: Path
) -> None:
    created, _ = _create(fake, tmp_path)
    invoice_id = created.result["invoice_id"]
    first, log = _run(fake, tmp_path, "cancel_invoice", {"invoice_id": invoice_id}, "cancel-1")
    assert first.succeeded, log.text()
    assert len(fake.credit_notes) == 1
    note = next(iter(fake.credit_notes.values())).body
    assert note["precedingSalesVoucherId"] == invoice_id
    assert _posts(fake, "/v1/credit-notes") == [
        f"/v1/credit-notes?precedingSalesVoucherId={invoice_id}&finalize=true"
    ]
    assert first.result["credit_note_id"] == note["id"] and first.result["adopted"] is False
    assert first.result["amount"]["gross"] == created.result["amount"]["gross"]
    again, log = _run(fake, tmp_path, "cancel_invoice", {"invoice_id": invoice_id}, "cancel-2")
    assert again.succeeded, log.text()
    assert again.result["adopted"] is True and again.result["credit_note_id"] == note["id"]
    assert len(fake.credit_notes) == 1
    assert fake.violations == []


def test_a_credit_note_is_dated_by_the_jobs_clock_in_berlin() -> None:
    invoice = {"id": "i-1", "voucherNumber": "RE-1", "lineItems": [], "totalPrice": {}}
    late_evening_utc = datetime(2026, 12, 31, 23, 30, tzinfo=UTC)  # already 2027 in Berlin
    note = credit_note_body(invoice, reference("j"), now=late_evening_utc)
    assert note["voucherDate"] == "2027-01-01T00:00:00.000+01:00"


def test_cancel_whose_answer_is_lost_does_not_credit_twice(
    fake: FakeLexware, tmp_path: Path
) -> None:
    created, _ = _create(fake, tmp_path)
    fake.slow_create_504 = 0.1
    result, log = _run(
        fake, tmp_path, "cancel_invoice", {"invoice_id": created.result["invoice_id"]}, "c"
    )
    assert result.succeeded, log.text()
    assert result.result["adopted"] is True and len(fake.credit_notes) == 1
    assert fake.violations == []


def test_cancelling_a_draft_is_refused(fake: FakeLexware, tmp_path: Path) -> None:
    created, _ = _create(fake, tmp_path, draft=True)
    result, _ = _run(
        fake, tmp_path, "cancel_invoice", {"invoice_id": created.result["invoice_id"]}, "c"
    )
    assert not result.succeeded and "draft" in str(result.error)
    assert fake.credit_notes == {}
    assert fake.violations == []


def test_the_api_key_is_not_in_the_log(fake: FakeLexware, tmp_path: Path) -> None:
    fake.slow_create_504 = 0.1
    fake.storm_429 = 2
    result, log = _create(fake, tmp_path)
    assert result.succeeded
    assert fake.api_key not in "\n".join(log.lines())
    assert fake.api_key not in json.dumps(result.result)
    assert fake.violations == []


def test_a_wrong_key_fails_without_retry(fake: FakeLexware, tmp_path: Path) -> None:
    product = {"customer_id": CUSTOMER, "invoice_data": _invoice_data(), "api_key": "nope"}
    result, _ = _run(fake, tmp_path, "create_invoice", product)
    assert not result.succeeded and "401" in str(result.error)
    assert "check api_key" in str(result.error) and not result.retryable
    assert fake.violations == []


def _schema() -> jsonschema.protocols.Validator:
    text = files("spoold.schemas.executors").joinpath("lexware.schema.json").read_text()
    return jsonschema.Draft202012Validator(json.loads(text))


def test_the_schema_checks_invoice_data_before_anything_is_sent() -> None:
    good: dict[str, Any] = {
        "api_key": "k",
        "customer_id": CUSTOMER,
        "invoice_data": _invoice_data(),
    }
    assert list(_schema().iter_errors(good)) == []
    assert LexwareExecutor.validate(good) == []
    bads: list[dict[str, Any]] = [
        {"lineItems": []},
        {"voucherDate": "20.11.2026", "lineItems": _invoice_data()["lineItems"]},
        {"voucherDate": "2026-11-20", "lineItems": [{"name": "x", "quantity": 1}]},
        {"voucherDate": "2026-11-20", "lineItems": [
            {"name": "x", "quantity": "1,5", "unitPrice": {"netAmount": 1, "taxRatePercentage": 19}}
        ]},
        {**_invoice_data(), "surprise": 1},
    ]  # fmt: skip
    for bad in bads:
        assert list(_schema().iter_errors({**good, "invoice_data": bad})) != [], bad


def test_validate_says_what_the_schema_cannot() -> None:
    base = {"api_key": "k", "customer_id": CUSTOMER}
    data = _invoice_data(voucherDate="2026-02-30")
    data["lineItems"][0]["unitPrice"]["netAmount"] = 0.123456
    problems = LexwareExecutor.validate({**base, "invoice_data": data, "invoice_id": CUSTOMER,
                                         "base_url": "http://api.example.net"})  # fmt: skip
    text = "\n".join(problems)
    assert "exclude each other" in text
    assert "2026-02-30 is not a date" in text
    assert "more than 4 decimal places" in text
    assert "plain http" in text
    assert LexwareExecutor.validate({"api_key": "k", "customer_id": CUSTOMER}) == [
        "customer_id is given but invoice_data is not"
    ]


def test_an_unknown_type_or_missing_field_fails_before_any_request(
    fake: FakeLexware, tmp_path: Path
) -> None:
    result, _ = _run(fake, tmp_path, "delete_invoice", {"invoice_id": CUSTOMER})
    assert not result.succeeded and "unknown type" in str(result.error)
    result, _ = _run(fake, tmp_path, "cancel_invoice", {})
    assert not result.succeeded and "needs invoice_id" in str(result.error)
    assert fake.requests == [] and fake.violations == []


NOW = datetime(2015, 10, 21, 7, 27, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("30", 30.0),
        ("  7 ", 7.0),
        ("3600", 120.0),  # at most two minutes
        ("Wed, 21 Oct 2015 07:28:00 GMT", 30.0),  # IMF-fixdate
        ("Wed, 21 Oct 2015 07:28:00 -0000", 30.0),  # the same, zone written as -0000
        ("Wednesday, 21-Oct-15 07:28:00 GMT", 30.0),  # obsolete RFC 850 form
        ("Wed Oct 21 07:28:00 2015", 30.0),  # obsolete asctime form, no zone: GMT
        ("Wed, 21 Oct 2015 07:00:00 GMT", 0.0),  # past
        ("nan", None),
        ("1e3", None),
        ("-5", None),
        ("Wed, 99 Oct 2015 07:28:00 GMT", None),
        ("soon", None),
        ("", None),
    ],
)
def test_retry_after_reads_every_form_and_ignores_the_rest(
    header: str, seconds: float | None
) -> None:
    assert _retry_after(header, NOW) == seconds


@pytest.mark.parametrize("total_pages", [3, None])
def test_a_voucher_list_without_end_is_read_within_bounds(
    fake: FakeLexware, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, total_pages: int | None
) -> None:
    monkeypatch.setattr("spoold.executors.lexware._MAX_PAGES", 5)
    fake.add_invoice({"voucherDate": "2026-11-20T00:00:00.000+01:00",
                      "address": {"contactId": CUSTOMER}, "remark": "someone else's",
                      "lineItems": [], "totalPrice": {"currency": "EUR"}})  # fmt: skip
    fake.voucherlist_never_ends, fake.voucherlist_total_pages = True, total_pages
    done: list[ExecResult] = []
    thread = threading.Thread(target=lambda: done.append(_create(fake, tmp_path)[0]), daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "still paging through the voucher list"
    assert not done[0].succeeded
    assert "did not end after" in (done[0].error or "")
    pages = [p for _, m, p in fake.requests if p.startswith("/v1/voucherlist")]
    assert len(pages) == (total_pages or 5)
    assert _posts(fake, "/v1/invoices") == []  # not knowing the list, it creates nothing


def test_a_job_whose_id_begins_another_jobs_is_not_adopted(
    fake: FakeLexware, tmp_path: Path
) -> None:
    """The reference is a whole line of the remark: ``spoold-job: invoice-4711`` is text in
    ``spoold-job: invoice-47110``, not that invoice's reference."""
    product = {"customer_id": CUSTOMER, "invoice_data": _invoice_data()}
    other, _ = _run(fake, tmp_path, "create_invoice", product, job_id="invoice-47110")
    mine, log = _create(fake, tmp_path)  # invoice-4711
    assert other.succeeded and mine.succeeded, log.text()
    assert mine.result["adopted"] is False, log.text()
    assert mine.result["invoice_id"] != other.result["invoice_id"]
    assert len(fake.invoices) == 2
    assert fake.violations == []


def test_only_a_related_credit_note_is_taken_for_the_cancel(
    fake: FakeLexware, tmp_path: Path
) -> None:
    """An invoice's relatedVouchers list its order confirmation, its quotation too: those
    cancel nothing, so the cancel makes its credit note."""
    created, _ = _create(fake, tmp_path)
    invoice_id = created.result["invoice_id"]
    other = "0b0a5b4c-1111-4222-8333-944445555666"
    fake.invoices[invoice_id].body["relatedVouchers"].append(
        {"id": other, "voucherNumber": "AB0001", "voucherType": "orderconfirmation"}
    )
    result, log = _run(fake, tmp_path, "cancel_invoice", {"invoice_id": invoice_id}, "c-1")
    assert result.succeeded, log.text()
    assert result.result["adopted"] is False and result.result["credit_note_id"] != other
    assert len(fake.credit_notes) == 1
    assert result.result["credit_note_id"] in fake.credit_notes
    assert fake.violations == []
