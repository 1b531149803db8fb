"""Durations ("1h30m") and sizes ("1MiB") as users write them in job and config files."""

from __future__ import annotations

import functools
import re

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)", re.IGNORECASE)
_DURATION_FULL = re.compile(r"^\s*(?:\d+(?:\.\d+)?\s*(?:ms|s|m|h|d)\s*)+$", re.IGNORECASE)
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

#: The longest duration a job may give, in seconds: ten years (the schema's `duration` maximum;
#: a schedule's ``every:`` too, past which its dates leave the calendar).
MAX_DURATION = 315_360_000

#: The sizes parse_size takes, in words, for every message about one.
SIZE_FORMS = (
    "a number of bytes, or a number and a unit: k, M, G or T (powers of 1000), Ki, Mi, Gi or Ti "
    "(powers of 1024), with or without B, in either case: e.g. 512MiB, 2G, 1.5GB"
)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2, "mi": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "gi": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4, "ti": 1024**4,
}  # fmt: skip


def parse_duration(value: str | float | int) -> float:
    """Seconds from a number of seconds or a string like '30s', '10m', '1h30m', '500ms'."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"{value!r} is negative")
        return float(value)
    return _duration_text(value)


@functools.lru_cache(maxsize=256)
def _duration_text(value: str) -> float:
    # Cached: a schedule's durations are read at validation, intake and registration, and
    # thousands of schedules share a few.
    text = value.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    if not _DURATION_FULL.match(text):
        raise ValueError(f"{value!r} is not a duration like 30s, 10m, 1h30m")
    return sum(float(n) * _SECONDS[u.lower()] for n, u in _DURATION_PART.findall(text))


def parse_size(value: str | int) -> int:
    """Bytes from a number or a string like '1MiB', '512k', '2 GB'."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value!r} is negative")
        return value
    match = _SIZE.match(value)
    if not match or (match.group(2) or "").lower() not in _SIZE_FACTORS:
        raise ValueError(f"{value!r} is not a size: {SIZE_FORMS}")
    return int(float(match.group(1)) * _SIZE_FACTORS[(match.group(2) or "").lower()])


def format_duration(seconds: float) -> str:
    """The short form users write: 90 -> '1m30s'."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    whole = int(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole >= size:
            parts.append(f"{whole // size}{unit}")
            whole %= size
    if whole or not parts:
        parts.append(f"{whole}s")
    return "".join(parts)


def timeout_reason(timeout: float | None) -> str:
    """Why an attempt was stopped, as its log and result say it: 'timeout of 5s'."""
    return f"timeout of {format_duration(timeout or 0)}"
