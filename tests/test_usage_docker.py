"""What a docker job cost, as the engine accounts for it (issue 24), against a real engine
(tests/dockerd.py starts one; under CI=true a missing engine fails)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from spoold.executors.docker import DockerExecutor, EngineUsage

from tests.harness import gate_wait
from tests.test_executors import _context, _Log

MB = 1024 * 1024
#: 100 MB of page cache charged to the container's cgroup, a busy loop, 7 bytes of output
#: ("abc" tells the work is done), 1.5 s of wall time, and a wait at /gate/go: the container
#: lives until the engine's stats were read after all of that (open_after_a_reading).
SCRIPT = (
    "dd if=/dev/zero of=/tmp/fill bs=1M count=100 2>/dev/null; "
    "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done; printf 'abc\\ndef'; sleep 1.5; "
    + gate_wait("/gate/go")
)


def open_after_a_reading(
    monkeypatch: pytest.MonkeyPatch, gate: Path, worked: Callable[[], bool], containers: int
) -> None:
    """Create ``gate`` once the stats of ``containers`` containers were each read after
    ``worked()`` held: a reading a loaded machine delays still comes before the end, so the
    figures are the engine's for all the work (or the test fails on them, not on timing)."""
    read = EngineUsage.read
    armed: set[int] = set()  # their next reading is fetched after the work
    after: set[int] = set()

    def reading(self: EngineUsage, stats: Mapping[str, Any]) -> None:
        read(self, stats)
        if id(self) in armed:
            after.add(id(self))
        elif worked():
            armed.add(id(self))
        if len(after) >= containers:
            gate.touch()

    monkeypatch.setattr(EngineUsage, "read", reading)


def test_a_containers_cost_comes_from_the_engine(
    dockerd: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = _Log()
    gate = tmp_path / "gate"
    gate.mkdir(mode=0o777)
    open_after_a_reading(monkeypatch, gate / "go", lambda: "abc" in log.text().splitlines(), 1)
    product = {"image": dockerd, "script": SCRIPT, "mounts": [f"{gate}:/gate"]}
    ctx = _context(tmp_path, product, log, executor="docker",
                   job_id=f"t-{uuid.uuid4().hex[:10]}")  # fmt: skip
    result = DockerExecutor().run(ctx)
    assert result.succeeded, log.text()
    usage = result.usage
    assert usage is not None
    assert usage.source in ("docker", "docker-sampled")
    assert usage.peak_memory_bytes is not None and usage.peak_memory_bytes >= 100 * MB
    assert usage.cpu_user_seconds is not None and usage.cpu_system_seconds is not None
    assert usage.cpu_user_seconds + usage.cpu_system_seconds > 0.05
    assert usage.output_bytes == 7  # as the engine's stream gave it
    assert usage.wall_seconds is not None and usage.wall_seconds >= 1.5


def test_a_container_gone_before_its_first_reading_has_wall_time_and_output_only(
    dockerd: str, tmp_path: Path
) -> None:
    log = _Log()
    ctx = _context(tmp_path, {"image": dockerd, "script": "printf x"}, log, executor="docker",
                   job_id=f"t-{uuid.uuid4().hex[:10]}")  # fmt: skip
    result = DockerExecutor().run(ctx)
    assert result.succeeded and result.usage is not None, log.text()
    assert result.usage.output_bytes == 1 and result.usage.wall_seconds is not None
    if result.usage.source == "wall":  # ended before a reading: nothing is made up
        assert result.usage.cpu_user_seconds is None and result.usage.peak_memory_bytes is None


def test_the_engines_figures_are_read_as_cgroup_v1_and_v2_give_them() -> None:
    v1 = EngineUsage(None)
    v1.read({"cpu_stats": {"cpu_usage": {"total_usage": 3, "usage_in_usermode": 2_000_000_000,
                                         "usage_in_kernelmode": 500_000_000}},
             "memory_stats": {"usage": 10, "max_usage": 300}})  # fmt: skip
    v1.read({"cpu_stats": {}, "memory_stats": {}})  # an ended container's: changes nothing
    usage = v1.usage()
    assert usage is not None
    assert (usage.cpu_user_seconds, usage.cpu_system_seconds) == (2.0, 0.5)
    assert (usage.peak_memory_bytes, usage.source) == (300, "docker")
    v2 = EngineUsage(None)
    for used in (100, 250, 50):  # no max_usage: the largest reading
        v2.read({"memory_stats": {"usage": used}})
    usage = v2.usage()
    assert usage is not None and usage.cpu_user_seconds is None
    assert (usage.peak_memory_bytes, usage.source) == (250, "docker-sampled")
    assert EngineUsage(None).usage() is None
