"""Dispatch order and concurrency limits, without processes: priority, keys, strategies."""

from __future__ import annotations

import random
import tracemalloc

import pytest

from spoold.run.dispatch import HELD, DispatchQueue, JobMeta


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


def test_clear_forgets_what_waits_and_what_is_held_but_not_what_was_handed_out() -> None:
    """The daemon stops: the jobs waiting (packed or not), the adoptions not handed out and
    the claims held are forgotten, and their limits with them; a job handed out stays
    counted until it is finished."""
    queue = DispatchQueue({"local": 1}, held=2)
    queue.add("out", JobMeta(key="k", limit=1))
    assert queue.take() == ("out", None)
    queue.add("behind-out", JobMeta(key="k", limit=1))
    for job_id in ("w1", "w2", "w3"):  # the last two packed
        queue.add(job_id, JobMeta(key="w", limit=1))
    queue.add("adopted", JobMeta(executor="local"), "adopt", running=True)
    queue.hold("claimed", JobMeta(key="c", limit=1))
    assert (len(queue), queue.claims, queue.holds("w3")) == (5, 1, True)

    queue.clear()
    assert not queue and len(queue) == 0 and queue.claims == 0
    assert queue.job_ids() == {"out"} and not queue.holds("w3")
    assert queue.take() is None
    # Their limits are free again; only the job handed out still holds its key.
    queue.add("local-next", JobMeta(executor="local"))
    queue.add("c-next", JobMeta(key="c", limit=1))
    assert queue.add("w-next", JobMeta(key="w", limit=1, strategy="skip")) == [], "none waits"
    queue.add("k-next", JobMeta(key="k", limit=1))
    assert sorted(_drain(queue)) == ["c-next", "local-next", "w-next"]
    queue.finished("out")
    assert _drain(queue) == ["k-next"]


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


def test_a_flood_past_held_waits_packed_in_a_fifth_of_the_memory() -> None:
    """Past ``held`` waiting, a lane's youngest wait packed: ids and places in line, no object
    a job. Unpacked, each cost ~190 bytes: the job, its id, the index by id."""
    count = 40_000
    meta = JobMeta(executor="local")
    costs = {}
    for held in (count, HELD):
        queue = DispatchQueue(held=held)
        tracemalloc.start()
        try:
            for n in range(count):
                queue.add(f"20261206-{n:06d}-flood", meta)  # a new id each, of a common length
            costs[held], _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        ids = [f"20261206-{n:06d}-flood" for n in range(count)]
        assert _drain(queue) == ids
        assert not queue and len(queue) == 0 and queue.job_ids() == set(ids)
    per_job = {held: cost / count for held, cost in costs.items()}
    assert per_job[HELD] * 4 < per_job[count], f"bytes a job: {per_job}"
    assert per_job[HELD] < 45, f"bytes a job: {per_job}"


def test_a_packed_job_queued_again_by_a_scan_is_handed_out_once() -> None:
    """A scan of pending/ can meet a job in the moment between its acceptance and its queueing,
    and queue it a second time: packed, the two come in as one."""
    queue = DispatchQueue(held=2)
    meta = JobMeta()
    for job_id in ["a", "b", "c", "d", "c"]:
        queue.add(job_id, meta)
    assert queue.holds("d") and "d" not in queue, "packed: held, not looked up by id"
    assert _drain(queue) == ["a", "b", "c", "d"]
    assert len(queue) == 0


def test_a_job_that_cannot_be_packed_keeps_its_place_behind_packed_ones() -> None:
    """A job with a payload (an adoption) after packed jobs of its lane: they come in first."""
    queue = DispatchQueue(held=1)
    meta = JobMeta()
    for job_id in ["a", "b", "c"]:
        queue.add(job_id, meta)
    queue.add("adopted", meta, payload="run it")
    queue.add("e", meta)
    assert [queue.take() for _ in range(5)] == [
        ("a", None),
        ("b", None),
        ("c", None),
        ("adopted", "run it"),
        ("e", None),
    ]


def test_jobs_alike_share_their_meta_and_others_do_not() -> None:
    first = JobMeta.from_document({"executor": "local", "concurrency": {"key": "k", "limit": 2}})
    again = JobMeta.from_document({"executor": "local", "concurrency": {"key": "k", "limit": 2}})
    assert first is again
    assert first == JobMeta(executor="local", key="k", limit=2)
    other = JobMeta.from_document({"executor": "local", "concurrency": {"key": "k", "limit": 3}})
    assert other.limit == 3 and other is not first


class _Counted(str):
    """A concurrency key that counts how often it is compared (a walk over waiting jobs)."""

    compared = 0

    def __eq__(self, other: object) -> bool:
        _Counted.compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def _counting_allowed(queue: DispatchQueue) -> list[JobMeta]:
    """The metas ``queue`` judges against its limits, one entry per look."""
    looked: list[JobMeta] = []
    judge = queue._allowed

    def counted(meta: JobMeta) -> bool:
        looked.append(meta)
        return judge(meta)

    queue._allowed = counted  # type: ignore[method-assign]
    return looked


def _running_and_behind_it(queue: DispatchQueue, meta: JobMeta, prefix: str) -> list[JobMeta]:
    """One job of ``meta`` handed out, 10,000 more of it waiting; the looks counted from then."""
    queue.add("running", meta)
    assert queue.take() == ("running", None)
    for n in range(10_000):
        queue.add(f"{prefix}{n:05d}", meta)
    return _counting_allowed(queue)


def test_jobs_behind_a_full_executor_limit_are_not_walked_at_each_take() -> None:
    """Reproduces a flood behind `limits.executors`: each take walked all 10,000 waiting jobs
    to find none allowed (5.4 s of the main process for the flood, quadratic)."""
    queue = DispatchQueue({"proxmox": 1})
    looked = _running_and_behind_it(queue, JobMeta(executor="proxmox"), "p")
    for _ in range(100):
        assert queue.take() is None
    assert len(looked) == 0, f"{len(looked)} looks at waiting jobs for 100 takes"
    queue.add("local", JobMeta(executor="local"))
    assert queue.take() == ("local", None), "another executor passes"
    queue.finished("running")
    assert queue.take() == ("p00000", None), "the oldest proxmox job is next once one is free"


def test_jobs_behind_a_busy_key_are_passed_as_one() -> None:
    queue = DispatchQueue()
    looked = _running_and_behind_it(queue, JobMeta(key="deploy", limit=1), "d")
    for n in range(100):
        queue.add(f"other{n}", JobMeta(key=f"customer-{n}"))
        assert queue.take() == (f"other{n}", None)
    assert len(looked) <= 2 * 100, f"{len(looked)} looks at waiting jobs for 100 takes"
    queue.finished("running")
    assert queue.take() == ("d00000", None)


def test_skip_and_replace_count_a_key_without_walking_the_queue() -> None:
    queue = DispatchQueue()
    for n in range(10_000):
        queue.add(f"vm{n:05d}", JobMeta(key=_Counted(f"vm-{n}")))
    _Counted.compared = 0
    skip = JobMeta(key=_Counted("backup"), limit=2, strategy="skip")
    assert queue.add("b1", skip) == [] and queue.add("b2", skip) == []
    [(skipped, why)] = queue.add("b3", skip)
    assert skipped == "b3" and "2 job(s)" in why
    replace = JobMeta(key=_Counted("vm-7"), strategy="replace")
    assert queue.add("vm-7-new", replace) == [
        ("vm00007", "replaced by job vm-7-new (concurrency key 'vm-7')")
    ]
    assert _Counted.compared < 100, f"{_Counted.compared} key comparisons for 4 adds"
    assert len(queue) == 10_000 + 2


class _Reference:
    """The rule, spelled out as a walk over every waiting job (the queue before lanes)."""

    def __init__(self, limits: dict[str, int]) -> None:
        self.limits = limits
        self.waiting: list[tuple[int, str, JobMeta]] = []  # (seq, id, meta)
        self.active: dict[str, tuple[int, str, JobMeta]] = {}
        self.seq = 0

    def busy_executor(self, executor: str) -> int:
        return sum(1 for _, _, meta in self.active.values() if meta.executor == executor)

    def busy_key(self, key: str) -> int:
        return sum(1 for _, _, meta in self.active.values() if meta.key == key)

    def allowed(self, meta: JobMeta) -> bool:
        limit = self.limits.get(meta.executor)
        if limit is not None and self.busy_executor(meta.executor) >= limit:
            return False
        return meta.key is None or self.busy_key(meta.key) < meta.limit

    def add(self, job_id: str, meta: JobMeta) -> list[str]:
        if meta.key is not None and meta.strategy != "queue":
            same = [entry for entry in self.waiting if entry[2].key == meta.key]
            busy = self.busy_key(meta.key) + len(same)
            if busy >= meta.limit and meta.strategy == "skip":
                return [job_id]
            if busy >= meta.limit and meta.strategy == "replace":
                for entry in same:
                    self.waiting.remove(entry)
                self.seq += 1
                self.waiting.append((self.seq, job_id, meta))
                return [entry[1] for entry in sorted(same)]
        self.seq += 1
        self.waiting.append((self.seq, job_id, meta))
        return []

    def take(self) -> str | None:
        for entry in sorted(self.waiting, key=lambda e: (-e[2].priority, e[0])):
            if self.allowed(entry[2]):
                self.waiting.remove(entry)
                self.active[entry[1]] = entry
                return entry[1]
        return None

    def finished(self, job_id: str) -> None:
        self.active.pop(job_id, None)

    def give_back(self, job_id: str) -> None:
        if (entry := self.active.pop(job_id, None)) is not None:
            self.waiting.append(entry)


@pytest.mark.parametrize("held", [HELD, 3], ids=["unpacked", "packed-past-3"])
def test_the_order_and_the_limits_match_a_walk_over_every_job(held: int) -> None:
    """Seeded random adds, takes, ends and give-backs: the lanes hand out what a walk over
    every waiting job would, with priorities, executor limits, keys and all three strategies;
    and the same with all but three waiting jobs packed."""
    rng = random.Random(2312)
    for _ in range(30):
        limits = {"proxmox": rng.randint(1, 2), "docker": rng.randint(1, 3)}
        queue, reference = DispatchQueue(limits, held=held), _Reference(limits)
        active: list[str] = []
        for step in range(400):
            action = rng.random()
            if action < 0.5:
                meta = JobMeta(
                    executor=rng.choice(["local", "proxmox", "docker"]),
                    priority=rng.choice([0, 0, 0, 5, -1]),
                    key=rng.choice([None, None, "a", "b", "c"]),
                    limit=rng.randint(1, 2),
                    strategy=rng.choice(["queue", "queue", "skip", "replace"]),
                )
                job_id = f"j{step}"
                got = [cancelled for cancelled, _ in queue.add(job_id, meta)]
                assert got == reference.add(job_id, meta), f"add {job_id} {meta}"
            elif action < 0.8:
                taken = queue.take()
                assert (taken and taken[0]) == reference.take(), f"take at step {step}"
                if taken is not None:
                    active.append(taken[0])
            elif active:
                job_id = active.pop(rng.randrange(len(active)))
                if action < 0.93:
                    queue.finished(job_id)
                    reference.finished(job_id)
                else:
                    queue.give_back(job_id)
                    reference.give_back(job_id)
            assert len(queue) == len(reference.waiting)
            assert queue.job_ids() == {entry[1] for entry in reference.waiting} | set(active)


def test_a_job_given_back_finds_its_place_without_walking_the_line() -> None:
    """A revoked prefetch (a job of higher priority came) gives jobs back one by one; each went
    back to its place by a walk from the end of its line."""
    queue = DispatchQueue()
    meta = JobMeta()
    for n in range(10_000):
        queue.add(f"j{n:05d}", meta)
    taken = [queue.take() for _ in range(3)]
    looked = 0

    class Seq(int):
        def __gt__(self, other: object) -> bool:
            nonlocal looked
            looked += 1
            return int.__gt__(self, other)  # type: ignore[operator]

        def __lt__(self, other: object) -> bool:
            nonlocal looked
            looked += 1
            return int.__lt__(self, other)  # type: ignore[operator]

    for waiting in queue._ids.values():
        waiting.seq = Seq(waiting.seq)
    for job in reversed(taken):
        assert job is not None
        queue.give_back(job[0])
    assert looked < 3 * 100, f"{looked} comparisons to give 3 jobs back"
    assert _drain(queue)[:4] == ["j00000", "j00001", "j00002", "j00003"]
