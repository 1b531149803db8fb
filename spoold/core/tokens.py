"""API tokens: what one is, how it is made, and how a presented one is checked. Stdlib only.

A token reads ``spoold_<id>_<secret>``: the id (12 hex digits) finds its record without
comparing against every stored one, the secret (32 random bytes) is what proves it. Only the
SHA-256 of the secret is stored: a 256-bit random secret needs no slow hash (no dictionary can
guess it), and a stolen record cannot be used. The comparison is ``hmac.compare_digest``.

Scopes: ``read`` (jobs, logs, artifacts, schedules, hosts, metrics), ``submit`` (new jobs),
``control`` (cancel, retry, run now, pause, resume), ``admin`` (everything the others allow).
What a token may submit is the submitter policy's (``policy: tokens: NAME``), as for a user.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from typing import Any, NamedTuple

from spoold.core.errors import SpooldError

SCOPES = ("read", "submit", "control", "admin")
_PREFIX = "spoold_"
_ID = re.compile(r"[0-9a-f]{12}")
#: A token's name: what the policy, the logs and status.json (``submitter: token:NAME``) show.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class TokenError(SpooldError):
    """A token that cannot be made as asked (a bad name or scope), or is not known."""


class Token(NamedTuple):
    """A stored token: everything but its secret, of which only the SHA-256 is kept."""

    id: str
    name: str
    scopes: tuple[str, ...]
    secret_sha256: str
    created_at: str
    created_by: str

    def allows(self, scope: str) -> bool:
        """Whether this token may do what ``scope`` covers (``admin`` covers every scope)."""
        return scope in self.scopes or "admin" in self.scopes

    def matches(self, secret: str) -> bool:
        """Whether ``secret`` is this token's, compared in constant time."""
        presented = hashlib.sha256(secret.encode()).hexdigest()
        return hmac.compare_digest(presented, self.secret_sha256)

    def to_dict(self) -> dict[str, Any]:
        """The record as stored (and as ``spoold token list --json`` shows it)."""
        return {**self._asdict(), "scopes": list(self.scopes)}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Token:
        """A stored record; TokenError if it is not one."""
        try:
            token = cls(
                id=str(record["id"]),
                name=str(record["name"]),
                scopes=tuple(str(s) for s in record["scopes"]),
                secret_sha256=str(record["secret_sha256"]),
                created_at=str(record["created_at"]),
                created_by=str(record["created_by"]),
            )
        except (KeyError, TypeError) as exc:
            raise TokenError(f"not a token record: {exc}") from None
        if not _ID.fullmatch(token.id):
            raise TokenError(f"not a token record: id {token.id!r}")
        return token


def parse_scopes(given: Iterable[str]) -> tuple[str, ...]:
    """``read,submit`` (or several such) as scopes in SCOPES' order; TokenError naming an
    unknown one."""
    wanted = {part.strip() for item in given for part in item.split(",") if part.strip()}
    if unknown := sorted(wanted - set(SCOPES)):
        raise TokenError(f"unknown scope {', '.join(unknown)} (known: {', '.join(SCOPES)})")
    if not wanted:
        raise TokenError(f"name at least one scope ({', '.join(SCOPES)})")
    return tuple(scope for scope in SCOPES if scope in wanted)


def new_token(
    name: str, scopes: tuple[str, ...], *, created_at: str, created_by: str
) -> tuple[Token, str]:
    """A new token's record and its text, shown once (only its hash is kept)."""
    if not NAME.fullmatch(name):
        raise TokenError(
            f"token name {name!r}: 1-64 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit"
        )
    token_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    digest = hashlib.sha256(secret.encode()).hexdigest()
    record = Token(token_id, name, scopes, digest, created_at, created_by)
    return record, f"{_PREFIX}{token_id}_{secret}"


def split_token(text: str) -> tuple[str, str] | None:
    """(id, secret) of a presented token; None if it is not shaped like one."""
    if not text.startswith(_PREFIX):
        return None
    token_id, sep, secret = text[len(_PREFIX) :].partition("_")
    if not sep or not secret or not _ID.fullmatch(token_id):
        return None
    return token_id, secret
