"""The spool as a whole: /healthz (no token), /api/v1/status, /api/v1/hosts, /metrics and
/openapi.json (read scope)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from spoold.face.api.auth import AUTH_RESPONSES, Caller, context, require
from spoold.face.api.context import ApiContext

router = APIRouter()


@router.get("/healthz", tags=["system"])
def healthz(ctx: Annotated[ApiContext, Depends(context)]) -> JSONResponse:
    """Whether this API serves its spool: 200, else 503. Needs no token, tells nothing else."""
    try:
        ctx.spool.check()
    except Exception:
        return JSONResponse({"status": "unavailable"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/api/v1/status", tags=["system"], responses=AUTH_RESPONSES)
def spool_status(
    _: Annotated[Caller, Depends(require("read"))],
    ctx: Annotated[ApiContext, Depends(context)],
) -> dict[str, Any]:
    """The spool: jobs per directory, callbacks given up, the daemon (`spoold status --json`)."""
    from spoold.face.views import summary  # noqa: PLC0415

    return summary(ctx.spool, ctx.config)


@router.get("/api/v1/hosts", tags=["system"], responses=AUTH_RESPONSES)
def hosts(
    _: Annotated[Caller, Depends(require("read"))],
    ctx: Annotated[ApiContext, Depends(context)],
) -> list[dict[str, Any]]:
    """The hosts serving this spool (hosts/): alive, stale or gone as a daemon sees them,
    each with its beat and the jobs it runs."""
    from spoold.face.views import hosts_rows  # noqa: PLC0415

    return hosts_rows(ctx.spool, ctx.config)


@router.get(
    "/metrics",
    tags=["system"],
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
               **AUTH_RESPONSES},
)  # fmt: skip
def metrics(
    _: Annotated[Caller, Depends(require("read"))],
    ctx: Annotated[ApiContext, Depends(context)],
) -> Response:
    """Prometheus metrics (text exposition format)."""
    assert ctx.metrics is not None, "the daemon keeps metrics wherever it serves the API"
    body, content_type = ctx.metrics.render()
    return Response(body, media_type=content_type)


@router.get("/api/v1/schema", tags=["system"], responses=AUTH_RESPONSES)
def job_schema(_: Annotated[Caller, Depends(require("read"))]) -> dict[str, Any]:
    """The job file's JSON Schema, with every installed executor's (`spoold schema`)."""
    from spoold.intake.validation import compose_job_schema, load_base_schema  # noqa: PLC0415
    from spoold.run.registry import ExecutorRegistry  # noqa: PLC0415

    schemas = ExecutorRegistry.from_entry_points().schemas()
    return compose_job_schema(load_base_schema(), schemas)


@router.get("/openapi.json", tags=["system"], include_in_schema=False)
def openapi(request: Request, _: Annotated[Caller, Depends(require("read"))]) -> JSONResponse:
    """This API's OpenAPI description."""
    return JSONResponse(request.app.openapi())
