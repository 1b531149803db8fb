"""Running a test's HTTP server (a fake vendor API, a callback receiver) on a thread."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (right now): a server that is down."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_in_thread(server: HTTPServer) -> threading.Thread:
    """Serve until ``stop_serving``; the thread dies with the test process if that never comes."""
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    return thread


def stop_serving(server: HTTPServer, thread: threading.Thread | None) -> None:
    server.shutdown()
    server.server_close()
    if thread is not None:
        thread.join(timeout=5)


class MethodHandler(BaseHTTPRequestHandler):
    """Hands every request to ``serve(method)``, whatever the method: a fake must see (and may
    refuse) the ones its API does not know, too. Quiet: tests read what they assert on."""

    protocol_version = "HTTP/1.1"

    def serve(self, method: str) -> None:
        raise NotImplementedError

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        self.serve("GET")

    def do_POST(self) -> None:
        self.serve("POST")

    def do_PUT(self) -> None:
        self.serve("PUT")

    def do_DELETE(self) -> None:
        self.serve("DELETE")

    def do_PATCH(self) -> None:
        self.serve("PATCH")

    def do_OPTIONS(self) -> None:
        self.serve("OPTIONS")
