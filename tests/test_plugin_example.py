"""The README's worked third-party executor (examples/executor-plugin/), installed as a package
of its own, offline and outside the project's venv, then run through the real command line."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from spoold.executors.base import ExecResult, Executor, RunContext

from spoold.core.clock import SystemClock
from spoold.core.joblog import JobLog
from spoold.run.registry import ExecutorRegistry

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "executor-plugin"
DATA = b"hello from spoold-checksum\n"
SHA256 = hashlib.sha256(DATA).hexdigest()
SHA512 = hashlib.sha512(DATA).hexdigest()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding only the installed example, as `pip install --target` leaves it."""
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources, and
    # several xdist workers build at once.
    source = tmp_path_factory.mktemp("source") / "executor-plugin"
    shutil.copytree(
        EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    target = tmp_path_factory.mktemp("site")
    # --no-index and --no-build-isolation: no network; the test extra installs setuptools.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-index",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        cwd=source.parent,
        env={**os.environ, "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    return target


def spoold(
    cwd: Path, *args: str, site: Path | None = None, check: int | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m spoold ARGS`` in ``cwd`` (no config.yaml there), with ``site`` importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOOLD_")}
    env.pop("PYTHONPATH", None)
    if site is not None:
        env["PYTHONPATH"] = str(site)
    run = subprocess.run(
        [sys.executable, "-m", "spoold", *args],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check is not None:
        assert run.returncode == check, run.stdout + run.stderr
    return run


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def status(spool: Path, state_dir: str, job_id: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((spool / state_dir / job_id / "status.json").read_text())
    return loaded


def log_of(spool: Path, state_dir: str, job_id: str) -> str:
    return (spool / state_dir / job_id / "log").read_text()


def test_the_example_installs_as_its_own_distribution(site: Path, tmp_path: Path) -> None:
    (dist,) = site.glob("spoold_checksum-*.dist-info")
    entry_points = (dist / "entry_points.txt").read_text()
    assert "[spoold.executors]" in entry_points
    assert "checksum = spoold_checksum:ChecksumExecutor" in entry_points
    assert (site / "spoold_checksum" / "checksum.schema.json").is_file()  # package data
    assert not (site / "spoold").exists()  # --no-deps: spoold is the project's own
    # The project's venv is untouched: without the target on the path, there is no such executor.
    job = write(tmp_path / "job.yaml", "executor: checksum\nproduct: {path: x}\n")
    run = spoold(tmp_path, "validate", str(job), check=1)
    assert "unknown executor 'checksum'" in run.stderr


def test_exec_logs_and_returns_the_digest(site: Path, tmp_path: Path) -> None:
    data = tmp_path / "release.tar"
    data.write_bytes(DATA)
    job = write(
        tmp_path / "job.yaml",
        f"job_id: sum-ok\nexecutor: checksum\nproduct:\n  path: {data}\n"
        f"  expect: {SHA256.upper()}\n",
    )
    spool = tmp_path / "spool"
    run = spoold(tmp_path, "exec", "--spool", str(spool), str(job), site=site, check=0)
    assert "job sum-ok succeeded" in run.stderr
    done = status(spool, "done", "sum-ok")
    assert done["state"] == "succeeded" and done["executor"] == "checksum"
    assert done["exit_code"] == 0 and done["error"] is None
    assert done["result"] == {
        "algorithm": "sha256",
        "digest": SHA256,
        "path": str(data),
        "size": len(DATA),
    }
    assert f"sha256 {SHA256}  {data} ({len(DATA)} bytes)" in log_of(spool, "done", "sum-ok")


def test_a_wrong_expect_fails_the_job_with_both_digests(site: Path, tmp_path: Path) -> None:
    data = tmp_path / "release.tar"
    data.write_bytes(DATA)
    wrong = "0" * 128
    job = write(
        tmp_path / "job.yaml",
        f"job_id: sum-bad\nexecutor: checksum\nproduct:\n  path: {data}\n"
        f"  algorithm: sha512\n  expect: '{wrong}'\n",
    )
    spool = tmp_path / "spool"
    run = spoold(tmp_path, "exec", "--spool", str(spool), str(job), site=site, check=1)
    error = f"sha512 of {data} is {SHA512}, expected {wrong}"
    failed = status(spool, "failed", "sum-bad")
    assert failed["state"] == "failed" and failed["exit_code"] == 1
    assert failed["error"] == error
    assert failed["result"]["digest"] == SHA512  # what it found is kept for whoever looks
    assert error in log_of(spool, "failed", "sum-bad") and error in run.stdout


def test_a_step_checks_a_file_an_earlier_step_made_in_the_work_dir(
    site: Path, tmp_path: Path
) -> None:
    job = write(
        tmp_path / "job.yaml",
        "job_id: sum-steps\nexecutor: local\nsteps:\n"
        "  - id: build\n    product:\n"
        f"      commands: mkdir -p out && printf '{DATA.decode().strip()}\\n' > out/release.tar\n"
        "  - id: verify\n    needs: [build]\n    executor: checksum\n"
        f"    product: {{path: out/release.tar, expect: '{SHA256}'}}\n"
        "  - id: escape\n    executor: checksum\n    product: {path: ../../etc/passwd}\n"
        "    continue_on_error: true\n",
    )
    spool = tmp_path / "spool"
    spoold(tmp_path, "exec", "--spool", str(spool), str(job), site=site, check=0)
    steps = status(spool, "done", "sum-steps")["steps"]
    assert steps["verify"]["state"] == "succeeded", steps
    assert steps["escape"]["error"] == "'../../etc/passwd' leaves the job's work dir", steps
    assert f"sha256 {SHA256}  out/release.tar" in log_of(spool, "done", "sum-steps")


def test_the_example_job_of_the_example_runs(site: Path, tmp_path: Path) -> None:
    job = EXAMPLE / "example-job.yaml"
    spool = tmp_path / "spool"
    spoold(tmp_path, "exec", "--spool", str(spool), str(job), site=site, check=0)
    done = spool / "done" / "checksum-example"
    assert json.loads((done / "status.json").read_text())["steps"]["verify"]["state"] == "succeeded"
    assert (done / "artifacts" / "out" / "release.txt").read_bytes() == b"hello\n"


def test_an_invalid_product_is_rejected_with_the_sub_schemas_message(
    site: Path, tmp_path: Path
) -> None:
    job = write(
        tmp_path / "job.yaml",
        "job_id: sum-invalid\nexecutor: checksum\nproduct:\n  algorithm: sha512\n",
    )
    spool = tmp_path / "spool"
    run = spoold(tmp_path, "exec", "--spool", str(spool), str(job), site=site, check=1)
    assert "missing required field 'path'" in run.stderr
    reason = json.loads((spool / "rejected" / "job.yaml" / "reason.json").read_text())
    assert reason["errors"] == [
        {"message": "missing required field 'path'", "path": "product", "line": 4, "column": 3}
    ]
    assert not (spool / "done" / "sum-invalid").exists()


def test_validate_and_schema_know_the_installed_executor(site: Path, tmp_path: Path) -> None:
    good = write(
        tmp_path / "good.yaml", f"executor: checksum\nproduct: {{path: a, expect: {SHA256}}}\n"
    )
    assert "good.yaml: valid" in spoold(tmp_path, "validate", str(good), site=site, check=0).stdout
    bad = write(
        tmp_path / "bad.yaml",
        "executor: checksum\nproduct:\n  path: a\n  algorithm: md5\n  expect: abc\n  algo: x\n",
    )
    stderr = spoold(tmp_path, "validate", str(bad), site=site, check=1).stderr
    assert (
        f"{bad}:4:14: product.algorithm: must be one of: sha256, sha512, blake3 (got 'md5')"
        in stderr
    )
    assert f"{bad}:5:11: product.expect: must be at least 64 characters long" in stderr
    assert "product.algo: unknown field 'algo' (did you mean 'algorithm'?)" in stderr
    schema = json.loads(spoold(tmp_path, "schema", site=site, check=0).stdout)
    assert "checksum" in schema["$defs"]["executor"]["enum"]
    assert schema["$defs"]["product.checksum"]["required"] == ["path"]


@pytest.mark.skipif(importlib.util.find_spec("blake3") is not None, reason="blake3 is installed")
def test_a_missing_optional_sdk_fails_the_job_naming_the_extra(site: Path, tmp_path: Path) -> None:
    data = tmp_path / "release.tar"
    data.write_bytes(DATA)
    job = write(
        tmp_path / "job.yaml",
        f"job_id: sum-sdk\nexecutor: checksum\nproduct:\n  path: {data}\n  algorithm: blake3\n",
    )
    spool = tmp_path / "spool"
    spoold(tmp_path, "exec", "--spool", str(spool), str(job), site=site, check=1)
    failed = status(spool, "failed", "sum-sdk")
    assert failed["error"] == "blake3 is not available. Run `pip install spoold-checksum[blake3]`"


class _SteppingClock(SystemClock):
    """Ten seconds pass at every look at the monotonic clock."""

    def __init__(self) -> None:
        self._seconds = 0.0

    def monotonic(self) -> float:
        self._seconds += 10.0
        return self._seconds


def _checksum_executor(site: Path, monkeypatch: pytest.MonkeyPatch) -> Executor:
    """The executor as spoold loads it: through the entry point, type-checked on the way."""
    monkeypatch.syspath_prepend(str(site))
    registry = ExecutorRegistry.from_entry_points()
    assert "checksum" in registry.names()
    assert Path(inspect.getfile(registry.get("checksum"))).is_relative_to(site)
    return registry.create("checksum")


def _run(executor: Executor, workdir: Path, **overrides: Any) -> tuple[ExecResult, str]:
    buffer = io.BytesIO()
    fields: dict[str, Any] = {
        "job_id": "t",
        "executor": "checksum",
        "type": None,
        "product": {"path": "f"},
        "workdir": workdir,
        "env": {},
        "log": JobLog(buffer, SystemClock()),
        "clock": SystemClock(),
        "timeout": None,
        "kill_grace": 1.0,
        "cancel": threading.Event(),
    }
    fields.update(overrides)
    return executor.run(RunContext(**fields)), buffer.getvalue().decode()


def test_the_executor_honours_cancel_and_timeout(
    site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    executor = _checksum_executor(site, monkeypatch)
    (tmp_path / "f").write_bytes(DATA)
    cancel = threading.Event()
    cancel.set()
    result, _ = _run(executor, tmp_path, cancel=cancel)
    assert (result.cancelled, result.error, result.result) == (True, "cancelled", {})
    result, _ = _run(executor, tmp_path, timeout=5.0, clock=_SteppingClock())
    assert (result.timed_out, result.error) == (True, "timed out after 5s")
    result, log = _run(executor, tmp_path, product={"path": "missing"})
    assert not result.succeeded and result.error == "missing: no such file (or not a regular file)"
    assert result.error in log
    result, _ = _run(executor, tmp_path, product={"path": "f", "algorithm": "sha512"})
    assert result.succeeded and result.result["digest"] == SHA512
