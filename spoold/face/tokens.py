"""API tokens, as ``spoold token create|list|revoke`` and the HTTP API see them: made, listed,
revoked and checked through the spool's ``tokens`` store (spoold.core.spool.records)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from spoold.core.tokens import Token, TokenError, new_token, split_token

if TYPE_CHECKING:
    from datetime import datetime

    from spoold.core.spool import Spool


def create_token(
    spool: Spool, name: str, scopes: tuple[str, ...], *, who: str, now: datetime
) -> tuple[Token, str]:
    """A new token, stored hashed; returns its record and its text (shown once, never kept)."""
    from spoold.core.clock import rfc3339  # noqa: PLC0415

    while True:
        token, text = new_token(name, scopes, created_at=rfc3339(now), created_by=who)
        if spool.tokens.create(token.id, token.to_dict()):
            return token, text
        # 48 random bits met an existing id: draw again.


def list_tokens(spool: Spool) -> list[Token]:
    """Every token, oldest first; records that are not tokens are left out."""
    tokens = []
    for _, record in spool.tokens.items():
        try:
            tokens.append(Token.from_dict(record))
        except TokenError:
            continue
    return sorted(tokens, key=lambda t: (t.created_at, t.id))


def revoke_tokens(spool: Spool, which: str) -> list[Token]:
    """Revoke the token with this id, or every token with this name; TokenError if none."""
    chosen = [t for t in list_tokens(spool) if which in (t.id, t.name)]
    if not chosen:
        raise TokenError(f"no token with id or name {which!r} (spoold token list shows them)")
    for token in chosen:
        spool.tokens.remove(token.id)
    return chosen


def authenticate(spool: Spool, presented: str) -> Token | None:
    """The token ``presented`` is, or None: unknown, revoked, or the wrong secret.

    One small read per request: a revoked token is refused at once, on every host.
    """
    parts = split_token(presented.strip())
    if parts is None:
        return None
    token_id, secret = parts
    record = spool.tokens.read(token_id)
    if record is None:
        return None
    try:
        token = Token.from_dict(record)
    except TokenError:
        return None
    return token if token.id == token_id and token.matches(secret) else None
