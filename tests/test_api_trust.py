"""The HTTP API's server against clients that do not play along, over loopback on a real
daemon: request bodies that never come (or trickle), clients that leave mid-body, a flood of
connections, log streams whose token is revoked (or whose page session ends) while they run,
control characters in what a client sends, forged X-Forwarded-* headers, and absolute URLs
(Location, Link) that must be the configured public_url's.

Bounds, not stopwatches: each wait is bounded several times above ``client_timeout`` (1 s
here), so that a server which never cuts a client off fails the test, not a slow machine."""

from __future__ import annotations

import os
import re
import selectors
import socket
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
import requests
import yaml

from tests.apiclient import Api, make_token, module_api, sse_events, start_api
from tests.harness import run_cli, wait_for

pytestmark = pytest.mark.daemon

#: Where clients reach this API, as a proxy in front would have it (a path prefix, plain HTTP:
#: the page's cookies stay sendable over the test's plain HTTP).
PUBLIC = "http://jobs.example.net:8080/spoold"
#: Several times the fixture's client_timeout: a connection open this long was never cut off.
BOUND = 10.0
COOKIE = "spoold_session"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    yield from module_api(tmp_path_factory, "trust",
                          api={"client_timeout": "1s", "public_url": PUBLIC})  # fmt: skip


def address(api: Api) -> tuple[str, int]:
    host, port = api.url.removeprefix("http://").split(":")
    return host, int(port)


def until_closed(sock: socket.socket, *, trickle: bool = False) -> bytes:
    """What the server sends on ``sock`` until it closes it (a byte of body sent every 0.2 s
    meanwhile if ``trickle``); AssertionError if it is still open after BOUND seconds."""
    received = b""
    end = time.monotonic() + BOUND
    sock.settimeout(0.2)
    while time.monotonic() < end:
        if trickle:
            try:
                sock.sendall(b"a")
            except OSError:  # closed by the server: what it sent before is still to be read
                trickle = False
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"still open after {BOUND} s; received {received[:200]!r}")


def post_head(path: str, length: int = 100, token: str | None = None) -> bytes:
    """A POST's head announcing a ``length``-byte form body."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth}"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()  # fmt: skip


def log_lines(api: Api, needle: str) -> list[str]:
    return [line for line in api.daemon.log().splitlines() if needle in line]


def page_session(api: Api, token: str) -> requests.Session:
    """Logged in as the login form does it: its hidden inputs (a CSRF token, if it has one)
    sent back with ``token``."""
    session = requests.Session()
    shown = session.get(api.url + "/login", timeout=30)
    fields = dict(re.findall(r'<input[^>]*name="([^"]+)"[^>]*value="([^"]*)"', shown.text))
    answer = session.post(api.url + "/login", data={**fields, "token": token},
                          allow_redirects=False, timeout=30)  # fmt: skip
    assert answer.status_code == 303, answer.text
    return session


# -- 1. request bodies: a deadline for every route, one short line for a client gone ----------


#: Each is a line of the log, and the refusals have 20 a minute: a few trickle, not all.
SLOW_BODIES = [("/login", False), ("/logout", False), ("/jobs/some-job/cancel", False),
               ("/schedules/some/run", False), ("/api/v1/jobs", False), ("/login", True),
               ("/jobs/some-job/cancel", True)]  # fmt: skip


@pytest.mark.parametrize(("path", "trickle"), SLOW_BODIES)
def test_a_body_that_does_not_come_within_client_timeout_gets_408_and_is_closed(
    api: Api, path: str, trickle: bool
) -> None:
    token = api.tokens["admin"] if path.startswith("/api/") else None
    # One daemon serves the module: this case's line comes after those of the cases before.
    logged = partial(log_lines, api, "its body did not come within client_timeout (408)")
    before = len(logged())
    with socket.create_connection(address(api), timeout=BOUND) as sock:
        sock.sendall(post_head(path, 1000, token))
        received = until_closed(sock, trickle=trickle)
    assert received.startswith(b"HTTP/1.1 408 "), received[:200]
    assert b"connection: close" in received.lower()
    assert api.call("GET", "/healthz", token=None).status_code == 200
    said = wait_for(lambda: logged()[before:], bound=BOUND, what="the 408 logged")
    assert len(said) == 1 and f" WARNING spoold: API: refused POST {path} " in said[0], said
    assert "Traceback" not in api.daemon.log()


def test_a_route_that_reads_no_body_answers_and_the_connection_still_ends(api: Api) -> None:
    with socket.create_connection(address(api), timeout=BOUND) as sock:
        sock.sendall(post_head("/api/v1/jobs/some-job/cancel"))  # no token: 401, body unread
        received = until_closed(sock, trickle=True)
    assert received.startswith(b"HTTP/1.1 401 "), received[:200]


def test_a_client_leaving_mid_body_is_one_short_line_not_a_traceback(api: Api) -> None:
    for path, token in (("/login", None), ("/api/v1/jobs", api.tokens["submit"])):
        with socket.create_connection(address(api), timeout=BOUND) as sock:
            sock.sendall(post_head(path, 100, token) + b"token=abc")
            # Received by the app before the client goes: it is waiting for the rest.
            time.sleep(0.2)
        said = f"API: POST {path} from 127.0.0.1: the client left before its whole body came"
        wait_for(partial(log_lines, api, said), bound=BOUND, what=said)
        assert len(log_lines(api, said)) == 1
    log = api.daemon.log()
    assert "Traceback" not in log and "ClientDisconnect" not in log


def test_a_flood_of_connections_leaves_the_daemon_its_descriptors(tmp_path: Path) -> None:
    from spoold.face.api.server import BACKLOG, connection_cap  # noqa: PLC0415 - the daemon's

    # A client_timeout long enough that no connection is cut off for silence meanwhile, however
    # long this machine takes to make them all: only the cap may close any.
    started = start_api(tmp_path, api={"client_timeout": "60s"})
    socks: list[socket.socket] = []
    try:
        assert started.daemon.pid is not None
        descriptors = f"/proc/{started.daemon.pid}/fd"
        before = len(os.listdir(descriptors))
        # More than the cap, and than the few batches asyncio accepts before it closes any.
        cap, extra = connection_cap(), 4 * BACKLOG + 100
        for _ in range(cap + extra):
            socks.append(socket.create_connection(address(started), timeout=BOUND))
        most = before
        with selectors.DefaultSelector() as selector:  # epoll: more sockets than select takes
            for sock in socks:
                selector.register(sock, selectors.EVENT_READ)
            refused, end = 0, time.monotonic() + BOUND
            while refused < extra and time.monotonic() < end:
                most = max(most, len(os.listdir(descriptors)))
                for key, _ in selector.select(0.1):
                    selector.unregister(key.fileobj)
                    said = until_closed(key.fileobj)  # type: ignore[arg-type]
                    assert said.startswith(b"HTTP/1.1 503 "), said
                    refused += 1
        # The cap, and for a moment the batches being accepted (each answered 503 and closed at
        # once: a connection takes a few turns of the loop from its accept to its close).
        assert most <= before + cap + 4 * BACKLOG, (before, most, cap)
        assert refused == extra
        assert started.daemon.log().count("connections open, as many as it takes") >= 1
    finally:
        for sock in socks:
            sock.close()
        try:
            assert started.call("GET", "/healthz", token=None).status_code == 200
        finally:
            started.daemon.kill()


# -- 2. a followed log ends when its token or page session does ------------------------------


def ticking(api: Api, job_id: str) -> None:
    """A job printing a line every 0.2 s for 30 s, running."""
    text = yaml.safe_dump({"job_id": job_id, "executor": "local",
                           "product": {"commands": "for i in $(seq 1 150); do echo tick $i; "
                                                   "sleep 0.2; done"}})  # fmt: skip
    assert api.submit(text).status_code == 201
    wait_for(lambda: api.call("GET", f"/api/v1/jobs/{job_id}").json()["state"] == "running",
             what=f"{job_id} running")  # fmt: skip


def followed_until_it_ends(answer: requests.Response, cut_off: Callable[[], None]) -> list[str]:
    """The lines of a followed log (SSE events' data, or chunked text); ``cut_off()`` is
    called once the first line came. The stream must end without an ``end`` event."""
    seen: list[str] = []
    if answer.headers["content-type"].startswith("text/event-stream"):
        for event in sse_events(answer):
            assert event.get("event") != "end", event  # the job is still running
            if not seen:
                cut_off()
            seen += event["data"].split("\n")
    else:
        for line in answer.iter_lines():
            if not seen:
                cut_off()
            seen.append(line.decode())
    return seen


@pytest.mark.parametrize("accept", ["text/event-stream", "text/plain"])
def test_a_log_followed_with_a_token_ends_when_the_token_is_revoked(api: Api, accept: str) -> None:
    job_id = f"revoked-{accept.split('/')[1]}"
    ticking(api, job_id)
    name = f"doomed-{accept.split('/')[1]}"
    token = make_token(api.spool, name, "read")

    def revoke() -> None:
        assert run_cli(api.spool, "token", "revoke", name).returncode == 0

    # requests' timeout bounds each wait for a byte: a stream that goes on keeps sending ticks,
    # so it is the job's end (30 s) that would end it, not this.
    with requests.get(f"{api.url}/api/v1/jobs/{job_id}/log", params={"follow": 1},
                      headers={"Authorization": f"Bearer {token}", "Accept": accept},
                      stream=True, timeout=BOUND) as answer:  # fmt: skip
        assert answer.status_code == 200
        seen = followed_until_it_ends(answer, revoke)
    assert api.call("GET", f"/api/v1/jobs/{job_id}").json()["state"] == "running"
    assert "tick 150" not in seen
    assert api.call("GET", f"/api/v1/jobs/{job_id}", token=token).status_code == 401
    api.call("POST", f"/api/v1/jobs/{job_id}/cancel")


def test_a_log_followed_by_the_page_ends_when_its_session_does(api: Api) -> None:
    ticking(api, "session-ended")
    session = page_session(api, api.tokens["read"])
    csrf = re.search(
        r'name="csrf"[^>]*value="([^"]+)"', session.get(api.url + "/", timeout=30).text
    )
    assert csrf, "the page's forms carry a CSRF token"

    def log_out() -> None:
        # Another tab of the same browser logs out; the stream's cookie is the same session's.
        out = requests.post(api.url + "/logout", data={"csrf": csrf.group(1)},
                            cookies={COOKIE: session.cookies[COOKIE]}, allow_redirects=False,
                            timeout=30)  # fmt: skip
        assert out.status_code == 303, out.text

    with session.get(f"{api.url}/api/v1/jobs/session-ended/log", params={"follow": 1},
                     headers={"Accept": "text/event-stream"}, stream=True,
                     timeout=BOUND) as answer:  # fmt: skip
        assert answer.status_code == 200
        seen = followed_until_it_ends(answer, log_out)
    assert "tick 150" not in seen
    assert api.call("GET", "/api/v1/jobs/session-ended").json()["state"] == "running"
    api.call("POST", "/api/v1/jobs/session-ended/cancel")


# -- 3. what a client sends is escaped in the log -------------------------------------------


def test_control_characters_a_client_sends_are_escaped_in_the_log(api: Api) -> None:
    path = "/api/v1/jobs/x/artifacts/b%1b%5b31mRED%0aFAKE%20LINE%c2%9bX"
    with socket.create_connection(address(api), timeout=BOUND) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert until_closed(sock).startswith(b"HTTP/1.1 401 ")
    said = wait_for(lambda: log_lines(api, "31mRED"), bound=BOUND, what="the refusal logged")
    assert len(said) == 1 and said[0].endswith(
        "API: refused GET /api/v1/jobs/x/artifacts/b\\x1b[31mRED\\nFAKE LINE\\x9bX from "
        "127.0.0.1: no token"
    ), said
    log = api.daemon.log()
    assert "\x1b" not in log and "\x9b" not in log
    assert not [line for line in log.splitlines() if line.startswith("FAKE LINE")]


# -- 4, 5. forwarded headers are not believed; absolute URLs are public_url's ---------------


def test_forwarded_headers_change_neither_the_logged_address_nor_any_url(api: Api) -> None:
    forged = {
        "X-Forwarded-For": "203.0.113.9",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "evil.example",
        "Forwarded": "for=203.0.113.9;proto=https",
    }
    assert api.call("GET", "/api/v1/jobs/forged-for", token=None,
                    headers=forged).status_code == 401  # fmt: skip
    said = wait_for(partial(log_lines, api, "/api/v1/jobs/forged-for"), bound=BOUND,
                    what="the refusal logged")  # fmt: skip
    assert said[0].endswith("API: refused GET /api/v1/jobs/forged-for from 127.0.0.1: no token")
    assert "203.0.113.9" not in api.daemon.log()
    answer = api.submit(yaml.safe_dump({"executor": "local", "product": {"commands": "true"}}),
                        headers={**forged, "Host": "evil.example"})  # fmt: skip
    assert answer.status_code == 201, answer.text
    assert answer.headers["Location"] == f"{PUBLIC}/api/v1/jobs/{answer.json()['job_id']}"


def test_the_next_pages_link_is_public_urls(api: Api) -> None:
    for n in range(3):
        text = yaml.safe_dump({"job_id": f"linked-{n}", "executor": "local",
                               "labels": {"set": "linked"}, "product": {"commands": "true"}})  # fmt: skip
        assert api.submit(text).status_code == 201
    answer = api.call("GET", "/api/v1/jobs", params={"label": "set=linked", "limit": 1},
                      headers={"Host": "evil.example"})  # fmt: skip
    assert answer.status_code == 200, answer.text
    link = answer.headers["Link"]
    assert link.startswith(f"<{PUBLIC}/api/v1/jobs?") and link.endswith('>; rel="next"'), link
    assert "label=set%3Dlinked" in link and "limit=1" in link
    assert f"cursor={answer.json()['next_cursor']}" in link
