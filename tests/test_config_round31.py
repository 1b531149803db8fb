"""Round 31: ``~`` is the home directory in every path-valued key of the config, policy
patterns and executor settings included, as on the job's side; and a key given twice is
refused by every command that loads the config, not only by ``run`` and a reload."""

from __future__ import annotations

import os
import pwd
from glob import escape
from pathlib import Path
from typing import Any

import pytest
import yaml

from spoold.core.config import load_config
from spoold.core.errors import ConfigError
from spoold.core.policy import Rules, Submitter
from spoold.core.spool import Spool
from spoold.intake.policy_check import policy_problems
from tests.harness import run_cli

ROOT_HOME = Path(pwd.getpwnam("root").pw_dir)
ALICE = Submitter("alice", 4242)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$HOME, with a glob's special characters in it: a pattern's home is a path, no glob."""
    found = tmp_path / "ho[me]?"
    (found / "data").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(found))
    return found


def _load(tmp_path: Path, document: dict[str, Any], **kwargs: Any) -> Any:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    return load_config(path, env=kwargs.pop("env", {}), **kwargs)


def _ssh_job(**product: str) -> dict[str, Any]:
    return {"executor": "ssh", "product": {"host": "127.0.0.1", "commands": "true", **product}}


# -- 1. ~ in every path-valued key ----------------------------------------------------------------


@pytest.mark.parametrize("subject", ["users", "groups", "tokens", "default"])
def test_a_tilde_in_host_paths_is_the_home_directory_as_a_jobs_is(
    tmp_path: Path, home: Path, subject: str
) -> None:
    rules = {"executors": ["ssh"], "host_paths": ["~/data/*", "~root/keys/*", "/srv/~x"]}
    policy = {"default": rules} if subject == "default" else {subject: {"alice": rules}}
    config = _load(tmp_path, {"policy": policy})
    found: Rules = (
        config.policy.default if subject == "default" else getattr(config.policy, subject)["alice"]
    )
    assert found.host_paths == (f"{escape(str(home))}/data/*", f"{ROOT_HOME}/keys/*", "/srv/~x")
    # As the job's side expands it (spoold's own home), so what the rule names is allowed...
    fine = _ssh_job(keyfile="~/data/deploy", known_hosts=f"{home}/data/known_hosts")
    assert policy_problems(fine, ALICE, found) == []
    assert policy_problems(_ssh_job(keyfile="~root/keys/k"), ALICE, found) == []
    # ... and nothing else: the home's [me]? is no glob (hom + e + one more would match it).
    for other in ("~/elsewhere/k", f"{home.parent}/homex/data/k", "~root/other"):
        (problem,) = policy_problems(_ssh_job(keyfile=other), ALICE, found)
        assert "it is not among their host paths" in problem[0], problem


def test_a_tilde_of_no_such_user_is_refused_naming_the_key(tmp_path: Path, home: Path) -> None:
    policy = {"users": {"alice": {"host_paths": ["/srv/*", "~nosuchuser31/data/*"]}}}
    with pytest.raises(ConfigError) as refused:
        _load(tmp_path, {"policy": policy})
    said = str(refused.value)
    assert "key policy.users.alice.host_paths: '~nosuchuser31/data/*' starts with " in said
    assert "there is no user 'nosuchuser31' on this host: write the path in full" in said


def test_a_jobs_path_of_no_such_user_is_refused_not_a_crash(home: Path) -> None:
    rules = Rules(executors=("ssh",), host_paths=("*",))
    (problem,) = policy_problems(_ssh_job(keyfile="~nosuchuser31/key"), ALICE, rules)
    message, where, _ = problem
    assert where == ("product", "keyfile")
    assert "may not use the host path '~nosuchuser31/key'" in message
    assert "there is no user 'nosuchuser31' on this host" in message, message


def test_a_tilde_in_an_executors_path_settings_is_the_home_directory(
    tmp_path: Path, home: Path
) -> None:
    executors = {
        "ssh": {"known_hosts": "~/.ssh/spoold_known_hosts", "trust_on_first_use": True},
        "lexware": {"rate_dir": "~root/rate", "rate_margin": 0.1},
        "docker": {"note": "~/not-a-path"},  # not a path setting: handed over as written
    }
    config = _load(tmp_path, {"executors": executors})
    assert config.executor_settings == {
        "ssh": {"known_hosts": f"{home}/.ssh/spoold_known_hosts", "trust_on_first_use": True},
        "lexware": {"rate_dir": f"{ROOT_HOME}/rate", "rate_margin": 0.1},
        "docker": {"note": "~/not-a-path"},
    }
    # Relative: from the config file's directory, as every other path of the file.
    relative = _load(tmp_path, {"executors": {"ssh": {"known_hosts": "known_hosts"}}})
    assert relative.executor_settings["ssh"]["known_hosts"] == str(tmp_path / "known_hosts")
    with pytest.raises(ConfigError, match=r"key executors\.lexware\.rate_dir: .*no user"):
        _load(tmp_path, {"executors": {"lexware": {"rate_dir": "~nosuchuser31/r"}}})
    with pytest.raises(ConfigError, match=r"key executors\.ssh\.known_hosts: 5 is not a path"):
        _load(tmp_path, {"executors": {"ssh": {"known_hosts": 5}}})


@pytest.mark.parametrize(
    ("document", "key"),
    [
        ({"spool": "~nosuchuser31/s"}, "spool"),
        ({"workdir": "~nosuchuser31/w"}, "workdir"),
        ({"logdir": "~nosuchuser31/l"}, "logdir"),
        ({"secrets_dir": "~nosuchuser31/s"}, "secrets_dir"),
        ({"api": {"certfile": "~nosuchuser31/c", "keyfile": "/k"}}, "api.certfile"),
        ({"api": {"certfile": "/c", "keyfile": "~nosuchuser31/k"}}, "api.keyfile"),
        ({"mail": {"host": "m.example", "ca_file": "~nosuchuser31/ca"}}, "mail.ca_file"),
        ({"policy": {"default": {"host_paths": ["~nosuchuser31/*"]}}}, "policy.default.host_paths"),
        ({"policy": {"tokens": {"ci": {"host_paths": ["~nosuchuser31/x"]}}}},
         "policy.tokens.ci.host_paths"),
        ({"executors": {"ssh": {"known_hosts": "~nosuchuser31/kh"}}}, "executors.ssh.known_hosts"),
    ],
)  # fmt: skip
def test_every_path_valued_key_expands_tilde_the_same_way(
    tmp_path: Path, home: Path, document: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        _load(tmp_path, document)
    assert str(refused.value).startswith(f"key {key}: '~nosuchuser31"), refused.value
    assert "there is no user 'nosuchuser31' on this host: write the path in full" in str(
        refused.value
    )
    known = yaml.safe_dump(document).replace("~nosuchuser31", "~")
    (tmp_path / "config.yaml").write_text(known)
    config = load_config(tmp_path / "config.yaml", env={})
    shown = repr(config).replace(escape(str(home)), str(home))  # a pattern's, escaped
    assert str(home) in shown and "~" not in shown, (key, config)


def test_the_environments_paths_expand_tilde_too(tmp_path: Path, home: Path) -> None:
    env = {"SPOOLD_SPOOL": "~/spool", "RUNNER_WORKDIR": "~/work", "RUNNER_LOG_DIR": "~root/log"}
    config = _load(tmp_path, {}, env=env)
    assert (config.spool, config.workdir, config.logdir) == (
        home / "spool", home / "work", ROOT_HOME / "log",
    )  # fmt: skip


def test_what_is_no_path_is_taken_as_written(tmp_path: Path, home: Path) -> None:
    config = _load(tmp_path, {"pass_env": ["HOME"], "global_before_script": "cd ~/x",
                              "allowed_run_as": ["deploy"]})  # fmt: skip
    assert config.pass_env == ("HOME",)
    assert config.global_before_script == ("cd ~/x",)  # the shell's, in the job's home


# -- 2. a key given twice, whatever the command -------------------------------------------------

TWICE_TOP = "workers: 1\nspool: {a}\nlog_level: info\nspool: {b}\n"
TWICE_NESTED = "limits:\n  max_file_size: 1MiB\n  max_file_size: 2MiB\nspool: {a}\n"


@pytest.mark.parametrize("check_schema", [True, False])
@pytest.mark.parametrize("runtime_dir", [True, False])
def test_every_load_refuses_a_key_given_twice_with_the_same_message(
    tmp_path: Path, check_schema: bool, runtime_dir: bool
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(TWICE_TOP.format(a=tmp_path / "a", b=tmp_path / "b"))
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {"XDG_RUNTIME_DIR": str(runtime)} if runtime_dir else {}
    for _ in range(2):  # the second time, with a parsed copy if one were kept
        with pytest.raises(ConfigError) as refused:
            load_config(path, env=env, check_schema=check_schema)
        assert str(refused.value) == (
            f"{path}:4:1: key spool: given twice (first on line 2); give each key once"
        )
    assert not (runtime / "spoold").exists() or not list((runtime / "spoold").iterdir())
    path.write_text("spool: x\n")  # once fixed, it loads
    assert load_config(path, env=env, check_schema=check_schema).spool == tmp_path / "x"


def test_keys_given_twice_inside_merges_anchors_and_lists_are_found(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "retention:\n  done: &r {max_age: 30d}\n  failed:\n    <<: *r\n    max_age: 5d\n"
        "notify:\n  - {webhook: {url: 'http://127.0.0.1:9/h'}, on: [failed], on: [failed]}\n"
        "policy:\n  users:\n    bob: {secrets: [A]}\n    bob: {secrets: [B]}\n"
        "executors:\n  ssh:\n    yes: 1\n    'yes': 2\n    on: 3\n    On: 4\n"
    )
    with pytest.raises(ConfigError) as refused:
        load_config(path, env={}, check_schema=False)
    said = str(refused.value)
    assert said == "; ".join(
        [
            f"{path}:7:60: key notify[0].on: given twice (first on line 7); give each key once",
            f"{path}:11:5: key policy.users.bob: given twice (first on line 10); give each key once",
            f"{path}:15:5: key executors.ssh.yes: given twice (first on line 14); give each key once",
        ]
    ), said


@pytest.mark.parametrize("text", [TWICE_TOP, TWICE_NESTED], ids=["top", "nested"])
def test_every_command_refuses_a_config_with_a_key_given_twice(tmp_path: Path, text: str) -> None:
    spools = tmp_path / "a", tmp_path / "b"
    for spool in spools:
        Spool(spool).init()
    path = tmp_path / "config.yaml"
    path.write_text(text.format(a=spools[0], b=spools[1]))
    job = tmp_path / "job.yaml"
    job.write_text("job_id: j1\nexecutor: local\nproduct: {commands: 'true'}\n")
    commands = [["status"], ["list"], ["logs", "j1"], ["hosts"], ["schedule", "list"],
                ["token", "list"], ["validate", str(job)]]  # fmt: skip
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    said = set()
    for command in commands:
        result = run_cli(spools[0], *command, "--config", str(path),
                         env={"XDG_RUNTIME_DIR": str(runtime)})  # fmt: skip
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert "given twice (first on line" in result.stderr, (command, result.stderr)
        said.add(result.stderr)
    assert len(said) == 1, said  # the same message, whichever command
    assert os.listdir(runtime) in ([], ["spoold"]) and not list(runtime.rglob("*.json"))
