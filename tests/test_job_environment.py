"""The environment a job gets on this host: its own, not the daemon's (SPEC 13)."""

from __future__ import annotations

import logging
import os
import pwd
from pathlib import Path
from typing import Any, ClassVar

import pytest
from spoold.executors.base import ExecResult, Executor, RunContext

from spoold.core.config import Config
from spoold.core.spool import JobDir, Spool
from spoold.intake.incoming import Intake
from spoold.intake.validation import job_validator
from spoold.run.registry import ExecutorRegistry
from spoold.run.worker import DEFAULT_PATH, JobRunner, job_base_environment
from tests.fakes import FakeClock
from tests.harness import accept_and_run

LOGGER = logging.getLogger("spoold.test.environment")

#: What a daemon under systemd, started with credentials in its environment, has.
DAEMON_ENV = {
    "AWS_SECRET_ACCESS_KEY": "aws-daemon-secret",
    "AWS_REGION": "eu-central-1",
    "NOTIFY_SOCKET": "/run/systemd/notify",
    "WATCHDOG_USEC": "30000000",
    "LISTEN_FDS": "1",
    "CREDENTIALS_DIRECTORY": "/run/credentials/spoold.service",
    "INVOCATION_ID": "0123456789abcdef",
    "RUNNER_LOG_SOCKET": "/run/spoold/log.sock",
    "DAEMON_ONLY": "from-the-unit-file",
    "LANG": "de_DE.UTF-8",
    "LC_TIME": "C.UTF-8",
    "TZ": "Europe/Berlin",
}


class Runner:
    """Intake and a runner in this process, built after the daemon's environment is set."""

    def __init__(
        self, tmp_path: Path, registry: ExecutorRegistry | None = None, **settings: Any
    ) -> None:
        self.spool = Spool(tmp_path / "spool")
        self.spool.init()
        clock = FakeClock()
        registry = registry or ExecutorRegistry.from_entry_points()
        config = Config(spool=self.spool.root, hostname="here", worker_id="w1", kill_grace=0.5,
                        **settings)  # fmt: skip
        self.intake = Intake(self.spool, job_validator(registry), clock,
                             max_file_size=config.max_file_size, settle_time=0,
                             on_accepted=lambda job, document: None, logger=LOGGER)  # fmt: skip
        self.runner = JobRunner(self.spool, registry, config, clock, LOGGER)

    def run(self, document: dict[str, Any]) -> tuple[JobDir, dict[str, Any]]:
        return accept_and_run(self.spool, self.intake, self.runner, document)


@pytest.fixture
def daemon_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in DAEMON_ENV.items():
        monkeypatch.setenv(name, value)


def _printed(job: JobDir, mark: str) -> dict[str, str]:
    """The NAME=value lines a job printed after ``mark=`` (``env | sed 's/^/mark=/'``)."""
    found = {}
    for line in job.log_path.read_text().splitlines():
        _, sep, rest = line.partition(f" {mark}=")
        if sep:
            name, _, value = rest.partition("=")
            found[name] = value
    return found


_PRINT_ENV = "env | sed 's/^/{mark}=/'"


@pytest.mark.usefixtures("daemon_env")
def test_a_local_job_and_its_hooks_get_their_own_environment_not_the_daemons(
    tmp_path: Path,
) -> None:
    parts = Runner(tmp_path)
    document = {"job_id": "env", "executor": "local", "variables": {"MINE": "job-value"},
                "hooks": {"pre_run": _PRINT_ENV.format(mark="HOOK")},
                "product": {"commands": _PRINT_ENV.format(mark="JOB")}}  # fmt: skip
    job, status = parts.run(document)
    assert status["state"] == "succeeded", job.log_path.read_text()
    for mark in ("JOB", "HOOK"):
        env = _printed(job, mark)
        assert env, job.log_path.read_text()
        for name in ("AWS_SECRET_ACCESS_KEY", "AWS_REGION", "NOTIFY_SOCKET", "WATCHDOG_USEC",
                     "LISTEN_FDS", "CREDENTIALS_DIRECTORY", "INVOCATION_ID",
                     "RUNNER_LOG_SOCKET", "DAEMON_ONLY"):  # fmt: skip
            assert name not in env, (mark, name)
        assert env["PATH"] == os.environ["PATH"]
        assert (env["LANG"], env["LC_TIME"], env["TZ"]) == ("de_DE.UTF-8", "C.UTF-8",
                                                            "Europe/Berlin")  # fmt: skip
        assert env["MINE"] == "job-value" and env["JOB_ID"] == "env"
        assert env["SPOOLD_ATTEMPT"] == "1" and env["RUNNER_WORKDIR"]
        user = env["USER"]
        account = pwd.getpwnam(user)
        assert env["LOGNAME"] == user and env["SHELL"] == (account.pw_shell or "/bin/sh")
        expected_home = account.pw_dir if os.path.isdir(account.pw_dir) else env["RUNNER_WORKDIR"]
        assert env["HOME"] == expected_home


@pytest.mark.usefixtures("daemon_env")
def test_a_user_without_a_home_gets_the_work_dir_as_home(tmp_path: Path) -> None:
    parts = Runner(tmp_path)
    document = {"job_id": "home", "executor": "local",
                "product": {"commands": [_PRINT_ENV.format(mark="JOB")]}}  # fmt: skip
    job, status = parts.run(document)
    assert status["state"] == "succeeded", job.log_path.read_text()
    env = _printed(job, "JOB")
    if os.path.isdir(pwd.getpwnam(env["USER"]).pw_dir):
        pytest.skip(f"the job user {env['USER']} has a home here")
    assert env["HOME"] == env["RUNNER_WORKDIR"]


@pytest.mark.usefixtures("daemon_env")
@pytest.mark.parametrize(
    ("pass_env", "passed", "kept_back"),
    [
        (("AWS_*",), {"AWS_SECRET_ACCESS_KEY", "AWS_REGION"}, {"NOTIFY_SOCKET", "DAEMON_ONLY"}),
        (
            ("*",),
            {"AWS_REGION", "DAEMON_ONLY", "RUNNER_LOG_SOCKET"},
            {
                "NOTIFY_SOCKET",
                "WATCHDOG_USEC",
                "LISTEN_FDS",
                "CREDENTIALS_DIRECTORY",
                "INVOCATION_ID",
            },
        ),
        (("NOTIFY_SOCKET", "DAEMON_ONLY"), {"NOTIFY_SOCKET", "DAEMON_ONLY"}, {"AWS_REGION"}),
    ],
    ids=["glob", "star-never-passes-systemds", "named-passes-even-systemds"],
)
def test_pass_env_passes_what_it_names(
    tmp_path: Path, pass_env: tuple[str, ...], passed: set[str], kept_back: set[str]
) -> None:
    parts = Runner(tmp_path, pass_env=pass_env)
    document = {"job_id": "passed", "executor": "local",
                "product": {"commands": _PRINT_ENV.format(mark="JOB")}}  # fmt: skip
    job, status = parts.run(document)
    assert status["state"] == "succeeded", job.log_path.read_text()
    env = _printed(job, "JOB")
    assert passed <= set(env), sorted(env)
    assert not kept_back & set(env), sorted(env)
    for name in passed:
        assert env[name] == DAEMON_ENV[name]


class _Capture(Executor):
    """Keeps the context it was given."""

    name = "capture"
    schema_resource = "local.schema.json"
    seen: ClassVar[list[RunContext]] = []

    def execute(self, ctx: RunContext) -> ExecResult:
        _Capture.seen.append(ctx)
        return ExecResult(0)


@pytest.mark.usefixtures("daemon_env")
def test_env_is_for_this_host_and_job_env_the_jobs_own(tmp_path: Path) -> None:
    """``env`` adds this host's part (PATH, locale, the user's HOME) to ``job_env``, which an
    executor that runs elsewhere (a container, another host) passes on alone."""
    _Capture.seen.clear()
    parts = Runner(tmp_path, registry=ExecutorRegistry({"capture": _Capture}))
    _, status = parts.run({"job_id": "ctx", "executor": "capture",
                             "variables": {"MINE": "x"}, "product": {"commands": "true"}})  # fmt: skip
    assert status["state"] == "succeeded"
    (ctx,) = _Capture.seen
    assert ctx.job_env["MINE"] == "x" and ctx.job_env["JOB_ID"] == "ctx"
    assert not {"PATH", "HOME", "LANG", "TZ", "USER"} & set(ctx.job_env)
    assert {"PATH", "HOME", "LANG", "TZ", "USER"} <= set(ctx.env)
    assert dict(ctx.env, **ctx.job_env) == dict(ctx.env)
    assert "AWS_SECRET_ACCESS_KEY" not in ctx.env and "NOTIFY_SOCKET" not in ctx.env


def test_the_base_environment_has_a_path_and_the_locale_only() -> None:
    daemon = {"LC_ALL": "C", "LANGUAGE": "de", "HOME": "/root", "SECRET": "s",
              "WATCHDOG_PID": "1", "JOURNAL_STREAM": "8:1"}  # fmt: skip
    assert job_base_environment(daemon, ()) == {"PATH": DEFAULT_PATH, "LC_ALL": "C",
                                                "LANGUAGE": "de"}  # fmt: skip
    assert job_base_environment({"PATH": "/x"}, ())["PATH"] == "/x"
    star = job_base_environment(daemon, ("*",))
    assert "SECRET" in star and "WATCHDOG_PID" not in star and "JOURNAL_STREAM" not in star
    assert "WATCHDOG_PID" in job_base_environment(daemon, ("WATCHDOG_PID",))


def test_pass_env_is_read_from_the_config_file(tmp_path: Path) -> None:
    from spoold.core.config import load_config  # noqa: PLC0415
    from spoold.core.errors import ConfigError  # noqa: PLC0415

    path = tmp_path / "config.yaml"
    path.write_text("pass_env: [AWS_*, HTTPS_PROXY]\n")
    assert load_config(path, env={}).pass_env == ("AWS_*", "HTTPS_PROXY")
    path.write_text("pass_env: AWS_*\n")
    with pytest.raises(ConfigError, match="pass_env"):
        load_config(path, env={})
