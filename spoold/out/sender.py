"""Sends what is in outbox/ (see spoold.out.outbox for how it gets there): per job in order, a few
at once, with backoff, until the receiver answers 2xx or the delivery is given up."""

from __future__ import annotations

import bisect
import heapq
import logging
import random
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from spoold.core.clock import Clock
from spoold.core.config import CallbackSettings
from spoold.core.outage import Outage
from spoold.core.spool import Spool
from spoold.core.spool.deliveries import is_delivery
from spoold.core.spool.fs import DirStamp, Relist
from spoold.out.messages import error_shown, url_shown
from spoold.out.notices import is_notification
from spoold.out.outbox import STALE_PREPARED, Callbacks, encode_record
from spoold.out.threads import SenderThreads

if TYPE_CHECKING:
    import requests

__all__ = ["CallbackSettings", "Sender"]  # CallbackSettings lives in spoold.core.config

_REQUIRED = frozenset({"key", "event", "url", "body", "signature", "timestamp", "delivery_id"})


@dataclass
class _Due:
    name: str
    record: dict[str, Any]


class Sender:
    """Posts the deliveries in outbox/: per key in order, a few at once, one host never all.

    One thread decides what is due (``tick``); ``settings.workers`` threads post. A slow or
    dead receiver holds at most ``per_host`` of them, and its jobs' later events wait behind
    the one in flight: nobody else's.
    """

    def __init__(
        self,
        spool: Spool,
        callbacks: Callbacks,
        clock: Clock,
        settings: CallbackSettings,
        logger: logging.Logger,
        *,
        poll_interval: float = 1.0,
        draw: Callable[[], float] = random.random,
        wake: threading.Event | None = None,
        wall_time: Callable[[], float] = time.time,
    ) -> None:
        """``wake``: the event the loop waits on, set by ``changed`` and ``wake`` (a commit in
        this process is told by name, as outbox/'s watch tells one) and by each post's end.
        ``wall_time``, with the clock's monotonic time: when outbox/'s stamp stands for it
        (``sighting``): a poll lists outbox/ only when it may have changed."""
        self._spool = spool
        self._callbacks = callbacks
        self._clock = clock
        self._settings = settings
        self._policy = settings.policy()
        self._logger = logger
        self._poll = poll_interval
        self._draw = draw
        self._lock = threading.Lock()
        self._in_flight: set[str] = set()  # keys
        self._hosts: Counter[str] = Counter()
        #: Each record read or written here, under its file's stamp: read once per name, and
        #: checked by a stat before it is posted (``_current``): a host that adopted it since
        #: wrote it again under the same name, which a listing does not show.
        self._records: dict[str, tuple[DirStamp, dict[str, Any]]] = {}
        self._names: set[str] | None = None  # the last listing of outbox/
        self._listed = 0.0  # when, monotonic
        self._relist = False
        #: Names outbox/'s watch saw appear or go since the last tick (``changed``): the
        #: listing follows them, not listed again with a backlog for each.
        self._touched: set[str] = set()
        #: How long the loop waits while outbox/ held nothing at its last look and a watch
        #: reports every name written there (``pace``); None: a poll, whatever it held.
        self._rest: float | None = None
        self._wall = wall_time
        self._outbox = Relist(spool.deliveries.directory_stamp)
        self._gone: set[str] = set()  # taken or given up since
        self._ended: list[str] = []  # handed out and back (posted, failed or given up)
        # The last listing's index (``_reindex``), kept by ``tick`` alone: what each key
        # has waiting in order, its head, and the heads this host sends, due first, in a heap
        # per receiver, so that a tick looks at what is due, not at every delivery waiting
        # (9000 waiting for a receiver that was down: 70 % of a core, each post's end walking
        # them all).
        self._by_key: dict[str, list[str]] = {}
        self._heads: dict[str, str] = {}  # key -> its first delivery (``_advance``)
        self._due: dict[str, list[tuple[float, str]]] = {}  # receiver -> (next_try, name)
        self._prepared: set[str] = set()  # heads whose writer has not committed them
        self._foreign: dict[str, set[str]] = {}  # writer host -> heads it sends while alive
        #: Keys whose head is to be found and filed again: their line changed, their post
        #: ended, or their head could not be read (cut off from the spool; put aside by a host
        #: adopting it). A key leaves only once filed: one whose filing failed is tried at
        #: every tick, when a listing that did not change would not bring it back.
        self._unfiled: set[str] = set()
        self._wake = wake or threading.Event()
        self._stop = threading.Event()
        self._threads = SenderThreads[_Due]("outbox", self._loop, self._post_loop,
                                            settings.workers, stopping=self._stop,
                                            wake=self._wake)  # fmt: skip
        self._work = self._threads.work
        self._local = threading.local()
        self._outage = Outage(logger, "callback sender")
        #: How this host sees another (spoold.run.hostbeat.HostBeat.state_of): a delivery
        #: another host wrote is left to it while it is alive, adopted once it is not.
        self.host_state: Callable[[str], str] = lambda host: "alive"

    def wake(self) -> None:
        """Look at outbox/ now: a delivery was committed."""
        self._relist = True
        self._wake.set()

    def changed(self, name: str | None) -> None:
        """outbox/'s watch saw ``name`` written, renamed or removed (None: it lost track, list
        it all again)."""
        if name is not None:
            if not is_delivery(name):
                return  # a writer's temporary file, a name put aside: its rename follows
            if (name in (self._names or ())) == self._spool.deliveries.exists(name):
                return  # written again (a try recorded, an adoption: a post checks its stamp)
        with self._lock:
            if name is None:
                self._relist = True
            else:
                self._touched.add(name)
        self._wake.set()

    def pace(self, poll: float, rest: float | None) -> None:
        """Look at outbox/ every ``poll`` seconds, or every ``rest`` while it holds nothing
        and every name that comes or goes there is told (``changed``: outbox/ is watched);
        ``rest`` None: it is not. Set as the daemon starts its watch, loses it, or reloads
        its config."""
        self._poll, self._rest = poll, rest
        self.changed(None)  # what came before the watch began

    def start(self) -> None:
        self._threads.start()

    def stop(self) -> None:
        """Stop taking deliveries; posts under way end on their own (within the timeout)."""
        self._threads.stop()

    def tick(self) -> int:
        """Hand out every delivery that is due; return how many were."""
        now = self._clock.now().timestamp()
        self._take_back()
        self._refresh()
        for key in sorted(self._unfiled):
            self._file(key)
        for name in sorted(self._prepared):
            if self._key(name) not in self._in_flight:
                self._settle_if_stale(name, now)
        for writer in [w for w in self._foreign if self.host_state(w) != "alive"]:
            heads = self._foreign[writer]
            for name in sorted(heads):
                # Each leaves the writer's heads once dealt with: one that raised (EIO, cut
                # off from the spool) is adopted at a next tick, not forgotten.
                record = self._record(name)
                if record is not None and (adopted := self._adopt(name, record, now)):
                    heads.discard(name)
                    self._push(name, adopted)
                else:  # another host adopted it first: its own, while it lives
                    heads.discard(name)
                    self._file(self._key(name))
            if not heads:
                self._foreign.pop(writer, None)
        handed = 0
        for host in sorted(self._due, key=lambda h: self._due[h][0] if self._due[h] else 0.0):
            heap = self._due[host]
            while heap and heap[0][0] <= now:
                with self._lock:
                    if len(self._in_flight) >= self._settings.workers:
                        return handed
                    if self._hosts[host] >= self._settings.per_host:
                        break
                _, name = heapq.heappop(heap)
                record = self._current(name)
                if record is None:
                    continue
                if float(record.get("next_try") or 0) > now:  # tried since this entry
                    self._push(name, record)
                    continue
                with self._lock:
                    self._in_flight.add(self._key(name))
                    self._hosts[host] += 1
                self._work.put(_Due(name, record))
                handed += 1
            if not heap:
                del self._due[host]
        return handed

    def _take_back(self) -> None:
        """The deliveries whose post ended since the last tick: each key's next in line."""
        with self._lock:
            ended, self._ended = self._ended, []
        # Delivered or given up: the next; failed: again, when due.
        self._unfiled.update(self._key(name) for name in ended)

    def _refresh(self) -> None:
        """List outbox/ again when woken by a commit here, or once a poll has passed (what
        other hosts commit); index it again when what it holds has changed."""
        now = self._clock.monotonic()
        with self._lock:
            touched, self._touched = self._touched, set()
        if touched and self._names is not None:
            self._follow(touched)
        with self._lock:
            if self._names is not None and not self._relist and now - self._listed < self._poll:
                return
            woken, self._relist = self._relist, False
        if woken:
            self._outbox.forget()
        if not self._outbox.needed(wall=self._wall(), now=now) and self._names is not None:
            with self._lock:
                self._listed = now  # as it was: 10,000 names waiting, 6 ms a listing
            return
        names = set(self._spool.deliveries.names())
        with self._lock:
            self._listed = now
            self._gone.clear()
            for gone in self._records.keys() - names:
                del self._records[gone]
        if names != self._names:
            self._reindex(self._names or set(), names)
            self._names = names
        self._outbox.listed()

    def _follow(self, touched: set[str]) -> None:
        """The listing as the names outbox/'s watch told make it (each there or not, as a
        stat says now): a commit costs its own name, not a listing of the backlog."""
        assert self._names is not None
        names = (self._names - touched) | {n for n in touched if self._spool.deliveries.exists(n)}
        if names != self._names:
            self._reindex(self._names, names)
            self._names = names

    def _wait(self) -> float:
        """How long the loop waits for a wake-up: until the next try is due, a poll, or
        ``rest`` where outbox/ is watched and holds nothing, with nothing in flight or waiting
        to be filed or followed."""
        with self._lock:
            busy = self._in_flight or self._touched or self._relist
        resting = not busy and self._names == set() and not self._unfiled
        wait = self._rest if resting and self._rest is not None else self._poll
        now = self._clock.now().timestamp()
        if (due := self.next_due(now)) is not None:
            wait = min(wait, due - now)
        return wait

    def _reindex(self, before: set[str], now: set[str]) -> None:
        """Index what changed since the last listing (sorted: a key's lowest sequence comes
        first): a commit or a removal costs a tick its own names, not the backlog's. No file
        is read here: the keys whose head changed are left to ``_file``."""
        changed: set[str] = set()
        for name in sorted(before - now):
            key = self._key(name)
            if name in (waiting := self._by_key.get(key, [])):
                waiting.remove(name)
                changed.add(key)
        for name in sorted(now - before):
            if is_notification(name) and not name.endswith(".prepared"):
                continue  # spoold.out.notify sends those (their prepared ones: settled here)
            key = self._key(name)
            bisect.insort(self._by_key.setdefault(key, []), name)
            changed.add(key)
        for key in changed:
            line = self._by_key.get(key)
            if not line:
                self._by_key.pop(key, None)
            if not line or self._heads.get(key) != line[0]:
                self._unfiled.add(key)

    def _file(self, key: str) -> None:
        """File ``key``'s head (``_advance``); the key stays unfiled until that is done."""
        self._unfiled.add(key)  # until filed: _advance may raise (EIO, cut off)
        if self._advance(key):
            self._unfiled.discard(key)

    def _advance(self, key: str) -> bool:
        """Make the first of ``key``'s deliveries not gone its head, and file it: prepared,
        another host's, or due by its next try (unless it is in flight: its post's end files
        it again). One unusable is put aside and the next taken. False when the head could
        not be read and is not there for now (``_file`` tries again)."""
        if (old := self._heads.pop(key, None)) is not None:
            self._prepared.discard(old)
            for heads in self._foreign.values():
                heads.discard(old)
        for name in self._by_key.get(key, []):
            if name in self._gone:
                continue
            self._heads[key] = name
            if key in self._in_flight:
                return True  # its post's end files it
            if name.endswith(".prepared"):
                self._prepared.add(name)
                return True
            record, there = self._readable(name)
            if not there:  # gone, or put aside for a moment by a host adopting it
                self._relist = True  # the next listing says which
                return False
            if record is None or not record.keys() >= _REQUIRED:
                self._unusable(name)
                continue
            if not self._callbacks.written_here(record):
                self._foreign.setdefault(str(record["host"]), set()).add(name)
                return True
            self._push(name, record)
            return True
        return True

    def _readable(self, name: str) -> tuple[dict[str, Any] | None, bool]:
        """A delivery's record, and whether its file is there. One not read at first is read
        again if it is there: a host adopting it puts it aside, then writes it back whole.
        Only one that is there and cannot be read twice is damaged."""
        for _ in range(2):
            if (record := self._record(name)) is not None:
                return record, True
            if not self._spool.deliveries.exists(name):
                return None, False
        return None, True

    def _current(self, name: str) -> dict[str, Any] | None:
        """The record of ``name`` if it is still its key's head and free to send; None for a
        heap entry that is stale (sent since, or gone)."""
        key = self._key(name)
        if name in self._gone or self._heads.get(key) != name or key in self._in_flight:
            return None
        kept = self._records.get(name)
        if kept is None:
            return None
        if self._stamp(name) != kept[0]:  # written since, or cut off: read again when it can be
            with self._lock:
                self._records.pop(name, None)
            self._unfiled.add(key)  # its heap entry is gone: filed again from its file
            return None
        return kept[1]

    def _stamp(self, name: str) -> DirStamp | None:
        """``name``'s stamp; None if it is gone, or cannot be looked at now (EIO, cut off
        from the spool): never an error, where it would lose the entry being handed out."""
        try:
            return self._spool.deliveries.stamp(name)
        except OSError:
            return None

    def _push(self, name: str, record: dict[str, Any]) -> None:
        host = urlsplit(str(record["url"])).netloc
        heapq.heappush(self._due.setdefault(host, []), (float(record.get("next_try") or 0), name))

    @staticmethod
    def _key(name: str) -> str:
        return name.rsplit("~", 1)[0]

    def next_due(self, now: float) -> float | None:
        """When the earliest delivery that waits out a backoff is due (epoch seconds).

        Not one that is due already: it is in flight, or waits for a free slot, and the end
        of a post wakes the loop for it (a receiver whose first in line is due is looked at
        again then, its later ones with it).
        """
        tops = [heap[0][0] for heap in self._due.values() if heap and heap[0][0] > now]
        return min(tops, default=None)

    def _record(self, name: str) -> dict[str, Any] | None:
        kept = self._records.get(name)  # one dict lookup is atomic; this runs per delivery
        if kept is not None:
            return kept[1]
        # Stamped before it is read: a change between the two makes the next stamp differ.
        stamp = self._spool.deliveries.stamp(name)
        record = self._spool.deliveries.read(name)
        if record is not None and stamp is not None:
            with self._lock:
                self._records[name] = (stamp, record)
        return record

    def _keep(self, name: str, record: dict[str, Any]) -> None:
        """Note ``record`` as what this sender just wrote into ``name``."""
        stamp = self._stamp(name)
        with self._lock:
            if stamp is None:
                self._records.pop(name, None)
            else:
                self._records[name] = (stamp, record)

    def _unusable(self, name: str) -> None:
        """A delivery file that cannot be sent (damaged, or not spoold's): out of the way."""
        try:
            self._spool.deliveries.give_up(name)
        except FileNotFoundError:
            return  # delivered and removed while we looked
        finally:
            self._gone.add(name)
        self._logger.error("callback %s is unreadable; moved to outbox/failed/", name)

    def _adopt(self, name: str, record: dict[str, Any], now: float) -> dict[str, Any] | None:
        """Take over a delivery whose host is stale or gone; its new record, or None if
        another host took it first. Its times are this host's from now on (``created``,
        ``next_try``): another host's clock is never compared with this one's."""
        owner = str(record["host"])
        adopted = {**record, "host": self._callbacks.host, "adopted_from": owner,
                   "created": now, "next_try": now}  # fmt: skip
        with self._lock:
            self._records.pop(name, None)
        if not self._spool.deliveries.adopt(name, self._callbacks.host,
                                            lambda _old: encode_record(adopted)):  # fmt: skip
            self._relist = True
            return None
        self._logger.warning("callback %s: adopted from host %s, which is %s", name, owner,
                             self.host_state(owner))  # fmt: skip
        self._keep(name, adopted)
        return adopted

    def _settle_if_stale(self, name: str, now: float) -> None:
        record = self._spool.deliveries.read(name)
        if record is None:
            return
        if self._callbacks.written_here(record):
            if now - float(record.get("created") or 0) <= STALE_PREPARED:
                return
        elif self.host_state(str(record["host"])) == "alive":
            return  # another host's change under way
        # Left by this host's writer killed half-way, or by a host no longer alive (decided
        # at once then: its time is its host's, never compared with this host's clock).
        made = self._callbacks.settle(name)
        self._relist = True  # it is gone, or under its committed name
        self._logger.warning(
            "callback %s: its writer left it unfinished; %s", name,
            "the change was made, sending it" if made else "the change was not made, dropped",
        )  # fmt: skip

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # before looking: a wake-up from now on is not lost
            # The sender must outlive any one bad file.
            self._outage.call(self.tick, "callback sender: unexpected failure; going on")
            self._wake.wait(self._wait())

    def _post_loop(self) -> None:
        while (due := self._work.get()) is not None:
            try:
                self.deliver(due.name, due.record)
            except Exception as exc:
                # Its traceback, with the URL's user, password, path and query taken out: an
                # exception's text may quote the URL it was posting to.
                told = error_shown("".join(traceback.format_exception(exc)), str(due.record["url"]))
                self._logger.error("callback %s: unexpected failure; will try again\n%s",
                                   due.name, told.rstrip())  # fmt: skip
            finally:
                with self._lock:
                    self._in_flight.discard(self._key(due.name))
                    self._hosts[urlsplit(str(due.record.get("url"))).netloc] -= 1
                    self._ended.append(due.name)
                self._wake.set()
        # Its keep-alive connections would stay open until the Sender is collected.
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is not None:
            session.close()

    def deliver(self, name: str, record: dict[str, Any]) -> bool:
        """One try at one delivery; True when the receiver took it."""
        import requests  # noqa: PLC0415 - worker processes, which never send, need not load it

        headers = {
            "Content-Type": "application/json",
            "User-Agent": "spoold",
            "X-Spoold-Signature": str(record["signature"]),
            "X-Spoold-Timestamp": str(record["timestamp"]),
            "X-Spoold-Delivery": str(record["delivery_id"]),
            "X-Spoold-Event": str(record["event"]),
        }
        try:
            answer = self._session().post(
                str(record["url"]), data=str(record["body"]).encode(), headers=headers,
                timeout=self._settings.timeout, allow_redirects=False,
            )  # fmt: skip
            answer.close()
            error = None if 200 <= answer.status_code < 300 else f"HTTP {answer.status_code}"
        except (requests.RequestException, ValueError) as exc:
            # ValueError: a URL http.client or IDNA refuses (control characters, a label too
            # long) is not a RequestException. Either text may quote the URL: it is masked
            # here, once, before the log, the record (``last_error``) and the page see it.
            error = f"{type(exc).__name__}: {_first_line(exc, str(record['url']))}"
        if error is None:
            self._spool.deliveries.remove(name)
            self._forget(name)
            self._logger.debug("callback %s %s delivered", record["key"], record["event"])
            return True
        self._failed(name, record, error)
        return False

    def _forget(self, name: str) -> None:
        """A delivery no longer in outbox/ (delivered, given up, removed): not filed again."""
        with self._lock:
            self._records.pop(name, None)
            self._gone.add(name)

    def _failed(self, name: str, record: dict[str, Any], error: str) -> None:
        now = self._clock.now().timestamp()
        tries = int(record.get("tries") or 0) + 1
        record = {**record, "tries": tries, "last_error": error}
        giving_up = now - float(record.get("created") or now) >= self._settings.give_up_after
        wait = 0.0 if giving_up else self._policy.delay(tries, self._draw)
        if not giving_up:
            record["next_try"] = now + wait
        try:
            self._spool.deliveries.update(name, encode_record(record))
            if giving_up:
                self._spool.deliveries.give_up(name)
        except FileNotFoundError:  # removed by hand meanwhile (or adopted): not made again
            self._forget(name)
            return
        if giving_up:
            self._forget(name)
            self._logger.error(
                "callback %s %s to %s: gave up after %d tries (%s); kept in outbox/failed/",
                record["key"], record["event"], url_shown(str(record["url"])), tries, error,
            )  # fmt: skip
            return
        self._keep(name, record)  # before the post's end files its key again
        self._logger.warning(
            "callback %s %s to %s failed (%s); try %d again in %.0fs",
            record["key"], record["event"], url_shown(str(record["url"])), error, tries + 1, wait,
        )  # fmt: skip

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            import requests  # noqa: PLC0415

            session = self._local.session = requests.Session()
        return session


def _first_line(exc: BaseException, url: str) -> str:
    """The exception's first line, nothing of ``url`` in it but what ``url_shown`` shows;
    masked before it is cut to 300 characters, where a secret cut in two would be missed."""
    return (error_shown(str(exc), url).splitlines() or [""])[0][:300]
