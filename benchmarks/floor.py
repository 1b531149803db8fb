"""The floor: the minimal crash-safe spool of FACTS.md, what bench_spool.py holds spoold against.

A file renamed (or written) into incoming/ becomes running/<id>/job.yaml, its command runs, its
status.json is written, and running/<id> is renamed to done/<id> (failed/<id> on a non-zero exit).
Four fsyncs a job: running/<id> and running/ after the claim, status.json, done/ after the finish.
incoming/ is watched with watchdog's own InotifyFD for IN_MOVED_TO and IN_CLOSE_WRITE only (no
0.5 s move grouping); ``--workers`` threads run the jobs.

Usage: python benchmarks/floor.py SPOOL [--workers 2]. Sends READY=1 to $NOTIFY_SOCKET once it
watches; SIGTERM or SIGINT stops it after the jobs in hand.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from typing import Any, Protocol

import yaml
from watchdog.observers.inotify_c import InotifyConstants, InotifyFD

LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class IncomingWatch:
    """What both floors share: incoming/ watched with InotifyFD (IN_MOVED_TO, IN_CLOSE_WRITE),
    each name seen put on ``names`` (a rescan after an overflow, and at the start)."""

    def __init__(self, incoming: str) -> None:
        self.incoming = incoming
        self.names: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.inotify: Any = InotifyFD()

    # WatchCallback protocol, called on the InotifyFD thread.
    def on_event(self, event: Any) -> None:
        name = os.fsdecode(event.name)
        if _wanted(name):
            self.names.put(name)

    def on_watch_deleted(self, wd: object) -> None:
        pass

    def on_queue_overflow(self) -> None:
        self.scan()

    def scan(self) -> None:
        for name in sorted(os.listdir(self.incoming)):
            if _wanted(name):
                self.names.put(name)

    def watch(self) -> None:
        mask = InotifyConstants.IN_MOVED_TO | InotifyConstants.IN_CLOSE_WRITE
        self.inotify.start()
        self.inotify.add_callback(os.fsencode(self.incoming), mask, self, 0)
        self.scan()


def _wanted(name: str) -> bool:
    return bool(name) and not name.startswith(".") and not name.endswith((".tmp", ".part"))


class Floor(IncomingWatch):
    """incoming/ -> running/<id>/ -> done/<id>/, nothing more."""

    def __init__(self, root: str, workers: int) -> None:
        super().__init__(f"{root}/incoming")
        self.running = f"{root}/running"
        self.done, self.failed = f"{root}/done", f"{root}/failed"
        self.threads = [threading.Thread(target=self.work, daemon=True) for _ in range(workers)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()
        self.watch()

    def stop(self) -> None:
        self.inotify.stop()
        for _ in self.threads:
            self.names.put(None)
        for thread in self.threads:
            thread.join(30)

    def work(self) -> None:
        while (name := self.names.get()) is not None:
            try:
                self.run(name)
            except Exception as exc:  # one bad file must not end a worker
                print(f"floor: {name}: {exc!r}", file=sys.stderr, flush=True)

    def run(self, name: str) -> None:
        source = f"{self.incoming}/{name}"
        try:
            with open(source, "rb") as handle:
                document = yaml.load(handle.read(), Loader=LOADER)  # CSafeLoader: safe
        except FileNotFoundError:
            return  # the other worker took it
        job_id, product = str(document["job_id"]), document.get("product") or {}
        job_dir = f"{self.running}/{job_id}"
        try:
            os.mkdir(job_dir)
            os.rename(source, f"{job_dir}/job.yaml")
        except (FileExistsError, FileNotFoundError):
            return  # the other worker took it (a half-made claim is not worth cleaning up here)
        fsync_path(job_dir)
        fsync_path(self.running)
        commands = product["commands"]
        script = commands if isinstance(commands, str) else "\n".join(commands)
        exit_code = subprocess.run(
            [str(product.get("shell", "/bin/sh")), "-c", script],
            cwd=job_dir,
            env={**os.environ, "JOB_ID": job_id},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        ).returncode
        status = json.dumps({"job_id": job_id, "exit_code": exit_code}).encode()
        fd = os.open(f"{job_dir}/status.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            os.write(fd, status)
            os.fsync(fd)
        finally:
            os.close(fd)
        target = self.done if exit_code == 0 else self.failed
        os.rename(job_dir, f"{target}/{job_id}")
        fsync_path(target)


def notify_ready() -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if address:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"READY=1", address)


class _Startable(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


def serve(floor: _Startable) -> None:
    """Start ``floor``, say READY=1, and stop it at SIGTERM or SIGINT."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    floor.start()
    notify_ready()
    while not stop.wait(3600):
        pass
    floor.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spool")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    serve(Floor(args.spool.rstrip("/"), args.workers))


if __name__ == "__main__":
    main()
