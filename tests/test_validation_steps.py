"""A job of steps, and a job whose ``steps:`` is empty, at validation: whatever an executor
would refuse before its first call is refused here (SPEC section 2), with its path."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from spoold.intake import validation
from spoold.intake.validation import JobValidator, ValidationIssue, job_validator
from spoold.run.registry import ExecutorRegistry
from tests.harness import run_cli
from tests.test_validation import assert_fast_check_agrees

REGISTRY = ExecutorRegistry.from_entry_points()

#: Every installed executor whose product has required fields: a unit of it cannot run without.
NEEDS_A_PRODUCT = sorted(
    name for name, schema in REGISTRY.schemas().items() if schema.get("required")
)

#: For the executors with operations, one that each of them knows.
A_TYPE = {"proxmox": "kvm_list", "sevdesk": "cancel_invoice", "lexware": "cancel_invoice"}


@pytest.fixture(scope="module")
def validator() -> JobValidator:
    return job_validator(REGISTRY)


def issues_of(validator: JobValidator, document: dict[str, Any] | str) -> list[ValidationIssue]:
    text = document if isinstance(document, str) else yaml.safe_dump(document, sort_keys=False)
    return validator.check(textwrap.dedent(text).encode(), "job.yaml")


def test_the_executors_that_need_a_product_are_found() -> None:
    assert {"local", "custom", "docker", "ssh"} <= set(NEEDS_A_PRODUCT)


@pytest.mark.parametrize("executor", NEEDS_A_PRODUCT)
def test_an_empty_list_of_steps_and_no_product_is_refused(
    validator: JobValidator, executor: str
) -> None:
    """``steps: []`` runs as a job without steps: its executor gets the job's product, so a
    job with neither fails at its first call (``KeyError('commands')``); refused here instead."""
    document: dict[str, Any] = {"job_id": "e", "executor": executor, "steps": []}
    if executor in A_TYPE:
        document["type"] = A_TYPE[executor]
    messages = {(issue.message, issue.path) for issue in issues_of(validator, document)}
    assert any(
        message.startswith("missing required field 'product'") and path == ""
        for message, path in messages
    ), messages


def test_the_message_says_why_an_empty_list_of_steps_needs_a_product(
    validator: JobValidator,
) -> None:
    issues = issues_of(validator, "job_id: e\nexecutor: local\nsteps: []\n")
    assert issues == [
        ValidationIssue(
            "missing required field 'product' (steps is empty: the job runs as one unit of "
            "its executor, with the job's product)",
            "",
            1,
            1,
        )
    ]


def test_without_steps_the_message_is_the_plain_one(validator: JobValidator) -> None:
    assert issues_of(validator, "job_id: e\nexecutor: local\n") == [
        ValidationIssue("missing required field 'product'", "", 1, 1)
    ]


def test_an_empty_list_of_steps_with_a_product_is_a_job_without_steps(
    validator: JobValidator,
) -> None:
    document = {"job_id": "e", "executor": "local", "steps": [], "product": {"commands": "true"}}
    assert issues_of(validator, document) == []
    # ... so it is held to all that a job without steps is: here its product's own fields.
    document["product"] = {}
    assert [issue.message for issue in issues_of(validator, document)] == [
        "missing required field 'commands'"
    ]


def test_an_empty_list_of_steps_needs_the_type_a_job_without_steps_needs(
    validator: JobValidator,
) -> None:
    product = {"host": "pve1", "node": "pve1", "token_id": "a@pve!t", "token_secret": "s"}
    document = {"job_id": "e", "executor": "proxmox", "steps": [], "product": product}
    plain = {key: value for key, value in document.items() if key != "steps"}
    assert [i.message for i in issues_of(validator, plain)] == ["missing required field 'type'"]
    assert [(i.message, i.path) for i in issues_of(validator, document)] == [
        (
            "missing required field 'type' (steps is empty: the job runs as one unit of its "
            "executor, with the job's type)",
            "",
        )
    ]


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        pytest.param(
            [{"id": "a"}], [("missing required field 'product'", "steps[0]")], id="no-product"
        ),
        pytest.param(
            [{"id": "a", "product": {}}],
            [("missing required field 'commands'", "steps[0].product")],
            id="empty-product",
        ),
        pytest.param(
            [{"id": "a", "product": {"commands": "true"}}, {"id": "b", "executor": "custom"}],
            [("missing required field 'product'", "steps[1]")],
            id="own-executor-no-product",
        ),
        pytest.param(
            [
                {"id": "a", "executor": "custom", "product": {"commands": "x"}},
                {"id": "b", "needs": ["a"]},
            ],
            [
                (
                    "unknown field 'commands' (allowed: script, interpreter, args)",
                    "steps[0].product.commands",
                ),
                ("missing required field 'script'", "steps[0].product"),
                ("missing required field 'product'", "steps[1]"),
            ],
            id="each-step-lacking",
        ),
    ],
)
def test_steps_that_lack_what_their_executor_needs_are_refused(
    validator: JobValidator, steps: list[dict[str, Any]], expected: list[tuple[str, str]]
) -> None:
    """Also with the job's own product present: a step does not inherit it."""
    for product in ({}, {"product": {"commands": "true"}}):
        document = {"job_id": "s", "executor": "local", **product, "steps": steps}
        found = {(issue.message, issue.path) for issue in issues_of(validator, document)}
        assert set(expected) <= found, (product, found)


@pytest.mark.parametrize(
    "document",
    [
        {"executor": "local", "steps": []},
        {"executor": "local", "steps": [], "product": {"commands": "x"}},
        {"executor": "local", "steps": [{"id": "a", "product": {"commands": "x"}}]},
        {"executor": "custom", "steps": [], "type": "x"},
        {"executor": "proxmox", "steps": [], "product": {"host": "h"}},
    ],
    ids=repr,
)
def test_the_fast_check_agrees_with_jsonschema_on_empty_steps(document: dict[str, Any]) -> None:
    executor = document["executor"]
    # Narrowed to the job's executor, as the daemon's fast check is for a job of one.
    schema = validation.compose_job_schema(
        validation.load_base_schema(), {executor: REGISTRY.schemas()[executor]}
    )
    assert_fast_check_agrees(schema, document)


def test_spoold_validate_refuses_the_empty_steps_of_the_probe(
    spool_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("job_id: empty\nexecutor: local\nsteps: []\n")
    result = run_cli(spool_dir, "validate", str(path))
    assert result.returncode == 1, result.stdout
    assert "missing required field 'product'" in result.stdout + result.stderr
    assert "valid" not in result.stdout.replace("invalid", "")
