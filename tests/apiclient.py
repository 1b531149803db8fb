"""The test side of the HTTP API: a daemon serving it on a free loopback port, tokens made by
the real CLI, and a small Server-Sent Events reader (the browser's EventSource, in Python)."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from tests.harness import DaemonProcess, run_cli, write_config


def free_port() -> int:
    """A port free on 127.0.0.1 now (bound and released: a race only with another binder)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_token(spool: Path, name: str, scopes: str) -> str:
    """A token made as a user would: ``spoold token create``."""
    made = run_cli(spool, "token", "create", "--name", name, "--scope", scopes)
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


@dataclass
class Api:
    """A daemon with the API on, and a way to call it."""

    daemon: DaemonProcess
    url: str
    tokens: dict[str, str] = field(default_factory=dict)
    verify: bool | str = True

    @property
    def spool(self) -> Path:
        return self.daemon.spool

    def call(
        self, method: str, path: str, *, token: str | None = "admin", **kwargs: Any
    ) -> requests.Response:
        """One request; ``token``: the name of one of ``tokens`` (None: none at all)."""
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers.setdefault("Authorization", f"Bearer {self.tokens.get(token, token)}")
        kwargs.setdefault("timeout", 30)
        return requests.request(
            method, self.url + path, headers=headers, verify=self.verify, **kwargs
        )

    def submit(self, text: str, *, token: str = "admin", **kwargs: Any) -> requests.Response:
        headers = {"Content-Type": "application/yaml", **kwargs.pop("headers", {})}
        return self.call("POST", "/api/v1/jobs", token=token, data=text, headers=headers, **kwargs)


def module_api(tmp_path_factory: Any, name: str, **config: Any) -> Iterator[Api]:
    """A module fixture's body: one daemon with the API for the module's tests, killed after."""
    tmp = tmp_path_factory.mktemp(name)
    tmp.chmod(0o755)
    started = start_api(tmp, **config)
    yield started
    started.daemon.kill()


def start_api(tmp: Path, **config: Any) -> Api:
    """A daemon on a fresh spool under ``tmp`` with ``api:`` on a free port, and tokens of each
    scope (``admin``, ``read``, ``submit``, ``control``) made before it starts."""
    spool = tmp / "spool"
    api = {"listen": f"127.0.0.1:{free_port()}", **config.pop("api", {})}
    path = write_config(tmp / "config.yaml", spool, api=api, **config)
    made = run_cli(spool, "init")
    assert made.returncode == 0, made.stderr
    tokens = {scope: make_token(spool, scope, scope) for scope in ("admin", "read", "submit",
                                                                   "control")}  # fmt: skip
    daemon = DaemonProcess(spool, path)
    daemon.start()
    scheme = "https" if "certfile" in api else "http"
    return Api(daemon, f"{scheme}://{api['listen']}", tokens)


class Event(dict[str, str]):
    """One Server-Sent Event: ``event``, ``data``, ``id`` as the spec assembles them."""


def sse_events(response: requests.Response) -> Iterator[Event]:
    """The events of an ``text/event-stream`` answer, as an EventSource would dispatch them
    (data lines joined with newlines; comments and retry skipped)."""
    event = Event()
    data: list[str] = []
    for raw in response.iter_lines(decode_unicode=False):
        line = raw.decode("utf-8")
        if not line:
            if data or "event" in event:
                event["data"] = "\n".join(data)
                yield event
            event, data = Event(), []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name in ("event", "id"):
            event[name] = value


def certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 in ``directory``: (cert, key) PEM paths."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key
