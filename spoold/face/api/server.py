"""The API's server: uvicorn, in a thread of the daemon's main process, on a socket bound before
the thread starts (so that a port in use stops the daemon with a clear message).

In the daemon's process, not one of its own: the counters of /metrics are kept where the
changes of state are seen, and the API reads the same spool with no second copy of anything.
uvicorn on asyncio with h11 (no uvloop, no httptools): nothing to compile, and an API that
answers in milliseconds does not need more.

Slow clients: uvicorn closes a keep-alive connection idle for ``timeout_keep_alive``, but any
byte received restarts that wait, and a fresh connection that sends nothing has none. So each
connection here must deliver a complete request head within ``client_timeout`` of being made
(or of its last response), however it trickles; the body's own time is bounded where it is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from typing import TYPE_CHECKING, Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from spoold.core.errors import ConfigError

if TYPE_CHECKING:
    from spoold.core.config import ApiSettings

#: A request head (line and headers) larger than this is refused (431/400) by h11.
MAX_HEAD = 64 * 1024


class _Guarded(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's head (see the module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # a request is under way: its head arrived

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.timeout_keep_alive, self._too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _too_slow(self) -> None:
        self._head_timer = None
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()


class ApiServer:
    """uvicorn serving ``app`` on the address of ``settings``, in a thread of its own."""

    def __init__(self, app: Any, settings: ApiSettings, logger: logging.Logger) -> None:
        self._settings = settings
        self._logger = logger
        self._config = uvicorn.Config(
            app,
            http=_Guarded,
            ws="none",
            lifespan="on",
            log_config=None,  # spoold's own log: uvicorn's loggers propagate to the root
            access_log=False,
            server_header=False,
            timeout_keep_alive=max(1, round(settings.client_timeout)),
            timeout_graceful_shutdown=3,
            h11_max_incomplete_event_size=MAX_HEAD,
            ssl_certfile=str(settings.certfile) if settings.certfile else None,
            ssl_keyfile=str(settings.keyfile) if settings.keyfile else None,
        )
        self._server = uvicorn.Server(self._config)
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
        host, port = self._settings.host, self._settings.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY on accepted connections only for a socket
        # that says it is TCP; without it each keep-alive answer waited ~40 ms for a delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(self._config.backlog)
        except OSError as exc:
            sock.close()
            where = f"{host}:{port}"
            raise ConfigError(f"key api.listen: cannot listen on {where}: {exc.strerror}") from None
        sock.set_inheritable(False)
        if self._settings.certfile:
            try:
                self._config.load()  # loads the certificate now: its error is said at start
            except (OSError, ValueError) as exc:
                sock.close()
                raise ConfigError(f"key api.certfile: cannot use it: {exc}") from None
        self._socket = sock
        self._thread = threading.Thread(target=self._serve, name="spoold-api", daemon=True)
        self._thread.start()
        self._logger.info("HTTP API listening on %s", self.url)

    def _serve(self) -> None:
        assert self._socket is not None
        try:
            self._server.run(sockets=[self._socket])
        except Exception:  # the daemon goes on without its API; the log says why
            self._logger.exception("the HTTP API stopped")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving: open streams (log follows) are ended, then the thread joined."""
        if self._thread is None:
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
