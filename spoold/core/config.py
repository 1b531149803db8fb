"""The configuration: a frozen Config built from config.yaml, the environment and flags.

Every ``spoold`` command loads it, so this module is light: the standard library, the units
and the retention rules. YAML is read only when there is a config file and no parsed copy of
its text (spoold.core.parsed), and the JSON Schema check (jsonschema) runs only where it is asked
for (``check_schema``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from spoold.core.errors import ConfigError
from spoold.core.ids import HOST_ID
from spoold.core.parsed import recall, remember
from spoold.core.retention import Retention
from spoold.core.secrets import is_unquoted_field
from spoold.core.units import parse_duration, parse_size

if TYPE_CHECKING:
    from spoold.core.policy import Policy
    from spoold.core.retry import RetryPolicy

SEARCH_PATH = (Path("config.yaml"), Path("/etc/spoold/config.yaml"))
#: Enough of a mail address to refuse what is surely none (the server decides the rest).
_ADDRESS = re.compile(r"[^@\s<>]+@[^@\s<>]+")
DEFAULT_SPOOL = Path("spool")


def _hostname() -> str:
    """This host's name, as ``socket.gethostname()`` says it (without importing socket)."""
    return os.uname().nodename


def _worker_id(hostname: str) -> str:
    return f"{hostname}-{os.getpid()}"


# The settings are NamedTuples, not dataclasses: importing dataclasses (and with it inspect)
# costs about a fifth of a light CLI command's start (issue 16: ``spoold status`` under 0.1 s).
# Their mapping defaults are shared plain dicts, never changed (a mappingproxy cannot be pickled,
# and a Config is sent to the worker processes).
class CallbackSettings(NamedTuple):
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
        """From the config's ``callbacks:`` mapping; ValueError or TypeError if it is not one."""
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
        names = {"timeout": "timeout", "initial": "backoff.initial", "maximum": "backoff.max"}
        for key, seconds in parsed.items():
            if key in names:
                _at_least(f"callbacks.{names[key]}", seconds)
        return defaults._replace(
            workers=int(document.get("workers", defaults.workers)),
            per_host=int(document.get("per_host", defaults.per_host)),
            multiplier=float(backoff.get("multiplier", defaults.multiplier)),
            **parsed,
        )

    def policy(self) -> RetryPolicy:
        """The backoff between tries; jittered, so that a receiver back up is not stampeded."""
        from spoold.core.retry import RetryPolicy  # noqa: PLC0415 - only the sender backs off

        return RetryPolicy(
            initial=self.initial, multiplier=self.multiplier, maximum=self.maximum, jitter=True
        )


class ApiSettings(NamedTuple):
    """The HTTP API (``api:`` in the config): where it listens, and how."""

    host: str = "127.0.0.1"
    port: int = 8420
    certfile: Path | None = None
    keyfile: Path | None = None
    #: A client silent this long (idle keep-alive, a slow request) is disconnected.
    client_timeout: float = 30.0
    #: Where clients reach the API (Location headers); None: as each request came.
    public_url: str | None = None
    #: A TLS handshake not over this long after its connection was made is cut off.
    handshake_timeout: float = 10.0
    #: The peers (addresses, networks) whose X-Forwarded-For and -Proto are believed.
    trusted_proxies: tuple[str, ...] = ()

    @classmethod
    def from_document(cls, document: Mapping[str, Any], base: Path) -> ApiSettings | None:
        """From the config's ``api:`` mapping (None: ``enabled: false``); ConfigError naming
        the key of what is wrong. Paths are relative to the config file's directory."""
        if document.get("enabled", True) is False:
            return None
        found: dict[str, Any] = {}
        if "listen" in document:
            host, sep, port = str(document["listen"]).rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"key api.listen: {document['listen']!r} is not host:port")
            found["host"], found["port"] = host.removeprefix("[").removesuffix("]"), int(port)
        for key in ("certfile", "keyfile"):
            if key in document:
                found[key] = config_path(f"api.{key}", document[key], base)
        if ("certfile" in found) != ("keyfile" in found):
            raise ConfigError("key api.certfile: HTTPS needs both certfile and keyfile")
        for key in ("client_timeout", "handshake_timeout"):
            if key in document:
                try:
                    found[key] = parse_duration(document[key])
                except (TypeError, ValueError) as exc:
                    raise ConfigError(f"key api.{key}: {exc}") from None
                _at_least(f"api.{key}", found[key])
        if document.get("public_url"):
            found["public_url"] = str(document["public_url"]).rstrip("/")
        if "trusted_proxies" in document:
            found["trusted_proxies"] = _trusted_proxies(document["trusted_proxies"])
        return cls(**found)

    @property
    def scheme(self) -> str:
        return "https" if self.certfile else "http"


def _trusted_proxies(value: object) -> tuple[str, ...]:
    """``api.trusted_proxies`` as written, each an address or a network (host bits clear), or
    ConfigError: uvicorn would take anything else as a name no peer ever has, and ``*`` as
    every peer (then any client could say who it is)."""
    import ipaddress  # noqa: PLC0415 - only with proxies

    if not isinstance(value, list):
        raise ConfigError("key api.trusted_proxies: a list of addresses or networks, e.g. "
                          "[127.0.0.1, ::1]")  # fmt: skip
    for item in value:
        try:
            if "/" in str(item):
                ipaddress.ip_network(str(item))
            else:
                ipaddress.ip_address(str(item))
        except ValueError as exc:
            raise ConfigError(f"key api.trusted_proxies: {str(item)!r} is not an address or a "
                              f"network ({exc})") from None  # fmt: skip
    return tuple(str(item) for item in value)


# -- notifications (``notify:``, ``mail:``, ``notify_window:``) ----------------------------------

#: The events a notification target may ask for (``on:``), and what it gets without one.
NOTIFY_EVENTS = ("failed", "succeeded", "retrying", "cancelled", "rejected")
NOTIFY_DEFAULT_ON = frozenset({"failed"})
#: The message shapes of a webhook target.
WEBHOOK_FORMATS = ("slack", "mattermost", "teams", "json")


class NotifyTarget(NamedTuple):
    """One place a job's notifications go: mail to ``to``, or a chat/JSON webhook at ``url``."""

    kind: str  # "email" | "webhook"
    to: tuple[str, ...] = ()
    url: str = ""  # may hold ${secret:NAME}: resolved only when sent
    format: str = "json"
    on: frozenset[str] = NOTIFY_DEFAULT_ON

    def wants(self, event: str) -> bool:
        """Whether this target hears of ``event``."""
        return event in self.on

    def to_dict(self) -> dict[str, Any]:
        """As outbox/ keeps it (and as ``from_dict`` reads it back)."""
        found: dict[str, Any] = {"kind": self.kind, "on": sorted(self.on)}
        if self.kind == "email":
            found["to"] = list(self.to)
        else:
            found.update(url=self.url, format=self.format)
        return found

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NotifyTarget:
        """What ``to_dict`` wrote."""
        return cls(
            str(data["kind"]), tuple(str(a) for a in data.get("to") or ()),
            str(data.get("url") or ""), str(data.get("format") or "json"),
            frozenset(str(e) for e in data.get("on") or NOTIFY_DEFAULT_ON),
        )  # fmt: skip


def parse_notify(value: Any, key: str = "notify") -> tuple[NotifyTarget, ...]:
    """A ``notify:`` list (a job's or the config's) as targets; ConfigError naming the key of
    what is wrong (``key``: where the list is, e.g. ``notify``)."""
    if value is None:
        return ()
    entries = _of_kind(key, value, list, "a list of targets (email: or webhook:)")
    return tuple(_notify_target(entry, f"{key}.{n}") for n, entry in enumerate(entries))


def _notify_target(entry: Any, key: str) -> NotifyTarget:
    entry = _of_kind(key, entry, dict, "a mapping with email: or webhook:")
    kinds = [kind for kind in ("email", "webhook") if kind in entry]
    if len(kinds) != 1:
        raise ConfigError(f"key {key}: give exactly one of email: or webhook:")
    unknown = set(entry) - {"email", "webhook", "on"}
    if unknown:
        raise ConfigError(f"unknown key {key}.{sorted(unknown)[0]} (known: email, webhook, on)")
    on = NOTIFY_DEFAULT_ON
    if "on" in entry:
        events = _of_kind(f"{key}.on", entry["on"], list, "a list of events")
        if not events:
            raise ConfigError(f"key {key}.on: name at least one event")
        if bad := [e for e in events if e not in NOTIFY_EVENTS]:
            raise ConfigError(
                f"key {key}.on: {bad[0]!r} is not an event ({', '.join(NOTIFY_EVENTS)})"
            )
        on = frozenset(events)
    kind = kinds[0]
    block = _of_kind(f"{key}.{kind}", entry[kind], dict, "a mapping")
    if kind == "email":
        unknown = set(block) - {"to"}
        if unknown:
            raise ConfigError(f"unknown key {key}.email.{sorted(unknown)[0]} (known: to)")
        raw = block.get("to")
        addresses = [raw] if isinstance(raw, str) else raw
        addresses = _of_kind(f"{key}.email.to", addresses, list, "an address or a list of them")
        if not addresses or not all(
            isinstance(a, str) and _ADDRESS.fullmatch(a) for a in addresses
        ):
            raise ConfigError(f"key {key}.email.to: {raw!r} is not a list of mail addresses")
        return NotifyTarget("email", to=tuple(addresses), on=on)
    unknown = set(block) - {"url", "format"}
    if unknown:
        raise ConfigError(f"unknown key {key}.webhook.{sorted(unknown)[0]} (known: format, url)")
    url = _of_kind(f"{key}.webhook.url", block.get("url"), str, "a URL")
    if not url.startswith(("http://", "https://", "${secret:")):
        raise ConfigError(
            f"key {key}.webhook.url: {url!r} is not an http(s) URL (or ${{secret:NAME}} holding one)"
        )
    form = block.get("format", "json")
    if form not in WEBHOOK_FORMATS:
        raise ConfigError(f"key {key}.webhook.format: {form!r} is not one of "
                          f"{', '.join(WEBHOOK_FORMATS)}")  # fmt: skip
    return NotifyTarget("webhook", url=url, format=str(form), on=on)


def is_loopback(host: object) -> bool:
    """Whether ``host`` names this host's loopback: ``localhost``, 127.0.0.0/8 or ::1."""
    import ipaddress  # noqa: PLC0415 - only for a server without TLS

    text = str(host).strip("[]")
    if text == "localhost":
        return True
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return False


class MailSettings(NamedTuple):
    """The SMTP server notifications are mailed through (``mail:`` in the config)."""

    host: str
    port: int = 587
    #: ``starttls`` (upgrade a plain connection, port 587), ``tls`` (TLS from the start, 465)
    #: or ``none`` (plain: only for a relay on loopback).
    security: str = "starttls"
    user: str | None = None
    #: The name of the file in secrets_dir that holds the password (read at each send).
    password_secret: str | None = None
    sender: str = "spoold@localhost"
    #: A CA bundle to verify the server with, beside the system's (a private CA).
    ca_file: Path | None = None

    @classmethod
    def from_document(cls, document: Mapping[str, Any], base: Path, hostname: str) -> MailSettings:
        """From the config's ``mail:`` mapping; ConfigError naming the key of what is wrong."""
        known = {"host", "port", "security", "user", "password_secret", "from", "ca_file"}
        if unknown := sorted(set(document) - known):
            raise ConfigError(f"unknown key mail.{unknown[0]} (known: {', '.join(sorted(known))})")
        if "host" not in document:
            raise ConfigError("key mail.host: the SMTP server to send notifications through")
        security = document.get("security", "starttls")
        if security not in ("starttls", "tls", "none"):
            raise ConfigError(f"key mail.security: {security!r} is not starttls, tls or none")
        port = _of_kind("mail.port", document.get("port", 465 if security == "tls" else 587),
                        int, "a port number")  # fmt: skip
        if not 0 < port < 65536:
            raise ConfigError(f"key mail.port: {port} is not a port number")
        user = document.get("user")
        secret = document.get("password_secret")
        if (user is None) != (secret is None):
            raise ConfigError("key mail.user: a login needs both user and password_secret")
        host = document["host"]
        if security == "none" and user is not None:
            raise ConfigError(
                "key mail.user: a login goes only over TLS: with security: none the password "
                "would cross the network as it is (security: starttls or tls)"
            )
        if security == "none" and not is_loopback(host):
            raise ConfigError(
                f"key mail.security: none is for a relay on loopback, not {host!r}: mail "
                "would cross the network unencrypted (security: starttls or tls)"
            )
        if secret is not None:
            from spoold.core.secrets import NAME_RULE, SECRET_NAME  # noqa: PLC0415

            if not isinstance(secret, str) or not SECRET_NAME.fullmatch(secret):
                raise ConfigError(f"key mail.password_secret: {_kind_of(secret)}: {NAME_RULE}")
        sender = _of_kind("mail.from", document.get("from", f"spoold@{hostname}"), str,
                          "a mail address")  # fmt: skip
        if not _ADDRESS.fullmatch(sender):
            raise ConfigError(f"key mail.from: {sender!r} is not a mail address")
        ca_file = document.get("ca_file")
        return cls(
            host=_of_kind("mail.host", document["host"], str, "a host name"), port=port,
            security=str(security),
            user=None if user is None else _of_kind("mail.user", user, str, "a user name"),
            password_secret=secret, sender=sender,
            ca_file=None if ca_file is None else config_path("mail.ca_file", ca_file, base),
        )  # fmt: skip


class NotifySettings(NamedTuple):
    """Notifications (``notify:``, ``mail:``, ``notify_window:``)."""

    #: The targets of a job that has no ``notify:`` of its own.
    defaults: tuple[NotifyTarget, ...] = ()
    mail: MailSettings | None = None
    #: One target gets at most one message per window; what comes meanwhile is one digest.
    window: float = 300.0
    #: How long a quiet target's first notice waits for others to join it: a burst of
    #: failures is one digest, not a message and then a digest of the rest.
    wait: float = 10.0


class Config(NamedTuple):
    """Everything the daemon and the CLI need to know, validated at start.

    ``load_config`` names the worker after the process that loads the configuration; the
    defaults of ``worker_id`` and ``hostname`` (for a Config built by hand) are the importing
    process's.
    """

    spool: Path = DEFAULT_SPOOL
    #: What chose ``spool`` over the file's ``spool:`` (``--spool``, ``SPOOLD_SPOOL``); None:
    #: the file (or the default) did. A reload tells a changed ``spool:`` by these two.
    spool_override: str | None = None
    #: What the file's ``spool:`` says, whether or not it is the spool in use.
    file_spool: Path | None = None
    workers: int = 2
    #: Processes the workers are spread over; None: one per core (at most one per worker).
    worker_processes: int | None = None
    #: The longest a worker process with nothing to do stays (spoold.run.pool.Linger); the
    #: next job starts it again. 0: they run as long as the daemon.
    worker_idle_exit: float = 30.0
    watch: str = "auto"
    poll_interval: float = 1.0
    rescan_interval: float = 30.0
    settle_time: float = 2.0
    max_file_size: int = 1024 * 1024
    #: A job's log keeps at most this much of its output (``limits.max_log_size``).
    max_log_size: int | None = 100 * 1024 * 1024
    #: Of one attempt's artifacts, at most this many files and bytes (apparent sizes) are kept
    #: (``limits.max_artifacts``, ``limits.max_artifacts_size``); what passes one is left out.
    max_artifacts: int = 1000
    max_artifacts_size: int = 1024 * 1024 * 1024
    #: At most this many jobs or steps of an executor at once, across all jobs
    #: (``limits.executors``), beyond ``workers``.
    executor_limits: Mapping[str, int] = {}
    workdir: Path | None = None
    logdir: Path | None = None
    global_before_script: tuple[str, ...] = ()
    kill_grace: float = 10.0
    shutdown_grace: float = 30.0
    lease_timeout: float = 60.0
    heartbeat_interval: float = 10.0
    durable: bool = True
    worker_id: str = _worker_id(_hostname())
    hostname: str = _hostname()
    #: ``RUNNER_ID`` (or ``host_id`` in the file): this host's id; empty: the host name.
    runner_id: str = ""
    log_socket: Path | None = None
    log_level: str = "info"
    default_callback_url: str | None = None
    default_callback_secret: str | None = None
    #: How callback deliveries are sent: timeout, backoff, when to give up (``callbacks:``).
    callbacks: CallbackSettings = CallbackSettings()
    #: Where ``${secret:NAME}`` is read from: the file NAME, mode 0600 or stricter.
    secrets_dir: Path | None = None
    #: Which finished jobs are removed, and when (``retention:``); empty keeps everything.
    retention: Retention = Retention()
    #: The users a job may name in ``run_as:``; none by default.
    allowed_run_as: tuple[str, ...] = ()
    #: What local and custom jobs and hooks get of the daemon's environment beyond PATH,
    #: the locale and TZ (``pass_env:``): names, or shell patterns (``AWS_*``).
    pass_env: tuple[str, ...] = ()
    #: Who local and custom jobs, hooks and steps run as when spoold may switch users
    #: (``job_user:``): one account, or one per worker slot so that jobs running at the same
    #: time cannot reach each other. ``root`` only when the config says so. Empty: not named,
    #: one account per slot as ``run.lane.default_job_users`` names them.
    job_users: tuple[str, ...] = ()
    #: What each submitter may use (``policy:``); None: no limits beyond the rest of the config.
    policy: Policy | None = None
    #: The HTTP API (``api:``); None: not served.
    api: ApiSettings | None = None
    #: Each executor's own settings (``executors: {NAME: {...}}``), given to it in RunContext.
    executor_settings: Mapping[str, dict[str, Any]] = {}
    #: Mail and chat notifications (``notify:``, ``mail:``, ``notify_window:``).
    notify: NotifySettings = NotifySettings()
    source: Path | None = None

    @property
    def host_id(self) -> str:
        """This host among those sharing the spool (``RUNNER_ID``, else the host name): its
        heartbeat is hosts/<host_id>, and its leases and deliveries name it."""
        return self.runner_id or self.hostname


#: The config key (or variable) of each Config field whose name is not the key's.
_FIELD_KEYS: Mapping[str, str] = {
    "max_file_size": "limits.max_file_size", "max_log_size": "limits.max_log_size",
    "max_artifacts": "limits.max_artifacts", "max_artifacts_size": "limits.max_artifacts_size",
    "executor_limits": "limits.executors", "executor_settings": "executors",
    "durable": "fsync", "runner_id": "host_id", "job_users": "job_user",
    "log_socket": "RUNNER_LOG_SOCKET",
}  # fmt: skip
_NOTIFY_KEYS: Mapping[str, str] = {
    "defaults": "notify", "mail": "mail", "window": "notify_window", "wait": "notify_wait",
}  # fmt: skip
#: Fields no key sets, or that a reload compares apart (the spool's origin).
_NOT_KEYS = frozenset({"source", "worker_id", "spool_override", "file_spool"})


def changed_keys(old: Config, new: Config) -> list[str]:
    """The config keys whose values differ from ``old`` to ``new``, as the file names them
    (``job_user``, ``limits.max_file_size``; never a field's name, such as ``job_users``)."""
    keys: list[str] = []
    for name in Config._fields:
        if name in _NOT_KEYS or getattr(old, name) == getattr(new, name):
            continue
        if name == "notify":
            keys += [_NOTIFY_KEYS[part] for part in NotifySettings._fields
                     if getattr(old.notify, part) != getattr(new.notify, part)]  # fmt: skip
        else:
            keys.append(_FIELD_KEYS.get(name, name))
    return keys


def find_config_file(explicit: Path | None) -> Path | None:
    """--config, else ./config.yaml, else /etc/spoold/config.yaml, else none."""
    if explicit is not None:
        if explicit.is_dir():
            raise ConfigError(
                f"config file {explicit} is a directory: --config names the file "
                f"(e.g. {explicit / 'config.yaml'})"
            )
        if not os.path.lexists(explicit):
            raise ConfigError(f"config file {explicit} does not exist")
        if not explicit.is_file():
            raise ConfigError(f"config file {explicit} is not a regular file (nor a link to one)")
        return explicit
    return next((p for p in SEARCH_PATH if p.is_file()), None)


def load_config(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    spool: Path | None = None,
    check_schema: bool = True,
) -> Config:
    """Defaults, then the config file, then the environment, then flags; the last one wins.

    ``check_schema=False``: the file is not checked against config.schema.json (loading
    jsonschema takes about 0.1 s), for the commands that only read the spool. Unknown keys
    are then ignored and ranges not enforced, but a key given twice is refused all the same
    (the YAML read refuses it), and a value that cannot be used is still a ConfigError naming
    its key: the full check runs then, to say it as ``spoold run`` would.
    """
    env = os.environ if env is None else env
    found = find_config_file(path)
    document = _read_document(found, env, check_schema=check_schema) if found else {}
    try:
        config = _from_document(document, found)
    except (ConfigError, TypeError, ValueError, AttributeError) as exc:
        if check_schema or found is None:
            raise
        _check_schema(document, found)  # says what is wrong, in the words of the full check
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{found}: cannot use the configuration: {exc}") from exc
    config = _apply_environment(config, env)
    if not HOST_ID.match(config.host_id):
        # It names files in the shared spool (hosts/<id>): no path, no dot file.
        raise ConfigError(
            f"key host_id: {config.host_id!r} (RUNNER_ID, else the host name) is not a usable "
            "host id: letters, digits, '.', '_' and '-', 64 at most, not starting with '.'"
        )
    if spool is not None:
        config = config._replace(spool=spool, spool_override="--spool")
    return config


def _read_document(
    path: Path, env: Mapping[str, str], *, check_schema: bool = True
) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc}") from exc
    document = recall(path, text, env)
    if document is None:
        document = _parse_yaml(path, text)
        remember(path, text, document, env)
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: the configuration must be a mapping of keys to values")
    if check_schema:
        _check_schema(document, path)
    return document


def _parse_yaml(path: Path, text: str) -> Any:
    """The document ``text`` holds; ConfigError if it is no YAML, or gives a key twice in one
    mapping. Here, where every command's read of the file goes (a parsed copy is kept only of
    a text that passed), so that ``status`` refuses what ``run`` and a reload refuse: YAML keeps
    the last of the two silently, and a key added at the end of the shipped file (which sets
    ``api:``, ``job_user:`` and ``spool:`` already) would override the first, or be overridden,
    unsaid; ``status`` would look at another spool than the daemon."""
    import yaml  # noqa: PLC0415 - only where there is a config file, and no parsed copy

    from spoold.core.yaml_keys import UniqueKeysLoader  # noqa: PLC0415 - as yaml

    loader = UniqueKeysLoader(text)
    try:
        document = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc}") from exc
    finally:
        loader.dispose()
    if loader.given_twice:
        from spoold.core.documents import format_path  # noqa: PLC0415 - only to say it

        raise ConfigError("; ".join(
            f"{path}:{twice.line}:{twice.column}: key {format_path(twice.path)}: given twice "
            f"(first on line {twice.first_line}); give each key once"
            for twice in loader.given_twice
        ))  # fmt: skip
    return document


def _check_schema(document: dict[str, Any], path: Path) -> None:
    """ConfigError naming every key config.schema.json refuses, if any."""
    from jsonschema import Draft202012Validator  # noqa: PLC0415 - worker processes never need it

    from spoold.core.documents import load_executor_schema  # noqa: PLC0415

    schema = load_executor_schema("spoold.schemas", "config.schema.json")
    errors = sorted(Draft202012Validator(schema).iter_errors(document), key=lambda e: e.path)
    if errors:
        raise ConfigError(f"{path}: " + "; ".join(_describe(e) for e in errors))


def _describe(error: Any) -> str:
    if error.validator != "additionalProperties" and _holds_secret(
        error.absolute_path, error.instance
    ):
        return _describe_hidden(error)
    if error.validator == "additionalProperties":
        known = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(known))
        where = ".".join(str(p) for p in error.absolute_path)
        names = ", ".join(f"{where + '.' if where else ''}{k}" for k in extra)
        return f"unknown key {names} (known: {', '.join(known)})"
    key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    if error.validator == "oneOf":
        return f"key {key}: {error.instance!r} is not valid ({error.schema.get('description', '')})"
    return f"key {key}: {error.message}"


def _holds_secret(path: Any, instance: Any) -> bool:
    """Whether a key on ``path`` names a secret, or ``instance`` holds one at any depth."""
    # A config error goes to stderr and spoold's log, which more people read than the config.
    if any(isinstance(key, str) and is_unquoted_field(key) for key in path):
        return True
    if isinstance(instance, dict):
        return any(_holds_secret([key], value) for key, value in instance.items())
    if isinstance(instance, list):
        return any(_holds_secret((), item) for item in instance)
    return False


def _describe_hidden(error: Any) -> str:
    """What is wrong with a value that holds a secret, said without the value."""
    key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    kind = _kind_of(error.instance)
    if error.validator == "type":
        wanted = error.validator_value
        wanted = " or ".join(wanted) if isinstance(wanted, list) else wanted
        return f"key {key}: {kind} is not of type {wanted!r} (not shown: it holds a secret)"
    rule = error.schema.get("description") or f"the schema's {error.validator!r} rule"
    return f"key {key}: its value ({kind}, not shown: it holds a secret) does not fit: {rule}"


def _kind_of(value: Any) -> str:
    """``value``'s kind in words (``an integer``), for a message that must not show it."""
    if isinstance(value, bool):
        return "a boolean"
    kinds = {int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a mapping", type(None): "null"}  # fmt: skip
    return kinds.get(type(value), f"a {type(value).__name__}")


def _from_document(doc: dict[str, Any], source: Path | None) -> Config:
    """The Config a config file's mapping says; ConfigError naming the key of a value that is
    not of the kind the key takes (with the schema skipped, this is all that checks them)."""
    here = _hostname()
    values: dict[str, Any] = {
        "source": source, "hostname": here, "worker_id": _worker_id(here),
    }  # fmt: skip
    for key in ("workers", "worker_processes"):
        if key in doc:
            values[key] = _of_kind(key, doc[key], int, "a whole number")
    for key in (
        "watch", "worker_id", "hostname", "log_level",
        "default_callback_url", "default_callback_secret", "host_id",
    ):  # fmt: skip
        if key in doc:
            values[key] = _of_kind(key, doc[key], str, "a string")
    if "host_id" in values:
        values["runner_id"] = values.pop("host_id")
    if not str(doc.get("default_callback_url") or "http://").startswith(("http://", "https://")):
        raise ConfigError("key default_callback_url: callbacks go to an http:// or https:// URL")
    if doc.get("default_callback_url") and not doc.get("default_callback_secret"):
        raise ConfigError(
            "key default_callback_url: callbacks are signed; set default_callback_secret too"
        )
    if "callbacks" in doc:
        callbacks = _of_kind("callbacks", doc["callbacks"], dict, "a mapping")
        values["callbacks"] = _parsed("callbacks", callbacks, CallbackSettings.from_document)
    for key in (
        "poll_interval", "rescan_interval", "settle_time", "kill_grace",
        "shutdown_grace", "lease_timeout", "heartbeat_interval", "worker_idle_exit",
    ):  # fmt: skip
        if key in doc:
            values[key] = _parsed(key, doc[key], parse_duration)
            _at_least(key, values[key])
    limits = _of_kind("limits", doc.get("limits", {}), dict, "a mapping")
    for key in ("max_file_size", "max_log_size", "max_artifacts_size"):
        if key in limits:
            values[key] = _parsed(f"limits.{key}", limits[key], parse_size)
    if "max_artifacts" in limits:
        values["max_artifacts"] = _of_kind(
            "limits.max_artifacts", limits["max_artifacts"], int, "a whole number"
        )
    if "executors" in limits:
        caps = _of_kind("limits.executors", limits["executors"], dict, "a mapping")
        values["executor_limits"] = {
            str(name): _of_kind(f"limits.executors.{name}", cap, int, "a whole number")
            for name, cap in caps.items()
        }
    if "fsync" in doc:
        values["durable"] = _of_kind("fsync", doc["fsync"], bool, "true or false")
    base = source.parent if source else Path.cwd()
    for key in ("spool", "workdir", "logdir", "secrets_dir"):
        if key in doc:
            values[key] = config_path(key, doc[key], base)
    if "spool" in values:
        values["file_spool"] = values["spool"]
    if "retention" in doc:
        retention = _of_kind("retention", doc["retention"], dict, "a mapping")
        values["retention"] = _parsed("retention", retention, Retention.from_document)
    if "allowed_run_as" in doc:
        users = _of_kind("allowed_run_as", doc["allowed_run_as"], list, "a list of user names")
        values["allowed_run_as"] = tuple(
            _of_kind("allowed_run_as", user, str, "a list of user names") for user in users
        )
    if "pass_env" in doc:
        names = _of_kind("pass_env", doc["pass_env"], list, "a list of variable names")
        values["pass_env"] = tuple(
            _of_kind("pass_env", name, str, "a list of variable names") for name in names
        )
    if "job_user" in doc:
        named = doc["job_user"]
        names = (
            [named]
            if isinstance(named, str)
            else _of_kind("job_user", named, list, "a user name or a list of them")
        )
        values["job_users"] = tuple(
            _of_kind("job_user", name, str, "a user name or a list of them") for name in names
        )
        if not values["job_users"]:
            raise ConfigError("key job_user: name at least one user")
    if "policy" in doc:
        from spoold.core.policy import Policy  # noqa: PLC0415 - only a config that has one

        values["policy"] = Policy.from_document(doc["policy"], _host_path_pattern)
    if "api" in doc:
        api = _of_kind("api", doc["api"] or {}, dict, "a mapping")
        values["api"] = ApiSettings.from_document(api, base)
    if "executors" in doc:
        executors = _of_kind("executors", doc["executors"], dict, "a mapping")
        values["executor_settings"] = {
            str(name): _executor_settings(str(name), settings, base)
            for name, settings in executors.items()
        }
    values["notify"] = _notify_settings(doc, base, here)
    script = doc.get("global_before_script")
    if script is not None:
        if isinstance(script, str):
            values["global_before_script"] = (script,)
        else:
            lines = _of_kind("global_before_script", script, list, "a command or a list of them")
            values["global_before_script"] = tuple(
                _of_kind("global_before_script", line, str, "a command or a list of them")
                for line in lines
            )
    config = Config(**values)
    _check_lease(config, doc)
    return config


#: The least each duration may be, in seconds: a loop paced by one of these at 0 would spin (a
#: ``poll_interval`` of 0 kept a core busy with nothing to do); a timeout of 0 would fail every
#: try. Not advice: a floor. The durations not named here may be 0 (worker_idle_exit: 0 keeps
#: the worker processes; kill_grace 0: SIGKILL at once; ...).
DURATION_FLOORS: Mapping[str, float] = {
    "poll_interval": 0.01,
    "rescan_interval": 0.01,
    "heartbeat_interval": 0.01,
    "lease_timeout": 0.01,
    "callbacks.timeout": 0.001,
    "callbacks.backoff.initial": 0.001,
    "callbacks.backoff.max": 0.001,
    "api.client_timeout": 0.001,
    "api.handshake_timeout": 0.001,
}


def _at_least(key: str, seconds: float) -> None:
    """ConfigError naming ``key`` if ``seconds`` is under its floor (``DURATION_FLOORS``)."""
    floor = DURATION_FLOORS.get(key)
    if floor is not None and seconds < floor:
        least = f"{floor * 1000:g}ms" if floor < 1 else f"{floor:g}s"
        raise ConfigError(
            f"key {key}: {seconds:g}s is too short: at least {least} (a loop paced by it "
            "would spin, or every try would fail at once)"
        )


def _check_lease(config: Config, doc: Mapping[str, Any]) -> None:
    """lease_timeout must exceed heartbeat_interval: a lease renewed less often than it goes
    stale is taken over from a worker that is alive, and its job run twice."""
    if config.lease_timeout > config.heartbeat_interval:
        return

    def said(key: str, seconds: float) -> str:
        return f"{seconds:g}s" + ("" if key in doc else " (the default)")

    raise ConfigError(
        f"key lease_timeout: {said('lease_timeout', config.lease_timeout)} must exceed "
        f"heartbeat_interval {said('heartbeat_interval', config.heartbeat_interval)} (several "
        "times over, 6x by default): a lease renewed less often than it goes stale would be "
        "taken over from a live worker, and its job run twice"
    )


#: The settings of the shipped executors that name a path of this host (``executors: {NAME:
#: {...}}``): resolved as every path of the config is, where the executor would take ``~`` and
#: a relative path literally (lexware's rate_dir) or from wherever the worker runs. A plugin's
#: settings are handed over as written.
EXECUTOR_PATH_SETTINGS: Mapping[str, tuple[str, ...]] = {
    "ssh": ("known_hosts",),
    "lexware": ("rate_dir",),
}


def _executor_settings(name: str, settings: Any, base: Path) -> dict[str, Any]:
    """One executor's settings, its paths (``EXECUTOR_PATH_SETTINGS``) resolved; as strings,
    as the executors read them."""
    found = dict(_of_kind(f"executors.{name}", settings, dict, "a mapping"))
    for key in EXECUTOR_PATH_SETTINGS.get(name, ()):
        if found.get(key) is not None:
            found[key] = str(config_path(f"executors.{name}.{key}", found[key], base))
    return found


def _notify_settings(doc: Mapping[str, Any], base: Path, hostname: str) -> NotifySettings:
    """``notify:``, ``mail:``, ``notify_window:`` and ``notify_wait:``: defaults that mail
    need ``mail:``."""
    mail = None
    if "mail" in doc:
        block = _of_kind("mail", doc["mail"], dict, "a mapping")
        mail = MailSettings.from_document(block, base, hostname)
    defaults = parse_notify(doc.get("notify"))
    if mail is None and any(target.kind == "email" for target in defaults):
        raise ConfigError("key notify: email targets need the config's mail: server (mail.host)")
    window, wait = NotifySettings().window, NotifySettings().wait
    if "notify_window" in doc:
        window = _parsed("notify_window", doc["notify_window"], parse_duration)
    if "notify_wait" in doc:
        wait = _parsed("notify_wait", doc["notify_wait"], parse_duration)
    return NotifySettings(defaults, mail, window, wait)


def config_path(key: str, value: Any, base: Path) -> Path:
    """A path-valued key's path: ``~`` and ``~user`` at its start expanded (``config_home``),
    then a relative path taken from ``base`` (the config file's directory). ConfigError naming
    the key of a value that is no string, or of a ``~user`` with no such user."""
    return base / config_home(key, _of_kind(key, value, str, "a path"))


def config_home(key: str, text: str, *, pattern: bool = False) -> str:
    """``text`` with ``~`` or ``~user`` at its start expanded (``expand_home``), for every
    path the config names, patterns (``pattern``) included; ConfigError naming ``key`` of a
    ``~user`` with no such user."""
    expanded = expand_home(text, pattern=pattern)
    if expanded is None:
        raise ConfigError(
            f"key {key}: {text!r} starts with ~{_home_user(text)}, but {no_home(text)}: "
            "write the path in full"
        )
    return expanded


def no_home(text: str) -> str:
    """Why ``expand_home`` could not expand ``text``: whose home is not known."""
    user = _home_user(text)
    return f"there is no user {user!r} on this host" if user else "no home is known"


def _home_user(text: str) -> str:
    """The user of a ``~user`` at the start of ``text``; "" for a bare ``~``."""
    return text.partition("/")[0][1:]


def _host_path_pattern(key: str, pattern: str) -> str:
    """A policy's ``host_paths`` pattern, ``~`` expanded (the job's paths are so too)."""
    return config_home(key, pattern, pattern=True)


def expand_home(text: str, *, pattern: bool = False) -> str | None:
    """``text`` with ``~`` or ``~user`` at its start replaced by that home directory, as the
    shell and ``Path.expanduser`` would (``~`` is ``$HOME``, else the user database's); None
    for a ``~user`` with no such user, or ``~`` with no home known. The one expansion of the
    config's paths and of the host paths a job names, so that a policy's ``~/data/*`` matches
    a job's ``~/data/key``. ``pattern``: ``text`` is a glob (fnmatch), and the home's own
    ``*``, ``?`` and ``[`` are matched as written."""
    if not text.startswith("~"):
        return text
    expanded = os.path.expanduser(text)  # noqa: PTH111 - the rest stays as written, as a glob's
    if expanded.startswith("~"):  # what expanduser cannot expand, it leaves as it was
        return None
    if not pattern:
        return expanded
    from glob import escape  # noqa: PLC0415 - only a pattern with a home in it

    rest = text[1 + len(_home_user(text)) :]  # after "~user"
    return escape(expanded[: len(expanded) - len(rest)]) + rest


def _of_kind(key: str, value: Any, kind: type, what: str) -> Any:
    """``value`` if it is a ``kind`` (true and false are no numbers; 4.0 is the whole number
    4, as for the schema), else ConfigError."""
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        shown = _kind_of(value) if _holds_secret(key.split("."), value) else repr(value)
        raise ConfigError(f"key {key}: {shown} is not {what}")
    return value


def _parsed(key: str, value: Any, parse: Any) -> Any:
    try:
        return parse(value)
    except (ValueError, TypeError, AttributeError) as exc:  # the last two: a wrong kind
        if _holds_secret(key.split("."), value):  # a parser's message may quote the value
            raise ConfigError(f"key {key}: {_kind_of(value)} that cannot be used") from None
        raise ConfigError(f"key {key}: {exc}") from exc


def _apply_environment(config: Config, env: Mapping[str, str]) -> Config:
    changes: dict[str, Any] = {}
    paths = {
        "SPOOLD_SPOOL": "spool", "RUNNER_WORKDIR": "workdir",
        "RUNNER_LOG_DIR": "logdir", "RUNNER_LOG_SOCKET": "log_socket",
    }  # fmt: skip
    for variable, key in paths.items():
        if env.get(variable):  # ~ too: a unit's Environment= has no shell to expand it
            changes[key] = Path(config_home(variable, env[variable]))
    if "spool" in changes:
        changes["spool_override"] = "SPOOLD_SPOOL"
    if env.get("RUNNER_ID"):
        changes["worker_id"] = changes["runner_id"] = env["RUNNER_ID"]
    if env.get("RUNNER_HOSTNAME"):
        changes["hostname"] = env["RUNNER_HOSTNAME"]
    return config._replace(**changes) if changes else config
