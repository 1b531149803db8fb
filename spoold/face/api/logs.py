"""/api/v1/jobs/{id}/log: a page of a job's log, or the log followed while the job runs.

Offsets are bytes. A page (``?offset=&limit=``) says where the next starts
(``X-Log-Next-Offset``) and how long the log is now (``X-Log-Size``); an offset past the end
reads from the end, and one no file can reach is refused (422), as a ``limit`` out of bounds
is. ``?follow=1`` streams from ``offset`` (or the ``Last-Event-ID``: ASCII digits) until the
job ends: as Server-Sent Events when the client accepts ``text/event-stream`` (each event a run
of whole lines, its ``id`` the byte offset after them, so that a reconnecting EventSource's
``Last-Event-ID`` resumes exactly there; an ``end`` event carries the outcome), else as plain
chunked text (curl). The log file stays open across the job's moves between directories.

What a job wrote is its submitter's, and reaches terminals (``curl ... ?follow=1``): as text,
a log is escaped as ``spoold logs`` shows it (``LogText``: control characters but newlines and
tabs, a byte that is not UTF-8, a backslash), a page ending before a character's last byte
(the next starts with it). ``?raw=1`` gives the bytes as stored, as a download.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import IO, Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse
from fastapi.sse import KEEPALIVE_COMMENT, EventSourceResponse, format_sse_event

from spoold.core.errors import SpooldError
from spoold.core.spool import JobDir
from spoold.face.access import locate
from spoold.face.api.auth import JOB_RESPONSES, Caller, context, require, still_allowed
from spoold.face.api.context import ApiContext
from spoold.face.api.jobs import JobId, attachment
from spoold.face.views import LogText, log_piece

router = APIRouter(prefix="/api/v1", tags=["logs"], responses=JOB_RESPONSES)

#: How often a followed log is looked at when nothing new came.
POLL = 0.2
#: A job not found for this long (between two directories takes microseconds) ended the stream.
GONE_AFTER = 5.0
#: How often a followed log asks again whether its token (or page session) is still valid.
RECHECK = 1.0
#: SSE: a comment this often keeps proxies from closing an idle stream.
KEEPALIVE = 15.0
#: At most this much is read, and sent, at once.
CHUNK = 64 * 1024
#: The largest offset asked for: the largest a file offset (off_t) can hold.
MAX_OFFSET = 2**63 - 1
#: A Last-Event-ID this API gives: an offset in ASCII digits (str.isdigit takes '²' too).
EVENT_ID = r"^[0-9]{1,19}$"
_ENDED = ("done", "failed", "scheduled")


def _open_log(ctx: ApiContext, job_id: str) -> tuple[JobDir, IO[bytes]]:
    job = locate(ctx.spool, job_id)
    try:
        return job, ctx.spool.jobs.read_log(job)
    except FileNotFoundError:
        raise HTTPException(status_code=404, detail=f"job {job_id} has no log yet") from None


@router.get(
    "/jobs/{job_id}/log",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}},
                                 "text/event-stream": {"schema": {"type": "string"}},
                                 "application/octet-stream": {}}}},
)  # fmt: skip
async def get_log(
    job_id: JobId,
    request: Request,
    caller: Annotated[Caller, Depends(require("read"))],
    ctx: Annotated[ApiContext, Depends(context)],
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=16 * 1024 * 1024)] = 1024 * 1024,
    follow: bool = False,
    raw: bool = False,
    last_event_id: Annotated[str | None, Header(max_length=19, pattern=EVENT_ID)] = None,
) -> Response:
    """A page of the log (`offset`, `limit` in bytes; past the end: from the end), or with
    `follow=1` the log streamed until the job ends (`text/event-stream` if accepted, else
    chunked text), from `offset` or the `Last-Event-ID` an EventSource resumes with. As text,
    control characters are escaped as `spoold logs` shows them; `raw=1`: the bytes as stored
    (`application/octet-stream`, as a download)."""
    job, log = _open_log(ctx, job_id)
    if follow and last_event_id is not None:
        offset = int(last_event_id)
    # Never seek past the end: the OS refuses offsets its file system cannot hold (EINVAL).
    offset = min(offset, log.seek(0, 2))
    headers = {"X-Content-Type-Options": "nosniff"}
    if raw:
        headers["Content-Disposition"] = attachment(f"{job_id}.log")
    if not follow:
        with log:
            log.seek(offset)
            data = log.read(limit)
            following = b"" if raw else log.read(3)  # the rest of a character cut at the end
            size = log.seek(0, 2)
        if raw:
            body: bytes | str = data
            used = len(data)
        else:
            body, used = log_piece(data, following, growing=job.directory not in _ENDED)
        headers |= {"X-Log-Offset": str(offset), "X-Log-Next-Offset": str(offset + used),
                    "X-Log-Size": str(size), "X-Job-Directory": job.directory}  # fmt: skip
        return Response(body, media_type=_RAW if raw else _TEXT, headers=headers)
    log.seek(offset)
    follower = _Following(ctx, request, job_id, caller)
    if raw:
        return StreamingResponse(_raw(follower, log), media_type=_RAW, headers=headers)
    if "text/event-stream" in request.headers.get("accept", ""):
        return EventSourceResponse(_events(follower, log, offset))
    return StreamingResponse(_text(follower, log), media_type=_TEXT, headers=headers)


_TEXT = "text/plain; charset=utf-8"
_RAW = "application/octet-stream"


class _Following:
    """Who follows which job's log, and whether they still may: asked every ``RECHECK``
    seconds, so that a token revoked (or a page session ended) ends its streams too."""

    def __init__(self, ctx: ApiContext, request: Request, job_id: str, caller: Caller) -> None:
        self.ctx, self.request, self.job_id, self.caller = ctx, request, job_id, caller
        self._asked = time.monotonic()

    async def may_go_on(self) -> bool:
        if time.monotonic() - self._asked < RECHECK:
            return True
        self._asked = time.monotonic()
        if await still_allowed(self.ctx, self.request, "read"):
            return True
        self.ctx.logger.info("API: log stream of job %s ended: %s is no longer valid",
                             self.job_id, self.caller.who)  # fmt: skip
        return False


async def _raw(following: _Following, log: IO[bytes]) -> AsyncIterator[bytes]:
    with log:
        async for chunk, _ended in _follow(following, log):
            if chunk:
                yield chunk


async def _text(following: _Following, log: IO[bytes]) -> AsyncIterator[bytes]:
    shown = LogText()
    with log:
        async for chunk, ended in _follow(following, log):
            if text := shown.text(chunk, final=ended is not None):
                yield text.encode("utf-8")


async def _events(following: _Following, log: IO[bytes], offset: int) -> AsyncIterator[bytes]:
    """SSE: whole lines only (a line still being written waits for its end, or the job's)."""
    held = b""
    shown = LogText()
    quiet_since = time.monotonic()
    yield format_sse_event(retry=2000, comment="spoold log stream")
    with log:
        async for chunk, ended in _follow(following, log):
            held += chunk
            cut = len(held) if ended or len(held) >= CHUNK else held.rfind(b"\n") + 1
            if cut > 0 or ended is not None:
                lines, held = held[:cut], held[cut:]
                offset += len(lines)
                if text := shown.text(lines, final=ended is not None):
                    # A long line cut at CHUNK may end inside a character: the event's id is
                    # where that character starts, which the next event begins with.
                    yield format_sse_event(data_str=text.removesuffix("\n"),
                                           id=str(offset - shown.held))  # fmt: skip
                    quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= KEEPALIVE:
                yield KEEPALIVE_COMMENT
                quiet_since = time.monotonic()
            if ended is not None:
                yield format_sse_event(event="end", data_str=json.dumps(ended), id=str(offset))


async def _follow(
    following: _Following, log: IO[bytes]
) -> AsyncIterator[tuple[bytes, dict[str, Any] | None]]:
    """(new bytes, None) while the job runs; (the rest, its outcome) once it ended. Stops
    early when the client goes, the server stops, or the caller's token or session is no
    longer valid (no outcome then: a client that reconnects hears 401)."""
    ctx, request, job_id = following.ctx, following.request, following.job_id
    missing_since: float | None = None
    while True:
        if not await following.may_go_on():  # asked between chunks too: a log may never pause
            return
        chunk = log.read(CHUNK)
        if chunk:
            yield chunk, None
            continue
        if ctx.stopping.is_set() or await request.is_disconnected():
            return
        where = ctx.spool.jobs.find(job_id)
        if where is None:  # between two directories, or purged
            missing_since = missing_since or time.monotonic()
            if time.monotonic() - missing_since > GONE_AFTER:
                yield b"", {"state": "gone"}
                return
        elif where.directory in _ENDED:
            yield log.read(), _outcome(ctx, where)
            return
        else:
            missing_since = None
        yield b"", None
        await asyncio.sleep(POLL)


def _outcome(ctx: ApiContext, job: JobDir) -> dict[str, Any]:
    try:
        status = ctx.spool.jobs.read_status(job)
    except (OSError, SpooldError, ValueError):
        return {"state": job.directory}
    return {key: status.get(key) for key in ("state", "exit_code", "error", "finished_at")}
