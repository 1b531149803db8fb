"""What the HTTP API executors (proxmox, sevdesk, lexware) share: requests that end, and notes
a unit leaves in the job's log for its next attempt.

requests bounds each read from a socket, not a request: a server that drips a byte a second
holds it forever, and it reads an answer of any size into memory. ``Bound`` mounts an adapter
that refuses to send anything once the attempt is cancelled or out of time, ends a request in
flight at once on either (a watchdog shuts its sockets down), bounds each request as a whole,
and reads no more of an answer than ``max_body`` bytes.

requests is imported when a job runs, never with this module.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from spoold.executors.base import RunContext, Stopped

from spoold.core.clock import Clock
from spoold.core.errors import ExecutorError
from spoold.core.joblog import split_line

MIB = 1024 * 1024
_CHUNK = 64 * 1024
_TICK = 0.05  # how soon the watchdog sees a cancel


class AnswerTooLarge(ExecutorError):
    """A server answered more than an executor reads of one answer."""


class Deadline:
    """When the requests of an attempt must end: at its timeout, and at once on its cancel."""

    def __init__(self, clock: Clock, timeout: float | None, cancel: threading.Event) -> None:
        self.clock, self.cancel = clock, cancel
        self.at = None if timeout is None else clock.monotonic() + timeout

    @classmethod
    def of(cls, ctx: RunContext) -> Deadline:
        return cls(ctx.clock, ctx.timeout, ctx.cancel)

    def left(self) -> float | None:
        """Seconds until the deadline; None: there is none."""
        return None if self.at is None else self.at - self.clock.monotonic()

    def check(self) -> None:
        """Raise Stopped if the attempt is cancelled or out of time."""
        if self.cancel.is_set():
            raise Stopped(cancelled=True)
        left = self.left()
        if left is not None and left <= 0:
            raise Stopped(cancelled=False)


class Bound:
    """The limits of the requests of one requests session (``mount``)."""

    def __init__(
        self, deadline: Deadline, *, name: str, max_body: int, request_seconds: float
    ) -> None:
        self.deadline, self.name = deadline, name
        self.max_body, self.request_seconds = max_body, request_seconds

    @contextlib.contextmanager
    def grace(self, seconds: float) -> Iterator[None]:
        """Requests with a short deadline of their own that a cancel does not end: to stop
        what the attempt started once it is cancelled or out of time."""
        kept = self.deadline
        self.deadline = Deadline(kept.clock, seconds, threading.Event())
        try:
            yield
        finally:
            self.deadline = kept

    def mount(self, session: Any, pool_kwargs: Mapping[str, Any] | None = None) -> None:
        """Send every request of ``session`` through an adapter that keeps to this bound;
        ``pool_kwargs`` go to urllib3's pools (a pinned certificate's fingerprint)."""
        adapter = _adapter(self, dict(pool_kwargs or {}))
        session.mount("https://", adapter)
        session.mount("http://", adapter)


class _Sockets:
    """The sockets an adapter opened, to shut down from another thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: weakref.WeakSet[socket.socket] = weakref.WeakSet()

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.add(sock)

    def shut_down(self) -> None:
        with self._lock:
            found = list(self._open)
        for sock in found:
            with contextlib.suppress(OSError):  # closed already
                sock.shutdown(socket.SHUT_RDWR)


class _Watchdog:
    """Shuts ``sockets`` down on cancel or after ``seconds``: a blocked read then fails."""

    def __init__(self, sockets: _Sockets, cancel: threading.Event, seconds: float) -> None:
        self._sockets, self._cancel, self._seconds = sockets, cancel, seconds
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="spoold-request-watchdog")
        self.fired: str | None = None  # "cancel" or "time"

    def __enter__(self) -> _Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        end = time.monotonic() + self._seconds
        while not self._done.wait(max(0.0, min(_TICK, end - time.monotonic()))):
            if self._cancel.is_set():
                self.fired = "cancel"
            elif time.monotonic() >= end:
                self.fired = "time"
            else:
                continue
            self._sockets.shut_down()
            return


def _adapter(bound: Bound, pool_kwargs: dict[str, Any]) -> Any:
    import requests  # noqa: PLC0415 - only when a job runs
    import urllib3.connection  # noqa: PLC0415 - requests' own dependency
    import urllib3.connectionpool  # noqa: PLC0415

    sockets = _Sockets()

    class TrackedHTTP(urllib3.connection.HTTPConnection):
        def _new_conn(self) -> socket.socket:
            sock = super()._new_conn()
            sockets.add(sock)
            return sock

    class TrackedHTTPS(urllib3.connection.HTTPSConnection):
        # The TLS socket, not the one _new_conn makes: wrapping that one detaches it. The
        # handshake before is bounded by the socket's timeout of each read.
        def connect(self) -> None:
            super().connect()
            sockets.add(self.sock)

    class HTTPPool(urllib3.connectionpool.HTTPConnectionPool):
        ConnectionCls = TrackedHTTP

    class HTTPSPool(urllib3.connectionpool.HTTPSConnectionPool):
        ConnectionCls = TrackedHTTPS

    class BoundedAdapter(requests.adapters.HTTPAdapter):
        """Sends a request within the bound, reading its whole answer (at most max_body)."""

        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **(kwargs | pool_kwargs))
            self.poolmanager.pool_classes_by_scheme = {"http": HTTPPool, "https": HTTPSPool}

        def send(  # noqa: PLR0917 - HTTPAdapter.send's own signature
            self,
            request: Any,
            stream: bool = False,
            timeout: Any = None,
            verify: Any = True,
            cert: Any = None,
            proxies: Any = None,
        ) -> Any:
            deadline = bound.deadline
            deadline.check()  # nothing goes out once the attempt is cancelled or out of time
            left = deadline.left()
            by_deadline = left is not None and left <= bound.request_seconds
            seconds = bound.request_seconds if left is None else min(bound.request_seconds, left)
            connect, read = timeout if isinstance(timeout, tuple) else (timeout, timeout)
            limits = (min(connect or seconds, seconds), min(read or seconds, seconds))
            with _Watchdog(sockets, deadline.cancel, seconds) as watch:
                try:
                    response = super().send(request, True, limits, verify, cert, proxies)
                    _read_body(response, bound, request)
                    return response
                except AnswerTooLarge:
                    raise
                except Exception as exc:
                    if watch.fired is None:
                        raise
                    if watch.fired == "cancel" or by_deadline:
                        raise Stopped(cancelled=watch.fired == "cancel") from exc
                    raise requests.exceptions.ReadTimeout(
                        f"no whole answer within {seconds:g}s", request=request
                    ) from exc

    return BoundedAdapter()


def _read_body(response: Any, bound: Bound, request: Any) -> None:
    """Read the answer into ``response.content``: refused past ``bound.max_body`` bytes (as
    decoded: a compressed answer counts as what it becomes)."""

    def too_large() -> AnswerTooLarge:
        response.close()
        return AnswerTooLarge(
            f"{bound.name}: {request.method} {urlsplit(request.url).path}: the answer is larger "
            f"than {bound.max_body // MIB} MiB: refused (the server is not answering as its API "
            "says); whatever the request did may have happened"
        )

    length = str(response.headers.get("Content-Length") or "")
    if length.isdigit() and int(length) > bound.max_body:
        raise too_large()
    chunks, size = [], 0
    for chunk in response.raw.stream(_CHUNK, decode_content=True):
        size += len(chunk)
        if size > bound.max_body:
            raise too_large()
        chunks.append(chunk)
    response._content = b"".join(chunks)
    response._content_consumed = True
    response.raw.release_conn()


# ---------------------------------------------------------------------- notes across attempts
def leave_note(ctx: RunContext, note: str) -> bool:
    """Log ``note`` for a later attempt of this unit to find (``find_note``); False if no
    later attempt can read it (no job log to read back, or the line was lost)."""
    lost = ctx.log.lost_lines
    ctx.log.info(note)
    return ctx.read_log is not None and ctx.log.lost_lines == lost


def find_note(ctx: RunContext, pattern: re.Pattern[str]) -> re.Match[str] | None:
    """The last of spoold's lines of this unit (its step's, on any attempt) in the job's log
    that ``pattern`` matches whole (without the ``spoold: `` before it); None if none."""
    if ctx.read_log is None:
        return None
    prefix = "".join(f"[{name}] " for name in ctx.log.sections) + "spoold: "
    found = None
    try:
        with ctx.read_log() as log:
            for raw in log:
                head, text = split_line(raw.decode("utf-8", errors="replace").rstrip("\n"))
                if head.endswith(" INFO ") and text.startswith(prefix):
                    found = pattern.fullmatch(text[len(prefix) :]) or found
    except OSError:
        return None
    return found
