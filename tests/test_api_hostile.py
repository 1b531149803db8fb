"""The HTTP API and the web page against a hostile caller, over loopback on a real daemon:
secret values of a job file however it spells them (JSON, flow style, block scalars, quoted
keys), log offsets and Last-Event-IDs past what a file can hold or not ASCII digits, artifact
names no header can carry as they are (outside Latin-1, CR, LF), job ids no job can have on the
page, 405 answers that name the methods a path has, HEAD, and 404s that name no server path.

Every answer is a 2xx or a 4xx: never a 5xx, a dropped connection, or an ERROR in the log."""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Iterator, Mapping
from html.parser import HTMLParser
from urllib.parse import quote, unquote

import pytest
import requests
import yaml

from tests.apiclient import Api, module_api
from tests.harness import wait_for

pytestmark = pytest.mark.daemon

COOKIE = "spoold_session"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    yield from module_api(tmp_path_factory, "hostile")


def wait_state(api: Api, job_id: str, *states: str) -> dict[str, object]:
    def reached() -> dict[str, object] | None:
        answer = api.call("GET", f"/api/v1/jobs/{job_id}", token="read")
        return answer.json() if answer.ok and answer.json()["state"] in states else None

    return wait_for(reached, what=f"job {job_id} to be {' or '.join(states)}")


def finished_job(api: Api, text: str, *, content_type: str = "application/yaml") -> str:
    """Submit ``text`` and wait for its job to end; its id."""
    answer = api.call("POST", "/api/v1/jobs", data=text.encode(),
                      headers={"Content-Type": content_type})  # fmt: skip
    assert answer.status_code == 201, answer.text
    job_id = str(answer.json()["job_id"])
    wait_state(api, job_id, "succeeded", "failed")
    return job_id


def raw(api: Api, method: str, path: str, headers: Mapping[str, str | bytes] | None = None,
        body: bytes | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:  # fmt: skip
    """One request as sent (no client tidying its path or headers): status, headers, body."""
    host, port = api.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        if body is not None:
            connection.putheader("Content-Type", "application/x-www-form-urlencoded")
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        answer = connection.getresponse()
        return answer.status, answer.msg, answer.read()
    finally:
        connection.close()


def bearer(api: Api, scope: str = "admin") -> dict[str, str | bytes]:
    return {"Authorization": f"Bearer {api.tokens[scope]}"}


class _Page(HTMLParser):
    """What a page says: its text, the hrefs of its artifact links, its forms' CSRF token."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.artifacts: list[str] = []
        self.csrf = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "a" and "artifact" in (values.get("class") or ""):
            self.artifacts.append(values.get("href") or "")
        if tag == "input" and values.get("name") == "csrf":
            self.csrf = values.get("value") or ""

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def read_page(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    return page


def page_session(api: Api, token: str = "admin") -> requests.Session:
    """Logged in as the login form does it: its hidden inputs (a CSRF token, if it has one)
    sent back with the token."""
    session = requests.Session()
    shown = session.get(api.url + "/login", timeout=30)
    hidden = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', shown.text))
    answer = session.post(api.url + "/login", data={**hidden, "token": api.tokens[token]},
                          allow_redirects=False, timeout=30)  # fmt: skip
    assert answer.status_code == 303, answer.text
    return session


def errors_logged(api: Api) -> list[str]:
    return [line for line in api.daemon.log().splitlines() if " ERROR " in line]


# -- 1. the job page masks every secret value of the job file ----------------------------


COMMANDS = {"commands": "true"}
#: Job files that spell a secret-named field in ways a line-based pattern misses, each with
#: the secret value that must not be shown.
SPELLINGS = {
    "json": (json.dumps({"executor": "local", "product": COMMANDS,
                         "variables": {"DB_PASSWORD": "jsonPasswordLeak111"}}, indent=2),
             "jsonPasswordLeak111"),
    "json-one-line": (json.dumps({"executor": "local", "product": COMMANDS,
                                  "variables": {"API_TOKEN": "tokenLeak888",
                                                "DB_PASSWORD": "oneLinePasswordLeak"}}),
                      "oneLinePasswordLeak"),
    "flow": ("executor: local\nproduct: {commands: 'true'}\n"
             "variables: {DB_PASSWORD: flowPasswordLeak222, OTHER: x}\n", "flowPasswordLeak222"),
    "folded": ("executor: local\nproduct: {commands: 'true'}\nvariables:\n  DB_PASSWORD: >-\n"
               "    foldedPassword\n    Leak333\n", "foldedPassword Leak333"),
    "literal": ("executor: local\nproduct: {commands: 'true'}\nvariables:\n  DB_PASSWORD: |\n"
                "    literalPasswordLeak444\n", "literalPasswordLeak444"),
    "quoted-key": ('executor: local\nproduct: {commands: "true"}\nvariables:\n'
                   '  "DB_PASSWORD": quotedKeyLeak555\n', "quotedKeyLeak555"),
    "escaped": ('executor: local\nproduct: {commands: "true"}\nvariables:\n'
                '  DB_PASSWORD: "escaped\\x50asswordLeak666"\n', "escapedPasswordLeak666"),
    "number-in-flow": ("executor: local\nproduct: {commands: 'true'}\n"
                       "variables: {DB_PASSWORD: 918273645546372819}\n", "918273645546372819"),
    "next-line": ("executor: local\nproduct: {commands: 'true'}\nvariables:\n  DB_PASSWORD:\n"
                  "    nextLinePasswordLeak777\n", "nextLinePasswordLeak777"),
}  # fmt: skip


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_the_job_page_shows_no_secret_value_however_the_file_spells_it(
    api: Api, spelling: str
) -> None:
    text, secret = SPELLINGS[spelling]
    kind = "application/json" if spelling.startswith("json") else "application/yaml"
    job_id = finished_job(api, text, content_type=kind)
    session = page_session(api)
    shown = session.get(f"{api.url}/jobs/{job_id}", timeout=30)
    assert shown.status_code == 200, shown.text
    for part in {secret, *secret.split(), "tokenLeak888"}:
        assert part not in shown.text, (spelling, part)
    words = "".join(read_page(shown.text).text)
    assert "DB_PASSWORD" in words and "executor" in words  # the file is shown, masked


def test_the_job_page_keeps_secret_references_and_says_when_it_shows_the_parsed_file(
    api: Api,
) -> None:
    plain = finished_job(api, "executor: local\nproduct: {commands: 'true'}\nvariables:\n"
                              "  DB_PASSWORD: ${secret:db}\n  NAME: shown-plainly\n")  # fmt: skip
    session = page_session(api)
    shown = session.get(f"{api.url}/jobs/{plain}", timeout=30).text
    assert "${secret:db}" in shown and "shown-plainly" in shown
    assert "parsed" not in "".join(read_page(shown).text)
    folded_text, _ = SPELLINGS["folded"]
    folded = finished_job(api, folded_text)
    shown = session.get(f"{api.url}/jobs/{folded}", timeout=30).text
    assert "foldedPassword" not in shown and "Leak333" not in shown
    assert "parsed" in "".join(read_page(shown).text)  # the page says it is not the raw text


# -- 2. log offsets ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def logged(api: Api) -> str:
    return finished_job(api, "executor: local\nproduct: {commands: 'echo one; echo two'}\n")


@pytest.mark.parametrize(
    "offset", ["99999999999999999999", "9223372036854775807", "9223372036854775808", "-1",
               "1e3", "%C2%B2", "%EF%BC%91"],
)  # fmt: skip
def test_a_log_offset_beyond_any_file_or_not_decimal_is_not_a_server_error(
    api: Api, logged: str, offset: str
) -> None:
    status, headers, body = raw(api, "GET", f"/api/v1/jobs/{logged}/log?offset={offset}",
                                bearer(api, "read"))  # fmt: skip
    assert 400 <= status < 500 or (status == 200 and body == b""), (offset, status, body)
    if status == 200:  # past the end reads as the end
        assert headers["X-Log-Offset"] == headers["X-Log-Next-Offset"] == headers["X-Log-Size"]


@pytest.mark.parametrize("last", [b"99999999999999999999", b"9223372036854775807", b"\xb2",
                                  b"\xef\xbc\x91", b"-5", b"abc"])  # fmt: skip
@pytest.mark.parametrize("accept", ["text/event-stream", "text/plain"])
def test_a_last_event_id_that_is_no_byte_offset_is_not_a_server_error(
    api: Api, logged: str, last: bytes, accept: str
) -> None:
    status, _, body = raw(api, "GET", f"/api/v1/jobs/{logged}/log?follow=1",
                          {**bearer(api, "read"), "Accept": accept, "Last-Event-ID": last})  # fmt: skip
    assert status < 500, (last, status, body)
    if status == 200 and last.isdigit():  # past the end: nothing but the end
        assert b"one" not in body


def test_a_huge_offset_followed_reads_from_the_end(api: Api, logged: str) -> None:
    status, _, body = raw(api, "GET", f"/api/v1/jobs/{logged}/log?follow=1&offset={2**63 - 1}",
                          {**bearer(api, "read"), "Accept": "text/event-stream"})  # fmt: skip
    assert status == 200, body
    assert b"one" not in body and b"event: end" in body
    assert not errors_logged(api)


# -- 3. artifacts of any name --------------------------------------------------------------


NAMES = ["€uro.txt", "日本.txt", "cr\rlf.txt", "new\nline.txt", "latin-é.txt", 'quo"te.txt',
         "per%41cent.txt", "q?mark.txt", "ha#sh.txt", "back\\slash.txt", "semi;colon.txt",
         "tab\tbed.txt", "plain.txt", "sp ace.txt"]  # fmt: skip


@pytest.fixture(scope="module")
def artifacts(api: Api) -> str:
    commands = ["mkdir -p out"] + [
        f"printf %s {json.dumps(str(i))} > \"$(printf 'out/%s' {shell_quote(name)})\""
        for i, name in enumerate(NAMES)
    ]
    text = yaml.safe_dump({"executor": "local", "product": {"commands": commands},
                           "artifacts": [{"path": "out/*"}]})  # fmt: skip
    return finished_job(api, text)


def shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def filename_of(disposition: str) -> str:
    """What a browser saves an attachment as: ``filename*`` (RFC 8187) before ``filename``."""
    extended = re.search(r"filename\*=UTF-8''([^;\s]+)", disposition, re.IGNORECASE)
    if extended:
        return unquote(extended.group(1), errors="strict")
    plain = re.search(r'filename="([^"]*)"', disposition)
    assert plain, disposition
    return plain.group(1)


def test_every_listed_artifact_downloads_under_its_own_name(api: Api, artifacts: str) -> None:
    listed = api.call("GET", f"/api/v1/jobs/{artifacts}/artifacts", token="read").json()
    paths = {entry["path"] for entry in listed}
    assert paths == {f"out/{name}" for name in NAMES}
    for index, name in enumerate(NAMES):
        path = f"/api/v1/jobs/{artifacts}/artifacts/{quote('out/' + name)}"
        status, headers, body = raw(api, "GET", path, bearer(api, "read"))
        assert status == 200, (name, status, body[:200])
        assert body == str(index).encode()
        disposition = headers["Content-Disposition"]
        assert disposition.isascii() and disposition.isprintable(), disposition
        assert disposition.startswith("attachment; ")
        assert filename_of(disposition) == name
        fallback = re.search(r'filename="([^"]*)"', disposition)
        assert fallback and "%" not in fallback.group(1) and "\\" not in fallback.group(1)
    got = api.call("GET", f"/api/v1/jobs/{artifacts}/artifacts/out/plain.txt", token="read")
    assert got.headers["Content-Disposition"] == 'attachment; filename="plain.txt"'
    assert not errors_logged(api)


def test_the_job_page_links_every_artifact_so_that_it_downloads(api: Api, artifacts: str) -> None:
    session = page_session(api)
    shown = session.get(f"{api.url}/jobs/{artifacts}", timeout=30)
    links = read_page(shown.text).artifacts
    assert len(links) == len(NAMES)
    for link in links:
        cookie = session.cookies[COOKIE]
        status, _, body = raw(api, "GET", link, {"Cookie": f"{COOKIE}={cookie}"})
        assert status == 200, (link, status, body[:200])


# -- 4. job ids no job can have, on the page ------------------------------------------------


@pytest.mark.parametrize("job_id", ["a%00b", "..%2E", "%2E%2E", "a%0Ab", "-lead", "x" * 200,
                                    "a%C2%B2b", "%E2%82%AC"])  # fmt: skip
def test_the_page_answers_a_job_id_no_job_can_have_with_a_client_error(
    api: Api, job_id: str
) -> None:
    session = page_session(api, "admin")
    cookie = {"Cookie": f"{COOKIE}={session.cookies[COOKIE]}"}
    form = f"csrf={read_page(session.get(api.url + '/jobs', timeout=30).text).csrf}".encode()
    status, _, body = raw(api, "GET", f"/jobs/{job_id}", cookie)
    assert status == 404, (job_id, status, body[:200])
    for path in ("/jobs/{}/cancel", "/jobs/{}/retry", "/schedules/{}/run", "/schedules/{}/pause",
                 "/schedules/{}/resume"):  # fmt: skip
        status, _, body = raw(api, "POST", path.format(job_id), cookie, form)
        assert status == 404, (path, job_id, status, body[:200])
    assert not [line for line in errors_logged(api) if "valid job id" in line]


def test_the_page_answers_a_delivery_name_no_delivery_can_have_with_a_client_error(
    api: Api,
) -> None:
    session = page_session(api, "admin")
    cookie = {"Cookie": f"{COOKIE}={session.cookies[COOKIE]}"}
    form = f"csrf={read_page(session.get(api.url + '/jobs', timeout=30).text).csrf}".encode()
    for name in ("..", "%2E%2E", ".", "nothing", "a%00b", ".hidden~1"):
        status, _, body = raw(api, "POST", f"/deliveries/{name}/resend", cookie, form)
        assert status == 404, (name, status, body[:200])
    status, _, _ = raw(api, "POST", "/deliveries/nobody~00000001/resend", cookie, form)
    assert status == 303  # a delivery's name, of none given up: said so on the page


def test_a_session_cookie_or_csrf_token_of_any_bytes_is_refused_not_a_server_error(
    api: Api,
) -> None:
    for cookie in (b"x.\xb2.\xb2", b"x.1.\xff\xfe", b"a.\xef\xbc\x91.abc", b"\xb2.\xb2.\xb2"):
        status, _, body = raw(api, "GET", "/jobs", {"Cookie": COOKIE.encode() + b"=" + cookie})
        assert status == 303, (cookie, status, body[:200])
        status, _, body = raw(api, "GET", "/api/v1/jobs",
                              {"Cookie": COOKIE.encode() + b"=" + cookie})  # fmt: skip
        assert status == 401, (cookie, status, body[:200])
        status, _, body = raw(api, "POST", "/logout",
                              {"Cookie": COOKIE.encode() + b"=" + cookie,
                               "Content-Type": "application/x-www-form-urlencoded",
                               "Content-Length": "0"})  # fmt: skip
        assert status < 500, (cookie, status, body[:200])
    session = page_session(api, "admin")
    for csrf in ("\u00b2", "é" * 40, "\U0001f600"):
        answer = session.post(f"{api.url}/logout", data={"csrf": csrf}, allow_redirects=False,
                              timeout=30)  # fmt: skip
        assert answer.status_code == 403, (csrf, answer.status_code, answer.text)


# -- 5. 405 and HEAD ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [("DELETE", "/api/v1/jobs/some-job", {"GET", "HEAD"}),
     ("PUT", "/api/v1/jobs", {"GET", "HEAD", "POST"}),
     ("GET", "/api/v1/jobs/some-job/cancel", {"POST"}),
     ("DELETE", "/api/v1/jobs/some-job/artifacts/out/a.txt", {"GET", "HEAD"}),
     ("POST", "/healthz", {"GET", "HEAD"}),
     ("PATCH", "/api/v1/schedules/s/run", {"POST"}),
     ("DELETE", "/jobs/some-job", {"GET", "HEAD"}),
     ("DELETE", "/static/page.css", {"GET", "HEAD"}),
     ("HEAD", "/api/v1/jobs/some-job/retry", {"POST"})],
)  # fmt: skip
def test_a_405_names_every_method_the_path_has(
    api: Api, method: str, path: str, allowed: set[str]
) -> None:
    status, headers, _ = raw(api, method, path, bearer(api))
    assert status == 405
    assert {m.strip() for m in headers["Allow"].split(",")} == allowed


def test_get_routes_answer_head_without_a_body(api: Api, logged: str) -> None:
    for path, token in [("/healthz", None), ("/api/v1/jobs", "read"),
                        (f"/api/v1/jobs/{logged}", "read"), (f"/api/v1/jobs/{logged}/log", "read"),
                        ("/metrics", "read"), ("/login", None)]:  # fmt: skip
        got = api.call("GET", path, token=token)
        head = api.call("HEAD", path, token=token)
        assert head.status_code == got.status_code == 200, (path, head.status_code)
        assert head.content == b""
        assert head.headers["Content-Type"] == got.headers["Content-Type"]
    assert api.call("HEAD", "/api/v1/jobs", token=None).status_code == 401


# -- 6. no server path in an answer --------------------------------------------------------


def test_a_404_names_the_job_and_no_server_path(api: Api) -> None:
    spool = str(api.spool)
    for path in ("/api/v1/jobs/nope", "/api/v1/jobs/nope/log", "/api/v1/jobs/nope/artifacts",
                 "/api/v1/jobs/nope/artifacts/a.txt", "/api/v1/schedules/nope/run",
                 "/api/v1/schedules/nope/pause"):  # fmt: skip
        method = "POST" if path.startswith("/api/v1/schedules") else "GET"
        answer = api.call(method, path)
        assert answer.status_code == 404, (path, answer.text)
        assert spool not in answer.text and str(api.spool.parent) not in answer.text
    assert api.call("GET", "/api/v1/jobs/nope").json() == {"detail": "no job 'nope'"}
    session = page_session(api)
    shown = session.get(f"{api.url}/jobs/nope", timeout=30)
    assert shown.status_code == 404 and spool not in shown.text
