"""The cross-process rate limit: never more than N slots in any window, whoever takes them."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

import pytest

from spoold.core.errors import ExecutorError
from spoold.core.ratelimit import RateLimiter, default_rate_dir
from tests.fake_lexware import most_in_window

pytestmark = pytest.mark.timeout(60)


def _worker(directory: str, count: int, out: multiprocessing.Queue[list[float]]) -> None:
    limiter = RateLimiter("shared", 2, 1.0, directory=directory, margin=0.0)
    times = []
    for _ in range(count):
        times.append(limiter.acquire())  # the slot's time, taken under the lock
    out.put(times)


def test_several_processes_never_exceed_two_per_second(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue[list[float]] = context.Queue()
    workers = [context.Process(target=_worker, args=(str(tmp_path), 3, out)) for _ in range(4)]
    started = time.monotonic()
    for worker in workers:
        worker.start()
    times = [t for _ in workers for t in out.get(timeout=30)]
    for worker in workers:
        worker.join(timeout=10)
        assert worker.exitcode == 0
    assert len(times) == 12
    # Deterministic: the slots are counted on the clock the limiter uses.
    assert most_in_window(times, 1.0) <= 2
    # Generous on time: 12 slots at 2/s need >= 5 s (first two at once), well under 20 s.
    assert max(times) - min(times) >= 4.9 and time.monotonic() - started < 20


def test_the_deadline_and_cancel_end_a_wait(tmp_path: Path) -> None:
    limiter = RateLimiter("x", 1, 10.0, directory=tmp_path)
    assert limiter.acquire() <= time.monotonic()
    with pytest.raises(ExecutorError, match="before the deadline") as late:
        limiter.acquire(deadline=time.monotonic() + 0.2)
    assert late.value.retryable
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    begun = time.monotonic()
    with pytest.raises(ExecutorError, match="cancelled"):
        limiter.acquire(cancel)
    assert time.monotonic() - begun < 3


def test_a_torn_file_does_not_block(tmp_path: Path) -> None:
    (tmp_path / "y.json").write_text("{not json")
    begun = time.monotonic()
    RateLimiter("y", 2, directory=tmp_path).acquire()
    assert time.monotonic() - begun < 0.5


def test_names_and_the_default_directory() -> None:
    with pytest.raises(ValueError, match="plain file name"):
        RateLimiter("../x", 2)
    assert default_rate_dir().name.startswith("spoold-ratelimit-")
