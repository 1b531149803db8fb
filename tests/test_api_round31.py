"""The HTTP API behind a reverse proxy and over TLS, on a real daemon over loopback.

1. ``api.trusted_proxies``: only from a peer in it are X-Forwarded-For (its right-most address
   that is not itself a trusted proxy) and X-Forwarded-Proto believed; 127.0.0.2 stands for
   the proxy (a client socket bound to it), 127.0.0.1 for anyone else on the host. One
   client's refused tokens lock out no other client.
2. Over TLS the page's cookies are ``__Host-`` cookies (Secure, Path=/, no Domain), and a
   cookie of the bare name (tossed by a sibling subdomain or a plain-HTTP page) is not
   believed; over plain HTTP they keep their names.
3. A TLS handshake that stalls (nothing sent, or a byte at a time) is closed within
   ``api.handshake_timeout``, and connections still in their handshake count against the cap.

Bounds, not stopwatches: each wait is bounded several times above the timeout configured for
it, so that a server which never closes a connection fails the test, not a slow machine."""

from __future__ import annotations

import http.client
import re
import selectors
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from spoold.core.config import load_config
from spoold.core.errors import ConfigError
from tests.apiclient import Api, certificate, module_api, start_api
from tests.harness import wait_for, write_config

pytestmark = pytest.mark.daemon

#: Several times every timeout configured here: a connection open this long was never closed.
BOUND = 10.0
PROXY = "127.0.0.2"
SESSION, LOGIN = "spoold_session", "spoold_login"
HOST_SESSION, HOST_LOGIN = f"__Host-{SESSION}", f"__Host-{LOGIN}"


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """Plain HTTP on 127.0.0.1, with 127.0.0.2 and 10.9.0.0/16 as trusted proxies."""
    yield from module_api(tmp_path_factory, "proxied",
                          api={"trusted_proxies": [PROXY, "10.9.0.0/16"]})  # fmt: skip


def tls_api(tmp: Path, **api: object) -> Api:
    cert, key = certificate(tmp)
    started = start_api(tmp, api={"certfile": str(cert), "keyfile": str(key), **api})
    started.verify = str(cert)
    return started


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """HTTPS, a handshake bounded to 2 s (and 30 s for the rest of a request): short for the
    tests of the bound, long enough for this module's own clients on a loaded machine."""
    tmp = tmp_path_factory.mktemp("tls")
    tmp.chmod(0o755)
    started = tls_api(tmp, handshake_timeout="2s", client_timeout="30s")
    yield started
    started.daemon.kill()


def address(api: Api) -> tuple[str, int]:
    host, port = api.url.split("://")[1].split(":")
    return host, int(port)


class Answer:
    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.status = response.status
        self.headers = response.getheaders()
        self.body = response.read()

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def set_cookies(self) -> dict[str, str]:
        """Each Set-Cookie header by its cookie's name."""
        found = [v for k, v in self.headers if k.lower() == "set-cookie"]
        return {v.split("=", 1)[0]: v for v in found}


def ask(api: Api, method: str, path: str, *, source: str = "127.0.0.1",
        headers: dict[str, str] | None = None, body: bytes | None = None) -> Answer:  # fmt: skip
    """One request over plain HTTP from ``source`` (a loopback address of the client's)."""
    host, port = address(api)
    connection = http.client.HTTPConnection(host, port, timeout=30, source_address=(source, 0))
    try:
        connection.request(method, path, body=body, headers=headers or {})
        return Answer(connection.getresponse())
    finally:
        connection.close()


def refusals_of(api: Api, path: str) -> list[str]:
    return [line for line in api.daemon.log().splitlines() if f"refused GET {path} " in line]


def refused_from(api: Api, path: str) -> str:
    """The address the log names for the refusal of ``path`` (one request, no token)."""
    said = wait_for(lambda: refusals_of(api, path), bound=BOUND, what=f"{path} refused")
    assert len(said) == 1, said
    found = re.search(r" from (\S+): ", said[0])
    assert found, said[0]
    return found.group(1)


# -- 1. trusted proxies ------------------------------------------------------------------------


def test_a_trusted_proxy_names_the_client_the_right_most_untrusted_address(proxied: Api) -> None:
    cases = {
        "/api/v1/jobs/fwd-plain": "198.51.100.7",
        # 10.9.3.4 is a proxy of ours (its network is trusted): the client is the one before.
        "/api/v1/jobs/fwd-chain": "198.51.100.7, 10.9.3.4",
        # What the client wrote itself (6.6.6.6) is left of what our proxy appended.
        "/api/v1/jobs/fwd-forged": "6.6.6.6, 198.51.100.8",
    }
    for path, forwarded in cases.items():
        answer = ask(proxied, "GET", path, source=PROXY, headers={"X-Forwarded-For": forwarded})
        assert answer.status == 401
    assert refused_from(proxied, "/api/v1/jobs/fwd-plain") == "198.51.100.7"
    assert refused_from(proxied, "/api/v1/jobs/fwd-chain") == "198.51.100.7"
    assert refused_from(proxied, "/api/v1/jobs/fwd-forged") == "198.51.100.8"
    # The proxy's own request (nothing forwarded) is its own.
    assert ask(proxied, "GET", "/api/v1/jobs/fwd-none", source=PROXY).status == 401
    assert refused_from(proxied, "/api/v1/jobs/fwd-none") == PROXY


def test_an_untrusted_peer_forges_neither_its_address_nor_the_scheme(proxied: Api) -> None:
    forged = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}
    assert ask(proxied, "GET", "/api/v1/jobs/fwd-untrusted", headers=forged).status == 401
    assert refused_from(proxied, "/api/v1/jobs/fwd-untrusted") == "127.0.0.1"
    assert "203.0.113.9" not in proxied.daemon.log()

    def submitted(source: str, job_id: str) -> str:
        text = yaml.safe_dump({"job_id": job_id, "executor": "local",
                               "product": {"commands": "true"}})  # fmt: skip
        answer = ask(proxied, "POST", "/api/v1/jobs", source=source, body=text.encode(),
                     headers={**forged, "Host": "jobs.example.net", "Content-Type":
                              "application/yaml", "Authorization":
                              f"Bearer {proxied.tokens['submit']}"})  # fmt: skip
        assert answer.status == 201, answer.body
        return answer.header("Location") or ""

    assert submitted("127.0.0.1", "fwd-scheme-1") == (
        "http://jobs.example.net/api/v1/jobs/fwd-scheme-1"
    )
    assert submitted(PROXY, "fwd-scheme-2") == "https://jobs.example.net/api/v1/jobs/fwd-scheme-2"


def test_one_clients_refused_tokens_lock_out_no_other_client(proxied: Api) -> None:
    bad = {"Authorization": "Bearer spoold_x_wrong"}
    for _ in range(40):
        answer = ask(proxied, "GET", "/api/v1/status", source=PROXY,
                     headers={**bad, "X-Forwarded-For": "198.51.100.66"})  # fmt: skip
        assert answer.status == 401
    good = {"Authorization": f"Bearer {proxied.tokens['read']}"}
    for client in ("198.51.100.67", "198.51.100.66"):
        answer = ask(proxied, "GET", "/api/v1/status", source=PROXY,
                     headers={**good, "X-Forwarded-For": client})  # fmt: skip
        assert answer.status == 200, (client, answer.body)


@pytest.mark.parametrize(
    ("value", "said"),
    [
        (["*"], "'*' is not an address or a network"),
        (["proxy.example.net"], "'proxy.example.net' is not an address or a network"),
        (["10.0.0.0/33"], "'10.0.0.0/33' is not an address or a network"),
        ("127.0.0.1", "'127.0.0.1' is not of type 'array'"),
    ],
)
def test_trusted_proxies_are_addresses_or_networks(tmp_path: Path, value: object,
                                                   said: str) -> None:  # fmt: skip
    path = write_config(tmp_path / "c.yaml", tmp_path / "spool", api={"trusted_proxies": value})
    with pytest.raises(ConfigError, match=r"key api\.trusted_proxies") as raised:
        load_config(path, env={}, check_schema=False)
    assert said in str(raised.value)


def test_trusted_proxies_and_handshake_timeout_load_with_the_schema(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", tmp_path / "spool",
                        api={"trusted_proxies": ["127.0.0.1", "::1", "10.1.0.0/16"],
                             "handshake_timeout": "2s"})  # fmt: skip
    api = load_config(path, env={}).api
    assert api is not None
    assert api.trusted_proxies == ("127.0.0.1", "::1", "10.1.0.0/16")
    assert api.handshake_timeout == 2.0
    defaults = load_config(write_config(tmp_path / "d.yaml", tmp_path / "spool", api={}),
                           env={}).api  # fmt: skip
    assert defaults is not None and defaults.trusted_proxies == ()
    assert defaults.handshake_timeout == 10.0


# -- 2. __Host- cookies over TLS ---------------------------------------------------------------


def host_cookie(header: str) -> None:
    """``header`` is a Set-Cookie a browser keeps as a __Host- cookie."""
    assert header.startswith("__Host-"), header
    attributes = [part.strip().lower() for part in header.split(";")[1:]]
    assert "secure" in attributes, header
    assert "path=/" in attributes, header
    assert not [a for a in attributes if a.startswith("domain")], header


def logged_in(api: Api, session: requests.Session, login_cookie: str) -> requests.Response:
    shown = session.get(api.url + "/login", timeout=30)
    assert shown.status_code == 200
    given = shown.raw.headers.getlist("Set-Cookie")
    assert [h for h in given if h.startswith(f"{login_cookie}=")], given
    fields = dict(re.findall(r'<input[^>]*name="([^"]+)"[^>]*value="([^"]*)"', shown.text))
    answer = session.post(api.url + "/login", data={**fields, "token": api.tokens["admin"]},
                          allow_redirects=False, timeout=30)  # fmt: skip
    assert answer.status_code == 303, answer.text
    return answer


def test_over_tls_the_pages_cookies_are_host_cookies(tls: Api) -> None:
    session = requests.Session()
    # Not the environment's CA bundle (requests lets REQUESTS_CA_BUNDLE override a session's).
    session.trust_env, session.verify = False, tls.verify
    shown = session.get(tls.url + "/login", timeout=30)
    for header in shown.raw.headers.getlist("Set-Cookie"):
        host_cookie(header)
    assert HOST_LOGIN in session.cookies
    fields = dict(re.findall(r'<input[^>]*name="([^"]+)"[^>]*value="([^"]*)"', shown.text))
    answer = session.post(tls.url + "/login", data={**fields, "token": tls.tokens["admin"]},
                          allow_redirects=False, timeout=30)  # fmt: skip
    assert answer.status_code == 303, answer.text
    set_cookies = answer.raw.headers.getlist("Set-Cookie")
    assert {h.split("=", 1)[0] for h in set_cookies} == {HOST_SESSION, HOST_LOGIN}, set_cookies
    for header in set_cookies:
        host_cookie(header)
    assert "httponly" in set_cookies[0].lower() + set_cookies[1].lower()
    assert SESSION not in session.cookies and LOGIN not in session.cookies
    assert session.get(tls.url + "/", allow_redirects=False, timeout=30).status_code == 200
    # The API's reads take the page's session too (its live log): the same cookie.
    assert session.get(tls.url + "/api/v1/status", timeout=30).status_code == 200
    value = session.cookies[HOST_SESSION]

    def page(cookies: dict[str, str]) -> int:
        return requests.get(tls.url + "/", cookies=cookies, verify=tls.verify,
                            allow_redirects=False, timeout=30).status_code  # fmt: skip

    # A cookie of the bare name is one anyone could have set (a sibling subdomain, a plain-HTTP
    # page of this host): not believed over TLS, even with a valid session in it.
    assert page({SESSION: value}) == 303
    assert page({SESSION: "x", HOST_SESSION: value}) == 200
    # Logging out ends the __Host- cookie.
    csrf = re.search(
        r'name="csrf"[^>]*value="([^"]+)"', session.get(tls.url + "/", timeout=30).text
    )
    assert csrf
    out = session.post(tls.url + "/logout", data={"csrf": csrf.group(1)}, allow_redirects=False,
                       timeout=30)  # fmt: skip
    assert out.status_code == 303
    ended = out.raw.headers.getlist("Set-Cookie")
    assert len(ended) == 1 and ended[0].startswith(f'{HOST_SESSION}=""'), ended
    host_cookie(ended[0])
    assert page({HOST_SESSION: value}) == 303


def test_over_plain_http_the_cookies_keep_their_names(proxied: Api) -> None:
    session = requests.Session()
    answer = logged_in(proxied, session, LOGIN)
    set_cookies = answer.raw.headers.getlist("Set-Cookie")
    assert {h.split("=", 1)[0] for h in set_cookies} == {SESSION, LOGIN}, set_cookies
    assert all("secure" not in h.lower() for h in set_cookies), set_cookies
    assert session.get(proxied.url + "/", allow_redirects=False, timeout=30).status_code == 200
    # A prefixed cookie sent over plain HTTP (no browser would) is no session there.
    value = session.cookies[SESSION]
    assert ask(proxied, "GET", "/", headers={"Cookie": f"{HOST_SESSION}={value}"}).status == 303


def test_behind_a_trusted_tls_proxy_the_cookies_are_host_cookies(proxied: Api) -> None:
    via = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "198.51.100.9"}
    shown = ask(proxied, "GET", "/login", source=PROXY, headers=via)
    cookies = shown.set_cookies()
    assert list(cookies) == [HOST_LOGIN], cookies
    host_cookie(cookies[HOST_LOGIN])
    login = cookies[HOST_LOGIN].split(";")[0]
    fields = dict(re.findall(r'<input[^>]*name="([^"]+)"[^>]*value="([^"]*)"',
                             shown.body.decode()))  # fmt: skip
    form = "&".join(f"{k}={v}" for k, v in {**fields, "token": proxied.tokens["read"]}.items())
    answer = ask(proxied, "POST", "/login", source=PROXY, body=form.encode(),
                 headers={**via, "Cookie": login,
                          "Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert answer.status == 303, answer.body
    session = answer.set_cookies()[HOST_SESSION]
    host_cookie(session)
    cookie = session.split(";")[0]
    assert ask(proxied, "GET", "/", source=PROXY, headers={**via, "Cookie": cookie}).status == 200
    # The same request not through the proxy is plain HTTP: no __Host- cookie is read there.
    assert ask(proxied, "GET", "/", headers={**via, "Cookie": cookie}).status == 303


# -- 3. TLS handshakes: bounded in time and in number --------------------------------------------


def until_closed(sock: socket.socket, trickle: bytes = b"") -> float:
    """Seconds until the server closes ``sock`` (sending ``trickle`` a byte every 50 ms
    meanwhile); AssertionError if it is still open after BOUND seconds."""
    began = time.monotonic()
    end = began + BOUND
    sock.settimeout(0.05)
    while time.monotonic() < end:
        if trickle:
            try:
                sock.sendall(trickle[:1])
                trickle = trickle[1:]
            except OSError:
                trickle = b""
        try:
            if not sock.recv(65536):
                return time.monotonic() - began
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - began
    raise AssertionError(f"still open after {BOUND} s")


def client_hello() -> bytes:
    """The first flight of a real TLS client."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_side=False)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_a_silent_tls_connection_is_closed_within_the_handshake_timeout(tls: Api) -> None:
    with socket.create_connection(address(tls), timeout=BOUND) as sock:
        until_closed(sock)
    assert tls.call("GET", "/healthz", token=None).status_code == 200


def test_a_handshake_sent_a_byte_at_a_time_is_closed_within_the_handshake_timeout(
    tls: Api,
) -> None:
    hello = client_hello()
    # Long enough to outlast the 2 s bound (a byte every 50 ms): it must be cut off mid-way.
    assert len(hello) * 0.05 > 4
    with socket.create_connection(address(tls), timeout=BOUND) as sock:
        until_closed(sock, trickle=hello)
    assert "Traceback" not in tls.daemon.log()


def test_a_request_in_the_same_packet_as_the_handshakes_end_is_answered(tls: Api) -> None:
    """TLS 1.3: the client's Finished and its first request can arrive in one read."""
    context = ssl.create_default_context(cafile=str(tls.verify))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    request = (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
               b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")  # fmt: skip
    with socket.create_connection(address(tls), timeout=BOUND) as sock:
        while True:
            try:
                client.do_handshake()
                break
            except ssl.SSLWantReadError:
                if pending := outgoing.read():
                    sock.sendall(pending)
                incoming.write(sock.recv(65536))
        client.write(request)
        sock.sendall(outgoing.read())  # Finished and both requests, in one write
        received = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            incoming.write(chunk)
            try:
                while piece := client.read(65536):
                    received += piece
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                pass
    assert received.count(b"HTTP/1.1 200 OK") == 2, received


def test_https_serves_pages_posts_and_streams(tls: Api) -> None:
    text = yaml.safe_dump({"job_id": "tls-1", "executor": "local",
                           "product": {"commands": "echo over-tls"}})  # fmt: skip
    answer = tls.submit(text)
    assert answer.status_code == 201, answer.text
    assert answer.headers["Location"].startswith("https://127.0.0.1:")
    with requests.get(f"{tls.url}/api/v1/jobs/tls-1/log", params={"follow": 1},
                      headers={"Authorization": f"Bearer {tls.tokens['read']}"},
                      verify=tls.verify, stream=True, timeout=BOUND) as followed:  # fmt: skip
        assert followed.status_code == 200
        assert "over-tls" in followed.text


def test_connections_in_their_handshake_count_against_the_cap(tmp_path: Path) -> None:
    from spoold.face.api.server import BACKLOG, connection_cap  # noqa: PLC0415 - the daemon's

    # Neither timeout closes anything while the test runs: only the cap may.
    started = tls_api(tmp_path, handshake_timeout="60s", client_timeout="60s")
    socks: list[socket.socket] = []
    try:
        cap, extra = connection_cap(), BACKLOG
        for _ in range(cap + extra):
            socks.append(socket.create_connection(address(started), timeout=BOUND))
        closed = 0
        with selectors.DefaultSelector() as selector:  # epoll: more sockets than select takes
            for sock in socks:
                selector.register(sock, selectors.EVENT_READ)
            end = time.monotonic() + BOUND
            while closed < extra and time.monotonic() < end:
                for key, _ in selector.select(0.1):
                    selector.unregister(key.fileobj)
                    until_closed(key.fileobj)  # type: ignore[arg-type]
                    closed += 1
        assert closed == extra, (closed, extra)
        assert started.daemon.log().count("connections open, as many as it takes") >= 1
        # A stop does not wait for the handshakes under way.
        assert started.daemon.stop(bound=BOUND) == 0
    finally:
        for sock in socks:
            sock.close()
        started.daemon.kill()


def test_a_real_browser_keeps_the_host_cookie_over_tls(tls: Api, tmp_path: Path) -> None:
    from selenium import webdriver  # noqa: PLC0415 - only this test drives a browser
    from selenium.webdriver.chrome.service import Service  # noqa: PLC0415
    from selenium.webdriver.common.by import By  # noqa: PLC0415
    from selenium.webdriver.support.ui import WebDriverWait  # noqa: PLC0415

    from tests.browser import ARGUMENTS, CHROMEDRIVER, CHROMIUM, require_chromium  # noqa: PLC0415

    require_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ARGUMENTS:
        options.add_argument(argument)
    options.accept_insecure_certs = True  # the test's own certificate, trusted by no one
    service = Service(str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.set_page_load_timeout(30)
        driver.get(tls.url + "/login")
        driver.find_element(By.CSS_SELECTOR, "form#login input#token").send_keys(tls.tokens["read"])
        driver.find_element(By.CSS_SELECTOR, "button#login-submit").click()
        WebDriverWait(driver, 30).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, "main#page-overview")
        )
        kept = driver.get_cookie(HOST_SESSION)
        assert kept is not None and kept["secure"] is True and kept["path"] == "/", kept
        assert driver.get_cookie(SESSION) is None
    finally:
        driver.quit()
