"""A built wheel carries the executors and schemas inside the spoold namespace, and works."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _copy_sources(target: Path) -> None:
    """The checkout's files as ``make deb`` takes them (tracked, and untracked but not
    ignored), without its environments, caches and build output."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout  # fmt: skip
    for name in filter(None, os.fsdecode(listed).split("\0")):
        source = ROOT / name
        if source.is_symlink() or source.is_file():  # a tracked file deleted meanwhile: none
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name, follow_symlinks=False)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    # Built from a copy: setuptools builds in the source tree's build/, and two test workers
    # that each need the wheel (this fixture is per module, and per xdist worker) raced there
    # ("File exists: build/bdist.linux-x86_64/wheel/spoold-0.1.0.dist-info", seen in CI).
    source = build / "source"
    _copy_sources(source)
    # --no-build-isolation: the test extra installs setuptools, so no index is needed here.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(out), str(source)],
        check=True, cwd=build, env={**os.environ, "PIP_NO_INPUT": "1"},
    )  # fmt: skip
    (found,) = out.glob("spoold-*.whl")
    return found


def test_the_wheel_holds_executors_and_schemas_inside_spoold(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "spoold/executors/__init__.py", "spoold/executors/base.py", "spoold/executors/local.py",
        "spoold/executors/custom.py", "spoold/schemas/job.schema.json", "spoold/schemas/config.schema.json",
        "spoold/schemas/executors/local.schema.json", "spoold/schemas/executors/custom.schema.json",
        "spoold/py.typed",
    ):  # fmt: skip
        assert expected in names, expected
    tops = {name.split("/", 1)[0] for name in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"spoold"}, tops
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[spoold.executors]" in text and "local = spoold.executors.local:LocalExecutor" in text


def test_the_installed_wheel_loads_its_plugins_and_runs_a_job(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                    str(target), str(wheel)], check=True)  # fmt: skip
    # PYTHONPATH puts the installed copy ahead of the development checkout.
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = (
        "import spoold, spoold.executors.local as l; from spoold.run.registry import ExecutorRegistry;"
        "from spoold.intake.validation import job_validator; r = ExecutorRegistry.from_entry_points();"
        "job_validator(r); print(spoold.__file__); print(l.__file__); print(','.join(r.names()))"
    )
    result = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, check=True,
                            capture_output=True, text=True)  # fmt: skip
    package, executor, names = result.stdout.split()
    assert package.startswith(str(target)) and executor.startswith(str(target))
    assert names.split(",") == [
        "custom",
        "docker",
        "lexware",
        "local",
        "proxmox",
        "sevdesk",
        "ssh",
        "swarm",
    ]
    job = tmp_path / "job.yaml"
    job.write_text("job_id: from-wheel\nexecutor: local\nproduct: {commands: 'echo wheel-ok'}\n")
    run = subprocess.run([sys.executable, "-m", "spoold", "exec", "--spool", str(tmp_path / "spool"), str(job)],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "INFO wheel-ok" in run.stdout
    assert not (target / "executors").exists() and not (target / "schemas").exists()
