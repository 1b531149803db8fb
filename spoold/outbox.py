"""Durable signed callbacks: the backend learns every state change of its jobs, even after an outage.

Two halves. ``Callbacks`` is called by whoever changes a job's state (intake, a worker, cancel,
retry, recovery) and writes the delivery into outbox/ in the same step. ``Sender`` posts what
is in outbox/, per job in sequence order, until the receiver answers 2xx.

How a delivery becomes part of its state change, with no transaction across two files:

1. prepare: outbox/<job>~<n>.prepared is written and fsynced, n = status ``callback_sequence`` + 1;
2. the state change is made, and the status.json it writes says ``callback_sequence: n``;
3. commit: the delivery is renamed to outbox/<job>~<n>.json, which the sender posts.

A crash between 1 and 3 leaves a prepared delivery, and the job's status.json decides it: a
sequence of n or more means the change was made (commit), a smaller one that it was not (the
delivery is dropped). The next owner of the job does this before its own event; the daemon does
it at start for every leftover; the sender does it for one left over longer than
``STALE_PREPARED`` (a ``spoold cancel`` killed half-way). A receiver may get a delivery twice
(an answer lost in a crash), never one for a change that was not made, and dedupes by
``delivery_id``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import queue
import random
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from spoold.clock import Clock, rfc3339
from spoold.documents import load_document
from spoold.errors import CallbackError, DuplicateJob, SpooldError
from spoold.job import JobStatus, interpolate
from spoold.retry import RetryPolicy
from spoold.secrets import SecretStore
from spoold.spool import JobDir, Spool
from spoold.states import JobState
from spoold.units import parse_duration

if TYPE_CHECKING:
    import requests

    from spoold.config import Config

EVENTS = ("accepted", "started", "retrying", "succeeded", "failed", "cancelled", "rejected")
_STATE_EVENTS = {
    JobState.PENDING: "retrying",
    JobState.SUCCEEDED: "succeeded",
    JobState.FAILED: "failed",
    JobState.CANCELLED: "cancelled",
}
_REQUIRED = frozenset({"key", "event", "url", "body", "signature", "timestamp", "delivery_id"})
_RELIST = 0.1  # seconds between listings of outbox/, at most (unless woken)
#: A prepared delivery older than this has lost its writer (killed mid-change): settle it.
STALE_PREPARED = 600.0


def callbacks_for(
    config: Config, spool: Spool, clock: Clock, logger: logging.Logger,
    wake: Callable[[], None] | None = None,
) -> Callbacks:  # fmt: skip
    """The Callbacks of a process that changes job states: daemon, worker process, CLI."""
    return Callbacks(
        spool, clock, SecretStore(config.secrets_dir), logger=logger,
        default_url=config.default_callback_url, default_secret=config.default_callback_secret,
        wake=wake,
    )  # fmt: skip


def announce(
    callbacks: Callbacks | None, job: JobDir, event: str, status: JobStatus
) -> contextlib.AbstractContextManager[None]:
    """``Callbacks.announce_job``, or nothing where no callbacks are set up."""
    if callbacks is None:
        return contextlib.nullcontext()
    return callbacks.announce_job(job, event, status)


def event_for(state: JobState) -> str:
    """The event of a job moving into ``state`` after an attempt (pending: it runs again)."""
    return _STATE_EVENTS[state]


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-Spoold-Signature`` value: ``sha256=`` hex HMAC-SHA256 of ``timestamp.body``."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


@dataclass(frozen=True)
class CallbackSettings:
    """How deliveries are sent (``callbacks:`` in the config)."""

    timeout: float = 10.0
    #: Deliveries in flight at once, and at most ``per_host`` of them to one receiver.
    workers: int = 4
    per_host: int = 2
    initial: float = 5.0
    maximum: float = 3600.0
    multiplier: float = 2.0
    #: A delivery not acknowledged this long after it was made goes to outbox/failed/.
    give_up_after: float = 3 * 86400.0

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> CallbackSettings:
        """From the config's validated ``callbacks:`` mapping."""
        backoff = document.get("backoff") or {}
        defaults = cls()
        durations = {
            "timeout": document.get("timeout"),
            "initial": backoff.get("initial"),
            "maximum": backoff.get("max"),
            "give_up_after": document.get("give_up_after"),
        }
        parsed = {
            key: parse_duration(value) for key, value in durations.items() if value is not None
        }
        return replace(
            defaults,
            workers=int(document.get("workers", defaults.workers)),
            per_host=int(document.get("per_host", defaults.per_host)),
            multiplier=float(backoff.get("multiplier", defaults.multiplier)),
            **parsed,
        )

    def policy(self) -> RetryPolicy:
        """The backoff between tries; jittered, so that a receiver back up is not stampeded."""
        return RetryPolicy(
            initial=self.initial, multiplier=self.multiplier, maximum=self.maximum, jitter=True
        )


@dataclass(frozen=True)
class CallbackTarget:
    """Where a job's events go and the key they are signed with."""

    url: str
    secret: str = field(repr=False)
    events: frozenset[str] | None = None  # None: all of them

    def wants(self, event: str) -> bool:
        return self.events is None or event in self.events


class Callbacks:
    """Writes deliveries into outbox/ as part of the state changes they tell of."""

    def __init__(
        self,
        spool: Spool,
        clock: Clock,
        secrets: SecretStore,
        *,
        logger: logging.Logger,
        default_url: str | None = None,
        default_secret: str | None = None,
        wake: Callable[[], None] | None = None,
    ) -> None:
        self._spool = spool
        self._logger = logger
        self._clock = clock
        self._secrets = secrets
        self._default_url = default_url
        self._default_secret = default_secret
        self._wake = wake  # the sender, when it runs in this process

    @property
    def configured(self) -> bool:
        """Whether a job without a ``callback:`` of its own has one (the config's default)."""
        return self._default_url is not None

    def target(self, document: Mapping[str, Any] | None) -> CallbackTarget | None:
        """A job's callback: its own ``callback:`` over the config's defaults; None if none.

        Raises CallbackError when there is a URL but no secret to sign with, or the secret
        cannot be read: intake refuses such a job rather than send unsigned or nothing.
        """
        block = (document or {}).get("callback") or {}
        url = block.get("url") or self._default_url
        if not url:
            return None
        raw = block.get("secret") or self._default_secret
        if not raw:
            raise CallbackError(
                f"callback to {url} has no secret to sign with: set callback.secret "
                "or the config's default_callback_secret"
            )
        try:
            variables = {
                str(name): str(interpolate(value, {}, self._secrets.read))
                for name, value in ((document or {}).get("variables") or {}).items()
            }
            secret = str(interpolate(str(raw), variables, self._secrets.read))
        except SpooldError as exc:
            raise CallbackError(f"callback secret: {exc}") from exc
        events = block.get("events")
        return CallbackTarget(str(url), secret, None if events is None else frozenset(events))

    @contextlib.contextmanager
    def announce(
        self,
        target: CallbackTarget | None,
        event: str,
        status: JobStatus,
        mask: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> Iterator[None]:
        """Around a job's state change: prepare its delivery, and commit it once the change is made.

        The block must write ``status`` (its ``callback_sequence`` is raised on entry). When
        it raises, the change counts as not made, and the delivery is dropped.
        """
        if target is None or not target.wants(event):
            yield
            return
        job_id = status.job_id
        self.settle_job(job_id, status.callback_sequence)
        sequence = status.callback_sequence + 1
        data = status.to_dict()
        data = mask(data) if mask is not None else data
        attempts = data.get("attempts") or []
        body = {
            "event": event,
            "job_id": job_id,
            "state": data.get("state"),
            "attempt": attempts[-1]["number"] if attempts else 0,
            "exit_code": data.get("exit_code"),
            "error": data.get("error"),
            "artifacts": data.get("artifacts") or [],
            "result": data.get("result") or {},
        }
        if event == "retrying":
            body["next_attempt_at"] = data.get("next_attempt_at")
        try:
            name = self._prepare(
                target, job_id, sequence, body, {"job": job_id}, exclusive=event == "accepted"
            )
        except FileExistsError:
            raise DuplicateJob(f"a job with id {job_id!r} has callbacks waiting") from None
        status.callback_sequence = sequence
        try:
            yield
        except BaseException:
            # The change was not made (a duplicate id, a full disk): nor is its delivery.
            status.callback_sequence = sequence - 1
            self._spool.remove_delivery(name)
            raise
        self._commit(name)

    def target_of(self, job_id: str, document: Mapping[str, Any] | None) -> CallbackTarget | None:
        """``target``, for a job accepted before: a problem now is logged, and none is sent."""
        try:
            return self.target(document)
        except CallbackError as exc:  # intake checked it: the secret changed since
            self._logger.error("job %s sends no callbacks: %s", job_id, exc)
            return None

    def announce_job(
        self, job: JobDir, event: str, status: JobStatus
    ) -> contextlib.AbstractContextManager[None]:
        """``announce`` for a job whose document is not at hand: its job.yaml is read."""
        try:
            document = load_document(self._spool.read_job_file(job), "job.yaml")
        except (SpooldError, OSError, ValueError) as exc:
            self._logger.error("job %s: no %s callback: %s", job.job_id, event, exc)
            document = None
        target = None if document is None else self.target_of(job.job_id, document)
        return self.announce(target, event, status)

    @contextlib.contextmanager
    def announce_rejection(
        self, target: CallbackTarget | None, stage: str, reason: Mapping[str, Any],
        job_id: str | None,
    ) -> Iterator[None]:  # fmt: skip
        """Around intake's rejection of a staged file: the ``rejected`` event.

        Keyed by the stage, not the job id: a file rejected as a duplicate must not take a
        place in the sequence of the job that holds that id.
        """
        if target is None or not target.wants("rejected"):
            yield
            return
        body: dict[str, Any] = {
            "event": "rejected",
            "job_id": job_id,
            "state": "rejected",
            "attempt": 0,
            "exit_code": None,
            "error": reason.get("reason"),
            "artifacts": [],
            "result": {},
            "file": reason.get("file"),
            "code": reason.get("code"),
        }
        key = "rejected-" + stage.rstrip("/").rsplit("/", 1)[-1]
        name = self._prepare(target, key, 1, body, {"stage": stage})
        try:
            yield
        except BaseException:
            self._spool.remove_delivery(name)
            raise
        self._commit(name)

    def settle_job(self, job_id: str, sequence: int) -> None:
        """Commit the job's delivery ``sequence`` if its last owner left it prepared.

        Called by the job's next owner with the sequence its status.json shows: that change
        was made, so its delivery is valid. One that is higher was not, and the owner's own
        prepare replaces it.
        """
        if sequence > 0 and self._spool.commit_delivery(f"{job_id}~{sequence:08d}.prepared"):
            self._woken()

    def settle(self, name: str) -> bool:
        """Decide one prepared delivery by the state it depends on; True if it was committed."""
        record = self._spool.read_delivery(name)
        if record is None:
            return False
        condition = record.get("condition") or {}
        made = False
        if "stage" in condition:
            made = self._spool.stage_decided(str(condition["stage"]))
        elif "job" in condition:
            with contextlib.suppress(SpooldError, OSError, ValueError):
                job = self._spool.find(str(condition["job"]))
                if job is not None:
                    status = self._spool.read_status(job)
                    made = int(status.get("callback_sequence") or 0) >= int(record["sequence"])
        if made:
            self._spool.commit_delivery(name)
            self._woken()
        else:
            self._spool.remove_delivery(name)
        return made

    def settle_all(self) -> tuple[int, int]:
        """At start, before stages are recovered: decide every prepared delivery (made, dropped)."""
        made = dropped = 0
        for name in self._spool.list_outbox():
            if name.endswith(".prepared"):
                if self.settle(name):
                    made += 1
                else:
                    dropped += 1
        return made, dropped

    def _prepare(
        self, target: CallbackTarget, key: str, sequence: int, body: dict[str, Any],
        condition: dict[str, str], *, exclusive: bool = False,
    ) -> str:  # fmt: skip
        now = self._clock.now()
        stamp = str(int(now.timestamp()))
        body.update(timestamp=rfc3339(now), delivery_id=uuid.uuid4().hex, sequence=sequence)
        payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        record = {
            "delivery_id": body["delivery_id"],
            "key": key,
            "sequence": sequence,
            "event": body["event"],
            "url": target.url,
            "timestamp": stamp,
            "signature": sign(target.secret, stamp, payload),
            "body": payload.decode(),
            "created": now.timestamp(),
            "condition": condition,
            "tries": 0,
            "next_try": now.timestamp(),
            "last_error": None,
        }
        return self._spool.prepare_delivery(key, sequence, _encode(record), exclusive=exclusive)

    def _commit(self, name: str) -> None:
        self._spool.commit_delivery(name)
        self._woken()

    def _woken(self) -> None:
        if self._wake is not None:
            self._wake()


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
    ) -> None:
        """``wake``: set by whoever commits a delivery in this process (``Callbacks``)."""
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
        self._records: dict[str, dict[str, Any]] = {}  # read once per name
        self._names: list[str] | None = None  # the last listing of outbox/
        self._listed = 0.0  # when, monotonic
        self._relist = False
        self._gone: set[str] = set()  # taken or given up since
        self._work: queue.Queue[_Due | None] = queue.Queue()
        self._wake = wake or threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._local = threading.local()

    def wake(self) -> None:
        """Look at outbox/ now: a delivery was committed."""
        self._relist = True
        self._wake.set()

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._loop, name="outbox", daemon=True)]
        self._threads += [
            threading.Thread(target=self._post_loop, name=f"outbox-{n}", daemon=True)
            for n in range(self._settings.workers)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop taking deliveries; posts under way end on their own (within the timeout)."""
        self._stop.set()
        self._wake.set()
        if not self._threads:
            return  # never started (the daemon failed before)
        for _ in range(self._settings.workers):
            self._work.put(None)
        self._threads[0].join()

    def pending(self) -> int:
        """Deliveries being posted now."""
        with self._lock:
            return len(self._in_flight)

    def tick(self) -> int:
        """Hand out every delivery that is due; return how many were."""
        now = self._clock.now().timestamp()
        handed = 0
        keys: set[str] = set()
        for name in self._listing():  # sorted: a key's lowest sequence comes first
            key = name.rsplit("~", 1)[0]
            if key in keys:
                continue
            keys.add(key)
            if key in self._in_flight:  # only this thread adds: a stale read only waits
                continue
            if len(self._in_flight) >= self._settings.workers:
                break
            if name.endswith(".prepared"):
                self._settle_if_stale(name, now)
                continue
            record = self._record(name)
            if record is None or not record.keys() >= _REQUIRED:
                self._unusable(name)
                continue
            if float(record.get("next_try") or 0) > now:
                continue
            host = urlsplit(str(record["url"])).netloc
            with self._lock:
                if self._hosts[host] >= self._settings.per_host:
                    continue
                self._in_flight.add(key)
                self._hosts[host] += 1
            self._work.put(_Due(name, record))
            handed += 1
        return handed

    def _listing(self) -> list[str]:
        """outbox/'s deliveries: listed at most every ``_RELIST`` s (or when woken from outside).

        A backlog of thousands would otherwise be listed again after every single delivery.
        """
        now = self._clock.monotonic()
        with self._lock:
            if self._names is not None and not self._relist and now - self._listed < _RELIST:
                return [name for name in self._names if name not in self._gone]
            self._relist = False
        names = self._spool.list_outbox()
        with self._lock:
            self._names, self._listed = names, now
            self._gone.clear()
            for gone in self._records.keys() - set(names):
                del self._records[gone]
        return names

    def next_due(self, now: float) -> float | None:
        """When the earliest delivery that waits out a backoff is due (epoch seconds).

        Not one that is due already: it is in flight, or waits for a free slot, and the end
        of a post wakes the loop for it.
        """
        with self._lock:
            tries = [float(r.get("next_try") or 0) for r in self._records.values()]
        return min((t for t in tries if t > now), default=None)

    def _record(self, name: str) -> dict[str, Any] | None:
        record = self._records.get(name)  # one dict lookup is atomic; this runs per delivery
        if record is None:
            record = self._spool.read_delivery(name)
            if record is not None:
                with self._lock:
                    self._records[name] = record
        return record

    def _unusable(self, name: str) -> None:
        """A delivery file that cannot be sent (damaged, or not spoold's): out of the way."""
        try:
            self._spool.give_up_delivery(name)
        except FileNotFoundError:
            return  # delivered and removed while we looked
        finally:
            self._gone.add(name)
        self._logger.error("callback %s is unreadable; moved to outbox/failed/", name)

    def _settle_if_stale(self, name: str, now: float) -> None:
        record = self._spool.read_delivery(name)
        if record is not None and now - float(record.get("created") or 0) > STALE_PREPARED:
            made = self._callbacks.settle(name)
            self._relist = True  # it is gone, or under its committed name
            self._logger.warning(
                "callback %s: its writer left it unfinished; %s", name,
                "the change was made, sending it" if made else "the change was not made, dropped",
            )  # fmt: skip

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # before looking: a wake-up from now on is not lost
            try:
                self.tick()
            except Exception:  # the sender must outlive any one bad file
                self._logger.exception("callback sender: unexpected failure; going on")
            now = self._clock.now().timestamp()
            wait = self._poll
            if (due := self.next_due(now)) is not None:
                wait = min(wait, due - now)
            self._wake.wait(wait)

    def _post_loop(self) -> None:
        while (due := self._work.get()) is not None:
            try:
                self.deliver(due.name, due.record)
            except Exception:
                self._logger.exception("callback %s: unexpected failure; will try again", due.name)
            finally:
                key = due.name.rsplit("~", 1)[0]
                with self._lock:
                    self._in_flight.discard(key)
                    self._hosts[urlsplit(str(due.record.get("url"))).netloc] -= 1
                self._wake.set()

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
        except requests.RequestException as exc:
            error = f"{type(exc).__name__}: {_first_line(exc)}"
        if error is None:
            self._spool.remove_delivery(name)
            with self._lock:
                self._records.pop(name, None)
                self._gone.add(name)
            self._logger.debug("callback %s %s delivered", record["key"], record["event"])
            return True
        self._failed(name, record, error)
        return False

    def _failed(self, name: str, record: dict[str, Any], error: str) -> None:
        now = self._clock.now().timestamp()
        tries = int(record.get("tries") or 0) + 1
        record = {**record, "tries": tries, "last_error": error}
        if now - float(record.get("created") or now) >= self._settings.give_up_after:
            self._spool.update_delivery(name, _encode(record))
            self._spool.give_up_delivery(name)
            with self._lock:
                self._records.pop(name, None)
                self._gone.add(name)
            self._logger.error(
                "callback %s %s to %s: gave up after %d tries (%s); kept in outbox/failed/",
                record["key"], record["event"], record["url"], tries, error,
            )  # fmt: skip
            return
        wait = self._policy.delay(tries, self._draw)
        record["next_try"] = now + wait
        with self._lock:
            self._records[name] = record
        try:
            self._spool.update_delivery(name, _encode(record))
        except FileNotFoundError:  # removed by hand meanwhile
            return
        self._logger.warning(
            "callback %s %s to %s failed (%s); try %d again in %.0fs",
            record["key"], record["event"], record["url"], error, tries + 1, wait,
        )  # fmt: skip

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            import requests  # noqa: PLC0415

            session = self._local.session = requests.Session()
        return session


def _encode(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:300]
