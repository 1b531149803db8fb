"""YAML mappings whose plain keys are names, as JSON's are: the one rule a job file and the
config share, kept apart from ``documents`` so that reading the config stays light."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from yaml.nodes import MappingNode, ScalarNode

try:
    from yaml import CSafeLoader as SafeLoader
except ImportError:  # PyYAML built without libyaml: slower, same results
    from yaml import SafeLoader  # type: ignore[assignment]

__all__ = ["NamedKeysLoader", "SafeLoader"]

_BOOL_TAG = "tag:yaml.org,2002:bool"
_STR_TAG = "tag:yaml.org,2002:str"


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
