"""Small records the HTTP API keeps in the spool, beside the jobs: ``tokens/`` (one file per
API token: its scopes and the SHA-256 of its secret) and ``idempotency/`` (which job a POST with
an ``Idempotency-Key`` made). Both directories are made when first needed, mode 0700: only
spoold's own user reads them.

Kept in the spool rather than beside the config: several hosts serving one spool know the same
tokens, and a restart of the API forgets no key. A file made by root (``spoold token create``
run as root) is given to the spool's owner, the user the daemon runs as.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spoold.core.spool.fs import (
    give_to_owner_of,
    json_bytes,
    link_into_place,
    read_json,
    write_file,
)

__all__ = ["IdempotencyKeys", "TokenRecords"]

_PRIVATE_DIR = 0o700
_PRIVATE_FILE = 0o600


class _Records:
    """One directory of small JSON records, each named by a key of safe characters."""

    def __init__(self, root: Path, name: str, *, durable: bool) -> None:
        self._root = root
        self._dir = os.path.join(root, name)
        self._durable = durable

    def _ensure(self) -> None:
        if os.path.isdir(self._dir):
            return
        with contextlib.suppress(FileExistsError):
            os.mkdir(self._dir, _PRIVATE_DIR)
            give_to_owner_of(self._dir, os.fspath(self._root))

    def _path(self, key: str) -> str:
        if not key or not key.replace("-", "").replace("_", "").isalnum() or not key.isascii():
            raise ValueError(f"not a record key: {key!r}")
        return os.path.join(self._dir, f"{key}.json")

    def read(self, key: str) -> dict[str, Any] | None:
        """The record, or None if there is none (or this user may not read it)."""
        try:
            return read_json(self._path(key))
        except PermissionError:
            return None

    def create(self, key: str, record: dict[str, Any]) -> bool:
        """Make the record unless one exists (then False): written whole, then linked into
        place, so that a reader never sees half of it and two writers never both win."""
        path, temp = self._written(key, record)
        return link_into_place(temp, path)

    def replace(self, key: str, record: dict[str, Any]) -> None:
        """Put ``record`` in place of the key's record (or make it), whole at every moment."""
        path, temp = self._written(key, record)
        try:
            os.rename(temp, path)
        except BaseException:
            os.unlink(temp)
            raise

    def _written(self, key: str, record: dict[str, Any]) -> tuple[str, str]:
        """The record's path, and a temporary file beside it that holds ``record``."""
        self._ensure()
        path = self._path(key)
        temp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        write_file(temp, json_bytes(record), durable=self._durable)
        try:
            os.chmod(temp, _PRIVATE_FILE)
            give_to_owner_of(temp, os.fspath(self._root))
        except BaseException:
            os.unlink(temp)
            raise
        return path, temp

    def remove(self, key: str) -> bool:
        """Remove the record; False if there was none."""
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            return False
        return True

    def keys(self) -> list[str]:
        """Every record's key (none before the first record)."""
        try:
            names = os.listdir(self._dir)
        except FileNotFoundError:
            return []
        return sorted(n[:-5] for n in names if n.endswith(".json") and n.count(".") == 1)

    def items(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for key in self.keys():
            if (record := self.read(key)) is not None:
                yield key, record

    def modified_at(self, key: str) -> float | None:
        try:
            return os.stat(self._path(key)).st_mtime
        except FileNotFoundError:
            return None


class TokenRecords(_Records):
    """tokens/: one record per API token, named by its id."""

    def __init__(self, root: Path, *, durable: bool) -> None:
        super().__init__(root, "tokens", durable=durable)


class IdempotencyKeys(_Records):
    """idempotency/: the job each idempotent POST made, named by a digest of token and key."""

    def __init__(self, root: Path, *, durable: bool) -> None:
        super().__init__(root, "idempotency", durable=durable)

    def expire(self, older_than: float) -> int:
        """Remove the records made before ``older_than`` (a timestamp); return how many."""
        removed = 0
        for key in self.keys():
            made = self.modified_at(key)
            if made is not None and made < older_than and self.remove(key):
                removed += 1
        return removed
