"""The house's rules, over the import graph of spoold's own modules (README: How the code is
laid out): imports go down the layers only, and no module reaches itself through its imports.

Every import counts, wherever it stands: at the top, inside a function (a lazy import is still
a dependency) and under TYPE_CHECKING (an annotation that names a higher layer is one too).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Bottom to top. A module may import its own layer and those below it.
LAYERS = ("core", "out", "run", "schedule", "intake", "face", "root")
#: The composition root: the entry point and what wires every part.
ROOT_MODULES = {"spoold.app", "spoold.daemon", "spoold.oneshot", "spoold.wiring", "spoold.__main__"}


def _modules() -> dict[str, Path]:
    """Every module of the installed spoold namespace, by dotted name, from the checkout."""
    found: dict[str, Path] = {}
    for top, prefix in ((ROOT / "spoold", "spoold"), (ROOT / "executors", "spoold.executors")):
        for path in top.rglob("*.py"):
            parts = path.relative_to(top).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((prefix, *parts))] = path
    return found


MODULES = _modules()


def layer(module: str) -> str:
    """The layer a module belongs to; the executors are plugins of the run layer."""
    if module in ROOT_MODULES:
        return "root"
    parts = module.split(".")
    if len(parts) == 1:
        return "core"  # spoold/__init__.py: the version, nothing else
    if parts[1] == "executors":
        return "run"
    if parts[1] == "schemas":
        return "core"
    assert parts[1] in LAYERS, f"{module}: in no layer; add its package to LAYERS"
    return parts[1]


def imports(module: str) -> Iterator[tuple[str, int]]:
    """The spoold modules ``module`` imports, with the line of each import."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "spoold":
                    yield _known(alias.name), node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package this module is in
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            if base.split(".")[0] != "spoold":
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                yield (submodule if submodule in MODULES else _known(base)), node.lineno


def _known(name: str) -> str:
    while name not in MODULES and "." in name:
        name = name.rpartition(".")[0]
    return name


def test_every_module_is_in_a_layer() -> None:
    assert {layer(m) for m in MODULES} <= set(LAYERS)
    assert len(MODULES) > 40, sorted(MODULES)  # the walk found the tree


def test_imports_go_down_the_layers_only() -> None:
    upward = [
        f"{MODULES[m].relative_to(ROOT)}:{line}: {m} ({layer(m)}) imports {target} "
        f"({layer(target)})"
        for m in sorted(MODULES)
        for target, line in imports(m)
        if LAYERS.index(layer(target)) > LAYERS.index(layer(m))
    ]
    assert not upward, "\n".join(upward)


def test_no_module_reaches_itself_through_its_imports() -> None:
    graph = {m: {t for t, _ in imports(m) if t != m} for m in MODULES}
    circles = [c for c in _strongly_connected(graph) if len(c) > 1]
    assert not circles, circles


def test_the_layer_rules_catch_what_they_are_for() -> None:
    """The checks above are not vacuous: the graph has downward arrows in every layer, and an
    upward one would be reported."""
    arrows = {(layer(m), layer(t)) for m in MODULES for t, _ in imports(m)}
    for upper in LAYERS[1:]:
        assert any(a == upper and b != upper for a, b in arrows), upper
    assert ("core", "face") not in arrows
    assert _strongly_connected({"a": {"b"}, "b": {"a"}, "c": set()}) in (
        [["a", "b"], ["c"]], [["c"], ["a", "b"]], [["b", "a"], ["c"]], [["c"], ["b", "a"]],
    )  # fmt: skip


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively (no recursion limit to meet)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start, targets in graph.items():
        if start in index:
            continue
        work = [(start, iter(sorted(targets)))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                found.append(component)
    return found


def test_every_package_is_installed() -> None:
    """A subpackage pyproject.toml does not list is missing from the wheel and the Debian
    package (spoold.face.api was, once, and the packaged daemon could not start its API)."""
    import tomllib  # noqa: PLC0415

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])  # fmt: skip
    packages = {m for m, path in MODULES.items() if path.name == "__init__.py"}
    assert packages - listed == set(), "add them to [tool.setuptools] packages"
