"""spoold-checksum: a third-party spoold executor, the worked example of spoold's README.

A job file::

    executor: checksum
    product:
      path: out/release.tar.gz   # relative to the job's work dir (it may not leave it), or absolute
      algorithm: sha512          # sha256 (default), sha512, or blake3 (an optional dependency)
      expect: 3a9f...            # optional: a file with another digest fails the job

The digest goes into the job's log and into status.json's ``result`` as
``{"algorithm", "digest", "path", "size"}``. The file is read in-process, as spoold's own user.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

from spoold.executors.base import ExecResult, Executor, RunContext, within_workdir

from spoold.core.errors import ExecutorError, ExecutorNotAvailable

__all__ = ["ChecksumExecutor"]

CHUNK = 1024 * 1024  # cancel and timeout are looked at between chunks


class Hasher(Protocol):
    """What hashlib's objects and blake3's have in common."""

    def update(self, data: bytes, /) -> object: ...

    def hexdigest(self) -> str: ...


def new_hasher(algorithm: str) -> Hasher:
    """A hash object; an optional SDK is imported here, when a job needs it, never at load time."""
    if algorithm != "blake3":
        return hashlib.new(algorithm)
    try:
        from blake3 import blake3  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415
    except ImportError:
        raise ExecutorNotAvailable(
            "blake3 is not available. Run `pip install spoold-checksum[blake3]`"
        ) from None
    hasher: Hasher = blake3()
    return hasher


class ChecksumExecutor(Executor):
    """Computes a file's digest, logs it, returns it as the job's result, checks ``expect``."""

    name = "checksum"  # must equal the entry point's name
    schema_package = "spoold_checksum"  # the product sub-schema, read with importlib.resources
    schema_resource = "checksum.schema.json"
    # reports_start stays False: no process of its own, so `run` calls ctx.on_start(None) first.
    # script_fields stays empty: `path` and `expect` are data, spoold fills ${NAME} into them.

    def execute(self, ctx: RunContext) -> ExecResult:
        given = str(ctx.product["path"])
        algorithm = str(ctx.product.get("algorithm", "sha256"))
        path = Path(given) if Path(given).is_absolute() else within_workdir(ctx, given)
        if not path.is_file():  # not even opened: a FIFO would block the worker
            raise ExecutorError(f"{given}: no such file (or not a regular file)")
        hasher = new_hasher(algorithm)  # ExecutorNotAvailable fails the job, naming the extra
        deadline = None if ctx.timeout is None else ctx.clock.monotonic() + ctx.timeout
        size = 0
        try:
            with path.open("rb") as stream:
                while chunk := stream.read(CHUNK):
                    if ctx.cancel.is_set():
                        return ExecResult(exit_code=None, cancelled=True)
                    if deadline is not None and ctx.clock.monotonic() > deadline:
                        return ExecResult(exit_code=None, timed_out=True)
                    hasher.update(chunk)
                    size += len(chunk)
        except OSError as exc:  # a SpooldError: `run` logs it and fails the attempt
            raise ExecutorError(f"{given}: cannot read: {exc.strerror}") from exc
        digest = hasher.hexdigest()
        ctx.log.info(f"{algorithm} {digest}  {given} ({size} bytes)")
        result = {"algorithm": algorithm, "digest": digest, "path": given, "size": size}
        if isinstance(expect := ctx.product.get("expect"), str) and expect.lower() != digest:
            error = f"{algorithm} of {given} is {digest}, expected {expect.lower()}"
            ctx.log.error(error)
            return ExecResult(exit_code=1, error=error, result=result)
        return ExecResult(exit_code=0, result=result)
