"""A real HTTP receiver of callbacks on loopback, and a signature check that is not spoold's."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.harness import DEFAULT_BOUND, wait_for
from tests.loopback import serve_in_thread, stop_serving


@dataclass(frozen=True)
class Received:
    """One POST as the receiver saw it, and the number of the address it came to."""

    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    host: int = 0  # a key of the receiver's ``addresses``

    def json(self) -> dict[str, Any]:
        data = json.loads(self.body)
        assert isinstance(data, dict)
        return data


class Receiver:
    """Answers ``status`` to every POST (after ``hold`` is set, if given), and keeps them all.

    It listens on 127.0.0.1, or on each of ``addresses`` (number -> address: a server each, all
    on one port), and notes on each POST the number of the address it came to."""

    def __init__(
        self, port: int = 0, *, status: int = 200, addresses: Mapping[int, str] | None = None,
        idle: float | None = None,
    ) -> None:  # fmt: skip
        """``idle``: a connection quiet this long is closed (its client may have vanished
        with its network, never to close it: its thread would wait for ever)."""
        self.idle = idle
        self.status = status
        self.hold: threading.Event | None = None  # when set: answers wait for it
        self.location: str | None = None  # when set: each answer's Location header (a redirect)
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._addresses = dict(addresses or {0: "127.0.0.1"})
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []
        # The port the first address got may be taken on another: then another try, unless
        # the caller named the port.
        tries = 1 if port else 50
        for tried in range(1, tries + 1):
            try:
                self.port = self._bind(port)
                break
            except OSError:
                if tried == tries:
                    raise

    def _bind(self, port: int) -> int:
        """A server on each address, all on ``port`` (the first one's if 0); returns the port."""
        try:
            for n, address in self._addresses.items():
                server = ThreadingHTTPServer((address, port), self._handler(n))
                self._servers.append(server)
                port = port or server.server_address[1]
        except OSError:
            self._close()
            raise
        return port

    def _close(self) -> None:
        for server in self._servers:
            server.server_close()
        self._servers = []

    def _handler(self, n: int) -> type[BaseHTTPRequestHandler]:
        """The handler of the server on address ``n``."""
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real receivers do
            timeout = receiver.idle

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if len(body) < length:  # its sender died between headers and body (kill -9)
                    self.close_connection = True
                    return  # not a delivery: no answer, so a sender would send it again
                headers = {name.lower(): value for name, value in self.headers.items()}
                with receiver._lock:
                    receiver.received.append(Received(self.path, headers, body, n))
                if receiver.hold is not None:
                    receiver.hold.wait(DEFAULT_BOUND)
                self.send_response(receiver.status)
                if receiver.location is not None:
                    self.send_header("Location", receiver.location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def log_error(self, format: str, *args: Any) -> None:
                pass  # an idle connection closed

        return Handler

    @property
    def url(self) -> str:
        """Where to POST: on the first (or only) address."""
        return self.url_for(next(iter(self._addresses)))

    def url_for(self, n: int) -> str:
        """Where to POST on address ``n``."""
        return f"http://{self._addresses[n]}:{self.port}/hook"

    def start(self) -> Receiver:
        self._threads = [serve_in_thread(server) for server in self._servers]
        return self

    def stop(self) -> None:
        if self.hold is not None:
            self.hold.set()
        if not self._threads:
            self._close()  # never served: a shutdown() would wait for serve_forever forever
        for server, thread in zip(self._servers, self._threads, strict=True):
            stop_serving(server, thread)
        self._servers, self._threads = [], []

    def bodies(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.json() for r in self.received]

    def wait_count(self, count: int, bound: float = DEFAULT_BOUND) -> list[Received]:
        def enough() -> list[Received] | None:
            with self._lock:
                return list(self.received) if len(self.received) >= count else None

        return wait_for(enough, bound=bound, what=f"{count} callback(s) at {self.url}")


def verify(received: Received, secret: str) -> dict[str, Any]:
    """Check the signature as a receiver would, with openssl rather than Python's hmac."""
    stamp = received.headers["x-spoold-timestamp"]
    signed = stamp.encode() + b"." + received.body
    out = subprocess.run(
        ["openssl", "dgst", "-sha256", "-hmac", secret, "-r"],
        input=signed, capture_output=True, check=True,
    ).stdout.decode()  # fmt: skip
    expected = "sha256=" + out.split()[0]
    assert received.headers["x-spoold-signature"] == expected, "signature does not verify"
    return received.json()


@pytest.fixture(name="receiver")
def receiver_fixture() -> Iterator[Receiver]:
    """A receiver on loopback for one test, stopped after it."""
    made = Receiver().start()
    yield made
    made.stop()
