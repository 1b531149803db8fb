"""Durable signed callbacks: the backend learns every state change of its jobs, even after an outage.

``Callbacks`` is called by whoever changes a job's state (intake, a worker, cancel, retry,
recovery) and writes the delivery into outbox/ in the same step; ``spoold.out.sender`` posts what is
in outbox/, per job in sequence order, until the receiver answers 2xx.

How a delivery becomes part of its state change, with no transaction across two files:

1. prepare: outbox/<job>~<n>.prepared is written and fsynced, n = status ``callback_sequence`` + 1;
2. the state change is made, and the status.json it writes says ``callback_sequence: n``;
3. commit: the delivery is renamed to outbox/<job>~<n>.json, which the sender posts.

A crash between 1 and 3 leaves a prepared delivery, and the job's status.json decides it: the
change it names (``callback_delivery``, the delivery's ``delivery_id``) was made (commit), any
other was not (the delivery is dropped); a status of an older spoold, which names none, by its
sequence (n or more: made). The next owner of the job does this before its own event; the daemon
does it at start for every leftover; the sender does it for one left over longer than
``STALE_PREPARED`` (a ``spoold cancel`` killed half-way). A receiver may get a delivery twice
(an answer lost in a crash), never one for a change that was not made, and dedupes by
``delivery_id``.

A change that the job's notification targets want (``notify:``) prepares, beside its callback,
one more file in the same step, ``_n.<job>~<n>`` (spoold.out.notices), decided the same way:
its ``delivery_id`` is the change's, which status ``callback_delivery`` names (a change with
notifications but no callback still raises the sequence and names itself there).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from spoold.core.clock import Clock, rfc3339
from spoold.core.config import NotifyTarget
from spoold.core.errors import CallbackError, DuplicateJob, SpooldError
from spoold.core.job import JobStatus, interpolate
from spoold.core.secrets import SecretStore
from spoold.core.spool import JobDir, Spool
from spoold.core.spool.deliveries import committed_name
from spoold.core.states import JobState
from spoold.out.notices import Mask, Notices, change_key, log_tail

if TYPE_CHECKING:
    from spoold.core.config import Config

_STATE_EVENTS = {
    JobState.PENDING: "retrying",
    JobState.SUCCEEDED: "succeeded",
    JobState.FAILED: "failed",
    JobState.CANCELLED: "cancelled",
}
#: A prepared delivery older than this has lost its writer (killed mid-change): settle it.
STALE_PREPARED = 600.0


def callbacks_for(
    config: Config, spool: Spool, clock: Clock, logger: logging.Logger,
    wake: Callable[[str], None] | None = None,
) -> Callbacks:  # fmt: skip
    """The Callbacks of a process that changes job states: daemon, worker process, CLI."""
    return Callbacks(
        spool, clock, SecretStore(config.secrets_dir), logger=logger,
        default_url=config.default_callback_url, default_secret=config.default_callback_secret,
        wake=wake, host=config.host_id, notices=Notices.for_config(config),
    )  # fmt: skip


def event_for(state: JobState) -> str:
    """The event of a job moving into ``state`` after an attempt (pending: it runs again)."""
    return _STATE_EVENTS[state]


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-Spoold-Signature`` value: ``sha256=`` hex HMAC-SHA256 of ``timestamp.body``."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


@dataclass(frozen=True)
class CallbackTarget:
    """Where a job's events go and the key they are signed with; and whom its notifications
    go to (``notify``). ``url`` None: no callback, notifications only."""

    url: str | None
    secret: str = field(repr=False)
    events: frozenset[str] | None = None  # None: all of them
    notify: tuple[NotifyTarget, ...] = ()

    def wants(self, event: str) -> bool:
        """Whether the callback hears of ``event`` (notifications: ``notified``)."""
        return self.url is not None and (self.events is None or event in self.events)

    def notified(self, event: str) -> tuple[NotifyTarget, ...]:
        """The notification targets that hear of ``event``."""
        return tuple(target for target in self.notify if target.wants(event))


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
        wake: Callable[[str], None] | None = None,
        host: str = "",
        notices: Notices | None = None,
    ) -> None:
        """``host``: this host's id, written into each delivery: only it sends the delivery
        while it is alive (spoold.out.sender). ``notices``: decides the notifications (none
        without). ``wake``: told each name in outbox/ a commit here changed (the prepared one
        gone, the committed one there)."""
        self._host = host
        self._notices = notices
        #: What each delivery prepared here holds, until committed: written again should
        #: another host have dropped it meanwhile (``Deliveries.commit``).
        self._prepared: dict[str, bytes] = {}
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
        """A job's callback: its own ``callback:`` over the config's defaults, with its
        notification targets (``notify:``, else the config's); None if neither.

        Raises CallbackError when there is a URL but no secret to sign with, or the secret
        cannot be read, or a ``notify:`` that cannot be used: intake refuses such a job rather
        than send unsigned or nothing.
        """
        notify = () if self._notices is None else self._notices.targets(document)
        return self._callback(document, notify)

    def _callback(
        self, document: Mapping[str, Any] | None, notify: tuple[NotifyTarget, ...]
    ) -> CallbackTarget | None:
        block = (document or {}).get("callback") or {}
        url = block.get("url") or self._default_url
        if not url:
            return CallbackTarget(None, "", notify=notify) if notify else None
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
        return CallbackTarget(
            str(url), secret, None if events is None else frozenset(events), notify
        )

    @staticmethod
    def delivers(target: CallbackTarget | None, event: str) -> bool:
        """Whether ``announce`` prepares anything for ``event``: a callback or a notice."""
        return target is not None and (target.wants(event) or bool(target.notified(event)))

    @contextlib.contextmanager
    def announce(
        self,
        target: CallbackTarget | None,
        event: str,
        status: JobStatus,
        mask: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        *,
        change: str | None = None,
    ) -> Iterator[None]:
        """Around a job's state change: prepare its delivery, and commit it once the change is made.

        The block must write ``status`` (its ``callback_sequence`` is raised on entry). When
        it raises, the change counts as not made, and the delivery is dropped. ``change``: the
        change's id where the caller wrote ``status`` numbered before (``numbered``).
        """
        if target is None or not self.delivers(target, event):
            yield
            return
        notify = target.notified(event)
        job_id = status.job_id
        self.settle_job(job_id, status.callback_sequence, status.callback_delivery)
        sequence = status.callback_sequence + 1
        data = status.to_dict()
        data = mask(data) if mask is not None else data
        # The change's id: its callback's delivery_id, if it has one.
        change = change or uuid.uuid4().hex
        names = []
        if notify:
            item = self._item(event, data, mask)
            names.append(self._prepare_notices(job_id, sequence, change, targets=notify,
                                               item=item, condition={"job": job_id}))  # fmt: skip
        if not target.wants(event):
            yield from self._made(names, status, sequence, change)
            return
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
            # Which claim made the change: a receiver can tell a takeover's event apart.
            "generation": data.get("generation") or 0,
            # What the attempt cost (status.json's usage): none while it runs.
            "usage": attempts[-1].get("usage") if attempts else None,
        }
        if event == "retrying":
            body["next_attempt_at"] = data.get("next_attempt_at")
        body["delivery_id"] = change
        try:
            names.append(self._prepare(
                target, job_id, sequence, body, {"job": job_id}, exclusive=event == "accepted"
            ))  # fmt: skip
        except FileExistsError:
            self._drop(names)
            raise DuplicateJob(f"a job with id {job_id!r} has callbacks waiting") from None
        except BaseException:
            self._drop(names)
            raise
        yield from self._made(names, status, sequence, change)

    def _made(
        self, names: list[str], status: JobStatus, sequence: int, change: str
    ) -> Iterator[None]:
        """The change itself (the caller's block), between the prepare of ``names`` and their
        commit; if it raises, they go as the job's status then says (``_settle_failed``)."""
        before = status.callback_delivery
        status.callback_sequence, status.callback_delivery = sequence, change
        try:
            yield
        except BaseException:
            # Made or not is what the job's status now says, not the exception: a change can
            # fail after its status was written (a move cut off), and is then completed as
            # recorded, by a retry or by the host that takes the job over, its delivery with it.
            if not self._settle_failed(names, status.job_id, change):
                status.callback_sequence, status.callback_delivery = sequence - 1, before
            raise
        for name in names:
            self._commit(name)

    def _settle_failed(self, names: list[str], job_id: str, change: str) -> bool:
        """Decide the deliveries of a change that raised by what the job's status records:
        committed if it names this very change (``callback_delivery``: not another job of
        that id, a duplicate refused), else dropped; whether they were committed. Where the
        status cannot be read now (the spool cut off) they stay prepared, for whoever
        completes or redoes the change: a retry's prepare replaces them, a next owner's
        ``settle_job`` commits them if recorded, this host's sender settles them once stale."""
        try:
            job = self._spool.jobs.find(job_id)
            status = None if job is None else self._spool.jobs.read_status(job)
        except (OSError, SpooldError, ValueError):
            return False
        recorded = status is not None and status.get("callback_delivery") == change
        for name in names:
            self._prepared.pop(name, None)
            try:
                if recorded and self._spool.deliveries.commit(name):
                    self._woken(name)
                elif not recorded:
                    self._spool.deliveries.remove(name)
            except OSError:
                continue
        return recorded

    def _drop(self, names: list[str]) -> None:
        for name in names:
            self._prepared.pop(name, None)
            self._spool.deliveries.remove(name)

    def _item(self, event: str, data: dict[str, Any], mask: Mask | None) -> dict[str, Any]:
        """What the change's notifications say, with the tail of the job's log."""
        assert self._notices is not None
        tail = None
        try:
            job = self._spool.jobs.find(str(data.get("job_id")))
            if job is not None:
                with self._spool.jobs.read_log(job) as log:
                    tail = log_tail(log, mask)
        except OSError:
            pass  # no log yet (a job cancelled before it ran): the message says so by its absence
        return self._notices.item(event, data, tail)

    def _prepare_notices(
        self, key: str, sequence: int, change: str, *, targets: tuple[NotifyTarget, ...],
        item: dict[str, Any], condition: dict[str, str],
    ) -> str:  # fmt: skip
        """The change file of a change's notifications (spoold.out.notices), prepared."""
        now = self._clock.now()
        item["timestamp"] = rfc3339(now)
        record = {
            "kind": "notices",
            "delivery_id": change,
            "key": change_key(key),
            "sequence": sequence,
            "event": item["event"],
            "targets": [target.to_dict() for target in targets],
            "item": item,
            "created": now.timestamp(),
            "condition": condition,
            "host": self._host,
        }
        data = encode_record(record)
        name = self._spool.deliveries.prepare(change_key(key), sequence, data)
        self._prepared[name] = data
        return name

    def target_of(self, job_id: str, document: Mapping[str, Any] | None) -> CallbackTarget | None:
        """``target``, for a job accepted before: a problem now is logged, and that part (the
        callback, or the notifications) is not sent; the other still is."""
        notify: tuple[NotifyTarget, ...] = ()
        if self._notices is not None:
            try:
                notify = self._notices.targets(document)
            except CallbackError as exc:  # the config changed since (its mail server gone)
                self._logger.error("job %s sends no notifications: %s", job_id, exc)
        try:
            return self._callback(document, notify)
        except CallbackError as exc:  # intake checked it: the secret changed since
            self._logger.error("job %s sends no callbacks: %s", job_id, exc)
            return CallbackTarget(None, "", notify=notify) if notify else None

    def announce_job(
        self, job: JobDir, event: str, status: JobStatus
    ) -> contextlib.AbstractContextManager[None]:
        """``announce`` for a job whose document is not at hand: its job.yaml is read."""
        from spoold.core.documents import load_document  # noqa: PLC0415 - YAML only where needed

        try:
            data = self._spool.jobs.read_job_file(job, sha256=status.sha256)
            document = load_document(data, "job.yaml")
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
        notify = () if target is None else target.notified("rejected")
        if target is None or not (target.wants("rejected") or notify):
            yield
            return
        key = "rejected-" + stage.rstrip("/").rsplit("/", 1)[-1]
        names = []
        if notify:
            assert self._notices is not None
            item = self._notices.rejection_item(reason, job_id)
            names.append(self._prepare_notices(key, 1, uuid.uuid4().hex, targets=notify,
                                               item=item, condition={"stage": stage}))  # fmt: skip
        if not target.wants("rejected"):
            yield from self._rejection_made(names)
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
        body["delivery_id"] = uuid.uuid4().hex
        try:
            names.append(self._prepare(target, key, 1, body, {"stage": stage}))
        except BaseException:
            self._drop(names)
            raise
        yield from self._rejection_made(names)

    def _rejection_made(self, names: list[str]) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self._drop(names)
            raise
        for name in names:
            self._commit(name)

    def settle_job(self, job_id: str, sequence: int, delivery: str | None = None) -> None:
        """Commit the job's delivery ``sequence`` if its last owner left it prepared.

        Called by the job's next owner with the sequence its status.json shows: that change
        was made, so its delivery is valid, if it is the one the status names (``delivery``;
        None: a status of an older spoold, which names none). One that is higher was not, and
        the owner's own prepare replaces it.
        """
        if sequence <= 0:
            return
        for key in (job_id, change_key(job_id)):
            name = f"{key}~{sequence:08d}.prepared"
            if not _made_by(self._spool.deliveries.read(name), delivery):
                continue
            if self._spool.deliveries.commit(name):
                self._woken(name)

    def settle(self, name: str) -> bool:
        """Decide one prepared delivery by the state it depends on; True if it was committed."""
        record = self._spool.deliveries.read(name)
        if record is None:
            return False
        condition = record.get("condition") or {}
        made = False
        if "stage" in condition:
            made = self._spool.stages.decided(str(condition["stage"]))
        elif "job" in condition:
            with contextlib.suppress(SpooldError, OSError, ValueError):
                job = self._spool.jobs.find(str(condition["job"]))
                if job is not None:
                    made = _recorded(record, self._spool.jobs.read_status(job))
        if made:
            self._spool.deliveries.commit(name)
            self._woken(name)
        else:
            self._spool.deliveries.remove(name)
        return made

    def settle_all(self, hosts: frozenset[str] | None = None) -> tuple[int, int]:
        """Before stages are recovered: decide every prepared delivery this host left, at
        start, or (``hosts``) those hosts found stale or gone left (made, dropped).

        Another host's may be a change under way while it lives (the sender settles those
        once it is found stale). Once its stages go back to incoming/, a job file taken again
        would find its first delivery still prepared and be refused as a duplicate: seen in
        the three-host run, a host cut off between the prepare and the place."""
        made = dropped = 0
        for name in self._spool.deliveries.names():
            if not name.endswith(".prepared"):
                continue
            record = self._spool.deliveries.read(name)
            if record is None:
                continue
            if not (self.written_here(record) if hosts is None else record.get("host") in hosts):
                continue
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
        body.update(timestamp=rfc3339(now), sequence=sequence)
        body.setdefault("delivery_id", uuid.uuid4().hex)  # a change's own, where it has one
        payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        record = {
            "delivery_id": body["delivery_id"],
            "key": key,
            "sequence": sequence,
            "event": body["event"],
            "url": str(target.url),
            "timestamp": stamp,
            "signature": sign(target.secret, stamp, payload),
            "body": payload.decode(),
            "created": now.timestamp(),
            "condition": condition,
            "tries": 0,
            "next_try": now.timestamp(),
            "last_error": None,
            "host": self._host,
        }
        data = encode_record(record)
        name = self._spool.deliveries.prepare(key, sequence, data, exclusive=exclusive)
        self._prepared[name] = data
        return name

    def written_here(self, record: Mapping[str, Any] | None) -> bool:
        """Whether this host wrote the delivery (one of an older spoold names no host)."""
        return record is not None and record.get("host") in (None, "", self._host)

    @property
    def host(self) -> str:
        """This host's id, as its deliveries name it."""
        return self._host

    def _commit(self, name: str) -> None:
        self._spool.deliveries.commit(name, self._prepared.pop(name, None))
        self._woken(name)

    def _woken(self, prepared: str) -> None:
        if self._wake is not None:
            self._wake(prepared)
            self._wake(committed_name(prepared))


def numbered(status: JobStatus) -> tuple[str, dict[str, Any]]:
    """The id of ``status``'s next change and ``status`` as ``announce`` numbers it for that
    change, for a caller that must write it before the delivery is prepared (intake: into
    stages made durable together, before any of their deliveries); it passes the id on to
    ``announce`` (``change``), which then writes the same numbers."""
    change = uuid.uuid4().hex
    data = status.to_dict()
    data.update(callback_sequence=status.callback_sequence + 1, callback_delivery=change)
    return change, data


def encode_record(record: dict[str, Any]) -> bytes:
    """A delivery file's bytes."""
    return (json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


def _recorded(record: Mapping[str, Any], status: Mapping[str, Any]) -> bool:
    """Whether a job's status records the change of a delivery left prepared: it names that
    change (``callback_delivery``). A status of an older spoold names none: a sequence at the
    delivery's or past it is all it says, and says made.

    A later sequence proves nothing where the status names a change. Each change commits
    first what the one before it left prepared, if the status names it (``settle_job``), so
    one still prepared below the change named was never made: a duplicate's ``accepted``
    (refused: the id was another job's, which ran on), or the notice or callback of a change
    that another owner made again at its sequence with the other kind only."""
    delivery = status.get("callback_delivery")
    if delivery is None:
        return int(status.get("callback_sequence") or 0) >= int(record["sequence"])
    return _made_by(record, delivery)


def _made_by(record: Mapping[str, Any] | None, delivery: str | None) -> bool:
    """Whether a prepared delivery is the one whose change a status records (``delivery``,
    its ``callback_delivery``; None: a status that names none, of an older spoold)."""
    return record is not None and (delivery is None or record.get("delivery_id") == delivery)
