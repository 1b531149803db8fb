"""The daemon's main loop is woken by other threads and by signal handlers: ``Wakeup``.

A signal handler runs on the main thread; ``threading.Event.set()`` there deadlocks when the
main thread is inside ``Event.wait()`` on the same event, holding its lock (seen in CI: a
SIGTERM the daemon never acted on). Shown here in a child process, as a handler would meet it:
the event's lock held by the thread that then sets it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest

from spoold.core.wakeup import Wakeup

# The main thread inside wait(), between taking the lock and waiting (where the handler ran),
# then the handler's set() on that same thread.
_INSIDE_WAIT = textwrap.dedent("""\
    import sys
    kind = sys.argv[1]
    if kind == "event":
        import threading
        event = threading.Event()
        event._cond.acquire()
    else:
        from spoold.core.wakeup import Wakeup
        event = Wakeup()
    event.set()
    print("set")
    """)


@pytest.mark.parametrize("kind", ["event", "wakeup"])
def test_a_set_on_the_thread_that_is_inside_wait_returns(kind: str) -> None:
    try:
        done = subprocess.run([sys.executable, "-c", _INSIDE_WAIT, kind], capture_output=True,
                              text=True, timeout=5, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        assert kind == "event", "Wakeup.set() waited for a lock its own thread held"
        return
    assert kind == "wakeup", "threading.Event no longer deadlocks there: the reason is gone"
    assert done.stdout == "set\n", done.stderr


@pytest.fixture
def wakeup() -> Iterator[Wakeup]:
    made = Wakeup()
    yield made
    made.close()


def test_a_signal_handlers_set_wakes_the_wait_at_once(wakeup: Wakeup) -> None:
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: wakeup.set())
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        started = time.monotonic()
        assert wakeup.wait(30.0)
        assert time.monotonic() - started < 15.0, "the signal did not end the wait"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_it_behaves_as_an_event_for_the_loop(wakeup: Wakeup) -> None:
    assert not wakeup.is_set() and wakeup.wait(0.01) is False
    for _ in range(70_000):  # more than a pipe holds: a set never blocks
        wakeup.set()
    assert wakeup.is_set() and wakeup.wait(0)
    wakeup.clear()
    assert not wakeup.is_set() and wakeup.wait(0.01) is False, "a set before the clear stayed"
    setter = threading.Timer(0.05, wakeup.set)
    setter.start()
    assert wakeup.wait(30.0)
    setter.join()
