"""Sends the notifications in outbox/ (see spoold.out.notices for how they get there): by mail
and to webhooks, each target at most once per window, with backoff, given up into outbox/failed/.

One thread decides (``tick``), a few send. A round:

1. every committed change file (``_n.``) this host wrote is split into one held notice per
   target (``_t.<target>.``), each prepared and committed, then the change file is removed. A
   crash half-way splits it again into the same names: nothing is sent twice for it.
2. each target's held notices are sent together once its window is closed (``_w.<host>.<target>``
   says until when it is open), or, where none is open, once the first has waited ``wait``
   seconds for others to join it, and their backoff is over: one notice as a message of its
   own, several as one digest; the window is written (durably) before they are removed.
3. a window that closed with nothing held is removed.

A target that fails (a mail server down, a receiver answering 500) waits out its own backoff
and holds no one else: each target is in flight at most once, and at most ``per_host`` sends
go to one server at a time. Another host's notifications are its own while it is alive, and
adopted once it is not, like callbacks.
"""

from __future__ import annotations

import hashlib
import logging
import random
import smtplib
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from spoold.core.clock import Clock
from spoold.core.config import CallbackSettings, MailSettings, NotifySettings, NotifyTarget
from spoold.core.errors import NotifyError, SpooldError
from spoold.core.outage import Outage
from spoold.core.secrets import SecretStore
from spoold.core.spool import Spool
from spoold.core.spool.fs import DirStamp, Relist
from spoold.out.messages import mail, url_shown, webhook_body
from spoold.out.notices import CHANGE, HELD, WINDOW, target_id
from spoold.out.outbox import Callbacks, encode_record
from spoold.out.threads import SenderThreads

if TYPE_CHECKING:
    from email.message import EmailMessage

#: A look that lists outbox/ for a change file told by its watch waits this many times the
#: last listing's time after it: a tenth of the loop's thread at most, with thousands held.
LOOK_SHARE = 9.0

#: Folded notices are told to this, by target kind (email, webhook): the metrics' counter.
OnFolded = Callable[[str, int], None]


class _Held(NamedTuple):
    """One target's held notices, as a look found them."""

    notices: list[tuple[str, dict[str, Any]]]  # (name, record), oldest first
    first_created: float
    next_try: float  # the latest of theirs: none is tried before it


def _held(notices: list[tuple[str, dict[str, Any]]]) -> _Held:
    notices.sort(key=lambda pair: float(pair[1].get("created") or 0))
    return _Held(
        notices,
        first_created=float(notices[0][1].get("created") or 0),
        next_try=max(float(record.get("next_try") or 0) for _, record in notices),
    )


class _Scan(NamedTuple):
    """What a look at outbox/ found for this host to send (``Notifier._look``)."""

    held: dict[str, _Held]  # by target id
    windows: dict[str, tuple[str, float]]  # target id -> (its window's file, open until)
    left_to: frozenset[str]  # the hosts, alive then, whose notices were left to them


@dataclass
class _Batch:
    """One target's held notices, sent as one message."""

    target_id: str
    target: NotifyTarget
    names: list[str]
    records: list[dict[str, Any]]
    server: str


class Notifier:
    """Splits, folds and sends the notifications in outbox/."""

    def __init__(
        self,
        spool: Spool,
        callbacks: Callbacks,
        clock: Clock,
        *,
        settings: NotifySettings,
        sending: CallbackSettings,
        secrets: SecretStore,
        logger: logging.Logger,
        poll_interval: float = 1.0,
        wake: threading.Event | None = None,
        on_folded: OnFolded | None = None,
        draw: Callable[[], float] = random.random,
        wall_time: Callable[[], float] = time.time,
    ) -> None:
        """``sending``: the callbacks' timeout, backoff and give-up time, used here too.
        ``wake``: set by whoever commits a change file in this process. ``wall_time``, with
        the clock's monotonic time: when outbox/'s stamp stands for it (``sighting``)."""
        self._spool = spool
        self._callbacks = callbacks
        self._clock = clock
        self._settings = settings
        self._sending = sending
        self._policy = sending.policy()
        self._secrets = secrets
        self._logger = logger
        self._poll = poll_interval
        self._wake = wake or threading.Event()
        self._on_folded = on_folded
        self._draw = draw
        self._lock = threading.Lock()
        self._in_flight: set[str] = set()  # target ids
        self._servers: Counter[str] = Counter()
        self._stop = threading.Event()
        self._threads = SenderThreads[_Batch]("notify", self._loop, self._send_loop,
                                              sending.workers, stopping=self._stop,
                                              wake=self._wake)  # fmt: skip
        self._work = self._threads.work
        self._outage = Outage(logger, "notifier")
        self._next_due: float | None = None
        #: The records read, each under its file's stamp, by the loop's thread alone: a tick
        #: read every held notice (2000 held through a chat server's outage: 39 ms of CPU a
        #: tick, each second); now a stat each, and a read only for what changed.
        self._known: dict[str, tuple[DirStamp, dict[str, Any]]] = {}
        self._wall = wall_time
        self._relist = Relist(spool.deliveries.directory_stamp)
        self._scan: _Scan | None = None  # the last look's, by the loop's thread alone
        #: Whether the last look found any notification file (a change, held, a window).
        self._holds_any = True
        #: A change file committed since the last look (``changed``), and the monotonic time
        #: from which a look may list outbox/ again for one: at most a tenth of this thread's
        #: time goes to listing a backlog of held notices, however fast changes come.
        self._changed = False
        self._look_free_at = 0.0
        #: The wait with nothing of the notifier's in outbox/ while a watch tells every change
        #: file written (``pace``); None: a poll.
        self._rest: float | None = None
        #: How this host sees another (as the callback sender's).
        self.host_state: Callable[[str], str] = lambda host: "alive"

    # -- the loop -----------------------------------------------------------------------------

    def wake(self) -> None:
        """Look at outbox/ now: a change file was committed."""
        self._wake.set()

    def changed(self, name: str | None) -> None:
        """outbox/'s watch saw ``name`` written, renamed or removed (None: it lost track). Only
        a change file is news here: the held notices and windows are this host's own
        writes, or another's that is alive (and polled for while it is)."""
        if name is None or (name.startswith(CHANGE) and name.endswith(".json")):
            self._changed = True
            self._wake.set()

    def pace(self, poll: float, rest: float | None) -> None:
        """Look at outbox/ every ``poll`` seconds, or every ``rest`` while it holds nothing of
        the notifier's and every change file written there is told (``changed``: outbox/ is
        watched); ``rest`` None: it is not. Set as the daemon starts its watch, loses it,
        or reloads its config."""
        self._poll, self._rest = poll, rest
        self.changed(None)  # what came before the watch began

    def _wait(self) -> float:
        """How long the loop waits for a wake-up: until the next notice is due, a poll, or
        ``rest`` where nothing of the notifier's is in outbox/ and a watch tells what comes."""
        with self._lock:
            busy = bool(self._in_flight)
        if self._changed:  # a look is owed, once listing is free again
            return self.held_back()
        rest = self._rest
        wait = rest if rest is not None and not busy and not self._holds_any else self._poll
        if self._next_due is not None:
            wait = min(wait, max(self._next_due - self._clock.now().timestamp(), 0.0))
        return wait

    def start(self) -> None:
        self._threads.start()

    def stop(self) -> None:
        """Stop taking notices; sends under way end on their own (within the timeout)."""
        self._threads.stop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if (held := self.held_back()) > 0:
                self._stop.wait(held)
                continue
            self._wake.clear()  # before looking: a wake-up from now on is not lost
            self._outage.call(self.tick, "notifier: unexpected failure; going on")
            self._wake.wait(self._wait())

    def held_back(self) -> float:
        """How long the loop waits before its next tick, whatever woke it: LOOK_SHARE times
        the last listing's time after it. A tick lists again wherever outbox/'s stamp moved,
        which every change file committed and every send's end does: without this, failures
        coming fast kept it listing a backlog of held notices. A tick that kept the last
        listing instead would send what that listing held again."""
        if self._scan is None:
            return 0.0
        return max(self._look_free_at - self._clock.monotonic(), 0.0)

    def _send_loop(self) -> None:
        while (batch := self._work.get()) is not None:
            try:
                self.send(batch)
            except Exception:
                self._logger.exception("notify %s: unexpected failure; will try again",
                                       describe(batch.target))  # fmt: skip
            finally:
                with self._lock:
                    self._in_flight.discard(batch.target_id)
                    self._servers[batch.server] -= 1
                self._wake.set()

    # -- deciding -----------------------------------------------------------------------------

    def tick(self, *, inline: bool = False) -> int:
        """Split what came, and hand out each target whose time has come; return how many
        were. ``inline``: send them in this thread (a test's, or a loop not started)."""
        now = self._clock.now().timestamp()
        scan = self._look(now)
        self._next_due = None
        handed = 0
        for tid, held in scan.held.items():
            if tid in scan.windows:
                until = scan.windows[tid][1]
            else:  # a quiet target: its first notice waits a moment for others to join it
                until = held.first_created + self._settings.wait
            due = max(until, held.next_try)
            if due > now:
                self._due_at(due)
                continue
            if self._hand(tid, held.notices, inline=inline):
                handed += 1
        for tid, (name, until) in scan.windows.items():
            if tid in scan.held:
                continue
            if until <= now:
                self._spool.deliveries.remove(name)  # closed, and nothing came
            else:
                self._due_at(until)
        return handed

    def _look(self, now: float) -> _Scan:
        """What outbox/ holds for this host to send: its change files split, its held notices
        by target, its open windows. Looked at again only when outbox/ may have changed since
        (``Relist``: every write there replaces a file), or a host whose notices were left to
        it is no longer alive: 10,000 notices held through an outage cost a tick 78 ms of CPU,
        each second, a stat each."""
        if self._scan is not None and any(
            self.host_state(host) != "alive" for host in self._scan.left_to
        ):
            self._relist.forget()
        started = self._clock.monotonic()
        if self._changed and started >= self._look_free_at:
            self._changed = False  # before the listing: a change file from now on is looked for
            self._relist.forget()
        if not self._relist.needed(wall=self._wall(), now=started):
            assert self._scan is not None  # no listing to stand for before the first
            return self._scan
        left_to: set[str] = set()
        names = self._spool.deliveries.names()
        for gone in self._known.keys() - set(names):
            del self._known[gone]
        split = False
        for name in names:
            if name.startswith(CHANGE) and name.endswith(".json"):
                record = self._own(name, now, left_to)
                if record is not None:
                    self._split(name, record)
                    split = True
        if split:
            names = self._spool.deliveries.names()
        held: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        windows: dict[str, tuple[str, float]] = {}
        own_window = f"{WINDOW}{self._callbacks.host}."
        for name in names:
            if not name.endswith(".json"):
                continue
            if name.startswith(HELD):
                record = self._own(name, now, left_to)
                if record is not None and isinstance(record.get("target"), dict):
                    held.setdefault(name[len(HELD) :].split(".", 1)[0], []).append((name, record))
            elif name.startswith(own_window):
                record = self._read(name)
                if record is not None:
                    windows[str(record.get("target_id"))] = (name, float(record.get("until") or 0))
        self._relist.listed()
        self._holds_any = any(name.startswith((CHANGE, HELD, WINDOW)) for name in names)
        ended = self._clock.monotonic()
        self._look_free_at = ended + LOOK_SHARE * (ended - started)
        self._scan = _Scan(
            held={tid: _held(notices) for tid, notices in held.items()},
            windows=windows,
            left_to=frozenset(left_to),
        )
        return self._scan

    def _due_at(self, when: float) -> None:
        self._next_due = when if self._next_due is None else min(self._next_due, when)

    def _hand(self, tid: str, notices: list[tuple[str, dict[str, Any]]], *, inline: bool) -> bool:
        target = NotifyTarget.from_dict(notices[0][1]["target"])
        server = self._server(target)
        with self._lock:
            if tid in self._in_flight or self._servers[server] >= self._sending.per_host:
                return False
            self._in_flight.add(tid)
            self._servers[server] += 1
        batch = _Batch(tid, target, [n for n, _ in notices], [r for _, r in notices], server)
        if not inline:
            self._work.put(batch)
            return True
        try:
            self.send(batch)
        finally:
            with self._lock:
                self._in_flight.discard(tid)
                self._servers[server] -= 1
        return True

    def _server(self, target: NotifyTarget) -> str:
        """Where a target's messages go: its mail server, or its webhook's host."""
        mail = self._settings.mail
        if target.kind == "email":
            return f"smtp:{mail.host}:{mail.port}" if mail is not None else "smtp:"
        return "http:" + url_shown(target.url)

    def _own(self, name: str, now: float, left_to: set[str]) -> dict[str, Any] | None:
        """A notification file's record if this host sends it (adopted first from a host no
        longer alive); None if another host does (named into ``left_to``), or it is gone."""
        record = self._read(name)
        if record is None or self._callbacks.written_here(record):
            return record
        owner = str(record.get("host"))
        if self.host_state(owner) == "alive":
            left_to.add(owner)
            return None
        adopted = {**record, "host": self._callbacks.host, "adopted_from": owner,
                   "created": now, "next_try": now}  # fmt: skip
        if not self._spool.deliveries.adopt(name, self._callbacks.host,
                                            lambda _old: encode_record(adopted)):  # fmt: skip
            return None
        self._logger.warning("notification %s: adopted from host %s, which is %s", name, owner,
                             self.host_state(owner))  # fmt: skip
        return adopted

    def _read(self, name: str) -> dict[str, Any] | None:
        """A notification file's record, read again only when its file has changed since
        (``Deliveries.stamp``); never changed by its callers (they copy to change it)."""
        stamp = self._spool.deliveries.stamp(name)
        if stamp is None:
            self._known.pop(name, None)
            return None
        known = self._known.get(name)
        if known is not None and known[0] == stamp:
            return known[1]
        # Stamped before it is read: a change between the two makes the next stamp differ.
        record = self._spool.deliveries.read(name)
        if record is not None:
            self._known[name] = (stamp, record)
        return record

    def _split(self, name: str, record: dict[str, Any]) -> None:
        """One change file into a held notice per target; the change file removed last."""
        key = str(record["key"])[len(CHANGE) :]
        sequence = int(record["sequence"])
        for entry in record.get("targets") or []:
            target = NotifyTarget.from_dict(entry)
            tid = target_id(target)
            notice = {
                "kind": "notice",
                # The same for the same change and target, split once or twice: a Message-ID.
                "delivery_id": hashlib.sha256(
                    f"{record['delivery_id']}/{tid}".encode()
                ).hexdigest()[:32],
                "key": f"{HELD}{tid}.{key}",
                "sequence": sequence,
                "target": target.to_dict(),
                "target_id": tid,
                "item": record.get("item") or {},
                "created": float(record.get("created") or self._clock.now().timestamp()),
                "condition": record.get("condition") or {},
                "host": record.get("host"),
                "tries": 0,
                "next_try": 0,
                "last_error": None,
            }
            data = encode_record(notice)
            prepared = self._spool.deliveries.prepare(str(notice["key"]), sequence, data)
            self._spool.deliveries.commit(prepared, data)
        self._spool.deliveries.remove(name)

    # -- sending ------------------------------------------------------------------------------

    def send(self, batch: _Batch) -> bool:
        """One try at one target's held notices; True when they were taken."""
        items = [dict(record.get("item") or {}) for record in batch.records]
        error = None
        try:
            if batch.target.kind == "email":
                self._mail(batch, items)
            else:
                self._post(batch.target, items)
        except (OSError, smtplib.SMTPException, SpooldError, ValueError) as exc:
            error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
        if error is not None:
            self._failed(batch, error)
            return False
        now = self._clock.now().timestamp()
        self._window(batch.target_id, now)
        for name in batch.names:
            self._spool.deliveries.remove(name)
        if len(items) > 1:
            self._logger.info(
                "notify %s: %d notifications folded into one digest (window %gs)",
                describe(batch.target), len(items), self._settings.window,
            )  # fmt: skip
            if self._on_folded is not None:
                self._on_folded(batch.target.kind, len(items))
        else:
            self._logger.debug("notify %s: sent", describe(batch.target))
        return True

    def _window(self, tid: str, now: float) -> None:
        """The target's window is open from now: written before its notices are removed, so
        that a restart neither forgets it nor sends them again but as a duplicate."""
        # ``created``: while it is prepared, the callback sender tells it from one its writer
        # left unfinished by its age (without it, every window was "left unfinished", dropped).
        record = {"kind": "window", "key": f"{WINDOW}{self._callbacks.host}.{tid}",
                  "sequence": 0, "target_id": tid, "sent_at": now, "created": now,
                  "until": now + self._settings.window, "host": self._callbacks.host,
                  "condition": {}}  # fmt: skip
        data = encode_record(record)
        prepared = self._spool.deliveries.prepare(str(record["key"]), 0, data)
        self._spool.deliveries.commit(prepared, data)

    def _failed(self, batch: _Batch, error: str) -> None:
        now = self._clock.now().timestamp()
        tries = 1 + max(int(record.get("tries") or 0) for record in batch.records)
        wait = self._policy.delay(tries, self._draw)
        for name, record in zip(batch.names, batch.records, strict=True):
            updated = {**record, "tries": tries, "last_error": error, "next_try": now + wait}
            if now - float(record.get("created") or now) >= self._sending.give_up_after:
                try:
                    self._spool.deliveries.update(name, encode_record(updated))
                    self._spool.deliveries.give_up(name)
                except FileNotFoundError:  # removed by hand meanwhile: not made again
                    continue
                self._logger.error(
                    "notify %s of %s: gave up after %d tries (%s); kept in outbox/failed/",
                    describe(batch.target), record.get("key"), tries, error,
                )  # fmt: skip
                continue
            try:
                self._spool.deliveries.update(name, encode_record(updated))
            except FileNotFoundError:  # removed by hand meanwhile
                continue
        self._logger.warning("notify %s failed (%s); try %d again in %.0fs",
                             describe(batch.target), error, tries + 1, wait)  # fmt: skip

    def _mail(self, batch: _Batch, items: list[dict[str, Any]]) -> None:
        settings = self._settings.mail
        if settings is None:
            raise ValueError("no mail server is configured (mail: in the config)")
        message = mail(
            items, sender=settings.sender, to=batch.target.to,
            message_id=str(batch.records[-1]["delivery_id"]), window=self._settings.window,
        )  # fmt: skip
        send_mail(settings, message, list(batch.target.to), self._secrets, self._sending.timeout)

    def _post(self, target: NotifyTarget, items: list[dict[str, Any]]) -> None:
        import requests  # noqa: PLC0415 - only where a webhook is sent

        url = target.url
        if url.startswith("${secret:") and url.endswith("}"):
            url = self._secrets.read(url[len("${secret:") : -1]).strip()
        body = webhook_body(target.format, items, window=self._settings.window)
        try:
            answer = requests.post(
                url, json=body, timeout=self._sending.timeout, allow_redirects=False,
                headers={"User-Agent": "spoold"},
            )  # fmt: skip
            answer.close()
        except requests.RequestException as exc:
            # Not its words: they hold the URL, whose path is often the webhook's key.
            raise OSError(f"{type(exc).__name__} posting to {url_shown(url)}") from None
        if not 200 <= answer.status_code < 300:
            raise OSError(f"HTTP {answer.status_code}")


def send_mail(
    settings: MailSettings, message: EmailMessage, to: list[str], secrets: SecretStore,
    timeout: float,
) -> None:  # fmt: skip
    """Mail ``message`` through the configured server: TLS (from the start, or by STARTTLS)
    with the server's certificate checked, then the login, if any."""
    context = ssl.create_default_context()
    if settings.ca_file is not None:
        context.load_verify_locations(cafile=str(settings.ca_file))
    smtp: smtplib.SMTP
    if settings.security == "tls":
        smtp = smtplib.SMTP_SSL(settings.host, settings.port, timeout=timeout, context=context)
    else:
        smtp = smtplib.SMTP(settings.host, settings.port, timeout=timeout)
    with smtp:
        if settings.security == "starttls":
            smtp.starttls(context=context)
        # Never without TLS (the config refuses it; this makes sure): a password in clear.
        if settings.user is not None and settings.password_secret is not None:
            if settings.security == "none":
                raise NotifyError("mail: no login without TLS (mail.security: none)")
            smtp.login(settings.user, secrets.read(settings.password_secret))
        smtp.send_message(message, from_addr=settings.sender, to_addrs=to)


def describe(target: NotifyTarget) -> str:
    """A target in the log: never a webhook's path, which is often its key."""
    if target.kind == "email":
        return "mail to " + ", ".join(target.to)
    if target.url.startswith("${secret:"):
        return f"{target.format} webhook in {target.url[2:-1]}"
    return f"{target.format} webhook at {url_shown(target.url)}"
