"""Dispatch order and concurrency limits, without processes: priority, keys, strategies."""

from __future__ import annotations

import tracemalloc

from spoold.run.dispatch import DispatchQueue, JobMeta


def _drain(queue: DispatchQueue) -> list[str]:
    taken = []
    while (job := queue.take()) is not None:
        taken.append(job[0])
    return taken


def test_higher_priority_first_then_oldest_first() -> None:
    queue = DispatchQueue()
    for job_id, priority in [("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", -1)]:
        assert queue.add(job_id, JobMeta(priority=priority)) == []
    assert _drain(queue) == ["b", "d", "a", "c", "e"]


def test_a_per_executor_limit_lets_others_pass() -> None:
    queue = DispatchQueue({"proxmox": 1})
    for job_id, executor in [("p1", "proxmox"), ("p2", "proxmox"), ("l1", "local")]:
        queue.add(job_id, JobMeta(executor=executor))
    assert _drain(queue) == ["p1", "l1"], "p2 waits for p1"
    queue.finished("p1")
    assert _drain(queue) == ["p2"]


def test_queue_strategy_waits_for_the_key() -> None:
    queue = DispatchQueue()
    meta = JobMeta(key="customer-4711", limit=1)
    queue.add("first", meta)
    queue.add("second", meta)
    queue.add("other", JobMeta(key="customer-1"))
    assert _drain(queue) == ["first", "other"]
    queue.finished("first")
    assert _drain(queue) == ["second"]


def test_skip_cancels_the_newer_job_while_the_key_is_busy() -> None:
    queue = DispatchQueue()
    meta = JobMeta(key="k", limit=1, strategy="skip")
    assert queue.add("running", meta) == []
    assert queue.take() == ("running", None)
    [(job_id, why)] = queue.add("newer", meta)
    assert job_id == "newer" and "skipped" in why and "'k'" in why
    assert not queue
    queue.finished("running")
    assert queue.add("later", meta) == [], "free again"


def test_replace_cancels_the_waiting_one_and_takes_its_place() -> None:
    queue = DispatchQueue()
    meta = JobMeta(key="deploy", limit=1, strategy="replace")
    queue.add("v1", meta)
    assert queue.take() == ("v1", None)  # running: it is never replaced
    assert queue.add("v2", meta) == []  # waits behind v1
    assert queue.add("v3", meta) == [("v2", "replaced by job v3 (concurrency key 'deploy')")]
    assert _drain(queue) == []
    queue.finished("v1")
    assert _drain(queue) == ["v3"]


def test_a_job_given_back_returns_to_its_place_and_frees_its_limit() -> None:
    queue = DispatchQueue({"local": 1})
    for job_id in ("a", "b", "c"):
        queue.add(job_id, JobMeta(executor="local"))
    assert queue.take() == ("a", None)
    queue.give_back("a")
    assert _drain(queue) == ["a"]


def test_meta_from_a_document_or_a_status() -> None:
    meta = JobMeta.from_document({"executor": "docker", "priority": 3,
                                  "concurrency": {"key": "x", "strategy": "skip"}})  # fmt: skip
    assert meta == JobMeta("docker", 3, "x", 1, "skip")
    assert JobMeta.from_document({"concurrency": None}) == JobMeta()


def test_a_queued_job_costs_little_memory() -> None:
    """A flood leaves thousands of jobs waiting in the main process: each held a JobMeta and a
    RunJob of its own, ~480 bytes a job; jobs alike share one JobMeta now."""
    ids = [f"job-{n:05d}" for n in range(10_000)]
    document = {"executor": "local", "priority": 0, "product": {"commands": "true"}}
    queue = DispatchQueue()
    tracemalloc.start()
    try:
        for job_id in ids:
            queue.add(job_id, JobMeta.from_document(dict(document)))
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held / len(ids) < 200, f"{held / len(ids):.0f} bytes a queued job"
    assert _drain(queue) == ids


def test_jobs_alike_share_their_meta_and_others_do_not() -> None:
    first = JobMeta.from_document({"executor": "local", "concurrency": {"key": "k", "limit": 2}})
    again = JobMeta.from_document({"executor": "local", "concurrency": {"key": "k", "limit": 2}})
    assert first is again
    assert first == JobMeta(executor="local", key="k", limit=2)
    other = JobMeta.from_document({"executor": "local", "concurrency": {"key": "k", "limit": 3}})
    assert other.limit == 3 and other is not first
