"""Never an invoice twice, on the real daemon: killed after the vendor made the invoice and
before its answer arrived, restarted, the job adopts that invoice instead of making another."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_sevdesk import FakeSevdesk
from tests.harness import DaemonProcess, drop, wait_finished, wait_for, write_config

pytestmark = pytest.mark.daemon


@pytest.fixture
def sevdesk() -> Iterator[FakeSevdesk]:
    with FakeSevdesk() as fake:
        yield fake


def test_a_daemon_killed_between_create_and_answer_makes_one_invoice(
    sevdesk: FakeSevdesk, spool_dir: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "config.yaml", spool_dir)
    sevdesk.hold_after_create = threading.Event()
    first = DaemonProcess(spool_dir, config)
    first.start()
    try:
        drop(spool_dir, "bill.yaml", {
            "job_id": "bill-4711", "executor": "sevdesk", "type": "create_invoice",
            "on_interrupt": "requeue",
            "product": {
                "api_token": sevdesk.token, "contact_id": 1001, "base_url": sevdesk.base_url,
                "invoice_data": {
                    "invoice_date": "2026-11-20", "contact_person_id": 7, "currency": "EUR",
                    "positions": [{"name": "Hosting", "quantity": 3, "price": "19.99",
                                   "tax_rate": 19}],
                },
            },
        })  # fmt: skip
        wait_for(lambda: sevdesk.count() == 1, what="the invoice made at sevDesk")
    finally:
        first.kill()  # its answer never arrives
    sevdesk.hold_after_create.set()
    sevdesk.hold_after_create = None
    second = DaemonProcess(spool_dir, config)
    second.start()
    try:
        directory, status = wait_finished(spool_dir, "bill-4711")
    finally:
        second.kill()
    assert directory == "done", status
    assert sevdesk.count() == 1, "a second invoice was made"
    assert status["result"]["adopted"] is True
    assert status["result"]["amount"]["gross"] == "71.36"
    assert len(status["attempts"]) == 2 and "interrupted" in str(status["attempts"][0]["error"])
    assert sevdesk.violations == []
