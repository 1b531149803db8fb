"""Job file loading and validation: what is accepted, and what a person is told otherwise."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from spoold.core.documents import MAX_DEPTH
from spoold.core.errors import InvalidJobFile, PluginError
from spoold.intake import validation
from spoold.intake.validation import (
    JobValidator,
    ValidationIssue,
    compose_job_schema,
    document_positions,
    job_validator,
    load_base_schema,
    load_executor_schema,
)
from spoold.run.registry import ExecutorRegistry

EXECUTORS = "spoold.schemas.executors"


def _schema(**extra: dict[str, Any]) -> dict[str, Any]:
    return compose_job_schema(
        load_base_schema(),
        {
            "local": load_executor_schema(EXECUTORS, "local.schema.json"),
            "custom": load_executor_schema(EXECUTORS, "custom.schema.json"),
            **extra,
        },
    )


@pytest.fixture(scope="module")
def validator() -> JobValidator:
    return JobValidator(_schema())


def issues_of(
    validator: JobValidator, text: str, filename: str = "job.yaml"
) -> list[ValidationIssue]:
    return validator.check(textwrap.dedent(text).encode(), filename)


def one_issue(validator: JobValidator, text: str, filename: str = "job.yaml") -> ValidationIssue:
    issues = issues_of(validator, text, filename)
    assert len(issues) == 1, issues
    return issues[0]


# --- valid files ------------------------------------------------------------------------------

VALID_LOCAL = """\
    job_id: provision-4711
    executor: local
    product:
      commands:
        - echo hello
        - make build
      cwd: work/src
    variables:
      CUSTOMER: "4711"
      DEBUG: true
    artifacts:
      - path: out/*.log
      - path: dist
        type: dir
    timeout: 10m
    retries: 3
    backoff: {initial: 30s, max: 10m, multiplier: 2, jitter: true}
    retry_on: [75, 111]
    hooks: {pre_run: echo pre, on_failure: [echo a, echo b]}
    concurrency: {key: customer-4711, limit: 1, strategy: queue}
    on_interrupt: requeue
    labels: {team: ops}
    """


def test_valid_local_job(validator: JobValidator) -> None:
    document = validator.parse(textwrap.dedent(VALID_LOCAL).encode(), "jobs/a.yaml")
    assert document["job_id"] == "provision-4711"
    assert document["product"] == {"commands": ["echo hello", "make build"], "cwd": "work/src"}
    assert document["variables"] == {"CUSTOMER": "4711", "DEBUG": True}
    assert document["backoff"]["multiplier"] == 2
    assert "priority" not in document  # defaults are the reader's business, not filled in here
    assert issues_of(validator, VALID_LOCAL) == []


@pytest.mark.parametrize(
    "text",
    [
        "executor: custom\nproduct: {script: [echo hi], interpreter: /bin/bash, args: [-x]}\n",
        "executor: local\nproduct: {commands: x}\ntimeout: 90\nbackoff: 1h30m\n",
        "executor: local\nproduct: {commands: x}\ntimeout: 500ms\nschedule: '*/15 * * * *'\n",
        "executor: local\nproduct: {commands: x}\nschedule: {every: 30s, catch_up: once}\n",
        "executor: local\nproduct: {commands: x}\nsteps: []\n",
        "steps:\n  - {id: a, executor: local, product: {commands: x}}\n"
        "  - {id: b, needs: [a], executor: custom, product: {script: x}, continue_on_error: true}\n",
        "executor: local\nsteps:\n  - {id: a, product: {commands: y}}\n",
    ],
)
def test_other_valid_jobs(validator: JobValidator, text: str) -> None:
    assert validator.check(text.encode(), "job.yaml") == []


def test_yaml_dates_and_times_stay_text(validator: JobValidator) -> None:
    document = validator.parse(
        b"executor: local\nproduct: {commands: x}\ndescription: 2024-01-01\n"
        b"schedule: {every: 1h, window: {start: 10:30, end: 17:00}}\n",
        "job.yaml",
    )
    assert document["description"] == "2024-01-01"
    assert document["schedule"]["window"] == {"start": "10:30", "end": "17:00"}


def test_duration_with_colon_is_not_sexagesimal(validator: JobValidator) -> None:
    issue = one_issue(validator, "executor: local\nproduct: {commands: x}\ntimeout: 1:30\n")
    assert issue.message == "'1:30' is not a duration like 30s, 10m, 1h30m"


# --- schema errors, with their positions ------------------------------------------------------


def test_missing_executor(validator: JobValidator) -> None:
    issue = one_issue(validator, "job_id: a\nproduct: {commands: x}\n")
    assert issue == ValidationIssue("missing required field 'executor'", "", 1, 1)


def test_unknown_field_points_at_the_key_and_suggests(validator: JobValidator) -> None:
    issues = issues_of(
        validator,
        """\
        executor: local
        product:
          comands: [echo hi]
        """,
    )
    assert issues == [
        ValidationIssue(
            "unknown field 'comands' (did you mean 'commands'?)", "product.comands", 3, 3
        ),
    ], "the suggestion says that 'commands' is missing: not said again"


def test_unknown_top_level_field(validator: JobValidator) -> None:
    issue = one_issue(validator, "executor: local\nproduct: {commands: x}\ntimout: 5m\n")
    assert issue == ValidationIssue(
        "unknown field 'timout' (did you mean 'timeout'?)", "timout", 3, 1
    )


def test_unknown_field_without_close_match_lists_the_few_allowed(validator: JobValidator) -> None:
    issue = one_issue(validator, "executor: custom\nproduct: {script: x, zzz: 1}\n")
    assert issue.message == "unknown field 'zzz' (allowed: script, interpreter, args)"
    assert (issue.path, issue.line, issue.column) == ("product.zzz", 2, 22)


def test_wrong_type_in_a_list(validator: JobValidator) -> None:
    issue = one_issue(validator, "executor: local\nproduct:\n  commands:\n    - echo\n    - 1\n")
    assert issue == ValidationIssue("must be a string, not a number", "product.commands[1]", 5, 7)
    assert issue.format("jobs/a.yaml") == (
        "jobs/a.yaml:5:7: product.commands[1]: must be a string, not a number"
    )


@pytest.mark.parametrize(
    ("line", "message", "path", "column"),
    [
        ("priority: high", "must be an integer, not a string", "priority", 11),
        ("retries: 1.5", "must be an integer, not a number", "retries", 10),
        ("labels: {team: 1}", "must be a string, not a number", "labels.team", 16),
        ("description: [a]", "must be a string, not a list", "description", 14),
        ("callback: yes", "must be a mapping, not a boolean", "callback", 11),
        ("on_interrupt: never", "must be one of: fail, requeue (got 'never')", "on_interrupt", 15),
        ("retries: -1", "must be at least 0 (got -1)", "retries", 10),
        ("retry_on: [256]", "must be at most 255 (got 256)", "retry_on[0]", 12),
        ("retry_on: []", "must not be empty", "retry_on", 11),
        ("concurrency: {key: k, limit: 0}", "must be at least 1 (got 0)", "concurrency.limit", 30),
        (
            "callback: {url: 'ftp://x'}",
            "'ftp://x/***' is not an http:// or https:// URL",  # a receiver: its host only
            "callback.url",
            17,
        ),
        (
            "schedule: '* * *'",
            "'* * *' is not a cron expression of 5 fields: minute hour day month weekday",
            "schedule",
            11,
        ),
        ("hooks: {pre_run: 5}", "must be a string or a list, not a number", "hooks.pre_run", 18),
        ("hooks: {pre_run: []}", "must not be empty", "hooks.pre_run", 18),
        ("backoff: [1]", "must be a number, a string or a mapping, not a list", "backoff", 10),
        ("schedule: 5", "must be a string or a mapping, not a number", "schedule", 11),
        ("timeout: -5", "must be more than 0 (got -5)", "timeout", 10),
        ("timeout: true", "must be a number or a string, not a boolean", "timeout", 10),
        ("backoff: {jitter: 0.5}", "must be a boolean, not a number", "backoff.jitter", 19),
        (
            "artifacts: [{path: /etc}]",
            "'/etc' is not a path inside the work dir: no leading '/' and no '..'",
            "artifacts[0].path",
            20,
        ),
        (
            "artifacts: [{path: a/../../b}]",
            "'a/../../b' is not a path inside the work dir: no leading '/' and no '..'",
            "artifacts[0].path",
            20,
        ),
        ("artifacts: [{type: dir}]", "missing required field 'path'", "artifacts[0]", 13),
    ],
)
def test_message_per_kind_of_error(
    validator: JobValidator, line: str, message: str, path: str, column: int
) -> None:
    issue = one_issue(validator, f"executor: local\nproduct: {{commands: x}}\n{line}\n")
    assert issue == ValidationIssue(message, path, 3, column)


def test_job_id_pattern(validator: JobValidator) -> None:
    issue = one_issue(validator, "job_id: a/b\nexecutor: local\nproduct: {commands: x}\n")
    assert issue == ValidationIssue(
        "job id 'a/b' is not a plain name: use letters, digits, '.', '_' and '-', starting with a "
        "letter or digit, at most 128 characters",
        "job_id",
        1,
        9,
    )


@pytest.mark.parametrize("job_id", ["x" * 129, "-a", "a b", "a\n"])
def test_job_id_rejects(validator: JobValidator, job_id: str) -> None:
    document = {"job_id": job_id, "executor": "local", "product": {"commands": "x"}}
    issue = one_issue(validator, json.dumps(document), "job.json")
    assert issue.message.startswith("job id ")
    assert issue.path == "job_id"


def test_duration_pattern_also_nested(validator: JobValidator) -> None:
    issues = issues_of(
        validator,
        """\
        executor: local
        product: {commands: x}
        timeout: 10 minutes
        backoff: {initial: 1 hour}
        """,
    )
    assert issues == [
        ValidationIssue("'10 minutes' is not a duration like 30s, 10m, 1h30m", "timeout", 3, 10),
        ValidationIssue(
            "'1 hour' is not a duration like 30s, 10m, 1h30m", "backoff.initial", 4, 20
        ),
    ]


def test_bad_variable_name_points_at_the_name(validator: JobValidator) -> None:
    issue = one_issue(validator, "executor: local\nproduct: {commands: x}\nvariables:\n  a-b: 1\n")
    assert issue == ValidationIssue(
        "variable name 'a-b' is not valid: use letters, digits and '_', no leading digit",
        "variables.a-b",
        4,
        3,
    )


def test_schedule_needs_exactly_one_of_cron_and_every(validator: JobValidator) -> None:
    head = "executor: local\nproduct: {commands: x}\n"
    neither = issues_of(validator, head + "schedule: {evry: 30s}\n")
    assert neither == [
        ValidationIssue("unknown field 'evry' (did you mean 'every'?)", "schedule.evry", 3, 12),
    ]
    none = one_issue(validator, head + "schedule: {timezone: UTC}\n")
    assert none == ValidationIssue("missing required field 'cron' or 'every'", "schedule", 3, 11)
    both = one_issue(validator, head + "schedule: {cron: '* * * * *', every: 1m}\n")
    assert both == ValidationIssue("give only one of 'cron' or 'every'", "schedule", 3, 11)


def test_enum_of_overlap(validator: JobValidator) -> None:
    issue = one_issue(
        validator,
        "executor: local\nproduct: {commands: x}\nschedule:\n  every: 1m\n  overlap: maybe\n",
    )
    assert issue == ValidationIssue(
        "must be one of: skip, queue, replace, allow (got 'maybe')", "schedule.overlap", 5, 12
    )


def test_unknown_executor(validator: JobValidator) -> None:
    issue = one_issue(validator, "executor: dokcer\nproduct: {image: x}\n")
    assert issue == ValidationIssue(
        "unknown executor 'dokcer' (installed: custom, local)", "executor", 1, 11
    )


def test_executor_of_wrong_type_gets_one_message(validator: JobValidator) -> None:
    issue = one_issue(validator, "executor: [local]\nproduct: {commands: x}\n")
    assert issue == ValidationIssue("must be a string, not a list", "executor", 1, 11)


def test_product_checked_by_the_executor_of_each_step(validator: JobValidator) -> None:
    issues = issues_of(
        validator,
        """\
        executor: local
        steps:
          - id: inherits
          - id: own
            executor: custom
            product: {}
        """,
    )
    assert issues == [
        ValidationIssue("missing required field 'product'", "steps[0]", 3, 5),
        ValidationIssue("missing required field 'script'", "steps[1].product", 6, 14),
    ]


def test_steps_without_any_executor(validator: JobValidator) -> None:
    issue = one_issue(validator, "steps:\n  - id: a\n")
    assert issue == ValidationIssue("missing required field 'executor'", "steps[0]", 2, 5)


def test_every_problem_reported_once_and_sorted_by_line(validator: JobValidator) -> None:
    issues = issues_of(
        validator,
        """\
        on_interrupt: never
        executor: local
        product: {commands: [1, 2]}
        timeout: soon
        retries: many
        """,
    )
    assert [(i.line, i.path) for i in issues] == [
        (1, "on_interrupt"),
        (3, "product.commands[0]"),
        (3, "product.commands[1]"),
        (4, "timeout"),
        (5, "retries"),
    ]
    assert len(set(issues)) == len(issues)


# --- steps: what the schema cannot say --------------------------------------------------------

STEPS_HEAD = "executor: local\nsteps:\n"


def test_steps_cycle_is_named(validator: JobValidator) -> None:
    issue = one_issue(
        validator,
        STEPS_HEAD
        + "  - {id: a, needs: [c], product: {commands: x}}\n"
        + "  - {id: b, needs: [a], product: {commands: x}}\n"
        + "  - {id: c, needs: [b], product: {commands: x}}\n",
    )
    assert issue.message == "steps form a cycle: a -> c -> b -> a"
    assert (issue.path, issue.line, issue.column) == ("steps[1].needs[0]", 4, 21)


def test_step_needing_itself(validator: JobValidator) -> None:
    issue = one_issue(validator, STEPS_HEAD + "  - {id: a, needs: [a], product: {commands: x}}\n")
    assert issue.message == "steps form a cycle: a -> a"


def test_unknown_need_and_duplicate_step_ids(validator: JobValidator) -> None:
    issues = issues_of(
        validator,
        STEPS_HEAD
        + "  - {id: build, product: {commands: x}}\n"
        + "  - {id: deploy, needs: [biuld], product: {commands: x}}\n"
        + "  - {id: build, product: {commands: x}}\n",
    )
    assert issues == [
        ValidationIssue(
            "needs unknown step 'biuld' (did you mean 'build'?)", "steps[1].needs[0]", 4, 26
        ),
        ValidationIssue("duplicate step id 'build' (also steps[0])", "steps[2].id", 5, 10),
    ]


def test_long_chain_of_steps_is_no_recursion_problem(validator: JobValidator) -> None:
    steps = [{"id": "s0", "product": {"commands": "x"}}]
    steps += [
        {"id": f"s{i}", "needs": [f"s{i - 1}"], "product": {"commands": "x"}}
        for i in range(1, 3000)
    ]
    steps[0]["needs"] = ["s2999"]
    document = {"executor": "local", "steps": steps}
    issue = one_issue(validator, json.dumps(document), "job.json")
    assert issue.message.startswith("steps form a cycle: s0 -> s2999 -> s2998")


# --- the file itself --------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file(validator: JobValidator, text: str) -> None:
    assert one_issue(validator, text) == ValidationIssue("the file is empty", "")


@pytest.mark.parametrize(
    ("text", "kind"), [("- a\n- b\n", "a list"), ("just text\n", "a string"), ("~\n", "null")]
)
def test_top_level_must_be_a_mapping(validator: JobValidator, text: str, kind: str) -> None:
    issue = one_issue(validator, text)
    assert issue == ValidationIssue(
        f"the top level must be a mapping of job fields, not {kind}", "", 1, 1
    )


def test_second_document(validator: JobValidator) -> None:
    issue = one_issue(validator, "executor: local\nproduct: {commands: x}\n---\nexecutor: local\n")
    assert issue == ValidationIssue(
        "the file holds more than one YAML document; a job file is exactly one", "", 3, 1
    )


def test_not_utf8(validator: JobValidator) -> None:
    issues = validator.check(b'executor: local\nproduct: {commands: "caf\xe9"}\n', "job.yaml")
    assert issues == [ValidationIssue("the file is not UTF-8: byte 0xe9 at offset 40", "", 2, 25)]


def test_duplicate_keys(validator: JobValidator) -> None:
    issues = issues_of(
        validator,
        """\
        executor: local
        product:
          commands: x
          cwd: a
          cwd: b
        executor: custom
        """,
    )
    assert ValidationIssue("duplicate key 'cwd' (first on line 4)", "product.cwd", 5, 3) in issues
    assert ValidationIssue("duplicate key 'executor' (first on line 1)", "executor", 6, 1) in issues


def test_merge_keys_are_no_duplicates(validator: JobValidator) -> None:
    text = """\
        defaults: &d {shell: /bin/bash, cwd: a}
        executor: local
        product:
          <<: *d
          cwd: b
          commands: x
        """
    # `defaults` is no job field; the override of a merged key is no duplicate.
    issue = one_issue(validator, text)
    assert (issue.message, issue.line) == ("unknown field 'defaults'", 1)


def test_python_tags_are_refused(validator: JobValidator) -> None:
    issue = one_issue(
        validator, "executor: local\nproduct:\n  commands: !!python/object/apply:os.system [ls]\n"
    )
    assert issue == ValidationIssue(
        "the tag '!!python/object/apply:os.system' is not allowed: a job file holds plain data only",
        "",
        3,
        13,
    )


def test_non_json_yaml_types_are_refused(validator: JobValidator) -> None:
    issue = one_issue(validator, "executor: local\nproduct: {commands: !!binary aGk=}\n")
    assert issue.message.startswith("the tag '!!binary' is not allowed")


def test_yaml_syntax_error_position(validator: JobValidator) -> None:
    issue = one_issue(validator, "executor: local\nproduct: {commands: [a, b\n")
    # The parser's own words vary with the libyaml release; where, and where it began, do not.
    assert issue.message.startswith("invalid YAML: ")
    assert issue.message.endswith(" on line 2")
    assert (issue.line, issue.column) == (3, 1)


def test_tab_indentation_is_explained(validator: JobValidator) -> None:
    issue = one_issue(validator, "executor: local\nproduct:\n\tcommands: x\n")
    assert issue.message.endswith("(YAML does not allow tabs for indentation)")
    assert (issue.line, issue.column) == (3, 1)


def test_control_character(validator: JobValidator) -> None:
    issue = one_issue(validator, 'executor: local\nproduct: {commands: "é\x01"}\n')
    assert issue.message.startswith("invalid YAML: ")  # the rest is the YAML parser's wording
    assert (issue.line, issue.column) == (2, 23)


# --- hostile files: these must come back, and quickly -----------------------------------------


@pytest.mark.timeout(30)
def test_billion_laughs(validator: JobValidator) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    issue = one_issue(validator, "\n".join(lines) + "\nexecutor: local\n")
    assert issue == ValidationIssue(
        "the document expands to more than 100000 values (YAML aliases?)", ""
    )


@pytest.mark.timeout(30)
def test_merge_key_bomb(validator: JobValidator) -> None:
    lines = ["m0: &m0 {x: 1, y: 2}"]
    lines += [f"m{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * 10)}]}}" for i in range(1, 12)]
    issues = issues_of(validator, "\n".join(lines) + "\n")
    assert ValidationIssue("unknown field 'm11'", "m11", 12, 1) in issues


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "text", ["a: " + "[" * 100_000 + "]" * 100_000, "- " * 100_000 + "x", "[" * 100_000]
)
def test_deep_nesting_is_refused_without_crashing(validator: JobValidator, text: str) -> None:
    # spoold's own limit, and where it is passed, whether or not libyaml refuses such nesting
    # itself (libyaml 0.2.6 does, at 1000 levels).
    issue = one_issue(validator, text)
    assert "nested" in issue.message and f"{MAX_DEPTH} levels" in issue.message
    assert issue.line == 1 and issue.column is not None and 1 <= issue.column <= len(text)
    with pytest.raises(InvalidJobFile):
        validator.parse(text.encode(), "job.yaml")


def test_max_nodes_is_configurable() -> None:
    small = JobValidator(_schema(), max_nodes=10)
    issue = one_issue(
        small, "executor: local\nproduct: {commands: [a, b, c, d, e, f, g, h, i, j]}\n"
    )
    assert issue.message == "the document expands to more than 10 values (YAML aliases?)"


# --- JSON -------------------------------------------------------------------------------------


def test_json_valid(validator: JobValidator) -> None:
    data = b'{"executor": "local", "product": {"commands": ["make"]}, "timeout": 30}'
    assert validator.parse(data, "job.json") == {
        "executor": "local",
        "product": {"commands": ["make"]},
        "timeout": 30,
    }
    assert validator.parse(b"\xef\xbb\xbf" + data, "job.json")["timeout"] == 30


def test_json_syntax_error_position(validator: JobValidator) -> None:
    issue = one_issue(validator, '{"executor": "local",\n "product": {"commands": 5,}}', "job.json")
    assert issue == ValidationIssue(
        "invalid JSON: Expecting property name enclosed in double quotes", "", 2, 28
    )


def test_json_schema_error_position(validator: JobValidator) -> None:
    issue = one_issue(validator, '{"executor": "local",\n "product": {"commands": 5}}', "job.json")
    assert issue == ValidationIssue(
        "must be a string or a list, not a number", "product.commands", 2, 26
    )


def test_json_duplicate_key(validator: JobValidator) -> None:
    issue = one_issue(
        validator,
        '{"executor": "local", "product": {"commands": "x"}, "executor": "local"}',
        "a.json",
    )
    assert issue == ValidationIssue("duplicate key 'executor' (first on line 1)", "executor", 1, 53)


def test_empty_json_file(validator: JobValidator) -> None:
    assert one_issue(validator, " \n", "job.json") == ValidationIssue("the file is empty", "")


def test_json_null_is_no_job(validator: JobValidator) -> None:
    issue = one_issue(validator, "null", "job.JSON")
    assert issue.message == "the top level must be a mapping of job fields, not null"


def test_yaml_is_not_read_as_json(validator: JobValidator) -> None:
    assert one_issue(validator, "executor: local\n", "job.json").message.startswith("invalid JSON")


# --- composition and the API around it -------------------------------------------------------

FAKE_DOCKER = {
    "$defs": {"image": {"type": "string", "minLength": 1}},
    "type": "object",
    "additionalProperties": False,
    "required": ["image"],
    "properties": {"image": {"$ref": "#/$defs/image"}, "pull": {"const": "always"}},
}


def test_compose_with_an_extra_executor() -> None:
    schema = _schema(docker=FAKE_DOCKER)
    assert schema["$defs"]["executor"]["enum"] == ["custom", "docker", "local"]
    jsonschema.Draft202012Validator.check_schema(schema)
    extended = JobValidator(schema)
    assert extended.check(b"executor: docker\nproduct: {image: alpine}\n", "a.yaml") == []
    issues = extended.check(b"executor: docker\nproduct: {image: '', pull: never}\n", "a.yaml")
    assert issues == [
        ValidationIssue("must not be empty", "product.image", 2, 18),
        ValidationIssue("must be 'always' (got 'never')", "product.pull", 2, 28),
    ]
    step = b"steps:\n  - {id: a, executor: docker, product: {commands: x}}\n"
    assert [i.message for i in extended.check(step, "a.yaml")] == [
        "missing required field 'image'",
        "unknown field 'commands' (allowed: image, pull)",
    ]


def test_broken_executor_schema_is_a_plugin_error() -> None:
    with pytest.raises(PluginError, match=r"product\.broken"):
        JobValidator(_schema(broken={"type": "objekt"}))


def test_compose_leaves_its_inputs_alone() -> None:
    base = load_base_schema()
    before = repr(base), repr(FAKE_DOCKER)
    compose_job_schema(base, {"docker": FAKE_DOCKER})
    assert (repr(base), repr(FAKE_DOCKER)) == before


def test_without_executors_nothing_is_installed() -> None:
    bare = JobValidator(compose_job_schema(load_base_schema(), {}))
    issue = one_issue(bare, "executor: local\n")
    assert issue.message == "unknown executor 'local' (installed: none)"


def test_parse_raises_with_every_issue(validator: JobValidator) -> None:
    with pytest.raises(InvalidJobFile) as caught:
        validator.parse(b"executor: local\nproduct: {}\nretries: -1\n", "a.yaml")
    assert [i.path for i in caught.value.issues] == ["product", "retries"]


def test_issue_to_dict_and_format() -> None:
    issue = ValidationIssue("must be a string, not a number", "product.commands[1]", 3, 5)
    assert issue.to_dict() == {
        "message": "must be a string, not a number",
        "path": "product.commands[1]",
        "line": 3,
        "column": 5,
    }
    assert (
        issue.format("jobs/a.yaml")
        == "jobs/a.yaml:3:5: product.commands[1]: must be a string, not a number"
    )
    assert ValidationIssue("the file is empty", "").format("a.yaml") == "a.yaml: the file is empty"


def test_document_positions() -> None:
    positions = document_positions("a:\n  b: [x, {c: 1}]\n")
    assert positions[()] == (1, 1)
    assert positions[("a", "b")] == (2, 6)
    assert positions[("a", "b", 1, "c")] == (2, 14)


def test_valid_files_skip_the_error_path(
    validator: JobValidator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cost of positions and messages is paid only by invalid files."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the valid path composed the document a second time")

    monkeypatch.setattr(validation, "map_nodes", forbidden)
    monkeypatch.setattr(yaml, "compose", forbidden)
    assert validator.parse(textwrap.dedent(VALID_LOCAL).encode(), "a.yaml")["retries"] == 3


# The compiled fast check must agree with jsonschema on every verdict it gives.
AGREEMENT_CORPUS: list[Any] = [
    {"executor": "local", "product": {"commands": "x"}},
    {"executor": "local", "product": {"commands": ["x", 1]}},
    {"executor": "local", "product": {"commands": []}},
    {"executor": "local"},
    {"executor": "local", "product": {"commands": "x", "cwd": "../up"}},
    {"executor": "custom", "product": {"script": "x"}, "retries": True},
    {"executor": "custom", "product": {"script": "x"}, "retries": 1.0},
    {"executor": "custom", "product": {"script": "x"}, "timeout": False},
    {"executor": "custom", "product": {"script": "x"}, "priority": -3},
    {"executor": "custom", "product": {"script": "x"}, "job_id": "a\n"},
    {"executor": "nope", "product": {}},
    {"steps": []},
    {"steps": [{"id": "a", "executor": "local", "product": {"commands": "x"}}]},
    {"steps": [{"id": "a", "product": {"commands": "x"}}]},
    {"executor": "local", "product": {"commands": "x"}, "steps": [{"id": "a", "product": {}}]},
    {
        "executor": "local",
        "product": {"commands": "x"},
        "schedule": {"cron": "* * * * *", "every": 5},
    },
    {
        "executor": "local",
        "product": {"commands": "x"},
        "schedule": {"every": "5m", "overlap": "allow"},
    },
    {"executor": "local", "product": {"commands": "x"}, "variables": {"A": [1]}},
    {"executor": "local", "product": {"commands": "x"}, "variables": {"1A": "x"}},
    {"executor": "local", "product": {"commands": "x"}, "backoff": {"multiplier": 0.5}},
    {
        "executor": "local",
        "product": {"commands": "x"},
        "callback": {"events": ["failed", "failed"]},
    },
    {"executor": "local", "product": {"commands": "x"}, "on_interrupt": "requeue"},
    {"executor": "local", "product": {"commands": "x"}, "schedule": 5},
    {"executor": "local", "product": {"commands": "x"}, "timeout": -1},
    {"executor": "docker", "product": {"image": "alpine", "pull": "always"}},
    {"executor": "docker", "product": {"image": ""}},
    {"steps": [{"id": "a", "executor": "docker", "product": {"image": 5}}]},
]


@pytest.mark.parametrize("document", AGREEMENT_CORPUS)
def test_fast_check_agrees_with_jsonschema(document: Any) -> None:
    assert_fast_check_agrees(_schema(docker=FAKE_DOCKER), document)


def assert_fast_check_agrees(schema: dict[str, Any], document: Any) -> None:
    """The daemon's compiled check of ``schema`` says of ``document`` what jsonschema says."""
    fastjsonschema = pytest.importorskip("fastjsonschema")
    fast = validation._compiled(schema)  # as the daemon compiles it
    assert fast is not None
    try:
        fast(document)
        fast_verdict = True
    except fastjsonschema.JsonSchemaException:
        fast_verdict = False
    assert fast_verdict == jsonschema.Draft202012Validator(schema).is_valid(document)


@pytest.mark.parametrize("value", ["on", "off", "Off", None, 1, True, ["on"]], ids=repr)
def test_a_const_is_checked_alike_on_the_fast_path(value: Any) -> None:
    """The fast check writes a ``const`` as a one-value ``enum`` (fastjsonschema cannot write
    one without the details of its failures); a property named ``const`` stays a property."""
    fastjsonschema = pytest.importorskip("fastjsonschema")
    schema = {
        "type": "object",
        "properties": {
            "switch": {"const": "on"},
            "const": {"type": "string", "enum": ["on", "off"], "const": "off"},
            "either": {"anyOf": [{"const": "on"}, {"items": {"const": "on"}}]},
        },
    }
    fast = validation._compiled(schema)
    assert fast is not None
    for document in ({"switch": value}, {"const": value}, {"either": value}):
        try:
            fast(document)
            verdict = True
        except fastjsonschema.JsonSchemaException:
            verdict = False
        assert verdict == jsonschema.Draft202012Validator(schema).is_valid(document), document


NARROWING_CASES = [
    "job_id: a\nexecutor: local\nproduct: {commands: 'true'}\n",
    "executor: custom\nproduct: {script: 'echo hi'}\n",
    "executor: local\nproduct: {script: 'echo hi'}\n",  # custom's field under local
    "executor: local\nproduct: {commands: 'true'}\ntimeout: soon\n",
    "executor: nope\nproduct: {}\n",
    # Steps naming another executor: the narrowed schema refuses, the full one accepts.
    textwrap.dedent("""\
        executor: local
        product: {commands: 'true'}
        steps:
          - {id: a, product: {commands: 'true'}}
          - {id: b, executor: custom, product: {script: 'echo b'}, needs: [a]}
        """),
    textwrap.dedent("""\
        executor: local
        product: {commands: 'true'}
        steps:
          - {id: a, executor: custom, product: {commands: 'wrong field'}}
        """),
]


@pytest.mark.parametrize("text", NARROWING_CASES)
def test_narrowed_schemas_give_the_full_schemas_verdict(text: str) -> None:
    subs = {
        "local": load_executor_schema(EXECUTORS, "local.schema.json"),
        "custom": load_executor_schema(EXECUTORS, "custom.schema.json"),
    }
    narrowed = JobValidator.for_executors(load_base_schema(), subs)
    plain = JobValidator(compose_job_schema(load_base_schema(), subs))
    assert narrowed.check(text.encode(), "job.yaml") == plain.check(text.encode(), "job.yaml")


def test_the_examples_are_valid() -> None:
    """What the README points users to must pass `spoold validate`."""
    validator = job_validator(ExecutorRegistry.from_entry_points())
    examples = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))
    assert len(examples) >= 3
    for example in examples:
        assert validator.check(example.read_bytes(), example.name) == [], example.name


def test_a_pattern_with_braces_is_shown_not_formatted() -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "pattern": "^[a-z]{2,3}$"}},
    }
    checker = JobValidator(_schema(braces=schema))
    issues = checker.check(b"executor: braces\nproduct: {name: toolong}\n", "a.yaml")
    assert [i.message for i in issues] == ["'toolong' does not match ^[a-z]{2,3}$"]


def test_keywords_beside_a_ref_are_checked_on_the_fast_path_too() -> None:
    """fastjsonschema skips every keyword next to a $ref; a plugin's schema written that way
    must not let through what jsonschema refuses."""
    plugin = {
        "type": "object",
        "$defs": {"base": {"type": "object"}},
        "properties": {"target": {"$ref": "#/$defs/base", "required": ["host"]}},
    }
    validator = JobValidator.for_executors(load_base_schema(), {"plugin": plugin})
    text = "executor: plugin\nproduct: {target: {port: 22}}\n"
    issues = validator.check(text.encode(), "job.yaml")
    assert [(i.path, i.message) for i in issues] == [
        ("product.target", "missing required field 'host'")
    ]


def test_a_schema_is_compiled_only_when_a_job_needs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each compiled schema costs megabytes of generated code in the daemon for good: a daemon
    # that only ever runs local jobs compiles the local one, not one per installed executor.
    compiled: list[Any] = []
    real = validation._compiled

    def counting(schema: Any) -> Any:
        compiled.append(schema)
        return real(schema)

    monkeypatch.setattr(validation, "_compiled", counting)
    checker = job_validator(ExecutorRegistry.from_entry_points())
    assert compiled == []
    for _ in range(3):
        assert checker.check(b"executor: local\nproduct: {commands: 'true'}\n", "a.yaml") == []
    assert len(compiled) == 1  # the local jobs' narrowed schema, once
    assert checker.check(b"executor: custom\nproduct: {script: 'true'}\n", "b.yaml") == []
    assert len(compiled) == 2
