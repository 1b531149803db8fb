"""The web page against someone who wants what it shows, or wants to act through it: a token
without ``read`` (logged in, or with a session cookie made for it), another site that posts a
login or links with a message of its own, two logins of one token, a callback URL with a user,
a password and a key, actions the job's state refuses, a TLS proxy in front, and a log whose
characters are several bytes long (its older lines paged back in a real browser)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest
import requests

from spoold.core.spool import Spool
from spoold.face.page.session import COOKIE, session_cookie
from spoold.face.tokens import authenticate
from tests.apiclient import Api, start_api
from tests.browser import Browser, StartBrowser, browsers  # noqa: F401 - the fixture
from tests.harness import wait_for
from tests.loopback import free_port, serve_in_thread, stop_serving
from tests.test_page import NAV, forms, job, page_session, submit, wait_state

pytestmark = pytest.mark.daemon

#: A callback URL with everything a page must not show: a user, a password, a key in the query.
HOOK_USER, HOOK_PASSWORD, HOOK_KEY = "cbuser", "Pa55w0rdXY", "K3yQ7zz"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    tmp = tmp_path_factory.mktemp("page-hostile")
    tmp.chmod(0o755)
    callbacks = {"give_up_after": "1s", "backoff": {"initial": "100ms", "max": "200ms"}}
    started = start_api(tmp, callbacks=callbacks)
    yield started
    started.daemon.kill()


def login_form(api: Api, session: requests.Session) -> dict[str, str]:
    """The login form's hidden fields, as GET /login gives them to ``session``."""
    shown = session.get(api.url + "/login", timeout=30)
    assert shown.status_code == 200, shown.text
    fields: dict[str, str] = next(f for f in forms(shown.text) if f.get("id") == "login")["inputs"]
    return fields


def post_login(
    api: Api, session: requests.Session, token: str, **headers: str
) -> requests.Response:
    fields = {**login_form(api, session), "token": token}
    return session.post(api.url + "/login", data=fields, headers=headers,
                        allow_redirects=False, timeout=30)  # fmt: skip


def flash_of(html: str) -> str | None:
    found = re.search(r'<p class="flash"[^>]*>(.*?)</p>', html, re.DOTALL)
    return found[1] if found else None


# -- 1: every page needs read -----------------------------------------------------------------


@pytest.mark.parametrize("scope", ["submit", "control"])
def test_a_token_without_read_cannot_log_in(api: Api, scope: str) -> None:
    session = requests.Session()
    answer = post_login(api, session, api.tokens[scope])
    assert answer.status_code == 403, (answer.status_code, answer.headers)
    assert "read scope" in answer.text, answer.text
    assert COOKIE not in session.cookies
    assert session.get(api.url + "/jobs", allow_redirects=False, timeout=30).status_code == 303
    said = re.compile(rf"page: login of token {scope} \([^)]*\) from 127\.0\.0\.1 refused: no read")
    wait_for(lambda: said.search(api.daemon.log()), what="the refused login in the daemon's log")


def test_a_login_says_where_it_came_from(api: Api) -> None:
    """A token that leaked shows up logging in from an address it never used."""
    assert post_login(api, requests.Session(), api.tokens["read"]).status_code == 303
    said = re.compile(r"page: token read \([^)]*\) logged in from 127\.0\.0\.1")
    wait_for(lambda: said.search(api.daemon.log()), what="the login in the daemon's log")


def test_a_session_of_a_token_without_read_sees_no_page(api: Api) -> None:
    """A session made for a submit-only token (before logins were refused so): every page is
    refused, as the API's read endpoints refuse that token."""
    submit(api, job("hostile-secret-1", "echo the-hidden-output"))
    wait_state(api, "hostile-secret-1", "succeeded")
    spool = Spool(api.spool)
    token = authenticate(spool, api.tokens["submit"])
    assert token is not None
    session = requests.Session()
    session.cookies.set(COOKIE, session_cookie(spool, token))
    for path in [*NAV.values(), "/jobs/hostile-secret-1"]:
        answer = session.get(api.url + path, allow_redirects=False, timeout=30)
        assert answer.status_code == 403, (path, answer.status_code)
        assert answer.headers["content-type"].startswith("text/html"), path
        assert "hostile-secret-1" not in answer.text and "the-hidden-output" not in answer.text
    api_answer = session.get(api.url + "/api/v1/jobs/hostile-secret-1", timeout=30)
    assert api_answer.status_code == 403  # as the API says it


# -- 2: callback URLs as the log says them ----------------------------------------------------


def test_callback_urls_and_their_errors_show_no_user_password_path_or_query(api: Api) -> None:
    port = free_port()  # nothing listens: given up after a second
    url = f"http://{HOOK_USER}:{HOOK_PASSWORD}@127.0.0.1:{port}/hook?key={HOOK_KEY}"
    submit(api, job("hostile-hook-1", "true", callback={"url": url, "secret": "s3cret-h",
                                                         "events": ["succeeded"]}))  # fmt: skip
    given_up = api.spool / "outbox" / "failed" / "hostile-hook-1~00000001.json"
    wait_for(given_up.exists, what="the delivery to be given up")
    record = json.loads(given_up.read_text())
    assert HOOK_KEY in str(record["last_error"]) or HOOK_KEY in str(record["url"])
    reader = page_session(api, api.tokens["read"])
    for path in ("/", "/deliveries", "/jobs/hostile-hook-1"):
        html = reader.get(api.url + path, timeout=30).text
        for secret in (HOOK_USER, HOOK_PASSWORD, HOOK_KEY):
            assert secret not in html, (path, secret)
    shown = reader.get(api.url + "/deliveries", timeout=30).text
    assert f"http://127.0.0.1:{port}" in shown  # where it goes: scheme, host, port


def test_error_shown_masks_every_url_and_what_urllib3_says_of_it() -> None:
    from spoold.out.messages import error_shown  # noqa: PLC0415 - the one the page shows by

    url = f"https://{HOOK_USER}:{HOOK_PASSWORD}@hooks.example.net:8443/T0/B1/{HOOK_KEY}?k=v"
    texts = [
        "ConnectionError: HTTPSConnectionPool(host='hooks.example.net', port=8443): Max "
        f"retries exceeded with url: /T0/B1/{HOOK_KEY}?k=v (Caused by NewConnectionError())",
        f"InvalidURL: Failed to parse: {url}",
        f"MissingSchema: no scheme in '{url[8:]}'",
    ]
    for text in texts:
        shown = error_shown(text, url)
        for secret in (HOOK_USER, HOOK_PASSWORD, HOOK_KEY):
            assert secret not in shown, (text, shown)
    assert "https://hooks.example.net:8443" in error_shown(texts[1], None)
    assert error_shown("HTTP 500", url) == "HTTP 500"


def test_the_job_file_shows_the_callback_url_as_the_deliveries_do() -> None:
    from spoold.face.page import masked_job_file  # noqa: PLC0415

    url = f"http://{HOOK_USER}:{HOOK_PASSWORD}@127.0.0.1:9/hook?key={HOOK_KEY}"
    for text in (f"job_id: x\ncallback:\n  url: \"{url}\"\n",
                 json.dumps({"job_id": "x", "callback": {"url": url}}).replace("/", "\\/")):  # fmt: skip
        shown = masked_job_file(text.encode()).text
        assert "http://127.0.0.1:9/" in shown, shown
        for secret in (HOOK_USER, HOOK_PASSWORD, HOOK_KEY):
            assert secret not in shown, (text, shown)


# -- 3: login CSRF ------------------------------------------------------------------------------


def test_a_login_not_from_the_pages_own_form_is_refused(api: Api) -> None:
    token = api.tokens["read"]
    bare = requests.Session()  # another site's form: no login cookie, no field
    answer = bare.post(api.url + "/login", data={"token": token}, allow_redirects=False,
                       timeout=30)  # fmt: skip
    assert answer.status_code == 403 and COOKIE not in bare.cookies, answer.status_code
    # The field of a form another session was shown: bound to that session's login cookie.
    other = login_form(api, requests.Session())
    forged = requests.Session()
    login_form(api, forged)
    answer = forged.post(api.url + "/login", data={**other, "token": token},
                         allow_redirects=False, timeout=30)  # fmt: skip
    assert answer.status_code == 403 and COOKIE not in forged.cookies
    # A browser that says another site (or another port of this host) sent it.
    for site in ("cross-site", "same-site"):
        session = requests.Session()
        answer = post_login(api, session, token, **{"Sec-Fetch-Site": site})
        assert answer.status_code == 403 and COOKIE not in session.cookies, site
    # The page's own form, as a browser sends it.
    session = requests.Session()
    answer = post_login(api, session, token, **{"Sec-Fetch-Site": "same-origin"})
    assert answer.status_code == 303 and COOKIE in session.cookies


class _Evil(BaseHTTPRequestHandler):
    """Another site's page: a form that logs whoever opens it in with the attacker's token."""

    # The browser opens a connection ahead that sends nothing; served one at a time, it held
    # the server (and the test's end) for a minute, until the browser gave it up.
    timeout = 1.0

    def do_GET(self) -> None:
        target, token = self.server.target, self.server.token  # type: ignore[attr-defined]
        page = (f'<html><body><form id="f" method="post" action="{target}/login">'
                f'<input name="token" value="{token}"></form>'
                "<script>document.getElementById('f').submit()</script></body></html>")  # fmt: skip
        body = page.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_another_sites_page_cannot_log_the_operator_in_as_someone_else(
    api: Api,
    browsers: StartBrowser,  # noqa: F811 - the fixture
) -> None:
    victim = browsers(api.url)
    victim.login(api.tokens["admin"])
    assert victim.text(".who").startswith("admin")
    evil = HTTPServer(("127.0.0.2", 0), _Evil)
    evil.target, evil.token = api.url, api.tokens["read"]  # type: ignore[attr-defined]
    thread = serve_in_thread(evil)
    try:
        with victim.tolerating("Failed to load resource"):
            victim.driver.get(f"http://127.0.0.2:{evil.server_address[1]}/")
            victim.wait(lambda d: "/login" in d.current_url, what="the forged login to be posted")
            victim.wait(lambda d: d.execute_script("return document.readyState") == "complete",
                        what="its answer")  # fmt: skip
    finally:
        stop_serving(evil, thread)
    victim.open("/")
    assert victim.text(".who").startswith("admin"), "another site's login replaced the session"


# -- 4: a session per login -------------------------------------------------------------------


def test_each_login_is_a_session_of_its_own(api: Api) -> None:
    first = page_session(api, api.tokens["read"])
    second = page_session(api, api.tokens["read"])  # within the same second, most likely
    assert first.cookies[COOKIE] != second.cookies[COOKIE]
    shown = first.get(api.url + "/", timeout=30).text
    csrf = next(f for f in forms(shown) if f.get("id") == "logout")["inputs"]["csrf"]
    ended = first.post(api.url + "/logout", data={"csrf": csrf}, allow_redirects=False,
                       timeout=30)  # fmt: skip
    assert ended.status_code == 303
    assert second.get(api.url + "/", allow_redirects=False, timeout=30).status_code == 200
    again = page_session(api, api.tokens["read"])  # right after a logout
    assert again.get(api.url + "/", allow_redirects=False, timeout=30).status_code == 200


# -- 5: Secure behind a TLS proxy ---------------------------------------------------------------


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """A daemon whose page is reached through a TLS proxy (public_url: https://...)."""
    tmp = tmp_path_factory.mktemp("page-proxied")
    tmp.chmod(0o755)
    started = start_api(tmp, api={"public_url": "https://jobs.example.net"})
    yield started
    started.daemon.kill()


def test_behind_a_tls_proxy_the_cookies_are_secure(
    proxied: Api,
    browsers: StartBrowser,  # noqa: F811 - the fixture
) -> None:
    secure = re.compile(r"(?i);\s*secure(;|$)")
    shown = requests.get(proxied.url + "/login", timeout=30)
    fields = {**next(f for f in forms(shown.text) if f.get("id") == "login")["inputs"],
              "token": proxied.tokens["read"]}  # fmt: skip
    # requests keeps a Secure cookie from going out over http: sent here as the proxy would.
    cookies = "; ".join(f"{name}={value}" for name, value in shown.cookies.items())
    answer = requests.post(proxied.url + "/login", data=fields, headers={"Cookie": cookies},
                           allow_redirects=False, timeout=30)  # fmt: skip
    assert answer.status_code == 303, answer.text
    set_cookies = [v for k, v in answer.raw.headers.items() if k.lower() == "set-cookie"]
    session_header = next(v for v in set_cookies if v.startswith(f"{COOKIE}="))
    assert secure.search(session_header), session_header
    for header in shown.raw.headers.getlist("Set-Cookie"):  # the login form's own cookie
        assert secure.search(header), header
    # Through an SSH tunnel to loopback (README), a browser keeps a Secure cookie too: it
    # counts http://127.0.0.1 as a secure context.
    tunnelled = browsers(proxied.url)
    tunnelled.login(proxied.tokens["read"])
    assert tunnelled.driver.get_cookie(COOKIE)["secure"] is True  # type: ignore[index]


# -- 7: the flash message is the page's own ---------------------------------------------------


def test_a_link_with_a_message_of_its_own_shows_nothing(api: Api) -> None:
    submit(api, job("hostile-flash-1", "exit 3"))
    wait_state(api, "hostile-flash-1", "failed")
    admin = page_session(api, api.tokens["admin"])
    said = "Your session expired: call 0800 555 0100 and read out your token"
    shown = admin.get(api.url + "/jobs/hostile-flash-1", params={"done": said}, timeout=30)
    assert shown.status_code == 200
    assert said not in shown.text and flash_of(shown.text) is None
    # The page's own message, after its own action, is shown.
    csrf = next(f for f in forms(shown.text) if f.get("id") == "retry")["inputs"]["csrf"]
    done = admin.post(api.url + "/jobs/hostile-flash-1/retry", data={"csrf": csrf}, timeout=30)
    assert done.status_code == 200 and "runs again" in (flash_of(done.text) or ""), done.text
    # Another session's redirect vouches for nothing in this one.
    other = page_session(api, api.tokens["admin"])
    elsewhere = other.get(done.url, timeout=30)
    assert flash_of(elsewhere.text) is None


# -- 8: actions the state refuses, as pages ----------------------------------------------------


def test_refused_actions_answer_with_a_page_and_the_apis_status(api: Api) -> None:
    submit(api, job("hostile-done-1", "true"))
    submit(api, job("hostile-run-1", "sleep 60"))
    wait_state(api, "hostile-done-1", "succeeded")
    wait_state(api, "hostile-run-1", "running")
    try:
        admin = page_session(api, api.tokens["admin"])
        shown = admin.get(api.url + "/", timeout=30).text
        csrf = next(f for f in forms(shown) if f.get("id") == "logout")["inputs"]["csrf"]
        cases = [("/jobs/hostile-done-1/cancel", 409, "already succeeded"),
                 ("/jobs/hostile-run-1/retry", 409, "only a failed or cancelled job"),
                 ("/jobs/hostile-nothing-1/cancel", 404, "hostile-nothing-1"),
                 ("/jobs/hostile-nothing-1/retry", 404, "hostile-nothing-1"),
                 ("/schedules/hostile-done-1/explode", 404, "explode")]  # fmt: skip
        for path, code, words in cases:
            answer = admin.post(api.url + path, data={"csrf": csrf}, allow_redirects=False,
                                timeout=30)  # fmt: skip
            assert answer.status_code == code, (path, answer.status_code, answer.text)
            assert answer.headers["content-type"].startswith("text/html"), (path, answer.text)
            assert words in answer.text and '"detail"' not in answer.text, (path, answer.text)
        missing = admin.get(api.url + "/jobs/hostile-nothing-1", allow_redirects=False, timeout=30)
        assert missing.status_code == 404 and missing.headers["content-type"].startswith(
            "text/html"
        )
    finally:
        api.call("POST", "/api/v1/jobs/hostile-run-1/cancel", token="control")
        wait_state(api, "hostile-run-1", "cancelled", "succeeded", "failed")


# -- 9: offsets are bytes ----------------------------------------------------------------------

#: Lines of several-byte characters (2, 3 and 4 bytes in UTF-8): a 64 KiB step starts mid-character.
WIDE = 'for i in $(seq 1 7000); do echo "line-$i äöü €€ 😀😀 ✓"; done'


def test_older_lines_page_back_by_bytes_through_multi_byte_characters(
    api: Api,
    browsers: StartBrowser,  # noqa: F811 - the fixture
) -> None:
    submit(api, job("hostile-wide-1", WIDE))
    wait_state(api, "hostile-wide-1", "succeeded")
    # Its status says so a moment before its directory is moved into done/.
    done = api.spool / "done" / "hostile-wide-1" / "log"
    wait_for(done.exists, what="the job's move into done/")
    whole = done.read_bytes()
    assert len(whole) > 3 * 64 * 1024, len(whole)
    admin = browsers(api.url)
    admin.login(api.tokens["admin"])
    admin.open("/jobs/hostile-wide-1")
    for _ in range(20):
        buttons = admin.all("button#log-older")
        if not buttons:
            break
        before = len(admin.text("pre#log"))
        buttons[0].click()
        admin.wait(lambda _, n=before: len(admin.text("pre#log")) > n or  # type: ignore[misc]
                   not admin.all("button#log-older"), what="older lines")  # fmt: skip
    assert not admin.all("button#log-older"), "still older lines after 20 clicks"
    shown = admin.text("pre#log")
    numbers = [int(n) for n in re.findall(r"\bline-(\d+) äöü", shown)]
    assert numbers == list(range(1, 7001)), "a line lost or shown twice"
    assert shown == whole.decode("utf-8"), "the log shown is not the log"
