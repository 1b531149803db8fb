"""What each attempt cost (status.json ``usage``, issue 24): measured by the kernel for local
jobs, kept across a ``kill -9`` of the daemon, shown by ``spoold status``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from spoold.core.usage import StepUsage, Usage
from spoold.face.views import usage_text
from tests.harness import (
    DaemonProcess,
    drop,
    local_job,
    run_cli,
    supervisors,
    wait_finished,
    wait_for,
    write_config,
)

MB = 1024 * 1024
#: Allocates 200 MB and touches every page of it: resident, not only reserved.
ALLOCATE = (
    "python3 -c 'b = bytearray(200 * 1024 * 1024)\nfor i in range(0, len(b), 4096): b[i] = 1'"
)
#: A second of CPU in user mode, by the user time alone (process_time counts the system's too,
#: which a loaded machine makes a tenth of it or more).
BURN = (
    "python3 -c 'import os\nt = os.times().user\n"
    "while os.times().user - t < 1.0: sum(range(100000))'"
)
#: Exactly 11 bytes of output, one line without its newline, one on stderr.
PRINT = "printf 'abc\\ndef'; printf 'err\\n' >&2"


_RUN = """\
import json, sys, threading
from pathlib import Path
from spoold.core.clock import SystemClock
from spoold.core.joblog import JobLog
from spoold.run.process import adopt_orphans, run_process
command, where = sys.argv[1], Path(sys.argv[2])
if sys.argv[3:] == ["adopt"]:
    assert adopt_orphans()  # as a supervisor: orphans are reaped, and counted, here
with (where / "log").open("ab") as handle:
    outcome = run_process(
        ["/bin/sh", "-c", command], cwd=where, env={"PATH": "/usr/bin:/bin"},
        log=JobLog(handle, SystemClock()), clock=SystemClock(), timeout=None, kill_grace=1.0,
        cancel=threading.Event(),
    )
print(json.dumps([outcome.exit_code, outcome.usage and outcome.usage.to_dict()]))
"""


def _run(command: str, tmp_path: Path, *, adopt: bool = False) -> Usage:
    """What ``command`` cost, run by a fresh interpreter of a supervisor's size: a process
    started by vfork carries the peak of its starter's memory into its own (the test
    runner's, after a suite run in one process, was over 200 MB: seen)."""
    result = subprocess.run(
        [sys.executable, "-c", _RUN, command, str(tmp_path), *(["adopt"] if adopt else [])],
        capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )  # fmt: skip
    exit_code, usage = json.loads(result.stdout)
    assert exit_code == 0, (tmp_path / "log").read_text()
    found = Usage.from_dict(usage)
    assert found is not None
    return found


def test_the_kernel_measures_memory_cpu_and_output_of_a_process_tree(tmp_path: Path) -> None:
    # In a child of the shell, which the shell reaps: its figures reach spoold through it.
    memory = _run(ALLOCATE + "; true", tmp_path)
    assert memory.peak_memory_bytes is not None and memory.peak_memory_bytes >= 200 * MB
    assert memory.source == "kernel"
    burn = _run(BURN, tmp_path)
    assert burn.cpu_user_seconds is not None and burn.cpu_user_seconds >= 0.9
    assert burn.cpu_system_seconds is not None and burn.cpu_system_seconds >= 0.0
    assert burn.wall_seconds is not None and burn.wall_seconds >= 0.9
    assert burn.peak_memory_bytes is not None and burn.peak_memory_bytes < 200 * MB
    assert _run(PRINT, tmp_path).output_bytes == 11
    assert _run("true", tmp_path).output_bytes == 0


def test_the_peak_is_the_largest_process_in_bytes_not_the_sum_of_them(tmp_path: Path) -> None:
    """Three orphans side by side, each of 100 MB and saying its own max RSS (KiB, from the
    kernel), reaped one by one by a supervisor-like runner (a child subreaper): the run's peak
    is the largest of them, in bytes (1 KiB = 1024), not their sum (README: the most memory
    one process of the tree held, not a sum of processes side by side)."""
    said = tmp_path / "maxrss"
    one = (
        "(python3 -c 'import resource, sys\nb = bytearray(100 * 1024 * 1024)\n"
        "for i in range(0, len(b), 4096): b[i] = 1\n"
        'print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=open(sys.argv[1], "a"))\''
        f" {said} &)"
    )
    wait = (
        f'n=0; until [ "$(cat {said} 2>/dev/null | wc -l)" -ge 3 ] || [ $n -ge 1200 ]; '
        "do sleep 0.05; n=$((n+1)); done"
    )
    usage = _run(f"{one}; {one}; {one}; {wait}", tmp_path, adopt=True)
    said_kib = [int(line) for line in said.read_text().split()]
    assert len(said_kib) == 3, said_kib
    largest = max(said_kib) * 1024
    assert usage.peak_memory_bytes is not None
    assert usage.peak_memory_bytes >= largest, "not in bytes of 1024 to the KiB"
    assert usage.peak_memory_bytes < 2 * largest, "the processes' peaks were summed"


def test_usage_adds_up_and_reads_back() -> None:
    a = Usage(1.0, 0.5, 0.25, 10 * MB, 7, "kernel")
    b = Usage(2.0, None, None, None, 3, "wall")
    both = a.plus(b)
    assert both == Usage(3.0, 0.5, 0.25, 10 * MB, 10, "kernel+wall")
    assert Usage.from_dict(both.to_dict()) == both
    assert Usage.from_dict(None) is None and Usage.from_dict("x") is None
    steps = StepUsage(2, {"old": {"usage": a.to_dict(), "usage_attempt": 1},
                          "kept": {"usage": b.to_dict(), "usage_attempt": 2}})  # fmt: skip
    steps.add("new", a)
    steps.add("new", a)
    assert steps.total() == b.plus(a.plus(a))
    shown = steps.onto({"old": {"state": "running", "usage": {}, "usage_attempt": 1},
                        "new": {"state": "succeeded"}})  # fmt: skip
    assert "usage" not in shown["old"]
    assert shown["new"]["usage_attempt"] == 2 and shown["new"]["usage"]["output_bytes"] == 14
    text = usage_text(a.to_dict())
    assert text == (
        "wall 1.00s, CPU 0.50s user + 0.25s system, peak memory 10.0 MiB, output 7 bytes "
        "(from the kernel)"
    )
    assert usage_text(b.to_dict()).endswith("(CPU and memory not known for this executor)")
    assert usage_text(None) == ""


def _usage(status: dict[str, Any]) -> dict[str, Any]:
    usage: dict[str, Any] = status["attempts"][-1]["usage"]
    assert set(usage) == {"wall_seconds", "cpu_user_seconds", "cpu_system_seconds",
                          "peak_memory_bytes", "output_bytes", "source"}  # fmt: skip
    return usage


@pytest.mark.daemon
def test_a_jobs_attempts_and_steps_show_what_they_cost(spool_dir: Path, tmp_path: Path) -> None:
    daemon = DaemonProcess(spool_dir, write_config(tmp_path / "c.yaml", spool_dir))
    steps = [
        {"id": "memory", "executor": "local", "product": {"commands": ALLOCATE}},
        {"id": "cpu", "executor": "local", "product": {"commands": BURN}},
        {"id": "print", "executor": "local", "product": {"commands": PRINT},
         "needs": ["memory"]},
    ]  # fmt: skip
    try:
        daemon.start()
        drop(spool_dir, "plain.yaml", local_job("plain", PRINT, retries=1, backoff="1s"))
        drop(spool_dir, "fails.yaml", local_job("fails", f"{BURN}; exit 3"))
        drop(spool_dir, "steps.yaml", {"job_id": "steps", "executor": "local", "steps": steps})
        where, plain = wait_finished(spool_dir, "plain")
        assert where == "done"
        usage = _usage(plain)
        assert usage["output_bytes"] == 11 and usage["source"] == "kernel"
        assert usage["wall_seconds"] >= 0 and usage["peak_memory_bytes"] > 0
        where, fails = wait_finished(spool_dir, "fails")
        assert where == "failed"
        assert _usage(fails)["cpu_user_seconds"] >= 0.9  # a failed attempt cost as much
        where, status = wait_finished(spool_dir, "steps")
        assert where == "done", status
        by_step = {step_id: step["usage"] for step_id, step in status["steps"].items()}
        assert by_step["memory"]["peak_memory_bytes"] >= 200 * MB
        assert by_step["cpu"]["cpu_user_seconds"] >= 0.9
        assert by_step["print"]["output_bytes"] == 11
        assert {step["usage_attempt"] for step in status["steps"].values()} == {1}
        total = _usage(status)
        assert total["peak_memory_bytes"] >= 200 * MB
        assert total["cpu_user_seconds"] >= 0.9 and total["output_bytes"] == 11
        assert total["wall_seconds"] >= 1.0
        shown = run_cli(spool_dir, "status", "steps")
        assert shown.returncode == 0, shown.stderr
        cost = next(line for line in shown.stdout.splitlines() if line.startswith("  cost:"))
        assert "peak memory" in cost and "output 11 bytes" in cost and "(from the kernel)" in cost
        shown_lines = shown.stdout.splitlines()
        after_memory = shown_lines[shown_lines.index(next(
            line for line in shown_lines if line.startswith("step memory:")
        )) + 1]  # fmt: skip
        assert after_memory.startswith("  cost:") and "peak memory 2" in after_memory
    finally:
        daemon.kill()


@pytest.mark.daemon
@pytest.mark.parametrize("ends", ["while-no-daemon", "after-adoption"])
def test_usage_survives_a_kill_9_of_the_daemon(spool_dir: Path, tmp_path: Path, ends: str) -> None:
    """The supervisor writes the unit's cost into its end record; the next daemon reads it."""
    mark = tmp_path / "go"
    command = f"until [ -e {mark} ]; do sleep 0.05; done; {ALLOCATE}; {PRINT}"
    daemon = DaemonProcess(spool_dir, write_config(tmp_path / "c.yaml", spool_dir))
    units = spool_dir / "running" / "long" / "units"
    try:
        daemon.start()
        drop(spool_dir, "long.yaml", local_job("long", command))
        wait_for(lambda: supervisors(spool_dir), what="the job's supervisor")
        daemon.kill(leave_jobs=True)
        if ends == "while-no-daemon":
            mark.touch()
            wait_for(lambda: any(units.glob("*.end")) if units.is_dir() else None,
                     what="the unit's end record")  # fmt: skip
            record = json.loads(next(units.glob("*.end")).read_text())
            assert record["usage"]["peak_memory_bytes"] >= 200 * MB
        daemon.start()
        if ends == "after-adoption":
            wait_for(lambda: "adopted" in (spool_dir / "running" / "long" / "log").read_text(),
                     what="the new daemon to adopt the job")  # fmt: skip
            mark.touch()
        where, status = wait_finished(spool_dir, "long")
        assert where == "done", status
        usage = _usage(status)
        assert usage["peak_memory_bytes"] >= 200 * MB
        assert usage["output_bytes"] == 11 and usage["source"] == "kernel"
    finally:
        daemon.kill()
