"""The page's sessions: a token given once at the login form becomes a cookie that names the
token (its id, never its secret), until when, and an HMAC over both with a key kept in the
spool (so that a restart or another host of the spool logs no one out). Each request checks
that the token still exists: revoking a token ends its sessions at once.

The cookie is HttpOnly (no script reads it) and SameSite=Strict (no other site's page sends
it), and every form carries a CSRF token derived from the session: a POST without it is refused
even from a browser that somehow sent the cookie. Logging out records the session as ended
(in tokens/, until it would have expired): the cookie is refused everywhere from then on.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import TYPE_CHECKING

from spoold.core.tokens import Token, TokenError

if TYPE_CHECKING:
    from spoold.core.spool import Spool

COOKIE = "spoold_session"
#: A session lasts this long (seconds) from the login.
LIFETIME = 12 * 3600
_KEY_RECORD = "session-key"


def _key(spool: Spool) -> bytes:
    """The spool's session key, made on first use (in tokens/, beside what it vouches for)."""
    for _ in range(2):
        record = spool.tokens.read(_KEY_RECORD)
        if record is not None and isinstance(record.get("key"), str):
            return bytes.fromhex(record["key"])
        spool.tokens.create(_KEY_RECORD, {"key": secrets.token_hex(32)})
    raise TokenError("no session key can be kept in the spool's tokens/")


def _mac(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def _same(given: str, expected: str) -> bool:
    """Whether ``given`` (from a request: any characters) is ``expected``, in constant time;
    compare_digest raises TypeError for a str that is not ASCII."""
    return given.isascii() and hmac.compare_digest(given, expected)


def _seconds(text: str) -> bool:
    """Whether ``text`` is a time as a cookie says it: ASCII digits only ('²'.isdigit() too)."""
    return text.isascii() and text.isdecimal()


def session_cookie(spool: Spool, token: Token, *, now: float | None = None) -> str:
    """The cookie's value for a login with ``token``."""
    until = int((time.time() if now is None else now) + LIFETIME)
    body = f"{token.id}.{until}"
    return f"{body}.{_mac(_key(spool), body)}"


def session_token(spool: Spool, cookie: str | None, *, now: float | None = None) -> Token | None:
    """The token a session cookie stands for, while valid and the token exists; else None."""
    if not cookie or cookie.count(".") != 2:
        return None
    token_id, until, mac = cookie.split(".")
    body = f"{token_id}.{until}"
    if not _seconds(until) or not _same(mac, _mac(_key(spool), body)):
        return None
    moment = time.time() if now is None else now
    if int(until) < moment or spool.tokens.read(_ended(mac)) is not None:
        return None
    record = spool.tokens.read(token_id) if token_id.isascii() and token_id.isalnum() else None
    if record is None:
        return None
    try:
        return Token.from_dict(record)
    except TokenError:
        return None


def _ended(mac: str) -> str:
    return f"ended-{mac[:32]}"


def end_session(spool: Spool, cookie: str, *, now: float | None = None) -> None:
    """Log out: the session's cookie is refused from now on, wherever it is kept (a record in
    tokens/ until the cookie would have expired anyway; those past it are removed here)."""
    moment = time.time() if now is None else now
    for key, record in spool.tokens.items():
        if key.startswith("ended-") and float(record.get("until") or 0) < moment:
            spool.tokens.remove(key)
    if cookie.count(".") == 2:
        _, until, mac = cookie.split(".")
        if _seconds(until) and mac.isascii() and mac.isalnum():
            spool.tokens.create(_ended(mac), {"until": int(until)})


def csrf_token(spool: Spool, cookie: str) -> str:
    """The CSRF token of a session: what its forms carry, and what a POST must bring back."""
    return _mac(_key(spool), f"csrf:{cookie}")[:40]


def csrf_ok(spool: Spool, cookie: str | None, given: str | None) -> bool:
    if not cookie or not given:
        return False
    return _same(given, csrf_token(spool, cookie))
