"""What a notification is made of, decided where the change of state is made.

A change a job's targets want (``notify:``, else the config's defaults) is written into outbox/
beside its callback, in the same prepare/commit (``spoold.out.outbox``), as one *change file*:
``_n.<key>~<sequence>``, keyed like the job's callbacks so that the job's next owner can settle
it by name. It holds the targets and the *item*: what every message about it says (job, event,
state, error, host, a link to the job's page, the masked tail of the log). ``spoold.out.notify``
splits it into one held notice per target (``_t.<target>.<key>~<sequence>``), folds, sends.

Every name spoold.out.notify owns in outbox/ starts with ``_`` (no job id does): the callback
sender leaves them alone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import IO, TYPE_CHECKING, Any, NamedTuple
from urllib.parse import quote

from spoold.core.config import Config, NotifySettings, NotifyTarget, parse_notify
from spoold.core.errors import ConfigError, NotifyError
from spoold.core.joblog import split_line

if TYPE_CHECKING:
    from spoold.core.spool.deliveries import Deliveries

#: Every outbox/ name of the notifications starts with this (never a job id, nor "rejected-").
PREFIX = "_"
#: A change's notifications, as prepared and committed with it: ``_n.<key>~<sequence>``.
CHANGE = "_n."
#: One target's notice, held until sent: ``_t.<target id>.<key>~<sequence>``.
HELD = "_t."
#: When a target's window closes, per host: ``_w.<host>.<target id>~00000000``.
WINDOW = "_w."
#: The tail of a job's log a notification carries: at most this many lines, and bytes read.
TAIL_LINES = 50
TAIL_BYTES = 16 * 1024

Mask = Callable[[dict[str, Any]], dict[str, Any]]


def is_notification(name: str) -> bool:
    """Whether an outbox/ name is one of the notifications' (not a callback delivery)."""
    return name.startswith(PREFIX)


class OutboxCount(NamedTuple):
    """What outbox/ holds, by kind: what ``spoold status`` says and /metrics gives."""

    callbacks_waiting: int
    notifications_waiting: int  # held notices, and changes not yet split into them
    callbacks_given_up: int
    notifications_given_up: int


def _kinds(names: list[str]) -> tuple[int, int]:
    """(callbacks, notifications) among committed outbox/ names. A prepared one is a change
    under way, not a delivery yet; a window only says when its target may be sent to again."""
    callbacks = notifications = 0
    for name in names:
        if name.endswith(".prepared") or name.startswith(WINDOW):
            continue
        if is_notification(name):
            notifications += 1
        else:
            callbacks += 1
    return callbacks, notifications


def count_outbox(deliveries: Deliveries) -> OutboxCount:
    """Callbacks and notifications waiting in outbox/ and given up in outbox/failed/, each
    kind apart (PermissionError where this user may not look)."""
    waiting = _kinds(deliveries.names())
    given_up = _kinds(deliveries.names("failed"))
    return OutboxCount(waiting[0], waiting[1], given_up[0], given_up[1])


def change_key(key: str) -> str:
    """The outbox key of the change files of a job (or of a rejection's key)."""
    return CHANGE + key


def target_id(target: NotifyTarget) -> str:
    """A target's id: where it goes (not ``on:``): two jobs' targets alike share one window."""
    where = {k: v for k, v in target.to_dict().items() if k != "on"}
    data = json.dumps(where, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def job_link(config: Config, job_id: str) -> str | None:
    """The URL of the job's page, when the API serves it (``api.public_url``, else its listen
    address, with this host's name for a wildcard one); None without the API."""
    api = config.api
    if api is None:
        return None
    base = api.public_url
    if not base:
        host = config.hostname if api.host in ("0.0.0.0", "::", "") else api.host  # noqa: S104
        host = f"[{host}]" if ":" in host else host
        base = f"{api.scheme}://{host}:{api.port}"
    return f"{base}/jobs/{quote(job_id, safe='')}"


class Notices:
    """Decides a change's notifications: who hears of it, and what they are told."""

    def __init__(
        self, settings: NotifySettings, *, hostname: str,
        link: Callable[[str], str | None] = lambda _job_id: None,
    ) -> None:  # fmt: skip
        self._settings = settings
        self._hostname = hostname
        self._link = link

    @classmethod
    def for_config(cls, config: Config) -> Notices:
        """As a process with this config decides them."""
        return cls(config.notify, hostname=config.hostname,
                   link=lambda job_id: job_link(config, job_id))  # fmt: skip

    def targets(self, document: Mapping[str, Any] | None) -> tuple[NotifyTarget, ...]:
        """A job's targets: its own ``notify:`` (which replaces the config's), else the config's.

        NotifyError (a CallbackError) for a list that cannot be used: intake refuses such a job.
        """
        if document is None or "notify" not in document:
            return self._settings.defaults
        try:
            targets = parse_notify(document["notify"])
        except ConfigError as exc:
            raise NotifyError(str(exc)) from None
        if self._settings.mail is None and any(t.kind == "email" for t in targets):
            raise NotifyError(
                "notify: email targets need a mail server, and the config names none (mail:)"
            )
        return targets

    def item(self, event: str, status: Mapping[str, Any], tail: str | None) -> dict[str, Any]:
        """What every message about a job's change says (``status``: masked already)."""
        attempts = status.get("attempts") or []
        job_id = str(status.get("job_id"))
        return {
            "job_id": job_id,
            "event": event,
            "state": status.get("state"),
            "error": status.get("error"),
            "exit_code": status.get("exit_code"),
            "attempt": attempts[-1].get("number") if attempts else 0,
            "executor": status.get("executor"),
            "host": self._hostname,
            "link": self._link(job_id),
            "next_attempt_at": status.get("next_attempt_at") if event == "retrying" else None,
            "log_tail": tail,
        }

    def rejection_item(self, reason: Mapping[str, Any], job_id: str | None) -> dict[str, Any]:
        """What every message about a rejected file says."""
        return {
            "job_id": job_id,
            "event": "rejected",
            "state": "rejected",
            "error": reason.get("reason"),
            "exit_code": None,
            "attempt": 0,
            "executor": None,
            "host": self._hostname,
            "link": None,
            "file": reason.get("file"),
            "code": reason.get("code"),
            "log_tail": None,
        }


def log_tail(log: IO[bytes], mask: Mask | None) -> str:
    """The last ``TAIL_LINES`` lines of a job's log (from at most its last ``TAIL_BYTES``),
    masked: the log holds no secret, and ``mask`` (the job's) makes sure."""
    size = log.seek(0, 2)
    start = max(size - TAIL_BYTES, 0)
    log.seek(start)
    text = log.read(TAIL_BYTES).decode("utf-8", "replace")
    lines = text.splitlines()
    if start and lines:
        lines = lines[1:]  # cut at a byte, not at a line
    lines = lines[-TAIL_LINES:]
    if mask is not None:  # the texts, not spoold's stamps: a secret "2" is not in a year
        split = [split_line(line) for line in lines]
        texts = mask({"log": [text for _, text in split]})["log"]
        lines = [head + str(text) for (head, _), text in zip(split, texts, strict=True)]
    return "\n".join(lines)
