"""Artifacts within bounds (round 30): a sparse file is copied sparse, one attempt's artifacts
are kept up to ``limits.max_artifacts`` files and ``limits.max_artifacts_size`` bytes (apparent
sizes), what is left out is said in one line of the job's log, and a full disk leaves no part
of a copy."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spoold.core.clock import SystemClock
from spoold.core.config import Config, load_config
from spoold.core.errors import ConfigError
from spoold.core.spool import JobDir, Spool
from spoold.run.registry import ExecutorRegistry
from spoold.run.worker import JobRunner
from tests.harness import accept_and_run, intake_for, tmpfs

GIB = 1 << 30
LOGGER = logging.getLogger("spoold.test")


def _sparse(path: Path, size: int, pieces: dict[int, bytes]) -> Path:
    """A file of apparent ``size`` holding only ``pieces`` (offset -> bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.truncate(size)
        for offset, data in pieces.items():
            handle.seek(offset)
            handle.write(data)
    return path


def _digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.init()
    return spool


def _job(spool: Spool) -> JobDir:
    """A job directory to store artifacts into (no claim: nothing fences it)."""
    path = spool.dir("running") / "art"
    path.mkdir()
    return JobDir("art", "running", str(path))


def _stored(spool: Spool, tmp_path: Path, files: dict[str, Path], **limits: Any) -> tuple[
    list[str], str | None, JobDir
]:  # fmt: skip
    job = _job(spool)
    store = spool.jobs.artifact_store(job, **limits)
    kept = []
    for relative, path in files.items():
        with open(path, "rb") as source:
            if store.store(relative, source) is not None:
                kept.append(relative)
    return kept, store.left_out(), job


# -- sparse files --------------------------------------------------------------------------------


@pytest.mark.parametrize("copy_range", [True, False])
def test_a_sparse_file_is_copied_sparse_and_the_same(
    spool: Spool, tmp_path: Path, copy_range: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not copy_range:  # another filesystem, an older kernel: reads and writes

        def refused(*args: object) -> int:
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", refused)
    source = _sparse(tmp_path / "work" / "sparse.bin", 2 * GIB,
                     {0: b"head", GIB: b"middle" * 1000, 2 * GIB - 3: b"end"})  # fmt: skip
    kept, left_out, job = _stored(spool, tmp_path, {"out/sparse.bin": source},
                                  max_count=None, max_size=None)  # fmt: skip
    assert (kept, left_out) == (["out/sparse.bin"], None)
    copy = job.path / "artifacts" / "out" / "sparse.bin"
    assert copy.stat().st_size == 2 * GIB
    assert copy.stat().st_blocks * 512 < 1 << 20  # not 2 GiB of zeros written
    with open(copy, "rb") as handle:
        assert os.pread(handle.fileno(), 4, 0) == b"head"
        assert os.pread(handle.fileno(), 6000, GIB) == b"middle" * 1000
        assert os.pread(handle.fileno(), 10, 2 * GIB - 3) == b"end"


def test_a_dense_file_and_an_empty_one_are_copied_whole(spool: Spool, tmp_path: Path) -> None:
    dense = tmp_path / "work" / "dense.bin"
    dense.parent.mkdir()
    dense.write_bytes(os.urandom(3 << 20) + b"tail")
    empty = tmp_path / "work" / "empty"
    empty.touch()
    kept, left_out, job = _stored(spool, tmp_path, {"dense.bin": dense, "empty": empty},
                                  max_count=None, max_size=None)  # fmt: skip
    assert (kept, left_out) == (["dense.bin", "empty"], None)
    assert _digest(job.path / "artifacts" / "dense.bin") == _digest(dense)
    assert (job.path / "artifacts" / "empty").read_bytes() == b""


# -- the limits ----------------------------------------------------------------------------------


def test_files_past_the_count_are_left_out_and_said_in_one_line(
    spool: Spool, tmp_path: Path
) -> None:
    files = {}
    for n in range(20):
        files[f"out/f{n:02}"] = tmp_path / "work" / f"f{n:02}"
        files[f"out/f{n:02}"].parent.mkdir(exist_ok=True)
        files[f"out/f{n:02}"].write_text("x")
    kept, left_out, job = _stored(spool, tmp_path, files, max_count=5, max_size=None)
    assert kept == [f"out/f{n:02}" for n in range(5)]
    assert left_out == ("artifacts not kept: 15 file(s), 15 B, past limits.max_artifacts "
                        "(5 files): out/f05, out/f06, out/f07, ...")  # fmt: skip
    assert sorted(p.name for p in (job.path / "artifacts" / "out").iterdir()) == [
        f"f{n:02}" for n in range(5)
    ]


def test_what_passes_the_size_limit_is_left_out_apparent_sizes_counting(
    spool: Spool, tmp_path: Path
) -> None:
    files = {
        "a": _sparse(tmp_path / "work" / "a", 600, {0: b"a"}),
        "b-sparse": _sparse(tmp_path / "work" / "b", 2 * GIB, {}),  # 0 blocks, 2 GiB apparent
        "c": _sparse(tmp_path / "work" / "c", 400, {0: b"c"}),
        "d": _sparse(tmp_path / "work" / "d", 1, {0: b"d"}),
    }
    kept, left_out, job = _stored(spool, tmp_path, files, max_count=None, max_size=1000)
    assert kept == ["a", "c"]  # 1000 bytes: d would pass the limit by one
    assert left_out == ("artifacts not kept: 2 file(s), 2.0 GiB, past "
                        "limits.max_artifacts_size (1 kB): b-sparse, d")  # fmt: skip
    assert sorted(p.name for p in (job.path / "artifacts").iterdir()) == ["a", "c"]


# -- a full disk ---------------------------------------------------------------------------------


@pytest.fixture
def small_spool(tmp_path: Path) -> Iterator[Spool]:
    """A spool alone on a 1 MiB tmpfs."""
    disk = tmp_path / "disk"
    disk.mkdir()
    with tmpfs(disk, "1m"):
        spool = Spool(disk / "spool")
        spool.init()
        yield spool


def test_a_full_disk_leaves_no_part_of_a_copy_and_is_said(
    small_spool: Spool, tmp_path: Path
) -> None:
    big = tmp_path / "work" / "big.bin"
    big.parent.mkdir()
    big.write_bytes(os.urandom(3 << 20))
    small = tmp_path / "work" / "small.txt"
    small.write_text("fits\n")
    files = {"out/big.bin": big, "out/small.txt": small}
    kept, left_out, job = _stored(small_spool, tmp_path, files, max_count=None, max_size=None)
    assert kept == ["out/small.txt"]  # the space the failed copy took is given back
    assert left_out == ("artifacts not kept: 1 file(s), 3 MiB, not copied: "
                        "No space left on device: out/big.bin")  # fmt: skip
    assert sorted(p.name for p in (job.path / "artifacts" / "out").iterdir()) == ["small.txt"]


# -- through the worker, and the config ----------------------------------------------------------


def _run_job(tmp_path: Path, commands: list[str], **config: Any) -> tuple[JobDir, dict[str, Any]]:
    spool = Spool(tmp_path / "spool")
    spool.init()
    cfg = Config(spool=spool.root, hostname="here", worker_id="w1", kill_grace=0.5, **config)
    clock = SystemClock()
    runner = JobRunner(spool, ExecutorRegistry.from_entry_points(), cfg, clock, LOGGER)
    document = {"job_id": "art", "executor": "local", "product": {"commands": commands},
                "artifacts": [{"path": "out", "type": "dir"}]}  # fmt: skip
    return accept_and_run(spool, intake_for(spool, clock), runner, document)


def test_a_job_truncating_a_huge_file_keeps_its_outcome_and_the_spool_its_room(
    tmp_path: Path,
) -> None:
    job, status = _run_job(
        tmp_path, ["mkdir out && truncate -s 2G out/sparse.bin && echo hi > out/note.txt"]
    )
    assert status["state"] == "succeeded"
    assert [a["path"] for a in status["artifacts"]] == ["out/note.txt"]
    log = job.log_path.read_text()
    said = [line for line in log.splitlines() if "artifacts not kept" in line]
    assert len(said) == 1, log
    assert "1 file(s), 2 GiB, past limits.max_artifacts_size (1 GiB): out/sparse.bin" in said[0]
    assert not (job.path / "artifacts" / "out" / "sparse.bin").exists()


def test_a_huge_sparse_file_within_the_limit_is_kept_sparse(tmp_path: Path) -> None:
    job, status = _run_job(tmp_path, ["mkdir out && truncate -s 2G out/sparse.bin"],
                           max_artifacts_size=4 * GIB)  # fmt: skip
    assert status["state"] == "succeeded"
    assert [(a["path"], a["size"]) for a in status["artifacts"]] == [("out/sparse.bin", 2 * GIB)]
    copy = job.path / "artifacts" / "out" / "sparse.bin"
    assert copy.stat().st_blocks * 512 < 1 << 20


def test_many_files_are_kept_up_to_max_artifacts(tmp_path: Path) -> None:
    job, status = _run_job(tmp_path, ["mkdir out && cd out && touch $(seq -f 'f%03g' 1 40)"],
                           max_artifacts=10)  # fmt: skip
    assert status["state"] == "succeeded"
    assert [a["path"] for a in status["artifacts"]] == [f"out/f{n:03}" for n in range(1, 11)]
    said = [line for line in job.log_path.read_text().splitlines() if "not kept" in line]
    assert len(said) == 1
    # Counted, not opened: their sizes are not looked at (round 31).
    assert "30 file(s), past limits.max_artifacts (10 files): out/f011, out/f012" in said[0]


def test_the_limits_are_read_from_the_config(tmp_path: Path) -> None:
    assert (Config().max_artifacts, Config().max_artifacts_size) == (1000, GIB)
    path = tmp_path / "config.yaml"
    path.write_text("limits:\n  max_artifacts: 50\n  max_artifacts_size: 10MiB\n")
    config = load_config(path, env={})
    assert (config.max_artifacts, config.max_artifacts_size) == (50, 10 << 20)
    path.write_text("limits:\n  max_artifacts: many\n")
    with pytest.raises(ConfigError, match="max_artifacts"):
        load_config(path, env={})
