"""API tokens: made, kept hashed, checked in constant time, revoked; and the records' store."""

from __future__ import annotations

import json
import os
import pwd
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from spoold.core.policy import Policy, Rules, Submitter
from spoold.core.spool import Spool
from spoold.core.tokens import SCOPES, TokenError, parse_scopes, split_token
from spoold.face.tokens import authenticate, create_token, list_tokens, revoke_tokens

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def test_a_token_is_kept_hashed_and_checked(spool_dir: Path) -> None:
    spool = Spool(spool_dir)
    token, text = create_token(spool, "ci", ("read", "submit"), who="root on h", now=NOW)
    split = split_token(text)
    assert split is not None and text.startswith(f"spoold_{token.id}_")
    secret = split[1]  # may hold "_" itself (urlsafe base64): not the text after the last one
    stored = (spool_dir / "tokens" / f"{token.id}.json").read_text()
    assert secret not in stored  # only the digest
    assert json.loads(stored)["secret_sha256"] == token.secret_sha256
    assert stat.S_IMODE((spool_dir / "tokens").stat().st_mode) == 0o700
    assert stat.S_IMODE((spool_dir / "tokens" / f"{token.id}.json").stat().st_mode) == 0o600
    assert authenticate(spool, text) == token
    assert authenticate(spool, f"  {text}\n") == token
    for wrong in (text[:-1] + ("A" if text[-1] != "A" else "B"), text + "x", "spoold_", "",
                  f"spoold_{token.id}", f"spoold_{'0' * 12}_{secret}",
                  f"spoold_../../etc_{secret}"):  # fmt: skip
        assert authenticate(spool, wrong) is None, wrong
    assert token.allows("read") and token.allows("submit") and not token.allows("control")


def test_admin_covers_every_scope_and_scopes_are_checked() -> None:
    assert parse_scopes(["submit,read", "read"]) == ("read", "submit")
    assert parse_scopes(["admin"]) == ("admin",)
    with pytest.raises(TokenError, match="unknown scope write"):
        parse_scopes(["read,write"])
    with pytest.raises(TokenError, match="name at least one scope"):
        parse_scopes([" , "])
    assert set(SCOPES) == {"read", "submit", "control", "admin"}


def test_tokens_are_listed_and_revoked_by_id_or_name(spool_dir: Path) -> None:
    spool = Spool(spool_dir)
    first, text = create_token(spool, "ci", ("read",), who="a", now=NOW)
    second, _ = create_token(spool, "ci", ("read",), who="b", now=NOW)
    other, other_text = create_token(spool, "ops", ("admin",), who="c", now=NOW)
    assert {t.id for t in list_tokens(spool)} == {first.id, second.id, other.id}
    assert revoke_tokens(spool, first.id) == [first]
    assert authenticate(spool, text) is None
    assert [t.id for t in revoke_tokens(spool, "ci")] == [second.id]
    with pytest.raises(TokenError, match="no token with id or name 'ci'"):
        revoke_tokens(spool, "ci")
    assert authenticate(spool, other_text) == other
    (spool_dir / "tokens" / "junk.json").write_text("{}")  # not a token: left out
    assert list_tokens(spool) == [other]
    with pytest.raises(TokenError, match="token name"):
        create_token(spool, "no spaces", ("read",), who="a", now=NOW)


def test_a_record_root_makes_is_the_spool_owners(spool_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root, as CI runs")
    owner = pwd.getpwnam("spoold-job")
    os.chown(spool_dir, owner.pw_uid, owner.pw_gid)
    spool = Spool(spool_dir)
    token, _ = create_token(spool, "ci", ("read",), who="root", now=NOW)
    for path in (spool_dir / "tokens", spool_dir / "tokens" / f"{token.id}.json"):
        assert (path.stat().st_uid, path.stat().st_gid) == (owner.pw_uid, owner.pw_gid)


def test_the_policy_limits_a_token_by_its_name() -> None:
    policy = Policy.from_document({
        "tokens": {"ci": {"executors": ["local"]}},
        "users": {"token:ci": {"executors": ["*"]}},  # a user named like it gains nothing
        "default": {"executors": ["docker"]},
    })  # fmt: skip
    assert policy.rules_of(Submitter.of_token("ci")) == Rules(executors=("local",))
    assert policy.rules_of(Submitter.of_token("other")) == Rules(executors=("docker",))
    assert Submitter.of_token("ci").status_fields() == {"submitter": "token:ci",
                                                        "submitter_uid": None}  # fmt: skip
    assert not Submitter.of_token("root").unlimited


def test_an_idempotency_record_is_made_once(spool_dir: Path) -> None:
    keys = Spool(spool_dir).idempotency
    assert keys.read("abc") is None
    assert keys.create("abc", {"job_id": "one"})
    assert not keys.create("abc", {"job_id": "two"})
    assert keys.read("abc") == {"job_id": "one"}
    assert not [n for n in os.listdir(spool_dir / "idempotency") if n.endswith(".tmp")]
    with pytest.raises(ValueError, match="not a record key"):
        keys.read("../tokens/x")
    os.utime(spool_dir / "idempotency" / "abc.json", (0, 0))
    assert keys.expire(older_than=1000.0) == 1
    assert keys.read("abc") is None
