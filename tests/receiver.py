"""A real HTTP receiver of callbacks on loopback, and a signature check that is not spoold's."""

from __future__ import annotations

import json
import subprocess
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.harness import DEFAULT_BOUND, wait_for
from tests.loopback import serve_in_thread, stop_serving


@dataclass(frozen=True)
class Received:
    """One POST as the receiver saw it."""

    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> dict[str, Any]:
        data = json.loads(self.body)
        assert isinstance(data, dict)
        return data


class Receiver:
    """Answers ``status`` to every POST (after ``hold`` is set, if given), and keeps them all."""

    def __init__(self, port: int = 0, *, status: int = 200) -> None:
        self.status = status
        self.hold: threading.Event | None = None  # when set: answers wait for it
        self.received: list[Received] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real receivers do

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                headers = {name.lower(): value for name, value in self.headers.items()}
                with receiver._lock:
                    receiver.received.append(Received(self.path, headers, body))
                if receiver.hold is not None:
                    receiver.hold.wait(DEFAULT_BOUND)
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        self._thread = serve_in_thread(self._server)
        return self

    def stop(self) -> None:
        if self.hold is not None:
            self.hold.set()
        stop_serving(self._server, self._thread)

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
