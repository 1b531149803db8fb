"""The job catalogue (spoold.face.catalogue): what ``GET /api/v1/jobs`` and the web page list.

Jobs are laid into a real spool through the spool's own methods (staged, accepted, claimed,
finished), no daemon. Order, every filter alone and together, cursors while jobs come and go,
a retried job after ``forget``, the snapshot (used after a restart without reading a single
status.json; a corrupt or stale one ignored), looks spaced by their cost, and the
directories' mtimes read too close to a change.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spoold.core.errors import JobNotFound
from spoold.core.job import JobStatus
from spoold.core.spool import JobDir, Spool
from spoold.core.spool.fs import SETTLE
from spoold.core.states import JobState
from spoold.face import catalogue as catalogue_module
from spoold.face.catalogue import Catalogue, JobQuery, Page
from tests.harness import wait_for

#: For the snapshot's tests: the catalogue looks as if 10 s after the tree last changed, so
#: that every directory's stamp has settled (fs.SETTLE).
LATER = 10 * 10**9


def later_ns() -> int:
    return time.time_ns() + LATER


def moment(second: int) -> str:
    return f"2026-12-02T10:{second // 60:02d}:{second % 60:02d}.000000Z"


def make_job(
    spool: Spool,
    job_id: str,
    state: str = "succeeded",
    *,
    second: int = 0,
    executor: str = "local",
    labels: dict[str, str] | None = None,
    labels_in_status: bool = True,
    submitter: str | None = "alice",
) -> JobDir:
    """A job in ``state`` as intake and a worker leave it (a schedule's definition for
    ``scheduled``); ``labels_in_status=False``: an older job's, labels only in its job file."""
    document: dict[str, Any] = {"job_id": job_id, "executor": executor,
                                "product": {"commands": "true"}}  # fmt: skip
    if labels is not None:
        document["labels"] = labels
    data = json.dumps(document).encode()  # YAML too
    taken = spool.stages.stage_data(f"{job_id}.yaml", data)
    status = JobStatus(
        job_id=job_id, state=JobState.PENDING, executor=executor, type=None,
        submitted_at=moment(second), source=f"{job_id}.yaml",
        sha256=hashlib.sha256(data).hexdigest(), submitter=submitter,
        labels=labels if labels_in_status else None,
    ).to_dict()  # fmt: skip
    if state == "scheduled":
        status["state"] = "scheduled"
        return spool.stages.accept(taken, job_id, status, "accepted\n", schedule=True)
    job = spool.stages.accept(taken, job_id, status, "accepted\n")
    if state == "pending":
        return job
    running = spool.jobs.claim(job_id)
    assert running is not None
    status = {**status, "state": "running", "started_at": moment(second)}
    spool.jobs.write_status(running, status)
    if state == "running":
        return running
    return spool.jobs.finish(running, JobState(state), {**status, "state": state})


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    made = Spool(tmp_path / "spool", durable=False)
    made.init()
    return made


@pytest.fixture
def catalogues() -> Iterator[Callable[..., Catalogue]]:
    """Catalogues that are closed (their snapshot's writer joined) after the test. Their
    clock stands still unless one is given: no look seems costly enough to be spaced."""
    made: list[Catalogue] = []

    def make(spool: Spool, **options: Any) -> Catalogue:
        catalogue = Catalogue(spool, **{"monotonic": lambda: 0.0, **options})
        made.append(catalogue)
        return catalogue

    yield make
    for catalogue in made:
        catalogue.close()


def ids(page: Page) -> list[str]:
    return [row["job_id"] for row in page.rows]


def all_ids(catalogue: Catalogue, query: JobQuery, limit: int) -> list[str]:
    """Every page of ``query``, followed by its cursors."""
    found: list[str] = []
    cursor = None
    for _ in range(1000):
        page = catalogue.page(query, cursor=cursor, limit=limit)
        found += ids(page)
        if page.next_cursor is None:
            return found
        cursor = page.next_cursor
    raise AssertionError("the cursors never ended")


def count_reads(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ids whose status.json is read from now on."""
    read: list[str] = []
    original = spool.jobs.read_status

    def reading(job: JobDir) -> dict[str, Any]:
        read.append(job.job_id)
        return original(job)

    monkeypatch.setattr(spool.jobs, "read_status", reading)
    return read


# -- order and filters ------------------------------------------------------------------------


def test_newest_first_by_submission_then_id_with_every_state_but_the_schedules(
    spool: Spool, catalogues: Callable[..., Catalogue]
) -> None:
    make_job(spool, "old-done", second=1)
    make_job(spool, "b-same", "failed", second=5)
    make_job(spool, "a-same", "cancelled", second=5)
    make_job(spool, "c-same", "pending", second=5)
    make_job(spool, "newest-running", "running", second=9)
    make_job(spool, "nightly", "scheduled", second=20)
    catalogue = catalogues(spool)
    page = catalogue.page(JobQuery())
    assert ids(page) == ["newest-running", "c-same", "b-same", "a-same", "old-done"]
    assert page.next_cursor is None
    assert [row["state"] for row in page.rows] == [
        "running", "pending", "failed", "cancelled", "succeeded",
    ]  # fmt: skip
    assert ids(catalogue.page(JobQuery(state="scheduled"))) == ["nightly"]
    assert catalogue.counts() == {"pending": 1, "running": 1, "succeeded": 1, "failed": 1,
                                  "cancelled": 1, "scheduled": 1}  # fmt: skip


def test_a_row_is_the_status_json_with_its_labels(
    spool: Spool, catalogues: Callable[..., Catalogue]
) -> None:
    """As ``spoold status ID --json`` prints it, plus "labels" as ``spoold list`` shows them:
    also for a job accepted before status.json kept them (read from its job file, once)."""
    job = make_job(spool, "kept", labels={"team": "ops"})
    make_job(spool, "older", second=1, labels={"team": "web"}, labels_in_status=False)
    rows = catalogues(spool).page(JobQuery()).rows
    assert rows[1] == spool.jobs.read_status(job)
    assert rows[1]["labels"] == {"team": "ops"}
    assert rows[0]["job_id"] == "older"
    assert rows[0]["labels"] == {"team": "web"}


@pytest.fixture
def varied(spool: Spool) -> Spool:
    """Jobs of every kind: states, executors, submitters, labels with and without values."""
    make_job(spool, "deploy-1", second=1, labels={"team": "ops", "urgent": "yes"})
    make_job(spool, "deploy-2", "failed", second=2, executor="ssh", labels={"team": "ops"})
    make_job(spool, "Invoice-3", second=3, executor="sevdesk", submitter="bob",
             labels={"team": "billing"})  # fmt: skip
    make_job(spool, "report-4", "cancelled", second=4, labels={"urgent": "no"})
    make_job(spool, "report-5", "pending", second=5, executor="ssh", submitter=None)
    make_job(spool, "old-6", "running", second=6, labels={"team": "ops"}, labels_in_status=False)
    make_job(spool, "sched-7", "scheduled", second=7, labels={"team": "ops"})
    return spool


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (JobQuery(state="succeeded"), ["Invoice-3", "deploy-1"]),
        (JobQuery(state="failed"), ["deploy-2"]),
        (JobQuery(state="cancelled"), ["report-4"]),
        (JobQuery(state="pending"), ["report-5"]),
        (JobQuery(state="running"), ["old-6"]),
        (JobQuery(state="scheduled"), ["sched-7"]),
        (JobQuery(executor="ssh"), ["report-5", "deploy-2"]),
        (JobQuery(executor="docker"), []),
        (JobQuery(submitter="bob"), ["Invoice-3"]),
        (JobQuery(labels={"team": "ops"}), ["old-6", "deploy-2", "deploy-1"]),
        (JobQuery(labels={"urgent": None}), ["report-4", "deploy-1"]),
        (JobQuery(labels={"team": "ops", "urgent": None}), ["deploy-1"]),
        (JobQuery(labels={"team": None, "urgent": "no"}), []),
        (JobQuery(labels={"nothing": None}), []),
        (JobQuery(text="REPORT"), ["report-5", "report-4"]),
        (JobQuery(text="invoice"), ["Invoice-3"]),
        (JobQuery(text="no such/id"), []),
        (JobQuery(state="failed", executor="ssh", labels={"team": "ops"}), ["deploy-2"]),
        (JobQuery(executor="local", labels={"team": "ops"}, text="deploy"), ["deploy-1"]),
        (JobQuery(state="scheduled", labels={"team": "ops"}, text="sched"), ["sched-7"]),
        (JobQuery(submitter="alice", labels={"urgent": None}, text="-4"), ["report-4"]),
    ],
)
def test_each_filter_alone_and_together(
    varied: Spool, catalogues: Callable[..., Catalogue], query: JobQuery, expected: list[str]
) -> None:
    assert ids(catalogues(varied).page(query)) == expected


@pytest.mark.parametrize(
    ("scan", "gather", "tail"),
    [
        (2048, 2048, 2048),  # as shipped: these lists are short, walked
        (0, 2048, 2048),  # the text index, kept up with a tail
        (0, 2048, 0),  # the text index, made anew at each query that follows a change
        (0, 1, 2048),  # in too many ids to gather: the list walked
    ],
)
def test_text_search_through_its_index_finds_what_the_walk_finds(
    varied: Spool,
    catalogues: Callable[..., Catalogue],
    monkeypatch: pytest.MonkeyPatch,
    scan: int,
    gather: int,
    tail: int,
) -> None:
    monkeypatch.setattr(catalogue_module, "_TEXT_SCAN", scan)
    monkeypatch.setattr(catalogue_module, "_TEXT_GATHER", gather)
    monkeypatch.setattr(catalogue_module, "_TEXT_TAIL", tail)
    catalogue = catalogues(varied)
    assert ids(catalogue.page(JobQuery(text="rEpOrT"))) == ["report-5", "report-4"]
    make_job(varied, "report-8", "failed", second=8)
    make_job(varied, "late-report", second=9, executor="ssh")
    varied.jobs.purge(varied.jobs.get("report-4"))
    assert ids(catalogue.page(JobQuery(text="report"))) == ["late-report", "report-8", "report-5"]
    assert ids(catalogue.page(JobQuery(text="report", state="failed"))) == ["report-8"]
    page = catalogue.page(JobQuery(text="report"), limit=1)
    assert ids(page) == ["late-report"]
    assert ids(catalogue.page(JobQuery(text="report"), cursor=page.next_cursor)) == [
        "report-8", "report-5",
    ]  # fmt: skip
    assert ids(catalogue.page(JobQuery(text="report", executor="ssh"))) == [
        "late-report", "report-5",
    ]  # fmt: skip
    assert ids(catalogue.page(JobQuery(text="sched", state="scheduled"))) == ["sched-7"]
    assert ids(catalogue.page(JobQuery(text="-"))) == [
        "late-report", "report-8", "old-6", "report-5", "Invoice-3", "deploy-2", "deploy-1",
    ]  # fmt: skip


def test_what_cannot_be_asked_is_a_value_error(
    spool: Spool, catalogues: Callable[..., Catalogue]
) -> None:
    """The API answers 400 to each."""
    catalogue = catalogues(spool)
    for cursor in ("", "not base64!", "Zm9v", "YzEAbm8tbnVs", "x" * 2000):
        with pytest.raises(ValueError, match="cursor"):
            catalogue.page(JobQuery(), cursor=cursor)
    with pytest.raises(ValueError, match="state"):
        catalogue.page(JobQuery(state="rejected"))
    with pytest.raises(ValueError, match="limit"):
        catalogue.page(JobQuery(), limit=0)


# -- cursors ----------------------------------------------------------------------------------


def test_cursor_pages_hold_only_rows_after_the_cursor_while_jobs_come_and_go(
    spool: Spool, catalogues: Callable[..., Catalogue]
) -> None:
    for second in range(10):
        make_job(spool, f"job-{second}", second=second * 2)
    catalogue = catalogues(spool)
    first = catalogue.page(JobQuery(), limit=4)
    assert ids(first) == ["job-9", "job-8", "job-7", "job-6"]
    assert first.next_cursor is not None
    make_job(spool, "newer", second=100)  # before the cursor: on no later page
    make_job(spool, "between", second=9)  # after it: on the next
    spool.jobs.purge(spool.jobs.get("job-5"))
    second_page = catalogue.page(JobQuery(), cursor=first.next_cursor, limit=4)
    assert ids(second_page) == ["between", "job-4", "job-3", "job-2"]
    assert second_page.next_cursor is not None
    spool.jobs.purge(spool.jobs.get("job-0"))
    last = catalogue.page(JobQuery(), cursor=second_page.next_cursor, limit=4)
    assert ids(last) == ["job-1"]
    assert last.next_cursor is None
    assert all_ids(catalogue, JobQuery(), limit=3) == [
        "newer", "job-9", "job-8", "job-7", "job-6", "between", "job-4", "job-3", "job-2",
        "job-1",
    ]  # fmt: skip


def test_a_full_last_page_says_there_is_no_more_and_filters_page_too(
    varied: Spool, catalogues: Callable[..., Catalogue]
) -> None:
    catalogue = catalogues(varied)
    page = catalogue.page(JobQuery(labels={"team": "ops"}), limit=3)
    assert len(page.rows) == 3
    assert page.next_cursor is None
    assert all_ids(catalogue, JobQuery(labels={"team": "ops"}), limit=1) == [
        "old-6", "deploy-2", "deploy-1",
    ]  # fmt: skip
    assert all_ids(catalogue, JobQuery(text="e"), limit=2) == [
        "report-5", "report-4", "Invoice-3", "deploy-2", "deploy-1",
    ]  # fmt: skip


def test_a_job_gone_between_the_index_and_its_read_is_skipped_and_the_page_fills_up(
    spool: Spool, catalogues: Callable[..., Catalogue], monkeypatch: pytest.MonkeyPatch
) -> None:
    for second in range(6):
        make_job(spool, f"job-{second}", second=second)
    catalogue = catalogues(spool)
    catalogue.counts()  # indexed
    original = spool.jobs.read_status

    def purged_first(job: JobDir) -> dict[str, Any]:
        if job.job_id in ("job-4", "job-3"):
            spool.jobs.purge(spool.jobs.get(job.job_id))
        return original(job)

    monkeypatch.setattr(spool.jobs, "read_status", purged_first)
    page = catalogue.page(JobQuery(), limit=3)
    assert ids(page) == ["job-5", "job-2", "job-1"]
    assert ids(catalogue.page(JobQuery(), cursor=page.next_cursor, limit=3)) == ["job-0"]


def test_a_job_that_moved_on_is_read_where_it_went(
    spool: Spool, catalogues: Callable[..., Catalogue], monkeypatch: pytest.MonkeyPatch
) -> None:
    running = make_job(spool, "busy", "running", second=3)
    make_job(spool, "idle", "pending", second=2)
    catalogue = catalogues(spool)
    assert catalogue.counts()["running"] == 1
    original = spool.jobs.read_status

    def finished_first(job: JobDir) -> dict[str, Any]:
        if job.directory == "running":
            status = {**original(job), "state": "succeeded"}
            spool.jobs.finish(running, JobState.SUCCEEDED, status)
        return original(job)

    monkeypatch.setattr(spool.jobs, "read_status", finished_first)
    page = catalogue.page(JobQuery())
    assert [(row["job_id"], row["state"]) for row in page.rows] == [
        ("busy", "succeeded"), ("idle", "pending"),
    ]  # fmt: skip
    monkeypatch.setattr(spool.jobs, "read_status", original)
    assert ids(catalogue.page(JobQuery(state="running"))) == []
    assert ids(catalogue.page(JobQuery(state="succeeded"))) == ["busy"]


# -- keeping up ---------------------------------------------------------------------------------


def retry_and_cancel(spool: Spool, job_id: str) -> None:
    """``spoold retry`` of a failed job, run again and cancelled: back in failed/ under the
    same name and inode."""
    failed = spool.jobs.get(job_id)
    status = spool.jobs.read_status(failed)
    spool.jobs.requeue(failed, {**status, "state": "pending"})
    running = spool.jobs.claim(job_id)
    assert running is not None
    spool.jobs.finish(running, JobState.CANCELLED, {**status, "state": "cancelled"})


def test_a_retried_job_is_seen_again_after_forget(
    spool: Spool, catalogues: Callable[..., Catalogue]
) -> None:
    make_job(spool, "flaky", "failed", second=1)
    make_job(spool, "steady", "failed", second=2)
    catalogue = catalogues(spool)
    assert ids(catalogue.page(JobQuery(state="failed"))) == ["steady", "flaky"]
    inode = os.stat(spool.jobs.get("flaky").location).st_ino
    retry_and_cancel(spool, "flaky")
    assert os.stat(spool.jobs.get("flaky").location).st_ino == inode
    # Before it is told, the rows it shows are read fresh: a cancelled job is not "failed".
    assert ids(catalogue.page(JobQuery(state="failed"))) == ["steady"]
    catalogue.forget("flaky")
    assert ids(catalogue.page(JobQuery(state="cancelled"))) == ["flaky"]
    assert catalogue.counts()["cancelled"] == 1
    assert catalogue.counts()["failed"] == 1


def test_forget_reads_one_job_without_looking_into_its_directory(
    spool: Spool, catalogues: Callable[..., Catalogue], monkeypatch: pytest.MonkeyPatch
) -> None:
    for second in range(5):
        make_job(spool, f"job-{second}", "failed", second=second)
    catalogue = catalogues(spool, wall_ns=later_ns)
    catalogue.counts()
    retry_and_cancel(spool, "job-2")
    os.utime(spool.dir("failed"), ns=(0, 10**9))  # as it was at the look: no look now
    catalogue.forget("job-2")
    catalogue.forget("never-was")
    read = count_reads(spool, monkeypatch)
    assert catalogue.counts()["cancelled"] == 1
    assert read == ["job-2"]


def test_a_directory_changed_within_the_mtimes_tick_is_looked_into_again(
    spool: Spool, catalogues: Callable[..., Catalogue]
) -> None:
    """A change made just after a look, within the coarse clock's tick, leaves the mtime as the
    look saw it: a look that recent to a change is made again at the next call."""
    make_job(spool, "first", second=1)
    done = spool.dir("done")
    stamp = done.stat().st_mtime_ns
    catalogue = catalogues(spool, wall_ns=lambda: stamp)  # the look as soon as the change
    assert ids(catalogue.page(JobQuery())) == ["first"]
    make_job(spool, "second", second=2)
    os.utime(done, ns=(stamp, stamp))  # the same tick
    assert ids(catalogue.page(JobQuery())) == ["second", "first"]


def test_a_change_a_whole_second_stamp_cannot_show_is_found_whatever_the_skew(
    spool: Spool, catalogues: Callable[..., Catalogue], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over SFTP (sshfs) a directory's times are whole seconds (its ctime is its mtime), kept
    by the file server's clock. A look 1.2 s into the second after its stamp, from a host
    whose clock is 0.5 s ahead of the server's, comes while a change on the server still
    gets the same stamp. A directory is looked into again until its stamp was seen unchanged
    for ``SETTLE`` seconds (or is that old by this host's clock); from then on a call costs a
    stat, no listing."""
    whole = 10**9

    def sftp_stamp(directory: str) -> tuple[int, int, int]:
        info = os.stat(spool.dir(directory))
        mtime = info.st_mtime_ns // whole * whole
        return info.st_ino, mtime, mtime

    listed: list[str] = []
    names = spool.jobs.names

    def counted_names(directory: str) -> list[str]:
        listed.append(directory)
        return names(directory)

    monkeypatch.setattr(spool.jobs, "directory_stamp", sftp_stamp)
    monkeypatch.setattr(spool.jobs, "names", counted_names)
    make_job(spool, "first", second=1)
    done = spool.dir("done")
    second = sftp_stamp("done")[1]
    clock = [100.0]
    catalogue = catalogues(spool, wall_ns=lambda: second + 1_200_000_000,
                           monotonic=lambda: clock[0])  # fmt: skip
    assert ids(catalogue.page(JobQuery())) == ["first"]
    make_job(spool, "second", second=2)
    os.utime(done, ns=(second, second))  # the server's clock still in that second
    assert ids(catalogue.page(JobQuery())) == ["second", "first"]
    clock[0] += SETTLE
    catalogue.page(JobQuery())  # the stamp seen unchanged that long: it stands for done/
    listed.clear()
    assert ids(catalogue.page(JobQuery())) == ["second", "first"]
    assert "done" not in listed


def test_a_costly_look_is_spaced_but_what_the_daemon_says_shows_at_once(
    spool: Spool, catalogues: Callable[..., Catalogue], monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    names = spool.jobs.names

    def slow_names(directory: str) -> list[str]:
        clock[0] += 0.05 if directory == "done" else 0.0  # 50 ms: spaced by 1 s
        return names(directory)

    monkeypatch.setattr(spool.jobs, "names", slow_names)
    make_job(spool, "first", second=1)
    catalogue = catalogues(spool, monotonic=lambda: clock[0])
    assert ids(catalogue.page(JobQuery())) == ["first"]
    make_job(spool, "untold", second=2)
    make_job(spool, "waiting", "pending", second=3)  # pending/: a cheap look, made every call
    assert ids(catalogue.page(JobQuery())) == ["waiting", "first"]
    make_job(spool, "told", second=4)
    catalogue.forget("told")
    assert ids(catalogue.page(JobQuery())) == ["told", "waiting", "first"]
    clock[0] += catalogue_module.LOOK_SPACING * 0.05
    assert ids(catalogue.page(JobQuery())) == ["told", "waiting", "untold", "first"]


def test_a_directory_this_user_may_not_list_is_left_out(
    varied: Spool, catalogues: Callable[..., Catalogue], monkeypatch: pytest.MonkeyPatch
) -> None:
    names = varied.jobs.names

    def refusing(directory: str) -> list[str]:
        if directory == "failed":
            raise PermissionError(13, "Permission denied", directory)
        return names(directory)

    monkeypatch.setattr(varied.jobs, "names", refusing)
    catalogue = catalogues(varied)
    assert ids(catalogue.page(JobQuery(labels={"team": "ops"}))) == ["old-6", "deploy-1"]
    assert catalogue.counts()["failed"] == 0


def test_pages_asked_from_several_threads_while_jobs_come(
    spool: Spool, catalogues: Callable[..., Catalogue]
) -> None:
    for second in range(20):
        make_job(spool, f"job-{second:02d}", second=second)
    catalogue = catalogues(spool)
    problems: list[BaseException] = []
    stop = threading.Event()

    def ask() -> None:
        try:
            while not stop.is_set():
                found = all_ids(catalogue, JobQuery(), limit=7)
                assert found == sorted(found, reverse=True), found
        except BaseException as exc:  # reported below
            problems.append(exc)

    askers = [threading.Thread(target=ask) for _ in range(4)]
    for thread in askers:
        thread.start()
    try:
        for second in range(20, 60):
            job = make_job(spool, f"job-{second:02d}", second=second)
            catalogue.forget(job.job_id)
    finally:
        stop.set()
        for thread in askers:
            thread.join(timeout=60)
    assert not problems, problems
    assert all_ids(catalogue, JobQuery(), limit=50) == [f"job-{s:02d}" for s in range(59, -1, -1)]


# -- the snapshot -----------------------------------------------------------------------------


def rewrite_snapshot(spool: Spool, change: Callable[[Any], None]) -> Path:
    """The snapshot's JSON changed, with a checksum that holds."""
    path = spool.root / "tmp" / "catalogue.snapshot"
    document = json.loads(path.read_bytes().partition(b"\n")[2])
    change(document)
    body = json.dumps(document).encode()
    digest = hashlib.sha256(body).hexdigest().encode()
    path.write_bytes(b"spoold-catalogue-1 %s\n%s" % (digest, body))
    return path


def test_after_a_restart_the_snapshot_is_used_and_no_status_json_is_read(
    varied: Spool, catalogues: Callable[..., Catalogue], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = catalogues(varied, wall_ns=later_ns)
    everything = ids(first.page(JobQuery()))
    counts = first.counts()
    first.close()
    assert (varied.root / "tmp" / "catalogue.snapshot").is_file()

    restarted = Spool(varied.root, durable=False)
    read = count_reads(restarted, monkeypatch)
    second = catalogues(restarted, wall_ns=later_ns)
    assert second.counts() == counts
    assert read == [], "the index came from the snapshot"
    page = second.page(JobQuery(labels={"team": "ops"}), limit=2)
    assert ids(page) == ["old-6", "deploy-2"]
    assert read == ["old-6", "deploy-2"], "only the page's rows"
    assert ids(second.page(JobQuery())) == everything
    assert ids(second.page(JobQuery(labels={"team": "ops"}))) == ["old-6", "deploy-2", "deploy-1"]


def test_a_stale_snapshot_is_brought_up_to_date(
    spool: Spool, catalogues: Callable[..., Catalogue], monkeypatch: pytest.MonkeyPatch
) -> None:
    for second in range(4):
        make_job(spool, f"job-{second}", "failed", second=second)
    make_job(spool, "gone", second=9)
    first = catalogues(spool, wall_ns=later_ns)
    first.counts()
    first.close()
    # The snapshot's look as just after every job above was made, and what follows later (by
    # more than a tick of the coarse clock that stamps files' times).
    made = [*spool.jobs.list_jobs("failed"), *spool.jobs.list_jobs("done")]
    newest = max(os.stat(job.location).st_ctime_ns for job in made)
    wait_for(lambda: time.time_ns() > newest + 50_000_000, bound=5, what="the clock to move on")
    after = newest + 1_000_000  # entered_times are float seconds: a margin for their rounding
    rewrite_snapshot(spool, lambda doc: doc.__setitem__("fresh_ns", after + int(SETTLE * 1e9)))
    # While no catalogue looked: one job retried and cancelled, one purged, one new.
    retry_and_cancel(spool, "job-1")
    spool.jobs.purge(spool.jobs.get("gone"))
    make_job(spool, "new", second=8)
    restarted = Spool(spool.root, durable=False)
    read = count_reads(restarted, monkeypatch)
    again = catalogues(restarted)
    assert again.counts() == {"pending": 0, "running": 0, "succeeded": 1, "failed": 3,
                              "cancelled": 1, "scheduled": 0}  # fmt: skip
    assert sorted(read) == ["job-1", "new"], "the changed jobs only"
    assert ids(again.page(JobQuery(state="cancelled"))) == ["job-1"]


@pytest.mark.parametrize(
    "spoil",
    [
        lambda data: b"",
        lambda data: data[: len(data) // 2],  # torn
        lambda data: data[:-3] + b"xyz",  # checksum no longer matches
        lambda data: b"not a snapshot at all\n{}",
        lambda data: data.replace(b"spoold-catalogue-1", b"spoold-catalogue-9"),
    ],
)
def test_a_corrupt_snapshot_is_ignored(
    varied: Spool, catalogues: Callable[..., Catalogue], spoil: Callable[[bytes], bytes]
) -> None:
    first = catalogues(varied, wall_ns=later_ns)
    expected = ids(first.page(JobQuery()))
    first.close()
    path = varied.root / "tmp" / "catalogue.snapshot"
    path.write_bytes(spoil(path.read_bytes()))
    second = catalogues(Spool(varied.root, durable=False), wall_ns=later_ns)
    assert ids(second.page(JobQuery())) == expected
    assert second.counts()["scheduled"] == 1


@pytest.mark.parametrize(
    "change",
    [
        lambda doc: doc.__setitem__("states", "x" + doc["states"][1:]),  # no such state
        lambda doc: doc["ids"].__setitem__(0, "../escape"),  # not a job id
        lambda doc: doc["labels"].__setitem__(0, 99),  # no such label set
        lambda doc: doc["executors"].__setitem__(0, "local"),  # not an index
        lambda doc: doc["ids"].__setitem__(0, doc["ids"][1]),  # a job twice
        lambda doc: doc["submitted"].reverse(),  # not in order
        lambda doc: doc["submitters"].pop(),  # a column short
        lambda doc: doc["labelsets"].append([0]),  # half a pair
        lambda doc: doc["stamps"].__setitem__("done", [1, 2]),
        lambda doc: doc.pop("fresh_ns"),
    ],
)
def test_a_snapshot_whose_checksum_holds_but_whose_content_does_not_is_ignored(
    varied: Spool, catalogues: Callable[..., Catalogue], change: Callable[[Any], None]
) -> None:
    first = catalogues(varied, wall_ns=later_ns)
    expected = ids(first.page(JobQuery()))
    first.close()
    path = rewrite_snapshot(varied, change)
    with pytest.raises(catalogue_module._Corrupt):
        catalogue_module.decode_snapshot(path.read_bytes())
    second = catalogues(Spool(varied.root, durable=False), wall_ns=later_ns)
    assert ids(second.page(JobQuery())) == expected


def test_the_snapshot_is_written_when_the_index_changed_at_most_every_interval(
    spool: Spool, catalogues: Callable[..., Catalogue], monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [0.0]
    written: list[int] = []
    write = spool.jobs.write_snapshot

    def counting(name: str, data: bytes) -> None:
        written.append(len(data))
        write(name, data)

    monkeypatch.setattr(spool.jobs, "write_snapshot", counting)
    make_job(spool, "first", second=1)
    catalogue = catalogues(spool, monotonic=lambda: clock[0], snapshot_interval=60)
    catalogue.page(JobQuery())
    catalogue.save()  # waits for the writer; nothing changed since
    assert len(written) == 1
    catalogue.page(JobQuery())
    catalogue.save()
    assert len(written) == 1, "unchanged: not written again"
    make_job(spool, "second", second=2)
    clock[0] += 30
    catalogue.page(JobQuery())
    assert len(written) == 1, "changed, but the last one is only 30 s old"
    clock[0] += 30
    catalogue.page(JobQuery())
    catalogue.save()
    assert len(written) == 2
    catalogue.close()
    assert len(written) == 2


def test_a_snapshot_that_cannot_be_written_costs_nothing_but_the_next_start(
    spool: Spool, catalogues: Callable[..., Catalogue], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refusing(name: str, data: bytes) -> None:
        raise PermissionError(13, "Permission denied", name)

    monkeypatch.setattr(spool.jobs, "write_snapshot", refusing)
    make_job(spool, "first", second=1)
    catalogue = catalogues(spool)
    assert ids(catalogue.page(JobQuery())) == ["first"]
    catalogue.close()
    assert not (spool.root / "tmp" / "catalogue.snapshot").exists()


def test_read_status_raises_job_not_found_for_a_job_gone(spool: Spool) -> None:
    """What ``_row`` relies on: a job moved or purged reads as JobNotFound."""
    job = make_job(spool, "gone")
    spool.jobs.purge(job)
    with pytest.raises(JobNotFound):
        spool.jobs.read_status(job)


def test_strings_of_jobs_gone_are_let_go(
    spool: Spool, catalogues: Callable[..., Catalogue], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A label whose every value differs (a request id) keeps no value of a job purged."""
    monkeypatch.setattr(catalogue_module, "_PRUNE_AFTER", 2)
    for second in range(6):
        make_job(spool, f"job-{second}", second=second, labels={"request": f"r{second}"})
    catalogue = catalogues(spool)
    assert catalogue.counts()["succeeded"] == 6
    for second in range(4):
        spool.jobs.purge(spool.jobs.get(f"job-{second}"))
    assert ids(catalogue.page(JobQuery(labels={"request": None}))) == ["job-5", "job-4"]
    assert ids(catalogue.page(JobQuery(labels={"request": "r4"}))) == ["job-4"]
    shared = catalogue._strings.values()
    assert "r5" in shared
    assert not {"r0", "r1", "r2", "r3"} & set(shared)


def test_a_row_whose_job_is_not_what_its_entry_says_is_never_wrongly_shown(
    spool: Spool, catalogues: Callable[..., Catalogue]
) -> None:
    """Purged and submitted anew under the same id, unseen (no look, no forget): the rows
    shown are read fresh and checked; the entry is corrected by that read."""
    job = make_job(spool, "reused", second=1, executor="ssh", labels={"team": "ops"})
    catalogue = catalogues(spool)
    assert ids(catalogue.page(JobQuery(executor="ssh", labels={"team": "ops"}))) == ["reused"]
    status = spool.jobs.read_status(job)
    spool.jobs.write_status(job, {**status, "executor": "local", "labels": {"team": "web"}})
    assert ids(catalogue.page(JobQuery(executor="ssh"))) == []
    assert ids(catalogue.page(JobQuery(executor="local", labels={"team": "web"}))) == ["reused"]
    assert ids(catalogue.page(JobQuery(labels={"team": "ops"}))) == []
