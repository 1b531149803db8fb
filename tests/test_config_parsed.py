"""The parsed copy of the config file (spoold.core.parsed): used only for the exact text it was made
from, kept only in the user's own runtime directory, never trusted when anyone else could
have written it."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spoold.core import parsed
from spoold.core.config import load_config
from spoold.core.parsed import recall, remember

NOBODY = 65534


@pytest.fixture
def runtime(tmp_path: Path) -> dict[str, str]:
    directory = tmp_path / "run-user"
    directory.mkdir(mode=0o700)
    return {"XDG_RUNTIME_DIR": str(directory)}


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def _copy(runtime: dict[str, str]) -> Path:
    (copy,) = Path(runtime["XDG_RUNTIME_DIR"], "spoold").iterdir()
    return copy


def test_a_light_command_with_a_config_file_reads_no_yaml_the_second_time(
    tmp_path: Path, runtime: dict[str, str]
) -> None:
    config = _config(tmp_path, "spool: elsewhere\nworkers: 3\n")
    probe = (
        "import sys; from pathlib import Path; from spoold.core.config import load_config; "
        f"c = load_config(Path({str(config)!r}), check_schema=False); "
        "print(c.workers, c.spool.name, 'yaml' in sys.modules)"
    )
    env = {**os.environ, **runtime}
    command = [sys.executable, "-c", probe]
    runs = [
        subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.split()
        for _ in range(2)
    ]
    assert runs == [["3", "elsewhere", "True"], ["3", "elsewhere", "False"]]
    assert _copy(runtime).stat().st_mode & 0o777 == 0o600
    assert Path(runtime["XDG_RUNTIME_DIR"], "spoold").stat().st_mode & 0o777 == 0o700


def test_an_edit_is_seen_at_once_whatever_the_timestamps_say(
    tmp_path: Path, runtime: dict[str, str]
) -> None:
    config = _config(tmp_path, "workers: 3\n")
    assert load_config(config, env=runtime).workers == 3
    before = config.stat()
    config.write_text("workers: 4\n")  # same size
    os.utime(config, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert load_config(config, env=runtime).workers == 4


def test_a_copy_anyone_else_could_have_written_is_not_trusted(
    tmp_path: Path, runtime: dict[str, str]
) -> None:
    config = _config(tmp_path, "workers: 3\n")
    load_config(config, env=runtime)
    copy = _copy(runtime)
    forged = json.loads(copy.read_text())
    forged["document"] = {"workers": 9}
    copy.write_text(json.dumps(forged))
    assert load_config(config, env=runtime).workers == 9  # the copy is what is read...
    for mode in (0o644, 0o620, 0o606):
        copy.chmod(mode)  # ...unless others may write it, or read it
        assert recall(config, "workers: 3\n", runtime) is None
    copy.chmod(0o600)
    os.chown(copy, NOBODY, -1)  # another user's
    assert recall(config, "workers: 3\n", runtime) is None
    os.chown(copy, os.geteuid(), -1)
    copy.parent.chmod(0o777)  # a directory others may write in
    assert recall(config, "workers: 3\n", runtime) is None
    copy.parent.chmod(0o700)
    assert recall(config, "workers: 3\n", runtime) == {"workers": 9}


def test_a_symlink_in_place_of_the_copy_is_not_followed(
    tmp_path: Path, runtime: dict[str, str]
) -> None:
    config = _config(tmp_path, "workers: 3\n")
    load_config(config, env=runtime)
    copy = _copy(runtime)
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(copy.read_text().replace('"workers": 3', '"workers": 9'))
    elsewhere.chmod(0o600)
    copy.unlink()
    copy.symlink_to(elsewhere)
    assert load_config(config, env=runtime).workers == 3
    assert not copy.is_symlink()  # replaced by a real copy, the target untouched
    assert '"workers": 9' in elsewhere.read_text()


def test_a_runtime_directory_of_someone_else_is_left_alone(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    (theirs / "spoold").mkdir(parents=True, mode=0o700)
    os.chown(theirs / "spoold", NOBODY, -1)
    config = _config(tmp_path, "workers: 3\n")
    assert load_config(config, env={"XDG_RUNTIME_DIR": str(theirs)}).workers == 3
    assert list((theirs / "spoold").iterdir()) == []


def test_without_the_variable_the_runtime_directory_is_logind_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(parsed, "RUN_USER", tmp_path / "run" / "user")
    config = _config(tmp_path, "workers: 3\n")
    assert load_config(config, env={}).workers == 3
    assert not (tmp_path / "run").exists()  # none made: logind makes it, at login
    mine = tmp_path / "run" / "user" / str(os.geteuid())
    mine.mkdir(parents=True, mode=0o700)
    assert load_config(config, env={}).workers == 3
    assert [p.name for p in (mine / "spoold").iterdir()] == [parsed._name(config)]


def test_nothing_is_kept_without_a_runtime_directory_or_for_what_json_cannot_hold(
    tmp_path: Path, runtime: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(parsed, "RUN_USER", tmp_path / "run" / "user")
    config = _config(tmp_path, "workers: 3\n")
    assert load_config(config, env={}).workers == 3
    assert not (tmp_path / "run").exists()
    assert load_config(config, env={"XDG_RUNTIME_DIR": "relative/dir"}).workers == 3
    assert not Path("relative").exists()
    for document in ({"since": datetime.date(2026, 1, 1)}, {1: "a"},
                     {"x": float("nan")}, {"x": b"bytes"}):  # fmt: skip
        remember(config, "x", document, runtime)
    assert not Path(runtime["XDG_RUNTIME_DIR"], "spoold").exists()
    remember(config, "a: [1, 2.5, true, null]", {"a": [1, 2.5, True, None]}, runtime)
    assert recall(config, "a: [1, 2.5, true, null]", runtime) == {"a": [1, 2.5, True, None]}
    assert recall(config, "a: [1, 2.5, true, null] ", runtime) is None  # other text


def test_a_copy_made_by_another_spoold_is_not_used(tmp_path: Path, runtime: dict[str, str]) -> None:
    config = _config(tmp_path, "workers: 3\n")
    load_config(config, env=runtime)
    copy = _copy(runtime)
    kept = json.loads(copy.read_text())
    kept["key"]["spoold"] = "0.0.1"
    kept["document"] = {"workers": 9}
    copy.write_text(json.dumps(kept))
    assert load_config(config, env=runtime).workers == 3
