"""Executor plugins: found through the ``spoold.executors`` entry point group, checked on load."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from spoold.documents import load_executor_schema
from spoold.errors import PluginError
from spoold.executors.base import Executor

GROUP = "spoold.executors"


class ExecutorRegistry:
    """The executors spoold can run, by name."""

    def __init__(self, executors: Mapping[str, type[Executor]]) -> None:
        self._executors = dict(executors)

    @classmethod
    def from_entry_points(cls, points: Iterable[EntryPoint] | None = None) -> ExecutorRegistry:
        """Load every registered executor; a broken plugin is an error that names it."""
        found: dict[str, type[Executor]] = {}
        for point in points if points is not None else entry_points(group=GROUP):
            found[point.name] = _load(point)
        return cls(found)

    def names(self) -> list[str]:
        return sorted(self._executors)

    def get(self, name: str) -> type[Executor]:
        try:
            return self._executors[name]
        except KeyError:
            raise PluginError(
                f"unknown executor {name!r} (installed: {', '.join(self.names())})"
            ) from None

    def create(self, name: str) -> Executor:
        """A fresh executor instance for one attempt."""
        return self.get(name)()

    def schemas(self) -> dict[str, dict[str, Any]]:
        """Each executor's sub-schema of ``product:``."""
        return {
            name: load_executor_schema(cls.schema_package, cls.schema_resource)
            for name, cls in sorted(self._executors.items())
        }


def _load(point: EntryPoint) -> type[Executor]:
    try:
        loaded = point.load()
    except Exception as exc:  # an import error inside a plugin must name the plugin
        raise PluginError(
            f"executor plugin {point.name!r} ({point.value}) failed to load: {exc}"
        ) from exc
    if not (isinstance(loaded, type) and issubclass(loaded, Executor)):
        raise PluginError(
            f"executor plugin {point.name!r} ({point.value}) is not a subclass of "
            "spoold.executors.base.Executor"
        )
    if getattr(loaded, "name", None) != point.name:
        raise PluginError(
            f"executor plugin {point.name!r} ({point.value}) calls itself "
            f"{getattr(loaded, 'name', None)!r}; the entry point name and Executor.name must match"
        )
    return loaded
