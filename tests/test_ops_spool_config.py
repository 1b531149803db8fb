"""Operating a spool: what `spoold init` may touch, what the daemon refuses at start (a state
directory on another filesystem, durations that would spin), spoold's own log file across a
rotation, and the exit codes and messages of a spool or config that cannot be used."""

from __future__ import annotations

import contextlib
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from spoold.core.config import Config, load_config
from spoold.core.errors import ConfigError
from spoold.core.own_log import close_logging, configure_logging
from spoold.core.spool import NotASpool, Spool
from tests.harness import run_cli, tmpfs, write_config

ROOT = Path(__file__).resolve().parent.parent


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- 1. init never takes over someone else's directory ------------------------------------------


def test_init_refuses_a_non_empty_directory_that_is_no_spool(tmp_path: Path) -> None:
    """A careless `--spool /tmp`: a 1777 directory with others' files is left as it was."""
    public = tmp_path / "public"
    public.mkdir()
    public.chmod(0o1777)
    (public / "someone_elses_file").write_text("x")
    result = run_cli(public, "init")
    assert result.returncode == 2, result.stderr
    assert "is not empty and is not a spool" in result.stderr
    assert "someone_elses_file" in result.stderr
    assert _mode(public) == 0o1777  # not chmodded
    assert sorted(p.name for p in public.iterdir()) == ["someone_elses_file"]


def test_init_says_each_mode_it_changes(tmp_path: Path) -> None:
    """An empty directory (made by an admin, 0777) becomes a spool; its mode is tightened and
    that is said. A checkout's spool/ with its README is a place for a spool too."""
    empty = tmp_path / "empty"
    empty.mkdir()
    empty.chmod(0o777)
    (empty / "README.md").write_text("the spool lives here\n")
    result = run_cli(empty, "init")
    assert result.returncode == 0, result.stderr
    assert f"{empty}: mode 0777 -> 0750" in result.stderr
    assert _mode(empty) == 0o750
    assert (empty / "pending").is_dir()


def test_init_fixes_the_modes_run_refuses(tmp_path: Path) -> None:
    """pending/ 0777: init said "spool ready" and `run` refused the spool."""
    root = tmp_path / "spool"
    Spool(root).init()
    (root / "pending").chmod(0o777)
    result = run_cli(root, "init")
    assert result.returncode == 0, result.stderr
    assert "pending: mode 0777 -> 0755" in result.stderr
    assert Spool(root).unsafe_permissions() == []


def test_a_file_where_a_state_directory_belongs_is_named_with_its_fix(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    Spool(root).init()
    (root / "done").rmdir()
    (root / "done").write_text("")
    for command in ("status", "init"):
        result = run_cli(root, command)
        assert result.returncode == 2, (command, result.stderr)
        assert f"{root / 'done'} is not a directory" in result.stderr, command
        assert f"mv {root / 'done'}" in result.stderr, command
        assert "File exists" not in result.stderr


# -- 4. a state directory on another filesystem ------------------------------------------------


def test_a_state_directory_on_another_filesystem_is_refused_at_start(tmp_path: Path) -> None:
    """Every finish is a rename into done/: across filesystems, EXDEV, every 10 s, for ever."""
    root = tmp_path / "spool"
    Spool(root).init()
    config = write_config(tmp_path / "config.yaml", root, workdir=str(tmp_path / "work"))
    with tmpfs(root / "done", "1m", 0o750):
        with pytest.raises(NotASpool, match="done is on another filesystem"):
            Spool(root).check_filesystems()
        result = run_cli(root, "run", "--config", str(config), bound=60)
        assert result.returncode == 2, result.stderr
        assert f"{root / 'done'} is on another filesystem" in result.stderr
        assert "unmount it" in result.stderr


# -- 9. a read-only spool, a config that names no file, a logdir that is a file ----------------


@contextlib.contextmanager
def _read_only_view(source: Path, view: Path) -> Iterator[None]:
    """``source`` seen read-only at ``view`` (a bind mount, root only), always unmounted."""
    view.mkdir()
    bound = subprocess.run(["mount", "--bind", str(source), str(view)], capture_output=True,
                           check=False)  # fmt: skip
    if bound.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {bound.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(view)], check=False)


def test_a_read_only_spool_is_a_permission_error_that_names_the_path(tmp_path: Path) -> None:
    source = tmp_path / "source"
    Spool(source / "spool").init()
    job = tmp_path / "r1.yaml"
    job.write_text("job_id: r1\nexecutor: local\nproduct: {commands: 'true'}\n")
    with _read_only_view(source, tmp_path / "ro"):
        root = tmp_path / "ro" / "spool"
        config = write_config(tmp_path / "config.yaml", root, workdir=str(tmp_path / "work"))
        for args in (("submit", str(job)), ("run",)):
            result = run_cli(root, *args, "--config", str(config), bound=60)
            assert result.returncode == 2, (args, result.stderr)
            assert "Read-only file system" in result.stderr
            assert str(root) in result.stderr
            assert "remount it read-write" in result.stderr


def test_a_config_that_is_a_directory_is_said_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory: --config names the file"):
        load_config(tmp_path)


def test_a_logdir_that_is_a_file_names_the_key(tmp_path: Path) -> None:
    taken = tmp_path / "logs"
    taken.write_text("")
    with pytest.raises(ConfigError, match=r"key logdir: .* is not a directory"):
        configure_logging(Config(logdir=taken))
    close_logging()


# -- 2. spoold's own log across a rotation -----------------------------------------------------


def test_the_own_log_file_is_reopened_after_logrotate_moves_it(tmp_path: Path) -> None:
    logger = configure_logging(Config(logdir=tmp_path))
    try:
        logger.warning("before the rotation")
        (tmp_path / "spoold.log").rename(tmp_path / "spoold.log.1")
        logger.warning("after the rotation")
    finally:
        close_logging()
    assert "after the rotation" not in (tmp_path / "spoold.log.1").read_text()
    assert "after the rotation" in (tmp_path / "spoold.log").read_text()


# -- 3. durations that would spin ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("poll_interval: 0\n", "poll_interval"),
        ("poll_interval: 0s\n", "poll_interval"),
        ("rescan_interval: 0ms\n", "rescan_interval"),
        ("heartbeat_interval: 0\n", "heartbeat_interval"),
        ("callbacks: {timeout: 0}\n", "callbacks.timeout"),
        ("callbacks: {backoff: {initial: 0s}}\n", "callbacks.backoff.initial"),
    ],
)
@pytest.mark.parametrize("checked", [True, False])
def test_a_duration_that_would_spin_is_refused_naming_its_key(
    tmp_path: Path, text: str, key: str, checked: bool
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=f"key {key}"):
        load_config(config, env={}, check_schema=checked)


def test_lease_timeout_must_exceed_heartbeat_interval(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("heartbeat_interval: 90s\n")
    with pytest.raises(ConfigError, match=r"key lease_timeout: 60s \(the default\) must exceed"):
        load_config(config, env={})
    config.write_text("heartbeat_interval: 10s\nlease_timeout: 10s\n")
    with pytest.raises(ConfigError, match="key lease_timeout: 10s must exceed"):
        load_config(config, env={})
    config.write_text("heartbeat_interval: 10s\nlease_timeout: 11s\nworker_idle_exit: 0\n")
    assert load_config(config, env={}).lease_timeout == 11.0  # and 0 stays where it means


def test_a_reload_with_a_zero_interval_keeps_the_config_in_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from spoold.daemon import Daemon  # noqa: PLC0415
    from tests.daemon_bench import InlineWorkers  # noqa: PLC0415

    root = tmp_path / "spool"
    Spool(root).init()
    path = write_config(tmp_path / "config.yaml", root, workdir=str(tmp_path / "work"))
    daemon = Daemon.build(load_config(path, env={}), make_workers=InlineWorkers)
    path.write_text(path.read_text().replace("poll_interval: 200ms", "poll_interval: 0s"))
    assert daemon.reload_config() is False
    assert "config not reloaded, the old one stays in use: key poll_interval" in (
        capsys.readouterr().err
    )
    assert daemon.config.poll_interval == 0.2
    close_logging()


# -- 10. what the documents say ----------------------------------------------------------------


def test_the_documents_say_which_keys_a_reload_applies_and_where_work_dirs_are() -> None:
    packaged = (ROOT / "packaging" / "config.yaml").read_text()
    assert "Changes take effect at the next `systemctl restart spoold`." not in packaged
    assert "systemctl reload spoold" in packaged and "shutdown_grace" in packaged
    schema = (ROOT / "schemas" / "config.schema.json").read_text()
    assert "work/ inside each running job's directory" not in schema
    assert "/tmp/spoold-work-<uid>" in schema
    readme = (ROOT / "README.md").read_text()
    assert "/var/log/spoold/spoold.log {" in readme
    assert "taken from the\nconfig file's directory" in readme
