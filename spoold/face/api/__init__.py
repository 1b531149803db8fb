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
from fastapi.responses import JSONResponse
from starlette.routing import Match

from spoold.core.errors import (
    InvalidTransition,
    JobBusy,
    JobNotFound,
    SpooldError,
    SpoolError,
)
from spoold.face.access import NotAllowed
from spoold.face.api.context import ApiContext

__all__ = ["ApiContext", "build_app"]

#: How often remembered Idempotency-Keys past their day are removed.
_EXPIRE_EVERY = 3600.0


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
    _errors(app, ctx)
    from spoold.face import page  # noqa: PLC0415 - the web page, behind the same tokens

    page.install(app, ctx)
    return app


def _errors(app: FastAPI, ctx: ApiContext) -> None:
    """spoold's own errors as HTTP answers: the message is the CLI's."""
    statuses: list[tuple[type[Exception], int]] = [
        (JobNotFound, 404), (NotAllowed, 403), (InvalidTransition, 409),
        (SpoolError, 503), (SpooldError, 409),
    ]  # fmt: skip

    def status_of(exc: Exception) -> int:
        return next(code for kind, code in statuses if isinstance(exc, kind))

    async def spoold_error(request: Request, exc: Exception) -> JSONResponse:
        code = status_of(exc)
        busy = isinstance(exc, JobBusy)  # decided within moments: not the server's failure
        if code >= 500 and not busy:
            ctx.logger.error("API: %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": str(exc)}, status_code=code,
                            headers={"Retry-After": "1"} if busy else None)  # fmt: skip

    app.add_exception_handler(SpooldError, spoold_error)

    async def not_allowed(request: Request, exc: Exception) -> JSONResponse:
        """405 with every method the path has (Starlette names only its first route's)."""
        methods = set()
        for route in app.routes:
            match, _ = route.matches({**request.scope, "method": "GET"})
            if match is not Match.NONE:
                methods |= set(getattr(route, "methods", None) or ())
        allow = ", ".join(sorted(methods - {"HEAD"}))
        return JSONResponse({"detail": "Method Not Allowed"}, status_code=405,
                            headers={"Allow": allow})  # fmt: skip

    app.add_exception_handler(405, not_allowed)


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
