"""Who is asking: the token of a request (``Authorization: Bearer``, or ``X-Api-Key`` for
proxies that strip Authorization), and whether its scopes cover what it asks.

A request without a valid token gets 401 and nothing else (no hint whether the token was
unknown, revoked or mistyped); the refusal is logged with the client's address. A valid token
without the scope gets 403 naming the scope.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, NamedTuple

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from spoold.core.policy import Submitter
from spoold.core.tokens import Token
from spoold.face.api.context import ApiContext
from spoold.face.tokens import authenticate

_bearer = HTTPBearer(auto_error=False, description="spoold token create --name NAME --scope ...")
_api_key = APIKeyHeader(name="X-Api-Key", auto_error=False, description="the same token")
UNAUTHORIZED = HTTPException(
    status_code=401, detail="unauthorized", headers={"WWW-Authenticate": 'Bearer realm="spoold"'}
)


_PROBLEM: dict[str, Any] = {
    "content": {"application/json": {"schema": {"type": "object", "properties": {
        "detail": {}}}}}
}  # fmt: skip
#: What every route behind a token may answer besides its own: for the OpenAPI description.
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "no valid token", **_PROBLEM},
    403: {"description": "the token lacks the scope", **_PROBLEM},
}
#: What a route about one job may answer besides.
JOB_RESPONSES: dict[int | str, dict[str, Any]] = {
    **AUTH_RESPONSES,
    404: {"description": "no such job", **_PROBLEM},
}


class Caller(NamedTuple):
    """The token a request came with, and the submitter it is to the policy."""

    token: Token

    @property
    def submitter(self) -> Submitter:
        return Submitter.of_token(self.token.name)

    @property
    def who(self) -> str:
        """For the log and status.json: ``token ci (3f2a...)``."""
        return f"token {self.token.name} ({self.token.id})"


def context(request: Request) -> ApiContext:
    """The ApiContext of the app serving ``request``."""
    found: ApiContext = request.app.state.context
    return found


def _token_of(ctx: ApiContext, request: Request, presented: str | None) -> Token | None:
    """The valid token of ``request``: the one ``presented``, or for the page's own reads
    (GET, HEAD, nothing presented) its session's; None if there is none (now)."""
    token = authenticate(ctx.spool, presented) if presented else None
    if token is None and not presented and request.method in ("GET", "HEAD"):
        # The web page's own reads (its live log's EventSource cannot send a header); a
        # change through the API always needs the token itself (no CSRF for the API).
        from spoold.face.page.session import COOKIE, cookie_name, session_token  # noqa: PLC0415

        token = session_token(ctx.spool, request.cookies.get(cookie_name(request, COOKIE)))
    return token


def require(scope: str) -> Callable[..., Awaitable[Caller]]:
    """A dependency: the Caller, if its token is valid and has ``scope``."""

    async def caller(
        request: Request,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
        api_key: Annotated[str | None, Security(_api_key)],
        ctx: Annotated[ApiContext, Depends(context)],
    ) -> Caller:
        presented = bearer.credentials if bearer is not None else api_key
        token = _token_of(ctx, request, presented)
        if token is None:
            ctx.refusals.refused(
                ctx, request, "a token that is not valid" if presented else "no token"
            )
            raise UNAUTHORIZED
        if not token.allows(scope):
            raise HTTPException(
                status_code=403,
                detail=f"token {token.name} lacks the {scope} scope (it has "
                f"{', '.join(token.scopes)})",
            )
        return Caller(token)

    caller.__name__ = f"require_{scope}"
    return caller


async def still_allowed(ctx: ApiContext, request: Request, scope: str) -> bool:
    """Whether ``request`` would still be let in for ``scope``: its token not revoked, its page
    session not ended or expired. For an answer that goes on (a followed log), asked again
    while it does: a token is checked once per request, and a stream is one request."""
    bearer = await _bearer(request)
    presented = bearer.credentials if bearer is not None else await _api_key(request)
    token = await asyncio.to_thread(_token_of, ctx, request, presented)  # reads tokens/
    return token is not None and token.allows(scope)
