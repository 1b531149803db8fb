"""A backlog the daemon holds (issue 23): what waiting jobs cost a round while they wait.

Jobs held back by a full limit can wait for hours, thousands of them. The status line counted
pending/ every STATUS_EVERY (2 s) and each scan stat'ed and sorted every pending job to find the
few its workers did not hold: 10,000 waiting cost the daemon ~0.65 % of a core doing nothing.
pending/ is now counted again only when its stamp may have changed (``DirectoryCount``, the
scheduler's settling rule), and a scan stats only the jobs the workers do not hold.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from spoold.core.spool import DirectoryCount, Spool
from spoold.core.spool.fs import SETTLE
from tests.fakes import FakeClock
from tests.test_schedule_scale import _after_a_tick


class Counting:
    """A spool whose ``count`` (a listing of a directory) is counted."""

    def __init__(self, root: Path) -> None:
        self.spool = Spool(root)
        self.spool.init()
        self.listings = 0
        count = self.spool.count

        def counted(directory: str) -> int:
            self.listings += 1
            return count(directory)

        setattr(self.spool, "count", counted)  # noqa: B010 - a spy on the instance

    def pending(self, job_id: str) -> None:
        (self.spool.dir("pending") / job_id).mkdir()


@pytest.fixture
def counting(tmp_path: Path) -> Counting:
    return Counting(tmp_path / "spool")


def test_an_unchanged_pending_directory_is_not_listed_again(counting: Counting) -> None:
    for n in range(50):
        counting.pending(f"job-{n:02d}")
    counted = DirectoryCount(counting.spool, "pending", settle=SETTLE)
    old = time.time() + 3600  # a wall clock to which pending/ is long settled
    assert [counted.count(wall=old, now=float(n)) for n in range(10)] == [50] * 10
    assert counting.listings == 1


def test_a_job_entering_or_leaving_is_counted_at_the_next_look(counting: Counting) -> None:
    counted = DirectoryCount(counting.spool, "pending", settle=SETTLE)
    old = time.time() + 3600
    counting.pending("first")
    assert counted.count(wall=old, now=0.0) == 1
    _after_a_tick(counting.spool.dir("pending"))
    counting.pending("second")
    assert counted.count(wall=old, now=1.0) == 2
    _after_a_tick(counting.spool.dir("pending"))
    os.rename(counting.spool.dir("pending") / "first", counting.spool.dir("running") / "first")
    assert counted.count(wall=old, now=2.0) == 1
    assert counting.listings == 3


def test_a_change_a_coarse_timestamp_hides_is_counted_until_the_stamp_settles(
    counting: Counting,
) -> None:
    """A job that enters within the filesystem's tick of the last listing may leave pending/'s
    stamp as it was (forced here, as a coarse clock would): a count stands for the directory
    only once a listing came SETTLE seconds after its stamp was first seen."""
    pending = counting.spool.dir("pending")
    counting.pending("first")
    counted = DirectoryCount(counting.spool, "pending", settle=SETTLE)
    clock = FakeClock()
    new = 0.0  # a wall clock to which pending/ is new: only the monotonic clock settles it
    assert counted.count(wall=new, now=clock.monotonic()) == 1
    stamp = pending.stat()
    counting.pending("second")
    os.utime(pending, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert counted.count(wall=new, now=clock.monotonic()) == 2, "counted again: not settled"
    clock.advance(SETTLE)
    assert counted.count(wall=new, now=clock.monotonic()) == 2, "the listing that settles it"
    listed = counting.listings
    clock.advance(1.0)
    assert counted.count(wall=new, now=clock.monotonic()) == 2
    assert counting.listings == listed, "settled: a stat, no listing"


def test_a_scan_stats_only_the_jobs_it_does_not_hold(counting: Counting) -> None:
    for n in range(6):
        counting.pending(f"job-{n}")
        time.sleep(0.002)  # arrival order, by the directories' ctime
    held = {"job-0", "job-2", "job-3"}
    looked: list[str] = []

    def skip(job_id: str) -> bool:
        looked.append(job_id)
        return job_id in held

    listed = counting.spool.jobs.list_jobs("pending", skip=skip)
    assert [job.job_id for job in listed] == ["job-1", "job-4", "job-5"], "oldest first"
    assert sorted(looked) == [f"job-{n}" for n in range(6)], "each asked about once"
