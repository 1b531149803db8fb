"""Swarm jobs on the real daemon and a real single-node swarm: secrets stay secret, and a
service outlives a kill -9 of the daemon and is re-attached to, never started twice."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from spoold.executors.swarm import LABEL_JOB, LABEL_SPOOL

from tests.harness import (
    DaemonProcess,
    drop,
    job_log,
    killed_once_logged,
    wait_finished,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.daemon


def _services(engine: Any, job_id: str) -> list[Any]:
    return list(engine.services.list(filters={"label": f"{LABEL_JOB}={job_id}"}))


def _left(engine: Any, job_id: str) -> list[str]:
    label = {"label": f"{LABEL_JOB}={job_id}"}
    return [
        *(f"service {s.name}" for s in engine.services.list(filters=label)),
        *(f"secret {s.name}" for s in engine.secrets.list(filters=label)),
        *(f"container {c.name}" for c in engine.containers.list(all=True, filters=label)),
    ]


def test_a_swarm_job_with_a_secret_and_artifacts(
    swarm: str, client: Any, spool_dir: Path, tmp_path: Path
) -> None:
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    (secrets / "deploy_key").write_text(secret + "\n")
    (secrets / "deploy_key").chmod(0o600)
    config = write_config(tmp_path / "config.yaml", spool_dir, secrets_dir=str(secrets))
    job_id = f"sw-{uuid.uuid4().hex[:8]}"
    specs: list[str] = []
    daemon = DaemonProcess(spool_dir, config)
    daemon.start()
    try:
        drop(spool_dir, "sw.yaml", {
            "job_id": job_id, "executor": "swarm",
            "product": {"image": swarm, "replicas": 2, "script": [
                'echo "key is ${secret:deploy_key}"',
                'mkdir -p out && echo "$(hostname) done" > "out/$(hostname).txt"',
                "sleep 1",
            ]},
            "artifacts": [{"path": "out/*.txt"}],
        })  # fmt: skip

        def spec_seen() -> bool:
            specs.extend(json.dumps(s.attrs) for s in _services(client, job_id))
            return bool(specs)

        wait_for(spec_seen, what="the job's service")
        directory, status = wait_finished(spool_dir, job_id)
        assert directory == "done", status
    finally:
        daemon.kill()
    assert all(secret not in spec for spec in specs)
    log = job_log(spool_dir, job_id)
    assert log.count("key is ***") == 2, log
    assert secret not in log and secret not in daemon.log_path.read_text()
    status_text = (spool_dir / "done" / job_id / "status.json").read_text()
    assert secret not in status_text
    copied = sorted((spool_dir / "done" / job_id / "artifacts" / "out").glob("*.txt"))
    assert len(copied) == 2, log
    assert _left(client, job_id) == []


def test_a_service_outlives_a_killed_daemon_and_the_next_one_reattaches(
    swarm: str, client: Any, spool_dir: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "config.yaml", spool_dir)
    gate = tmp_path / "gate"
    gate.mkdir(mode=0o777)
    script = "echo up; until [ -e /gate/go ]; do sleep 0.1; done; echo down"
    job_id = f"sw-{uuid.uuid4().hex[:8]}"
    killed_once_logged(spool_dir, config, {
        "job_id": job_id, "executor": "swarm",
        "product": {"image": swarm, "script": script, "mounts": [f"{gate}:/gate"]},
    }, "INFO up")  # fmt: skip
    (service,) = _services(client, job_id)  # it outlived its daemon
    assert service.attrs["Spec"]["Labels"][LABEL_SPOOL] == str(spool_dir.resolve())
    second = DaemonProcess(spool_dir, config)
    second.start()
    try:
        wait_for(
            lambda: "re-attached to service" in job_log(spool_dir, job_id), what="the re-attach"
        )
        (gate / "go").touch()
        directory, status = wait_finished(spool_dir, job_id)
        assert (directory, status["exit_code"], len(status["attempts"])) == ("done", 0, 1), status
        log = job_log(spool_dir, job_id)
        assert log.count("INFO up") == 1 and log.count("INFO down") == 1, log
        assert log.count("spoold: starting service") == 1, log  # never started twice
        assert _left(client, job_id) == []
    finally:
        second.kill()


def test_recovery_ends_the_service_of_a_job_no_longer_running(
    swarm: str, client: Any, spool_dir: Path, tmp_path: Path
) -> None:
    """A service whose job left running/ while no daemon ran (purged, or recorded by another
    host) is ended and removed at the next start, with its tasks."""
    config = write_config(tmp_path / "config.yaml", spool_dir)
    job_id = f"sw-{uuid.uuid4().hex[:8]}"
    document = {"job_id": job_id, "executor": "swarm",
                "product": {"image": swarm, "script": "echo up; sleep 300"}}  # fmt: skip
    killed_once_logged(spool_dir, config, document, "INFO up")
    assert _services(client, job_id)
    os.rename(spool_dir / "running" / job_id, spool_dir / "failed" / job_id)
    second = DaemonProcess(spool_dir, config)
    second.start()
    try:
        wait_for(lambda: not _left(client, job_id), what="the leftover service removed")
    finally:
        second.kill()
