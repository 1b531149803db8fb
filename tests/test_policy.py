"""Who submitted, and what they may use (issue 18): the owner of a file dropped into incoming/
(the caller of `spoold submit`) is its submitter, recorded in status.json; the config's
`policy:` limits, per user and group, the executors, `run_as` users and secrets a submitter's
files may use, and a file outside it is rejected `not_allowed` with the path and line.

Tried with real owners: files given (as root, with chown) to the host's own accounts, `daemon`
and `nobody`, and to a uid with no name; `spoold submit` and `validate` run as `daemon` (runuser)
against a spool laid out as the Debian package lays it out, with `daemon` as the submit group.
No user is created.
"""

from __future__ import annotations

import functools
import grp
import json
import logging
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from spoold.core.config import load_config
from spoold.core.errors import ConfigError
from spoold.core.policy import Policy, Rules, Submitter
from spoold.core.spool import Spool
from spoold.intake.incoming import Accepted, Intake, Rejected
from spoold.intake.validation import JobValidator, job_validator
from spoold.run.registry import ExecutorRegistry
from tests.fakes import FakeClock
from tests.harness import local_job, run_cli
from tests.test_admission import lines_of, spoold
from tests.test_cli_access import as_user, lay_out_as_the_package
from tests.test_schedule_timing import Bench, T

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("runuser") is None,
    reason="needs root (to give files other owners) and runuser",
)

DAEMON = pwd.getpwnam("daemon")
NOBODY = pwd.getpwnam("nobody")
NOBODY_GROUP = grp.getgrgid(NOBODY.pw_gid).gr_name


def _nameless() -> int:
    for uid in range(4242, 60000):
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
    raise AssertionError("every uid has a name")


NAMELESS = _nameless()
LOG = logging.getLogger("spoold.test")

LOCAL = "executor: local\nproduct: {commands: 'true'}\n"
SEVDESK = (
    "executor: sevdesk\ntype: cancel_invoice\n"
    "product: {api_token: '${secret:SEVDESK_TOKEN}', invoice_id: 123}\n"
)
#: The issue's example, with `daemon` as the billing account.
BILLING: dict[str, Any] = {
    "users": {"daemon": {"executors": ["sevdesk", "lexware"], "secrets": ["SEVDESK_TOKEN"]}}
}
GIVES_BILLING = "(the config's policy gives daemon the executors: sevdesk, lexware)"


@functools.cache
def validator() -> JobValidator:
    return job_validator(ExecutorRegistry.from_entry_points())


def make_intake(
    tmp_path: Path, policy: dict[str, Any] | None, *, allowed_run_as: tuple[str, ...] = ()
) -> tuple[Spool, Intake]:
    """A spool and the daemon's intake with this ``policy:`` (None: the config has none)."""
    spool = Spool(tmp_path / "spool")
    spool.init()
    intake = Intake(
        spool, validator(), FakeClock(),
        max_file_size=1 << 20, settle_time=0.0, on_accepted=lambda job, document: None,
        logger=LOG, allowed_run_as=allowed_run_as,
        policy=None if policy is None else Policy.from_document(policy),
    )  # fmt: skip
    return spool, intake


def dropped_by(
    intake: Intake, spool: Spool, name: str, text: str, uid: int, gid: int, *, mode: int = 0o644
) -> Accepted | Rejected:
    """A file owned by ``uid``:``gid`` in incoming/, as that user's scp leaves it, offered."""
    path = spool.dir("incoming") / name
    path.write_text(text)
    os.chown(path, uid, gid)
    path.chmod(mode)
    outcome = intake.offer(name, complete=True)
    assert outcome is not None
    return outcome


def by_daemon(intake: Intake, spool: Spool, name: str, text: str) -> Accepted | Rejected:
    return dropped_by(intake, spool, name, text, DAEMON.pw_uid, DAEMON.pw_gid)


def by_nobody(intake: Intake, spool: Spool, name: str, text: str) -> Accepted | Rejected:
    return dropped_by(intake, spool, name, text, NOBODY.pw_uid, NOBODY.pw_gid)


def status_of(outcome: Accepted | Rejected | None) -> dict[str, Any]:
    assert isinstance(outcome, Accepted), getattr(outcome, "reason", outcome)
    return dict(json.loads((outcome.job.path / "status.json").read_text()))


def refusal(outcome: Accepted | Rejected) -> list[tuple[str, int | None, str]]:
    """A `not_allowed` rejection's errors as (path, line, message), checked against reason.json."""
    assert isinstance(outcome, Rejected), outcome
    assert outcome.reason["code"] == "not_allowed", outcome.reason
    kept = json.loads((outcome.path / "reason.json").read_text())
    assert kept == outcome.reason
    return [(e["path"], e["line"], e["message"]) for e in kept["errors"]]


# -- the submitter -------------------------------------------------------------------------------


def test_without_a_policy_everything_is_allowed_and_the_submitter_recorded(
    tmp_path: Path,
) -> None:
    spool, intake = make_intake(tmp_path, None)
    status = status_of(by_nobody(intake, spool, "a.yaml", "job_id: a\n" + LOCAL))
    assert (status["submitter"], status["submitter_uid"]) == ("nobody", NOBODY.pw_uid)
    # A uid with no name (an account of another host, on a shared filesystem) is kept by number.
    nameless = dropped_by(intake, spool, "b.yaml", "job_id: b\n" + LOCAL, NAMELESS, NAMELESS)
    assert (status_of(nameless)["submitter"], status_of(nameless)["submitter_uid"]) == (
        f"uid:{NAMELESS}", NAMELESS,
    )  # fmt: skip
    # Group-writable files too: without a policy who wrote a file gives no rights.
    shared = dropped_by(intake, spool, "c.yaml", "job_id: c\n" + LOCAL, DAEMON.pw_uid,
                        NOBODY.pw_gid, mode=0o666)  # fmt: skip
    assert status_of(shared)["submitter"] == "daemon"


def test_the_billing_account_may_submit_sevdesk_jobs_and_nothing_else(tmp_path: Path) -> None:
    spool, intake = make_intake(tmp_path, BILLING)
    status = status_of(by_daemon(intake, spool, "invoice.yaml", "job_id: inv\n" + SEVDESK))
    assert (status["submitter"], status["submitter_uid"]) == ("daemon", DAEMON.pw_uid)

    local = by_daemon(intake, spool, "shell.yaml", LOCAL)
    assert refusal(local) == [
        ("executor", 1, f"submitter daemon may not submit local jobs {GIVES_BILLING}")
    ]
    assert isinstance(local, Rejected)
    assert local.reason["reason"].startswith("executor: submitter daemon may not submit local")
    assert local.reason["submitter"] == "daemon"
    assert (local.path / "shell.yaml").read_text() == LOCAL, "rejected/ keeps the file"
    assert [e["column"] for e in local.reason["errors"]] == [11]

    other = SEVDESK + "variables:\n  T: '${secret:PVE_TOKEN}'\n"
    assert refusal(by_daemon(intake, spool, "other.yaml", other)) == [
        ("variables.T", 5, "submitter daemon may not use secret 'PVE_TOKEN' (the config's policy "
                           "gives daemon the secrets: SEVDESK_TOKEN)"),
    ]  # fmt: skip
    assert spool.jobs.find("inv") is not None and len(spool.jobs.list_jobs("pending")) == 1


def test_rights_are_the_union_of_the_user_and_the_groups_and_default_is_for_the_unnamed(
    tmp_path: Path,
) -> None:
    policy = {
        "users": {"nobody": {"executors": ["sevdesk"], "secrets": ["SEVDESK_TOKEN"]}},
        "groups": {NOBODY_GROUP: {"executors": ["local"], "secrets": ["SHARED"]}},
        "default": {"executors": ["docker"]},
    }
    spool, intake = make_intake(tmp_path, policy)
    shared = "executor: local\nproduct: {commands: 'echo ${secret:SHARED}'}\n"
    assert status_of(by_nobody(intake, spool, "g.yaml", shared))["submitter"] == "nobody"
    assert status_of(by_nobody(intake, spool, "u.yaml", SEVDESK))["submitter"] == "nobody"
    # daemon is named nowhere (its group neither): the default, which has no local.
    [(path, _, message)] = refusal(by_daemon(intake, spool, "d.yaml", LOCAL))
    assert path == "executor"
    assert message == (
        "submitter daemon may not submit local jobs "
        "(the config's policy gives daemon the executors: docker)"
    )
    # Once named, a user has their rules only: the default is not added to them.
    named = {**policy, "users": {"daemon": {"executors": ["ssh"]}}}
    spool, intake = make_intake(tmp_path / "named", named)
    [(path, _, message)] = refusal(by_daemon(intake, spool, "d.yaml", LOCAL))
    assert message.endswith("gives daemon the executors: ssh)")


def test_a_policy_without_default_gives_the_unnamed_nothing_and_root_everything(
    tmp_path: Path,
) -> None:
    spool, intake = make_intake(tmp_path, BILLING)
    [(_, _, message)] = refusal(by_nobody(intake, spool, "n.yaml", LOCAL))
    assert message.endswith("gives nobody the executors: none)")
    # Root is not limited: root can edit the config.
    everything = "executor: local\nrun_as: nobody\nproduct: {commands: 'echo ${secret:ANY}'}\n"
    spool, intake = make_intake(tmp_path / "root", {"default": {}}, allowed_run_as=("nobody",))
    status = status_of(dropped_by(intake, spool, "r.yaml", everything, 0, 0))
    assert (status["submitter"], status["submitter_uid"]) == ("root", 0)


def test_secrets_are_matched_by_pattern_wherever_the_file_references_them(
    tmp_path: Path,
) -> None:
    policy = {"users": {"daemon": {"executors": ["local"], "secrets": ["PROXMOX_*", "CB"]}}}
    spool, intake = make_intake(tmp_path, policy)
    text = (
        "executor: local\n"
        "product: {commands: 'echo ${secret:PROXMOX_A} ${secret:PVE_TOKEN}'}\n"
        "variables: {X: '${secret:PROXMOXB}', Y: '${secret:PROXMOX_B}'}\n"
        "hooks: {pre_run: ['true', 'echo ${secret:HOOKED}']}\n"
        "callback: {url: 'http://127.0.0.1:9/h', secret: '${secret:CB}'}\n"
        "description: 'uses ${secret:IN_TEXT}'\n"
    )
    given = "(the config's policy gives daemon the secrets: PROXMOX_*, CB)"
    assert refusal(by_daemon(intake, spool, "s.yaml", text)) == [
        ("product.commands", 2, f"submitter daemon may not use secret 'PVE_TOKEN' {given}"),
        ("variables.X", 3, f"submitter daemon may not use secret 'PROXMOXB' {given}"),
        ("hooks.pre_run[1]", 4, f"submitter daemon may not use secret 'HOOKED' {given}"),
        ("description", 6, f"submitter daemon may not use secret 'IN_TEXT' {given}"),
    ]
    allowed = "executor: local\nproduct: {commands: 'echo ${secret:PROXMOX_A} ${secret:CB}'}\n"
    assert status_of(by_daemon(intake, spool, "ok.yaml", allowed))["submitter"] == "daemon"


def test_every_step_is_checked_for_its_executor_and_its_secrets(tmp_path: Path) -> None:
    policy = {"groups": {"daemon": {"executors": ["local"], "secrets": ["BUILD_*"]}}}
    spool, intake = make_intake(tmp_path, policy)
    text = (
        "executor: local\n"
        "steps:\n"
        "  - id: build\n"
        "    product: {commands: 'make ${secret:BUILD_KEY}'}\n"
        "  - id: ship\n"
        "    needs: [build]\n"
        "    executor: ssh\n"
        "    product: {host: h.example.net, user: u, commands: 'echo ${secret:SSH_PASS}'}\n"
    )
    assert refusal(by_daemon(intake, spool, "steps.yaml", text)) == [
        ("steps[1].executor", 7, "submitter daemon may not submit ssh jobs "
                                 "(the config's policy gives daemon the executors: local)"),
        ("steps[1].product.commands", 8, "submitter daemon may not use secret 'SSH_PASS' "
                                         "(the config's policy gives daemon the secrets: BUILD_*)"),
    ]  # fmt: skip
    # Without a job-wide executor each step names its own, and each is checked.
    own = (
        "steps:\n"
        "  - id: a\n"
        "    executor: local\n"
        "    product: {commands: 'true'}\n"
        "  - id: b\n"
        "    executor: docker\n"
        "    product: {image: alpine, commands: 'true'}\n"
    )
    [(path, line, message)] = refusal(by_daemon(intake, spool, "own.yaml", own))
    assert (path, line) == ("steps[1].executor", 6)
    assert message.startswith("submitter daemon may not submit docker jobs")
    # A step without an executor runs the job's: checked once, where the job names it.
    inherited = (
        "executor: local\nsteps:\n  - id: a\n    product: {commands: 'echo ${secret:BUILD_1}'}\n"
    )
    assert status_of(by_daemon(intake, spool, "fine.yaml", inherited))["submitter"] == "daemon"


def test_hooks_are_shell_commands_on_this_host_and_need_the_local_executor(
    tmp_path: Path,
) -> None:
    spool, intake = make_intake(tmp_path, BILLING)
    text = SEVDESK + "hooks:\n  on_failure: 'mail -s failed billing'\n"
    outcome = by_daemon(intake, spool, "hooked.yaml", text)
    assert refusal(outcome) == [
        ("hooks", 4, "hooks are shell commands run on this host, as a local job's are: submitter "
                     f"daemon may not submit local jobs {GIVES_BILLING}"),
    ]  # fmt: skip
    assert isinstance(outcome, Rejected) and outcome.reason["errors"][0]["column"] == 1


def test_run_as_must_be_in_the_policy_and_the_policy_never_widens_allowed_run_as(
    tmp_path: Path,
) -> None:
    policy = {
        "users": {"daemon": {"executors": ["local"], "run_as": ["nob*"]}},
        "groups": {NOBODY_GROUP: {"executors": ["local"], "run_as": ["*"]}},
    }
    spool, intake = make_intake(tmp_path, policy, allowed_run_as=("nobody", "daemon"))
    assert refusal(by_daemon(intake, spool, "d.yaml", LOCAL + "run_as: daemon\n")) == [
        ("run_as", 3, "submitter daemon may not run jobs as 'daemon' "
                      "(the config's policy gives daemon the run_as users: nob*)"),
    ]  # fmt: skip
    assert status_of(by_daemon(intake, spool, "n.yaml", LOCAL + "run_as: nobody\n"))["submitter"]
    # `*` in the policy is every user allowed_run_as allows, and no other.
    [(path, _, message)] = refusal(by_nobody(intake, spool, "r.yaml", LOCAL + "run_as: root\n"))
    assert (path, message) == (
        "run_as",
        "user 'root' is not allowed here (the config's allowed_run_as: nobody, daemon)",
    )


def test_a_file_others_may_write_is_not_taken_as_its_owners(tmp_path: Path) -> None:
    """On the package's incoming/ (setgid) a file's group is the submitters' group: a file it
    may write could hold another submitter's words under its owner's name, and rights."""
    spool, intake = make_intake(tmp_path, {"default": {"executors": ["local"]}})
    group_writable = dropped_by(intake, spool, "g.yaml", LOCAL, DAEMON.pw_uid, NOBODY.pw_gid,
                                mode=0o664)  # fmt: skip
    [(path, line, message)] = refusal(group_writable)
    assert (path, line) == ("", None)
    assert message.startswith(f"the file is writable by its group {NOBODY_GROUP} (mode 0664)")
    assert "chmod go-w" in message
    everyone = dropped_by(intake, spool, "e.yaml", LOCAL, DAEMON.pw_uid, DAEMON.pw_gid,
                          mode=0o646)  # fmt: skip
    assert refusal(everyone)[0][2].startswith("the file is writable by everyone (mode 0646)")
    # Root's rights above all must not go to whoever else could write its file.
    root = dropped_by(intake, spool, "r.yaml", LOCAL, 0, NOBODY.pw_gid, mode=0o664)
    assert refusal(root)[0][2].startswith(f"the file is writable by its group {NOBODY_GROUP}")
    # A group of the owner's own (a user private group, as Debian makes them) is theirs alone.
    own_group = grp.getgrgid(DAEMON.pw_gid)
    assert own_group.gr_name == "daemon" and own_group.gr_mem == [], "the host's daemon group"
    own = dropped_by(intake, spool, "o.yaml", LOCAL, DAEMON.pw_uid, DAEMON.pw_gid, mode=0o664)
    assert status_of(own)["submitter"] == "daemon"


def test_a_schedules_runs_are_its_submitters(tmp_path: Path) -> None:
    bench = Bench(tmp_path / "spool", FakeClock(T))
    try:
        path = bench.spool.dir("incoming") / "tick.yaml"
        path.write_text(yaml.safe_dump(local_job("tick", "true", schedule={"every": "20s"})))
        os.chown(path, DAEMON.pw_uid, DAEMON.pw_gid)
        assert isinstance(bench.intake.offer(path.name, complete=True), Accepted)
        assert bench.status("tick")["submitter"] == "daemon"
        bench.at(bench.next_firings("tick")[0], "tick")
        [run] = bench.queued
        run_status = bench.status(run)
        assert (run_status["submitter"], run_status["submitter_uid"]) == ("daemon", DAEMON.pw_uid)
    finally:
        bench.scheduler.stop()


# -- the policy itself ----------------------------------------------------------------------------


def test_rules_for_a_user_their_groups_or_a_token() -> None:
    policy = Policy.from_document({
        "users": {"alice": {"executors": ["local"]}},
        "groups": {"ops": {"executors": ["ssh", "local"], "run_as": ["deploy"]},
                   "billing": {"secrets": ["SEVDESK_*"]}},
        "default": {"executors": ["docker"]},
    })  # fmt: skip
    union = Rules(executors=("local", "ssh"), run_as=("deploy",), secrets=("SEVDESK_*",))
    assert policy.rules_for(user="alice", groups=["ops", "billing", "other"]) == union
    assert policy.rules_for(user="bob", groups=["other"]) == Rules(executors=("docker",))
    assert Policy.from_document({}).rules_for(user="bob") == Rules(), "no default: nothing"
    # The HTTP API (later) maps a token to the same policy: a token is a subject too.
    api = policy._replace(tokens={"ci": Rules(executors=("local",))})
    assert api.rules_for(token="ci") == Rules(executors=("local",))
    assert api.rules_for(token="stranger") == Rules(executors=("docker",))
    assert policy.rules_of(Submitter.of_uid(0)) is None, "root is not limited"
    assert policy.rules_of(Submitter.named("nobody")) == policy.rules_for(
        user="nobody", groups=[NOBODY_GROUP]
    )
    assert Submitter.named(f"uid:{NAMELESS}") == Submitter(f"uid:{NAMELESS}", NAMELESS)
    assert Submitter.named(str(DAEMON.pw_uid)).name == "daemon"
    with pytest.raises(ValueError, match="there is no user 'no-such-user-here'"):
        Submitter.named("no-such-user-here")


def test_the_config_reads_a_policy_with_and_without_the_schema_check(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"policy": {
        **BILLING,
        "groups": {"ops": {"executors": ["*"], "run_as": ["*"], "secrets": ["*"]}},
        "default": {"executors": ["local"]},
    }}))  # fmt: skip
    expected = Policy(
        users={"daemon": Rules(("sevdesk", "lexware"), (), ("SEVDESK_TOKEN",))},
        groups={"ops": Rules(("*",), ("*",), ("*",))},
        default=Rules(("local",)),
    )
    assert load_config(path, env={}).policy == expected
    assert load_config(path, env={}, check_schema=False).policy == expected
    path.write_text("workers: 2\n")
    assert load_config(path, env={}).policy is None, "no policy: no limits"


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("policy: [billing]\n", "key policy:"),
        (
            "policy: {users: {billing: {executors: sevdesk}}}\n",
            "key policy.users.billing.executors",
        ),
        ("policy: {users: {billing: {executor: [sevdesk]}}}\n", "policy.users.billing.executor "),
        ("policy: {groups: {ops: [local]}}\n", "key policy.groups.ops"),
        ("policy: {default: {secrets: ['']}}\n", "key policy.default.secrets"),
        ("policy: {users: {billing: {run_as: [1]}}}\n", "key policy.users.billing.run_as"),
        ("policy: {defaults: {}}\n", "unknown key policy.defaults"),
    ],
)
def test_an_invalid_policy_stops_spoold_naming_the_key(
    tmp_path: Path, text: str, names: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as checked:
        load_config(path, env={})
    assert names in str(checked.value)
    with pytest.raises(ConfigError) as unchecked:  # what `spoold status` meets says the same
        load_config(path, env={}, check_schema=False)
    assert str(unchecked.value) == str(checked.value)


# -- the command line -----------------------------------------------------------------------------


def test_validate_as_a_user_previews_their_policy(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"policy": {**BILLING, "default": {"executors": ["local"]}}}))
    local, invoice = tmp_path / "local.yaml", tmp_path / "invoice.yaml"
    local.write_text(LOCAL)
    invoice.write_text(SEVDESK)
    files = (str(local), str(invoice))
    billing = spoold("validate", "--config", str(config), "--as", "daemon", *files, cwd=tmp_path)
    assert billing.returncode == 1, billing.stderr
    assert lines_of(billing, local) == [
        f"{local}:1:11: executor: submitter daemon may not submit local jobs {GIVES_BILLING}"
    ]
    assert billing.stdout.splitlines() == [f"{invoice}: valid"]
    # Anyone not named gets the default, which has no sevdesk.
    other = spoold("validate", "--config", str(config), "--as", f"uid:{NAMELESS}", *files,
                   cwd=tmp_path)  # fmt: skip
    assert other.returncode == 1 and other.stdout.splitlines() == [f"{local}: valid"]
    assert lines_of(other, invoice) == [
        f"{invoice}:1:11: executor: submitter uid:{NAMELESS} may not submit sevdesk jobs "
        f"(the config's policy gives uid:{NAMELESS} the executors: local)",
        f"{invoice}:3:22: product.api_token: submitter uid:{NAMELESS} may not use secret "
        f"'SEVDESK_TOKEN' (the config's policy gives uid:{NAMELESS} the secrets: none)",
    ]
    # Without --as, as the caller: root here, whom no policy limits.
    mine = spoold("validate", "--config", str(config), *files, cwd=tmp_path)
    assert mine.returncode == 0, mine.stderr
    unknown = spoold("validate", "--config", str(config), "--as", "no-such-user-here", str(local),
                     cwd=tmp_path)  # fmt: skip
    assert unknown.returncode == 2
    assert "spoold: --as: there is no user 'no-such-user-here' on this host" in unknown.stderr
    config.write_text("policy: {users: {daemon: {executors: local}}}\n")
    broken = spoold("validate", "--config", str(config), str(local), cwd=tmp_path)
    assert broken.returncode == 2
    assert "configuration error" in broken.stderr and "key policy.users.daemon.executors" in (
        broken.stderr
    )


@pytest.fixture
def package_spool() -> Iterator[Path]:
    """A spool laid out as the package lays it out, `daemon` as the submit group, where
    `daemon` can reach it (pytest's tmp_path is root's alone)."""
    top = Path(tempfile.mkdtemp(prefix="spoold-policy-"))
    top.chmod(0o755)
    root = top / "spool"
    Spool(root).init()
    lay_out_as_the_package(root, "daemon")
    yield root
    shutil.rmtree(top, ignore_errors=True)


def test_submit_and_validate_check_as_their_caller_who_is_then_the_submitter(
    package_spool: Path,
) -> None:
    top = package_spool.parent
    config = top / "config.yaml"
    config.write_text(yaml.safe_dump({"policy": BILLING}))
    local, invoice = top / "local.yaml", top / "invoice.yaml"
    local.write_text(LOCAL)
    invoice.write_text("job_id: billed\n" + SEVDESK)
    for path in (config, local, invoice):
        path.chmod(0o644)
    refused = f"{local}:1:11: executor: submitter daemon may not submit local jobs {GIVES_BILLING}"
    checked = as_user("daemon", package_spool, "validate", "--config", str(config), str(local))
    assert checked.returncode == 1 and lines_of(checked, local) == [refused], checked.stderr
    submitted = as_user("daemon", package_spool, "submit", "--config", str(config), str(local),
                        str(invoice))  # fmt: skip
    assert submitted.returncode == 1, submitted.stderr
    assert lines_of(submitted, local) == [refused]
    spool = Spool(package_spool)
    assert spool.stages.list_incoming() == ["invoice.yaml"]
    placed = (spool.dir("incoming") / "invoice.yaml").stat()
    assert placed.st_uid == DAEMON.pw_uid, "the caller of submit owns what it places"
    # The daemon's intake takes it as the caller's.
    intake = Intake(
        spool, validator(), FakeClock(),
        max_file_size=1 << 20, settle_time=0.0, on_accepted=lambda job, document: None,
        logger=LOG, policy=Policy.from_document(BILLING),
    )  # fmt: skip
    assert status_of(intake.offer("invoice.yaml", complete=True))["submitter"] == "daemon"
    shown = as_user("daemon", package_spool, "status", "billed")
    assert shown.returncode == 0, shown.stderr
    assert "submitter:       daemon" in shown.stdout.splitlines(), shown.stdout
    assert (
        json.loads(run_cli(package_spool, "status", "billed", "--json").stdout)["submitter_uid"]
        == DAEMON.pw_uid
    )


@pytest.mark.parametrize("name", ["uid:²", "²", "uid:٣"])
def test_a_user_named_by_digits_of_another_script_is_no_user(name: str) -> None:
    """`spoold validate --as uid:²` said "invalid literal for int()": '²'.isdigit()."""
    with pytest.raises(ValueError, match="there is no user"):
        Submitter.named(name)


# -- paths of this host --------------------------------------------------------------------------


def test_a_host_path_a_job_names_must_be_among_the_submitters_host_paths(tmp_path: Path) -> None:
    """A submitter allowed docker mounted / (read the secrets, wrote as root), the engine's
    socket, the spool; allowed ssh, logged in with a key of secrets_dir as its keyfile. The
    paths of this host a job names are the policy's to allow, as its secrets are."""
    allowed = tmp_path / "data"
    (allowed / "in").mkdir(parents=True)
    (allowed / "out").symlink_to("/")
    policy = {"users": {"daemon": {"executors": ["docker", "ssh"],
                                   "host_paths": [f"{allowed}/*"]}}}  # fmt: skip
    spool, intake = make_intake(tmp_path, policy)
    mounts = ["/:/host", "/var/run/docker.sock:/s", f"{allowed}/in:/in", "cache:/cache",
              f"{allowed}/out:/out", f"{allowed}/in/../../..:/up", "${DIR}:/d"]  # fmt: skip
    docker = yaml.safe_dump({"executor": "docker", "variables": {"DIR": "/"},
                             "product": {"image": "x", "script": "y", "mounts": mounts}})  # fmt: skip
    given = f"(the config's policy gives daemon the host paths: {allowed}/*)"
    may_not = "submitter daemon may not use the host path"
    assert refusal(by_daemon(intake, spool, "d.yaml", docker)) == [
        ("product.mounts[0]", 5, f"{may_not} '/': it is not among their host paths {given}"),
        ("product.mounts[1]", 6,
         f"{may_not} '/var/run/docker.sock': it is not among their host paths {given}"),
        ("product.mounts[4]", 9, f"{may_not} '{allowed}/out': it leads to / {given}"),
        ("product.mounts[5]", 10,
         f"{may_not} '{allowed}/in/../../..': it is not among their host paths {given}"),
        ("product.mounts[6]", 11, f"{may_not} '${{DIR}}': a variable or a secret in it is known "
                                  f"only when the job runs {given}"),
    ]  # fmt: skip
    ssh = yaml.safe_dump({"executor": "ssh", "product": {
        "host": "127.0.0.1", "commands": "true", "keyfile": "/etc/spoold/secrets/deploy",
        "known_hosts": f"{allowed}/in/known_hosts"}})  # fmt: skip
    assert [path for path, _, _ in refusal(by_daemon(intake, spool, "s.yaml", ssh))] == [
        "product.keyfile"
    ]
    fine = yaml.safe_dump({"executor": "docker", "product": {
        "image": "x", "script": "y", "mounts": [f"{allowed}/in:/in:ro", "cache:/cache"]}})  # fmt: skip
    assert status_of(by_daemon(intake, spool, "ok.yaml", fine))["submitter"] == "daemon"


def test_without_host_paths_a_policy_allows_volumes_only_and_no_policy_limits_no_one(
    tmp_path: Path,
) -> None:
    text = yaml.safe_dump({"executor": "docker", "product": {
        "image": "x", "script": "y", "mounts": ["/srv:/srv", "cache:/cache"]}})  # fmt: skip
    spool, intake = make_intake(tmp_path / "a", {"users": {"daemon": {"executors": ["docker"]}}})
    assert [p for p, _, _ in refusal(by_daemon(intake, spool, "d.yaml", text))] == [
        "product.mounts[0]"
    ]
    spool, intake = make_intake(tmp_path / "b", None)
    assert status_of(by_daemon(intake, spool, "d.yaml", text))["submitter"] == "daemon"
