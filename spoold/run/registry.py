"""Executor plugins: found through the ``spoold.executors`` entry point group, checked on load."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from spoold.core.documents import load_executor_schema
from spoold.core.errors import PluginError
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
        values: dict[str, str] = {}
        for point in points if points is not None else entry_points(group=GROUP):
            if values.setdefault(point.name, point.value) != point.value:
                # Which one won would depend on sys.path order: a plugin must not replace
                # another (a built-in one least of all) by accident.
                raise PluginError(
                    f"two executor plugins are named {point.name!r}: {values[point.name]} and "
                    f"{point.value}; uninstall one"
                )
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
        """Each executor's sub-schema of ``product:``; PluginError names one that is missing."""
        schemas = {}
        for name, executor in sorted(self._executors.items()):
            where = f"{executor.schema_package}/{getattr(executor, 'schema_resource', None)}"
            try:
                schemas[name] = load_executor_schema(
                    executor.schema_package, executor.schema_resource
                )
            except (AttributeError, OSError, ValueError) as exc:  # package data not installed
                raise PluginError(
                    f"executor plugin {name!r}: cannot read its schema {where}: {exc}"
                ) from exc
        return schemas


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
    if inspect.isabstract(loaded):
        raise PluginError(
            f"executor plugin {point.name!r} ({point.value}) is abstract: it must implement "
            f"{', '.join(sorted(loaded.__abstractmethods__))}"
        )
    if getattr(loaded, "name", None) != point.name:
        raise PluginError(
            f"executor plugin {point.name!r} ({point.value}) calls itself "
            f"{getattr(loaded, 'name', None)!r}; the entry point name and Executor.name must match"
        )
    return loaded
