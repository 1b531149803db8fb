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


# -- one finder of keys given twice, one reading of keys, for refusals' positions too --------
#
# Found while folding the three finders of a key given twice (the config's, the job loader's,
# and the one that says where): the last read a plain ``on:`` as True, so a refusal inside a
# notification's ``on:`` pointed at the notification, not at the value, and ``on:`` beside
# ``"on":`` was refused without saying where.

NOTIFIED = "job_id: n\nexecutor: local\nproduct: {commands: 'true'}\nnotify:\n  - webhook: {url: 'http://127.0.0.1:9/hook'}\n"


@pytest.mark.parametrize(
    ("notify_on", "said"),
    [
        ("    on: [exploded]\n", "6:10: notify[0].on[0]: must be one of"),
        ('    on: [failed]\n    "on": [succeeded]\n',
         "7:5: notify[0].on: duplicate key 'on' (first on line 6)"),
    ],
    ids=["a refusal under a plain on: at its value", "on: beside \"on\": where given twice"],
)  # fmt: skip
def test_a_refusal_under_a_plain_on_says_where(
    spool_dir: Path, tmp_path: Path, notify_on: str, said: str
) -> None:
    job = tmp_path / "notified.yaml"
    job.write_text(NOTIFIED + notify_on)
    result = run_cli(spool_dir, "validate", str(job))
    assert f"{job}:{said}" in result.stderr, result.stderr


def test_a_key_a_merge_brings_and_the_mapping_overrides_is_no_duplicate() -> None:
    text = "base: &b {x: 1, y: 2}\nit:\n  <<: *b\n  x: 3\n"
    document, duplicates = read_yaml(text)
    assert document["it"] == {"x": 3, "y": 2} and duplicates == []
