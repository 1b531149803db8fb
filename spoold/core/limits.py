"""A local job's resource limits (``limits:``): applied through prlimit(1), recognised afterwards."""

from __future__ import annotations

import re
import shutil
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from spoold.core.errors import ExecutorError
from spoold.core.units import SIZE_FORMS, parse_size

_KEYS = ("memory", "cpu_seconds", "open_files")

# What programs print when RLIMIT_AS or RLIMIT_NOFILE says no: an rlimit ends no process by
# itself, it makes a call fail (ENOMEM, EMFILE), so the job's own words are the only evidence.
_MEMORY_WORDS = re.compile(r"cannot allocate memory|memoryerror|out of memory|bad_alloc", re.I)
_OPEN_FILES_WORDS = re.compile(r"too many open files", re.I)

_BINARY_UNITS = (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))
_DECIMAL_UNITS = (("TB", 1000**4), ("GB", 1000**3), ("MB", 1000**2), ("kB", 1000))


@dataclass(frozen=True)
class Limits:
    """Per-process resource limits of one local job; ``None`` leaves a resource as inherited."""

    memory: int | None = None
    cpu_seconds: int | None = None
    open_files: int | None = None

    @classmethod
    def from_document(cls, value: Mapping[str, Any] | None) -> Limits | None:
        """The job file's ``limits:``; None when absent or empty; ValueError names a bad key."""
        if not value:
            return None
        # The schema should already refuse these; a misspelt key silently ignored would run
        # the job without the limit its author asked for, so this check does not rely on it.
        unknown = sorted(set(value) - set(_KEYS))
        if unknown:
            raise ValueError(f"unknown key limits.{unknown[0]} (known: {', '.join(_KEYS)})")
        limits = cls(
            memory=_memory(value.get("memory")),
            cpu_seconds=_count("cpu_seconds", value.get("cpu_seconds")),
            open_files=_count("open_files", value.get("open_files")),
        )
        return limits if limits.is_set else None

    @property
    def is_set(self) -> bool:
        """True when at least one limit is set."""
        return any(v is not None for v in (self.memory, self.cpu_seconds, self.open_files))

    def wrap(self, argv: Sequence[str], *, prlimit: str | None = None) -> list[str]:
        """``argv`` run under these limits: prefixed by a prlimit(1) call that execs it.

        The daemon starts jobs from many threads with vfork, where preexec_fn is not allowed;
        prlimit sets the limits on itself and then execs the command, which inherits them.
        """
        if not argv:
            raise ValueError("no command to run under the limits")
        if not self.is_set:
            return list(argv)
        path = prlimit or shutil.which("prlimit")
        if path is None:
            raise ExecutorError(
                "`limits:` needs util-linux's prlimit, which is not on PATH "
                "(Debian: apt-get install util-linux)"
            )
        options = [option for option, _ in self._each()]
        # `--` so that a command starting with a dash is not read as a prlimit option.
        return [path, *options, "--", *argv]

    def _each(self) -> list[tuple[str, str]]:
        """(prlimit option, words for the log) of each limit that is set."""
        each = []
        if self.memory is not None:
            # RLIMIT_AS, not RLIMIT_RSS: Linux ignores RLIMIT_RSS.
            each.append((f"--as={self.memory}", f"memory {format_size(self.memory)}"))
        if self.cpu_seconds is not None:
            # A hard limit one second above the soft one: the kernel sends SIGXCPU at the soft
            # limit, which explain() can tell apart from any other kill; with soft == hard the
            # process would get SIGKILL straight away.
            seconds = self.cpu_seconds
            each.append((f"--cpu={seconds}:{seconds + 1}", f"cpu {seconds} s"))
        if self.open_files is not None:
            each.append((f"--nofile={self.open_files}", f"open files {self.open_files}"))
        return each

    def explain(self, returncode: int, output_tail: str) -> str | None:
        """Which limit ended the job, in words for the job log; None when none seems to have.

        ``returncode`` is a subprocess returncode: -N when the process died of signal N, or
        128+N when a shell reports a child that did. Ask only about failures the caller did not
        cause itself: a timeout or a cancellation also ends in SIGKILL.
        """
        if returncode == 0:
            return None
        died_of = _signal_of(returncode)
        if self.cpu_seconds is not None and died_of in (signal.SIGXCPU, signal.SIGKILL):
            # SIGKILL too: a process that catches or ignores SIGXCPU is killed at the hard limit.
            return f"cpu_seconds limit reached ({self.cpu_seconds} s of CPU)"
        found = []
        if self.memory is not None:
            reason = f"memory limit reached ({format_size(self.memory)})"
            found += [(m.start(), reason) for m in _MEMORY_WORDS.finditer(output_tail)]
        if self.open_files is not None:
            reason = f"open_files limit reached ({self.open_files})"
            found += [(m.start(), reason) for m in _OPEN_FILES_WORDS.finditer(output_tail)]
        # A job may recover from one refusal and die of another: the last one printed wins.
        return max(found)[1] if found else None

    def describe(self) -> str:
        """The limits in words for the job log: 'memory 512 MiB, cpu 60 s, open files 256'."""
        return ", ".join(words for _, words in self._each()) or "no limits"


def format_size(size: int) -> str:
    """Bytes in the unit the user most likely wrote: 512MiB -> '512 MiB', 512M -> '512 MB'.

    parse_size reads '512M' as 10**6-based, so binary units alone would show a user's round
    number as '488.3 MiB'; the output parses back with parse_size.
    """
    exact = [
        (size // factor, unit)
        for unit, factor in _BINARY_UNITS + _DECIMAL_UNITS
        if size >= factor and size % factor == 0
    ]
    if exact:
        count, unit = min(exact)
        return f"{count} {unit}"
    for unit, factor in _BINARY_UNITS:
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size} B"


def _memory(value: Any) -> int | None:
    if value is None:
        return None
    # parse_size takes only int or str, and a YAML float (1.5) would reach its regex.
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"limits.memory: {value!r} is not a size: {SIZE_FORMS}")
    try:
        size = parse_size(value)
    except ValueError as exc:
        raise ValueError(f"limits.memory: {exc}") from None
    if size < 1:
        raise ValueError(f"limits.memory: {value!r} leaves no memory at all")
    return size


def _count(key: str, value: Any) -> int | None:
    if value is None:
        return None
    # bool is an int to Python, and 0 would end or cripple the job before it starts.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"limits.{key}: {value!r} is not a whole number above 0")
    return value


def _signal_of(returncode: int) -> int | None:
    if returncode < 0:
        return -returncode
    if 128 < returncode < 128 + signal.NSIG:
        return returncode - 128
    return None
