"""/api/v1/jobs: submit, list, look at, cancel and retry jobs; their artifacts.

One representation: a job is its status.json, as ``spoold status ID --json`` prints it; a list
of jobs holds the same objects. Submitting validates as ``spoold validate`` does (the same
Admission, with the token's policy) and places the job as intake does.
"""

from __future__ import annotations

import asyncio
import hashlib
import mimetypes
import os
import threading
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from spoold.core.errors import JobBusy, JobNotFound
from spoold.core.ids import RUN_ID
from spoold.face.access import current_status, locate
from spoold.face.api.auth import JOB_RESPONSES, Caller, context, require
from spoold.face.api.context import ApiContext, absolute_url
from spoold.face.views import shown_status

router = APIRouter(prefix="/api/v1", tags=["jobs"], responses=JOB_RESPONSES)

#: A job's id, or a schedule's run (``<id>@<UTC time>``): spoold.core.ids' RUN_ID.
JobId = Annotated[str, Path(pattern=RUN_ID.pattern, description="a job id")]
#: Jobs listed at most per page.
MAX_PAGE = 500
#: An Idempotency-Key is remembered this long.
IDEMPOTENCY_TTL = 24 * 3600.0

_JOB_FILE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "A job file, as dropped into incoming/ (SPEC section 2).",
        "content": {
            "application/yaml": {"schema": {"type": "string"}},
            "application/json": {"schema": {"type": "object"}},
        },
    }
}
_PROBLEM = {"content": {"application/json": {"schema": {"type": "object"}}}}


def job_url(request: Request, ctx: ApiContext, job_id: str) -> str:
    """The job's URL, as clients reach it (``api.public_url``, else as the request came)."""
    return absolute_url(ctx, request, f"/api/v1/jobs/{job_id}")


@router.post(
    "/jobs",
    status_code=201,
    openapi_extra=_JOB_FILE_BODY,
    responses={
        200: {"description": "a replay of an earlier POST with the same Idempotency-Key"},
        408: {"description": "the body came too slowly"},
        409: {"description": "a job with that job_id exists", **_PROBLEM},
        410: {"description": "the job of an earlier POST with its Idempotency-Key is gone"},
        413: {"description": "larger than limits.max_file_size"},
        422: {"description": "the job file is refused: errors with line, column, path", **_PROBLEM},
    },
)
async def submit_job(
    request: Request,
    response: Response,
    caller: Annotated[Caller, Depends(require("submit"))],
    ctx: Annotated[ApiContext, Depends(context)],
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255)] = None,
) -> dict[str, Any]:
    """Validate a job file as `spoold validate` does and place it as `spoold submit` does.

    Answers 201 with the job (status.json) and its URL in Location. With an Idempotency-Key, a
    POST repeated with the same body answers the job the first one made (200), never a second.
    """
    try:
        async with asyncio.timeout(ctx.config.api.client_timeout if ctx.config.api else 30.0):
            data = await request.body()
    except TimeoutError:
        # Said as the server says the 408 it answers itself, whichever of the two came first.
        ctx.refusals.refused(ctx, request, "its body did not come within client_timeout (408)")
        raise HTTPException(status_code=408, detail="the request body came too slowly") from None
    if len(data) > ctx.config.max_file_size:  # the app's own limit says 413 before this
        raise HTTPException(status_code=413, detail="larger than limits.max_file_size")
    return await run_in_threadpool(_submit, request, response, ctx, caller, data, idempotency_key)


def _submit(
    request: Request,
    response: Response,
    ctx: ApiContext,
    caller: Caller,
    data: bytes,
    key: str | None,
) -> dict[str, Any]:
    from spoold.intake.admission import Refused  # noqa: PLC0415

    name = f"api-{caller.token.name}.yaml"
    try:
        if key is None:
            job_id = ctx.submit(data, name, caller.submitter, None, dry_run=False)
        else:
            job_id = _submit_once(request, response, ctx, caller, data, key, name)
            if response.status_code == 200:  # a replay: the job of the first POST
                return current_status(ctx.spool, job_id)
    except Refused as refused:
        raise HTTPException(
            status_code=409 if refused.code == "duplicate" else 422,
            detail={"message": refused.reason, "code": refused.code,
                    "errors": [issue.to_dict() for issue in refused.issues]},
        ) from None  # fmt: skip
    ctx.logger.info("API: job %s submitted by %s", job_id, caller.who)
    response.headers["Location"] = job_url(request, ctx, job_id)
    return current_status(ctx.spool, job_id)


def _submit_once(
    request: Request,
    response: Response,
    ctx: ApiContext,
    caller: Caller,
    data: bytes,
    key: str,
    name: str,
) -> str:
    """Place the job of a POST with an Idempotency-Key, once for every POST with that key (and
    that token); the job id, with the response marked 200 for a replay.

    The key's record names the job before it is placed: a crash between the two leaves a record
    whose job is nowhere, and the next POST with the key places it under that id. POSTs racing
    with one key wait for each other in this process; across hosts, the job's id settles it
    (one placement of an id wins), and a record is marked once its job is placed, so that a job
    removed since (``spoold purge``, retention) is not placed again.
    """
    digest = hashlib.sha256(f"{caller.token.id}\0{key}".encode()).hexdigest()[:40]
    body_sha = hashlib.sha256(data).hexdigest()
    keys = ctx.spool.idempotency
    with _KEY_LOCKS[int(digest[:8], 16) % len(_KEY_LOCKS)]:
        for _ in range(2):
            record = keys.read(digest)
            if record is None:
                job_id = ctx.submit(data, name, caller.submitter, None, dry_run=True)
                record = {"job_id": job_id, "body_sha256": body_sha, "token": caller.token.id}
                if not keys.create(digest, record):
                    continue  # another host's POST with this key recorded its job first
                try:
                    placed = _place_as(ctx, caller, data, name, job_id, body_sha)
                except BaseException:
                    keys.remove(digest)  # not placed: the key is free again
                    raise
            elif record.get("body_sha256") != body_sha:
                raise HTTPException(
                    status_code=422,
                    detail={"message": "this Idempotency-Key was used with another body",
                            "code": "idempotency_key_reused", "errors": []},
                )  # fmt: skip
            else:
                job_id = str(record.get("job_id"))
                if ctx.spool.jobs.find(job_id) is not None:
                    placed = False
                elif record.get("placed"):
                    raise HTTPException(
                        status_code=410,
                        detail={"message": f"the job this Idempotency-Key made, {job_id}, was "
                                           "removed; it is not placed again",
                                "code": "idempotent_job_removed", "errors": []},
                    )  # fmt: skip
                else:  # its POST died before placing it, or is placing it on another host
                    placed = _place_as(ctx, caller, data, name, job_id, body_sha)
            if placed:
                keys.replace(digest, {**record, "placed": True})
                return job_id
            response.status_code = 200
            response.headers["Location"] = job_url(request, ctx, job_id)
            response.headers["Idempotent-Replayed"] = "true"
            return job_id
    raise HTTPException(status_code=503, detail="Idempotency-Key: try again")


#: POSTs with one Idempotency-Key take turns (by a digest's stripe: bounded, never freed).
_KEY_LOCKS = tuple(threading.Lock() for _ in range(64))


def _place_as(
    ctx: ApiContext, caller: Caller, data: bytes, name: str, job_id: str, body_sha: str
) -> bool:
    """Place the job under ``job_id``; False if a POST with the same key placed it first
    (the same body, the same submitter), as one on another host may.

    While that POST is placing it (the id held, no job yet: JobBusy), waits a moment for it,
    at most ``BUSY_WAIT``: its caller then hears of the one job, not of a change under way.
    """
    from spoold.intake.admission import Refused  # noqa: PLC0415

    end = ctx.clock.monotonic() + BUSY_WAIT
    while True:
        try:
            ctx.submit(data, name, caller.submitter, job_id, dry_run=False)
        except JobBusy:
            if ctx.clock.monotonic() >= end:
                raise
            time.sleep(0.02)  # a pause, not a reading of time: the clock says when to stop
            continue
        except Refused as refused:
            if refused.code != "duplicate":
                raise
            try:
                there = current_status(ctx.spool, job_id)
            except JobNotFound:
                raise refused from None
            if there.get("sha256") != body_sha or there.get("submitter") != caller.submitter.name:
                raise
            return False
        return True


#: How long a POST with an Idempotency-Key waits for another placing its job (JobBusy).
BUSY_WAIT = 2.0


@router.get("/jobs", responses={400: {"description": "a cursor this API did not give"}})
def list_jobs(
    request: Request,
    response: Response,
    _: Annotated[Caller, Depends(require("read"))],
    ctx: Annotated[ApiContext, Depends(context)],
    state: Literal["pending", "running", "succeeded", "failed", "cancelled", "scheduled"]
    | None = None,
    executor: Annotated[str | None, Query(max_length=100)] = None,
    label: Annotated[list[str], Query(description="KEY or KEY=VALUE; repeat for several")] = [],  # noqa: B006 - FastAPI copies it
    submitter: Annotated[str | None, Query(max_length=200)] = None,
    q: Annotated[str | None, Query(max_length=200, description="part of the job id")] = None,
    cursor: Annotated[str | None, Query(max_length=1000)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> dict[str, Any]:
    """Jobs, newest first (by submission), as `spoold list --json` shows them; paged by the
    opaque `next_cursor` of the previous page (also in a `Link: rel="next"` header)."""
    from spoold.face.catalogue import JobQuery  # noqa: PLC0415
    from spoold.face.listing import parse_labels  # noqa: PLC0415

    query = JobQuery(state=state, executor=executor, labels=parse_labels(label),
                     submitter=submitter, text=q)  # fmt: skip
    try:
        page = ctx.catalogue.page(query, cursor=cursor, limit=limit)
    except ValueError:
        raise HTTPException(status_code=400, detail="cursor: not one this API gave") from None
    if page.next_cursor:
        # This request's own query with the next cursor, under public_url as Location is.
        params = request.url.include_query_params(cursor=page.next_cursor).query
        following = absolute_url(ctx, request, "/api/v1/jobs", params)
        response.headers["Link"] = f'<{following}>; rel="next"'
    return {"jobs": page.rows, "next_cursor": page.next_cursor}


@router.get("/jobs/{job_id}")
def get_job(
    job_id: JobId,
    _: Annotated[Caller, Depends(require("read"))],
    ctx: Annotated[ApiContext, Depends(context)],
) -> dict[str, Any]:
    """The job's status.json, as `spoold status ID --json` prints it (its steps listed from
    its file, `pending`, until its attempt's steps start)."""
    return shown_status(ctx.spool, job_id)


@router.post("/jobs/{job_id}/cancel", responses={202: {"description": "asked of its worker"},
             409: {"description": "already ended", **_PROBLEM}})  # fmt: skip
def cancel_job(
    job_id: JobId,
    caller: Annotated[Caller, Depends(require("control"))],
    ctx: Annotated[ApiContext, Depends(context)],
) -> JSONResponse:
    """Cancel a pending job (200: it ended cancelled) or ask a running job's worker to stop it
    (202: it ends cancelled shortly; follow the job)."""
    from spoold.core.states import JobState  # noqa: PLC0415

    locate(ctx.spool, job_id)
    outcome = ctx.cancel(job_id, caller.who, reason=f"cancelled by {caller.who}")
    body = {"job_id": job_id, "state": outcome.state.value}
    if outcome.cancelled:
        ctx.logger.info("API: job %s cancelled by %s", job_id, caller.who)
        return JSONResponse({**body, "cancelled": True})
    if outcome.state is JobState.RUNNING:
        ctx.logger.info("API: cancel of job %s asked by %s", job_id, caller.who)
        return JSONResponse({**body, "cancelled": False, "requested": True}, status_code=202)
    raise HTTPException(status_code=409, detail=f"job {job_id} already {outcome.state.value}")


@router.post("/jobs/{job_id}/retry", responses={409: {"description": "not failed or cancelled"}})
def retry_job(
    job_id: JobId,
    caller: Annotated[Caller, Depends(require("control"))],
    ctx: Annotated[ApiContext, Depends(context)],
) -> dict[str, Any]:
    """Run a failed or cancelled job again, as a new attempt: back in pending/."""
    locate(ctx.spool, job_id)
    recorded = ctx.retry(job_id, caller.who)
    ctx.logger.info("API: job %s retried by %s", job_id, caller.who)
    return recorded


@router.get("/jobs/{job_id}/artifacts")
def list_artifacts(
    job_id: JobId,
    _: Annotated[Caller, Depends(require("read"))],
    ctx: Annotated[ApiContext, Depends(context)],
) -> list[dict[str, Any]]:
    """The job's artifacts: path, size, sha256."""
    status = current_status(ctx.spool, job_id)
    return list(status.get("artifacts") or [])


def attachment(name: str) -> str:
    """Content-Disposition for a download named ``name`` (RFC 6266): ``filename`` alone for a
    plain name; else an ASCII stand-in there and the name itself in ``filename*`` (RFC 8187:
    UTF-8, percent-encoded), which browsers prefer. Never a byte a header may not carry."""
    import unicodedata  # noqa: PLC0415 - only for a download's name
    from urllib.parse import quote  # noqa: PLC0415

    letters = "".join(
        c for c in unicodedata.normalize("NFKD", name) if not unicodedata.combining(c)
    )
    # Printable ASCII only; no '"' or '\\' (quoting) nor '%' (some browsers decode it).
    stand_in = "".join(c if " " <= c <= "~" and c not in '"\\%' else "_" for c in letters)
    if stand_in == name:
        return f'attachment; filename="{name}"'
    encoded = quote(name, safe="!#$&+-.^_`|~", errors="replace")  # RFC 8187's attr-char
    return f"attachment; filename=\"{stand_in}\"; filename*=UTF-8''{encoded}"


@router.get(
    # anypath (spoold.face.api's): a name of any characters, a newline too, as the job wrote it
    "/jobs/{job_id}/artifacts/{path:anypath}",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def get_artifact(
    job_id: JobId,
    path: str,
    _: Annotated[Caller, Depends(require("read"))],
    ctx: Annotated[ApiContext, Depends(context)],
) -> StreamingResponse:
    """One artifact's bytes. Only the paths the job's status lists, read from its artifacts/
    and nothing outside it (no `..`, no links)."""
    listed = {str(a.get("path")) for a in current_status(ctx.spool, job_id).get("artifacts") or ()}
    job = locate(ctx.spool, job_id)
    if path not in listed:
        raise HTTPException(status_code=404, detail=f"job {job_id} has no artifact {path!r}")
    try:
        handle = ctx.spool.jobs.open_artifact(job, path)
    except FileNotFoundError:
        raise HTTPException(status_code=404, detail=f"artifact {path!r} is gone") from None
    kind = mimetypes.guess_type(path)[0] or "application/octet-stream"
    headers = {"Content-Disposition": attachment(path.rsplit("/", 1)[-1]),
               "X-Content-Type-Options": "nosniff"}  # fmt: skip
    headers["Content-Length"] = str(os.fstat(handle.fileno()).st_size)

    def chunks() -> Any:
        with handle:
            while chunk := handle.read(1 << 16):
                yield chunk

    return StreamingResponse(chunks(), media_type=kind, headers=headers)


@router.get("/rejected", tags=["jobs"])
def list_rejected(
    _: Annotated[Caller, Depends(require("read"))],
    ctx: Annotated[ApiContext, Depends(context)],
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> list[dict[str, Any]]:
    """Files in rejected/ with their reason (line, column, path), newest first."""
    from spoold.face.listing import rejected_rows  # noqa: PLC0415

    return rejected_rows(ctx.spool)[:limit]
