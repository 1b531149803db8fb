"""Configuration: file, environment and flags; an invalid config names the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from spoold.core.config import load_config
from spoold.core.errors import ConfigError


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_values_from_the_file_are_parsed(tmp_path: Path) -> None:
    path = _write(tmp_path, "workers: 4\nkill_grace: 1m30s\nlimits: {max_file_size: 2MiB}\n"
                            "global_before_script: [set -u, umask 077]\nworkdir: work\nfsync: false\n"
                            "worker_idle_exit: 2m\n")  # fmt: skip
    config = load_config(path, env={})
    assert (config.workers, config.kill_grace, config.max_file_size) == (4, 90.0, 2 * 1024 * 1024)
    assert config.worker_idle_exit == 120.0
    assert config.global_before_script == ("set -u", "umask 077")
    assert config.workdir == tmp_path / "work"  # relative to the config file
    assert config.durable is False


def test_environment_overrides_the_file_and_flags_override_both(tmp_path: Path) -> None:
    path = _write(tmp_path, "spool: from-file\nworker_id: file-id\n")
    env = {"SPOOLD_SPOOL": "/env/spool", "RUNNER_ID": "r-7", "RUNNER_HOSTNAME": "h-7",
           "RUNNER_WORKDIR": "/w", "RUNNER_LOG_DIR": "/l", "RUNNER_LOG_SOCKET": "/s"}  # fmt: skip
    config = load_config(path, env=env)
    assert (str(config.spool), config.worker_id, config.hostname) == ("/env/spool", "r-7", "h-7")
    assert (config.workdir, config.logdir, config.log_socket) == (
        Path("/w"),
        Path("/l"),
        Path("/s"),
    )
    assert load_config(path, env=env, spool=Path("/flag")).spool == Path("/flag")


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("workerz: 2\n", "unknown key workerz"),
        ("workers: 0\n", "key workers"),
        ("watch: sometimes\n", "key watch"),
        ("kill_grace: soon\n", "key kill_grace"),
        ("limits: {max_file_size: huge}\n", "key limits.max_file_size"),
        ("limits: {max_filesize: 1k}\n", "unknown key limits.max_filesize"),
        ("- a list\n", "must be a mapping"),
        ("workers: [\n", "cannot read"),
    ],
)
def test_an_invalid_config_names_the_key(tmp_path: Path, text: str, names: str) -> None:
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        load_config(_write(tmp_path, text), env={})


def test_the_daemon_refuses_to_start_on_an_invalid_config(tmp_path: Path) -> None:
    path = _write(tmp_path, "workers: many\n")
    result = subprocess.run([sys.executable, "-m", "spoold", "run", "--config", str(path), "--spool",
                             str(tmp_path / "s")], capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 2
    assert "configuration error" in result.stderr and "key workers" in result.stderr


def test_a_missing_explicit_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", env={})


def test_each_executor_gets_its_own_settings(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("executors: {ssh: {trust_on_first_use: true}, mine: {endpoint: x}}\n")
    assert load_config(path, env={}).executor_settings == {
        "ssh": {"trust_on_first_use": True}, "mine": {"endpoint": "x"},
    }  # fmt: skip
    path.write_text("executors: {ssh: true}\n")
    with pytest.raises(ConfigError, match=r"executors\.ssh"):
        load_config(path, env={})


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("workers: many\n", "key workers"),
        ("workers: true\n", "key workers"),
        ("watch: [inotify]\n", "key watch"),
        ("kill_grace: soon\n", "key kill_grace"),
        ("limits: 5\n", "key limits"),
        ("limits: {max_file_size: huge}\n", "key limits.max_file_size"),
        ("limits: {executors: {proxmox: two}}\n", "key limits.executors.proxmox"),
        ("fsync: maybe\n", "key fsync"),
        ("spool: 5\n", "key spool"),
        ("allowed_run_as: alice\n", "key allowed_run_as"),
        ("executors: {ssh: true}\n", "key executors.ssh"),
        ("callbacks: {timeout: soon}\n", "key callbacks.timeout"),
        ("retention: {done: {max_age: forever}}\n", "key retention.done.max_age"),
        ("global_before_script: {a: b}\n", "key global_before_script"),
        ("default_callback_url: https://x.example\n", "key default_callback_url"),
        ("- a list\n", "must be a mapping"),
        ("workers: [\n", "cannot read"),
    ],
)
def test_without_the_schema_check_a_bad_value_still_names_its_key(
    tmp_path: Path, text: str, names: str
) -> None:
    """The light commands skip the schema; a value they cannot use is still said as the full
    check says it, naming the key, never a traceback."""
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")) as unchecked:
        load_config(path, env={}, check_schema=False)
    with pytest.raises(ConfigError) as checked:
        load_config(path, env={})
    assert str(unchecked.value) == str(checked.value)


def test_without_the_schema_check_values_are_read_as_with_it(tmp_path: Path) -> None:
    path = _write(tmp_path, "workers: 4\nkill_grace: 1m30s\nlimits: {max_file_size: 2MiB, "
                            "executors: {proxmox: 2}}\nspool: s\nfsync: false\n"
                            "callbacks: {timeout: 5s, backoff: {max: 1h}}\n"
                            "retention: {done: {max_age: 30d}}\nallowed_run_as: [alice]\n"
                            "executors: {ssh: {trust_on_first_use: true}}\n"
                            "global_before_script: set -u\nworker_processes: 2.0\n")  # fmt: skip
    config = load_config(path, env={}, check_schema=False)
    assert config == load_config(path, env={})
    assert (config.workers, config.worker_processes, config.spool) == (4, 2, tmp_path / "s")


def test_without_the_schema_check_an_unknown_key_is_left_to_the_full_check(
    tmp_path: Path,
) -> None:
    """`spoold status` still works with a config the daemon would refuse for a stray key."""
    path = _write(tmp_path, "workerz: 2\nworkers: 3\n")
    assert load_config(path, env={}, check_schema=False).workers == 3
    with pytest.raises(ConfigError, match="unknown key workerz"):
        load_config(path, env={})


def test_the_light_commands_take_a_config_without_jsonschema(tmp_path: Path) -> None:
    """check_schema=False reads the file without jsonschema, spoold.core.documents or the sender;
    a bad value loads jsonschema only to say what is wrong."""
    good = _write(tmp_path, "workers: 3\ncallbacks: {workers: 2}\n")
    program = (
        "import sys; from pathlib import Path; from spoold.core.config import load_config; "
        f"load_config(Path({str(good)!r}), env={{}}, check_schema=False); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'jsonschema' "
        "or m in ('spoold.core.documents', 'spoold.out.sender', 'spoold.out.outbox')))"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=60, check=True)  # fmt: skip
    assert done.stdout.strip() == "[]", done.stdout


def test_a_light_command_on_a_bad_config_says_which_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "workers: many\n")
    result = subprocess.run([sys.executable, "-m", "spoold", "status", "--config", str(path),
                             "--spool", str(tmp_path / "s")], capture_output=True, text=True,
                            timeout=60, check=False)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "configuration error" in result.stderr and "key workers" in result.stderr
    assert "Traceback" not in result.stderr
