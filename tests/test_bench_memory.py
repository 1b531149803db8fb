"""The benchmarks' memory sums count each address space once."""

from __future__ import annotations

import os
import subprocess
import threading

from benchmarks.bench_spool import memory_of, one_per_address_space, runs
from tests.harness import wait_for


def test_a_process_sharing_its_parents_memory_is_counted_once() -> None:
    """A thread shares its process's memory as a child started by vfork does until it
    execs (a spool starting a job); a forked child has memory of its own."""
    ready, done = threading.Event(), threading.Event()
    thread_id: list[int] = []

    def wait() -> None:
        thread_id.append(threading.get_native_id())
        ready.set()
        done.wait(30)

    thread = threading.Thread(target=wait)
    thread.start()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child waits for its parent, then leaves
        os.close(write)
        os.read(read, 1)
        os._exit(0)
    os.close(read)
    try:
        assert ready.wait(30)
        me = os.getpid()
        assert one_per_address_space([me, thread_id[0], child]) == [me, child]
        assert one_per_address_space([child, me]) == [child, me]
    finally:
        done.set()
        thread.join()
        os.close(write)
        os.waitpid(child, 0)


def test_a_child_that_became_another_program_since_it_was_listed_is_not_counted() -> None:
    """A daemon's child listed as the daemon's own program may have exec'd a job by the time
    its memory is read (spoold and the floor start jobs by vfork and exec): a flood's peak
    once counted a job's sh."""
    python = os.readlink("/proc/self/exe")
    child = subprocess.Popen(
        [python, "-c", "import os, sys; sys.stdin.readline(); os.execv('/bin/sleep', ['sleep', '30'])"],
        stdin=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert memory_of([child.pid], python)[0] > 0, "still Python: counted"
        assert child.stdin is not None
        child.stdin.write(b"go\n")
        child.stdin.flush()
        wait_for(lambda: not runs(child.pid, python), what="the child to exec sleep")
        assert memory_of([child.pid], python) == (0.0, 0.0)
        assert memory_of([child.pid])[0] > 0, "without a program to hold to, counted as before"
    finally:
        child.kill()
        child.wait()
