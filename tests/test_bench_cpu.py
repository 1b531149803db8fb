"""The benchmarks' CPU counts: per process name, kept for a process that ended, and to the
nanosecond over a quiet window."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from benchmarks.bench_compare import MachineCpu, QuietCpu
from benchmarks.bench_spool import CpuTally, Daemon

_BURN = """
import ctypes, os, sys, time
ctypes.CDLL(None).prctl(15, b"{name}", 0, 0, 0)  # PR_SET_NAME, as spoold names its own
{setup}
end = time.process_time() + 0.3
while time.process_time() < end:  # a system call: the work goes between two
    {work}
print("burnt", flush=True)
sys.stdin.read()
"""
#: A loop of Python: next to no time in the kernel.
_BURNER = _BURN.format(name="bench-burner", setup="", work="sum(range(10_000))")
#: The kernel clears a MiB each time: its time, not Python's.
_KERNEL_BURNER = _BURN.format(
    name="bench-kernel",
    setup='zero = os.open("/dev/zero", os.O_RDONLY)\nbuffer = bytearray(1 << 20)',
    work="os.readv(zero, [buffer])",
)


def _start(program: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", program], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def test_cpu_is_summed_per_process_name_and_kept_once_a_process_has_ended() -> None:
    """spoold's roles are told apart by the names its processes give themselves; a job
    supervisor that left must not take its CPU out of the sum."""
    machine = MachineCpu()
    tally = CpuTally()
    child = _start(_BURNER)
    try:
        assert child.stdout is not None and child.stdout.readline() == "burnt\n"
        seen = tally.by_name([child.pid, os.getpid()])
        assert seen["bench-burner"] >= 0.25, seen
        assert len(seen) == 2, "this process is counted under its own name"
    finally:
        child.communicate("", timeout=30)
    after = tally.by_name([child.pid, os.getpid()])  # the child is gone
    assert after["bench-burner"] >= seen["bench-burner"]
    assert tally.seconds([]) == sum(after.values())
    assert 0.0 < machine.cores() <= (os.cpu_count() or 1), "the burner kept a core busy"


def test_the_kernel_s_part_is_told_apart_from_the_interpreter_s() -> None:
    """bench_compare shows how much of a job's CPU is the kernel's: what no faster Python
    could take away. A loop in Python spends next to none there, reading /dev/zero nearly all."""
    tally = CpuTally()
    children = [_start(program) for program in (_BURNER, _KERNEL_BURNER)]
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline() == "burnt\n"
        split = tally.split_by_name([child.pid for child in children])
    finally:
        for child in children:
            child.communicate("", timeout=30)
    total, kernel = split["bench-burner"]
    assert total >= 0.25 and kernel <= 0.3 * total, split
    total, kernel = split["bench-kernel"]
    assert total >= 0.25 and kernel >= 0.7 * total, split
    assert tally.by_name([]) == {name: t for name, (t, _) in split.items()}


_ON_CUE = """
import sys, threading, time
def burn():
    end = time.process_time() + 0.3
    while time.process_time() < end:
        sum(range(10_000))
for line in sys.stdin:
    if line == "burn\\n":
        burn()
    else:  # a thread that burns and ends: its time leaves the threads' counts
        worker = threading.Thread(target=burn)
        worker.start()
        worker.join()
    print("burnt", flush=True)
"""


def test_a_quiet_window_is_counted_to_the_nanosecond_while_its_threads_stay() -> None:
    """utime and stime count 10 ms ticks: 0.033 % of a core over the schedules row's 30 s
    window, a third of its limit, and the row read 0.10 % where the daemon used 0.078 %.
    The scheduler's count is taken when the same threads ran all through; ticks otherwise."""
    child = subprocess.Popen([sys.executable, "-c", _ON_CUE], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)  # fmt: skip
    daemon = Daemon("burner", [], Path(os.devnull))
    daemon.process = child
    assert child.stdin is not None and child.stdout is not None
    try:
        quiet = QuietCpu(daemon)
        child.stdin.write(b"burn\n")
        child.stdin.flush()
        assert child.stdout.readline() == b"burnt\n"
        used, counted = quiet.seconds()
        assert counted == "schedstat" and 0.29 <= used < 0.6, (used, counted)
        quiet = QuietCpu(daemon)
        child.stdin.write(b"thread\n")
        child.stdin.flush()
        assert child.stdout.readline() == b"burnt\n"
        used, counted = quiet.seconds()
        assert counted == "ticks" and used >= 0.25, (used, counted)
    finally:
        child.communicate(b"", timeout=30)
