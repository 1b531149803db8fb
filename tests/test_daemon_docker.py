"""Docker jobs on the real daemon and a real engine: nothing is left behind, even after kill -9."""

from __future__ import annotations

import importlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from spoold.executors.docker import LABEL_JOB, LABEL_SPOOL

from tests.harness import DaemonProcess, drop, job_state, wait_finished, wait_for, write_config

pytestmark = pytest.mark.daemon


@pytest.fixture
def engine(dockerd: str) -> Iterator[Any]:
    client = importlib.import_module("docker").from_env()
    yield client
    client.close()


def _containers(engine: Any, job_id: str) -> list[Any]:
    return list(engine.containers.list(all=True, filters={"label": f"{LABEL_JOB}={job_id}"}))


def test_a_docker_job_runs_and_its_container_goes(
    dockerd: str, engine: Any, spool_dir: Path, daemon: DaemonProcess
) -> None:
    job_id = f"box-{uuid.uuid4().hex[:8]}"
    drop(spool_dir, "box.yaml", {
        "job_id": job_id, "executor": "docker", "variables": {"WHO": "spoold"},
        "product": {"image": dockerd, "script": 'mkdir -p out; echo "hi $WHO" | tee out/r.txt'},
        "artifacts": [{"path": "out/*.txt"}],
    })  # fmt: skip
    directory, status = wait_finished(spool_dir, job_id)
    assert directory == "done", status
    assert "hi spoold" in (spool_dir / "done" / job_id / "log").read_text()
    assert (
        spool_dir / "done" / job_id / "artifacts" / "out" / "r.txt"
    ).read_text() == "hi spoold\n"
    assert _containers(engine, job_id) == []


def test_recovery_removes_the_container_of_a_job_whose_daemon_was_killed(
    dockerd: str, engine: Any, spool_dir: Path, tmp_path: Path
) -> None:
    job_id = f"box-{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path / "config.yaml", spool_dir)
    first = DaemonProcess(spool_dir, config)
    first.start()
    try:
        drop(spool_dir, "box.yaml", {
            "job_id": job_id, "executor": "docker", "on_interrupt": "fail",
            "product": {"image": dockerd, "script": "echo up; sleep 300"},
        })  # fmt: skip
        wait_for(lambda: "up" in _log(spool_dir, job_id), what="the container's first line")
        (container,) = _containers(engine, job_id)
        assert container.labels[LABEL_SPOOL] == str(spool_dir.resolve())
    finally:
        first.kill()
    assert _containers(engine, job_id), "the container outlived its daemon: the case to recover"
    second = DaemonProcess(spool_dir, config)
    second.start()
    try:
        directory, status = wait_finished(spool_dir, job_id)
        assert directory == "failed" and "interrupted" in str(status["error"]), status
        wait_for(lambda: not _containers(engine, job_id), what="the leftover container removed")
    finally:
        second.kill()


def _log(spool: Path, job_id: str) -> str:
    found = job_state(spool, job_id)
    if found is None:
        return ""
    try:
        return (spool / found[0] / job_id / "log").read_text()
    except FileNotFoundError:
        return ""
