"""What /proc says about processes: start times (to tell a live pid from a reused one), groups,
and environments."""

from __future__ import annotations

import os
from collections.abc import Callable

_PGRP, _STARTTIME = 2, 19  # indexes into the fields after the command name


def _stat_fields(pid: int | str) -> list[str] | None:
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        stat = os.read(fd, 4096).decode(errors="replace")
    except OSError:
        return None
    finally:
        os.close(fd)
    # The command name (field 2) may contain spaces and parentheses; the fields after it do not.
    return stat.rsplit(")", 1)[1].split()


def process_start_time(pid: int) -> int | None:
    """The start time of a process in clock ticks since boot, or None if it is gone."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[_STARTTIME])


def group_members(pgid: int, not_before: int | None) -> list[int]:
    """Processes in group ``pgid`` that started no earlier than ``not_before`` (clock ticks).

    The start-time check keeps a recycled group id from naming someone else's processes.
    """
    if not_before is None:
        return []
    members = []
    with os.scandir("/proc") as entries:
        for entry in entries:
            fields = _stat_fields(entry.name) if entry.name.isdigit() else None
            if fields and int(fields[_PGRP]) == pgid and int(fields[_STARTTIME]) >= not_before:
                members.append(int(entry.name))
    return members


def processes_matching(part: str, matches: Callable[[bytes], bool]) -> list[int]:
    """Processes whose /proc/<pid>/``part`` (cmdline, environ, ...) satisfies ``matches``."""
    found = []
    with os.scandir("/proc") as entries:
        for proc in entries:
            if not proc.name.isdigit():
                continue
            try:
                with open(f"/proc/{proc.name}/{part}", "rb") as handle:
                    content = handle.read()
            except OSError:
                continue  # gone, or not ours to read
            if matches(content):
                found.append(int(proc.name))
    return found


def processes_with_environment(entry: str) -> list[int]:
    """Processes whose environment holds ``entry`` ("NAME=value") as it was at their start.

    Every job process of spoold's starts with ``SPOOLD_JOB_DIR`` naming its job: its
    processes are found even when no lease names them (a crash right after the spawn) and
    when they left the job's process group.
    """
    wanted = entry.encode()
    return processes_matching("environ", lambda environment: wanted in environment.split(b"\0"))
