"""What the API's routes work with: the spool, and the functions that change it, handed over
by the composition root (the routes build nothing themselves)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pathlib import Path

    from fastapi import Request

    from spoold.core.clock import Clock
    from spoold.core.config import Config
    from spoold.core.policy import Submitter
    from spoold.core.spool import Spool
    from spoold.face.catalogue import Catalogue
    from spoold.face.metrics import Metrics
    from spoold.out.outbox import Callbacks
    from spoold.run.control import CancelOutcome, JobControl
    from spoold.run.ledger import Listener


class Submit(Protocol):
    """Admit a job file as intake does and place it in pending/ (or scheduled/); return the job
    id. ``job_id``: the id for a file that names none. ``dry_run``: admit only. Refused (with
    its issues; code ``duplicate`` for a taken job id) if it is not admitted."""

    def __call__(
        self, data: bytes, name: str, submitter: Submitter, job_id: str | None, *, dry_run: bool
    ) -> str: ...


#: Set in a request's ASGI scope by the server when its body did not come within
#: ``client_timeout``: the server answered 408 itself, and the app's read of the body then
#: finds the client gone (spoold.face.api.server).
BODY_TOO_SLOW = "spoold.body_too_slow"


class RefusalLog:
    """Logs refused requests, at most ``burst`` lines a minute: someone guessing tokens must not
    fill the log; the lines held back are counted in the next one.

    What a client chose (its path, its method) is escaped as spoold's own log escapes a file
    name (``printable``): an unauthenticated client must not write terminal escapes, or lines
    of its own, into the operator's log."""

    def __init__(self, burst: int = 20, per: float = 60.0) -> None:
        self._burst, self._per = burst, per
        self._window = float("-inf")
        self._said = self._held = 0
        self._lock = threading.Lock()

    def refused(self, ctx: ApiContext, request: Request, why: str) -> None:
        self.say(ctx.logger, "API: refused %s %s from %s: %s",
                 request.method, path_of(request), client_of(request), why)  # fmt: skip

    def say(self, logger: logging.Logger, message: str, *args: object) -> None:
        """A warning ``message % args`` (each argument escaped), within the budget."""
        from spoold.face.views import printable  # noqa: PLC0415 - views imports much

        now = time.monotonic()
        with self._lock:
            if now - self._window >= self._per:
                held, self._held = self._held, 0
                self._window, self._said = now, 0
                if held:
                    logger.warning("API: %d more request(s) refused without a line", held)
            if self._said >= self._burst:
                self._held += 1
                return
            self._said += 1
        logger.warning(message, *(printable(arg) for arg in args))


def path_of(request: Request) -> str:
    """The path as the client sent it, percent-decoded (``request.url.path`` drops the tabs
    and newlines in it, as urllib's parsing does: a log line must show them, escaped)."""
    return str(request.scope.get("path") or request.url.path)


def client_of(request: Request) -> str:
    """The client's address: the connection's, or from a peer in ``api.trusted_proxies``, the
    one its X-Forwarded-For names (uvicorn's ProxyHeadersMiddleware, spoold.face.api.server);
    never a header's word for it from any other peer."""
    return request.client.host if request.client else "?"


def status_of(exc: Exception) -> int:
    """The HTTP status of one of spoold's errors, as the API and the page answer it."""
    from spoold.core.errors import (  # noqa: PLC0415 - the faces' own, imported with them
        InvalidTransition,
        JobNotFound,
        SpooldError,
        SpoolError,
    )
    from spoold.face.access import NotAllowed  # noqa: PLC0415

    statuses: tuple[tuple[type[Exception], int], ...] = (
        (JobNotFound, 404), (NotAllowed, 403), (InvalidTransition, 409),
        (SpoolError, 503), (SpooldError, 409),
    )  # fmt: skip
    return next(code for kind, code in statuses if isinstance(exc, kind))


def public_message(message: str, spool: Path) -> str:
    """An error's message for a remote caller: the CLI's words without the server's paths.
    "no job 'x' in /var/lib/spoold" says "no job 'x'" (the caller knows which spool it asks);
    a path within the spool is said from its root ("the spool/running/...")."""
    return message.replace(f" in {spool}", "").replace(str(spool), "the spool")


def absolute_url(ctx: ApiContext, request: Request, path: str, query: str = "") -> str:
    """``path`` (of this app, from its root) as clients reach it: under ``api.public_url`` when
    set (a proxy in front), else on the scheme and host the request came with."""
    api = ctx.config.api
    base = api.public_url if api is not None and api.public_url else None
    base = base or str(request.base_url).rstrip("/")
    return f"{base}{path}" + (f"?{query}" if query else "")


@dataclass
class ApiContext:
    """The parts the API reads and acts through."""

    config: Config
    spool: Spool
    clock: Clock
    logger: logging.Logger
    submit: Submit
    #: Tells the daemon to look now (a retried job, a schedule's request): its SIGUSR1.
    wake: Callable[[], None]
    catalogue: Catalogue
    metrics: Metrics | None = None
    callbacks: Callbacks | None = None
    #: Told of the changes the API's cancels and retries make (the metrics, the catalogue).
    listeners: tuple[Listener, ...] = ()
    version: str = ""
    #: Set when the server stops: open log streams end.
    stopping: threading.Event = field(default_factory=threading.Event)
    #: Requests refused for want of a token, as the log tells them.
    refusals: RefusalLog = field(default_factory=RefusalLog)

    def control(self, who: str) -> JobControl:
        """Cancel and retry, as ``spoold cancel`` and ``retry`` do them, on behalf of ``who``."""
        from spoold.run.control import JobControl  # noqa: PLC0415

        return JobControl(
            self.spool, self.clock, who=who, callbacks=self.callbacks, listeners=self.listeners
        )

    def cancel(self, job_id: str, who: str, reason: str) -> CancelOutcome:
        """Cancel as ``spoold cancel`` does, for the API and the page alike."""
        outcome = self.control(who).cancel(job_id, reason=reason)
        self.catalogue.forget(job_id)
        return outcome

    def retry(self, job_id: str, who: str) -> dict[str, Any]:
        """Retry as ``spoold retry`` does, and wake the daemon to run it now; the status the
        retry recorded."""
        retried = self.control(who).retry(job_id)
        self.catalogue.forget(job_id)  # no change the listeners count: it is told here
        self.wake()
        return retried.status.to_dict()
