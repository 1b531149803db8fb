"""What a unit of work, a step or an attempt cost (status.json ``usage``).

Apart from the job's model (``spoold.core.job``, whose attempts hold one) because a job's
supervisor records it: the launcher it is forked from imports this, not the model, its
limits and its retry policy (each supervisor counts again what the launcher holds).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

#: ``Usage.source``: how the figures were measured (README, "What an attempt cost").
USAGE_SOURCES = ("kernel", "docker", "docker-sampled", "wall")


class Usage(NamedTuple):
    """What a unit of work, a step or an attempt cost (status.json ``usage``).

    A figure that cannot be known for the way the work ran is None, never a guess: an API
    executor's work has a wall time and nothing else. ``source`` says how the figures were
    measured (``USAGE_SOURCES``; several joined by ``+`` for an attempt of mixed steps).

    A named tuple, not a dataclass, for the same reason as the module (dataclasses brings
    inspect: ~1.2 MiB more in the launcher, measured, and in each supervisor again).
    """

    wall_seconds: float | None = None
    cpu_user_seconds: float | None = None
    cpu_system_seconds: float | None = None
    #: The largest max RSS of one process of the tree (kernel), or the container's memory
    #: peak (docker): bytes.
    peak_memory_bytes: int | None = None
    #: What the work wrote to its stdout and stderr, as it reached spoold.
    output_bytes: int | None = None
    source: str = "wall"

    def to_dict(self) -> dict[str, Any]:
        """As status.json and a unit's end record keep it."""
        return {
            "wall_seconds": _rounded(self.wall_seconds),
            "cpu_user_seconds": _rounded(self.cpu_user_seconds),
            "cpu_system_seconds": _rounded(self.cpu_system_seconds),
            "peak_memory_bytes": self.peak_memory_bytes,
            "output_bytes": self.output_bytes,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: object) -> Usage | None:
        """Read ``to_dict``'s form back; None for anything else (a record from before usage)."""
        if not isinstance(data, dict):
            return None
        return cls(
            wall_seconds=_number(data.get("wall_seconds")),
            cpu_user_seconds=_number(data.get("cpu_user_seconds")),
            cpu_system_seconds=_number(data.get("cpu_system_seconds")),
            peak_memory_bytes=_count(data.get("peak_memory_bytes")),
            output_bytes=_count(data.get("output_bytes")),
            source=str(data.get("source") or "wall"),
        )

    def plus(self, other: Usage) -> Usage:
        """Both together, as one after the other or side by side: times and output add up,
        the peak is the larger (two steps' processes are not summed: they rarely peak
        together, and when they do the kernel's figures cannot tell)."""
        sources = dict.fromkeys([*self.source.split("+"), *other.source.split("+")])
        return Usage(
            wall_seconds=_sum(self.wall_seconds, other.wall_seconds),
            cpu_user_seconds=_sum(self.cpu_user_seconds, other.cpu_user_seconds),
            cpu_system_seconds=_sum(self.cpu_system_seconds, other.cpu_system_seconds),
            peak_memory_bytes=_larger(self.peak_memory_bytes, other.peak_memory_bytes),
            output_bytes=_sum(self.output_bytes, other.output_bytes),
            source="+".join(sorted(sources)),
        )


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _count(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


def _sum(a: float | int | None, b: float | int | None) -> Any:
    if a is None:
        return b
    return a if b is None else a + b


def _larger(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    return a if b is None else max(a, b)


class StepUsage:
    """What each step cost in one attempt of a job with steps, and the attempt's total.

    A step's entry in status.json's ``steps`` keeps its ``usage`` (its tries in the attempt
    together) and ``usage_attempt``, the job attempt it belongs to: a step that succeeded in
    an earlier attempt is not run again and keeps its figures, which are not this attempt's.
    """

    def __init__(self, attempt: int, previous: Mapping[str, Any]) -> None:
        """``previous``: status.json's ``steps`` as the attempt starts (an adopted attempt's
        steps that ended under the daemon before are counted from there)."""
        self._attempt = attempt
        self._steps: dict[str, Usage] = {}
        for step_id, record in previous.items():
            usage = Usage.from_dict((record or {}).get("usage"))
            if usage is not None and (record or {}).get("usage_attempt") == attempt:
                self._steps[step_id] = usage

    def add(self, step_id: str, usage: Usage | None) -> None:
        """One try of a step ended, at this cost (None: not measured)."""
        if usage is not None:
            before = self._steps.get(step_id)
            self._steps[step_id] = usage if before is None else before.plus(usage)

    def onto(self, steps: dict[str, Any]) -> dict[str, Any]:
        """``steps`` with each step's usage in this attempt; a step running again has none
        yet (what it cost in an earlier attempt was that attempt's)."""
        for step_id, record in steps.items():
            if step_id in self._steps:
                record["usage"] = self._steps[step_id].to_dict()
                record["usage_attempt"] = self._attempt
            elif record.get("state") == "running":
                record.pop("usage", None)
                record.pop("usage_attempt", None)
        return steps

    def total(self) -> Usage | None:
        """The attempt's steps together; None if none was measured."""
        total: Usage | None = None
        for usage in self._steps.values():
            total = usage if total is None else total.plus(usage)
        return total
