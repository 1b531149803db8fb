"""/api/v1/schedules: the schedules with their next firings; run one now, pause, resume.

Each action is a request the daemon's scheduler acts on at once (it is woken), as the CLI's
``spoold schedule run|pause|resume`` are: the spool stays the one record.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from spoold.face.api.auth import JOB_RESPONSES, Caller, context, require
from spoold.face.api.context import ApiContext
from spoold.face.api.jobs import JobId

router = APIRouter(prefix="/api/v1", tags=["schedules"], responses=JOB_RESPONSES)


@router.get("/schedules")
def list_schedules(
    _: Annotated[Caller, Depends(require("read"))],
    ctx: Annotated[ApiContext, Depends(context)],
) -> list[dict[str, Any]]:
    """Every schedule: its status (as `spoold status ID --json`), `paused`, its next firings,
    its last runs and notes on catch-up and skips; soonest firing first."""
    from spoold.face.schedules import schedule_rows  # noqa: PLC0415

    return schedule_rows(ctx.spool, now=ctx.clock.now())


@router.post("/schedules/{job_id}/run", status_code=202)
def run_schedule_now(
    job_id: JobId,
    caller: Annotated[Caller, Depends(require("control"))],
    ctx: Annotated[ApiContext, Depends(context)],
) -> dict[str, Any]:
    """Make one run of the schedule now (as a firing would, its overlap rule applied)."""
    from spoold.face.schedules import run_now  # noqa: PLC0415

    run = run_now(ctx.spool, job_id, who=caller.who, now=ctx.clock.now())
    return _asked(ctx, caller, job_id, "a run now", {"job_id": job_id, "run_id": run})


@router.post("/schedules/{job_id}/pause")
def pause_schedule(
    job_id: JobId,
    caller: Annotated[Caller, Depends(require("control"))],
    ctx: Annotated[ApiContext, Depends(context)],
) -> dict[str, Any]:
    """Stop the schedule's firings until it is resumed (those missed meanwhile are skipped)."""
    from spoold.face.schedules import pause  # noqa: PLC0415

    return _asked(ctx, caller, job_id, "a pause",
                  pause(ctx.spool, job_id, who=caller.who, now=ctx.clock.now()))  # fmt: skip


@router.post("/schedules/{job_id}/resume")
def resume_schedule(
    job_id: JobId,
    caller: Annotated[Caller, Depends(require("control"))],
    ctx: Annotated[ApiContext, Depends(context)],
) -> dict[str, Any]:
    """Fire the schedule again from its next firing on."""
    from spoold.face.schedules import resume  # noqa: PLC0415

    return _asked(ctx, caller, job_id, "a resume",
                  resume(ctx.spool, job_id, who=caller.who, now=ctx.clock.now()))  # fmt: skip


def _asked(
    ctx: ApiContext, caller: Caller, job_id: str, what: str, answer: dict[str, Any]
) -> dict[str, Any]:
    """The daemon woken to act on the request now (its scheduler syncs), and the log told."""
    ctx.wake()
    ctx.logger.info("API: %s of schedule %s asked by %s", what, job_id, caller.who)
    return answer
