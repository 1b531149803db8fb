"""What each attempt cost, through the HTTP faces (issue 24): the job's status, its web page and
the per-executor histograms of GET /metrics, from a real daemon."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.apiclient import Api, start_api
from tests.harness import wait_for
from tests.test_usage import ALLOCATE, MB, PRINT

pytestmark = pytest.mark.daemon


def _submit(api: Api, job_id: str, commands: str) -> None:
    text = yaml.safe_dump(
        {"job_id": job_id, "executor": "local", "product": {"commands": commands}}
    )
    answer = api.submit(text)
    assert answer.status_code == 201, answer.text


def _finished(api: Api, job_id: str) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        answer = api.call("GET", f"/api/v1/jobs/{job_id}", token="read")
        found: dict[str, Any] = answer.json() if answer.ok else {}
        return found if found.get("state") in ("succeeded", "failed") else None

    return wait_for(ended, what=f"job {job_id} to end")


def _samples(api: Api) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = api.call("GET", "/metrics", token="read").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _page(api: Api, path: str) -> str:
    """A page as a logged-in browser gets it (the login form, its hidden fields, the token)."""
    session = requests.Session()
    shown = session.get(api.url + "/login", timeout=30).text
    hidden = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', shown))
    answer = session.post(api.url + "/login", data={**hidden, "token": api.tokens["read"]},
                          allow_redirects=False, timeout=30)  # fmt: skip
    assert answer.status_code == 303, answer.text
    page = session.get(api.url + path, timeout=30)
    assert page.status_code == 200, page.text
    return page.text


def test_status_page_and_metrics_show_what_attempts_cost(tmp_path: Path) -> None:
    api = start_api(tmp_path)
    try:
        _submit(api, "big", f"{ALLOCATE}; {PRINT}")
        _submit(api, "small", PRINT)
        big, small = _finished(api, "big"), _finished(api, "small")
        assert big["state"] == small["state"] == "succeeded"
        usage = big["attempts"][0]["usage"]
        assert usage["peak_memory_bytes"] >= 200 * MB and usage["output_bytes"] == 11
        local = (("executor", "local"),)

        def counted() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
            samples = _samples(api)
            done = samples.get(("spoold_job_output_bytes_count", local)) == 2
            return samples if done else None

        samples = wait_for(counted, what="both attempts in the usage histograms")
        assert samples[("spoold_job_output_bytes_sum", local)] == 22
        assert samples[("spoold_job_output_bytes_bucket", (*local, ("le", "100.0")))] == 2
        assert samples[("spoold_job_cpu_seconds_count", local)] == 2
        assert samples[("spoold_job_peak_memory_bytes_count", local)] == 2
        # The big one above 128 MiB, the small one (a shell) below it.
        below = ("le", str(float(128 * MB)))
        assert samples[("spoold_job_peak_memory_bytes_bucket", (*local, below))] == 1
        assert samples[("spoold_job_peak_memory_bytes_sum", local)] >= 200 * MB
        # Counted once: a next scrape adds nothing.
        assert _samples(api)[("spoold_job_output_bytes_count", local)] == 2
        page = _page(api, "/jobs/big")
        assert re.search(r'<td class="usage">wall [^<]*peak memory 2\d\d\.\d MiB, '
                         r"output 11 bytes \(from the kernel\)</td>", page), page  # fmt: skip
    finally:
        api.daemon.kill()
