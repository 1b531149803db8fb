"""The configuration: a frozen Config built from config.yaml, the environment and flags."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from spoold.documents import load_executor_schema
from spoold.errors import ConfigError
from spoold.retention import Retention
from spoold.sender import CallbackSettings
from spoold.units import parse_duration, parse_size

SEARCH_PATH = (Path("config.yaml"), Path("/etc/spoold/config.yaml"))
DEFAULT_SPOOL = Path("spool")


@dataclass(frozen=True)
class Config:
    """Everything the daemon and the CLI need to know, validated at start."""

    spool: Path = DEFAULT_SPOOL
    workers: int = 2
    #: Processes the workers are spread over; None: one per core (at most one per worker).
    worker_processes: int | None = None
    watch: str = "auto"
    poll_interval: float = 1.0
    rescan_interval: float = 30.0
    settle_time: float = 2.0
    max_file_size: int = 1024 * 1024
    #: A job's log keeps at most this much of its output (``limits.max_log_size``).
    max_log_size: int | None = 100 * 1024 * 1024
    #: At most this many jobs of an executor at once (``limits.executors``), beyond ``workers``.
    executor_limits: dict[str, int] = field(default_factory=dict)
    workdir: Path | None = None
    logdir: Path | None = None
    global_before_script: tuple[str, ...] = ()
    kill_grace: float = 10.0
    shutdown_grace: float = 30.0
    lease_timeout: float = 60.0
    heartbeat_interval: float = 10.0
    durable: bool = True
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    hostname: str = field(default_factory=socket.gethostname)
    log_socket: Path | None = None
    log_level: str = "info"
    default_callback_url: str | None = None
    default_callback_secret: str | None = None
    #: How callback deliveries are sent: timeout, backoff, when to give up (``callbacks:``).
    callbacks: CallbackSettings = field(default_factory=CallbackSettings)
    #: Where ``${secret:NAME}`` is read from: the file NAME, mode 0600 or stricter.
    secrets_dir: Path | None = None
    #: Which finished jobs are removed, and when (``retention:``); empty keeps everything.
    retention: Retention = field(default_factory=Retention)
    #: The users a job may name in ``run_as:``; none by default.
    allowed_run_as: tuple[str, ...] = ()
    #: Each executor's own settings (``executors: {NAME: {...}}``), given to it in RunContext.
    executor_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: Path | None = None


def find_config_file(explicit: Path | None) -> Path | None:
    """--config, else ./config.yaml, else /etc/spoold/config.yaml, else none."""
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(f"config file {explicit} does not exist")
        return explicit
    return next((p for p in SEARCH_PATH if p.is_file()), None)


def load_config(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    spool: Path | None = None,
) -> Config:
    """Defaults, then the config file, then the environment, then flags; the last one wins."""
    env = os.environ if env is None else env
    found = find_config_file(path)
    document = _read_document(found) if found else {}
    config = _from_document(document, found)
    config = _apply_environment(config, env)
    if spool is not None:
        config = replace(config, spool=spool)
    return config


def _read_document(path: Path) -> dict[str, Any]:
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc}") from exc
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: the configuration must be a mapping of keys to values")
    from jsonschema import Draft202012Validator  # noqa: PLC0415 - worker processes never need it

    schema = load_executor_schema("spoold.schemas", "config.schema.json")
    errors = sorted(Draft202012Validator(schema).iter_errors(document), key=lambda e: e.path)
    if errors:
        raise ConfigError(f"{path}: " + "; ".join(_describe(e) for e in errors))
    return document


def _describe(error: Any) -> str:
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


def _from_document(doc: dict[str, Any], source: Path | None) -> Config:
    values: dict[str, Any] = {"source": source}
    for key in ("workers", "worker_processes", "watch", "worker_id", "hostname", "log_level"):
        if key in doc:
            values[key] = doc[key]
    for key in ("default_callback_url", "default_callback_secret"):
        if key in doc:
            values[key] = doc[key]
    if not str(doc.get("default_callback_url") or "http://").startswith(("http://", "https://")):
        raise ConfigError("key default_callback_url: callbacks go to an http:// or https:// URL")
    if doc.get("default_callback_url") and not doc.get("default_callback_secret"):
        raise ConfigError(
            "key default_callback_url: callbacks are signed; set default_callback_secret too"
        )
    if "callbacks" in doc:
        values["callbacks"] = _parsed("callbacks", doc["callbacks"], CallbackSettings.from_document)
    for key in (
        "poll_interval", "rescan_interval", "settle_time", "kill_grace",
        "shutdown_grace", "lease_timeout", "heartbeat_interval",
    ):  # fmt: skip
        if key in doc:
            values[key] = _parsed(key, doc[key], parse_duration)
    if "max_file_size" in doc.get("limits", {}):
        values["max_file_size"] = _parsed(
            "limits.max_file_size", doc["limits"]["max_file_size"], parse_size
        )
    if "max_log_size" in doc.get("limits", {}):
        values["max_log_size"] = _parsed(
            "limits.max_log_size", doc["limits"]["max_log_size"], parse_size
        )
    if "executors" in doc.get("limits", {}):
        values["executor_limits"] = dict(doc["limits"]["executors"])
    if "fsync" in doc:
        values["durable"] = bool(doc["fsync"])
    base = source.parent if source else Path.cwd()
    for key in ("spool", "workdir", "logdir", "secrets_dir"):
        if key in doc:
            values[key] = base / doc[key]
    if "retention" in doc:
        values["retention"] = _parsed("retention", doc["retention"], Retention.from_document)
    if "allowed_run_as" in doc:
        values["allowed_run_as"] = tuple(doc["allowed_run_as"])
    if "executors" in doc:
        values["executor_settings"] = {str(k): dict(v) for k, v in doc["executors"].items()}
    script = doc.get("global_before_script")
    if script is not None:
        values["global_before_script"] = (script,) if isinstance(script, str) else tuple(script)
    return Config(**values)


def _parsed(key: str, value: Any, parse: Any) -> Any:
    try:
        return parse(value)
    except ValueError as exc:
        raise ConfigError(f"key {key}: {exc}") from exc


def _apply_environment(config: Config, env: Mapping[str, str]) -> Config:
    changes: dict[str, Any] = {}
    paths = {
        "SPOOLD_SPOOL": "spool", "RUNNER_WORKDIR": "workdir",
        "RUNNER_LOG_DIR": "logdir", "RUNNER_LOG_SOCKET": "log_socket",
    }  # fmt: skip
    for variable, key in paths.items():
        if env.get(variable):
            changes[key] = Path(env[variable])
    if env.get("RUNNER_ID"):
        changes["worker_id"] = env["RUNNER_ID"]
    if env.get("RUNNER_HOSTNAME"):
        changes["hostname"] = env["RUNNER_HOSTNAME"]
    return replace(config, **changes) if changes else config
