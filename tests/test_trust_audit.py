"""Trust and access, as a mutation audit found them untested: a submitter's supplementary groups
count in the policy; a group named like its owner but shared with others is not theirs alone; an
ssh ``known_hosts`` is a host path too; a token is its own subject, whatever user shares its
name; an Idempotency-Key never answers another submitter's job; refused requests are logged at
most 20 lines a minute, the rest counted; a refusal quotes no hidden value as ``repr`` spells it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from spoold.core.policy import Policy, Rules, Submitter
from spoold.core.spool import Spool
from spoold.core.tokens import Token
from spoold.face.api.auth import Caller
from spoold.face.api.context import RefusalLog
from spoold.face.api.jobs import _place_as
from spoold.intake.admission import Refused
from spoold.intake.policy_check import policy_problems
from spoold.intake.redaction import HIDDEN, Redaction
from tests.fakes import FakeClock
from tests.test_cli_access import Users, users  # noqa: F401 - the fixture: real users, made here
from tests.test_cli_status import make_job
from tests.test_policy import dropped_by, make_intake, refusal, status_of

# Skipped only outside CI: CI runs as root, where these must run (and fail if they cannot).
needs_root = pytest.mark.skipif(
    os.environ.get("CI") != "true"
    and (os.geteuid() != 0 or not all(map(shutil.which, ("useradd", "usermod", "gpasswd")))),
    reason="needs root, useradd, usermod and gpasswd to try it with real users and groups",
)

LOCAL = "executor: local\nproduct: {commands: 'true'}\n"


# -- who the submitter is, and what their policy gives them ---------------------------------------


@needs_root
def test_a_submitters_supplementary_groups_give_their_rules(
    tmp_path: Path,
    users: Users,  # noqa: F811 - the fixture
) -> None:
    """README: the union of the rules of their user and of each of their groups (as this host's
    user database has them): the submit group is a supplementary group, not the primary one."""
    policy = {
        "groups": {users.group: {"executors": ["local"], "secrets": ["SHARED_*"]}},
        "default": {"executors": ["docker"]},
    }
    submitter = Submitter.named(users.submitter)
    assert users.group in submitter.groups()[1:], "a supplementary group, after the primary one"
    assert Policy.from_document(policy).rules_of(submitter) == Rules(
        executors=("local",), secrets=("SHARED_*",)
    )
    spool, intake = make_intake(tmp_path, policy)
    assert submitter.uid is not None and submitter.gid is not None
    text = "executor: local\nproduct: {commands: 'echo ${secret:SHARED_KEY}'}\n"
    accepted = dropped_by(intake, spool, "g.yaml", text, submitter.uid, submitter.gid)
    assert status_of(accepted)["submitter"] == users.submitter
    # The outsider is in no group the policy names: the default, which has no local.
    outsider = Submitter.named(users.outsider)
    assert outsider.uid is not None and outsider.gid is not None
    [(_, _, message)] = refusal(
        dropped_by(intake, spool, "o.yaml", LOCAL, outsider.uid, outsider.gid)
    )
    assert message.endswith(f"gives {users.outsider} the executors: docker)"), message


@needs_root
def test_a_group_named_like_its_owner_but_shared_is_not_theirs_alone(
    tmp_path: Path,
    users: Users,  # noqa: F811 - the fixture
) -> None:
    """A user private group is fine while it is the owner's alone; once another user is a member
    of it, a file it may write could hold that member's words under the owner's name."""
    spool, intake = make_intake(tmp_path, {"default": {"executors": ["local"]}})
    owner = Submitter.named(users.submitter)
    assert owner.uid is not None and owner.gid is not None
    own = dropped_by(intake, spool, "own.yaml", LOCAL, owner.uid, owner.gid, mode=0o664)
    assert status_of(own)["submitter"] == users.submitter
    # useradd -U made a group named like the user: another member makes it shared.
    subprocess.run(["usermod", "-aG", users.submitter, users.outsider], check=True)
    try:
        shared = dropped_by(intake, spool, "shared.yaml", LOCAL, owner.uid, owner.gid, mode=0o664)
    finally:  # else userdel keeps the group, which then has a member
        subprocess.run(["gpasswd", "-d", users.outsider, users.submitter], check=True,
                       capture_output=True)  # fmt: skip
    [(path, _, message)] = refusal(shared)
    assert path == ""
    expected = f"the file is writable by its group {users.submitter} (mode 0664)"
    assert message.startswith(expected), message


def test_an_ssh_known_hosts_outside_the_host_paths_is_refused(tmp_path: Path) -> None:
    """ssh writes known_hosts as spoold's user wherever it points (README: an ssh `keyfile` or
    `known_hosts` is a path of this host the policy must allow)."""
    rules = Rules(executors=("ssh",), host_paths=(f"{tmp_path}/ssh/*",))
    submitter = Submitter("alice", 4242)
    product = {"host": "127.0.0.1", "commands": "true", "keyfile": f"{tmp_path}/ssh/key"}

    def job(**more: str) -> dict[str, Any]:
        return {"executor": "ssh", "product": {**product, **more}}

    assert policy_problems(job(), submitter, rules) == []
    [(message, where, _)] = policy_problems(
        job(known_hosts="/root/.ssh/authorized_keys"), submitter, rules
    )
    assert where == ("product", "known_hosts")
    assert message.startswith(
        "submitter alice may not use the host path '/root/.ssh/authorized_keys': it is not among "
        "their host paths"
    ), message
    assert policy_problems(job(known_hosts=f"{tmp_path}/ssh/known_hosts"), submitter, rules) == []


def test_a_token_named_like_a_user_gains_none_of_that_users_rules() -> None:
    """A token is a subject of its own (policy: tokens:): a user of the same name, or none,
    changes nothing; the token's own rules or else the default."""
    policy = Policy.from_document({
        "users": {"ci": {"executors": ["*"], "secrets": ["*"]},
                  "deploy": {"executors": ["ssh"], "run_as": ["*"]}},
        "tokens": {"ci": {"executors": ["local"]}},
        "default": {"executors": ["docker"]},
    })  # fmt: skip
    assert policy.rules_of(Submitter.of_token("ci")) == Rules(executors=("local",))
    assert policy.rules_of(Submitter.of_token("deploy")) == Rules(executors=("docker",))


# -- the HTTP API -----------------------------------------------------------------------------------


def _caller(name: str) -> Caller:
    return Caller(Token("0123456789ab", name, ("submit",), "0" * 64, "", "test"))


def test_an_idempotent_post_is_never_answered_another_submitters_job(tmp_path: Path) -> None:
    """A POST with an Idempotency-Key whose job id another submitter placed first, with the
    same body (a file naming its job_id, raced on another host): the other's job is not this
    POST's, and it is not answered as a replay of it (409 duplicate), while the same token's
    own placement is."""
    root = tmp_path / "spool"
    spool = Spool(root, durable=False)
    spool.init()
    document = {"job_id": "raced-1", "executor": "local", "product": {"commands": "true"}}
    data = yaml.safe_dump(document).encode()
    body_sha = hashlib.sha256(data).hexdigest()
    make_job(root, "raced-1", document=document, submitter="token:other", submitter_uid=None)

    def submit(*args: Any, **kwargs: Any) -> str:
        raise Refused("duplicate", "job id raced-1 is taken", [])

    ctx: Any = SimpleNamespace(spool=spool, clock=FakeClock(), submit=submit)
    with pytest.raises(Refused) as refused:
        _place_as(ctx, _caller("mine"), data, "api-mine.yaml", "raced-1", body_sha)
    assert refused.value.code == "duplicate"
    # The same token's POST placed it (on another host): not placed again, answered as a replay.
    assert _place_as(ctx, _caller("other"), data, "api-other.yaml", "raced-1", body_sha) is False


def test_refused_requests_are_logged_at_most_twenty_lines_a_minute_the_rest_counted(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """README: a wrong or missing token is logged with the client's address, at most 20 lines
    a minute, the rest counted."""
    now = [1000.0]
    monkeypatch.setattr("spoold.face.api.context.time", SimpleNamespace(monotonic=lambda: now[0]))
    logger = logging.getLogger("spoold.test.trust_audit")
    refusals = RefusalLog()
    with caplog.at_level(logging.WARNING, logger=logger.name):
        for n in range(25):
            refusals.say(logger, "API: refused GET %s from %s: no token", f"/n{n}", "192.0.2.1")
        said = [record.getMessage() for record in caplog.records]
        assert len(said) == 20, said
        assert said[-1] == "API: refused GET /n19 from 192.0.2.1: no token"
        caplog.clear()
        now[0] += 59.5
        refusals.say(logger, "API: refused GET %s from %s: no token", "/late", "192.0.2.1")
        assert caplog.records == [], "still the same minute"
        caplog.clear()
        now[0] += 0.5
        refusals.say(logger, "API: refused GET %s from %s: no token", "/next", "192.0.2.1")
        assert [record.getMessage() for record in caplog.records] == [
            "API: 6 more request(s) refused without a line",
            "API: refused GET /next from 192.0.2.1: no token",
        ]


# -- what a refusal quotes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["tab\tsecret-value", "back\\slash-secret", "bell\x07secret-value"]
)
def test_a_hidden_value_quoted_as_repr_spells_it_is_taken_out(value: str) -> None:
    """An error message quotes a value as ``{value!r}`` does (escaped: a tab as ``\\t``, a
    backslash doubled): a secret-named field's value is taken out in that spelling too."""
    hide = Redaction({"executor": "local", "variables": {"DB_PASSWORD": value}})
    said = hide.text(f"variables.DB_PASSWORD: {value!r} is not valid here")
    assert "secret" not in said and repr(value)[1:-1] not in said, said
    assert HIDDEN in said, said
