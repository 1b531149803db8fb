"""The web page (SPEC section 12): server-rendered pages over the same functions as the CLI and
the API, behind the same tokens.

Templates (``templates/``) only show what the routes here hand them; one small script
(``static/page.js``: the live log, confirmations) and one stylesheet, served from here: no
build step, no CDN, no inline script or style (the Content-Security-Policy forbids both).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, NamedTuple
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from spoold.core.errors import (
    InvalidJobFile,
    InvalidTransition,
    JobBusy,
    SpooldError,
)
from spoold.core.ids import RUN_ID
from spoold.core.secrets import MASK, Masker, is_secret_field
from spoold.core.spool.deliveries import is_delivery
from spoold.core.tokens import Token
from spoold.face.api.auth import Caller, context
from spoold.face.api.context import (
    ApiContext,
    absolute_url,
    client_of,
    path_of,
    public_message,
    status_of,
)
from spoold.face.page import charts
from spoold.face.page.session import (
    COOKIE,
    LIFETIME,
    LOGIN_COOKIE,
    LOGIN_LIFETIME,
    cookie_name,
    cookie_path,
    csrf_ok,
    csrf_token,
    end_session,
    flash_mac,
    flash_ok,
    login_cookie,
    login_csrf,
    login_csrf_ok,
    session_cookie,
    session_token,
)
from spoold.face.tokens import authenticate
from spoold.face.views import delivery_shown, log_piece, printable
from spoold.out.messages import receiver_hidden
from spoold.out.notices import PREFIX as NOTICE_PREFIX
from spoold.out.notices import count_outbox

HERE = Path(__file__).parent
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
#: The jobs the overview's charts are drawn from: the newest this many finished ones.
CHART_JOBS = 1000
#: The tail of a log a job's page shows at first; older parts are fetched on demand.
LOG_TAIL = 64 * 1024
#: A line whose key names a secret (quoted or not, a list item's or not), and its value: masked
#: in the job file shown (its quotes and a JSON comma kept), unless it is a ``${secret:NAME}``
#: reference or a block scalar's indicator. Values the line does not hold (flow style, JSON on
#: one line, block scalars) are found by parsing (masked_job_file).
_SECRET_VALUE = re.compile(
    r"(?im)^(?P<key>[ \t]*(?:-[ \t]+)?[\"']?[\w.-]*(?:secret|password|passwd|token|api_key|apikey)"
    r"[\w.-]*[\"']?[ \t]*:[ \t]*)(?![\"']?\$\{secret:)(?![|>][-+0-9]*[ \t]*(?:#.*)?$)"
    r"(?P<quote>[\"']?)(?P<value>\S.*?)(?P=quote)(?P<end>,?)[ \t]*$"
)
#: A value that only names a secret: shown as it is, it tells where the value comes from.
_REFERENCE = re.compile(r"\$\{secret:[^}]*\}")
#: What a browser says of a request another site's page made (Fetch Metadata): refused for a
#: form the page posts, wherever else the cookie or a token came from.
_FOREIGN = ("cross-site", "same-site")

templates = Jinja2Templates(directory=str(HERE / "templates"))
static = StaticFiles(directory=str(HERE / "static"))


class LoginNeeded(SpooldError):
    """A page asked for without a session: the login form instead."""


class Forbidden(SpooldError):
    """A change asked for without the right CSRF token or scope."""


class NotFound(SpooldError):
    """A page about something that cannot exist (a job id no job can have): 404."""


_TITLES = {403: "Not allowed", 404: "Not found", 409: "Not done", 503: "Busy, try again"}


class PageRoute(APIRoute):
    """A route of the page: spoold's errors, raised by the route or by its dependencies (a
    session, a CSRF token, a scope), become a page of their own with the right status, never
    the API's JSON (``{"detail": ...}`` shown raw in the browser)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except LoginNeeded:
                return RedirectResponse("/login", status_code=303)
            except SpooldError as exc:
                return problem(request, exc)

        return guarded


router = APIRouter(include_in_schema=False, route_class=PageRoute)


def problem(request: Request, exc: SpooldError) -> HTMLResponse:
    """The page that says why an action or a page was refused: the CLI's words without the
    server's paths, a way back, and the status the API gives for the same error."""
    # The page's own refusals, then what the API answers to the same error, in HTML.
    code = 403 if isinstance(exc, Forbidden) else 404 if isinstance(exc, NotFound) else None
    code = code or status_of(exc)
    ctx: ApiContext = request.app.state.context
    message = public_message(str(exc), ctx.spool.root)
    if code >= 500 and not isinstance(exc, JobBusy):
        # The path is the client's: escaped, as in every line of the log.
        ctx.logger.error("page: %s %s: %s", request.method, printable(path_of(request)),
                         printable(message))  # fmt: skip
    answer = templates.TemplateResponse(
        request, "problem.html",
        {"viewer": None, "flash": None, "title": _TITLES.get(code, "Not done"), "message": message,
         "back": _way_back(request.url.path)},
        status_code=code,
    )  # fmt: skip
    if isinstance(exc, JobBusy):
        answer.headers["Retry-After"] = "1"
    return answer


def _way_back(path: str) -> str:
    """Where a refused page or action leads back to: the job's page for a job's action, the
    list for a schedule's or a delivery's, else the overview."""
    parts = path.strip("/").split("/")
    if parts[0] == "jobs" and len(parts) >= 3 and RUN_ID.fullmatch(parts[1]):
        return f"/jobs/{parts[1]}"
    if parts[0] in ("jobs", "schedules", "deliveries", "rejected") and len(parts) >= 2:
        return f"/{parts[0]}"
    return "/"


class JobFile(NamedTuple):
    """The job file as a job's page shows it, secret values masked; ``note`` says why it is
    not shown as submitted, when it is not."""

    text: str
    note: str | None = None


class Viewer:
    """Who looks at the page: the token of the session, and what its forms carry."""

    def __init__(self, token: Token, cookie: str, csrf: str) -> None:
        self.token, self.cookie, self.csrf = token, cookie, csrf

    @property
    def may_control(self) -> bool:
        return self.token.allows("control")

    @property
    def caller(self) -> Caller:
        return Caller(self.token)


def session_viewer(request: Request, ctx: Annotated[ApiContext, Depends(context)]) -> Viewer:
    """The session's viewer, whatever its scopes; LoginNeeded without a valid one."""
    cookie = request.cookies.get(cookie_name(request, COOKIE))
    token = session_token(ctx.spool, cookie)
    if token is None or cookie is None:
        raise LoginNeeded("log in")
    return Viewer(token, cookie, csrf_token(ctx.spool, cookie))


def viewer(request: Request, ctx: Annotated[ApiContext, Depends(context)]) -> Viewer:
    """The viewer of a page: every page shows what the API's read endpoints do, so it needs
    what they need, the ``read`` scope (a submit- or control-only token sees no job, no log)."""
    seen = session_viewer(request, ctx)
    if not seen.token.allows("read"):
        raise Forbidden(
            f"token {seen.token.name} may not read (it has {', '.join(seen.token.scopes)}): "
            "log out, and log in with a token that has the read scope"
        )
    return seen


def not_foreign(request: Request) -> None:
    """Refuse a form posted by another site's page (``foreign``)."""
    if foreign(request):
        raise Forbidden("this form was sent by another site's page: refused")


def foreign(request: Request) -> bool:
    """Whether another site's page sent this, as the browser tells it (Sec-Fetch-Site; also
    another port of this host, which is "same-site" and gets SameSite=Strict cookies)."""
    return request.headers.get("sec-fetch-site", "").lower() in _FOREIGN


async def form(request: Request) -> dict[str, str]:
    """A posted form's fields (``application/x-www-form-urlencoded``, a few hundred bytes: the
    app's body limit bounds it); the last value of a repeated field."""
    body = await request.body()
    return {key: values[-1] for key, values in parse_qs(body.decode("utf-8", "replace")).items()}


def acting(
    request: Request,
    ctx: Annotated[ApiContext, Depends(context)],
    fields: Annotated[dict[str, str], Depends(form)],
) -> Viewer:
    """The viewer of a POST that changes something: its CSRF token and ``control`` checked."""
    seen = leaving(request, ctx, fields)
    if not seen.may_control:
        raise Forbidden(f"token {seen.token.name} may not change anything (no control scope)")
    return seen


def job_named(job_id: str) -> str:
    """The job id of a page's path; NotFound for one no job can have (the API's JobId), before
    the spool is asked (it refuses such an id as an error of its own)."""
    if RUN_ID.fullmatch(job_id) is None:
        raise NotFound(f"no job {job_id!r}")
    return job_id


#: A job id in a page's path, checked.
PageJobId = Annotated[str, Depends(job_named)]


def render(request: Request, name: str, seen: Viewer | None, **values: Any) -> HTMLResponse:
    """A page from its template, with the viewer and the flash message of the last action:
    only one this session's own redirect vouched for (see ``back``)."""
    said = request.query_params.get("done")
    vouched = request.query_params.get("mac")
    flash = said if seen is not None and said and flash_ok(seen.csrf, said, vouched) else None
    return templates.TemplateResponse(request, name, {"viewer": seen, "flash": flash, **values})


def back(path: str, said: str, seen: Viewer) -> RedirectResponse:
    """To ``path``, saying ``said`` there: with a MAC keyed by the session's CSRF token, so
    that only the page's own redirects put text into its flash message."""
    query = urlencode({"done": said, "mac": flash_mac(seen.csrf, said)})
    return RedirectResponse(f"{path}?{query}", status_code=303)


def _secure(request: Request, ctx: ApiContext) -> bool:
    """Whether the browser reaches the page over HTTPS: served so here (certfile), or as
    public_url has it (a TLS proxy in front: X-Forwarded-Proto is not believed, from any
    client); a cookie without Secure would also go out over plain HTTP."""
    api = ctx.config.api
    if request.url.scheme == "https" or (api is not None and api.certfile is not None):
        return True
    return bool(api is not None and (api.public_url or "").lower().startswith("https:"))


# -- access ---------------------------------------------------------------------------------


def _login_page(
    request: Request, ctx: ApiContext, error: str | None, status_code: int = 200
) -> HTMLResponse:
    """The login form, with a CSRF field bound to a fresh pre-session cookie (double submit:
    another site can neither read the field nor set the cookie SameSite=Strict keeps)."""
    cookie = login_cookie()
    shown = render(request, "login.html", None, error=error, csrf=login_csrf(ctx.spool, cookie))
    shown.status_code = status_code
    shown.set_cookie(
        cookie_name(request, LOGIN_COOKIE), cookie, max_age=LOGIN_LIFETIME,
        path=cookie_path(request, "/login"), httponly=True, samesite="strict",
        secure=_secure(request, ctx),
    )  # fmt: skip
    shown.headers["Cache-Control"] = "no-store"
    return shown


@router.get("/login")
def login_form(request: Request, ctx: Annotated[ApiContext, Depends(context)]) -> HTMLResponse:
    return _login_page(request, ctx, None)


@router.post("/login", response_model=None)
def login(
    request: Request,
    ctx: Annotated[ApiContext, Depends(context)],
    fields: Annotated[dict[str, str], Depends(form)],
) -> Response:
    # Not not_foreign: a refused login is the login page again, with why.
    if foreign(request) or not login_csrf_ok(ctx.spool, request.cookies.get(cookie_name(request, LOGIN_COOKIE)),
                                    fields.get("csrf")):  # fmt: skip
        # Login CSRF: another site's page logging the operator in with a token of its own,
        # to see what the operator then does, or to show them its jobs as spoold's.
        ctx.refusals.refused(ctx, request, "a login not sent by the page's own login form")
        return _login_page(request, ctx, "This login did not come from this page's own form "
                           "(sent by another site, or the form was too old): log in here.", 403)  # fmt: skip
    token = fields.get("token", "")[:200]
    found = authenticate(ctx.spool, token) if token else None
    if found is None:
        ctx.refusals.refused(ctx, request, "a login with a token that is not valid")
        return _login_page(request, ctx, "That token is not valid.", 401)
    if not found.allows("read"):
        # Every page shows what the read scope covers: a session without it would see nothing.
        ctx.logger.info("page: login of %s from %s refused: no read scope", Caller(found).who,
                        client_of(request))  # fmt: skip
        return _login_page(
            request, ctx, f"The token {found.name} has no read scope (it has "
            f"{', '.join(found.scopes)}): the page needs read. Log in with a token made with "
            "--scope read (and control, for the buttons).", 403,
        )  # fmt: skip
    # Where from: a token that leaked is seen logging in from an address it never used.
    ctx.logger.info("page: %s logged in from %s", Caller(found).who, client_of(request))
    answer = RedirectResponse("/", status_code=303)
    secure = _secure(request, ctx)
    answer.set_cookie(
        cookie_name(request, COOKIE), session_cookie(ctx.spool, found), max_age=LIFETIME,
        path="/", httponly=True, samesite="strict", secure=secure,
    )  # fmt: skip
    answer.delete_cookie(cookie_name(request, LOGIN_COOKIE), path=cookie_path(request, "/login"),
                         httponly=True, samesite="strict", secure=secure)  # fmt: skip
    return answer


def leaving(
    request: Request,
    ctx: Annotated[ApiContext, Depends(context)],
    fields: Annotated[dict[str, str], Depends(form)],
) -> Viewer:
    """The viewer of a logout: its CSRF token checked (a forged logout is a nuisance too)."""
    not_foreign(request)
    seen = session_viewer(request, ctx)
    if not csrf_ok(ctx.spool, seen.cookie, fields.get("csrf")):
        raise Forbidden("this form is stale or forged (no valid CSRF token): reload the page")
    return seen


@router.post("/logout")
def logout(
    request: Request,
    seen: Annotated[Viewer, Depends(leaving)],
    ctx: Annotated[ApiContext, Depends(context)],
) -> RedirectResponse:
    end_session(ctx.spool, seen.cookie)
    answer = RedirectResponse("/login", status_code=303)
    answer.delete_cookie(cookie_name(request, COOKIE), path="/", httponly=True,
                         samesite="strict", secure=_secure(request, ctx))  # fmt: skip
    return answer


# -- pages ----------------------------------------------------------------------------------


@router.get("/charts.css")
def chart_styles() -> Response:
    """The charts' colours, kept beside the code that draws them (charts.CHART_CSS)."""
    return Response(charts.CHART_CSS, media_type="text/css")


@router.get("/")
def overview(
    request: Request,
    seen: Annotated[Viewer, Depends(viewer)],
    ctx: Annotated[ApiContext, Depends(context)],
) -> HTMLResponse:
    from spoold.face.catalogue import JobQuery  # noqa: PLC0415
    from spoold.face.views import hosts_rows  # noqa: PLC0415

    spool, now = ctx.spool, ctx.clock.now().timestamp()
    counts = ctx.catalogue.counts()
    # The rest from the catalogue's index: summary() would count done/ again, name by name.
    counts["rejected"] = spool.count("rejected")
    running = ctx.catalogue.page(JobQuery(state="running"), limit=50).rows
    for row in running:
        row["_age"] = _since(row.get("started_at"), now)
    failures = ctx.catalogue.page(JobQuery(state="failed"), limit=10).rows
    waiting, oldest = spool.stages.waiting_incoming()
    recent = ctx.catalogue.page(JobQuery(), limit=CHART_JOBS).rows
    return render(
        request, "overview.html", seen,
        counts=counts, running=running, failures=failures, now=now,
        incoming=waiting, incoming_age=None if oldest is None else max(now - oldest, 0.0),
        outbox=count_outbox(spool.deliveries),
        given_up=[delivery_shown(spool.deliveries.read(n, "failed") or {})
                  for n in spool.deliveries.names("failed") if not n.startswith(NOTICE_PREFIX)],
        hosts=hosts_rows(spool, ctx.config),
        hourly=charts.hourly_chart(_finished(recent), now=now),
        runtime=charts.runtime_chart(_durations(recent)),
    )  # fmt: skip


@router.get("/jobs")
def jobs(
    request: Request,
    seen: Annotated[Viewer, Depends(viewer)],
    ctx: Annotated[ApiContext, Depends(context)],
) -> HTMLResponse:
    from spoold.face.catalogue import STATES, JobQuery  # noqa: PLC0415
    from spoold.face.listing import parse_labels  # noqa: PLC0415

    given = {k: v.strip() for k, v in request.query_params.items() if v.strip()}
    state = given.get("state") if given.get("state") in STATES else None
    labels = parse_labels([given["label"]]) if given.get("label") else {}
    query = JobQuery(state=state, executor=given.get("executor"), labels=labels,
                     submitter=given.get("submitter"), text=given.get("q"))  # fmt: skip
    try:
        page = ctx.catalogue.page(query, cursor=given.get("cursor"), limit=50)
    except ValueError:
        page = ctx.catalogue.page(query, limit=50)
    following = None
    if page.next_cursor:
        following = "/jobs?" + urlencode({**given, "cursor": page.next_cursor})
    return render(request, "jobs.html", seen, rows=page.rows, given=given, states=STATES,
                  following=following)  # fmt: skip


@router.get("/jobs/{job_id}")
def job(
    job_id: PageJobId,
    request: Request,
    seen: Annotated[Viewer, Depends(viewer)],
    ctx: Annotated[ApiContext, Depends(context)],
) -> HTMLResponse:
    from spoold.face.access import current_job  # noqa: PLC0415
    from spoold.face.views import job_view  # noqa: PLC0415

    where, status = current_job(ctx.spool, job_id)
    status = job_view(ctx.spool, where, status)
    log, log_start, log_end = _log_tail(ctx, where)
    steps = status.get("steps") or {}
    needs = _needs(ctx, where, status) if steps else {}
    return render(
        request, "job.html", seen,
        job_id=job_id, status=status, directory=where.directory, log=log, log_start=log_start,
        costs=_costs(status),
        log_end=log_end, graph=charts.step_graph(steps, needs) if steps
        else None, deliveries=_deliveries(ctx, job_id), job_file=_job_file(ctx, where, status),
        api=absolute_url(ctx, request, ""), live=where.directory in ("pending", "running"),
    )  # fmt: skip


def _costs(status: dict[str, Any]) -> dict[str, Any]:
    """What each attempt and each step cost, in words (``spoold status``'s): by attempt number
    and by step id."""
    from spoold.face.views import usage_text  # noqa: PLC0415

    attempts = {
        attempt.get("number"): usage_text(attempt.get("usage"))
        for attempt in status.get("attempts") or ()
    }
    steps = {
        step_id: usage_text(step.get("usage"))
        for step_id, step in (status.get("steps") or {}).items()
        if isinstance(step, dict) and step.get("usage")
    }
    return {"attempts": attempts, "steps": steps}


@router.get("/schedules")
def schedules(
    request: Request,
    seen: Annotated[Viewer, Depends(viewer)],
    ctx: Annotated[ApiContext, Depends(context)],
) -> HTMLResponse:
    from spoold.face.schedules import firings_within, schedule_rows  # noqa: PLC0415

    now = ctx.clock.now()
    rows = schedule_rows(ctx.spool, now=now)
    firings = {row["job_id"]: firings_within(ctx.spool, row["job_id"], now=now, hours=24)
               for row in rows if not row.get("paused")}  # fmt: skip
    timeline = charts.timeline_chart(firings, now=now.timestamp(), hours=24)
    return render(request, "schedules.html", seen, rows=rows, timeline=timeline)


@router.get("/rejected")
def rejected(
    request: Request,
    seen: Annotated[Viewer, Depends(viewer)],
    ctx: Annotated[ApiContext, Depends(context)],
) -> HTMLResponse:
    from spoold.face.listing import rejected_rows  # noqa: PLC0415

    return render(request, "rejected.html", seen, rows=rejected_rows(ctx.spool)[:500])


@router.get("/deliveries")
def deliveries(
    request: Request,
    seen: Annotated[Viewer, Depends(viewer)],
    ctx: Annotated[ApiContext, Depends(context)],
) -> HTMLResponse:
    records = ctx.spool.deliveries
    rows = [{"name": name, **delivery_shown(records.read(name, "failed") or {})}
            for name in records.names("failed")]  # fmt: skip
    return render(request, "deliveries.html", seen, rows=rows)


# -- actions --------------------------------------------------------------------------------


@router.post("/jobs/{job_id}/cancel")
def cancel(
    job_id: PageJobId,
    seen: Annotated[Viewer, Depends(acting)],
    ctx: Annotated[ApiContext, Depends(context)],
) -> RedirectResponse:
    from spoold.core.states import JobState  # noqa: PLC0415

    who = seen.caller.who
    outcome = ctx.cancel(job_id, who, reason=f"cancelled by {who} on the web page")
    if outcome.cancelled:
        said = f"{job_id} cancelled"
    elif outcome.state is JobState.RUNNING:
        said = f"{job_id} asked to stop: its worker ends it shortly"
    else:  # as the API's 409 says it, in a page of its own
        raise InvalidTransition(f"job {job_id} already {outcome.state.value}: nothing to cancel")
    ctx.logger.info("page: cancel of job %s asked by %s", job_id, who)
    return back(f"/jobs/{job_id}", said, seen)


@router.post("/jobs/{job_id}/retry")
def retry(
    job_id: PageJobId,
    seen: Annotated[Viewer, Depends(acting)],
    ctx: Annotated[ApiContext, Depends(context)],
) -> RedirectResponse:
    ctx.retry(job_id, seen.caller.who)
    ctx.logger.info("page: job %s retried by %s", job_id, seen.caller.who)
    return back(f"/jobs/{job_id}", f"{job_id} back in pending/: it runs again", seen)


@router.post("/schedules/{job_id}/{action}")
def schedule_action(
    job_id: PageJobId,
    action: str,
    seen: Annotated[Viewer, Depends(acting)],
    ctx: Annotated[ApiContext, Depends(context)],
) -> RedirectResponse:
    from spoold.face import schedules as acts  # noqa: PLC0415

    who, now = seen.caller.who, ctx.clock.now()
    if action == "run":
        said = f"run {acts.run_now(ctx.spool, job_id, who=who, now=now)} asked for"
    elif action == "pause":
        acts.pause(ctx.spool, job_id, who=who, now=now)
        said = f"{job_id} paused"
    elif action == "resume":
        acts.resume(ctx.spool, job_id, who=who, now=now)
        said = f"{job_id} resumed"
    else:
        raise NotFound(f"no such action on a schedule: {action!r}")
    ctx.wake()
    ctx.logger.info("page: %s of schedule %s by %s", action, job_id, who)
    return back("/schedules", said, seen)


@router.post("/deliveries/{name}/resend")
def resend(
    name: str,
    seen: Annotated[Viewer, Depends(acting)],
    ctx: Annotated[ApiContext, Depends(context)],
) -> RedirectResponse:
    if not is_delivery(name):
        raise NotFound(f"no delivery {name!r}")
    sent = ctx.spool.deliveries.resend(name, now=ctx.clock.now().timestamp())
    ctx.logger.info("page: delivery %s sent again by %s", name, seen.caller.who)
    return back(
        "/deliveries", f"{name} back in outbox/" if sent else f"{name} was not given up", seen
    )


# -- what the pages show --------------------------------------------------------------------


def _since(moment: Any, now: float) -> float | None:
    from spoold.core.clock import parse_rfc3339  # noqa: PLC0415

    try:
        return max(now - parse_rfc3339(str(moment)).timestamp(), 0.0) if moment else None
    except ValueError:
        return None


def _finished(rows: list[dict[str, Any]]) -> list[tuple[float, str]]:
    from spoold.core.clock import parse_rfc3339  # noqa: PLC0415

    found = []
    for row in rows:
        if row.get("finished_at") and row.get("state") in ("succeeded", "failed", "cancelled"):
            try:
                found.append((parse_rfc3339(str(row["finished_at"])).timestamp(), row["state"]))
            except ValueError:
                continue
    return found


def _durations(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    from spoold.core.clock import parse_rfc3339  # noqa: PLC0415

    found: dict[str, list[float]] = {}
    for row in rows:
        for attempt in row.get("attempts") or ():
            if attempt.get("started_at") and attempt.get("finished_at"):
                try:
                    took = (parse_rfc3339(attempt["finished_at"])
                            - parse_rfc3339(attempt["started_at"])).total_seconds()  # fmt: skip
                except ValueError:
                    continue
                found.setdefault(str(row.get("executor") or "?"), []).append(max(took, 0.0))
    return found


def _needs(ctx: ApiContext, where: Any, status: dict[str, Any]) -> dict[str, list[str]]:
    """What each step needs, as the job file says (status.json keeps each step's outcome)."""
    from spoold.face.views import job_document  # noqa: PLC0415

    try:
        document = job_document(ctx.spool, where, status, keys=("steps",))
    except (OSError, SpooldError, ValueError):
        return {}
    return {str(step.get("id")): [str(n) for n in step.get("needs") or ()]
            for step in document.get("steps") or () if isinstance(step, dict)}  # fmt: skip


def _log_tail(ctx: ApiContext, where: Any) -> tuple[str, int, int]:
    """The last LOG_TAIL bytes of the log from a line's start, as the API's log shows them
    (``log_piece``), and where they start and end, in bytes of the file (never from the text
    encoded again: it is not the bytes, and the live log would start after the wrong byte)."""
    try:
        with ctx.spool.jobs.read_log(where) as log:
            size = log.seek(0, 2)
            start = max(size - LOG_TAIL, 0)
            log.seek(start)
            data = log.read()
    except FileNotFoundError:
        return "", 0, 0
    if start:
        cut = data.find(b"\n") + 1
        data, start = data[cut:], start + cut
    growing = where.directory in ("pending", "running")
    text, used = log_piece(data, b"", growing=growing)
    return text, start, start + used


def _deliveries(ctx: ApiContext, job_id: str) -> list[dict[str, Any]]:
    from spoold.face.views import job_deliveries  # noqa: PLC0415

    return [{"name": name, "given_up": bool(where), **delivery_shown(record)}
            for name, where, record in job_deliveries(ctx.spool, job_id)]  # fmt: skip


def _job_file(ctx: ApiContext, where: Any, status: dict[str, Any]) -> JobFile:
    try:
        data = ctx.spool.jobs.read_job_file(where, sha256=status.get("sha256"))
    except (OSError, SpooldError):
        return JobFile("")
    return masked_job_file(data)


def masked_job_file(data: bytes) -> JobFile:
    """A job file with every secret value masked: the values of secret-named fields (as the
    parsed file has them, however the text spells them), wherever they occur, and what follows
    a secret-named key on its line.

    The text as submitted only when each such value occurs in it verbatim; else (a folded block
    scalar, an escape, a number) the parsed document, masked, and a note that says so.
    """
    from spoold.core.documents import decode_text, read_json, read_yaml  # noqa: PLC0415

    try:
        text = decode_text(data)
        try:
            document, duplicates = read_yaml(text)
        except InvalidJobFile:  # JSON that YAML 1.1 does not read (an escaped "/")
            document, duplicates = read_json(text)
    except InvalidJobFile:
        return JobFile("", "not shown: it cannot be parsed, so its secret values are not known")
    # The values as the document has them (a Masker's values() adds forms of its own, which
    # the text need not hold); a reference is not a secret: it says where the value comes from.
    values = [value for value in _secret_strings(document) if not _REFERENCE.fullmatch(value)]
    masker = Masker(values)
    hidden: set[str] = set()
    _urls_hidden(document, hidden)
    verbatim = all(value in text for value in (*values, *hidden))
    # (A key given twice keeps only its last value in the document: the first is known nowhere.)
    if verbatim and not duplicates and not _opaque_secret(document):
        masked = _SECRET_VALUE.sub(_masked_line, masker.mask_text(text))
        for url in sorted(hidden, key=len, reverse=True):  # one inside another: the whole first
            masked = masked.replace(masker.mask_text(url), _url_hidden(url))
        # What the document does not hold: a URL with a password in a comment.
        return JobFile(_USER_URL.sub(lambda found: _url_hidden(found.group()), masked))
    import yaml  # noqa: PLC0415

    parsed = _urls_hidden(masker.mask_data(document), set())
    shown = yaml.safe_dump(parsed, sort_keys=False, allow_unicode=True)
    return JobFile(shown, "shown parsed, not as submitted: a secret value in it is spelled in a "
                          "way that cannot be found in its text")  # fmt: skip


#: Where a job file sends something: every ``url`` under these keys is a receiver's, whose
#: user, password, path and query are its secrets (a chat webhook's URL is its key).
_SENDS_TO = ("callback", "notify")
#: A URL with a user (and a password) in it, wherever it stands: up to a space or a quote.
_USER_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/?#@'\"<>]*@[^\s'\"<>]*")


def _urls_hidden(data: Any, hidden: set[str], *, sends: bool = False, url: bool = False) -> Any:
    """``data`` (a parsed job file) with the URLs it sends to and every URL with a user in it
    shown as ``_url_hidden`` does, as the deliveries show them; each URL as it was added to
    ``hidden``. ``sends``: under callback or notify; ``url``: the value of a ``url`` key there.
    """
    if isinstance(data, dict):
        return {key: _urls_hidden(value, hidden, sends=sends or key in _SENDS_TO,
                                  url=(sends or key in _SENDS_TO) and key == "url")
                for key, value in data.items()}  # fmt: skip
    if isinstance(data, list):
        return [_urls_hidden(item, hidden, sends=sends) for item in data]
    if not isinstance(data, str):
        return data
    if url and data and not _REFERENCE.fullmatch(data):
        hidden.add(data)
        return _url_hidden(data)

    def one(found: re.Match[str]) -> str:
        hidden.add(found.group())
        return _url_hidden(found.group())

    return _USER_URL.sub(one, data)


def _url_hidden(url: str) -> str:
    """``http://host:port/***``; ``***`` for one that names no host."""
    return receiver_hidden(url) or MASK


def _masked_line(match: re.Match[str]) -> str:
    quote = match["quote"]
    return f"{match['key']}{quote}{MASK}{quote}{match['end']}"


def _secret_strings(data: Any, *, secret: bool = False) -> list[str]:
    """The strings of secret-named fields, at any depth (what ``Masker.collect`` masks)."""
    if isinstance(data, dict):
        return [found for key, value in data.items() for found in _secret_strings(
            value, secret=secret or (isinstance(key, str) and is_secret_field(key)))]  # fmt: skip
    if isinstance(data, list):
        return [found for item in data for found in _secret_strings(item, secret=secret)]
    return [data] if secret and isinstance(data, str) and data.strip() else []


def _opaque_secret(data: Any, *, secret: bool = False) -> bool:
    """Whether a secret-named field holds a number or a boolean, at any depth: Masker.collect
    takes strings only, and ``1e3``, ``0x1F`` or ``yes`` in the text are not its value's str."""
    if isinstance(data, dict):
        return any(
            _opaque_secret(value, secret=secret or (isinstance(key, str) and is_secret_field(key)))
            for key, value in data.items()
        )
    if isinstance(data, list):
        return any(_opaque_secret(item, secret=secret) for item in data)
    return secret and data is not None and not isinstance(data, str)


def install(app: Any, ctx: ApiContext) -> None:
    """Serve the page from ``app``: its routes (its errors are its own: PageRoute), its static
    files, its CSP."""
    app.include_router(router)
    app.mount("/static", static, name="static")

    async def policy(request: Request, call_next: Any) -> Response:
        answer: Response = await call_next(request)
        if not request.url.path.startswith("/api/"):
            answer.headers["Content-Security-Policy"] = CSP
            answer.headers["X-Content-Type-Options"] = "nosniff"
            answer.headers["Referrer-Policy"] = "same-origin"
        return answer

    app.middleware("http")(policy)
