"""The jobs of a spool as the HTTP API and the web page list them: filtered, newest first, a page
at a time, without reading every status.json on every request.

``spoold list`` (``spoold.face.listing``) reads every status.json and sorts: with 100,000
finished jobs that takes seconds. ``Catalogue`` keeps a small in-memory index of every job (its
sort key, its directory and state, executor, submitter and labels; no status kept) and reads in
full only the rows of the page it answers.

How it stays true, at each call (``page``, ``counts``):

- A job directory (pending/, running/, done/, failed/, scheduled/) is looked into again when
  its stamp (inode, mtime, ctime) changed since the last look, or when that stamp had not
  settled then (``spoold.core.spool.fs.sighting``: ``SETTLE`` seconds old by this host's
  clock, or seen unchanged that long): a change made soon after a look may leave the stamp
  as it was (the kernel's coarse clock; whole seconds over SFTP; the clock of another host
  sharing the spool). A look lists its names (no stat) and reads the status.json of each
  name not indexed there; a name gone is dropped.
- A look into a directory that took more than ``CHEAP_LOOK`` seconds (done/ with 100,000 jobs:
  50-170 ms on the machine of 2026-12, nearly all of it the listdir) is not repeated sooner
  than ``LOOK_SPACING`` times that long after it (so a client asking without pause has the
  index spend about 5% of its time looking), nor later than ``MAX_SPACING`` seconds. What the
  daemon does it says through ``forget``, and that is seen at the next call all the same.
- A job's state is the directory it sits in (in failed/, its status says failed or cancelled);
  its sort key, executor, submitter and labels do not change while it keeps its id. So nothing
  is read again for a job that only changes in place (a running job's attempts, a schedule's
  next firings): a page reads its rows in full anyway.
- ``forget(job_id)``: the daemon saw the job change state. Its entry is dropped and the job
  looked for (one stat per directory) and read at the next call. That covers what names cannot
  show (a failed job retried that ends in failed/ again between two looks) and what a spaced
  look would show late.
- The page's rows are read in full (status.json) after filtering on the index: a row whose job
  moved is read where it went, one whose job is gone is skipped (the page still fills up), and
  one whose state or sort key differs from its entry corrects the entry and is shown only if
  it still matches the query and its place.

What can still be stale, and for how long: a change nobody told of (``forget``) in a
directory whose look is spaced (above) shows within ``MAX_SPACING`` seconds (1-3 s typically
with 100,000 jobs in done/): another host's daemon finishing jobs in a shared spool, ``spoold
purge``, anything the daemon does not tell. Until then a job gone is skipped when its row is
read; a job arrived is missing. In a process the daemon does not tell at all (the command line,
another host's API), a failed job retried that ends in failed/ again between two calls keeps
its earlier state (failed vs cancelled) in the index until it moves again, and a job purged and
submitted anew under the same id, unseen in between, keeps its earlier sort key and fields: a
filter may miss it, but a row shown is read fresh and checked, so never wrongly included. Where
a filesystem server's clock runs ahead (NFS) every call looks (slower, not staler); where
attributes are cached (NFS ``actimeo``) changes show once that cache expires.

A restart does not read every status.json again. The index is kept in the spool
(tmp/catalogue.snapshot, through ``Jobs.write_snapshot``) at most every ``snapshot_interval``
seconds and only when it changed, by a short-lived thread, and the next ``Catalogue``'s first
call loads it: checked (format, checksum, every field), then brought up to date as above; in
done/ and failed/, if they changed since, every job whose directory's ctime (which a rename
sets) is not older than the snapshot's look is read again. A missing, stale or corrupt snapshot
costs time, never correctness: one that does not check out is a full read.

Thread-safe: one lock over the index; a page's rows are read outside it.
"""

from __future__ import annotations

import array
import base64
import bisect
import collections
import hashlib
import heapq
import itertools
import json
import math
import operator
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple, TypeAlias

from spoold.core.errors import SpooldError
from spoold.core.ids import RUN_ID
from spoold.core.spool import JobDir, Spool
from spoold.core.spool.fs import SETTLE, DirStamp, Sighted, sighting
from spoold.face.views import labels_of

__all__ = [
    "CHEAP_LOOK", "LOOK_SPACING", "MAX_SPACING", "STATES", "Catalogue", "JobQuery", "Page",
]  # fmt: skip

#: The states a query may name; ``scheduled`` lists the schedules' definitions, which no other
#: query lists (as ``spoold list``).
STATES = ("pending", "running", "succeeded", "failed", "cancelled", "scheduled")
#: A look into a directory that took longer than this (seconds) is spaced (``LOOK_SPACING``).
CHEAP_LOOK = 0.002
#: A costly look is not repeated sooner than this many times its duration after it...
LOOK_SPACING = 20.0
#: ... nor later than this (seconds): how late a change no one told of shows, at most.
MAX_SPACING = 5.0
_DIRECTORIES = ("pending", "running", "done", "failed", "scheduled")
# failed/ holds failed and cancelled jobs: its status says which.
_STATE_OF = {"pending": "pending", "running": "running", "done": "succeeded",
             "scheduled": "scheduled"}  # fmt: skip
_STATES_IN = {"pending": ("pending",), "running": ("running",), "done": ("succeeded",),
              "failed": ("failed", "cancelled"), "scheduled": ("scheduled",)}  # fmt: skip
_DIRECTORY_OF = {"pending": "pending", "running": "running", "succeeded": "done",
                 "failed": "failed", "cancelled": "failed", "scheduled": "scheduled"}  # fmt: skip
_SNAPSHOT = "catalogue"
_CODE_OF = {"pending": "p", "running": "r", "succeeded": "s", "failed": "f", "cancelled": "c",
            "scheduled": "S"}  # fmt: skip
_STATE_BY_CODE = {code: state for state, code in _CODE_OF.items()}
_FORMAT = b"spoold-catalogue-1"
_CURSOR = "c1"  # the cursor's version, inside it
_BULK = 32  # more changes than this to one list: appended and sorted, not inserted one by one
_TEXT_SCAN = 2048  # a text query over a longer list searches the text index (_Texts)
_TEXT_GATHER = 2048  # a text in more ids than this: the list is walked instead (dense enough)
_TEXT_TAIL = 2048  # ids added since the text index was made: searched one by one, up to this
_PRUNE_AFTER = 10_000  # entries dropped, at least, before the shared strings are pruned
_ID_TEXT = re.compile(r"[a-z0-9._@-]+")  # what a job id holds, in lower case

_Name: TypeAlias = tuple[str, ...]
_Labels: TypeAlias = tuple[tuple[str, str], ...]


class JobQuery(NamedTuple):
    """Which jobs to list: every condition given must hold (None, {}: any)."""

    state: str | None = None  # pending|running|succeeded|failed|cancelled|scheduled
    executor: str | None = None
    labels: Mapping[str, str | None] = {}  # key=None: any value (as listing.parse_labels)
    submitter: str | None = None
    text: str | None = None  # a substring of the job id, in any case (the page's search box)


class Page(NamedTuple):
    """One page of jobs, newest first, and the cursor of the next (None: no more)."""

    rows: list[dict[str, Any]]  # each the job's status.json (``spoold status ID --json``)
    next_cursor: str | None


class _Entry(NamedTuple):
    """One job in the index: small, its strings shared with the other entries'."""

    key: str  # submitted_at, NUL, job id: the order of ``spoold list``; oldest first in lists
    job_id: str
    directory: str
    state: str
    executor: str | None
    submitter: str | None
    labels: _Labels | None  # sorted (key, value) pairs; None: unknown (then no label matches)


class _Capture(NamedTuple):
    """The index at one moment, for the snapshot."""

    stamps: dict[str, DirStamp | None]  # each directory's, where it had settled
    fresh_ns: int  # the wall clock at the older of the last looks into done/ and failed/
    recheck: list[str]  # forgotten, not yet read again
    entries: list[_Entry]


class _Condition(NamedTuple):
    """One condition of a query: the list whose entries meet it, and the test."""

    name: _Name
    holds: Callable[[_Entry], bool]


class _Texts:
    """Every job id in lower case in one string, in no order, to search in C, with the
    entries that were added since (``tail``, searched one by one) and how many of its entries
    were dropped since (``dead``: found, then left out). Made anew when either grows."""

    def __init__(self, entries: list[_Entry]) -> None:
        self.entries = entries
        self.ids = "\n".join(entry.job_id for entry in entries).lower()
        lengths = (len(entry.job_id) + 1 for entry in entries)
        self.starts = array.array("q", itertools.accumulate(lengths, initial=0))
        self.tail: list[_Entry] = []
        self.dead = 0


class _Corrupt(Exception):
    """A snapshot that does not check out."""


_by_key: Callable[[_Entry], str] = operator.itemgetter(0)


class Catalogue:
    """The spool's jobs, filtered and paged newest first, from an index brought up to date by
    looking into the job directories that changed (the module's docstring says how)."""

    def __init__(
        self,
        spool: Spool,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall_ns: Callable[[], int] = time.time_ns,
        snapshot_interval: float = 60.0,
    ) -> None:
        self._spool = spool
        self._monotonic = monotonic
        self._wall_ns = wall_ns  # compared with the filesystem's times (mtime, ctime)
        self._interval = snapshot_interval
        self._paths = {name: str(spool.dir(name)) for name in _DIRECTORIES}
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        #: Each sorted by key, oldest first: ("all",) every job but the schedules,
        #: ("state", s), ("executor", e), ("submitter", s), ("label", k), ("label", k, v).
        self._lists: dict[_Name, list[_Entry]] = {("all",): []}
        self._texts: _Texts | None = None  # made by the first text query, then kept up
        self._seen: dict[str, Sighted] = {}  # each directory's stamp at its last look
        self._looked: dict[str, tuple[float, float]] = {}  # when, and how long it took
        #: The wall clock at the last look into each directory (or check that it had not
        #: changed): what entered it before then is indexed.
        self._fresh: dict[str, int] = {}
        self._strings: dict[Any, Any] = {}  # the one copy of each string, pair and label set
        self._dropped = 0  # entries dropped since _strings was last pruned
        self._loaded = False
        # forget() takes only this lock: the daemon's thread that calls it never waits for a
        # look into the tree (the first reads every job).
        self._forget_lock = threading.Lock()
        self._forgotten: set[str] = set()
        self._dirty = False
        self._saved_at = -math.inf
        self._writer: threading.Thread | None = None

    # -- the interface ----------------------------------------------------------------------

    def page(self, query: JobQuery, *, cursor: str | None = None, limit: int = 50) -> Page:
        """The jobs matching ``query``, newest first (by submission time, then id), after
        ``cursor`` (a page's ``next_cursor``): at most ``limit``, each read now.

        ValueError for an unreadable cursor, an unknown state or a limit below 1.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        if query.state is not None and query.state not in STATES:
            raise ValueError(f"no state {query.state!r}: one of {', '.join(STATES)}")
        before = None if cursor is None else _decode_cursor(cursor)
        conditions = _conditions(query)
        rows: list[dict[str, Any]] = []
        last = ""
        first = True
        while True:
            need = limit - len(rows)
            with self._lock:
                if first:
                    self._bring_up_to_date()
                    self._maybe_save()
                    first = False
                batch = self._select(conditions, query.text, before, need + 1)
            for entry in batch[:need]:
                before = entry.key
                row = self._row(entry, conditions)
                if row is not None:
                    rows.append(row)
                    last = entry.key
            if len(batch) <= need:  # nothing more matches
                return Page(rows, None)
            if len(rows) == limit:
                return Page(rows, _encode_cursor(last))

    def forget(self, job_id: str) -> None:
        """The daemon saw this job change state: read it again at the next call."""
        with self._forget_lock:
            self._forgotten.add(job_id)

    def counts(self) -> dict[str, int]:
        """How many jobs are in each state, as indexed (brought up to date first)."""
        with self._lock:
            self._bring_up_to_date()
            self._maybe_save()
            return {state: len(self._lists.get(("state", state), ())) for state in STATES}

    def save(self) -> None:
        """Write the snapshot now if the index changed since the last one."""
        writer = self._writer
        if writer is not None:
            writer.join()  # an older capture must not land after this one
        with self._lock:
            if not (self._loaded and self._dirty):
                return
            capture = self._capture()
        self._write(capture)

    def close(self) -> None:
        """Wait for a snapshot being written, then write the last one if the index changed."""
        self.save()

    # -- bringing the index up to date --------------------------------------------------------

    def _bring_up_to_date(self) -> None:
        """The index as the tree is now (the module's docstring says how). Under the lock."""
        if not self._loaded:
            self._loaded = True
            self._load_snapshot()
        with self._forget_lock:
            forgotten, self._forgotten = self._forgotten, set()
        self._discard([e for e in map(self._entries.get, forgotten) if e is not None])
        now = self._wall_ns()
        added: list[_Entry] = []
        for directory in _DIRECTORIES:
            added += self._look_into(directory, now)
        seen = {entry.job_id for entry in added}
        for job_id in forgotten - seen:  # those whose directory was not looked into
            found = self._spool.jobs.find(job_id) if RUN_ID.match(job_id) else None
            entry = None if found is None else self._read_entry(found.directory, job_id)
            if entry is not None:  # else moved on as we looked: found where it lands
                added.append(entry)
        self._insert(added)

    def _look_into(self, directory: str, now: int) -> list[_Entry]:
        """The jobs that entered ``directory`` since the last look, read; those gone dropped."""
        jobs = self._spool.jobs
        started = self._monotonic()
        seen = self._seen.get(directory)
        try:
            stamp = jobs.directory_stamp(directory)
            if seen is not None and seen.settled and stamp == seen.stamp:
                self._fresh[directory] = now
                return []
            last, took = self._looked.get(directory, (-math.inf, 0.0))
            if took > CHEAP_LOOK and started - last < min(LOOK_SPACING * took, MAX_SPACING):
                return []  # looked at a moment ago: not again yet
            names = set(jobs.names(directory))
        except (PermissionError, FileNotFoundError):  # not ours to list: none of its jobs
            names, stamp = set(), None
        # A change made soon after this look may leave the stamp as it is: look again at the
        # next call, until the stamp has settled (then any change gives it another).
        if stamp is None:
            self._seen.pop(directory, None)
        else:
            since, settled = sighting(stamp, seen, wall=now / 1e9, now=started, settle=SETTLE)
            self._seen[directory] = Sighted(stamp, since, settled)
        self._fresh[directory] = now
        known = {
            entry.job_id: entry
            for state in _STATES_IN[directory]
            for entry in self._lists.get(("state", state), ())
        }
        self._discard([known[name] for name in known.keys() - names])
        new = [name for name in names - known.keys() if RUN_ID.match(name)]
        # What a look costs every time: the reads of new jobs are made once whenever made.
        self._looked[directory] = (started, self._monotonic() - started)
        return [e for e in (self._read_entry(directory, name) for name in new) if e is not None]

    def _read_entry(self, directory: str, job_id: str) -> _Entry | None:
        """The entry of ``directory``/``job_id`` from its status.json; None if it cannot be
        read (gone meanwhile, not ours to read, not whole, not a job's)."""
        job = JobDir(job_id, directory, f"{self._paths[directory]}/{job_id}")
        try:
            status: Any = self._spool.jobs.read_status(job)
        except (OSError, SpooldError, ValueError):
            return None
        if not isinstance(status, dict):  # JSON, but not a status
            return None
        share = self._share
        executor, submitter = status.get("executor"), status.get("submitter")
        return _Entry(
            key=_key(status, job_id),
            job_id=job_id,
            directory=directory,
            state=_state_of(directory, status),
            executor=None if executor is None else share(str(executor)),
            submitter=None if submitter is None else share(str(submitter)),
            labels=self._labels(labels_of(self._spool, job, status)),
        )

    def _share(self, value: Any) -> Any:
        """The one copy of an equal string, pair or label set every entry refers to."""
        return self._strings.setdefault(value, value)

    def _labels(self, labels: Any) -> _Labels | None:
        if not isinstance(labels, dict):
            return None
        share = self._share
        labelset: _Labels = share(tuple(share((share(k), share(v))) for k, v in _pairs(labels)))
        return labelset

    # -- the lists ----------------------------------------------------------------------------

    def _load(self, entries: list[_Entry]) -> None:
        """A snapshot's entries, in key order, into the empty index: appended, nothing sorted,
        each dimension grouped in a pass of its own (a third of the time of ``_insert``)."""
        self._entries = {entry.job_id: entry for entry in entries}
        lists = self._lists = {("all",): [e for e in entries if e.state != "scheduled"]}
        for field, dimension in ((3, "state"), (4, "executor"), (5, "submitter")):
            groups: dict[Any, list[_Entry]] = collections.defaultdict(list)
            for entry in entries:
                groups[entry[field]].append(entry)
            lists.update(((dimension, v), group) for v, group in groups.items() if v is not None)
        names: dict[_Labels, list[_Name]] = {}
        by_label: dict[_Name, list[_Entry]] = collections.defaultdict(list)
        for entry in entries:
            if labels := entry.labels:
                if labels not in names:
                    names[labels] = [n for k, v in labels for n in (("label", k), ("label", k, v))]
                for name in names[labels]:
                    by_label[name].append(entry)
        lists.update(by_label)

    def _insert(self, entries: list[_Entry]) -> None:
        if not entries:
            return
        self._dirty = True
        # A job read twice in one look (it moved while we looked): the later read wins.
        unique = {entry.job_id: entry for entry in entries}
        self._discard([e for e in map(self._entries.get, unique) if e is not None])
        grouped: dict[_Name, list[_Entry]] = {}
        for entry in unique.values():
            self._entries[entry.job_id] = entry
            for name in _list_names(entry):
                grouped.setdefault(name, []).append(entry)
        for name, group in grouped.items():
            target = self._lists.setdefault(name, [])
            if len(group) > _BULK:
                target += group
                target.sort(key=_by_key)
            else:
                for entry in group:
                    bisect.insort(target, entry, key=_by_key)
        if self._texts is not None:
            self._texts.tail += unique.values()

    def _discard(self, entries: list[_Entry]) -> None:
        entries = [e for e in entries if self._entries.get(e.job_id) is e]
        if not entries:
            return
        self._dirty = True
        grouped: dict[_Name, list[_Entry]] = {}
        for entry in entries:
            del self._entries[entry.job_id]
            for name in _list_names(entry):
                grouped.setdefault(name, []).append(entry)
        for name, group in grouped.items():
            target = self._lists[name]
            if len(group) > _BULK:
                leaving = {id(e) for e in group}
                target[:] = [e for e in target if id(e) not in leaving]
            else:
                for entry in group:
                    at = bisect.bisect_left(target, entry.key, key=_by_key)
                    if at < len(target) and target[at] is entry:
                        del target[at]
            if not target and name != ("all",):
                del self._lists[name]
        if self._texts is not None:
            self._texts.dead += len(entries)
        self._dropped += len(entries)
        if self._dropped > max(len(self._entries), _PRUNE_AFTER):
            self._prune_shared()

    def _prune_shared(self) -> None:
        """Forget the strings and label sets no entry holds any more (a label whose values
        are all different, such as a request id, would otherwise keep every one of them)."""
        kept: dict[Any, Any] = {}
        for entry in self._entries.values():
            for value in (entry.executor, entry.submitter):
                if value is not None:
                    kept[value] = value
            if entry.labels is not None:
                kept[entry.labels] = entry.labels
                for pair in entry.labels:
                    key, value = pair
                    kept[pair], kept[key], kept[value] = pair, key, value
        self._strings = kept
        self._dropped = 0

    def _replace(self, old: _Entry, new: _Entry) -> None:
        """A page's read found the job other than its entry says: the entry corrected."""
        with self._lock:
            if self._entries.get(old.job_id) is old:
                share = self._share
                self._discard([old])
                self._insert(
                    [
                        new._replace(
                            executor=None if new.executor is None else share(new.executor),
                            submitter=None if new.submitter is None else share(new.submitter),
                            labels=self._labels(None if new.labels is None else dict(new.labels)),
                        )
                    ]
                )

    # -- answering ----------------------------------------------------------------------------

    def _select(
        self, conditions: list[_Condition], text: str | None, before: str | None, count: int
    ) -> list[_Entry]:
        """Up to ``count`` entries meeting every condition (and ``text``), newest first, older
        than ``before``: the shortest list a condition names, walked, the others tested."""
        lists = [self._lists.get(c.name, []) for c in conditions]
        at = min(range(len(lists)), key=lambda i: len(lists[i]))
        chosen = lists[at]
        end = len(chosen) if before is None else bisect.bisect_left(chosen, before, key=_by_key)
        rest = [c.holds for i, c in enumerate(conditions) if i != at]
        if text:
            text = text.lower()
            if _ID_TEXT.fullmatch(text) is None:
                return []  # no job id holds it
            if end > _TEXT_SCAN:
                found = self._search(conditions, text, before, count)
                if found is not None:
                    return found
            rest.append(lambda entry: text in entry.job_id.lower())
        if not rest:
            return chosen[max(0, end - count) : end][::-1]
        holds = rest[0] if len(rest) == 1 else lambda e: all(test(e) for test in rest)
        return list(itertools.islice(filter(holds, reversed(chosen[:end])), count))

    def _search(
        self, conditions: list[_Condition], text: str, before: str | None, count: int
    ) -> list[_Entry] | None:
        """``_select`` for a text in a long list, through the text index: the entries whose id
        holds it gathered (a search in C), tested, the newest kept. None when the text is in
        too many ids to gather: then walking the list finds enough of them soon."""
        texts = self._texts
        if texts is None or len(texts.tail) > _TEXT_TAIL or texts.dead > len(texts.entries) // 4:
            texts = self._texts = _Texts(list(self._entries.values()))
        if texts.ids.count(text) > _TEXT_GATHER:
            return None
        candidates = [e for e in texts.tail if text in e.job_id.lower()]
        ids, starts, entries = texts.ids, texts.starts, texts.entries
        position = ids.find(text)
        while position >= 0:
            index = bisect.bisect_right(starts, position) - 1
            candidates.append(entries[index])
            position = ids.find(text, starts[index + 1])
        current = self._entries
        found = (
            e
            for e in candidates
            if current.get(e.job_id) is e  # not replaced or gone since the index was made
            and (before is None or e.key < before)
            and all(c.holds(e) for c in conditions)
        )
        return heapq.nlargest(count, found, key=_by_key)

    def _row(self, entry: _Entry, conditions: list[_Condition]) -> dict[str, Any] | None:
        """The job's status.json, read now, if it still matches; its entry corrected if not."""
        jobs = self._spool.jobs
        job = JobDir(
            entry.job_id, entry.directory, f"{self._paths[entry.directory]}/{entry.job_id}"
        )
        status: Any
        try:
            status = jobs.read_status(job)
        except (FileNotFoundError, SpooldError):  # moved on since the look: where to?
            found = jobs.find(entry.job_id)
            if found is None or found.directory == entry.directory:
                return None
            job = found
            try:
                status = jobs.read_status(job)
            except (OSError, SpooldError, ValueError):
                return None
        except (OSError, ValueError):  # not ours to read, or not whole
            return None
        if not isinstance(status, dict):
            return None
        executor, submitter, labels = (status.get(k) for k in ("executor", "submitter", "labels"))
        fresh = entry._replace(
            key=_key(status, entry.job_id),
            directory=job.directory,
            state=_state_of(job.directory, status),
            executor=None if executor is None else str(executor),
            submitter=None if submitter is None else str(submitter),
            # An older job's labels come from its job file, read once for its entry.
            labels=_pairs(labels) if isinstance(labels, dict) else entry.labels,
        )
        if fresh != entry:
            self._replace(entry, fresh)
            if fresh.key != entry.key or not all(c.holds(fresh) for c in conditions):
                return None  # a changed key: shown where it sorts now, on another page
        if not isinstance(status.get("labels"), dict) and entry.labels is not None:
            status["labels"] = dict(entry.labels)  # as ``spoold list`` shows a job's labels
        return status

    # -- the snapshot -------------------------------------------------------------------------

    def _maybe_save(self) -> None:
        """Start the snapshot's writer if the index changed and the last one is old enough."""
        if not self._dirty or (self._writer is not None and self._writer.is_alive()):
            return
        if self._monotonic() - self._saved_at < self._interval:
            return
        capture = self._capture()
        self._writer = threading.Thread(
            target=self._write, args=(capture,), name="spoold-catalogue-snapshot", daemon=True
        )
        self._writer.start()

    def _capture(self) -> _Capture:
        """The index as it is, for ``_write``. Under the lock; marks it saved."""
        self._dirty = False
        self._saved_at = self._monotonic()
        with self._forget_lock:
            recheck = sorted(self._forgotten)
        fresh = min(self._fresh.get(directory, 0) for directory in ("done", "failed"))
        stamps = {d: seen.stamp if seen.settled else None for d, seen in self._seen.items()}
        return _Capture(stamps, fresh, recheck, list(self._entries.values()))

    def _write(self, capture: _Capture) -> None:
        try:
            self._spool.jobs.write_snapshot(_SNAPSHOT, encode_snapshot(capture))
        except (OSError, SpooldError):  # not ours to write (a user's CLI): only a cache
            with self._lock:
                self._dirty = True

    def _load_snapshot(self) -> None:
        """The index as the last snapshot kept it, if one checks out; else nothing (then the
        first look reads every job). Under the lock."""
        jobs = self._spool.jobs
        try:
            data = jobs.read_snapshot(_SNAPSHOT)
            capture = None if data is None else decode_snapshot(data, self._share)
        except (OSError, SpooldError, _Corrupt):
            capture = None
        if capture is None:
            return
        self._load(capture.entries)
        self._saved_at = self._monotonic()
        # Each had settled when it was kept: it stands for its directory while it holds.
        self._seen = {
            directory: Sighted(stamp, -math.inf, True)
            for directory, stamp in capture.stamps.items()
            if stamp is not None
        }
        recheck = set(capture.recheck)
        # A job back in done/ or failed/ under the same name since (a retry; an id purged and
        # submitted anew) shows only in its directory's ctime, which a rename sets.
        since = capture.fresh_ns / 1e9 - SETTLE
        for directory in ("done", "failed"):
            try:
                if jobs.directory_stamp(directory) == capture.stamps.get(directory):
                    continue
                entered = jobs.entered_times(directory)
            except OSError:
                continue
            recheck.update(job.job_id for job, ctime in entered if ctime >= since)
        with self._forget_lock:
            self._forgotten |= recheck


# -- the pieces, pure -------------------------------------------------------------------------


def _key(status: dict[str, Any], job_id: str) -> str:
    # spoold's RFC 3339 (UTC, microseconds, Z): ordered as text as in time. A NUL in it would
    # make a key no snapshot keeps.
    return f"{str(status.get('submitted_at') or '').replace(chr(0), '')}\0{job_id}"


def _state_of(directory: str, status: dict[str, Any]) -> str:
    if directory == "failed":
        return "cancelled" if status.get("state") == "cancelled" else "failed"
    return _STATE_OF[directory]


def _pairs(labels: dict[Any, Any]) -> _Labels:
    """Labels as an entry keeps them: sorted (key, value) pairs of text."""
    return tuple(sorted((str(key), str(value)) for key, value in labels.items()))


def _list_names(entry: _Entry) -> Iterator[_Name]:
    if entry.state != "scheduled":
        yield ("all",)
    yield ("state", entry.state)
    if entry.executor is not None:
        yield ("executor", entry.executor)
    if entry.submitter is not None:
        yield ("submitter", entry.submitter)
    for key, value in entry.labels or ():
        yield ("label", key)
        yield ("label", key, value)


def _conditions(query: JobQuery) -> list[_Condition]:
    """The conditions of ``query`` but its text, each with the list of the entries meeting it."""
    state = query.state
    found = [
        _Condition(("state", state), lambda e: e.state == state)
        if state
        else _Condition(("all",), lambda e: e.state != "scheduled")
    ]
    if (executor := query.executor) is not None:
        found.append(_Condition(("executor", executor), lambda e: e.executor == executor))
    if (submitter := query.submitter) is not None:
        found.append(_Condition(("submitter", submitter), lambda e: e.submitter == submitter))
    for key, value in query.labels.items():
        found.append(_label_condition(key, value))
    return found


def _label_condition(key: str, value: str | None) -> _Condition:
    if value is None:
        return _Condition(
            ("label", key), lambda e: e.labels is not None and any(k == key for k, _ in e.labels)
        )
    pair = (key, value)
    return _Condition(("label", key, value), lambda e: e.labels is not None and pair in e.labels)


def _encode_cursor(key: str) -> str:
    return base64.urlsafe_b64encode(f"{_CURSOR}\0{key}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> str:
    """The sort key a cursor names; ValueError if it names none."""
    if len(cursor) > 1024:
        raise ValueError("not a cursor: too long")
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeError) as exc:
        raise ValueError(f"not a cursor: {exc}") from None
    version, _, key = text.partition("\0")
    _, nul, job_id = key.rpartition("\0")
    if version != _CURSOR or not nul or not RUN_ID.match(job_id):
        raise ValueError("not a cursor")
    return key


def encode_snapshot(capture: _Capture) -> bytes:
    """The snapshot's bytes: a header line (format, sha256 of the rest), then JSON in columns,
    one entry per row, in key order (so that loading it sorts nothing)."""
    strings: dict[str, int] = {}
    labelsets: dict[_Labels, int] = {}

    def number(text: str | None) -> int:
        return -1 if text is None else strings.setdefault(text, len(strings))

    def labelset(labels: _Labels | None) -> int:
        if labels is None:
            return -1
        if labels not in labelsets:
            labelsets[labels] = len(labelsets)
            for key, value in labels:
                number(key), number(value)
        return labelsets[labels]

    entries = sorted(capture.entries, key=_by_key)
    body = json.dumps(
        {
            "stamps": capture.stamps,
            "fresh_ns": capture.fresh_ns,
            "recheck": capture.recheck,
            "ids": [e.job_id for e in entries],
            "submitted": [e.key[: len(e.key) - len(e.job_id) - 1] for e in entries],
            "states": "".join(_CODE_OF[e.state] for e in entries),
            "executors": [number(e.executor) for e in entries],
            "submitters": [number(e.submitter) for e in entries],
            "labels": [labelset(e.labels) for e in entries],
            "labelsets": [[strings[s] for pair in ls for s in pair] for ls in labelsets],
            "strings": list(strings),
        },
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()
    return b"%s %s\n%s" % (_FORMAT, hashlib.sha256(body).hexdigest().encode(), body)


def decode_snapshot(data: bytes, share: Callable[[Any], Any] | None = None) -> _Capture:
    """What ``encode_snapshot`` wrote, every field checked; _Corrupt if anything is off.
    ``share``: gives the one copy of an equal string, (key, value) pair or label set."""
    if share is None:
        shared: dict[Any, Any] = {}
        share = shared.setdefault
    header, _, body = data.partition(b"\n")
    if header != b"%s %s" % (_FORMAT, hashlib.sha256(body).hexdigest().encode()):
        raise _Corrupt("not a catalogue snapshot, or not whole")
    try:
        return _decoded(json.loads(body), share)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise _Corrupt(str(exc)) from None


def _decoded(document: dict[str, Any], share: Callable[[Any], Any]) -> _Capture:
    stamps: dict[str, tuple[int, int, int] | None] = {}
    for directory, stamp in document["stamps"].items():
        if directory not in _DIRECTORIES:
            raise ValueError(f"no directory {directory!r}")
        stamps[directory] = None if stamp is None else _stamp(stamp)
    fresh_ns, recheck = document["fresh_ns"], _list(document["recheck"])
    if type(fresh_ns) is not int or not all(_is_id(job_id) for job_id in recheck):
        raise ValueError("bad fresh_ns or recheck")
    strings = [share(text) for text in _list(document["strings"])]
    if not all(type(text) is str for text in strings):
        raise ValueError("not a string")
    labelsets = [_labelset(_list(numbers), strings, share) for numbers in document["labelsets"]]
    ids, submitted = _list(document["ids"]), _list(document["submitted"])
    codes, count = document["states"], len(ids)
    columns = [_list(document[name]) for name in ("executors", "submitters", "labels")]
    if type(codes) is not str or any(len(c) != count for c in (submitted, codes, *columns)):
        raise ValueError("columns of different lengths")
    if not all(map(RUN_ID.match, ids)) or len(set(ids)) != count:  # TypeError if not str
        raise ValueError("a bad job id, or one twice")
    if "\0" in "".join(submitted) or not set(codes) <= _STATE_BY_CODE.keys():
        raise ValueError("a bad submission time or state")
    for column, table in zip(columns, (strings, strings, labelsets), strict=True):
        if column and not (all(type(n) is int for n in column) and min(column) >= -1):
            raise ValueError("not an index")
        if column and max(column) >= len(table):
            raise ValueError("an index out of range")
    keys = [f"{when}\0{job_id}" for when, job_id in zip(submitted, ids, strict=True)]
    if any(a >= b for a, b in itertools.pairwise(keys)):
        raise ValueError("not in order")
    states = [_STATE_BY_CODE[code] for code in codes]
    executors, submitters, labels = (
        [None if n < 0 else table[n] for n in column]
        for column, table in zip(columns, (strings, strings, labelsets), strict=True)
    )
    directories = [_DIRECTORY_OF[state] for state in states]
    columns = [keys, ids, directories, states, executors, submitters, labels]
    entries = list(map(_Entry, *columns))
    return _Capture(stamps, fresh_ns, recheck, entries)


def _labelset(numbers: list[Any], strings: list[str], share: Callable[[Any], Any]) -> Any:
    if len(numbers) % 2 or not all(type(n) is int and n >= 0 for n in numbers):
        raise ValueError("not a label set")
    pairs = (
        share((strings[k], strings[v])) for k, v in zip(numbers[::2], numbers[1::2], strict=True)
    )
    return share(tuple(sorted(pairs)))


def _list(value: Any) -> list[Any]:
    if type(value) is not list:
        raise TypeError(f"not a list: {type(value).__name__}")
    return value


def _stamp(value: Any) -> tuple[int, int, int]:
    items = _list(value)
    if len(items) != 3 or any(type(item) is not int for item in items):
        raise ValueError("not a stamp")
    return items[0], items[1], items[2]


def _is_id(value: Any) -> bool:
    return type(value) is str and RUN_ID.match(value) is not None
