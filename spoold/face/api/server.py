"""The API's server: uvicorn, in a thread of the daemon's main process, on a socket bound before
the thread starts (so that a port in use stops the daemon with a clear message).

In the daemon's process, not one of its own: the counters of /metrics are kept where the
changes of state are seen, and the API reads the same spool with no second copy of anything.
uvicorn on asyncio with h11 (no uvloop, no httptools): nothing to compile, and an API that
answers in milliseconds does not need more.

Slow clients: uvicorn closes a keep-alive connection idle for ``timeout_keep_alive``, but any
byte received restarts that wait, a fresh connection that sends nothing has none, and a request
whose body never comes waits for it as long as the route does (a form read by the page: for
ever). So each connection here must deliver a complete request head within ``client_timeout``
of being made (or of its last response), however it trickles, and then the request's body
within ``client_timeout`` of its head; a body too late is answered 408 by the server itself,
whatever route was reading it, and the connection closed.

Many clients: each connection holds a file descriptor of the daemon's, which intake, the
workers and the logs need too. At most ``connection_cap()`` are kept open at once; one more is
answered 503 and closed at once, so a flood of connections costs the API its service for a
while (each lasts at most about twice ``client_timeout`` unless it is served), never the
daemon its descriptors.

TLS: the server accepts plain TCP connections and starts TLS on each itself (asyncio's
``start_tls``), so that a connection is counted against the cap, and under its head's deadline,
from the moment it is made, its handshake included: uvicorn hands asyncio the certificate, and
asyncio makes the protocol only once the handshake is over, which left connections that never
finish theirs (nothing sent, or a byte at a time) uncounted and open for asyncio's minute. The
handshake must be over within ``handshake_timeout``, a closing's exchange of close_notify too.

Proxies: X-Forwarded-For and X-Forwarded-Proto are believed only from the peers
``api.trusted_proxies`` names (uvicorn's ProxyHeadersMiddleware; its default believes them from
any loopback client, which anyone on the host is): the client is then the right-most address
of X-Forwarded-For that is not itself a trusted proxy, the scheme X-Forwarded-Proto's. From any
other peer they are ignored: the log names the connection's own address, and absolute URLs come
from ``api.public_url`` (else the request's scheme and Host).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
import ssl
import threading
from typing import TYPE_CHECKING, Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle
from uvicorn.protocols.utils import get_remote_addr

from spoold.core.config import is_loopback
from spoold.core.errors import ConfigError
from spoold.face.api.context import BODY_TOO_SLOW, RefusalLog

if TYPE_CHECKING:
    from spoold.core.config import ApiSettings

#: A request head (line and headers) larger than this is refused (431/400) by h11.
MAX_HEAD = 64 * 1024
#: The most connections the API keeps open at once (fewer where descriptors are scarce).
MAX_CONNECTIONS = 512
#: Connections the kernel queues before they are accepted, and asyncio accepts in one go
#: before any is looked at (uvicorn's 2048 would let a flood hold that many more for a moment).
BACKLOG = 128
_TOO_SLOW_BODY = b'{"detail":"the request body came too slowly"}'
_BUSY_BODY = b'{"detail":"too many connections: try again"}'
#: Written to a connection beyond the cap before it is closed (no request read: none needed).
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nretry-after: 1\r\nconnection: close\r\n\r\n%s"
    % (len(_BUSY_BODY), _BUSY_BODY)
)


def connection_cap() -> int:
    """How many connections the API keeps open at once: ``MAX_CONNECTIONS``, or a quarter of
    the descriptors this process may open if that is fewer (the rest stay the daemon's)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(16, min(MAX_CONNECTIONS, soft // 4))


class _Early(asyncio.Protocol):
    """What a TLS connection delivers between the end of its handshake and the moment the
    server's protocol takes it over (the client's first request can come with its Finished)."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.eof = False

    def data_received(self, data: bytes) -> None:
        self.data.append(data)

    def eof_received(self) -> None:
        self.eof = True


class _Guarded(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's head and body, a cap on the
    connections open at once, and TLS started by itself (see the module doc). ``guarded()``
    makes one per server."""

    #: Connections beyond this many open at once are answered 503 (or, TLS, just) closed.
    cap: int
    #: Where a connection refused for the cap is said, within the refusals' budget.
    spoold_logger: logging.Logger
    refusals: RefusalLog
    #: The server's side of TLS (None: plain HTTP), and how long a handshake may take.
    tls: ssl.SSLContext | None
    handshake_timeout: float

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        #: The request whose body the timer waits for (None: a head, or nothing).
        self._body_of: RequestResponseCycle | None = None
        #: The TLS handshake under way (kept: the loop holds its tasks only weakly).
        self._handshake: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self.tls is None:
            super().connection_made(transport)
            if not self._refused_for_cap(transport, _BUSY):
                self._arm()
            return
        # Counted, and its head's deadline running, from now: its handshake is part of both.
        self.connections.add(self)
        self.transport, self.client = transport, get_remote_addr(transport)
        if self._refused_for_cap(transport, b""):  # no 503 before a handshake: closed
            return
        self._arm()
        self._handshake = self.loop.create_task(self._start_tls(transport))

    def _refused_for_cap(self, transport: asyncio.Transport, answer: bytes) -> bool:
        """Close this connection if it is one more than the cap (after ``answer``)."""
        if len(self.connections) <= self.cap:
            return False
        self.connections.discard(self)  # not counted while its closing is under way
        client = self.client[0] if self.client else "?"
        self.refusals.say(self.spoold_logger, "API: %s connections open, as many as it "
                          "takes; closed one from %s", len(self.connections), client)  # fmt: skip
        if answer:
            transport.write(answer)
        transport.close()  # after the write: asyncio flushes before it closes
        return True

    async def _start_tls(self, raw: asyncio.Transport) -> None:
        """TLS on ``raw``, then HTTP on it; a handshake that fails, takes too long, or is cut
        off (the head's deadline, a shutdown) closes the connection, and says nothing (anyone
        can open one and leave: a line each would be theirs to write)."""
        assert self.tls is not None
        early = _Early()
        secure: asyncio.BaseTransport | None = None
        try:
            secure = await self.loop.start_tls(
                raw, early, self.tls, server_side=True,
                ssl_handshake_timeout=self.handshake_timeout,
                ssl_shutdown_timeout=self.handshake_timeout,
            )  # fmt: skip
        except Exception:  # noqa: S110 - the client's failure: start_tls closed it
            pass
        finally:
            # Closed already (a cancel too: a stop under way): its connection_lost went to
            # ``early`` or nowhere, never to this protocol, so it is uncounted here.
            if not isinstance(secure, asyncio.Transport) or secure.is_closing():
                self.connections.discard(self)
                self._disarm()
                raw.close()
        if not isinstance(secure, asyncio.Transport) or secure.is_closing():
            return
        # From here its connection_lost comes to this protocol: counted until then.
        secure.set_protocol(self)
        super().connection_made(secure)  # its transport, flow control and scheme: TLS's
        if early.data:
            self.data_received(b"".join(early.data))
        if early.eof:
            self.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return  # between requests: the head's deadline runs
        if not cycle.more_body:
            self._disarm()  # the whole request is in: its answer takes the time it takes
        elif self._body_of is not cycle:
            self._body_of = cycle  # its head is in: from now, its body has client_timeout
            self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # (A pipelined request may be under way already: its own deadline was set for it.)
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._timer = self.loop.call_later(self.timeout_keep_alive, self._too_slow)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _too_slow(self) -> None:
        self._timer = None
        cycle = self.cycle
        if self.transport.is_closing() or (cycle is not None and not cycle.more_body
                                           and not cycle.response_complete):  # fmt: skip
            return  # closed already, or a request wholly in and being answered
        if cycle is not None and not cycle.response_complete:
            # Its body did not come in time: 408 unless an answer began, then the route's
            # receive hears the client gone (and the app says so, spoold.face.api), and
            # whatever the route answers goes nowhere.
            if not cycle.response_started:
                cycle.scope.setdefault("state", {})[BODY_TOO_SLOW] = True
                self._answer_too_slow()
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()

    def _answer_too_slow(self) -> None:
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(_TOO_SLOW_BODY)).encode()),
                   (b"connection", b"close")]  # fmt: skip
        try:
            for event in (h11.Response(status_code=408, headers=headers, reason=b"Request Timeout"),
                          h11.Data(data=_TOO_SLOW_BODY), h11.EndOfMessage()):  # fmt: skip
                self.transport.write(self.conn.send(event) or b"")
        except h11.LocalProtocolError:  # h11 would not say it now: closing says enough
            pass


def guarded(
    logger: logging.Logger, tls: ssl.SSLContext | None = None, handshake_timeout: float = 10.0
) -> type[_Guarded]:
    """The protocol class of one server: its cap, its log, its own budget of lines, its TLS."""
    return type("Guarded", (_Guarded,),
                {"cap": connection_cap(), "spoold_logger": logger, "refusals": RefusalLog(),
                 "tls": tls, "handshake_timeout": handshake_timeout})  # fmt: skip


def tls_context(settings: ApiSettings) -> ssl.SSLContext | None:
    """The server's side of TLS for ``settings`` (None: plain HTTP), its certificate and key
    loaded; ConfigError naming ``api.certfile`` if they cannot be."""
    if settings.certfile is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(settings.certfile, settings.keyfile)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ConfigError(f"key api.certfile: cannot use it: {exc}") from None
    return context


def plain_text_warning(settings: ApiSettings) -> str | None:
    """What to say of an API served in plain HTTP on an address other than loopback (None
    for one that is not): its tokens and jobs would cross the network readable by anyone on
    the way."""
    if settings.certfile is not None or is_loopback(settings.host):
        return None
    return (
        f"the HTTP API listens on {settings.host}:{settings.port} without TLS: API tokens, "
        "job files and logs would travel in clear text; set api.certfile and api.keyfile "
        "(HTTPS), or listen on 127.0.0.1 behind a proxy that serves HTTPS"
    )


def check_api(settings: ApiSettings, logger: logging.Logger, *, bind: bool) -> None:
    """What ``ApiServer.start`` checks of ``settings`` without serving: its certificate and key
    load (ConfigError naming ``api.certfile``), and, ``bind``, its address can be listened on
    (``api.listen``). For a reload, whose file a start must take too."""
    if bind:
        _bind(settings, BACKLOG).close()
    tls_context(settings)


def _uvicorn_config(
    app: Any, settings: ApiSettings, logger: logging.Logger, tls: ssl.SSLContext | None
) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        http=guarded(logger, tls, settings.handshake_timeout),
        ws="none",
        lifespan="on",
        log_config=None,  # spoold's own log: uvicorn's loggers propagate to the root
        access_log=False,
        server_header=False,
        # X-Forwarded-For/-Proto only from the proxies named (uvicorn's default: from any
        # loopback client, and anyone on the host could forge the address the log names).
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=list(settings.trusted_proxies),
        # No limit_concurrency: the cap on connections (connection_cap) bounds the requests
        # in progress too, one per connection at a time.
        timeout_keep_alive=max(1, round(settings.client_timeout)),
        timeout_graceful_shutdown=3,
        h11_max_incomplete_event_size=MAX_HEAD,
        backlog=BACKLOG,
        # No ssl_certfile: each connection starts its TLS itself (_Guarded, the module doc).
    )


def _bind(settings: ApiSettings, backlog: int) -> socket.socket:
    """A socket listening on the address of ``settings``; ConfigError naming ``api.listen``."""
    host, port = settings.host, settings.port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY on accepted connections only for a socket
    # that says it is TCP; without it each keep-alive answer waited ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        where = f"{host}:{port}"
        raise ConfigError(f"key api.listen: cannot listen on {where}: {exc.strerror}") from None
    sock.set_inheritable(False)
    return sock


class ApiServer:
    """uvicorn serving ``app`` on the address of ``settings``, in a thread of its own."""

    def __init__(self, app: Any, settings: ApiSettings, logger: logging.Logger) -> None:
        self._app = app
        self._settings = settings
        self._logger = logger
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) listened on: the port the kernel chose for ``listen: HOST:0``."""
        assert self._socket is not None, "not started"
        host, port = self._socket.getsockname()[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        shown = f"[{host}]" if ":" in host else host
        return f"{self._settings.scheme}://{shown}:{port}"

    def start(self) -> None:
        """Bind, then serve in a thread; ConfigError naming ``api.listen`` if it cannot bind,
        ``api.certfile`` if the certificate cannot be loaded."""
        sock = _bind(self._settings, BACKLOG)
        try:
            tls = tls_context(self._settings)  # the certificate now: its error is said at start
        except ConfigError:
            sock.close()
            raise
        config = _uvicorn_config(self._app, self._settings, self._logger, tls)
        config.load()
        self._server = uvicorn.Server(config)
        self._socket = sock
        self._thread = threading.Thread(target=self._serve, name="spoold-api", daemon=True)
        self._thread.start()
        self._logger.info("HTTP API listening on %s", self.url)
        if (warning := plain_text_warning(self._settings)) is not None:
            self._logger.warning("%s", warning)

    def _serve(self) -> None:
        assert self._socket is not None and self._server is not None
        try:
            self._server.run(sockets=[self._socket])
        except Exception:  # the daemon goes on without its API; the log says why
            self._logger.exception("the HTTP API stopped")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving: open streams (log follows) are ended, then the thread joined."""
        if self._thread is None or self._server is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout)
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.close()
        self._thread = None
