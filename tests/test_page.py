"""The web page (issue 20) in a real browser against a real daemon: logging in (the session
cookie HttpOnly and SameSite=Strict, every page behind it, the CSP header on each), the
overview's counts against the spool, a job's live log, cancel and retry from the page, an
artifact downloaded, a read-only token without actions whose forged POST is refused, schedules
paused and resumed, rejected files, given-up deliveries sent again, a phone's width and the
keyboard. Each page shown is saved as a screenshot (tests/browser.py); a console error fails."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.keys import Keys

from tests.apiclient import Api, start_api
from tests.browser import PHONE, Browser, StartBrowser, browsers  # noqa: F401 - the fixture
from tests.harness import drop, gate_wait, wait_for, wait_rejected
from tests.loopback import free_port, serve_in_thread, stop_serving

pytestmark = pytest.mark.daemon

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
#: The pages the nav leads to, by the nav link's name.
NAV = {"overview": "/", "jobs": "/jobs", "schedules": "/schedules", "rejected": "/rejected",
       "deliveries": "/deliveries"}  # fmt: skip
STATES = ("pending", "running", "succeeded", "failed", "cancelled", "rejected")
COOKIE = "spoold_session"
#: Fails its callbacks soon: a delivery to a closed port is given up after a second.
CALLBACKS = {"give_up_after": "1s", "backoff": {"initial": "100ms", "max": "200ms"}}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    tmp = tmp_path_factory.mktemp("page")
    tmp.chmod(0o755)
    started = start_api(tmp, callbacks=CALLBACKS)
    yield started
    started.daemon.kill()


@pytest.fixture
def browser(api: Api, browsers: StartBrowser) -> Browser:  # noqa: F811 - the fixture above
    """A desktop browser at the daemon's page, not logged in."""
    return browsers(api.url)


@pytest.fixture
def admin(browser: Browser, api: Api) -> Browser:
    """A desktop browser logged in with the admin token."""
    browser.login(api.tokens["admin"])
    return browser


# -- helpers ---------------------------------------------------------------------------------


def job(job_id: str, commands: str | list[str], **fields: object) -> str:
    document = {"job_id": job_id, "executor": "local", "product": {"commands": commands}}
    return yaml.safe_dump({**document, **fields})


def submit(api: Api, text: str) -> None:
    answer = api.submit(text)
    assert answer.status_code == 201, answer.text


def status(api: Api, job_id: str) -> dict[str, Any]:
    answer = api.call("GET", f"/api/v1/jobs/{job_id}", token="read")
    assert answer.status_code == 200, answer.text
    found: dict[str, Any] = answer.json()
    return found


def wait_state(api: Api, job_id: str, *states: str, bound: float = 60.0) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        answer = api.call("GET", f"/api/v1/jobs/{job_id}", token="read")
        return answer.json() if answer.ok and answer.json()["state"] in states else None

    return wait_for(reached, bound=bound, what=f"job {job_id} to be {' or '.join(states)}")


def held(gate: Path) -> str:
    """A job that runs until the test creates ``gate``: as long as page loads on a loaded
    machine take, where a sleep would guess; bounded, should a test fail to create it."""
    return gate_wait(gate, bound=600)


def end_running(api: Api, job_id: str) -> None:
    """Cancel a job left running by a test, so that the next tests' counts settle."""
    api.call("POST", f"/api/v1/jobs/{job_id}/cancel", token="control")
    wait_state(api, job_id, "cancelled", "succeeded", "failed")


class _Forms(HTMLParser):
    """The forms of a page: each one's attributes and its inputs' names and values."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []
        self._open = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if tag == "form":
            self.forms.append({**values, "inputs": {}})
            self._open = True
        elif tag in ("input", "button", "select", "textarea") and self._open and values.get("name"):
            self.forms[-1]["inputs"][values["name"]] = values.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._open = False


def forms(html: str) -> list[dict[str, Any]]:
    parser = _Forms()
    parser.feed(html)
    return parser.forms


def page_session(api: Api, token: str) -> requests.Session:
    """Logged in as the form does it, without a browser: GET /login, POST it with its hidden
    inputs (a CSRF token, if the form has one) and ``token``."""
    session = requests.Session()
    shown = session.get(api.url + "/login", timeout=30)
    assert shown.status_code == 200, shown.text
    login = next(f for f in forms(shown.text) if f.get("id") == "login")
    fields = {**login["inputs"], "token": token}
    answer = session.post(api.url + "/login", data=fields, allow_redirects=False, timeout=30)
    assert answer.status_code == 303, (answer.status_code, answer.text)
    assert COOKIE in session.cookies
    return session


def spool_counts(spool: Path) -> dict[str, int]:
    """Jobs by state as the spool holds them: each job directory's status.json, and the
    entries of rejected/."""
    counts = dict.fromkeys(STATES, 0)
    for directory in ("pending", "running", "done", "failed"):
        for entry in (spool / directory).iterdir():
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                state = json.loads((entry / "status.json").read_text())["state"]
            except (OSError, ValueError, KeyError):
                continue  # being moved: the next reading counts it
            if state in counts:
                counts[state] += 1
    counts["rejected"] = sum(
        1 for e in (spool / "rejected").iterdir() if not e.name.startswith(".")
    )
    return counts


def page_counts(browser: Browser) -> dict[str, int]:
    counts = {}
    for state in STATES:
        row = browser.find(f"table#counts tr[data-state={state}]")
        cells = browser.all("td, th", row)
        assert len(cells) >= 2, f"row {state} of table#counts has no second cell"
        number = (cells[1].get_attribute("textContent") or "").strip()
        assert number.isdigit(), f"table#counts row {state}: {number!r} is not a number"
        counts[state] = int(number)
    return counts


#: Graphic elements that can be a chart's marks: bars, dots, areas, lines of data.
MARKS = "rect, circle, ellipse, path, polygon, polyline"


def marks(browser: Browser, svg: str) -> int:
    """How many of ``MARKS`` in ``svg`` are drawn with an area and stand for data: not a
    zero-size placeholder, not the chart's background, not in its legend, axes or grid."""
    found: int = browser.script(
        """
        const svg = document.querySelector(arguments[0]);
        if (!svg) return -1;
        const whole = svg.getBoundingClientRect();
        return [...svg.querySelectorAll(arguments[1])].filter(mark => {
            const box = mark.getBoundingClientRect();
            const all = box.width >= whole.width - 1 && box.height >= whole.height - 1;
            const furniture = mark.closest('[class*=legend], [class*=axis], [class*=grid]');
            return box.width > 0 && box.height > 0 && !all && !furniture;
        }).length;
        """,
        svg,
        MARKS,
    )
    assert found >= 0, f"no {svg} on {browser.path}"
    return found


def log_lines(text: str) -> list[int]:
    """The numbers of the ``line-N`` lines of a log, in order."""
    return [int(n) for n in re.findall(r"\bline-(\d+)\s*$", text, re.MULTILINE)]


def action_form(browser: Browser, css: str) -> dict[str, str]:
    """The action URL and method of a form the page shows."""
    form = browser.find(css)
    return {
        "action": str(form.get_attribute("action")),
        "method": str(form.get_attribute("method")),
    }


def displayed(browser: Browser, css: str) -> Callable[[object], bool]:
    return lambda _: bool(browser.find(css).is_displayed())


class _Taker(BaseHTTPRequestHandler):
    """Takes every POST (204), one connection at a time on the server's thread, and closes
    it: no thread is left waiting on a connection the daemon keeps alive."""

    protocol_version = "HTTP/1.0"

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        taken: list[dict[str, Any]] = self.server.taken  # type: ignore[attr-defined]
        taken.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def button_of(browser: Browser, form_css: str) -> str:
    return f"{form_css} button, {form_css} input[type=submit]"


# -- access ----------------------------------------------------------------------------------


def test_login_sets_a_strict_http_only_cookie_and_every_page_needs_it(
    api: Api, browser: Browser
) -> None:
    submit(api, job("page-login-1", "echo hi"))
    wait_state(api, "page-login-1", "succeeded")
    pages = [*NAV.values(), "/jobs/page-login-1"]
    for path in pages:
        answer = requests.get(api.url + path, allow_redirects=False, timeout=30)
        assert answer.status_code == 303, (path, answer.status_code)
        assert answer.headers["Location"].endswith("/login"), (path, answer.headers)
    # In the browser: sent to the form, and from it to the overview.
    browser.open("/jobs")
    assert browser.path == "/login"
    assert browser.find("main#page-login, form#login")
    browser.find("form#login input#token[name=token]").send_keys(api.tokens["admin"])
    browser.submit("button#login-submit")
    assert browser.path == "/"
    browser.find("main#page-overview")
    cookie = browser.driver.get_cookie(COOKIE)
    assert cookie is not None
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict", cookie
    assert cookie["path"] == "/", cookie
    assert COOKIE not in browser.script("return document.cookie")  # no script reads it
    # As the server says it: one Set-Cookie with the attributes, 303 to /.
    login = requests.Session()
    shown = login.get(api.url + "/login", timeout=30)
    assert shown.headers["Content-Security-Policy"] == CSP, "/login"
    fields = {**next(f for f in forms(shown.text) if f.get("id") == "login")["inputs"],
              "token": api.tokens["admin"]}  # fmt: skip
    answer = login.post(api.url + "/login", data=fields, allow_redirects=False, timeout=30)
    assert answer.status_code == 303 and answer.headers["Location"] in ("/", api.url + "/")
    header = answer.headers["Set-Cookie"]
    attributes = {part.strip().split("=")[0].lower() for part in header.split(";")}
    assert {"httponly", "samesite", "path"} <= attributes, header
    assert re.search(r"(?i)samesite=strict", header) and re.search(r"(?i)path=/(;|$)", header)
    # Every page, with the session: 200 and the CSP header.
    for path in pages:
        answer = login.get(api.url + path, allow_redirects=False, timeout=30)
        assert answer.status_code == 200, (path, answer.status_code)
        assert answer.headers.get("Content-Security-Policy") == CSP, path
        assert answer.headers["content-type"].startswith("text/html"), path
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", answer.text), f"inline script: {path}"
    # The cookie lets the page's script read the API; an API POST still needs a token.
    assert login.get(api.url + "/api/v1/jobs/page-login-1", timeout=30).status_code == 200
    posted = login.post(api.url + "/api/v1/jobs/page-login-1/retry", timeout=30)
    assert posted.status_code in (401, 403), posted.status_code


def test_logout_ends_the_session_also_for_a_copy_of_its_cookie(api: Api, admin: Browser) -> None:
    kept = admin.session()  # the cookie as it was: copied, say, from a shared machine
    assert kept.get(api.url + "/jobs", allow_redirects=False, timeout=30).status_code == 200
    admin.submit(button_of(admin, "form#logout"))
    assert admin.path == "/login"
    assert admin.driver.get_cookie(COOKIE) is None
    admin.open("/jobs")
    assert admin.path == "/login"
    again = kept.get(api.url + "/jobs", allow_redirects=False, timeout=30)
    assert again.status_code == 303, f"the session outlives its logout: {again.status_code}"
    assert again.headers["Location"].endswith("/login")


def test_a_wrong_token_shows_the_error(api: Api, browser: Browser) -> None:
    browser.open("/login")
    # A refused login may answer 4xx, which chromium logs as a failed load of /login.
    with browser.tolerating("/login - Failed to load resource"):
        browser.find("input#token").send_keys("spoold_000000000000_nope")
        browser.submit("button#login-submit")
    assert browser.path == "/login"
    error = browser.find(".error")
    assert error.is_displayed() and error.text.strip(), "the error is not shown"
    assert browser.driver.get_cookie(COOKIE) is None
    browser.find("form#login input#token")  # the form again, to try once more


def test_tab_reaches_the_login_button_and_enter_submits(api: Api, browser: Browser) -> None:
    browser.open("/login")
    keys = ActionChains(browser.driver)

    def focus_on(element_id: str) -> None:
        for _ in range(12):
            if browser.script("return document.activeElement.id") == element_id:
                return
            keys.send_keys(Keys.TAB).perform()
        raise AssertionError(f"Tab did not reach #{element_id}")

    focus_on("token")
    keys.send_keys(api.tokens["admin"]).perform()
    focus_on("login-submit")
    keys.send_keys(Keys.ENTER).perform()
    browser.wait(lambda _: browser.path == "/", what="Enter to log in")
    browser.settled("after-enter")
    browser.find("main#page-overview")


# -- overview --------------------------------------------------------------------------------


def test_the_overview_counts_what_the_spool_holds(api: Api, admin: Browser, tmp_path: Path) -> None:
    submit(api, job("page-ok-1", "echo fine"))
    submit(api, job("page-bad-1", "echo broken >&2; exit 3"))
    submit(api, job("page-long-1", held(tmp_path / "go")))
    wait_state(api, "page-ok-1", "succeeded")
    wait_state(api, "page-bad-1", "failed")
    wait_state(api, "page-long-1", "running")
    try:
        admin.open("/")
        seen: list[tuple[dict[str, int], dict[str, int]]] = []

        def agree() -> bool:
            # The spool read before and after the page: equal, the page read a still spool.
            before = spool_counts(api.spool)
            shown = page_counts(admin)
            seen.append((shown, before))
            return shown == before == spool_counts(api.spool)

        try:
            admin.wait_reloading(agree, what="the counts to match the spool")
        except AssertionError as timed_out:
            raise AssertionError(f"{timed_out}; last (page, spool): {seen[-3:]}") from None
        shown = page_counts(admin)
        assert shown["succeeded"] >= 1 and shown["failed"] >= 1 and shown["running"] >= 1
        running = admin.find("table#running tr[data-job-id='page-long-1']")
        assert admin.all("form.action.cancel", running), "no cancel form for a running job"
        failure = admin.find("table#failures tr[data-job-id='page-bad-1']")
        error = str(status(api, "page-bad-1")["error"])
        assert error[:30] in (failure.get_attribute("textContent") or ""), (error, failure.text)
        for element in ("#incoming-oldest", "#outbox", "table#hosts"):
            admin.find(element)
        assert admin.all("table#hosts tr:has(td)"), "table#hosts lists no host"
        assert marks(admin, "svg#chart-hourly") >= 2, "no succeeded and failed marks per hour"
        assert marks(admin, "svg#chart-runtime") >= 1, "no run time marks"
    finally:
        (tmp_path / "go").touch()
        end_running(api, "page-long-1")


# -- a job -----------------------------------------------------------------------------------


@contextlib.contextmanager
def slow(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """A job printing line-1 to line-30, 0.1 s apart, that holds after line-10 until the test
    creates the first gate and after line-20 until the second: the test sees lines arrive
    while the job surely runs, however long the browser takes. Both gates open at the end."""
    first, second = tmp_path / "go-1", tmp_path / "go-2"
    lines = "for i in $(seq {} {}); do echo line-$i; sleep 0.1; done"
    script = "; ".join([lines.format(1, 10), gate_wait(first), lines.format(11, 20),
                        gate_wait(second), lines.format(21, 30)])  # fmt: skip
    try:
        yield script, first, second
    finally:
        first.touch()
        second.touch()


def test_the_log_arrives_live_while_the_job_runs(api: Api, admin: Browser, tmp_path: Path) -> None:
    with slow(tmp_path) as (script, first, second):
        submit(api, job("page-live-1", script))
        wait_state(api, "page-live-1", "running")
        admin.open("/jobs/page-live-1")
        at_load = log_lines(admin.text("pre#log"))
        assert not set(at_load) - set(range(1, 11)), at_load  # held at the first gate
        first.touch()

        def more_lines(_: object) -> list[int] | None:
            now = log_lines(admin.text("pre#log"))
            return now if len(now) > len(at_load) and now[-1] >= 20 else None

        live = admin.wait(more_lines, what=f"lines after {at_load} without a reload")
        assert status(api, "page-live-1")["state"] == "running", "seen only after the job ended"
        assert 30 not in live
        admin.shot("live-log")
        second.touch()
        admin.wait(lambda _: 30 in log_lines(admin.text("pre#log")), what="the last line, live")
        assert log_lines(admin.text("pre#log")) == list(range(1, 31))
        wait_state(api, "page-live-1", "succeeded")
        admin.wait_reloading(lambda: admin.text("#state").strip() == "succeeded",
                             what="#state to say succeeded")  # fmt: skip
        assert log_lines(admin.text("pre#log")) == list(range(1, 31))


def test_a_reload_mid_run_shows_every_line_once(api: Api, admin: Browser, tmp_path: Path) -> None:
    with slow(tmp_path) as (script, first, second):
        submit(api, job("page-live-2", script))
        wait_state(api, "page-live-2", "running")
        admin.open("/jobs/page-live-2")
        admin.wait(lambda _: len(log_lines(admin.text("pre#log"))) >= 8, what="a few lines")
        first.touch()
        admin.wait(lambda _: len(log_lines(admin.text("pre#log"))) >= 15, what="more lines")
        assert status(api, "page-live-2")["state"] == "running"
        admin.reload()
        second.touch()  # the rest arrives after the reload
        admin.wait(lambda _: 30 in log_lines(admin.text("pre#log")), what="the last line")
        assert log_lines(admin.text("pre#log")) == list(range(1, 31)), "a line lost or repeated"
        wait_state(api, "page-live-2", "succeeded")
        whole = api.call("GET", "/api/v1/jobs/page-live-2/log").text.strip()
        # The lines written as the job ended (its outcome) arrive too, and nothing else.
        admin.wait(lambda _: admin.text("pre#log").strip() == whole,
                   what="pre#log to hold the whole log, each line once")  # fmt: skip


def test_cancel_a_running_job_from_its_page(api: Api, admin: Browser) -> None:
    submit(api, job("page-cancel-1", "echo started; sleep 60"))
    wait_state(api, "page-cancel-1", "running")
    admin.open("/jobs/page-cancel-1")
    assert admin.text("#state").strip() == "running"
    equivalent = admin.text("form.action#cancel ~ .equivalent")
    assert "spoold cancel page-cancel-1" in equivalent, equivalent
    assert re.search(r"curl .*-X ?POST.*/api/v1/jobs/page-cancel-1/cancel", equivalent) or (
        "curl" in equivalent and "/api/v1/jobs/page-cancel-1/cancel" in equivalent
    ), equivalent
    assert not admin.all("form.action#retry"), "retry offered for a running job"
    admin.submit(button_of(admin, "form.action#cancel"))
    assert admin.path.split("?")[0] == "/jobs/page-cancel-1"
    assert admin.find(".flash").text.strip(), "no .flash after the cancel"
    ended = wait_state(api, "page-cancel-1", "cancelled")
    assert "admin" in str(ended["error"]), ended["error"]  # who asked, as the API words it
    # The page may say so live (its log's end); loaded again, it offers a retry instead.
    admin.wait_reloading(lambda: admin.text("#state").strip() == "cancelled",
                         what="#state to say cancelled")  # fmt: skip
    admin.reload()
    assert admin.text("#state").strip() == "cancelled"
    assert not admin.all("form.action#cancel")
    admin.find("form.action#retry")


def test_retry_a_failed_job_from_its_page(api: Api, admin: Browser) -> None:
    submit(api, job("page-retry-1", "echo failing; exit 4"))
    wait_state(api, "page-retry-1", "failed")
    admin.open("/jobs/page-retry-1")
    assert admin.text("#state").strip() == "failed"
    assert len(admin.all("table#attempts tr:has(td)")) == 1
    equivalent = admin.text("form.action#retry ~ .equivalent")
    assert "spoold retry page-retry-1" in equivalent, equivalent
    assert "curl" in equivalent and "/api/v1/jobs/page-retry-1/retry" in equivalent, equivalent
    admin.submit(button_of(admin, "form.action#retry"))
    assert admin.path.split("?")[0] == "/jobs/page-retry-1"
    assert admin.find(".flash").text.strip(), "no .flash after the retry"
    wait_for(lambda: len(status(api, "page-retry-1")["attempts"]) == 2 and
             status(api, "page-retry-1")["state"] == "failed", what="the second attempt")  # fmt: skip
    admin.wait_reloading(lambda: len(admin.all("table#attempts tr:has(td)")) == 2,
                         what="table#attempts to show two attempts")  # fmt: skip


def test_an_artifact_downloads_through_its_link(api: Api, admin: Browser) -> None:
    content = "artifact of page-art-1\n\u00e9t\u00e9 \u2713\n"
    script = "mkdir -p out && printf '%s' \"$CONTENT\" > out/report.txt"
    submit(api, job("page-art-1", script, variables={"CONTENT": content},
                    artifacts=[{"path": "out/*.txt"}]))  # fmt: skip
    wait_state(api, "page-art-1", "succeeded")
    admin.open("/jobs/page-art-1")
    link = admin.find("ul#artifacts a.artifact")
    href = str(link.get_attribute("href"))
    assert href == f"{api.url}/api/v1/jobs/page-art-1/artifacts/out/report.txt", href
    got = admin.session().get(href, timeout=30)
    assert got.status_code == 200, got.status_code
    assert got.content == content.encode()
    assert got.content == (api.spool / "done/page-art-1/artifacts/out/report.txt").read_bytes()
    assert requests.get(href, timeout=30).status_code == 401  # the cookie, not the link, lets in


# -- who may ---------------------------------------------------------------------------------


def test_a_read_only_token_sees_no_action_and_its_forged_post_is_refused(
    api: Api,
    browsers: StartBrowser,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    submit(api, job("page-ro-run", held(tmp_path / "go")))
    submit(api, job("page-ro-bad", "exit 2"))
    submit(api, job("page-ro-hourly", "true", schedule={"every": "1h"}))
    hook = {"url": f"http://127.0.0.1:{free_port()}/hook", "secret": "s3cret-ro",
            "events": ["succeeded"]}  # fmt: skip
    submit(api, job("page-ro-hook", "true", callback=hook))
    given_up = api.spool / "outbox" / "failed" / "page-ro-hook~00000001.json"
    wait_state(api, "page-ro-run", "running")
    wait_state(api, "page-ro-bad", "failed")
    wait_for(given_up.exists, what="the delivery to be given up")
    try:
        # Where the admin has actions, read has none (and no form that posts but its logout).
        admin = browsers(api.url)
        admin.login(api.tokens["admin"])
        reader = browsers(api.url)
        reader.login(api.tokens["read"])
        actionable = ["/", "/schedules", "/deliveries", "/jobs/page-ro-run", "/jobs/page-ro-bad"]
        for path in [*NAV.values(), "/jobs/page-ro-run", "/jobs/page-ro-bad"]:
            admin.open(path)
            if path in actionable:
                assert admin.all("form.action"), f"{path} offers admin no action"
            reader.open(path)
            assert not reader.all("form.action"), f"{path} offers read an action"
            posts = reader.all("form[method=post i]:not(#logout)")
            assert not posts, f"{path} gives read a form that posts"
        # The admin's forms, forged: by the read session without a csrf value, with a wrong
        # one and with its own (its logout form's, valid for its session); by an admin session
        # without one, with a wrong one and with the read session's.
        admin.open("/jobs/page-ro-run")
        cancel = action_form(admin, "form.action#cancel")
        admin.open("/schedules")
        pause = action_form(
            admin, "table#schedules tr[data-job-id='page-ro-hourly'] form.action.pause"
        )
        admin.open("/deliveries")
        resend = action_form(
            admin, "table#given-up tr[data-name='page-ro-hook~00000001.json'] form.action.resend"
        )
        theirs = page_session(api, api.tokens["read"])
        shown = theirs.get(api.url + "/", timeout=30).text
        logout = next(f for f in forms(shown) if f.get("id") == "logout")
        own_csrf = logout["inputs"].get("csrf")
        assert own_csrf, "form#logout has no csrf input"
        admins = page_session(api, api.tokens["admin"])
        forged = [(theirs, {}), (theirs, {"csrf": "forged"}), (theirs, {"csrf": own_csrf}),
                  (admins, {}), (admins, {"csrf": "forged"}), (admins, {"csrf": own_csrf})]  # fmt: skip
        for form in (cancel, pause, resend):
            assert form["method"].lower() == "post", form
            for session, fields in forged:
                answer = session.post(form["action"], data=fields, allow_redirects=False,
                                      timeout=30)  # fmt: skip
                assert answer.status_code == 403, (form, fields, answer.status_code)
        # Nothing changed: the job runs, the schedule is not paused, the delivery stays given up.
        assert status(api, "page-ro-run")["state"] == "running"
        schedule = next(r for r in api.call("GET", "/api/v1/schedules").json()
                        if r["job_id"] == "page-ro-hourly")  # fmt: skip
        assert schedule["paused"] is False
        assert given_up.exists()
        # The job was not asked to stop: the cancel that ends it is the control token's.
        ended_by = api.call("POST", "/api/v1/jobs/page-ro-run/cancel", token="control")
        assert ended_by.status_code == 202
        ended = wait_state(api, "page-ro-run", "cancelled")
        assert "token control" in str(ended["error"]) and "read" not in str(ended["error"])
    finally:
        (tmp_path / "go").touch()
        end_running(api, "page-ro-run")


# -- schedules, rejected, deliveries ---------------------------------------------------------


def test_schedules_show_their_firings_and_pause_and_resume(api: Api, admin: Browser) -> None:
    submit(api, job("page-every-3h", "true", schedule={"every": "3h"}))
    admin.open("/schedules")
    firings = "svg#timeline circle.firing[data-schedule='page-every-3h']"
    assert 7 <= len(admin.all(firings)) <= 8, "every 3 h: 8 firings in the next 24 h"
    row = "table#schedules tr[data-job-id='page-every-3h']"
    assert not admin.all(f"{row} form.action.resume")
    admin.find(f"{row} form.action.run-now")
    admin.submit(button_of(admin, f"{row} form.action.pause"))
    assert admin.find(".flash").text.strip(), "no .flash after the pause"
    paused = next(r for r in api.call("GET", "/api/v1/schedules").json()
                  if r["job_id"] == "page-every-3h")  # fmt: skip
    assert paused["paused"] is True and "admin" in str(paused["paused_by"]), paused
    if admin.path != "/schedules":
        admin.open("/schedules")
    assert not admin.all(firings), "a paused schedule still shows firings"
    assert not admin.all(f"{row} form.action.pause")
    admin.submit(button_of(admin, f"{row} form.action.resume"))
    resumed = next(r for r in api.call("GET", "/api/v1/schedules").json()
                   if r["job_id"] == "page-every-3h")  # fmt: skip
    assert resumed["paused"] is False, resumed
    if admin.path != "/schedules":
        admin.open("/schedules")
    assert 7 <= len(admin.all(firings)) <= 8
    admin.find(f"{row} form.action.pause")


def test_the_rejected_page_names_line_and_column(api: Api, admin: Browser) -> None:
    name = "page-malformed.yaml"
    drop(api.spool, name, "job_id: page-malformed\nexecutor: local\nproduct:\n  comands: 'true'\n")
    reason = wait_rejected(api.spool, name)
    first = reason["errors"][0]
    admin.open("/rejected")
    row = admin.find(f"table#rejected tr[data-name='{name}']")
    text = row.get_attribute("textContent") or ""
    assert first["path"] in text, (first, text)
    assert re.search(rf"\b{first['line']}\b", text) and re.search(rf"\b{first['column']}\b", text)
    assert "comands" in text, text  # the reason


def test_a_given_up_delivery_is_listed_and_sent_again(api: Api, admin: Browser) -> None:
    port = free_port()  # nothing listens there: every try fails, and it is given up
    url = f"http://127.0.0.1:{port}/hook"
    hook = {"url": url, "secret": "s3cret-page", "events": ["succeeded"]}
    submit(api, job("page-hook-1", "true", callback=hook))
    wait_state(api, "page-hook-1", "succeeded")
    name = "page-hook-1~00000001.json"
    given_up = api.spool / "outbox" / "failed" / name
    wait_for(given_up.exists, what="the delivery to be given up")
    record = json.loads(given_up.read_text())
    admin.open("/deliveries")
    row = admin.find(f"table#given-up tr[data-name='{name}']")
    cells = [(cell.get_attribute("textContent") or "").strip() for cell in admin.all("td", row)]
    # Where it goes as spoold's log says it: scheme, host and port, never the path or query.
    assert "succeeded" in cells and f"http://127.0.0.1:{port}" in cells, cells
    assert not any("/hook" in cell for cell in cells), cells
    assert str(record["tries"]) in cells, (record["tries"], cells)
    assert any(str(record["last_error"])[:40] in cell for cell in cells), (record, cells)
    receiver = HTTPServer(("127.0.0.1", port), _Taker)  # now someone takes it
    taken: list[dict[str, Any]] = []
    receiver.taken = taken  # type: ignore[attr-defined]
    thread = serve_in_thread(receiver)
    try:
        admin.submit(button_of(admin, f"table#given-up tr[data-name='{name}'] form.action.resend"))
        assert admin.find(".flash").text.strip(), "no .flash after the resend"
        wait_for(lambda: taken, what="the resent delivery to arrive")
        assert (taken[0]["job_id"], taken[0]["event"]) == ("page-hook-1", "succeeded")
        wait_for(lambda: not given_up.exists() and not (api.spool / "outbox" / name).exists(),
                 what="the resent delivery to be taken")  # fmt: skip
        admin.open("/deliveries")
        assert not admin.all(f"table#given-up tr[data-name='{name}']")
    finally:
        stop_serving(receiver, thread)


# -- a phone, and every page's picture --------------------------------------------------------


def test_a_phone_has_no_sideways_scroll_and_a_usable_nav(
    api: Api,
    browsers: StartBrowser,  # noqa: F811 - the fixture
) -> None:
    submit(api, job("page-phone-with-a-rather-long-job-id-0123456789", "true",
                    labels={"team": "ops", "customer": "4711"}))  # fmt: skip
    wait_state(api, "page-phone-with-a-rather-long-job-id-0123456789", "succeeded")
    phone = browsers(api.url, phone=True)
    phone.login(api.tokens["admin"])
    phone.open("/jobs")
    width, scrolled = phone.script("return [innerWidth, document.scrollingElement.scrollWidth]")
    assert width == PHONE[0], f"the page is laid out {width} px wide: no <meta name=viewport>?"
    assert scrolled <= width, f"/jobs scrolls sideways: {scrolled} px in {width}"
    for name, path in NAV.items():
        link = f"nav#nav a#nav-{name}"
        if not phone.find(link).is_displayed():
            toggles = phone.all("nav#nav button, nav#nav summary, header button")
            assert toggles, f"{link} is hidden and nothing shows it"
            toggles[0].click()
            phone.wait(displayed(phone, link), what=f"{link} to be shown")
        box = phone.find(link).rect
        assert box["x"] >= 0 and box["x"] + box["width"] <= width, (link, box)
        assert box["height"] >= 24 and box["width"] >= 24, f"{link} is too small to tap: {box}"
        phone.submit(link)
        assert phone.path.split("?")[0] == path, (link, phone.path)
        phone.find(f"main#page-{name}")


def test_every_page_is_shown_and_saved(api: Api, browsers: StartBrowser) -> None:  # noqa: F811
    submit(api, job("page-shots-1", ["echo one", "echo two"]))
    wait_state(api, "page-shots-1", "succeeded")
    paths = ["/login", *NAV.values(), "/jobs/page-shots-1", "/jobs?state=succeeded"]
    for phone in (False, True):
        shown = browsers(api.url, phone=phone)
        shown.login(api.tokens["admin"])
        for path in paths[1:]:
            shown.open(path)
            if path.startswith("/jobs?"):
                rows = shown.all("table#jobs tr[data-job-id]")
                assert rows, "no job listed"
                for row in rows:
                    assert shown.all("a.job-link", row) and shown.all("td.state", row)
                    assert shown.find("td.state", row).text.strip() == "succeeded"
                shown.find("form#filters")
        assert len(shown.shots) >= len(paths)
        for shot in shown.shots:
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", shot
