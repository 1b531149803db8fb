"""The durable floor: a minimal Python spool doing exactly spoold's 7 fsyncs a job (issue 23).

What SPEC section 1 demands of a job's way through the spool, and nothing more:

- accept (one intake thread): incoming/<name> is taken by renaming it to tmp/<stage>/job.yaml,
  read and parsed (its ``job_id`` and ``product``), status.json written beside it (not
  fsynced: spoold rebuilds a lost one); fsync job.yaml (1), fsync the stage (2), rename the
  stage to pending/<id>, fsync pending/ (3);
- claim (``--workers`` threads): rename pending/<id> to running/<id>, fsync running/ (4), before
  the job's process starts;
- run: ``/bin/sh -c COMMANDS`` from the job file's ``product.commands`` (its ``shell`` if it names
  one), as spoold's local executor runs it, in a session of its own, its stdout and stderr
  appended straight to running/<id>/log;
- finish: fsync the log (5), the final status.json written whole under a temporary name,
  fsynced (6) and renamed over the old one, rename running/<id> to done/<id> (failed/<id> on a
  non-zero exit), fsync that directory (7).

No validation, no log lines of its own, no recovery, no artifacts/, no lease. incoming/ is
watched as in floor.py: watchdog's own InotifyFD for IN_MOVED_TO and IN_CLOSE_WRITE only.

Usage: python benchmarks/floor_durable.py SPOOL [--workers 2]. SPOOL/{incoming,tmp,pending,
running,done,failed} are made if missing. Sends READY=1 to $NOTIFY_SOCKET once it watches;
SIGTERM or SIGINT stops it after the jobs in hand.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

if __package__ in (None, ""):  # run as a script: the project root is one up
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.floor import LOADER, IncomingWatch, fsync_path, serve

DIRECTORIES = ("incoming", "tmp", "pending", "running", "done", "failed")


def write_new(path: str, data: bytes, *, durable: bool) -> None:
    """Create ``path`` (it must not exist) holding ``data``; fsynced if ``durable``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    try:
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def shell_script(commands: str | list[str]) -> str:
    """``product.commands`` as one script (a list: one line each)."""
    return (commands if isinstance(commands, str) else "\n".join(commands)) + "\n"


class DurableFloor(IncomingWatch):
    """incoming/ -> tmp/<stage>/ -> pending/<id>/ -> running/<id>/ -> done/<id>/, 7 fsyncs."""

    def __init__(self, root: str, workers: int) -> None:
        self.dirs = {name: f"{root}/{name}" for name in DIRECTORIES}
        super().__init__(self.dirs["incoming"])
        self.jobs: queue.SimpleQueue[tuple[str, dict[str, Any]] | None] = queue.SimpleQueue()
        self.intake = threading.Thread(target=self.take_all, daemon=True)
        self.workers = [threading.Thread(target=self.work, daemon=True) for _ in range(workers)]
        self.stages = 0  # only the intake thread counts

    def start(self) -> None:
        self.intake.start()
        for thread in self.workers:
            thread.start()
        self.watch()

    def stop(self) -> None:
        """Stop watching, accept what was seen, let the workers finish what was accepted."""
        self.inotify.stop()
        self.names.put(None)
        self.intake.join(30)
        for _ in self.workers:
            self.jobs.put(None)
        for thread in self.workers:
            thread.join(30)

    def take_all(self) -> None:
        while (name := self.names.get()) is not None:
            try:
                self.accept(name)
            except Exception as exc:  # one bad file must not end intake
                print(f"floor_durable: {name}: {exc!r}", file=sys.stderr, flush=True)

    def accept(self, name: str) -> None:
        """incoming/<name> -> pending/<id>: fsyncs 1 to 3."""
        self.stages += 1
        stage = f"{self.dirs['tmp']}/in-{os.getpid()}-{self.stages}"
        os.mkdir(stage, 0o750)
        job_file = f"{stage}/job.yaml"
        try:
            os.rename(f"{self.incoming}/{name}", job_file)  # the take: one taker wins
        except FileNotFoundError:
            os.rmdir(stage)  # seen twice (a close and a move), or taken already
            return
        with open(job_file, "rb") as handle:
            document = yaml.load(handle.read(), Loader=LOADER)  # CSafeLoader: safe
        job_id, product = str(document["job_id"]), document.get("product") or {}
        status = {"job_id": job_id, "state": "pending", "source": name}
        write_new(f"{stage}/status.json", json.dumps(status).encode(), durable=False)
        fsync_path(job_file)
        fsync_path(stage)
        os.rename(stage, f"{self.dirs['pending']}/{job_id}")
        fsync_path(self.dirs["pending"])
        self.jobs.put((job_id, product))

    def work(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                self.run(*job)
            except Exception as exc:  # one bad job must not end a worker
                print(f"floor_durable: {job[0]}: {exc!r}", file=sys.stderr, flush=True)

    def run(self, job_id: str, product: dict[str, Any]) -> None:
        """pending/<id> -> running/<id> -> done|failed/<id>: fsyncs 4 to 7."""
        job_dir = f"{self.dirs['running']}/{job_id}"
        os.rename(f"{self.dirs['pending']}/{job_id}", job_dir)
        fsync_path(self.dirs["running"])
        log = os.open(
            f"{job_dir}/log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640
        )
        try:
            exit_code = subprocess.run(
                [str(product.get("shell", "/bin/sh")), "-c", shell_script(product["commands"])],
                cwd=job_dir,
                env={**os.environ, "JOB_ID": job_id},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # as spoold's jobs: not counted as the daemon's
                check=False,
            ).returncode
            os.fsync(log)
        finally:
            os.close(log)
        state = "succeeded" if exit_code == 0 else "failed"
        status = json.dumps({"job_id": job_id, "state": state, "exit_code": exit_code}).encode()
        temporary = f"{job_dir}/.status.json.tmp"
        write_new(temporary, status, durable=True)
        os.replace(temporary, f"{job_dir}/status.json")
        target = self.dirs["done" if exit_code == 0 else "failed"]
        os.rename(job_dir, f"{target}/{job_id}")
        fsync_path(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("spool")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    root = args.spool.rstrip("/")
    for name in DIRECTORIES:
        os.makedirs(f"{root}/{name}", exist_ok=True)
    serve(DurableFloor(root, args.workers))


if __name__ == "__main__":
    main()
