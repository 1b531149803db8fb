"""Reading job files: YAML or JSON as plain data, with the position of every value.

The loader takes JSON's types only (no dates, sets or 1:30 == 90), refuses tags, notes duplicate
keys, and bounds what aliases, merges and nesting can expand to before anything walks the result.
"""

from __future__ import annotations

import json
import re
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from spoold.core.errors import InvalidJobFile, ValidationIssue
from spoold.core.yaml_keys import KeyGivenTwice, NamedKeysLoader, UniqueKeysLoader
from spoold.core.yaml_keys import SafeLoader as _SafeLoader

DocPath = tuple[Hashable, ...]
MAX_DEPTH = 64
MERGE_TAG = "tag:yaml.org,2002:merge"
_PARSER_DEPTH_BOUND = 1000  # libyaml composes recursively: ~0.4 MB of C stack at this depth
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
#: The user and password of a URL (``scheme://user:password@``), up to its last ``@``.
_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^\s/?#'\"<>]*@")
TYPE_WORDS = {"object": "a mapping", "array": "a list", "string": "a string", "null": "null",
               "number": "a number", "integer": "an integer", "boolean": "a boolean"}  # fmt: skip


def _plain_data(loader: type[_SafeLoader]) -> tuple[dict[Any, Any], dict[Any, Any]]:
    """Resolvers and constructors for JSON's types only: no dates, sets, bytes or 1:30 == 90."""
    no_sexagesimal = {
        "tag:yaml.org,2002:int": re.compile(
            r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"
        ),
        "tag:yaml.org,2002:float": re.compile(
            r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
            r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
        ),
    }
    dropped = {f"tag:yaml.org,2002:{t}" for t in ("timestamp", "set", "omap", "pairs", "binary")}
    resolvers = {
        first: [(tag, no_sexagesimal.get(tag, rx)) for tag, rx in entries if tag not in dropped]
        for first, entries in loader.yaml_implicit_resolvers.items()
    }
    constructors = {t: f for t, f in loader.yaml_constructors.items() if t not in dropped}
    return resolvers, constructors


class JobLoader(UniqueKeysLoader):
    """The safe loader, for plain data, noting the keys given twice (``given_twice``) instead
    of keeping the last silently."""

    yaml_implicit_resolvers, yaml_constructors = _plain_data(_SafeLoader)

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._explicit_keys: dict[int, int] = {}  # a mapping's own keys, by id: how many
        self._shortened = False  # whether a mapping came out with fewer keys than pairs
        #: The pairs of each mapping with a ``<<:``, as written (flatten_mapping rewrites them).
        self._written: dict[int, tuple[MappingNode, list[tuple[Node, Node]]]] = {}

    def construct_document(self, node: Node) -> Any:
        # A job's parse is on intake's path: the walk only where a mapping came out shorter
        # than it was written (a key given twice, or one a merge brought and it overrides).
        document = NamedKeysLoader.construct_document(self, node)
        if self._shortened:
            for mapping, pairs in self._written.values():
                mapping.value = pairs  # the walk tells a merge from a key given twice
            self.given_twice = self.keys_given_twice(node)
        return document

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        mapping = super().construct_mapping(node, deep)
        self._shortened = self._shortened or len(mapping) < len(node.value)
        return mapping

    def flatten_mapping(self, node: MappingNode) -> None:
        keys = self._explicit_keys.setdefault(
            id(node), len([k for k, _ in node.value if k.tag != MERGE_TAG])
        )
        if keys < len(node.value):
            self._written.setdefault(id(node), (node, list(node.value)))
        super().flatten_mapping(node)
        # Merges of merges repeat pairs: keeping the last of each stops a few lines of `<<:`
        # from growing into billions of pairs before any size check can run.
        if len(node.value) > keys:
            last = {id(key): i for i, (key, _) in enumerate(node.value)}
            node.value = [pair for i, pair in enumerate(node.value) if last[id(pair[0])] == i]


def decode_text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line = before.count(b"\n") + 1
        column = len(before[before.rfind(b"\n") + 1 :].decode("utf-8", "replace")) + 1
        message = f"the file is not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start}"
        raise InvalidJobFile([ValidationIssue(message, "", line, column)]) from None


def read_json(text: str) -> tuple[Any, list[Hashable]]:
    duplicates: list[Hashable] = []

    def mapping(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)
        if len(result) < len(pairs):
            names = [name for name, _ in pairs]
            duplicates.extend(name for i, name in enumerate(names) if name in names[:i])
        return result

    try:
        return json.loads(text.removeprefix("\ufeff"), object_pairs_hook=mapping), duplicates
    except json.JSONDecodeError as exc:
        issue = ValidationIssue(f"invalid JSON: {exc.msg}", "", exc.lineno, exc.colno)
    except RecursionError:
        issue = ValidationIssue(f"the document is nested more than {MAX_DEPTH} levels deep", "")
    raise InvalidJobFile([issue])


def read_yaml(text: str) -> tuple[Any, list[Hashable]]:
    if too_deep := _nesting_issue(text):
        raise InvalidJobFile([too_deep])
    try:
        loader = JobLoader(text)
        try:
            return loader.get_single_data(), [twice.path[-1] for twice in loader.given_twice]
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        issue = _yaml_issue(exc, text)
    except RecursionError:  # the constructor recurses through chains of `<<:` merges
        issue = ValidationIssue("the document's `<<:` merges are nested too deeply", "")
    raise InvalidJobFile([issue])


def _nesting_issue(text: str) -> ValidationIssue | None:
    """Where the text first nests deeper than MAX_DEPTH, if it does, found without recursing.

    libyaml reads flow collections ahead, and since 0.2.6 refuses nesting past its own limit
    (1000 levels) before it yields their first event. Where it refuses the text, PyYAML's
    pure-Python parser, which has no such limit, looks again: the limit a person is told of is
    spoold's, whichever libyaml is installed.
    """
    if sum(map(text.count, "[{-?:")) < _PARSER_DEPTH_BOUND:  # every level needs one of these
        return None
    loaders: list[type[JobLoader] | type[yaml.SafeLoader]] = [JobLoader]
    if yaml.__with_libyaml__:  # JobLoader is libyaml's: PyYAML's own parser looks again
        loaders.append(yaml.SafeLoader)
    for loader in loaders:
        depth = 0
        try:
            for event in yaml.parse(text, Loader=loader):
                if isinstance(event, yaml.CollectionStartEvent):
                    depth += 1
                    if depth > MAX_DEPTH:
                        mark = event.start_mark
                        message = f"the document is nested more than {MAX_DEPTH} levels deep"
                        if mark is None:
                            return ValidationIssue(message, "")
                        return ValidationIssue(message, "", mark.line + 1, mark.column + 1)
                elif isinstance(event, yaml.CollectionEndEvent):
                    depth -= 1
        except yaml.YAMLError:
            continue  # loading reports it, unless the next parser finds the nesting first
        return None
    return None


def _yaml_issue(exc: yaml.YAMLError, text: str) -> ValidationIssue:
    if isinstance(exc, yaml.reader.ReaderError):  # libyaml counts bytes of UTF-8
        before = text.encode("utf-8")[: exc.position].decode("utf-8", "replace")
        line, column = before.count("\n") + 1, len(before) - before.rfind("\n")
        return ValidationIssue(f"invalid YAML: {exc.reason}", "", line, column)
    if not isinstance(exc, yaml.MarkedYAMLError):
        return ValidationIssue(f"invalid YAML: {exc}", "")
    mark, problem, context = exc.problem_mark or exc.context_mark, exc.problem or "", exc.context
    if "could not determine a constructor for the tag" in problem:
        tag = problem.split("'")[1].replace("tag:yaml.org,2002:", "!!")
        message = f"the tag '{tag}' is not allowed: a job file holds plain data only"
    elif context and "expected a single document" in context:
        message = "the file holds more than one YAML document; a job file is exactly one"
    elif context and exc.context_mark and exc.problem_mark:
        message = f"invalid YAML: {problem}, {context} on line {exc.context_mark.line + 1}"
    else:
        message = f"invalid YAML: {problem or context}"
    if mark is None:
        return ValidationIssue(message, "")
    lines = text.split("\n")
    if mark.line < len(lines) and "\t" in lines[mark.line][: mark.column + 1]:
        message += " (YAML does not allow tabs for indentation)"
    return ValidationIssue(message, "", mark.line + 1, mark.column + 1)


def size_problem(document: Any, max_nodes: int) -> str | None:
    """Count values as a validator sees them: an alias is walked again at each use."""
    count, stack = 0, [(document, 1)]
    while stack:
        value, depth = stack.pop()
        children = list(value.values()) if isinstance(value, dict) else value
        count += len(children)
        if count > max_nodes:
            return f"the document expands to more than {max_nodes} values (YAML aliases?)"
        if depth > MAX_DEPTH:
            return f"the document is nested more than {MAX_DEPTH} levels deep"
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return None


@dataclass
class NodeMap:
    values: dict[DocPath, tuple[int, int]] = field(default_factory=dict)
    keys: dict[DocPath, tuple[int, int]] = field(default_factory=dict)
    duplicates: list[KeyGivenTwice] = field(default_factory=list)


def position(node: Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def map_nodes(text: str, max_nodes: int) -> NodeMap:
    """Where each value and each mapping key of the document is, by path, its keys read as the
    loader reads them (a plain ``on:`` is "on"); and the keys given twice."""
    found = NodeMap()
    loader = JobLoader(text)
    try:
        root = loader.get_single_node()
    except (yaml.YAMLError, RecursionError):
        return found  # JSON that YAML cannot read: its issues go out without positions
    finally:
        loader.dispose()
    if root is None:
        return found
    found.duplicates = loader.keys_given_twice(root)
    stack: list[tuple[DocPath, Node]] = [((), root)]
    while stack and len(found.values) < max_nodes:
        path, node = stack.pop()
        found.values[path] = position(node)
        if isinstance(node, SequenceNode):
            stack.extend(((*path, i), item) for i, item in enumerate(node.value))
        if not isinstance(node, MappingNode):
            continue
        pairs: dict[Hashable, tuple[Node, Node]] = {}
        for key_node, value_node in (p for p in node.value if p[0].tag != MERGE_TAG):
            pairs[loader.key_of(key_node)] = (key_node, value_node)
        for merged in (v for k, v in node.value if k.tag == MERGE_TAG):
            for source in merged.value if isinstance(merged, SequenceNode) else [merged]:
                for key_node, value_node in source.value:  # earlier sources win; one level
                    if key_node.tag != MERGE_TAG:
                        pairs.setdefault(loader.key_of(key_node), (key_node, value_node))
        for key, (key_node, value_node) in pairs.items():
            found.keys[(*path, key)] = position(key_node)
            stack.append(((*path, key), value_node))
    return found


def document_positions(text: str, max_nodes: int = 100_000) -> dict[DocPath, tuple[int, int]]:
    """1-based (line, column) of each value of a YAML or JSON text, by its path."""
    return map_nodes(text, max_nodes).values


def units_of(document: Mapping[str, Any]) -> list[tuple[DocPath, Mapping[str, Any]]]:
    """The job's units as its file has them, each with its place: the job itself (``()``),
    then each step that is a mapping (``("steps", n)``). A step that is not one is the
    schema's to refuse, and skipped here."""
    steps = document.get("steps")
    found: list[tuple[DocPath, Mapping[str, Any]]] = [((), document)]
    if isinstance(steps, list):
        found += [(("steps", n), step) for n, step in enumerate(steps) if isinstance(step, Mapping)]
    return found


def format_path(path: DocPath) -> str:
    """A path as messages show it: ``product.commands[1]``."""
    out = ""
    for part in path:
        if isinstance(part, str) and _PLAIN_KEY.fullmatch(part):
            out += f".{part}" if out else part
        elif isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        elif isinstance(part, str):
            out += f"[{json.dumps(without_userinfo(part))}]"
        else:
            out += f"[{show_value(part)}]"
    return out


def without_userinfo(text: str) -> str:
    """``text`` with the user and password of every URL in it taken out (``scheme://***@``)."""
    return _USERINFO.sub(r"\1***@", text) if "://" in text else text


def show_value(value: Any) -> str:
    """A value as a message quotes it: cut short, and no URL's user or password in it (taken
    out before the cut, which could leave a password without its ``@``)."""
    if isinstance(value, str):
        value = without_userinfo(value)
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return repr(value) if isinstance(value, int | float) else kind_of(value)


def kind_of(value: Any) -> str:
    json_type = {bool: "boolean", type(None): "null", str: "string", int: "number",
                 float: "number", dict: "object", list: "array"}.get(type(value))  # fmt: skip
    return TYPE_WORDS[json_type] if json_type else f"a {type(value).__name__}"


def load_document(data: bytes, filename: str) -> Any:
    """Parse a job file with exactly the loader validation uses, without validating it.

    For files already accepted: what runs must be what was validated (``10:30`` stays a
    string here, where a plain YAML 1.1 loader would make it 630).
    """
    text = decode_text(data)
    document, _ = (read_json if filename.lower().endswith(".json") else read_yaml)(text)
    return document


def load_executor_schema(package: str, resource: str) -> dict[str, Any]:
    """A JSON schema shipped as package data, such as an executor's product sub-schema."""
    text = resources.files(package).joinpath(resource).read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema
