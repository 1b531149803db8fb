"""Executor plugins: found through the ``spoold.executors`` entry point group, checked on load."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from spoold.core.documents import load_executor_schema
from spoold.core.errors import PluginError
from spoold.executors.base import Executor

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

GROUP = "spoold.executors"


class ExecutorRegistry:
    """The executors spoold can run, by name.

    ``references``: executors known by where their class is (``module:qualname``, as
    ``references()`` gives them), imported when first used. A worker process gets the
    daemon's so: the daemon has loaded and checked every plugin, and a worker process that
    never runs a docker or invoicing job need not import their modules (http.client, ssl,
    tarfile, decimal: ~4.5 MiB RSS and ~16 ms of each start, measured) nor scan the entry
    points.
    """

    def __init__(
        self,
        executors: Mapping[str, type[Executor]],
        references: Iterable[tuple[str, str]] = (),
    ) -> None:
        self._executors = dict(executors)
        self._references = {name: ref for name, ref in references if name not in self._executors}

    @classmethod
    def from_entry_points(cls, points: Iterable[EntryPoint] | None = None) -> ExecutorRegistry:
        """Load every registered executor; a broken plugin is an error that names it."""
        if points is None:
            from importlib.metadata import entry_points  # noqa: PLC0415 - ~10 ms of imports

            points = entry_points(group=GROUP)
        found: dict[str, type[Executor]] = {}
        values: dict[str, str] = {}
        for point in points:
            if values.setdefault(point.name, point.value) != point.value:
                # Which one won would depend on sys.path order: a plugin must not replace
                # another (a built-in one least of all) by accident.
                raise PluginError(
                    f"two executor plugins are named {point.name!r}: {values[point.name]} and "
                    f"{point.value}; uninstall one"
                )
            found[point.name] = _load(point.name, point.value, point.load)
        return cls(found)

    def names(self) -> list[str]:
        return sorted({*self._executors, *self._references})

    def references(self) -> tuple[tuple[str, str], ...]:
        """Each executor's name and where its class is, for a registry that imports them only
        when first used (the ``references`` of a new one)."""
        loaded = {name: f"{c.__module__}:{c.__qualname__}" for name, c in self._executors.items()}
        return tuple(sorted({**self._references, **loaded}.items()))

    def get(self, name: str) -> type[Executor]:
        try:
            return self._executors[name]
        except KeyError:
            pass
        reference = self._references.get(name)
        if reference is None:
            raise PluginError(
                f"unknown executor {name!r} (installed: {', '.join(self.names())})"
            ) from None
        # Two threads may import it at once: the import system serializes them, and both
        # store the same class.
        loaded = _load(name, reference, lambda: _import(reference))
        self._executors[name] = loaded
        return loaded

    def create(self, name: str) -> Executor:
        """A fresh executor instance for one attempt."""
        return self.get(name)()

    def schemas(self) -> dict[str, dict[str, Any]]:
        """Each executor's sub-schema of ``product:``; PluginError names one that is missing."""
        schemas = {}
        for name in self.names():
            executor = self.get(name)
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


def _import(reference: str) -> Any:
    """What ``module:qualname`` names."""
    module, _, qualname = reference.partition(":")
    found: Any = importlib.import_module(module)
    for attribute in qualname.split("."):
        found = getattr(found, attribute)
    return found


def _load(name: str, value: str, load: Callable[[], Any]) -> type[Executor]:
    """The executor class ``load()`` gives, checked; ``value`` says where it is from."""
    try:
        loaded = load()
    except Exception as exc:  # an import error inside a plugin must name the plugin
        raise PluginError(f"executor plugin {name!r} ({value}) failed to load: {exc}") from exc
    if not (isinstance(loaded, type) and issubclass(loaded, Executor)):
        raise PluginError(
            f"executor plugin {name!r} ({value}) is not a subclass of "
            "spoold.executors.base.Executor"
        )
    if inspect.isabstract(loaded):
        raise PluginError(
            f"executor plugin {name!r} ({value}) is abstract: it must implement "
            f"{', '.join(sorted(loaded.__abstractmethods__))}"
        )
    if getattr(loaded, "name", None) != name:
        raise PluginError(
            f"executor plugin {name!r} ({value}) calls itself "
            f"{getattr(loaded, 'name', None)!r}; the entry point name and Executor.name must match"
        )
    return loaded
