"""Round 31 of the hostile tester, validation's part.

1. A job with steps runs its steps only: a field of the job's own that none of them would run
   (a ``product``; a ``type`` or ``limits`` that every step replaces with its own) is refused,
   saying where and what to do, wherever a file is admitted (intake, validate, submit, the API).
2. A refusal's words are escaped once: a value quoted in a message (``'bad\\x1b[31mid'``) reads
   the same on the command line, in reason.json and in the API's body, with no raw control
   character anywhere and no backslash doubled.
"""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from spoold.core.documents import show_value
from spoold.core.errors import escape_unprintable
from spoold.core.spool import Spool
from spoold.intake import validation
from spoold.intake.admission import Admission, Refused
from spoold.intake.incoming import Intake, Rejected
from spoold.intake.validation import JobValidator, ValidationIssue, job_validator
from spoold.run.registry import ExecutorRegistry
from tests.fakes import FakeClock
from tests.harness import run_cli
from tests.test_validation import assert_fast_check_agrees

REGISTRY = ExecutorRegistry.from_entry_points()
LOG = logging.getLogger("spoold.test.round31")
ESC = "\x1b"

#: The tester's file: a product beside steps, which nothing would run.
TOP_PRODUCT = textwrap.dedent("""\
    job_id: b1
    executor: local
    product: {commands: "echo top"}
    steps: [{id: one, product: {commands: "echo one"}}]
    """)
#: A step id that would colour a terminal red.
HOSTILE_ID = textwrap.dedent("""\
    job_id: b2
    executor: local
    steps: [{id: "bad\\u001b[31mid", product: {commands: "echo one"}}]
    """)
#: How the message quotes that id: escaped once, as repr writes it.
SHOWN_ID = "step id 'bad\\x1b[31mid' is not a plain name"


@pytest.fixture(scope="module")
def validator() -> JobValidator:
    return job_validator(REGISTRY)


def issues_of(validator: JobValidator, document: dict[str, Any] | str) -> list[ValidationIssue]:
    text = document if isinstance(document, str) else yaml.safe_dump(document, sort_keys=False)
    return validator.check(text.encode(), "job.yaml")


def step(step_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": step_id, "product": {"commands": "true"}, **fields}


# -- 1. what a job with steps would never run --------------------------------------------------


def test_the_testers_file_is_refused_at_its_product(validator: JobValidator) -> None:
    issues = issues_of(validator, TOP_PRODUCT)
    assert [(i.path, i.line) for i in issues] == [("product", 3)], issues
    message = issues[0].message
    assert "a job with steps runs only its steps" in message
    assert "move it into a step, or drop steps:" in message


@pytest.mark.parametrize(
    "document",
    [
        # without a job-wide executor, each step naming its own
        {"product": {"commands": "x"}, "steps": [step("a", executor="local")]},
        # a product that would be valid for the executor, and one that would not
        {"executor": "custom", "product": {"script": "x"}, "steps": [step("a", executor="local")]},
        {"executor": "local", "product": {}, "steps": [step("a"), step("b", needs=["a"])]},
    ],
    ids=["no-job-executor", "valid-product", "invalid-product"],
)
def test_a_product_beside_steps_is_refused_whatever_it_holds(
    validator: JobValidator, document: dict[str, Any]
) -> None:
    paths = [issue.path for issue in issues_of(validator, document)]
    assert "product" in paths, paths


def test_an_empty_list_of_steps_with_a_product_stays_a_job_without_steps(
    validator: JobValidator,
) -> None:
    document = {"executor": "local", "product": {"commands": "x"}, "steps": []}
    assert issues_of(validator, document) == []


@pytest.mark.parametrize("field", ["type", "limits"])
def test_a_default_every_step_replaces_is_refused(validator: JobValidator, field: str) -> None:
    """The job's ``type`` and ``limits`` are its steps' defaults (spoold.run.steps.step_spec):
    where every step names its own, the job's would apply to nothing."""
    value: Any = "job-type" if field == "type" else {"open_files": 64}
    own: Any = "own-type" if field == "type" else {"open_files": 32}
    document = {
        "executor": "local",
        field: value,
        "steps": [step("a", **{field: own}), step("b", **{field: own})],
    }
    issues = issues_of(validator, document)
    assert [issue.path for issue in issues] == [field], issues
    assert f"every step names its own {field}" in issues[0].message
    # One step that takes the job's is enough: the job's then applies.
    document["steps"].append(step("c"))
    assert issues_of(validator, document) == []


def test_what_applies_to_the_whole_job_stays_allowed(validator: JobValidator) -> None:
    """Fields a job of steps uses itself (the executor counts against its limit and policy;
    the timeout bounds the steps together; retries rerun the attempt; hooks run around it;
    variables and artifacts are merged with each step's), even where every step has its own."""
    own = {"executor": "local", "timeout": 5, "retries": 1, "backoff": "1s", "retry_on": [1],
           "variables": {"A": "1"}, "artifacts": [{"path": "out"}]}  # fmt: skip
    document = {
        "executor": "local",
        "timeout": 60,
        "retries": 2,
        "backoff": {"initial": "1s"},
        "retry_on": [2],
        "variables": {"B": "2"},
        "artifacts": [{"path": "log"}],
        "hooks": {"pre_run": "true", "post_run": "true"},
        "concurrency": {"key": "k"},
        "priority": 3,
        "on_interrupt": "requeue",
        "labels": {"team": "a"},
        "description": "d",
        "steps": [step("a", **own), step("b", needs=["a"], **own)],
    }
    assert issues_of(validator, document) == []


def test_a_step_that_takes_the_jobs_type_is_valid(validator: JobValidator) -> None:
    """The job's ``type`` runs in the steps that name none: no reason to refuse it."""
    document = {"executor": "local", "type": "t", "steps": [step("a"), step("b", type="u")]}
    assert issues_of(validator, document) == []


FAST_CORPUS: list[dict[str, Any]] = [
    {"executor": "local", "product": {"commands": "x"}, "steps": [step("a")]},
    {"executor": "local", "product": {"commands": "x"}, "steps": []},
    {"executor": "local", "type": "t", "steps": [step("a", type="u")]},
    {"executor": "local", "type": "t", "steps": [step("a", type="u"), step("b")]},
    {"executor": "local", "type": "t", "steps": [step("a", type="u"), "not a step"]},
    {"executor": "local", "limits": {"open_files": 9}, "steps": [step("a", limits={})]},
    {"executor": "local", "limits": {"open_files": 9}, "steps": [step("a"), step("b")]},
]


@pytest.mark.parametrize("document", FAST_CORPUS, ids=repr)
def test_the_fast_check_agrees_with_jsonschema(document: dict[str, Any]) -> None:
    """The daemon's compiled check of one executor's jobs says what jsonschema says."""
    schema = validation.compose_job_schema(
        validation.load_base_schema(), {"local": REGISTRY.schemas()["local"]}
    )
    assert_fast_check_agrees(schema, document)


def test_spoold_validate_refuses_the_testers_file(spool_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "b.yaml"
    path.write_text(TOP_PRODUCT)
    result = run_cli(spool_dir, "validate", str(path))
    assert result.returncode == 1, result.stdout
    assert f"{path}:3:10: product: a mapping is not allowed here: a job with steps" in (
        result.stderr
    )
    assert "valid" not in result.stdout


def test_intake_rejects_the_testers_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.init()
    rejected = offer(spool, "b.yaml", TOP_PRODUCT)
    reason = json.loads((rejected.path / "reason.json").read_text())
    assert reason["code"] == "invalid"
    assert reason["errors"][0]["path"] == "product"


# -- 2. escaped once, on every face ------------------------------------------------------------


def offer(spool: Spool, name: str, text: str) -> Rejected:
    intake = Intake(spool, job_validator(REGISTRY), FakeClock(), max_file_size=1 << 20,
                    settle_time=0.0, on_accepted=lambda job, document: None,
                    logger=LOG)  # fmt: skip
    (spool.dir("incoming") / name).write_text(text)
    outcome = intake.offer(name, complete=True)
    assert isinstance(outcome, Rejected), outcome
    return outcome


def test_the_command_line_escapes_a_hostile_step_id_once(spool_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "b.yaml"
    path.write_text(HOSTILE_ID)
    result = run_cli(spool_dir, "validate", str(path))
    assert result.returncode == 1
    assert ESC not in result.stdout + result.stderr
    assert f"{path}:3:14: steps[0].id: {SHOWN_ID}" in result.stderr, result.stderr


def test_the_command_line_still_escapes_the_file_name(spool_dir: Path, tmp_path: Path) -> None:
    """The name is the caller's text, not a message: printable's, backslash and all."""
    path = tmp_path / "a\\b.yaml"
    path.write_text(HOSTILE_ID)
    result = run_cli(spool_dir, "validate", str(path))
    assert f"{tmp_path}/a\\\\b.yaml:3:14: steps[0].id: {SHOWN_ID}" in result.stderr
    refused = tmp_path / "c\x1b[2J.yaml"  # a name intake refuses: said of it, escaped
    refused.write_text(HOSTILE_ID)
    result = run_cli(spool_dir, "validate", str(refused))
    assert ESC not in result.stderr
    assert f"{tmp_path}/c\\x1b[2J.yaml: the file name has control characters" in result.stderr


def test_reason_json_carries_the_message_escaped_once(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.init()
    rejected = offer(spool, "b.yaml", HOSTILE_ID)
    kept = (rejected.path / "reason.json").read_text()
    assert "\\u001b" not in kept and ESC not in kept  # no control character, even as JSON's
    reason = json.loads(kept)
    assert reason["errors"][0]["message"].startswith(SHOWN_ID)
    assert reason["reason"].startswith(f"steps[0].id: {SHOWN_ID}")


def test_the_apis_body_carries_the_message_escaped_once(validator: JobValidator) -> None:
    """The 422's ``message`` and ``errors`` are the refusal's reason and issues as they are."""
    admission = Admission(validator, max_file_size=1 << 20)
    with pytest.raises(Refused) as caught:
        admission.admit(HOSTILE_ID.encode(), "api-x.yaml", now=FakeClock().now())
    body = json.dumps({"message": caught.value.reason,
                       "errors": [issue.to_dict() for issue in caught.value.issues]})  # fmt: skip
    assert "\\u001b" not in body
    assert json.loads(body)["errors"][0]["message"].startswith(SHOWN_ID)


def test_what_a_parser_quotes_is_escaped_once(validator: JobValidator) -> None:
    """PyYAML quotes a tag with repr (its %1B decoded): the message keeps that one escape."""
    text = 'executor: local\nproduct: !foo%1B%5B31m {commands: "true"}\n'
    issue = issues_of(validator, text)[0]
    assert (
        issue.message == "the tag '!foo\\x1b[31m' is not allowed: a job file holds plain data only"
    )


def test_what_an_executors_check_words_raw_is_escaped(tmp_path: Path) -> None:
    """An executor's own check may quote a value as it is: it reaches no face raw."""
    subs = {"local": REGISTRY.schemas()["local"]}

    def check(product: Any) -> list[str]:
        return [f"cannot run {product['commands']}"]

    validator = JobValidator.for_executors(
        validation.load_base_schema(), subs, checks={"local": check}
    )
    text = 'executor: local\nproduct: {commands: "a\\\\b\\u001b[31m\\u202e"}\n'
    issue = issues_of(validator, text)[0]
    assert issue.message == "cannot run a\\b\\x1b[31m\\u202e"


@pytest.mark.parametrize(
    "value", ["plain", "bad\x1b[31mid", "back\\slash", "\u202eevil", "tab\there", "x\x9by"]
)
def test_escaping_a_message_again_changes_nothing(value: str) -> None:
    message = f"step id {show_value(value)} is not a plain name"
    once = escape_unprintable(message)
    assert once == message  # show_value escaped it already
    assert escape_unprintable(once) == once
    assert escape_unprintable(value).isprintable()
