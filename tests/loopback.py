"""Running a test's HTTP server (a fake vendor API, a callback receiver) on a thread."""

from __future__ import annotations

import threading
from http.server import HTTPServer


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
