"""The HTTP API (SPEC section 10): a thin face over the same functions as the CLI.

Routers per resource (``jobs``, ``logs``, ``schedules``, ``system``), a dependency for the token
(``auth``), the server in the daemon's process (``server``). FastAPI describes it at
/openapi.json (behind a token, like everything but /healthz); no docs page is served, since
Swagger UI would come from a CDN.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import iter_route_contexts
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.datastructures import MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from spoold.core.errors import JobBusy, SpooldError
from spoold.face.api.context import (
    BODY_TOO_SLOW,
    ApiContext,
    client_of,
    path_of,
    public_message,
    status_of,
)
from spoold.face.views import printable

__all__ = ["ApiContext", "build_app"]

#: How often remembered Idempotency-Keys past their day are removed.
_EXPIRE_EVERY = 3600.0


class AnyPath(PathConvertor):
    """A path parameter of any characters, a newline too (``{path:anypath}``): an artifact's
    name is whatever its job wrote, and Starlette's ``path`` (``.*``) stops at a newline."""

    regex = r"[\s\S]*"


# Registered here, where the routers' package is imported, before any of them makes a route.
register_url_convertor("anypath", AnyPath())


def build_app(ctx: ApiContext) -> FastAPI:
    """The API's ASGI app over ``ctx``."""
    from spoold.face.api import jobs, logs, schedules, system  # noqa: PLC0415

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        expiry = asyncio.create_task(_expire_keys(ctx))
        try:
            yield
        finally:
            ctx.stopping.set()
            expiry.cancel()
            await asyncio.to_thread(ctx.catalogue.close)  # its snapshot, for the next start

    app = FastAPI(
        title="spoold",
        version=ctx.version,
        description="Crash-safe spool job runner: jobs, logs, artifacts, schedules.",
        openapi_url=None,  # served by system.openapi, behind a token
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        max_body_size=ctx.config.max_file_size,
    )
    app.state.context = ctx
    for router in (jobs.router, logs.router, schedules.router, system.router):
        app.include_router(router)
    app.add_middleware(HeadAsGet)
    app.add_middleware(NoStore)
    _errors(app, ctx)
    from spoold.face import page  # noqa: PLC0415 - the web page, behind the same tokens

    page.install(app, ctx)
    return app


class HeadAsGet:
    """HEAD answered as the GET of the same URL, without its body (RFC 9110 9.3.2): FastAPI's
    routes take only the methods they name, where Starlette's add HEAD to each GET."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        ended = False

        async def head_only(message: Message) -> None:
            # The first part of a body ends the answer: a followed log or a large artifact is
            # neither read nor waited for (the server answers the route's receive as gone).
            nonlocal ended
            if ended:
                return
            if message["type"] == "http.response.body":
                ended = True
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, head_only)


class NoStore:
    """``Cache-Control: no-store`` on every answer but the page's static files: what a token or
    a session shows (jobs, logs, artifacts, the pages) must not be kept by a browser's or a
    proxy's cache for the next user of either; refusals and the login form with the rest."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(CACHEABLE):
            await self.app(scope, receive, send)
            return

        async def no_store(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["Cache-Control"] = "no-store"
            await send(message)

        await self.app(scope, receive, no_store)


#: The paths of the page's own files, the same for everyone: a cache may keep them.
CACHEABLE = ("/static/", "/charts.css")


def allowed_methods(app: FastAPI, scope: Scope) -> set[str]:
    """The methods some route of ``app`` takes at the path of ``scope``, HEAD with each GET.

    Through FastAPI's route contexts: the routes of an included router sit in ``app.routes``
    behind one entry that has no methods of its own.
    """
    methods: set[str] = set()
    for route in iter_route_contexts(app.routes):
        match, _ = route.matches({**scope, "method": "GET"})
        if match is not Match.NONE:
            methods |= set(route.methods or ())
    return methods | ({"HEAD"} if "GET" in methods else set())


def _errors(app: FastAPI, ctx: ApiContext) -> None:
    """spoold's own errors as HTTP answers: the message is the CLI's, without server paths."""

    async def spoold_error(request: Request, exc: Exception) -> JSONResponse:
        code = status_of(exc)
        busy = isinstance(exc, JobBusy)  # decided within moments: not the server's failure
        if code >= 500 and not busy:
            # The path is the client's, the message may hold it: escaped, as in every line.
            ctx.logger.error("API: %s %s: %s", request.method, printable(path_of(request)),
                             printable(exc))  # fmt: skip
        detail = public_message(str(exc), ctx.spool.root)
        return JSONResponse({"detail": detail}, status_code=code,
                            headers={"Retry-After": "1"} if busy else None)  # fmt: skip

    app.add_exception_handler(SpooldError, spoold_error)

    async def not_allowed(request: Request, exc: Exception) -> JSONResponse:
        """405 with every method the path has (Starlette names only its first route's; a
        mount, /static/, names its own)."""
        named = (getattr(exc, "headers", None) or {}).get("Allow", "")
        methods = allowed_methods(app, request.scope) | {m.strip() for m in named.split(",")}
        allow = ", ".join(sorted(methods - {""}))
        return JSONResponse({"detail": "Method Not Allowed"}, status_code=405,
                            headers={"Allow": allow})  # fmt: skip

    app.add_exception_handler(405, not_allowed)

    async def client_gone(request: Request, exc: Exception) -> Response:
        """A client that left before its whole body came, or whose body the server cut off at
        ``client_timeout`` (it answered 408 itself, spoold.face.api.server): one short line
        within the refusals' budget, not a traceback of something no one can act on (a client
        leaving at will could otherwise fill the log)."""
        if request.scope.get("state", {}).get(BODY_TOO_SLOW):
            ctx.refusals.refused(ctx, request, "its body did not come within client_timeout (408)")
        else:
            ctx.refusals.say(ctx.logger, "API: %s %s from %s: the client left before its whole "
                             "body came", request.method, path_of(request), client_of(request))  # fmt: skip
        return Response(status_code=400)  # sent nowhere: the connection is gone

    app.add_exception_handler(ClientDisconnect, client_gone)


async def _expire_keys(ctx: ApiContext) -> None:
    from spoold.face.api.jobs import IDEMPOTENCY_TTL  # noqa: PLC0415

    while True:
        try:
            await asyncio.to_thread(
                ctx.spool.idempotency.expire, ctx.clock.now().timestamp() - IDEMPOTENCY_TTL
            )
        except Exception:  # a duty's failure never stops the API
            ctx.logger.exception("API: expiring Idempotency-Keys failed")
        await asyncio.sleep(_EXPIRE_EVERY)
