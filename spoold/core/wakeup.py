"""What wakes a loop from other threads and from signal handlers alike: a ``threading.Event``
with no lock on the way of ``set()``.

A signal handler runs on the main thread, between two bytecodes of whatever that thread was
doing. ``Event.set()`` there takes the event's lock, which the main thread holds for a moment
inside its own ``Event.wait()`` on the same event: the handler then waits for a lock its own
thread holds, for ever (seen in CI: a SIGTERM the daemon never acted on, its faulthandler
dump showing ``set`` inside ``wait``); ``Event.clear()`` holds it too. A write to a pipe
takes no lock, and the wait is a ``poll`` of that pipe, which a signal interrupts and Python
resumes (PEP 475) to find the byte the handler wrote.
"""

from __future__ import annotations

import contextlib
import os
import select

__all__ = ["Wakeup"]


class Wakeup:
    """``set``, ``is_set``, ``wait`` and ``clear``, as a ``threading.Event`` has them, safe to
    ``set`` from a signal handler."""

    def __init__(self) -> None:
        # The pipe is made by the first wait: the daemon is built before it detaches, which
        # closes every descriptor it holds (python-daemon), and only the loop waits.
        self._read = self._write = -1
        self._poll: select.poll | None = None
        self._set = False

    def set(self) -> None:
        self._set = True  # before the pipe is looked at: a first wait sees one or the other
        if self._write >= 0:
            with contextlib.suppress(BlockingIOError):  # the pipe is full: a wake-up is due
                os.write(self._write, b"\0")

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        """Until set, or ``timeout`` seconds; whether it is set."""
        if self._poll is None:
            self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._poll = select.poll()
            self._poll.register(self._read, select.POLLIN)
        if not self._set:
            self._poll.poll(None if timeout is None else max(timeout, 0.0) * 1000)
        return self._set

    def clear(self) -> None:
        self._set = False
        if self._read >= 0:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._read, 4096):
                    pass

    def close(self) -> None:
        if self._poll is not None:
            self._poll = None
            os.close(self._read)
            os.close(self._write)
