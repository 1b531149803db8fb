"""Which pending job a free slot gets: the highest ``priority`` first, then the oldest, within
the concurrency limits (the config's per executor, the job's per ``concurrency.key``).

A job whose limit is full waits and lets the next one pass. ``concurrency.strategy`` decides
what a new job does when its key is busy: ``queue`` waits its turn, ``skip`` is cancelled,
``replace`` cancels the jobs of that key still waiting and waits in their place. Pure and
single-threaded: the caller holds its lock.

Waiting jobs stand in lanes, one per JobMeta: the limits judge every job of a lane alike, so a
full limit is met once per lane, not once per job behind it. Each (priority, executor) keeps
its lanes in a heap by the age of their first job; an executor at its limit is passed over
whole. A ``take`` costs the same with 10 or 40,000 jobs waiting behind a full limit, where
walking the jobs made a flood's dispatch quadratic (10,000 behind ``limits.executors``: 5.4 s
of the main process's time).

A job that runs already counts against its limits however it came to run: one adopted (its
worker gone, it goes on here) is counted as it is queued and handed out before anything else,
whatever its priority or its key's strategy; a claim a previous daemon left in running/ is
counted from the start (``hold``) until it is adopted or let go. A restart never starts more
than the limits allow beside what still runs.

Past ``held`` jobs waiting, a lane keeps its youngest packed (``_Packed``: the id and the
place in line, ~40 bytes a job where one waiting as an object is ~200), and unpacks them as
its line moves up: a flood's backlog costs the daemon a fifth of the memory it did, and the
order is the same, since only a lane's youngest are ever packed.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import heapq
import itertools
from array import array
from collections import Counter, deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class JobMeta:
    """What dispatch needs to know of a job: its executor, priority and concurrency."""

    executor: str = ""
    priority: int = 0
    key: str | None = None
    limit: int = 1
    strategy: str = "queue"

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> JobMeta:
        """From a validated job document, or from a status.json that kept these fields.

        A job with steps takes no slot of an executor: each of its steps takes one of its
        own executor's as it runs (``want_slot``). Its status.json says so once its steps
        ran; before that, its worker says so as they start (``stepping``).
        Jobs alike share one: a flood of 10,000 queued jobs held one each.
        """
        concurrency = document.get("concurrency") or {}
        return _meta(
            "" if document.get("steps") else str(document.get("executor") or ""),
            int(document.get("priority") or 0),
            concurrency.get("key"),
            int(concurrency.get("limit", 1)),
            str(concurrency.get("strategy", "queue")),
        )


@functools.lru_cache(maxsize=256)
def _meta(executor: str, priority: int, key: str | None, limit: int, strategy: str) -> JobMeta:
    return JobMeta(executor, priority, key, limit, strategy)


@dataclass(slots=True)
class _Waiting:
    job_id: str
    meta: JobMeta
    seq: int
    payload: Any = field(compare=False)


#: A step's slot of its executor (``want_slot``): which worker process asked (its index in
#: the plan, its pid) and the token it gave the step's try.
SlotKey = tuple[int, int, str]

#: Waiting jobs held as objects before lanes pack their youngest: a flood's first second.
HELD = 1024
#: Jobs packed together (one array of places in line, one string of ids).
PACK = 256
#: A lane with a packed tail unpacks its oldest pack when fewer than this wait unpacked.
UNPACK_BELOW = 32


class _Packed:
    """A lane's youngest waiting jobs, oldest first, packed: plain jobs only (no payload)."""

    __slots__ = ("count", "ids", "packs", "seqs")

    def __init__(self) -> None:
        self.packs: deque[tuple[array[int], str]] = deque()
        self.seqs: list[int] = []  # the youngest, not yet a pack
        self.ids: list[str] = []
        self.count = 0

    def append(self, seq: int, job_id: str) -> None:
        self.seqs.append(seq)
        self.ids.append(job_id)
        self.count += 1
        if len(self.ids) >= PACK:
            # Job ids are file names: never a NUL.
            self.packs.append((array("q", self.seqs), "\0".join(self.ids)))
            self.seqs, self.ids = [], []

    def take_oldest(self) -> list[tuple[int, str]]:
        """The oldest pack's jobs (or the youngest, if no pack is full), out of here."""
        if self.packs:
            seqs, ids = self.packs.popleft()
            taken = list(zip(seqs, ids.split("\0"), strict=True))
        else:
            taken = list(zip(self.seqs, self.ids, strict=True))
            self.seqs, self.ids = [], []
        self.count -= len(taken)
        return taken

    def job_ids(self) -> Iterator[str]:
        for _, ids in self.packs:
            yield from ids.split("\0")
        yield from self.ids


class _Lane:
    """The waiting jobs of one JobMeta, oldest first: a list read from ``first`` on, cut when
    half of it is read (a list's ``pop(0)`` moves all the rest; a deque is 760 bytes even
    empty, and with a concurrency key per customer most lanes hold a job or two); past the
    queue's ``held``, its youngest packed in ``packed``."""

    __slots__ = ("first", "jobs", "packed")

    def __init__(self) -> None:
        self.jobs: list[_Waiting] = []
        self.first = 0
        self.packed: _Packed | None = None

    def __len__(self) -> int:
        return self.unpacked() + (0 if self.packed is None else self.packed.count)

    def unpacked(self) -> int:
        return len(self.jobs) - self.first

    def head(self) -> _Waiting:
        return self.jobs[self.first]

    def pop(self) -> _Waiting:
        waiting = self.jobs[self.first]
        self.first += 1
        if self.first * 2 >= len(self.jobs):
            del self.jobs[: self.first]
            self.first = 0
        return waiting

    def insert(self, waiting: _Waiting) -> bool:
        """Put a job in its place by age; whether it is now the head."""
        jobs = self.jobs
        if not jobs or jobs[-1].seq < waiting.seq:  # a new job: the youngest
            jobs.append(waiting)
            return len(jobs) - 1 == self.first
        # A job given back goes back to where it stood: near the front of a long line.
        position = bisect.bisect_left(jobs, waiting.seq, lo=self.first, key=_seq)
        jobs.insert(position, waiting)
        return position == self.first

    def waiting(self) -> list[_Waiting]:
        """The jobs waiting unpacked (``DispatchQueue._unpack`` the others first)."""
        return self.jobs[self.first :]


def _seq(waiting: _Waiting) -> int:
    return waiting.seq


#: A lane's place in its heap: the seq of the job at its head, when the entry was made. An
#: entry whose lane has another head (or none) since is stale, and dropped when met.
_Entry = tuple[int, JobMeta]


class DispatchQueue:
    """Pending jobs in the order they may start, and the jobs handed out, counted by limit."""

    def __init__(
        self, executor_limits: Mapping[str, int] | None = None, *, held: int = HELD
    ) -> None:
        """``held``: jobs waiting as objects before lanes pack their youngest."""
        self._executor_limits = dict(executor_limits or {})
        self._held = held
        self._packed = 0  # jobs waiting packed, in all lanes
        self._lanes: dict[JobMeta, _Lane] = {}
        #: priority -> executor -> the heap of its lanes' entries.
        self._heads: dict[int, dict[str, list[_Entry]]] = {}
        self._ids: dict[str, _Waiting] = {}
        self._active: dict[str, _Waiting] = {}
        self._by_executor: Counter[str] = Counter()
        self._by_key: Counter[str] = Counter()
        #: key -> the lanes of its waiting jobs (a list: nearly always one).
        self._keyed: dict[str, list[JobMeta]] = {}
        #: Adopted jobs not handed out yet, oldest first: they run, and are counted already.
        self._adopted: dict[str, _Waiting] = {}
        #: Of the jobs handed out, those adopted: one given back goes back among the adopted.
        self._adopted_out: set[str] = set()
        #: Claims in running/ not (yet) adopted here (``hold``), each counted by its limits.
        self._claims: dict[str, JobMeta] = {}
        self._seq = itertools.count()
        #: Steps holding a slot of their executor (``want_slot``), by key: the executor.
        self._slots: dict[SlotKey, str] = {}
        #: Steps waiting for a slot, by executor, oldest first; they go before any job of it.
        self._slot_queue: dict[str, dict[SlotKey, None]] = {}

    def __bool__(self) -> bool:
        # A lane with packed jobs has unpacked ones before them.
        return bool(self._ids) or bool(self._adopted)

    def __len__(self) -> int:
        return len(self._ids) + self._packed + len(self._adopted)

    def __contains__(self, job_id: object) -> bool:
        """Whether a job waits unpacked or is handed out (a packed one is not looked for).
        A claim held (``hold``) is not: it waits for its adoption, which is queued."""
        return job_id in self._ids or job_id in self._active or job_id in self._adopted

    def job_ids(self) -> set[str]:
        """Every job waiting, packed or not, or handed out, at this moment."""
        found = self._ids.keys() | self._active.keys() | self._adopted.keys()
        found.update(self._packed_ids())
        return found

    @property
    def claims(self) -> int:
        """How many claims are held (``hold``): each takes a worker slot that nothing here
        fills (the caller's to count)."""
        return len(self._claims)

    def hold(self, job_id: str, meta: JobMeta) -> None:
        """Count a job that may be running without having been handed out here (a claim a
        previous daemon left in running/) against its limits, until it is adopted (``add``
        with ``running``) or let go (``let_go``). One queued or handed out already is not."""
        if job_id not in self and job_id not in self._claims:
            self._claims[job_id] = meta
            self._count(meta, 1)

    def lost(self, job_id: str) -> None:
        """A job handed out whose worker process died: it may run on (its supervisor does),
        so it stays counted, as a claim held (``hold``), until adopted or let go."""
        if (active := self._active.pop(job_id, None)) is not None:
            self._adopted_out.discard(job_id)
            self._claims[job_id] = active.meta

    def let_go(self, job_id: str) -> bool:
        """A claim held is no longer one to count (it ended, or another host has it);
        whether one was held."""
        if (meta := self._claims.pop(job_id, None)) is None:
            return False
        self._count(meta, -1)
        return True

    def held_claims(self) -> frozenset[str]:
        """The claims held (``hold``), not yet adopted or let go."""
        return frozenset(self._claims)

    def holds(self, job_id: str) -> bool:
        """Whether a job waits, packed or not, or is handed out (a packed one is looked for
        through every pack)."""
        return job_id in self or job_id in self._packed_ids()

    def _packed_ids(self) -> Iterator[str]:
        for lane in self._lanes.values():
            if lane.packed is not None:
                yield from lane.packed.job_ids()

    def add(
        self, job_id: str, meta: JobMeta, payload: Any = None, *, running: bool = False
    ) -> list[tuple[str, str]]:
        """Queue a job; return the jobs to cancel (job id, why): the new one, or those replaced.

        ``running``: an adoption, a job that runs already: counted at once (a claim held for
        it becomes its count) and handed out first; never skipped or replaced, never held back.
        """
        if running:
            if job_id not in self._adopted and job_id not in self._active:
                if (claimed := self._claims.pop(job_id, None)) is not None:
                    self._count(claimed, -1)
                self._count(meta, 1)
                self._adopted[job_id] = _Waiting(job_id, meta, next(self._seq), payload)
            return []
        cancel: list[tuple[str, str]] = []
        if meta.key is not None and meta.strategy != "queue":
            waiting = sum(len(self._lanes[lane]) for lane in self._keyed.get(meta.key, ()))
            busy = self._by_key[meta.key] + waiting
            if busy >= meta.limit and meta.strategy == "skip":
                why = (
                    f"skipped: {busy} job(s) with concurrency key {meta.key!r} already running "
                    f"or waiting (limit {meta.limit})"
                )
                return [(job_id, why)]
            if busy >= meta.limit and meta.strategy == "replace":
                why = f"replaced by job {job_id} (concurrency key {meta.key!r})"
                cancel = [(old.job_id, why) for old in self._drop_key(meta.key)]
        self._put(_Waiting(job_id, meta, next(self._seq), payload), new=True)
        return cancel

    def take(self, *, adopted_only: bool = False) -> tuple[str, Any] | None:
        """The next job allowed to start now, marked as handed out; None if none is.
        Adoptions first; ``adopted_only``: nothing else (no worker slot is free for it)."""
        if self._adopted:
            job_id = next(iter(self._adopted))
            waiting = self._adopted.pop(job_id)
            self._active[job_id] = waiting  # counted since it was queued
            self._adopted_out.add(job_id)
            return job_id, waiting.payload
        if adopted_only:
            return None
        for priority in sorted(self._heads, reverse=True):
            by_executor = self._heads[priority]
            found: list[tuple[_Entry, list[_Entry]]] = []  # each executor's oldest allowed
            for executor in list(by_executor):
                limit = self._executor_limits.get(executor)
                if limit is not None and (
                    self._by_executor[executor] >= limit or executor in self._slot_queue
                ):
                    continue  # full, or its slots go to steps that wait already
                if (entry := self._first_allowed(by_executor, executor)) is not None:
                    found.append((entry, by_executor[executor]))
            if found:
                found.sort(key=lambda candidate: candidate[0][0])  # by the age of their heads
                for other, its_heap in found[1:]:
                    heapq.heappush(its_heap, other)
                waiting = self._pop(*found[0])
                self._activate(waiting)
                return waiting.job_id, waiting.payload
            if not by_executor:
                del self._heads[priority]
        return None

    def finished(self, job_id: str) -> None:
        """A job handed out is done with (ran, or was claimed elsewhere): its limits free up."""
        if (active := self._active.pop(job_id, None)) is not None:
            self._adopted_out.discard(job_id)
            self._count(active.meta, -1)

    def give_back(self, job_id: str) -> None:
        """A job handed out and not started comes back, to its old place in line (an
        adoption, at the head of the line, still counted: it runs meanwhile)."""
        if (active := self._active.pop(job_id, None)) is None:
            return
        if job_id in self._adopted_out:
            self._adopted_out.discard(job_id)
            self._adopted = {job_id: active, **self._adopted}
            return
        self._count(active.meta, -1)
        self._put(active)

    def stepping(self, job_id: str) -> None:
        """A job handed out (or adopted) runs steps: it holds no slot of its executor, its
        steps do (``want_slot``). Its status.json did not say so when it was queued."""
        waiting = self._active.get(job_id) or self._adopted.get(job_id)
        if waiting is not None and waiting.meta.executor:
            _less(self._by_executor, waiting.meta.executor)
            waiting.meta = dataclasses.replace(waiting.meta, executor="")
            self._by_executor[""] += 1  # as its ``finished`` will count it off

    def want_slot(self, key: SlotKey, executor: str, *, running: bool = False) -> bool:
        """A step asks for a slot of ``executor``: whether it has one now. Else it waits,
        before any job of that executor, until ``granted`` names it; ``free_slot`` ends
        either. ``running``: it runs already (an adopted step): counted at once, whatever
        the limit, as an adopted job is."""
        limit = self._executor_limits.get(executor)
        if limit is None or key in self._slots:
            return True
        if running or (not self._slot_queue.get(executor) and self._by_executor[executor] < limit):
            self._slots[key] = executor
            self._by_executor[executor] += 1
            return True
        self._slot_queue.setdefault(executor, {})[key] = None
        return False

    def free_slot(self, key: SlotKey) -> None:
        """A step's slot is free (its try ended), or it no longer waits for one."""
        if (executor := self._slots.pop(key, None)) is not None:
            _less(self._by_executor, executor)
            return
        for executor, waiting in list(self._slot_queue.items()):
            if waiting.pop(key, 0) is None and not waiting:
                del self._slot_queue[executor]

    def free_slots(self, index: int, pid: int) -> None:
        """Free every slot held or asked for by the steps of a worker process (it died)."""
        for key in [key for key in self._slots if key[:2] == (index, pid)]:
            self.free_slot(key)
        for waiting in list(self._slot_queue.values()):
            for key in [key for key in waiting if key[:2] == (index, pid)]:
                self.free_slot(key)

    def granted(self) -> list[SlotKey]:
        """The steps that had waited and have their slot now, oldest first in each executor."""
        found: list[SlotKey] = []
        for executor, waiting in list(self._slot_queue.items()):
            limit = self._executor_limits.get(executor, 0)
            while waiting and self._by_executor[executor] < limit:
                key = next(iter(waiting))
                del waiting[key]
                self._slots[key] = executor
                self._by_executor[executor] += 1
                found.append(key)
            if not waiting:
                del self._slot_queue[executor]
        return found

    def priority_of(self, job_id: str) -> int:
        """The priority of a job waiting or handed out (0 if unknown)."""
        entry = self._ids.get(job_id) or self._active.get(job_id) or self._adopted.get(job_id)
        return entry.meta.priority if entry is not None else 0

    def clear(self) -> None:
        """Forget every job waiting and every claim held (the daemon stops); those handed
        out stay counted until ``finished``."""
        for waiting in self._adopted.values():
            self._count(waiting.meta, -1)
        for meta in self._claims.values():
            self._count(meta, -1)
        self._adopted.clear()
        self._claims.clear()
        self._lanes.clear()
        self._heads.clear()
        self._ids.clear()
        self._keyed.clear()
        self._packed = 0

    def _allowed(self, meta: JobMeta) -> bool:
        """Whether a job of this lane may start now as its key goes (its executor's limit is
        judged for all its lanes at once, in ``take``)."""
        return meta.key is None or self._by_key[meta.key] < meta.limit

    def _first_allowed(self, by_executor: dict[str, list[_Entry]], executor: str) -> _Entry | None:
        """The entry of ``executor``'s lane with the oldest head whose key allows a start,
        taken off its heap (``take`` puts it back, or ``_pop`` the lane's next head); None,
        and the heap gone if empty, if no lane's key does.

        Lanes held back by their key are passed and put back: there are at most as many as
        jobs handed out. Stale entries go.
        """
        heap = by_executor[executor]
        passed: list[_Entry] = []
        found = None
        while heap:
            entry = heapq.heappop(heap)
            lane = self._lanes.get(entry[1])
            if lane is None or lane.head().seq != entry[0]:
                continue
            if self._allowed(entry[1]):
                found = entry
                break
            passed.append(entry)
        for entry in passed:
            heapq.heappush(heap, entry)
        if found is None and not heap:
            del by_executor[executor]
        return found

    def _put(self, waiting: _Waiting, *, new: bool = False) -> None:
        """Into its lane: ``new``, the youngest of all (packed if its lane packs already, or
        if ``held`` wait unpacked and its lane has a head); else one given back, which goes
        back to its place among the unpacked (older than any packed)."""
        meta = waiting.meta
        lane = self._lanes.get(meta)
        if lane is None:
            lane = self._lanes[meta] = _Lane()
        if new and lane.packed is not None and waiting.payload is not None:
            self._unpack(meta, lane, everything=True)  # rare (an adoption): it cannot be packed
        elif (
            new
            and waiting.payload is None
            and (lane.packed is not None or (len(self._ids) >= self._held and lane.unpacked()))
        ):
            if lane.packed is None:
                lane.packed = _Packed()
            lane.packed.append(waiting.seq, waiting.job_id)
            self._packed += 1
            return
        if lane.insert(waiting):
            self._push_head(lane)
        self._ids[waiting.job_id] = waiting
        if meta.key is not None and meta not in (lanes := self._keyed.setdefault(meta.key, [])):
            lanes.append(meta)

    def _unpack(self, meta: JobMeta, lane: _Lane, *, everything: bool = False) -> None:
        """Bring ``meta``'s lane's oldest packed jobs (``everything``: all) in behind its
        unpacked ones, until UNPACK_BELOW wait unpacked. A job queued twice (a scan met it
        in pending/ while it was packed) comes in once."""
        packed = lane.packed
        if packed is None:
            return
        while packed.count and (everything or lane.unpacked() < UNPACK_BELOW):
            taken = packed.take_oldest()
            self._packed -= len(taken)
            for seq, job_id in taken:
                if job_id not in self._ids and job_id not in self._active:
                    waiting = _Waiting(job_id, meta, seq, None)
                    lane.jobs.append(waiting)
                    self._ids[job_id] = waiting
        if not packed.count:
            lane.packed = None

    def _pop(self, entry: _Entry, heap: list[_Entry]) -> _Waiting:
        """Take the job at the head of ``entry``'s lane out of line; the lane's next job, if
        any, takes its place in ``heap`` (an executor's heap left empty goes at a next take)."""
        meta = entry[1]
        lane = self._lanes[meta]
        waiting = lane.pop()
        self._unpack(meta, lane)
        if lane:  # a lane with packed jobs has unpacked ones: it has a head
            heapq.heappush(heap, (lane.head().seq, meta))
        else:
            self._drop_lane(meta)
        del self._ids[waiting.job_id]
        return waiting

    def _drop_key(self, key: str) -> list[_Waiting]:
        """Take every waiting job of ``key`` out of line; return them, oldest first."""
        dropped: list[_Waiting] = []
        for meta in self._keyed.pop(key, []):
            self._unpack(meta, lane := self._lanes.pop(meta), everything=True)
            dropped.extend(lane.waiting())
        for waiting in dropped:
            del self._ids[waiting.job_id]
        return sorted(dropped, key=lambda waiting: waiting.seq)

    def _drop_lane(self, meta: JobMeta) -> None:
        del self._lanes[meta]
        if meta.key is not None and (lanes := self._keyed.get(meta.key)) is not None:
            lanes.remove(meta)
            if not lanes:
                del self._keyed[meta.key]

    def _push_head(self, lane: _Lane) -> None:
        head = lane.head()
        by_executor = self._heads.setdefault(head.meta.priority, {})
        heapq.heappush(by_executor.setdefault(head.meta.executor, []), (head.seq, head.meta))

    def _activate(self, waiting: _Waiting) -> None:
        self._active[waiting.job_id] = waiting
        self._count(waiting.meta, 1)

    def _count(self, meta: JobMeta, delta: int) -> None:
        self._by_executor[meta.executor] += delta
        if meta.key is not None:
            if delta > 0:
                self._by_key[meta.key] += delta
            else:
                _less(self._by_key, meta.key)


def _less(counter: Counter[str], key: str) -> None:
    """One fewer of ``key``; none left, no entry (a key per customer would otherwise stay
    for the daemon's life)."""
    if counter[key] <= 1:
        del counter[key]
    else:
        counter[key] -= 1
