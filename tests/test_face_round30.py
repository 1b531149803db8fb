"""The faces against a hostile tester's findings (round 30): a job's log served raw to a
terminal through the API (and its follow streams, and the page's tail), backslashes that
``printable`` left as they were, notification webhook URLs shown in full in a job's page, and
pages and answers behind a token that a cache could keep."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from spoold.face.views import LogText, printable
from tests.apiclient import Api, module_api, sse_events
from tests.harness import run_cli, wait_for
from tests.test_page import page_session

pytestmark = pytest.mark.daemon

#: Clears the screen, turns red, writes the clipboard (OSC 52, ended by BEL).
HOSTILE = r"printf 'A\033[2J\033[31mRED\033]52;c;cHduZWQ=\007B\n'"
HOSTILE_BYTES = b"A\x1b[2J\x1b[31mRED\x1b]52;c;cHduZWQ=\x07B\n"
#: What a terminal acts on: C0 (but newline and tab), DEL, C1 (as UTF-8: U+0080-U+009F).
CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    yield from module_api(tmp_path_factory, "round30")


def job(job_id: str, commands: str | list[str], **fields: object) -> str:
    document = {"job_id": job_id, "executor": "local", "product": {"commands": commands}}
    return yaml.safe_dump({**document, **fields})


def ran(api: Api, text: str, job_id: str, *states: str) -> Path:
    """Submit ``text``, wait until the job is in done/ or failed/; its directory."""
    answer = api.submit(text)
    assert answer.status_code == 201, answer.text
    found: list[Path] = []

    def ended() -> bool:
        found[:] = [api.spool / d / job_id for d in ("done", "failed")
                    if (api.spool / d / job_id / "status.json").exists()]  # fmt: skip
        return bool(found)

    wait_for(ended, what=f"job {job_id} to end")
    return found[0]


# -- 1: a job's log is no terminal's input ------------------------------------------------------


def test_the_log_escapes_what_would_drive_a_terminal_and_raw_keeps_the_bytes(api: Api) -> None:
    directory = ran(api, job("r30-esc-1", HOSTILE), "r30-esc-1")
    stored = (directory / "log").read_bytes()
    assert HOSTILE_BYTES in stored
    shown = api.call("GET", "/api/v1/jobs/r30-esc-1/log", token="read")
    assert shown.status_code == 200
    assert shown.headers["content-type"].startswith("text/plain")
    assert not CONTROLS.search(shown.text), shown.text
    assert "A\\x1b[2J\\x1b[31mRED\\x1b]52;c;cHduZWQ=\\x07B\n" in shown.text
    assert shown.text == printable(stored.decode("utf-8", "surrogateescape"), lines=True)
    assert int(shown.headers["X-Log-Size"]) == len(stored)
    assert int(shown.headers["X-Log-Next-Offset"]) == len(stored)
    raw = api.call("GET", "/api/v1/jobs/r30-esc-1/log", token="read", params={"raw": 1})
    assert raw.status_code == 200
    assert raw.headers["content-type"] == "application/octet-stream"
    assert raw.headers["content-disposition"].startswith("attachment")
    assert raw.content == stored
    assert raw.headers["X-Log-Size"] == str(len(stored))


def test_a_followed_log_is_escaped_as_text_and_as_events(api: Api) -> None:
    ran(api, job("r30-esc-2", HOSTILE), "r30-esc-2")
    whole = api.call("GET", "/api/v1/jobs/r30-esc-2/log").text
    with api.call("GET", "/api/v1/jobs/r30-esc-2/log", params={"follow": 1},
                  stream=True) as text:  # fmt: skip
        assert text.headers["content-type"].startswith("text/plain")
        body = b"".join(text.iter_content(None)).decode("utf-8")
    assert body == whole and not CONTROLS.search(body)
    events = {"Accept": "text/event-stream"}
    with api.call("GET", "/api/v1/jobs/r30-esc-2/log", params={"follow": 1}, headers=events,
                  stream=True) as stream:  # fmt: skip
        assert stream.headers["content-type"].startswith("text/event-stream")
        seen = []
        for event in sse_events(stream):
            if event.get("event") == "end":
                break
            seen.append(event["data"])
    assert "\n".join(seen) + "\n" == whole
    with api.call("GET", "/api/v1/jobs/r30-esc-2/log", params={"follow": 1, "raw": 1},
                  stream=True) as raw_stream:  # fmt: skip
        assert raw_stream.headers["content-type"] == "application/octet-stream"
        raw = b"".join(raw_stream.iter_content(None))
    assert HOSTILE_BYTES in raw


#: Several-byte characters, escapes and a byte that is not UTF-8, for pages cut anywhere.
MIXED = r"printf 'ä€😀\033[1m\\x\377ö\n'; printf 'tail€'"


@pytest.mark.parametrize("limit", [1, 2, 3, 5, 7])
def test_pages_are_byte_offsets_and_join_into_the_whole_text(api: Api, limit: int) -> None:
    job_id = f"r30-pages-{limit}"
    directory = ran(api, job(job_id, MIXED), job_id)
    stored = (directory / "log").read_bytes()
    whole = api.call("GET", f"/api/v1/jobs/{job_id}/log").text
    texts, raws, offset = [], [], 0
    while offset < len(stored):
        params = {"offset": offset, "limit": limit}
        page = api.call("GET", f"/api/v1/jobs/{job_id}/log", params=params)
        raw = api.call("GET", f"/api/v1/jobs/{job_id}/log", params={**params, "raw": 1})
        assert int(page.headers["X-Log-Offset"]) == offset
        following = int(page.headers["X-Log-Next-Offset"])
        assert offset < following <= offset + limit
        assert int(raw.headers["X-Log-Next-Offset"]) == offset + len(raw.content)
        texts.append(page.text)
        raws.append(raw.content[: following - offset])
        offset = following
    assert offset == len(stored)
    assert b"".join(raws) == stored
    if limit >= 4:  # a page holds whole characters: pages of them join into the whole
        assert "".join(texts) == whole, (texts, whole)
    assert not any(CONTROLS.search(text) for text in texts)


def test_the_jobs_page_shows_its_log_escaped(api: Api) -> None:
    ran(api, job("r30-esc-3", HOSTILE), "r30-esc-3")
    reader = page_session(api, api.tokens["read"])
    html = reader.get(api.url + "/jobs/r30-esc-3", timeout=30).text
    assert "\x1b" not in html and "\x07" not in html
    assert "A\\x1b[2J\\x1b[31mRED" in html


# -- 2: a backslash is escaped where anything is ------------------------------------------------


def test_printable_tells_a_backslash_from_an_escape() -> None:
    assert printable("out/back\\slash") == "out/back\\\\slash"
    assert printable("out/name\nwith newline") == "out/name\\nwith newline"
    assert printable("out/name\\nwith newline") != printable("out/name\nwith newline")
    assert printable("a\\x1b", lines=True) == "a\\\\x1b"
    assert printable("a\x1b", lines=True) == "a\\x1b"


def test_invisible_characters_that_reorder_or_hide_text_are_escaped() -> None:
    """Seen: bidi overrides and isolates, zero-width and tag characters reached the terminal
    raw through spoold logs and the API's log (a line can show the reverse of what it holds)."""
    for char, shown in [("\u202e", "\\u202e"), ("\u2066", "\\u2066"), ("\u2069", "\\u2069"),
                        ("\u2028", "\\u2028"), ("\u200b", "\\u200b"), ("\ufeff", "\\ufeff"),
                        ("\U000e0041", "\\U000e0041")]:  # fmt: skip
        assert printable(f"a{char}b", lines=True) == f"a{shown}b"
        assert LogText().text(f"a{char}b\n".encode(), final=True) == f"a{shown}b\n"
    # What scripts and emoji need is shown as it is: joiners, letters, marks.
    assert printable("\u0645\u200c\u0647 \U0001f468\u200d\U0001f469 \u00e4") == (
        "\u0645\u200c\u0647 \U0001f468\u200d\U0001f469 \u00e4"
    )


def test_spoold_status_shows_an_artifact_with_a_backslash_unlike_one_with_a_newline(
    api: Api,
) -> None:
    commands = "mkdir -p out && echo a > 'out/back\\slash' && printf b > \"out/nl$(printf '\\nx')\""
    ran(api, job("r30-bs-1", commands, artifacts=[{"path": "out/*"}]), "r30-bs-1")
    shown = run_cli(api.spool, "status", "r30-bs-1")
    assert shown.returncode == 0, shown.stderr
    assert "out/back\\\\slash (" in shown.stdout, shown.stdout
    assert "out/nl\\nx (" in shown.stdout, shown.stdout


def test_list_escapes_a_rejected_name_once() -> None:
    from spoold.face.listing import row_text  # noqa: PLC0415

    row = {"name": "a\\b\x1b.yaml", "state": "rejected", "code": "invalid", "reason": "x\\y\x1b"}
    line = row_text(row)
    assert line.startswith("a\\\\b\\x1b.yaml ")
    # A reason quotes its values escaped where it was made: its backslashes stay single, and
    # what is still raw is escaped (as spoold validate prints the same refusal).
    assert line.endswith("invalid: x\\y\\x1b")


# -- 3: every URL a job file sends to is shown as its host ----------------------------------------

SECRETS = ("whu", "TANGO-PW", "UNIFORM-PATH", "VICTOR-Q", "cbu", "CB-PW", "CB-PATH", "ZULU-PW")


def _hostile_job_file(port: int) -> str:
    return (
        "job_id: r30-hook-1\n"
        "executor: local\n"
        "# an old hook: http://zu:ZULU-PW@127.0.0.1:1/x\n"
        "product: {commands: 'true'}\n"
        "callback:\n"
        f"  url: http://cbu:CB-PW@127.0.0.1:{port}/CB-PATH\n"
        "  secret: s3cret-cb\n"
        "  events: [succeeded]\n"
        "notify:\n"
        f'  - webhook: {{url: "http://whu:TANGO-PW@127.0.0.1:{port}/p/UNIFORM-PATH?k=VICTOR-Q",'
        " format: json}\n"
        "    on: [succeeded]\n"
    )


def test_the_job_file_masks_webhook_urls_and_every_url_with_a_password() -> None:
    from spoold.face.page import masked_job_file  # noqa: PLC0415

    text = _hostile_job_file(9)
    for data in (text, json.dumps(yaml.safe_load(text)).replace("/", "\\/")):
        shown = masked_job_file(data.encode()).text
        for secret in SECRETS:
            assert secret not in shown, (secret, shown)
        assert "http://127.0.0.1:9/***" in shown, shown
    folded = "job_id: x\nproduct:\n  commands: >-\n    curl\n    http://u:ZULU-PW@h.example/x\n"
    assert "ZULU-PW" not in masked_job_file(folded.encode()).text


def test_the_jobs_page_shows_no_webhook_key_nor_password(api: Api) -> None:
    from tests.loopback import free_port  # noqa: PLC0415

    port = free_port()  # nothing listens: the sends fail, the page is what is looked at
    ran(api, _hostile_job_file(port), "r30-hook-1")
    reader = page_session(api, api.tokens["read"])
    html = reader.get(api.url + "/jobs/r30-hook-1", timeout=30).text
    assert f"http://127.0.0.1:{port}/***" in html
    for secret in SECRETS:
        assert secret not in html, secret
    for said in (api.call("GET", "/api/v1/jobs/r30-hook-1", token="read").text,
                 run_cli(api.spool, "status", "r30-hook-1", "--json").stdout):  # fmt: skip
        for secret in SECRETS:
            assert secret not in said, secret


# -- 4: nothing behind a token is kept by a cache -----------------------------------------------


def test_every_answer_behind_a_token_or_session_is_no_store(api: Api) -> None:
    text = job("r30-cache-1", "mkdir -p out && echo hi > out/a.txt", artifacts=[{"path": "out/*"}])
    ran(api, text, "r30-cache-1")
    for path in ("/api/v1/jobs", "/api/v1/jobs/r30-cache-1", "/api/v1/jobs/r30-cache-1/log",
                 "/api/v1/jobs/r30-cache-1/log?raw=1", "/api/v1/jobs/r30-cache-1/artifacts",
                 "/api/v1/jobs/r30-cache-1/artifacts/out/a.txt", "/api/v1/status",
                 "/api/v1/schedules", "/metrics", "/openapi.json", "/api/v1/jobs/nope"):  # fmt: skip
        answer = api.call("GET", path, token="read")
        assert answer.headers.get("Cache-Control") == "no-store", (path, answer.headers)
    with api.call("GET", "/api/v1/jobs/r30-cache-1/log", params={"follow": 1},
                  headers={"Accept": "text/event-stream"}, stream=True) as stream:  # fmt: skip
        assert stream.headers.get("Cache-Control") == "no-store"
    reader = page_session(api, api.tokens["read"])
    for path in ("/", "/jobs", "/jobs/r30-cache-1", "/schedules", "/rejected", "/deliveries",
                 "/login", "/jobs/r30-cache-1/log-missing"):  # fmt: skip
        answer = reader.get(api.url + path, timeout=30)
        assert answer.headers.get("Cache-Control") == "no-store", (path, answer.headers)
    static = reader.get(api.url + "/static/page.js", timeout=30)
    assert static.status_code == 200
    assert "no-store" not in static.headers.get("Cache-Control", "")
