"""Job files: YAML/JSON loading, schema validation, and messages with line, column and path.

The valid path is what every job pays for, so it only runs libyaml, a precompiled validator and a
cheap size walk. Positions are worked out only when something is wrong, by composing the text a
second time into nodes that remember where they came from.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any
from urllib.parse import quote

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from spoold.errors import InvalidJobFile

try:
    from yaml import CSafeLoader as _SafeLoader
except ImportError:  # PyYAML built without libyaml: slower, same results
    from yaml import SafeLoader as _SafeLoader  # type: ignore[assignment]

DocPath = tuple[Hashable, ...]
_Problem = tuple[str, DocPath, bool]  # message, path, point at the key rather than the value

MAX_DEPTH = 64
_MERGE = "tag:yaml.org,2002:merge"
# More "[{-?:" than this and the text could nest deep enough to overflow libyaml's C stack.
_PARSER_DEPTH_BOUND = 1000
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_TYPE_WORDS = {"object": "a mapping", "array": "a list", "string": "a string", "number": "a number",
               "integer": "an integer", "boolean": "a boolean", "null": "null"}  # fmt: skip
_PLAIN_NAME = (
    "use letters, digits, '.', '_' and '-', starting with a letter or digit, at most 128 characters"
)
# Keyed by the `title` of the schema that holds the pattern, so plugins can reuse them.
_PATTERN_MESSAGES = {
    "job id": "job id {} is not a plain name: " + _PLAIN_NAME,
    "step id": "step id {} is not a plain name: " + _PLAIN_NAME,
    "duration": "{} is not a duration like 30s, 10m, 1h30m",
    "variable name": "variable name {} is not valid: use letters, digits and '_', not starting with a digit",
    "relative path": "{} is not a path inside the work dir: no leading '/' and no '..'",
    "cron expression": "{} is not a cron expression of 5 fields: minute hour day month weekday",
}


@dataclass(frozen=True)
class ValidationIssue:
    """One problem in a job file, with where it is."""

    message: str
    path: str
    line: int | None = None
    column: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The issue as it is written to reason.json."""
        return {
            "message": self.message,
            "path": self.path,
            "line": self.line,
            "column": self.column,
        }

    def format(self, filename: str) -> str:
        """``file:line:column: path: message``, leaving out the parts that are unknown."""
        where = filename
        if self.line is not None:
            where += f":{self.line}" + (f":{self.column}" if self.column is not None else "")
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


def load_base_schema() -> dict[str, Any]:
    """The job file's schema without executors, as shipped in ``spoold.schemas``."""
    return load_executor_schema("spoold.schemas", "job.schema.json")


def load_executor_schema(package: str, resource: str) -> dict[str, Any]:
    """A JSON schema shipped as package data, e.g. an executor's product sub-schema."""
    schema: dict[str, Any] = json.loads(
        resources.files(package).joinpath(resource).read_text("utf-8")
    )
    return schema


def compose_job_schema(
    base: Mapping[str, Any], executor_schemas: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """The full job schema: ``executor`` limited to these names, each one's ``product`` checked."""
    schema = copy.deepcopy(dict(base))
    defs = schema.setdefault("$defs", {})
    names = sorted(executor_schemas)
    defs["executor"] = {"description": "An installed executor.", "type": "string", "enum": names}
    job_clauses, step_clauses = [], []
    for name in names:
        sub = dict(copy.deepcopy(executor_schemas[name]))
        # An $id of its own keeps the sub-schema's internal "#/..." references pointing into it.
        sub.setdefault("$id", f"urn:spoold:schema:executor:{quote(name, safe='')}")
        key = f"product.{name}"
        defs[key] = sub
        then: dict[str, Any] = {
            "properties": {"product": {"$ref": "#/$defs/" + quote(_pointer_escape(key), safe="")}}
        }
        if sub.get("required"):
            then["required"] = ["product"]
        when = {"required": ["executor"], "properties": {"executor": {"const": name}}}
        step_clauses.append({"if": when, "then": then})
        # Steps that name no executor run with the job's, so its product rules apply to them.
        inherited = {"items": {"if": {"not": {"required": ["executor"]}}, "then": then}}
        job_then = {**then, "properties": {**then["properties"], "steps": inherited}}
        job_clauses.append({"if": when, "then": job_then})
    schema["allOf"] = [*schema.get("allOf", []), *job_clauses]
    if "step" in defs:
        defs["step"] = {**defs["step"], "allOf": [*defs["step"].get("allOf", []), *step_clauses]}
        defs["step"]["properties"] = {
            **defs["step"]["properties"],
            "executor": {"$ref": "#/$defs/executor"},
        }
    schema["properties"] = {
        **schema.get("properties", {}),
        "executor": {"$ref": "#/$defs/executor"},
    }
    return schema


def _pointer_escape(segment: str) -> str:
    return segment.replace("~", "~0").replace("/", "~1")


def _plain_data_resolvers(resolvers: dict[Any, Any]) -> dict[Any, Any]:
    """YAML 1.1 reads 2024-01-01 as a date and 1:30 as 90; in a job file both mean the text."""
    no_sexagesimal = {
        "tag:yaml.org,2002:int": re.compile(
            r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"
        ),
        "tag:yaml.org,2002:float": re.compile(
            r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
            r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
        ),
    }
    return {
        first: [
            (tag, no_sexagesimal.get(tag, rx))
            for tag, rx in entries
            if tag != "tag:yaml.org,2002:timestamp"
        ]
        for first, entries in resolvers.items()
    }


class _JobLoader(_SafeLoader):
    """The safe loader, plain data only, noting duplicate keys instead of dropping them silently."""

    yaml_implicit_resolvers = _plain_data_resolvers(_SafeLoader.yaml_implicit_resolvers)

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicate_keys: list[Hashable] = []

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Hashable] = set()
        for key_node, _ in node.value:
            if key_node.tag != _MERGE and isinstance(
                key := self.construct_object(key_node, deep), Hashable
            ):
                if key in seen:
                    self.duplicate_keys.append(key)
                seen.add(key)
        return super().construct_mapping(node, deep)

    def flatten_mapping(self, node: MappingNode) -> None:
        super().flatten_mapping(node)
        # Merges of merges repeat the same pairs: keep the last of each, or a few lines of `<<:`
        # grow into billions of pairs before any size check could run.
        last = {id(key): i for i, (key, _) in enumerate(node.value)}
        if len(last) < len(node.value):
            node.value = [pair for i, pair in enumerate(node.value) if last[id(pair[0])] == i]


@dataclass
class _Loaded:
    document: Any
    duplicate_keys: list[Hashable]


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line = before.count(b"\n") + 1
        column = len(before[before.rfind(b"\n") + 1 :].decode("utf-8", "replace")) + 1
        message = f"the file is not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start} is not valid UTF-8"
        raise InvalidJobFile([ValidationIssue(message, "", line, column)]) from None


def _load_json(text: str) -> _Loaded:
    duplicates: list[Hashable] = []

    def mapping(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)
        if len(result) < len(pairs):
            seen: set[str] = set()
            duplicates.extend(key for key, _ in pairs if key in seen or seen.add(key))  # type: ignore[func-returns-value]
        return result

    try:
        return _Loaded(
            json.loads(text.removeprefix("\ufeff"), object_pairs_hook=mapping), duplicates
        )
    except json.JSONDecodeError as exc:
        raise InvalidJobFile(
            [ValidationIssue(f"invalid JSON: {exc.msg}", "", exc.lineno, exc.colno)]
        ) from None
    except RecursionError:
        raise InvalidJobFile(
            [ValidationIssue(f"the document is nested more than {MAX_DEPTH} levels deep", "")]
        ) from None


def _load_yaml(text: str) -> _Loaded:
    if _nests_too_deep(text):
        raise InvalidJobFile(
            [ValidationIssue(f"the document is nested more than {MAX_DEPTH} levels deep", "")]
        )
    loader = _JobLoader(text)
    try:
        return _Loaded(loader.get_single_data(), loader.duplicate_keys)
    except yaml.YAMLError as exc:
        raise InvalidJobFile([_yaml_error_issue(exc, text)]) from None
    except RecursionError:  # merge chains: the constructor recurses through them
        raise InvalidJobFile(
            [ValidationIssue("the document's `<<:` merges nest too deeply", "")]
        ) from None
    finally:
        loader.dispose()


def _nests_too_deep(text: str) -> bool:
    """Whether the text nests deeper than MAX_DEPTH, checked without recursion where it could."""
    if sum(map(text.count, "[{-?:")) < _PARSER_DEPTH_BOUND:  # each level needs one of these
        return False
    depth = 0
    try:
        for event in yaml.parse(text, Loader=_JobLoader):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    return True
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    except yaml.YAMLError:
        pass  # loading reports it, and cannot get deeper than the events read so far
    return False


def _yaml_error_issue(exc: yaml.YAMLError, text: str) -> ValidationIssue:
    if isinstance(exc, yaml.reader.ReaderError):
        # libyaml counts this offset in the UTF-8 bytes it was given.
        before = text.encode("utf-8")[: exc.position].decode("utf-8", "replace")
        line, column = before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1
        return ValidationIssue(
            f"invalid YAML: {exc.reason} (character {exc.character!r})", "", line, column
        )
    if not isinstance(exc, yaml.MarkedYAMLError):
        return ValidationIssue(f"invalid YAML: {exc}", "")
    mark = exc.problem_mark or exc.context_mark
    problem, context = exc.problem or "", exc.context or ""
    if "could not determine a constructor for the tag" in problem:
        tag = problem.split("'")[1].replace("tag:yaml.org,2002:", "!!")
        message = f"the tag '{tag}' is not allowed: a job file holds plain data only"
    elif "expected a single document" in context:
        message = "the file holds more than one YAML document; a job file is exactly one"
    else:
        where = (
            f" (line {exc.context_mark.line + 1})" if exc.context_mark and exc.problem_mark else ""
        )
        message = f"invalid YAML: {problem}" + (f", {context}{where}" if context else "")
    return ValidationIssue(
        message, "", mark.line + 1 if mark else None, mark.column + 1 if mark else None
    )


def _size_problem(document: Any, max_nodes: int) -> str | None:
    """Count values as the validator will see them: an alias is walked again at each use."""
    count, stack = 0, [(document, 1)]
    while stack:
        value, depth = stack.pop()
        children = list(value.values()) if isinstance(value, dict) else value
        count += len(children)
        if count > max_nodes:
            return f"the document expands to more than {max_nodes} values (YAML aliases?)"
        if depth > MAX_DEPTH:
            return f"the document is nested more than {MAX_DEPTH} levels deep"
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return None


@dataclass
class _NodeMap:
    values: dict[DocPath, tuple[int, int]] = field(default_factory=dict)
    keys: dict[DocPath, tuple[int, int]] = field(default_factory=dict)
    duplicates: list[tuple[DocPath, Node, Node]] = field(
        default_factory=list
    )  # path, second, first key


def _map_nodes(text: str, max_nodes: int) -> _NodeMap:
    """Where each value (and each mapping key) of the document is, by its path."""
    found = _NodeMap()
    try:
        root = yaml.compose(text, Loader=_JobLoader)
    except (yaml.YAMLError, RecursionError):
        return found  # JSON that YAML cannot read: the issues go out without positions
    constructor = yaml.constructor.SafeConstructor()
    pairs_memo: dict[int, tuple[dict[Hashable, tuple[Node, Node]], list[tuple[Node, Node]]]] = {}

    def key_of(node: Node) -> Hashable:
        if isinstance(node, ScalarNode):
            key = constructor.construct_object(node)
            if isinstance(key, Hashable):
                return key
        return ("<complex key>", id(node))

    def pairs_of(
        node: MappingNode,
    ) -> tuple[dict[Hashable, tuple[Node, Node]], list[tuple[Node, Node]]]:
        if id(node) not in pairs_memo:
            pairs: dict[Hashable, tuple[Node, Node]] = {}
            duplicates, merged = [], []
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE:
                    merged.extend(
                        value_node.value if isinstance(value_node, SequenceNode) else [value_node]
                    )
                    continue
                key = key_of(key_node)
                if key in pairs:
                    duplicates.append((key_node, pairs[key][0]))
                pairs[key] = (key_node, value_node)
            for source in merged:  # explicit keys win, then the earlier merged mapping
                if isinstance(source, MappingNode):
                    for key, pair in pairs_of(source)[0].items():
                        pairs.setdefault(key, pair)
            pairs_memo[id(node)] = (pairs, duplicates)
        return pairs_memo[id(node)]

    stack: list[tuple[DocPath, Node]] = [((), root)] if root is not None else []
    while stack and len(found.values) < max_nodes:
        path, node = stack.pop()
        found.values[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, SequenceNode):
            stack.extend(((*path, i), item) for i, item in enumerate(node.value))
        elif isinstance(node, MappingNode):
            first_visit = id(node) not in pairs_memo
            pairs, duplicates = pairs_of(node)
            if first_visit:
                found.duplicates.extend(
                    ((*path, key_of(second)), second, first) for second, first in duplicates
                )
            for key, (key_node, value_node) in pairs.items():
                found.keys[(*path, key)] = (
                    key_node.start_mark.line + 1,
                    key_node.start_mark.column + 1,
                )
                stack.append(((*path, key), value_node))
    return found


def document_positions(text: str, max_nodes: int = 100_000) -> dict[DocPath, tuple[int, int]]:
    """1-based (line, column) of each value in a YAML or JSON text, by its path in the document."""
    return _map_nodes(text, max_nodes).values


def format_path(path: DocPath) -> str:
    """``product.commands[1]``: the form paths take in messages."""
    out = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        elif isinstance(part, str) and _PLAIN_KEY.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part) if isinstance(part, str) else _show(part)}]"
    return out


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return repr(value) if isinstance(value, int | float) else _kind(value)


def _kind(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return _TYPE_WORDS["boolean" if value is not None else "null"]
    for python_type, word in (
        (str, "string"),
        (int | float, "number"),
        (dict, "object"),
        (list, "array"),
    ):
        if isinstance(value, python_type):
            return _TYPE_WORDS[word]
    return f"a {type(value).__name__}"


def _or_list(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _error_problems(error: ValidationError, executors: list[str]) -> Iterator[_Problem]:
    """What a person should read for one jsonschema error, drilled down where it is vague."""
    path, kind, value, instance = (
        tuple(error.absolute_path),
        error.validator,
        error.validator_value,
        error.instance,
    )
    schema = error.schema if isinstance(error.schema, Mapping) else {}
    if kind in ("anyOf", "oneOf"):
        yield from _branch_problems(error, executors)
    elif kind == "additionalProperties":
        allowed = [str(name) for name in schema.get("properties", {})]
        patterns = list(schema.get("patternProperties", {}))
        for key in instance:
            if key not in allowed and not any(re.search(p, str(key)) for p in patterns):
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                hint = hint or (
                    f" (allowed: {', '.join(allowed)})" if 0 < len(allowed) <= 8 else ""
                )
                yield f"unknown field {_show(key)}{hint}", (*path, key), True
    elif kind == "required":
        for name in value:
            if name not in instance:
                yield f"missing required field {_show(name)}", path, False
    elif kind == "type":
        expected = [_TYPE_WORDS.get(t, t) for t in ([value] if isinstance(value, str) else value)]
        yield f"must be {_or_list(expected)}, not {_kind(instance)}", path, False
    elif kind == "pattern":
        on_key = "propertyNames" in error.absolute_schema_path
        template = _PATTERN_MESSAGES.get(
            schema.get("title", ""), "{} does not match the pattern " + str(value)
        )
        yield template.format(_show(instance)), (*path, instance) if on_key else path, on_key
    elif kind == "enum" and path[-1:] == ("executor",) and len(path) in (1, 3):
        yield (
            f"unknown executor {_show(instance)} (installed: {', '.join(executors) or 'none'})",
            path,
            False,
        )
    elif kind == "enum":
        yield f"must be one of: {', '.join(map(str, value))} (got {_show(instance)})", path, False
    else:
        yield _simple_message(error), path, False


def _simple_message(error: ValidationError) -> str:
    kind, value, instance = error.validator, error.validator_value, error.instance
    messages = {
        "const": lambda: f"must be {_show(value)} (got {_show(instance)})",
        "minItems": lambda: (
            "must not be empty" if value == 1 else f"must have at least {value} items"
        ),
        "maxItems": lambda: f"must have at most {value} items",
        "minLength": lambda: (
            "must not be empty" if value == 1 else f"must be at least {value} characters long"
        ),
        "maxLength": lambda: f"must be at most {value} characters long",
        "minimum": lambda: f"must be at least {value} (got {_show(instance)})",
        "maximum": lambda: f"must be at most {value} (got {_show(instance)})",
        "exclusiveMinimum": lambda: f"must be more than {value} (got {_show(instance)})",
        "exclusiveMaximum": lambda: f"must be less than {value} (got {_show(instance)})",
        "uniqueItems": lambda: "must not list the same item twice",
        "format": lambda: f"{_show(instance)} is not a valid {value}",
        "not": lambda: f"{_show(instance)} is not allowed here",
    }
    make = messages.get(kind) if isinstance(kind, str) else None
    return make() if make else error.message


def _branch_problems(error: ValidationError, executors: list[str]) -> Iterator[_Problem]:
    """For anyOf/oneOf, the errors of the alternative the value was closest to."""
    path, options = tuple(error.absolute_path), error.validator_value
    if all(isinstance(option, dict) and set(option) == {"required"} for option in options):
        names = [f"'{name}'" for option in options for name in option["required"]]
        if error.context:
            yield f"missing required field {_or_list(names)}", path, False
        else:
            yield f"give only one of {_or_list(names)}", path, False
        return
    if not error.context:  # oneOf, and more than one alternative fits
        yield "fits more than one of the allowed forms; it must fit exactly one", path, False
        return
    branches: dict[Hashable, list[ValidationError]] = {}
    for sub in error.context:
        branches.setdefault(sub.relative_schema_path[0], []).append(sub)
    fitting = [errors for errors in branches.values() if not all(_rejects_type(e) for e in errors)]
    if not fitting:
        expected = list(dict.fromkeys(word for e in error.context for word in _expected_types(e)))
        yield f"must be {_or_list(expected)}, not {_kind(error.instance)}", path, False
        return
    best = max(
        fitting, key=lambda errors: (max(len(e.relative_path) for e in errors), -len(errors))
    )
    for sub in best:
        yield from _error_problems(sub, executors)


def _rejects_type(error: ValidationError) -> bool:
    if error.relative_path:
        return False
    if error.validator in ("anyOf", "oneOf"):
        return bool(error.context) and all(_rejects_type(sub) for sub in error.context)
    return error.validator == "type"


def _expected_types(error: ValidationError) -> Iterator[str]:
    if error.validator == "type":
        value = error.validator_value
        yield from (_TYPE_WORDS.get(t, t) for t in ([value] if isinstance(value, str) else value))
    for sub in error.context:
        yield from _expected_types(sub)


def _step_problems(document: Mapping[Hashable, Any]) -> list[_Problem]:
    """What the schema cannot say about steps: unique ids, known needs, no cycles."""
    steps = document.get("steps")
    if not isinstance(steps, list):
        return []
    problems: list[_Problem] = []
    index: dict[str, int] = {}
    for i, step in enumerate(steps):
        step_id = step.get("id") if isinstance(step, dict) else None
        if isinstance(step_id, str) and step_id in index:
            problems.append(
                (
                    f"duplicate step id '{step_id}' (also steps[{index[step_id]}])",
                    ("steps", i, "id"),
                    False,
                )
            )
        elif isinstance(step_id, str):
            index[step_id] = i
    graph: dict[str, list[str]] = {}
    for step_id, i in index.items():
        needs = steps[i].get("needs")
        needs = [need for need in needs if isinstance(need, str)] if isinstance(needs, list) else []
        graph[step_id] = [need for need in needs if need in index]
        for j, need in enumerate(needs):
            if need not in index:
                close = difflib.get_close_matches(need, list(index), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                problems.append(
                    (f"needs unknown step '{need}'{hint}", ("steps", i, "needs", j), False)
                )
    for cycle in _cycles(graph):
        last = index[cycle[-2]]
        where = ("steps", last, "needs", steps[last]["needs"].index(cycle[-1]))
        problems.append(("steps form a cycle: " + " -> ".join(cycle), where, False))
    return problems


def _cycles(graph: Mapping[str, list[str]]) -> list[list[str]]:
    """Each cycle found by a depth-first walk, as ``[a, b, a]``; iterative, as chains can be long."""
    state: dict[str, int] = {}  # 1: on the current trail, 2: done
    cycles: list[list[str]] = []
    for root in graph:
        if root in state:
            continue
        state[root], trail, stack = 1, [root], [iter(graph[root])]
        while stack:
            for child in stack[-1]:
                if state.get(child) == 1:
                    cycles.append([*trail[trail.index(child) :], child])
                elif child not in state:
                    state[child] = 1
                    trail.append(child)
                    stack.append(iter(graph[child]))
                    break
            else:
                state[trail.pop()] = 2
                stack.pop()
    return cycles


class JobValidator:
    """Parses and validates job files against one composed schema, compiled once."""

    def __init__(self, schema: Mapping[str, Any], *, max_nodes: int = 100_000) -> None:
        Draft202012Validator.check_schema(schema)
        self._validator = Draft202012Validator(
            schema, format_checker=Draft202012Validator.FORMAT_CHECKER
        )
        self._executors = sorted(schema.get("$defs", {}).get("executor", {}).get("enum", []))
        self._max_nodes = max_nodes

    def check(self, data: bytes, filename: str) -> list[ValidationIssue]:
        """Every problem in the file, or [] when it is a valid job."""
        try:
            self.parse(data, filename)
        except InvalidJobFile as exc:
            return exc.issues
        return []

    def parse(self, data: bytes, filename: str) -> dict[str, Any]:
        """The validated job document; raises InvalidJobFile listing every problem found."""
        text = _decode(data)
        loaded = _load_json(text) if filename.endswith(".json") else _load_yaml(text)
        document = loaded.document
        if not isinstance(document, dict):
            raise InvalidJobFile([self._shape_issue(document, text)])
        if size_problem := _size_problem(document, self._max_nodes):
            raise InvalidJobFile([ValidationIssue(size_problem, "")])
        errors = list(self._validator.iter_errors(document))
        steps = _step_problems(document)
        if not errors and not steps and not loaded.duplicate_keys:
            return document
        raise InvalidJobFile(self._issues(text, errors, steps, loaded.duplicate_keys))

    def _shape_issue(self, document: Any, text: str) -> ValidationIssue:
        if document is None and yaml.compose(text, Loader=_JobLoader) is None:
            return ValidationIssue("the file is empty", "")
        line, column = _map_nodes(text, 1).values.get((), (None, None))
        return ValidationIssue(
            f"the top level must be a mapping of job fields, not {_kind(document)}",
            "",
            line,
            column,
        )

    def _issues(
        self,
        text: str,
        errors: list[ValidationError],
        steps: list[_Problem],
        duplicate_keys: list[Hashable],
    ) -> list[ValidationIssue]:
        # A value of the wrong type fails its other keywords too; the type is the one to fix.
        mistyped = {tuple(e.absolute_path) for e in errors if e.validator == "type"}
        errors = [
            e for e in errors if e.validator == "type" or tuple(e.absolute_path) not in mistyped
        ]
        problems = [
            problem for error in errors for problem in _error_problems(error, self._executors)
        ]
        nodes = _map_nodes(text, self._max_nodes)
        issues = [self._locate(problem, nodes) for problem in [*problems, *steps]]
        for path, second, first in nodes.duplicates:
            message = f"duplicate key {_show(path[-1])} (first on line {first.start_mark.line + 1})"
            issues.append(
                ValidationIssue(
                    message,
                    format_path(path),
                    second.start_mark.line + 1,
                    second.start_mark.column + 1,
                )
            )
        if duplicate_keys and not nodes.duplicates:  # only when positions could not be worked out
            issues.extend(
                ValidationIssue(f"duplicate key {_show(key)}", "") for key in duplicate_keys
            )
        unique = list(dict.fromkeys(issues))
        return sorted(unique, key=lambda issue: (issue.line or 0, issue.column or 0))

    @staticmethod
    def _locate(problem: _Problem, nodes: _NodeMap) -> ValidationIssue:
        message, path, at_key = problem
        position = nodes.keys.get(path) if at_key else None
        parent = path
        while position is None and parent is not None:
            position = nodes.values.get(parent)
            parent = parent[:-1] if parent else None
        line, column = position or (None, None)
        return ValidationIssue(message, format_path(path), line, column)
