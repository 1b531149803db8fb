"""The page's sessions: a token given once at the login form becomes a cookie that names the
token (its id, never its secret), until when, a random part of its own, and an HMAC over all
three with a key kept in the spool (so that a restart or another host of the spool logs no one
out). Each request checks that the token still exists: revoking a token ends its sessions at
once. The random part makes each login its own session: two logins in one second get two
cookies, and logging one out leaves the other (and a login right after a logout) alone.

The cookie is HttpOnly (no script reads it) and SameSite=Strict (no other site's page sends
it), and every form carries a CSRF token derived from the session: a POST without it is refused
even from a browser that somehow sent the cookie. The login form, before any session, carries
one too: bound to a random pre-session cookie (LOGIN_COOKIE, double submit), so that no other
site can log the operator in with a token of its own. Logging out records the session as ended
(in tokens/, until it would have expired): the cookie is refused everywhere from then on.

Over TLS both cookies are ``__Host-`` cookies (``cookie_name``): a browser keeps one only if a
secure page set it Secure, for Path=/ and without Domain, so neither a sibling subdomain nor a
plain-HTTP page of this host (another port) can set or overwrite it, and a cookie of the bare
name, which either could, is not believed over TLS. Over plain HTTP (loopback, a tunnel) they
keep their bare names, which a browser would not keep with the prefix there.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import TYPE_CHECKING

from spoold.core.tokens import Token, TokenError

if TYPE_CHECKING:
    from starlette.requests import Request

    from spoold.core.spool import Spool

COOKIE = "spoold_session"
#: The login form's pre-session cookie: a random value its CSRF field is bound to.
LOGIN_COOKIE = "spoold_login"
#: A session lasts this long (seconds) from the login.
LIFETIME = 12 * 3600
#: A login form stays usable this long (seconds) after it was shown.
LOGIN_LIFETIME = 3600
_KEY_RECORD = "session-key"
#: The random part of a cookie: 128 bits, hex.
_NONCE_BYTES = 16
#: The name prefix of the page's cookies over TLS (see the module doc).
HOST_PREFIX = "__Host-"


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


def _hex(text: str) -> bool:
    return text.isascii() and all(c in "0123456789abcdef" for c in text)


def session_cookie(spool: Spool, token: Token, *, now: float | None = None) -> str:
    """The cookie's value for a login with ``token``: new at each login (its random part)."""
    until = int((time.time() if now is None else now) + LIFETIME)
    body = f"{token.id}.{until}.{secrets.token_hex(_NONCE_BYTES)}"
    return f"{body}.{_mac(_key(spool), body)}"


def _parts(cookie: str | None) -> tuple[str, str, str, str] | None:
    """A cookie's token id, expiry, random part and MAC, if it has their shape."""
    if not cookie or cookie.count(".") != 3:
        return None
    token_id, until, nonce, mac = cookie.split(".")
    if not (_seconds(until) and _hex(nonce) and len(nonce) == 2 * _NONCE_BYTES and _hex(mac)):
        return None
    return token_id, until, nonce, mac


def session_token(spool: Spool, cookie: str | None, *, now: float | None = None) -> Token | None:
    """The token a session cookie stands for, while valid and the token exists; else None."""
    parts = _parts(cookie)
    if parts is None:
        return None
    token_id, until, nonce, mac = parts
    if not _same(mac, _mac(_key(spool), f"{token_id}.{until}.{nonce}")):
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
    parts = _parts(cookie)
    if parts is not None:
        _, until, _, mac = parts
        spool.tokens.create(_ended(mac), {"until": int(until)})


def csrf_token(spool: Spool, cookie: str) -> str:
    """The CSRF token of a session: what its forms carry, and what a POST must bring back."""
    return _mac(_key(spool), f"csrf:{cookie}")[:40]


def csrf_ok(spool: Spool, cookie: str | None, given: str | None) -> bool:
    if not cookie or not given:
        return False
    return _same(given, csrf_token(spool, cookie))


# -- the login form, before any session -------------------------------------------------------


def login_cookie(*, now: float | None = None) -> str:
    """A new pre-session cookie for the login form: until when, and a random part."""
    until = int((time.time() if now is None else now) + LOGIN_LIFETIME)
    return f"{until}.{secrets.token_hex(_NONCE_BYTES)}"


def login_csrf(spool: Spool, cookie: str) -> str:
    """The login form's CSRF field for its pre-session ``cookie`` (an HMAC: the field alone,
    or a cookie planted alone, is worth nothing)."""
    return _mac(_key(spool), f"login:{cookie}")[:40]


def login_csrf_ok(
    spool: Spool, cookie: str | None, given: str | None, *, now: float | None = None
) -> bool:
    """Whether a login POST brings back the field its own form was given, in time."""
    if not cookie or not given or cookie.count(".") != 1:
        return False
    until, nonce = cookie.split(".")
    if not _seconds(until) or not _hex(nonce):
        return False
    if int(until) < (time.time() if now is None else now):
        return False
    return _same(given, login_csrf(spool, cookie))


def flash_mac(csrf: str, text: str) -> str:
    """What vouches for a flash message the page itself put into a redirect's URL: an HMAC
    keyed with the session's CSRF token, which no other site knows. A link with a message of
    someone else's (``?done=call this number``) has none that fits, and shows nothing."""
    return hmac.new(csrf.encode(), f"flash:{text}".encode(), hashlib.sha256).hexdigest()[:32]


def flash_ok(csrf: str, text: str, mac: str | None) -> bool:
    return mac is not None and _same(mac, flash_mac(csrf, text))


# -- the cookies' names over TLS ---------------------------------------------------------------


def cookie_name(request: Request, name: str) -> str:
    """What the page's cookie ``name`` is called on ``request``: over TLS (the connection's, or
    a trusted proxy's X-Forwarded-Proto) a ``__Host-`` cookie, so that one of the bare name,
    which another could have set, is never read there (see the module doc)."""
    return f"{HOST_PREFIX}{name}" if request.url.scheme == "https" else name


def cookie_path(request: Request, path: str) -> str:
    """Where the page's cookie set for ``path`` goes on ``request``: a ``__Host-`` cookie only
    with Path=/ (a browser refuses the prefix otherwise)."""
    return "/" if request.url.scheme == "https" else path
