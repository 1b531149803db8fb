"""A parsed copy of the config file, so that a light command need not import YAML.

Importing PyYAML costs about 30 ms, a third of what ``spoold status`` may take in all; the
config file rarely changes. Like ``__pycache__`` for source, the copy is used only for the
exact text it was made from: the file is read every time and compared byte for byte, so an
edit is seen at once, however quickly it follows (no timestamps are trusted).

The copy holds what the file holds, secrets included, so it is kept only where such things
are meant to be: the user's runtime directory (``$XDG_RUNTIME_DIR``, the user's own, mode
0700, memory-backed, emptied at logout; ``/run/user/<uid>`` when the variable is unset, as
under sudo), in ``spoold/``, mode 0600, for this user alone. A directory or file that another
user owns or may write is ignored, never trusted; without a runtime directory (a service, a
cron job, root without a login session) nothing is kept and every command reads YAML. Only
documents that JSON holds exactly (mappings with string keys, lists, strings, numbers, true,
false, null) are kept: a date or a binary value is not.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from spoold import __version__

#: Where systemd-logind makes each user's runtime directory (``/run/user/<uid>``).
RUN_USER = Path("/run/user")
_PRIVATE = 0o077  # group and other bits: none may be set on the directory or the copy


def _directory(env: Mapping[str, str]) -> Path | None:
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime is None:  # sudo's clean environment: systemd-logind's place for it, if made
        fallback = RUN_USER / str(os.geteuid())
        return fallback / "spoold" if fallback.is_dir() else None
    return Path(runtime, "spoold") if Path(runtime).is_absolute() else None


def _key(path: Path) -> dict[str, str]:
    """What else the copy depends on: spoold's version and its environment (PyYAML's)."""
    return {"spoold": __version__, "prefix": sys.prefix, "file": str(path.absolute())}


def _name(path: Path) -> str:
    # The venv in the name too: two spoolds of one user (a checkout's, the package's) reading
    # one config would otherwise replace each other's copy on every call.
    return quote(f"{sys.prefix}:{path.absolute()}", safe="") + ".json"


def _owned(st: os.stat_result) -> bool:
    return st.st_uid == os.geteuid() and not st.st_mode & _PRIVATE


def recall(path: Path, text: str, env: Mapping[str, str]) -> Any | None:
    """The document parsed from ``text`` before, if a trusted copy of it is kept; else None."""
    directory = _directory(env)
    if directory is None:
        return None
    try:
        if not _owned(directory.lstat()):
            return None
        fd = os.open(directory / _name(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _owned(st):
            return None
        try:
            kept = json.loads(handle.read())
        except (OSError, ValueError):
            return None
    if not isinstance(kept, dict) or kept.get("key") != _key(path) or kept.get("text") != text:
        return None
    return kept.get("document")


def remember(path: Path, text: str, document: Any, env: Mapping[str, str]) -> None:
    """Keep ``document`` as the parse of ``text``, where that is safe; silently not otherwise."""
    directory = _directory(env)
    if directory is None or not _exact_in_json(document):
        return
    payload = json.dumps({"key": _key(path), "text": text, "document": document})
    temp = directory / f".{os.getpid()}-{_name(path)}"
    with contextlib.suppress(OSError):
        directory.mkdir(mode=0o700, exist_ok=True)
        if not _owned(directory.lstat()):
            return
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(payload)
            os.replace(temp, directory / _name(path))  # readers see the old copy or the new
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)


def _exact_in_json(document: Any) -> bool:
    """Whether JSON gives back exactly ``document`` (types included: 1 stays no 1.0)."""
    if document is None or isinstance(document, (bool, str, int)):
        return True
    if isinstance(document, float):
        return document == document and abs(document) != float("inf")  # noqa: PLR0124 - NaN
    if isinstance(document, list):
        return all(_exact_in_json(item) for item in document)
    if isinstance(document, dict):
        return all(isinstance(k, str) and _exact_in_json(v) for k, v in document.items())
    return False
