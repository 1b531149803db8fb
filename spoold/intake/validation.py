"""Job files: schema composition, validation, and messages with line, column and path.

Every job pays for the valid path, so it is only libyaml (spoold.core.documents), a compiled schema
check and a size walk. Positions and readable messages are worked out only when something is wrong, by composing
the text again into nodes that remember where they came from.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import re
import threading
from collections.abc import Callable, Hashable, Iterator, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import quote

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError

from spoold.core.clock import SystemClock
from spoold.core.documents import (
    TYPE_WORDS,
    DocPath,
    JobLoader,
    NodeMap,
    decode_text,
    document_positions,
    format_path,
    kind_of,
    load_document,
    load_executor_schema,
    map_nodes,
    read_json,
    read_yaml,
    show_value,
    size_problem,
    units_of,
)
from spoold.core.errors import InvalidJobFile, PluginError, ValidationIssue, escape_unprintable
from spoold.core.procfs import release_memory
from spoold.core.units import MAX_DURATION, SIZE_FORMS, parse_duration
from spoold.intake.redaction import quoted

if TYPE_CHECKING:
    from spoold.run.registry import ExecutorRegistry

# Re-exported: callers validate and load through this module.
__all__ = [
    "JobValidator",
    "ValidationIssue",
    "compose_job_schema",
    "document_positions",
    "format_path",
    "load_base_schema",
    "load_document",
    "load_executor_schema",
]

try:  # jsonschema takes ~1 ms per job; this compiles the schema to Python code
    import fastjsonschema
except ImportError:  # pragma: no cover
    fastjsonschema = None  # type: ignore[assignment]

_Problem = tuple[str, DocPath, bool]  # message, path, whether to point at the key
#: An executor's own check of a valid ``product:``: the problems, in words ([] if none).
ProductCheck = Callable[[Mapping[str, Any]], list[str]]


class _Found(NamedTuple):
    """A schema error's problem, with what ties it to another in the same mapping."""

    message: str
    path: DocPath
    at_key: bool
    missing: tuple[str, ...] = ()  # the required fields it says are missing (one will do)
    suggested: str | None = None  # the field an unknown one's "did you mean" names


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
    "size": "{} is not a size: " + SIZE_FORMS,
}


def load_base_schema() -> dict[str, Any]:
    """The job file's schema before executors are added, as shipped in ``spoold.schemas``."""
    return load_executor_schema("spoold.schemas", "job.schema.json")


#: A job of steps, as the worker tells one (``JobSpec.steps``): ``steps:`` with at least one.
#: A job with ``steps: []`` runs as one unit of its executor, and is held to all one without is.
#: The base schema's, which its own rules for a job of steps use too.
_HAS_STEPS: dict[str, Any] = {"$ref": "#/$defs/has_steps"}


def compose_job_schema(
    base: Mapping[str, Any], executor_schemas: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """The full job schema: ``executor`` limited to these names, each one's ``product`` checked,
    and its ``type`` where its sub-schema declares the executor's types (see ``_TypeRules``).

    The rules sit in ``$defs`` entries and are reached by ``$ref``: fastjsonschema makes a
    function of each entry, and an ``if`` that fails costs an exception whose price grows with
    the function it passes through (CPython finds its line by scanning the function's code).
    """
    schema = copy.deepcopy(dict(base))
    defs = schema.setdefault("$defs", {})
    defs["executor"] = {"type": "string", "enum": sorted(executor_schemas)}
    job_clauses, step_clauses, in_steps = [], [], []
    for name in sorted(executor_schemas):
        pointer = _def_pointer(f"product.{name}")
        sub = defs[f"product.{name}"] = _rebased(executor_schemas[name], pointer)
        types = _TypeRules(sub, pointer)
        unit: dict[str, Any] = {"properties": {"product": {"$ref": pointer}}}
        if sub.get("required"):
            unit["required"] = ["product"]
        job: dict[str, Any] = {"properties": dict(unit["properties"])}
        when = {"required": ["executor"], "properties": {"executor": {"const": name}}}
        with_steps: list[dict[str, Any]] = []  # the job's rules when it has steps, and without
        alone: list[dict[str, Any]] = [{"required": ["product"]}] if "required" in unit else []
        if types.declared:
            defs[f"type.{name}"] = {
                "description": f"The `type` of a job or step of the {name} executor.",
                "allOf": types.own(),
            }
            unit["allOf"] = [{"$ref": _def_pointer(f"type.{name}")}]
            job["allOf"] = [{"$ref": _def_pointer(f"type.{name}")}]
            defs[f"type.{name}.inherited"] = {
                "description": "The steps that run with the job's executor and type.",
                "allOf": types.inherited({"properties": {"executor": {"const": name}}}),
            }
            with_steps.append({"$ref": _def_pointer(f"type.{name}.inherited")})
            defs[f"type.{name}.in_steps"] = {  # in a job of this executor: "inherited"
                "description": f"The steps of the {name} executor that run with the job's type.",
                "if": when,
                "else": {"allOf": types.inherited(when, foreign=True)},
            }
            in_steps.append({"$ref": _def_pointer(f"type.{name}.in_steps")})
            if (missing := types.missing()) is not None:  # an `if` only where type is missing
                alone.append(
                    missing if "if" not in missing else {"if": _NEEDS_TYPE, "else": missing}
                )
        defs[f"step.{name}"] = unit
        unit_pointer = _def_pointer(f"step.{name}")
        step_clauses.append({"if": when, "then": {"$ref": unit_pointer}})
        # Steps that name no executor run with the job's, so its product rules apply to them.
        inherit = {"if": {"not": {"required": ["executor"]}}, "then": {"$ref": unit_pointer}}
        job["properties"]["steps"] = {"items": inherit}
        if with_steps or alone:  # a job of steps needs no product of its own: its steps have one
            job["if"] = _HAS_STEPS
            job |= {"then": _all_of(with_steps)} if with_steps else {}
            job |= {"else": _all_of(alone)} if alone else {}
        defs[f"job.{name}"] = job
        job_clauses.append({"if": when, "then": {"$ref": _def_pointer(f"job.{name}")}})
    if in_steps:  # one `if` for a job without steps, not one per executor
        job_clauses.append({"if": {"required": ["steps"]}, "then": _all_of(in_steps)})
    schema.setdefault("properties", {})["executor"] = {"$ref": "#/$defs/executor"}
    if job_clauses:
        defs["job.by_executor"] = {"allOf": job_clauses}
        schema["allOf"] = [*schema.get("allOf", []), {"$ref": "#/$defs/job.by_executor"}]
    if isinstance(step := defs.get("step"), dict):
        step.setdefault("properties", {})["executor"] = {"$ref": "#/$defs/executor"}
        if step_clauses:
            defs["step.by_executor"] = {"allOf": step_clauses}
            step["allOf"] = [*step.get("allOf", []), {"$ref": "#/$defs/step.by_executor"}]
    return schema


def _def_pointer(key: str) -> str:
    """The reference to ``$defs/<key>`` of the composed schema."""
    return "#" + quote("/$defs/" + key.replace("~", "~0").replace("/", "~1"), "/$~")


def _all_of(schemas: list[dict[str, Any]]) -> dict[str, Any]:
    return schemas[0] if len(schemas) == 1 else {"allOf": schemas}


class _TypeRules:
    """What an executor's sub-schema says about the job's ``type``, as clauses over a unit (the
    job, or a step: its ``type`` beside its ``product``). In the sub-schema's ``$defs``:

    - ``type``: the schema of ``type``, an enum of the executor's types. A ``not`` in it with a
      ``description`` refuses the values it matches with that reason (instead of the list).
      Declaring it makes ``type`` required, unless ``untyped`` says otherwise.
    - ``untyped``: what ``product`` must satisfy in a unit without a type; one whose product
      does not is missing its ``type``.
    - ``by_type``: ``{TYPE: schema}``, what ``product`` must also satisfy for that type. It is
      no schema: its entries go into the clauses (types with equal rules share one) and it
      leaves the composed ``$defs``.

    An executor that declares none of them leaves ``type`` free. A step without a ``type`` runs
    with the job's, so the rules for it are the job's (``inherited``).
    """

    def __init__(self, sub: dict[str, Any], pointer: str) -> None:
        defs: dict[str, Any] = sub["$defs"] if isinstance(sub.get("$defs"), dict) else {}
        declared = defs.get("type")
        self.pointer = f"{pointer}/$defs/type" if isinstance(declared, Mapping) else None
        self.check: dict[str, Any] | None = None
        if isinstance(declared, Mapping):
            self.check = {"$ref": f"{pointer}/$defs/type"}
            refused = declared.get("not")
            if isinstance(refused, Mapping) and "description" in refused:
                # Said with its reason alone, not with the list too. Inline: the message
                # reads the reason from the `not` that fails.
                refusal = {"not": copy.deepcopy(refused)}
                wrong = {"if": copy.deepcopy(refused), "then": refusal, "else": self.check}
                self.check = {"if": self.check, "else": wrong}
        by_type = defs.pop("by_type", None)
        groups: dict[str, tuple[list[str], Any]] = {}
        for name, rules in by_type.items() if isinstance(by_type, Mapping) else ():
            key = json.dumps(rules, sort_keys=True)
            groups.setdefault(key, ([], rules))[0].append(str(name))
        self.by_type = list(groups.values())
        self.untyped = f"{pointer}/$defs/untyped" if "untyped" in defs else None
        self.declared = bool(self.pointer or self.by_type or self.untyped)

    def own(self) -> list[dict[str, Any]]:
        """For a unit that names its ``type``: one of the executor's, with its product's rules."""
        clauses: list[dict[str, Any]] = []
        if self.check is not None:
            clauses.append({"properties": {"type": self.check}})
        for names, rules in self.by_type:
            when = {"required": ["type"], "properties": {"type": _one_of(names)}}
            clauses.append({"if": when, "then": {"properties": {"product": rules}}})
        return clauses

    def missing(self) -> dict[str, Any] | None:
        """For a unit with no type, its own or inherited: what it must be, or None (anything)."""
        if self.untyped is not None:
            return {"if": {"properties": {"product": {"$ref": self.untyped}}}, "else": _NEEDS_TYPE}
        return _NEEDS_TYPE if self.pointer is not None else None

    def inherited(self, which: dict[str, Any], *, foreign: bool = False) -> list[dict[str, Any]]:
        """Job clauses for the steps ``which`` selects that name no type: they run with the
        job's. ``foreign``: the job's executor is another, and its type may be none of these."""
        typeless = {**which, "not": {"required": ["type"]}}

        def steps(rules: dict[str, Any]) -> dict[str, Any]:
            return {"properties": {"steps": {"items": {"if": typeless, "then": rules}}}}

        clauses = []
        for names, rules in self.by_type:
            when = {"required": ["type"], "properties": {"type": _one_of(names)}}
            clauses.append({"if": when, "then": steps({"properties": {"product": rules}})})
        if (missing := self.missing()) is not None:
            clauses.append({"if": {"not": {"required": ["type"]}}, "then": steps(missing)})
        if foreign and self.pointer is not None:  # such a step must name one of its own
            when = {"required": ["type"], "properties": {"type": {"not": {"$ref": self.pointer}}}}
            clauses.append({"if": when, "then": steps(_NEEDS_TYPE)})
        return clauses


_NEEDS_TYPE = {"required": ["type"]}


def _one_of(names: list[str]) -> dict[str, Any]:
    return {"const": names[0]} if len(names) == 1 else {"enum": names}


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


def _or_list(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _type_words(value: str | list[str]) -> list[str]:
    return [TYPE_WORDS.get(t, t) for t in ([value] if isinstance(value, str) else value)]


def _error_problems(error: ValidationError, executors: list[str]) -> Iterator[_Found]:
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
            message = f"unknown field {show_value(key)}{hint}"
            yield _Found(message, (*path, key), True, suggested=close[0] if close else None)
    elif kind == "required":
        missing = [name for name in value if name not in instance]
        for name in missing:
            message = f"missing required field {show_value(name)}{_why_needed(instance, name)}"
            yield _Found(message, path, False, missing=(str(name),))
    elif kind == "type":
        message = f"must be {_or_list(_type_words(value))}, not {kind_of(instance)}"
        yield _Found(message, path, on_key)
    elif kind == "pattern":
        # The pattern is text, not a template: `{0,63}` must not be read as a placeholder.
        fallback = "{} does not match " + value.replace("{", "{{").replace("}", "}}")
        template = _PATTERN_MESSAGES.get(schema.get("title", ""), fallback)
        shown = show_value(instance) if on_key else quoted(instance, path)  # a name, or a value
        yield _Found(template.format(shown), path, on_key)
    elif kind == "enum" and path[-1:] == ("executor",) and len(path) in (1, 3):
        installed = ", ".join(executors) or "none"
        message = f"unknown executor {quoted(instance, path)} (installed: {installed})"
        yield _Found(message, path, False)
    elif kind == "enum":
        message = f"must be one of: {', '.join(map(str, value))} (got {quoted(instance, path)})"
        yield _Found(message, path, False)
    else:
        yield _Found(_simple_message(error, path), path, False)


def _without_follow_ons(found: list[_Found]) -> list[_Problem]:
    """The problems to say: not a required field's absence where an unknown field beside it is
    taken for a misspelling of it (``comands``: "did you mean 'commands'?" says it all)."""
    suggested = {(f.path[:-1], f.suggested) for f in found if f.suggested is not None}
    return [
        (f.message, f.path, f.at_key)
        for f in found
        if not any((f.path, name) in suggested for name in f.missing)
    ]


def _why_needed(instance: Any, name: Any) -> str:
    """Why a job must have a field it lacks, where the reason is not plain: ``product`` (or
    ``type``) in a job whose ``steps:`` is empty, which runs as one unit of its executor."""
    if name not in ("product", "type") or not isinstance(instance, Mapping):
        return ""
    if instance.get("steps") != []:
        return ""
    return f" (steps is empty: the job runs as one unit of its executor, with the job's {name})"


def _simple_message(error: ValidationError, path: DocPath) -> str:
    shown = quoted(error.instance, path)
    kind, value, got = error.validator, error.validator_value, f" (got {shown})"
    if kind in ("minItems", "minLength", "minProperties") and value == 1:
        return "must not be empty"
    messages: dict[str, Callable[[], str]] = {
        "const": lambda: f"must be {show_value(value)}{got}",
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
        "format": lambda: f"{shown} is not a valid {value}",
        "not": lambda: f"{shown} is not allowed here{_reason(value)}",
    }
    make = messages.get(kind) if isinstance(kind, str) else None
    if make:
        return make()
    # jsonschema's own words quote the value as repr() does: in full, and whatever it is.
    return error.message.replace(repr(error.instance), shown)


def _reason(refused: Any) -> str:
    """A refusing schema's ``description`` (the why of a ``not``), as the end of a message."""
    why = refused.get("description") if isinstance(refused, Mapping) else None
    return f": {why}" if isinstance(why, str) and why else ""


def _branch_problems(error: ValidationError, executors: list[str]) -> Iterator[_Found]:
    """For anyOf/oneOf, the errors of the alternative the value came closest to."""
    path = tuple(error.absolute_path)
    options: Any = error.validator_value
    if all(isinstance(option, dict) and set(option) == {"required"} for option in options):
        required = [str(name) for option in options for name in option["required"]]
        names = _or_list([f"'{name}'" for name in required])
        if error.context:
            yield _Found(f"missing required field {names}", path, False, missing=tuple(required))
        else:
            yield _Found(f"give only one of {names}", path, False)
        return
    if not error.context:  # oneOf, and several alternatives fit
        message = "fits more than one of the allowed forms; it must fit exactly one"
        yield _Found(message, path, False)
        return
    fitting = [errs for errs in _branches(error) if not any(map(_rejects_type, errs))]
    if not fitting:
        expected = list(dict.fromkeys(word for e in error.context for word in _expected_types(e)))
        yield _Found(f"must be {_or_list(expected)}, not {kind_of(error.instance)}", path, False)
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
            message = f"duplicate step id {show_value(step_id)} (also steps[{index[step_id]}])"
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
                hint = f" (did you mean {show_value(close[0])}?)" if close else ""
                problems.append(
                    (
                        f"needs unknown step {show_value(need)}{hint}",
                        ("steps", i, "needs", j),
                        False,
                    )
                )
    for cycle in _cycles(graph):
        last = index[cycle[-2]]
        where = ("steps", last, "needs", steps[last]["needs"].index(cycle[-1]))
        problems.append(("steps form a cycle: " + " -> ".join(cycle), where, False))
    return problems


def _schedule_problems(schedule: Any, now: datetime) -> list[_Problem]:
    """What the schema cannot say about a schedule: one that never fires (after ``now``) or first
    fires past the horizon (a window opening in some far year), an unknown zone."""
    from spoold.schedule.triggers import problem  # noqa: PLC0415 - APScheduler only for schedules

    every = schedule.get("every") if isinstance(schedule, Mapping) else None
    with contextlib.suppress(ValueError, TypeError):
        if every is not None and parse_duration(every) > MAX_DURATION:
            return []  # admission's bounds say so, at schedule.every, with the value
    found = problem(schedule, now)
    return [] if found is None else [(found, ("schedule",), False)]


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


# What fastjsonschema may meet beside a $ref: nothing that checks anything.
_BESIDE_REF = {
    "$ref",
    "$defs",
    "$schema",
    "$comment",
    "title",
    "description",
    "default",
    "examples",
}


def _fast_checkable(schema: Any) -> bool:
    if isinstance(schema, bool):
        return True
    if not isinstance(schema, dict):
        return False
    if "$ref" in schema and not schema.keys() <= _BESIDE_REF:
        return False  # fastjsonschema skips every keyword beside a $ref: they would go unchecked
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


def _compiled(schema: Mapping[str, Any]) -> Callable[[Any], Any] | None:
    """The schema compiled by fastjsonschema, or None where only jsonschema can be trusted."""
    # $id at the root only: fastjsonschema resolves "#..." in an embedded resource wrongly.
    below_root = {key: value for key, value in schema.items() if key != "$id"}
    if fastjsonschema is None or not _fast_checkable(below_root):
        return None
    try:
        # Without the details of each failure (which schema, which value): building them for
        # the branches of anyOf and oneOf that do not match took 2/3 of a valid file's check.
        compiled: Callable[[Any], Any] = fastjsonschema.compile(
            _without_const(dict(schema)), use_default=False, detailed_exceptions=False
        )
    except Exception:  # an accelerator that cannot compile leaves jsonschema to it
        return None
    return compiled


def _without_const(schema: Any) -> Any:
    """A checkable schema with each ``const`` as the one value of an ``enum``, which checks the
    same: fastjsonschema (2.22.3) cannot write a ``const`` without the details of its failure."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _SCHEMA_MAPS:
            out[key] = {name: _without_const(sub) for name, sub in value.items()}
        elif key in _SCHEMA_LISTS:
            out[key] = [_without_const(sub) for sub in value]
        elif key in _SCHEMA_ONE:
            out[key] = _without_const(value)
        elif key != "const":
            out[key] = value
    if "const" in schema:  # beside an ``enum``: what both allow
        out["enum"] = [v for v in schema.get("enum", [schema["const"]]) if v == schema["const"]]
    return out


def _passes(check: Callable[[Any], Any], document: dict[str, Any]) -> bool:
    try:
        check(document)
    except Exception:  # jsonschema has the last word, and the details
        return False
    return True


class JobValidator:
    """Parses and validates job files against one composed schema, compiled once.

    ``narrowed``: per executor name, the same schema for jobs of that executor alone. A valid
    file is checked against its executor's (compiled too), which costs the same however many
    executors are installed; the full schema has a clause for each. Narrowed schemas accept
    less, never more, and a file they refuse still gets the full schema's verdict.
    """

    @classmethod
    def for_executors(
        cls,
        base: Mapping[str, Any],
        executor_schemas: Mapping[str, Mapping[str, Any]],
        *,
        max_nodes: int = 100_000,
        checks: Mapping[str, ProductCheck] | None = None,
    ) -> JobValidator:
        """The validator for ``base`` with these executors' product schemas (and ``checks``:
        each executor's ``validate``, for what a schema cannot say)."""
        narrowed = {
            name: compose_job_schema(base, {name: sub}) for name, sub in executor_schemas.items()
        }
        full = compose_job_schema(base, executor_schemas)
        return cls(full, max_nodes=max_nodes, narrowed=narrowed, checks=checks)

    def __init__(
        self,
        schema: Mapping[str, Any],
        *,
        max_nodes: int = 100_000,
        narrowed: Mapping[str, Mapping[str, Any]] | None = None,
        checks: Mapping[str, ProductCheck] | None = None,
    ) -> None:
        self._checks = dict(checks or {})
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:  # in practice an executor plugin's sub-schema
            where = "/".join(map(str, exc.path))
            raise PluginError(f"invalid job schema at '{where}': {exc.message}") from exc
        checker = Draft202012Validator.FORMAT_CHECKER
        self._validator = Draft202012Validator(schema, format_checker=checker)
        self._executors = sorted(schema.get("$defs", {}).get("executor", {}).get("enum", []))
        self._max_nodes = max_nodes
        # Compiled when first needed: each costs megabytes of generated code, and a daemon
        # that runs jobs of two executors needs two of them, not one per installed executor.
        self._schema = schema
        self._narrowed = dict(narrowed or {})
        self._compiled: dict[str | None, Callable[[Any], Any] | None] = {}
        self._compiling = threading.Lock()

    def check(
        self, data: bytes, filename: str, *, now: datetime | None = None
    ) -> list[ValidationIssue]:
        """Every problem in the file, or [] when it is a valid job (``now`` as for ``parse``)."""
        try:
            self.parse(data, filename, now=now)
        except InvalidJobFile as exc:
            return exc.issues
        return []

    def parse(self, data: bytes, filename: str, *, now: datetime | None = None) -> dict[str, Any]:
        """The validated job document; raises InvalidJobFile listing every problem found.

        ``now``: the moment a schedule must still fire after, from the caller's clock (intake
        passes its own); the system's when not given.
        """
        try:
            return self._parse(data, filename, now)
        except InvalidJobFile as exc:
            # Every face (the command line, reason.json, the API) shows these words as they
            # are: what a parser or an executor's check quoted raw is escaped here, once.
            raise InvalidJobFile([_escaped(issue) for issue in exc.issues]) from None

    def _parse(self, data: bytes, filename: str, now: datetime | None) -> dict[str, Any]:
        text = decode_text(data)
        if not text.strip():
            raise InvalidJobFile([ValidationIssue("the file is empty", "")])
        json_file = filename.lower().endswith(".json")
        try:
            document, duplicates = (read_json if json_file else read_yaml)(text)
        except ValueError as exc:  # an integer longer than Python converts (sys.int_info)
            digits = re.search(r"[0-9]{4300}", text)
            line = None if digits is None else text.count("\n", 0, digits.start()) + 1
            message = f"a number in the file is too long to be one: {exc}".split(";")[0]
            raise InvalidJobFile([ValidationIssue(message, "", line)]) from None
        if not isinstance(document, dict):
            raise InvalidJobFile([self._shape_issue(document, text)])
        if too_big := size_problem(document, self._max_nodes):
            raise InvalidJobFile([ValidationIssue(too_big, "")])
        errors = [] if self._fast_valid(document) else list(self._validator.iter_errors(document))
        steps = _step_problems(document)
        if not errors and "schedule" in document:
            steps += _schedule_problems(document["schedule"], now or SystemClock().now())
        if not errors:
            steps += self._product_problems(document)
        if errors or steps or duplicates:
            raise InvalidJobFile(self._issues(text, errors, steps, duplicates))
        return document

    def _product_problems(self, document: dict[str, Any]) -> list[_Problem]:
        """Each executor's own check of its products (the job's, and each step's)."""
        problems: list[_Problem] = []
        for path, unit in units_of(document):
            executor = unit.get("executor", document.get("executor"))
            check = self._checks.get(executor) if isinstance(executor, str) else None
            if check is not None and isinstance(unit.get("product"), Mapping):
                problems += [(m, (*path, "product"), False) for m in check(unit["product"])]
        return problems

    def _fast_valid(self, document: dict[str, Any]) -> bool:
        executor = document.get("executor")
        narrowed = executor if isinstance(executor, str) and executor in self._narrowed else None
        # The narrowed check first; steps naming other executors need the full one.
        for key in (narrowed, None) if narrowed is not None else (None,):
            check = self._fast_check(key)
            if check is not None and _passes(check, document):
                return True
        return False

    def _fast_check(self, executor: str | None) -> Callable[[Any], Any] | None:
        """The compiled schema for one executor's jobs (None: the full one), made once."""
        try:
            return self._compiled[executor]
        except KeyError:
            pass
        with self._compiling:
            if executor not in self._compiled:
                schema = self._schema if executor is None else self._narrowed[executor]
                self._compiled[executor] = _compiled(schema)
                release_memory()  # the generated source and its parse trees are garbage now
            return self._compiled[executor]

    def _shape_issue(self, document: Any, text: str) -> ValidationIssue:
        node = yaml.compose(text, Loader=JobLoader) if document is None else None
        if document is None and (node is None or node.value == ""):  # comments, or "---" alone
            return ValidationIssue("the file is empty", "")
        line, column = map_nodes(text, 1).values.get((), (None, None))
        message = f"the top level must be a mapping of job fields, not {kind_of(document)}"
        return ValidationIssue(message, "", line, column)

    def _issues(
        self, text: str, errors: list[ValidationError], steps: list[_Problem], duplicates: list[Any]
    ) -> list[ValidationIssue]:
        # A value of the wrong type fails its other keywords too; the type is what to fix.
        mistyped = {tuple(e.absolute_path) for e in errors if e.validator == "type"}
        errors = [
            e for e in errors if e.validator == "type" or tuple(e.absolute_path) not in mistyped
        ]
        problems = _without_follow_ons(
            [p for error in errors for p in _error_problems(error, self._executors)]
        )
        nodes = map_nodes(text, self._max_nodes)
        issues = [locate(problem, nodes) for problem in [*problems, *steps]]
        for twice in nodes.duplicates:
            message = (
                f"duplicate key {show_value(twice.path[-1])} (first on line {twice.first_line})"
            )
            issues.append(
                ValidationIssue(message, format_path(twice.path), twice.line, twice.column)
            )
        if duplicates and not nodes.duplicates:  # only where the text could not be mapped
            issues.extend(
                ValidationIssue(f"duplicate key {show_value(key)}", "") for key in duplicates
            )
        return sorted(dict.fromkeys(issues), key=lambda issue: (issue.line or 0, issue.column or 0))


def locate(problem: _Problem, nodes: NodeMap) -> ValidationIssue:
    """A problem (message, path, whether it is about the key) as an issue with its position."""
    message, path, at_key = problem
    position = nodes.keys.get(path) if at_key else None
    for end in range(len(path), -1, -1):  # the nearest enclosing value that has a position
        position = position or nodes.values.get(path[:end])
    line, column = position or (None, None)
    return _escaped(ValidationIssue(message, format_path(path), line, column))


def _escaped(issue: ValidationIssue) -> ValidationIssue:
    """The issue as every face may show it: see ``escape_unprintable``."""
    message, path = escape_unprintable(issue.message), escape_unprintable(issue.path)
    return issue._replace(message=message, path=path)


def job_validator(registry: ExecutorRegistry) -> JobValidator:
    """The validator for job files, knowing every installed executor."""
    checks = {name: registry.get(name).validate for name in registry.names()}
    return JobValidator.for_executors(load_base_schema(), registry.schemas(), checks=checks)
