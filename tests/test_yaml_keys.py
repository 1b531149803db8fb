"""A plain key that YAML 1.1 reads as a boolean is a name: the spec's own notification example
(`on: [failed]`, unquoted) was refused in a job file ("notify[0][true]: unknown field true")
and stopped spoold as a config ("unknown key notify.0.True")."""

from __future__ import annotations

from pathlib import Path

import pytest

from spoold.core.config import load_config
from spoold.core.documents import read_yaml
from tests.harness import run_cli

NOTIFY = """\
notify:
  - webhook: {url: "http://127.0.0.1:9/hook", format: slack}
    on: [failed, cancelled]
"""


@pytest.mark.parametrize("key", ["on", "off", "yes", "no", "y", "n", "On", "YES", "true", "False"])
def test_a_plain_key_is_the_name_written(key: str) -> None:
    document, duplicates = read_yaml(f"{key}: 1\n")
    assert document == {key: 1} and duplicates == []


def test_only_keys_change_and_a_name_written_twice_is_a_duplicate() -> None:
    document, duplicates = read_yaml('x: on\ny: "on"\non: 1\n"on": 2\n')
    assert document == {"x": True, "y": "on", "on": 2}
    assert duplicates == ["on"]


def test_the_specs_notification_example_validates_as_a_job_file(
    spool_dir: Path, tmp_path: Path
) -> None:
    job = tmp_path / "notified.yaml"
    job.write_text("job_id: notified\nexecutor: local\nproduct: {commands: 'true'}\n" + NOTIFY)
    result = run_cli(spool_dir, "validate", str(job))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_readmes_notification_example_loads_as_a_config(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"spool: {tmp_path / 'spool'}\n" + NOTIFY)
    (target,) = load_config(path).notify.defaults
    assert target.on == frozenset({"failed", "cancelled"})
