"""The benchmarks' memory sums count each address space once."""

from __future__ import annotations

import os
import threading

from benchmarks.bench_spool import one_per_address_space


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
