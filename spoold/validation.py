"""Job files: YAML/JSON loading, schema validation, and messages with line, column and path.

Every job pays for the valid path, so it is only libyaml, a compiled schema check and a size
walk. Positions and readable messages are worked out only when something is wrong, by composing
the text again into nodes that remember where they came from.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any
from urllib.parse import quote

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from spoold.errors import InvalidJobFile, PluginError

try:
    from yaml import CSafeLoader as _SafeLoader
except ImportError:  # PyYAML built without libyaml: slower, same results
    from yaml import SafeLoader as _SafeLoader  # type: ignore[assignment]
try:  # jsonschema takes ~1 ms per job; this compiles the schema to Python code
    import fastjsonschema
except ImportError:  # pragma: no cover
    fastjsonschema = None  # type: ignore[assignment]

DocPath = tuple[Hashable, ...]
_Problem = tuple[str, DocPath, bool]  # message, path, whether to point at the key
MAX_DEPTH = 64
_MERGE = "tag:yaml.org,2002:merge"
_PARSER_DEPTH_BOUND = 1000  # libyaml composes recursively: ~0.4 MB of C stack at this depth
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_TYPE_WORDS = {"object": "a mapping", "array": "a list", "string": "a string", "null": "null",
               "number": "a number", "integer": "an integer", "boolean": "a boolean"}  # fmt: skip
_PLAIN_NAME = (
    "use letters, digits, '.', '_' and '-', starting with a letter or digit, at most 128 characters"
)
# By the `title` of the schema holding the pattern, so executor sub-schemas can use them too.
_PATTERN_MESSAGES = {
    "job id": "job id {} is not a plain name: " + _PLAIN_NAME,
    "step id": "step id {} is not a plain name: " + _PLAIN_NAME,
    "duration": "{} is not a duration like 30s, 10m, 1h30m",
    "variable name": "variable name {} is not valid: use letters, digits and '_', no leading digit",
    "relative path": "{} is not a path inside the work dir: no leading '/' and no '..'",
    "cron expression": "{} is not a cron expression of 5 fields: minute hour day month weekday",
    "http(s) URL": "{} is not an http:// or https:// URL",
}


@dataclass(frozen=True)
class ValidationIssue:
    """One problem in a job file, with where it is."""

    message: str
    path: str
    line: int | None = None
    column: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The issue as reason.json and ``--json`` output carry it."""
        return {
            "message": self.message,
            "path": self.path,
            "line": self.line,
            "column": self.column,
        }

    def format(self, filename: str) -> str:
        """``file:line:column: path: message``, leaving out what is unknown."""
        where = filename + "".join(f":{n}" for n in (self.line, self.column) if n is not None)
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


def load_base_schema() -> dict[str, Any]:
    """The job file's schema before executors are added, as shipped in ``spoold.schemas``."""
    return load_executor_schema("spoold.schemas", "job.schema.json")


def load_executor_schema(package: str, resource: str) -> dict[str, Any]:
    """A JSON schema shipped as package data, such as an executor's product sub-schema."""
    text = resources.files(package).joinpath(resource).read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def compose_job_schema(
    base: Mapping[str, Any], executor_schemas: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """The full job schema: ``executor`` limited to these names, each one's ``product`` checked."""
    schema = copy.deepcopy(dict(base))
    defs = schema.setdefault("$defs", {})
    defs["executor"] = {"type": "string", "enum": sorted(executor_schemas)}
    job_clauses, step_clauses = [], []
    for name in sorted(executor_schemas):
        pointer = "#" + quote("/$defs/product." + name.replace("~", "~0").replace("/", "~1"), "/$~")
        sub = defs[f"product.{name}"] = _rebased(executor_schemas[name], pointer)
        then: dict[str, Any] = {"properties": {"product": {"$ref": pointer}}}
        if sub.get("required"):
            then["required"] = ["product"]
        when = {"required": ["executor"], "properties": {"executor": {"const": name}}}
        step_clauses.append({"if": when, "then": then})
        # Steps that name no executor run with the job's, so its product rules apply to them.
        inherit = {"items": {"if": {"not": {"required": ["executor"]}}, "then": then}}
        job_clauses.append(
            {"if": when, "then": {**then, "properties": {**then["properties"], "steps": inherit}}}
        )
    schema.setdefault("properties", {})["executor"] = {"$ref": "#/$defs/executor"}
    if job_clauses:
        schema["allOf"] = [*schema.get("allOf", []), *job_clauses]
    if isinstance(step := defs.get("step"), dict):
        step.setdefault("properties", {})["executor"] = {"$ref": "#/$defs/executor"}
        if step_clauses:
            step["allOf"] = [*step.get("allOf", []), *step_clauses]
    return schema


def _rebased(schema: Any, pointer: str, top: bool = True) -> Any:
    """A copy of a sub-schema moved to ``pointer``: its "#..." references follow it there."""
    if isinstance(schema, list):
        return [_rebased(item, pointer, top=False) for item in schema]
    if not isinstance(schema, Mapping):
        return schema
    copied: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            copied[key] = pointer + value[1:]
        elif key in ("enum", "const", "default", "examples"):  # data, not schemas
            copied[key] = copy.deepcopy(value)
        elif not (top and key in ("$id", "$schema")):  # it is no resource of its own any more
            copied[key] = _rebased(value, pointer, top=False)
    return copied


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


class _JobLoader(_SafeLoader):
    """The safe loader, for plain data, noting duplicate keys instead of keeping the last."""

    yaml_implicit_resolvers, yaml_constructors = _plain_data(_SafeLoader)

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicate_keys: list[Hashable] = []
        self._explicit_keys: dict[int, list[Node]] = {}

    def flatten_mapping(self, node: MappingNode) -> None:
        keys = self._explicit_keys.setdefault(
            id(node), [k for k, _ in node.value if k.tag != _MERGE]
        )
        super().flatten_mapping(node)
        # Merges of merges repeat pairs: keeping the last of each stops a few lines of `<<:`
        # from growing into billions of pairs before any size check can run.
        if len(node.value) > len(keys):
            last = {id(key): i for i, (key, _) in enumerate(node.value)}
            node.value = [pair for i, pair in enumerate(node.value) if last[id(pair[0])] == i]

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        mapping = super().construct_mapping(node, deep)
        if len(mapping) < len(node.value):  # a key given twice, or merged and then overridden
            seen: set[Any] = set()
            for key in (self.construct_object(k) for k in self._explicit_keys[id(node)]):
                if isinstance(key, str | int | float | bool) and key in seen:
                    self.duplicate_keys.append(key)
                seen.add(key if isinstance(key, str | int | float | bool) else id(key))
        return mapping


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line = before.count(b"\n") + 1
        column = len(before[before.rfind(b"\n") + 1 :].decode("utf-8", "replace")) + 1
        message = f"the file is not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start}"
        raise InvalidJobFile([ValidationIssue(message, "", line, column)]) from None


def _read_json(text: str) -> tuple[Any, list[Hashable]]:
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


def _read_yaml(text: str) -> tuple[Any, list[Hashable]]:
    if _nests_too_deep(text):
        message = f"the document is nested more than {MAX_DEPTH} levels deep"
        raise InvalidJobFile([ValidationIssue(message, "")])
    try:
        loader = _JobLoader(text)
        try:
            return loader.get_single_data(), loader.duplicate_keys
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        issue = _yaml_issue(exc, text)
    except RecursionError:  # the constructor recurses through chains of `<<:` merges
        issue = ValidationIssue("the document's `<<:` merges are nested too deeply", "")
    raise InvalidJobFile([issue])


def _nests_too_deep(text: str) -> bool:
    """Whether the text nests deeper than MAX_DEPTH, found without recursing where it could."""
    if sum(map(text.count, "[{-?:")) < _PARSER_DEPTH_BOUND:  # every level needs one of these
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
        pass  # loading reports it, and stops no deeper than the events read so far
    return False


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


def _size_problem(document: Any, max_nodes: int) -> str | None:
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
class _NodeMap:
    values: dict[DocPath, tuple[int, int]] = field(default_factory=dict)
    keys: dict[DocPath, tuple[int, int]] = field(default_factory=dict)
    duplicates: list[tuple[DocPath, Node, Node]] = field(default_factory=list)  # path, 2nd, 1st


def _position(node: Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _map_nodes(text: str, max_nodes: int) -> _NodeMap:
    """Where each value and each mapping key of the document is, by path."""
    found = _NodeMap()
    try:
        root = yaml.compose(text, Loader=_JobLoader)
    except (yaml.YAMLError, RecursionError):
        return found  # JSON that YAML cannot read: its issues go out without positions
    constructor = yaml.constructor.SafeConstructor()

    def key_of(node: Node) -> Hashable:
        key = constructor.construct_object(node) if isinstance(node, ScalarNode) else None
        return key if isinstance(key, str | int | float | bool) else ("<complex key>", id(node))

    visited: set[int] = set()
    stack: list[tuple[DocPath, Node]] = [((), root)] if root is not None else []
    while stack and len(found.values) < max_nodes:
        path, node = stack.pop()
        found.values[path] = _position(node)
        if isinstance(node, SequenceNode):
            stack.extend(((*path, i), item) for i, item in enumerate(node.value))
        if not isinstance(node, MappingNode):
            continue
        pairs: dict[Hashable, tuple[Node, Node]] = {}
        for key_node, value_node in (p for p in node.value if p[0].tag != _MERGE):
            key = key_of(key_node)
            if key in pairs and id(node) not in visited:
                found.duplicates.append(((*path, key), key_node, pairs[key][0]))
            pairs[key] = (key_node, value_node)
        for merged in (v for k, v in node.value if k.tag == _MERGE):
            for source in merged.value if isinstance(merged, SequenceNode) else [merged]:
                for key_node, value_node in source.value:  # earlier sources win; one level
                    if key_node.tag != _MERGE:
                        pairs.setdefault(key_of(key_node), (key_node, value_node))
        visited.add(id(node))
        for key, (key_node, value_node) in pairs.items():
            found.keys[(*path, key)] = _position(key_node)
            stack.append(((*path, key), value_node))
    return found


def document_positions(text: str, max_nodes: int = 100_000) -> dict[DocPath, tuple[int, int]]:
    """1-based (line, column) of each value of a YAML or JSON text, by its path."""
    return _map_nodes(text, max_nodes).values


def format_path(path: DocPath) -> str:
    """A path as messages show it: ``product.commands[1]``."""
    out = ""
    for part in path:
        if isinstance(part, str) and _PLAIN_KEY.fullmatch(part):
            out += f".{part}" if out else part
        elif isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
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
    json_type = {bool: "boolean", type(None): "null", str: "string", int: "number",
                 float: "number", dict: "object", list: "array"}.get(type(value))  # fmt: skip
    return _TYPE_WORDS[json_type] if json_type else f"a {type(value).__name__}"


def _or_list(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _type_words(value: str | list[str]) -> list[str]:
    return [_TYPE_WORDS.get(t, t) for t in ([value] if isinstance(value, str) else value)]


def _error_problems(error: ValidationError, executors: list[str]) -> Iterator[_Problem]:
    """What a person should read for one jsonschema error, drilled down where it is vague."""
    path, kind = tuple(error.absolute_path), error.validator
    value: Any = error.validator_value
    instance: Any = error.instance
    schema = error.schema if isinstance(error.schema, Mapping) else {}
    if on_key := "propertyNames" in error.absolute_schema_path:  # the name is the problem
        path += (instance,)
    if kind in ("anyOf", "oneOf"):
        yield from _branch_problems(error, executors)
    elif kind == "additionalProperties":
        allowed = [str(name) for name in schema.get("properties", {})]
        patterns = list(schema.get("patternProperties", {}))
        for key in instance:
            if str(key) in allowed or any(re.search(p, str(key)) for p in patterns):
                continue
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            if not hint and 0 < len(allowed) <= 8:
                hint = f" (allowed: {', '.join(allowed)})"
            yield f"unknown field {_show(key)}{hint}", (*path, key), True
    elif kind == "required":
        missing = [name for name in value if name not in instance]
        yield from ((f"missing required field {_show(name)}", path, False) for name in missing)
    elif kind == "type":
        yield f"must be {_or_list(_type_words(value))}, not {_kind(instance)}", path, on_key
    elif kind == "pattern":
        template = _PATTERN_MESSAGES.get(schema.get("title", ""), "{} does not match " + value)
        yield template.format(_show(instance)), path, on_key
    elif kind == "enum" and path[-1:] == ("executor",) and len(path) in (1, 3):
        installed = ", ".join(executors) or "none"
        yield f"unknown executor {_show(instance)} (installed: {installed})", path, False
    elif kind == "enum":
        yield f"must be one of: {', '.join(map(str, value))} (got {_show(instance)})", path, False
    else:
        yield _simple_message(error), path, False


def _simple_message(error: ValidationError) -> str:
    kind, value, got = error.validator, error.validator_value, f" (got {_show(error.instance)})"
    if kind in ("minItems", "minLength", "minProperties") and value == 1:
        return "must not be empty"
    messages: dict[str, Callable[[], str]] = {
        "const": lambda: f"must be {_show(value)}{got}",
        "minItems": lambda: f"must have at least {value} items",
        "maxItems": lambda: f"must have at most {value} items",
        "minLength": lambda: f"must be at least {value} characters long",
        "minProperties": lambda: f"must have at least {value} fields",
        "maxLength": lambda: f"must be at most {value} characters long",
        "minimum": lambda: f"must be at least {value}{got}",
        "maximum": lambda: f"must be at most {value}{got}",
        "exclusiveMinimum": lambda: f"must be more than {value}{got}",
        "exclusiveMaximum": lambda: f"must be less than {value}{got}",
        "uniqueItems": lambda: "must not list the same item twice",
        "format": lambda: f"{_show(error.instance)} is not a valid {value}",
        "not": lambda: f"{_show(error.instance)} is not allowed here",
    }
    make = messages.get(kind) if isinstance(kind, str) else None
    return make() if make else error.message


def _branch_problems(error: ValidationError, executors: list[str]) -> Iterator[_Problem]:
    """For anyOf/oneOf, the errors of the alternative the value came closest to."""
    path = tuple(error.absolute_path)
    options: Any = error.validator_value
    if all(isinstance(option, dict) and set(option) == {"required"} for option in options):
        names = _or_list([f"'{name}'" for option in options for name in option["required"]])
        lead = "missing required field" if error.context else "give only one of"
        yield f"{lead} {names}", path, False
        return
    if not error.context:  # oneOf, and several alternatives fit
        yield "fits more than one of the allowed forms; it must fit exactly one", path, False
        return
    fitting = [errs for errs in _branches(error) if not any(map(_rejects_type, errs))]
    if not fitting:
        expected = list(dict.fromkeys(word for e in error.context for word in _expected_types(e)))
        yield f"must be {_or_list(expected)}, not {_kind(error.instance)}", path, False
        return
    best = max(fitting, key=lambda errs: (max(len(e.relative_path) for e in errs), -len(errs)))
    for sub in best:
        yield from _error_problems(sub, executors)


def _branches(error: ValidationError) -> list[list[ValidationError]]:
    """The errors of an anyOf/oneOf, by the alternative they come from."""
    branches: dict[Hashable, list[ValidationError]] = {}
    for sub in error.context:
        branches.setdefault(sub.relative_schema_path[0], []).append(sub)
    return list(branches.values())


def _rejects_type(error: ValidationError) -> bool:
    """Whether the value's type alone fails here, which makes the other errors beside it noise."""
    if error.relative_path:
        return False
    if error.validator in ("anyOf", "oneOf"):
        return bool(error.context) and all(any(map(_rejects_type, b)) for b in _branches(error))
    return error.validator == "type"


def _expected_types(error: ValidationError) -> Iterator[str]:
    if error.validator == "type":
        yield from _type_words(error.validator_value)  # type: ignore[arg-type]
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
            message = f"duplicate step id '{step_id}' (also steps[{index[step_id]}])"
            problems.append((message, ("steps", i, "id"), False))
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
    """Each cycle a depth-first walk meets, as ``[a, b, a]``; iterative, as chains can be long."""
    state: dict[str, int] = {}  # 1: on the trail being walked, 2: done
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


# Keywords fastjsonschema checks exactly as jsonschema does; any other keeps jsonschema alone.
_SCHEMA_MAPS = {"properties", "patternProperties", "$defs"}
_SCHEMA_LISTS = {"allOf", "anyOf", "oneOf"}
_SCHEMA_ONE = {"items", "additionalProperties", "propertyNames", "not", "if", "then", "else"}
_PLAIN_KEYWORDS = {
    "type", "required", "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "minItems", "maxItems", "minLength", "maxLength", "uniqueItems", "minProperties",
    "maxProperties", "$schema", "$comment", "title", "description", "default", "examples",
}  # fmt: skip


def _fast_checkable(schema: Any) -> bool:
    if isinstance(schema, bool):
        return True
    if not isinstance(schema, dict):
        return False
    for key, value in schema.items():
        if key in _SCHEMA_MAPS:
            ok = isinstance(value, dict) and all(map(_fast_checkable, value.values()))
        elif key in _SCHEMA_LISTS:
            ok = isinstance(value, list) and all(map(_fast_checkable, value))
        elif key in _SCHEMA_ONE:  # `items` as a list means something else in 2020-12
            ok = _fast_checkable(value)
        elif key in ("enum", "const"):  # fastjsonschema takes 1 for true and 1.0 for 1
            ok = all(isinstance(v, str) for v in (value if key == "enum" else [value]))
        else:
            ok = key in _PLAIN_KEYWORDS or (key == "$ref" and str(value).startswith("#"))
        if not ok:
            return False
    return True


def load_document(data: bytes, filename: str) -> Any:
    """Parse a job file with exactly the loader validation uses, without validating it.

    For files already accepted: what runs must be what was validated (``10:30`` stays a
    string here, where a plain YAML 1.1 loader would make it 630).
    """
    text = _decode(data)
    document, _ = (_read_json if filename.lower().endswith(".json") else _read_yaml)(text)
    return document


class JobValidator:
    """Parses and validates job files against one composed schema, compiled once."""

    def __init__(self, schema: Mapping[str, Any], *, max_nodes: int = 100_000) -> None:
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:  # in practice an executor plugin's sub-schema
            where = "/".join(map(str, exc.path))
            raise PluginError(f"invalid job schema at '{where}': {exc.message}") from exc
        checker = Draft202012Validator.FORMAT_CHECKER
        self._validator = Draft202012Validator(schema, format_checker=checker)
        self._executors = sorted(schema.get("$defs", {}).get("executor", {}).get("enum", []))
        self._max_nodes = max_nodes
        self._fast: Callable[[Any], Any] | None = None
        # $id at the root only: fastjsonschema resolves "#..." in an embedded resource wrongly.
        below_root = {key: value for key, value in schema.items() if key != "$id"}
        if fastjsonschema is not None and _fast_checkable(below_root):
            try:
                self._fast = fastjsonschema.compile(dict(schema), use_default=False)
            except Exception:  # an accelerator that cannot compile leaves jsonschema to it
                self._fast = None

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
        if not text.strip():
            raise InvalidJobFile([ValidationIssue("the file is empty", "")])
        json_file = filename.lower().endswith(".json")
        document, duplicates = (_read_json if json_file else _read_yaml)(text)
        if not isinstance(document, dict):
            raise InvalidJobFile([self._shape_issue(document, text)])
        if size_problem := _size_problem(document, self._max_nodes):
            raise InvalidJobFile([ValidationIssue(size_problem, "")])
        errors = [] if self._fast_valid(document) else list(self._validator.iter_errors(document))
        steps = _step_problems(document)
        if errors or steps or duplicates:
            raise InvalidJobFile(self._issues(text, errors, steps, duplicates))
        return document

    def _fast_valid(self, document: dict[str, Any]) -> bool:
        if self._fast is None:
            return False
        try:
            self._fast(document)
        except Exception:  # jsonschema has the last word, and the details
            return False
        return True

    def _shape_issue(self, document: Any, text: str) -> ValidationIssue:
        node = yaml.compose(text, Loader=_JobLoader) if document is None else None
        if document is None and (node is None or node.value == ""):  # comments, or "---" alone
            return ValidationIssue("the file is empty", "")
        line, column = _map_nodes(text, 1).values.get((), (None, None))
        message = f"the top level must be a mapping of job fields, not {_kind(document)}"
        return ValidationIssue(message, "", line, column)

    def _issues(
        self, text: str, errors: list[ValidationError], steps: list[_Problem], duplicates: list[Any]
    ) -> list[ValidationIssue]:
        # A value of the wrong type fails its other keywords too; the type is what to fix.
        mistyped = {tuple(e.absolute_path) for e in errors if e.validator == "type"}
        errors = [
            e for e in errors if e.validator == "type" or tuple(e.absolute_path) not in mistyped
        ]
        problems = [p for error in errors for p in _error_problems(error, self._executors)]
        nodes = _map_nodes(text, self._max_nodes)
        issues = [_locate(problem, nodes) for problem in [*problems, *steps]]
        for path, second, first in nodes.duplicates:
            message = f"duplicate key {_show(path[-1])} (first on line {_position(first)[0]})"
            issues.append(ValidationIssue(message, format_path(path), *_position(second)))
        if duplicates and not nodes.duplicates:  # only where the text could not be mapped
            issues.extend(ValidationIssue(f"duplicate key {_show(key)}", "") for key in duplicates)
        return sorted(dict.fromkeys(issues), key=lambda issue: (issue.line or 0, issue.column or 0))


def _locate(problem: _Problem, nodes: _NodeMap) -> ValidationIssue:
    message, path, at_key = problem
    position = nodes.keys.get(path) if at_key else None
    for end in range(len(path), -1, -1):  # the nearest enclosing value that has a position
        position = position or nodes.values.get(path[:end])
    line, column = position or (None, None)
    return ValidationIssue(message, format_path(path), line, column)
