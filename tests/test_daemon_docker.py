"""Docker jobs on the real daemon and a real engine: nothing is left behind, even after kill -9."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from spoold.executors.docker import LABEL_HOST, LABEL_JOB, LABEL_SPOOL

from tests.harness import (
    DaemonProcess,
    drop,
    gate_wait,
    job_log,
    killed_once_logged,
    wait_finished,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.daemon


def _containers(engine: Any, job_id: str) -> list[Any]:
    return list(engine.containers.list(all=True, filters={"label": f"{LABEL_JOB}={job_id}"}))


def test_a_docker_job_runs_and_its_container_goes(
    dockerd: str, client: Any, spool_dir: Path, daemon: DaemonProcess
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
    assert _containers(client, job_id) == []


def _killed_while_a_container_runs(
    spool: Path, config: Path, image: str, script: str, mounts: tuple[str, ...] = ()
) -> str:
    """A docker job started, and its daemon killed once the container printed ``up``."""
    job_id = f"box-{uuid.uuid4().hex[:8]}"
    product: dict[str, Any] = {"image": image, "script": script}
    if mounts:
        product["mounts"] = list(mounts)
    document = {"job_id": job_id, "executor": "docker", "product": product}
    killed_once_logged(spool, config, document, "INFO up")
    return job_id


def test_a_container_outlives_a_killed_daemon_and_the_next_one_reattaches(
    dockerd: str, client: Any, spool_dir: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "config.yaml", spool_dir)
    gate = tmp_path / "gate"
    gate.mkdir(mode=0o777)
    script = f"echo up; {gate_wait('/gate/go')}; echo down"  # runs until re-attached to
    job_id = _killed_while_a_container_runs(
        spool_dir, config, dockerd, script, mounts=(f"{gate}:/gate",)
    )
    (container,) = _containers(client, job_id)  # it outlived its daemon
    assert container.labels[LABEL_SPOOL] == str(spool_dir.resolve())
    second = DaemonProcess(spool_dir, config)
    second.start()
    try:
        wait_for(
            lambda: "re-attached to container" in job_log(spool_dir, job_id),
            what="the re-attach",
        )
        (gate / "go").touch()
        directory, status = wait_finished(spool_dir, job_id)
        assert (directory, status["exit_code"], len(status["attempts"])) == ("done", 0, 1), status
        log = job_log(spool_dir, job_id)
        assert log.count("INFO up") == 1 and log.count("INFO down") == 1, log
        wait_for(lambda: not _containers(client, job_id), what="the container removed")
    finally:
        (gate / "go").touch()
        second.kill()


def test_recovery_removes_the_container_of_a_job_another_host_took_over(
    dockerd: str, client: Any, spool_dir: Path, tmp_path: Path
) -> None:
    """This host's daemon died with a container running; another host (b) took the job over
    meanwhile (its fence, its lease: it runs the job itself). This host's next start removes
    its own container of the job, not leaving it to run beside b's run. Its lease_timeout is
    long: it takes nothing over from b within the test, so the job stays in running/."""
    config = write_config(tmp_path / "config.yaml", spool_dir, lease_timeout="10m")
    job_id = _killed_while_a_container_runs(spool_dir, config, dockerd, "echo up; sleep 300")
    (container,) = _containers(client, job_id)
    running = spool_dir / "running" / job_id
    lease = json.loads((running / "lease").read_text())
    assert container.labels[LABEL_HOST] == lease["host"]
    held = lease["generation"]
    (running / f"fenced.{held}").write_text(json.dumps({"by": "b", "from": lease["host"]}))
    (running / "lease").write_text(json.dumps({"host": "b", "generation": held + 1, "beat": 0}))
    second = DaemonProcess(spool_dir, config)
    second.start()
    try:
        wait_for(lambda: not _containers(client, job_id), what="this host's container removed")
        assert running.is_dir(), "the job is b's, still running there"
    finally:
        second.kill()


def test_recovery_removes_the_container_of_a_job_no_longer_running(
    dockerd: str, client: Any, spool_dir: Path, tmp_path: Path
) -> None:
    """A container whose job left running/ while no daemon ran (purged, or recorded by
    another host) is removed at the next start."""
    config = write_config(tmp_path / "config.yaml", spool_dir)
    job_id = _killed_while_a_container_runs(spool_dir, config, dockerd, "echo up; sleep 300")
    assert _containers(client, job_id)
    os.rename(spool_dir / "running" / job_id, spool_dir / "failed" / job_id)
    second = DaemonProcess(spool_dir, config)
    second.start()
    try:
        wait_for(lambda: not _containers(client, job_id), what="the leftover container removed")
    finally:
        second.kill()
