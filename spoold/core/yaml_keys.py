"""YAML mappings whose plain keys are names, as JSON's are: the one rule a job file and the
config share, kept apart from ``documents`` so that reading the config stays light; the one walk
that finds a key given twice (the config refuses it in its one parse, ``UniqueKeysLoader``; a
job file's refusal says where, spoold.core.documents.map_nodes); and the config's loader."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, NamedTuple

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

try:
    from yaml import CSafeLoader as SafeLoader
except ImportError:  # PyYAML built without libyaml: slower, same results
    from yaml import SafeLoader  # type: ignore[assignment]

__all__ = ["KeyGivenTwice", "NamedKeysLoader", "SafeLoader", "UniqueKeysLoader"]

_BOOL_TAG = "tag:yaml.org,2002:bool"
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class KeyGivenTwice(NamedTuple):
    """A key one mapping gives twice: its path, where it is written the second time (1-based
    line and column) and the line it is written on first."""

    path: tuple[Hashable, ...]
    line: int
    column: int
    first_line: int


class NamedKeysLoader(SafeLoader):
    """The safe loader, with a plain key that YAML 1.1 reads as a boolean (``on``, ``off``,
    ``yes``, ``no``, ``y``, ``n``, ``true``, ``false``) read as the name it is: ``on:
    [failed]``, as the spec writes a notification's events, is the key "on", not True."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        for key, _ in node.value:
            # Plain: no style (libyaml says "", PyYAML None); `"on": x` is a string already.
            if isinstance(key, ScalarNode) and not key.style and key.tag == _BOOL_TAG:
                key.tag = _STR_TAG
        return super().construct_mapping(node, deep)

    def keys_given_twice(self, root: Node) -> list[KeyGivenTwice]:
        """Each key a mapping of ``root``'s document gives twice (YAML keeps the last
        silently), in the order they are written. A key a ``<<:`` merge brings and the mapping
        overrides is no duplicate."""
        found: list[KeyGivenTwice] = []
        seen_nodes: set[int] = set()  # an alias's node is walked once, not once per alias
        stack: list[tuple[tuple[Hashable, ...], Node]] = [((), root)]
        while stack:
            path, node = stack.pop()
            if id(node) in seen_nodes:
                continue
            seen_nodes.add(id(node))
            if isinstance(node, SequenceNode):
                stack.extend(((*path, n), item) for n, item in enumerate(node.value))
            if not isinstance(node, MappingNode):
                continue
            keys: dict[Hashable, Node] = {}
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:
                    stack.append((path, value_node))
                    continue
                key = self.key_of(key_node)
                if key in keys:
                    second, first = key_node.start_mark, keys[key].start_mark
                    found.append(
                        KeyGivenTwice((*path, key), second.line + 1, second.column + 1,
                                      first.line + 1)
                    )  # fmt: skip
                keys[key] = key_node
                stack.append(((*path, key), value_node))
        return sorted(found, key=lambda twice: (twice.line, twice.column))

    def key_of(self, node: Node) -> Hashable:
        """The key ``node`` makes, as construct_mapping will make it; one no other equals for
        a key that is no scalar (the constructor refuses those anyway)."""
        if not isinstance(node, ScalarNode):
            return ("<not a scalar>", id(node))
        if not node.style and node.tag == _BOOL_TAG:
            return str(node.value)  # the name written, as construct_mapping reads it
        construct = self.yaml_constructors.get(node.tag)
        if construct is None:
            return (node.tag, node.value)
        try:
            key = construct(self, node)
        except (ValueError, TypeError, yaml.YAMLError):  # the real construction says what
            return (node.tag, node.value)
        return key if isinstance(key, Hashable) else (node.tag, node.value)


class UniqueKeysLoader(NamedKeysLoader):
    """The named-keys loader that also finds each key one mapping gives twice (YAML keeps the
    last silently), in the one parse that loads the document: for the config, which refuses
    them whichever command reads it. A key a ``<<:`` merge brings and the mapping overrides is
    no duplicate."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.given_twice: list[KeyGivenTwice] = []

    def construct_document(self, node: Node) -> Any:
        self.given_twice = self.keys_given_twice(node)
        return super().construct_document(node)
