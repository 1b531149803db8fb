"""A reload takes only a config a start would take: every check of a start runs, each problem
is logged naming its key, and the config in use stays; a changed ``spool:`` is named; a key
given twice is refused; ``~`` in a path is the home directory; a plain-HTTP API on another
address than loopback is warned of."""

from __future__ import annotations

import logging
import os
import pwd
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from spoold.core.config import Config, load_config
from spoold.core.errors import ConfigError
from spoold.core.own_log import close_logging
from spoold.core.spool import Spool
from spoold.daemon import Daemon
from tests.daemon_bench import InlineWorkers
from tests.harness import write_config


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A spool, and a config for it (workdir of its own), in tmp_path."""
    root = tmp_path / "spool"
    Spool(root).init()
    path = write_config(tmp_path / "config.yaml", root, workdir=str(tmp_path / "work"))
    yield root, path
    close_logging()


def _daemon(path: Path, *, spool: Path | None = None) -> Daemon:
    return Daemon.build(load_config(path, env={}, spool=spool), make_workers=InlineWorkers)


def _rewrite(path: Path, **changes: object) -> None:
    document = yaml.safe_load(path.read_text())
    document.update(changes)
    path.write_text(yaml.safe_dump(document))


# -- 1. a reload runs every check a start runs ---------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        ({"logdir": "/proc/nope"}, "key logdir: cannot write spoold.log in /proc/nope"),
        ({"api": {"listen": "127.0.0.1:PORT", "certfile": "/missing.pem", "keyfile": "/missing.key"}},
         "key api.certfile: cannot use it"),
        ({"spool": "/nonexistent-spool-round30"}, "key spool: /nonexistent-spool-round30 is not a spool"),
        ({"workdir": "/proc/nope/work"}, "key workdir: the work root /proc/nope/work"),
    ],
)  # fmt: skip
def test_a_reload_refuses_what_a_start_refuses(
    setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str], changes: dict[str, object],
    said: str,
) -> None:  # fmt: skip
    _, path = setup
    daemon = _daemon(path)
    before = daemon.config
    _rewrite(path, **changes)
    path.write_text(path.read_text().replace("PORT", str(_free_port())))
    key = said.split(":", maxsplit=1)[0]
    with pytest.raises(ConfigError, match=key):  # a start refuses it too
        start_refusal(path)
    assert daemon.reload_config() is False
    err = capsys.readouterr().err
    assert f"config not reloaded, the old one stays in use: {said}" in err, err
    assert "config reloaded" not in err
    assert daemon.config == before


def start_refusal(path: Path) -> None:
    """What ``spoold run`` says of the file: ConfigError (its spool's problems as one too)."""
    config = load_config(path, env={})
    from spoold.core.errors import SpooldError  # noqa: PLC0415

    try:
        daemon = Daemon.build(config, make_workers=InlineWorkers)
        if daemon.api is not None:
            daemon.api.start()
            daemon.api.stop()
    except ConfigError:
        raise
    except SpooldError as exc:
        raise ConfigError(f"key spool: {exc}") from exc
    finally:
        close_logging()


def test_a_reload_with_an_unknown_job_user_is_refused_naming_job_user(
    setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As root (the package's daemon): the users are looked up at start, and so at reload."""
    _, path = setup
    daemon = _daemon(path)
    monkeypatch.setattr("spoold.run.lane.may_switch_users", lambda: True)
    _rewrite(path, job_user="nosuchuser123", logdir="/proc/nope")
    assert daemon.reload_config() is False
    err = capsys.readouterr().err
    # Each problem, each with its key: not only the first.
    assert "stays in use: key job_user: there is no user 'nosuchuser123'" in err, err
    assert "stays in use: key logdir: cannot write spoold.log" in err, err
    assert "job_users" not in err
    assert daemon.config.job_users == ()  # none named: one account per worker slot


def test_a_reload_names_the_keys_not_the_fields(
    setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, path = setup
    daemon = _daemon(path)
    user = pwd.getpwuid(os.getuid()).pw_name if os.getuid() else "nobody"
    _rewrite(path, job_user=[user, "root"], fsync=False, limits={"max_file_size": "2MiB"},
             host_id="another-host", log_level="debug")  # fmt: skip
    assert daemon.reload_config() is True, capsys.readouterr().err
    line = next(x for x in capsys.readouterr().err.splitlines() if "config reloaded" in x)
    assert "applied log_level;" in line
    waiting = line.split("need a restart: ")[1].split(", ")
    assert sorted(waiting) == ["fsync", "host_id", "job_user", "limits.max_file_size"], line


# -- 2. a changed spool: is named ---------------------------------------------------------------


def test_a_changed_spool_is_named_as_waiting_for_a_restart(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, path = setup
    other = tmp_path / "other"
    Spool(other).init()
    daemon = _daemon(path)
    _rewrite(path, spool=str(other))
    assert daemon.reload_config() is True
    line = next(x for x in capsys.readouterr().err.splitlines() if "config reloaded" in x)
    assert "need a restart: spool" in line, line
    assert daemon.config.spool == root  # the one in use, until the restart


def test_a_spool_given_by_flag_says_the_files_is_overridden(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, path = setup
    other = tmp_path / "other"
    Spool(other).init()
    _rewrite(path, spool=str(tmp_path / "in-file"))
    daemon = _daemon(path, spool=root)
    _rewrite(path, spool=str(other))
    assert daemon.reload_config() is True
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "config reloaded" in x)
    assert "need a restart: none" in line, line
    assert f"spool: {other} in the file is overridden by --spool: spoold stays on {root}" in err
    assert daemon.config.spool == root


# -- 3. a key given twice -----------------------------------------------------------------------


def test_a_key_given_twice_is_refused_naming_it_and_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("workers: 1\nlog_level: info\nworkers: 5\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path, env={})
    assert f"{path}:3:1: key workers: given twice (first on line 1)" in str(refused.value)
    # The light commands (status, list) skip the schema, not this: they would read another
    # value than the daemon (another spool); and they keep no parsed copy of such a file.
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {"XDG_RUNTIME_DIR": str(runtime)}
    with pytest.raises(ConfigError, match="key workers: given twice"):
        load_config(path, env=env, check_schema=False)
    assert not (runtime / "spoold").exists() or not list((runtime / "spoold").iterdir())
    with pytest.raises(ConfigError, match="key workers: given twice"):
        load_config(path, env=env)
    path.write_text("limits:\n  max_file_size: 1MiB\n  max_file_size: 2MiB\napi: {}\napi: {}\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path, env={})
    said = str(refused.value)
    assert "key limits.max_file_size: given twice (first on line 2)" in said, said
    assert f"{path}:5:1: key api: given twice (first on line 4)" in said, said


def test_a_merge_is_no_key_given_twice(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "retention:\n  done: &r {max_age: 30d}\n  failed:\n    <<: *r\n    max_count: 5\n"
    )
    assert load_config(path, env={}).retention is not None


def test_a_reload_of_a_file_with_a_key_given_twice_is_refused(
    setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, path = setup
    daemon = _daemon(path)
    path.write_text(path.read_text() + "workers: 7\n")
    assert daemon.reload_config() is False
    assert "key workers: given twice" in capsys.readouterr().err


# -- 4. ~ in a path -----------------------------------------------------------------------------


def test_a_tilde_in_a_path_is_the_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    root_home = Path(pwd.getpwnam("root").pw_dir)
    path = tmp_path / "config.yaml"
    path.write_text(
        "spool: ~/spool\nlogdir: ~/logs\nworkdir: '~'\nsecrets_dir: ~root/secrets\n"
        "api: {certfile: ~/tls.pem, keyfile: ~/tls.key}\n"
        "mail: {host: mail.example, ca_file: ~/ca.pem}\n"
    )
    config = load_config(path, env={})
    home = tmp_path / "home"
    assert (config.spool, config.logdir, config.workdir) == (home / "spool", home / "logs", home)
    assert config.secrets_dir == root_home / "secrets"
    assert config.api is not None and config.api.certfile == home / "tls.pem"
    assert config.api.keyfile == home / "tls.key"
    assert config.notify.mail is not None and config.notify.mail.ca_file == home / "ca.pem"
    path.write_text("logdir: ~nosuchuser123/logs\n")
    with pytest.raises(ConfigError, match=r"key logdir: .*there is no user 'nosuchuser123'"):
        load_config(path, env={})


# -- 5. an API in plain HTTP off loopback -------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(("host", "warned"), [("0.0.0.0", True), ("127.0.0.1", False)])
def test_an_api_without_tls_off_loopback_is_warned_of(
    host: str, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    from spoold.core.config import ApiSettings  # noqa: PLC0415
    from spoold.face.api.server import ApiServer  # noqa: PLC0415

    logger = logging.getLogger("round30")

    async def app(scope: object, receive: object, send: object) -> None:
        return None

    server = ApiServer(app, ApiSettings(host=host, port=_free_port()), logger)
    with caplog.at_level(logging.INFO, logger="round30"):
        server.start()
        server.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if warned:
        assert len(warnings) == 1, warnings
        assert "without TLS" in warnings[0] and "clear text" in warnings[0]
        assert "api.certfile" in warnings[0] and "api.keyfile" in warnings[0]
    else:
        assert warnings == []


def test_a_reload_that_opens_the_api_without_tls_warns(
    setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, path = setup
    daemon = _daemon(path)
    _rewrite(path, api={"listen": f"0.0.0.0:{_free_port()}"})
    assert daemon.reload_config() is True
    err = capsys.readouterr().err
    assert "WARNING" in err and "without TLS" in err and "clear text" in err, err
    assert isinstance(daemon.config, Config) and daemon.config.api is None  # at the restart
