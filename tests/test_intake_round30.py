"""Round 30 of the hostile tester, intake's part: what a refusal quotes, and what cannot start.

1. A refusal's words go to reason.json (the submit group's), `spoold list`, the API, the page,
   spoold's log and the `rejected` callback: they quote no receiver's URL (shown as
   scheme://host:port/***), no URL's user and password, and no secret-named field's value.
2. A variable or a script longer than Linux execs (E2BIG) is refused when it is submitted.
"""

from __future__ import annotations

import errno
import json
import logging
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest

from spoold.core.documents import format_path, show_value
from spoold.core.errors import CallbackError, ValidationIssue
from spoold.core.secrets import SecretStore
from spoold.core.spool import Spool
from spoold.intake.admission import Admission, Refused
from spoold.intake.exec_limits import MAX_ARG_STRLEN, MAX_VARIABLES_BYTES
from spoold.intake.incoming import Intake, Rejected
from spoold.intake.redaction import HIDDEN, Redaction, quoted
from spoold.intake.validation import JobValidator, job_validator
from spoold.out.outbox import Callbacks
from spoold.run.registry import ExecutorRegistry
from tests.fakes import FakeClock

LOG = logging.getLogger("spoold.test.round30")
JOB = "executor: local\nproduct: {commands: 'true'}\n"
#: The tester's file: a typo'd scheme, so that both URLs are refused.
HOSTILE = JOB + textwrap.dedent("""\
    callback: {url: "htps://backend:Hunter2-PW@backend.example.net/hooks?key=K-123", secret: "${secret:SHORT}"}
    notify: [{webhook: {url: "htps://hooks.slack.example/services/T000/B000/XXXXSLACKKEY", format: slack}}]
    """)
#: What none of the refusal's words may hold.
LEAKS = ("Hunter2-PW", "K-123", "key=", "XXXXSLACKKEY", "T000", "backend:", "/hooks?", "services")


@pytest.fixture(scope="module")
def validator() -> JobValidator:
    return job_validator(ExecutorRegistry.from_entry_points())


def refused(validator: JobValidator, text: str, **kwargs: Any) -> Refused:
    admission = Admission(validator, max_file_size=1 << 22, **kwargs)
    with pytest.raises(Refused) as caught:
        admission.admit(text.encode(), "job.yaml", now=FakeClock().now())
    return caught.value


def words(refusal: Refused) -> str:
    """Everything a refusal says, as reason.json and the API's 422 carry it."""
    return json.dumps([refusal.reason, [issue.to_dict() for issue in refusal.issues]])


def assert_no_leak(text: str, leaks: tuple[str, ...] = LEAKS) -> None:
    found = [leak for leak in leaks if leak in text]
    assert not found, (found, text)


# -- 1. what a refusal quotes ----------------------------------------------------------------


def test_the_testers_file_is_refused_without_its_urls(validator: JobValidator) -> None:
    refusal = refused(validator, HOSTILE)
    assert refusal.code == "invalid"
    assert_no_leak(words(refusal))
    by_path = {issue.path: issue.message for issue in refusal.issues}
    assert by_path["callback.url"].startswith("'htps://backend.example.net/***' is not")
    assert by_path["notify[0].webhook.url"].startswith("'htps://hooks.slack.example/***' ")
    assert refusal.reason.startswith("callback.url: 'htps://backend.example.net/***'")


def test_intake_keeps_and_logs_and_announces_no_url(
    validator: JobValidator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """reason.json, the `rejected` delivery to the default receiver, and spoold's log."""
    spool = Spool(tmp_path / "spool")
    spool.init()
    (tmp_path / "secrets").mkdir(mode=0o700)
    clock = FakeClock()
    callbacks = Callbacks(spool, clock, SecretStore(tmp_path / "secrets"), logger=LOG,
                          default_url="http://127.0.0.1:9/default", default_secret="s")  # fmt: skip
    intake = Intake(spool, validator, clock, max_file_size=1 << 20, settle_time=0.0,
                    on_accepted=lambda job, document: None, logger=LOG,
                    callbacks=callbacks)  # fmt: skip
    (spool.dir("incoming") / "hostile.yaml").write_text(HOSTILE)
    with caplog.at_level(logging.DEBUG, logger=LOG.name):
        outcome = intake.offer("hostile.yaml", complete=True)
    assert isinstance(outcome, Rejected), outcome
    kept = (outcome.path / "reason.json").read_text()
    assert "htps://backend.example.net/***" in kept
    assert_no_leak(kept)
    deliveries = [p for p in spool.dir("outbox").rglob("*") if p.is_file()]
    assert deliveries, "the default receiver is told of the rejection"
    for delivery in deliveries:
        assert_no_leak(delivery.read_text(errors="replace"))
    assert caplog.records
    assert_no_leak("\n".join(record.getMessage() for record in caplog.records))


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        # an enum: jsonschema's value, then ours
        (JOB + "callback: {url: 'https://u:pw-SECRET1@h.example/p?k=SECRET2', events: [x]}\n"
         "notify: [{webhook: {url: 'https://chat.example/SECRET3', format: 'ftp://me:SECRET4@x'}}]\n",
         "ftp://***@x"),
        # an unknown field beside a URL, and a duplicate key that is a URL with a password
        (JOB + "callback: {url: 'https://h.example/SECRET1', urll: 1}\n"
         "variables: {'ftp://me:SECRET2@h/x': 1}\n", "ftp://***@h/x"),
        # needs of an unknown step named by a URL with a password
        ("executor: local\nsteps:\n- {id: a, product: {commands: 'true'},"
         " needs: ['https://me:SECRET1@h.example']}\n", "https://***@h.example"),
        # a reference never closed in a secret-named variable and in a webhook's URL
        (JOB + "variables: {DB_PASSWORD: '${secret:SECRET1SECRET1', API_TOKEN: '${x'}\n"
         "notify: [{webhook: {url: 'https://chat.example/SECRET2${secret:', format: json}}]\n",
         None),
        # a password in an executor's own check (lexware's base_url with a path)
        ("executor: lexware\ntype: cancel_invoice\nproduct: {api_key: 'SECRET1-KEY',"
         " invoice_id: 0f8fad5b-d9cb-469f-a165-70867728950e, base_url: 'https://me:SECRET2@api.example/v1'}\n", "***@"),
    ],
    ids=["enum", "unknown-field-and-key", "needs", "unclosed-reference", "executor-check"],
)  # fmt: skip
def test_no_message_quotes_a_hidden_value(
    validator: JobValidator, text: str, shown: str | None
) -> None:
    refusal = refused(validator, text)
    said = words(refusal)
    assert_no_leak(said, ("SECRET1", "SECRET2", "SECRET3", "SECRET4", "pw-", "me:S"))
    if shown is not None:
        assert shown in said


def test_a_callback_error_that_quotes_its_url_is_told_without_it(validator: JobValidator) -> None:
    """The out layer words its own errors; the refusal still says no more than the host."""
    url = "https://me:SECRET1@hooks.example/SECRET2?key=SECRET3"

    def target(document: Any) -> None:
        raise CallbackError(f"callback to {url} has no secret to sign with")

    refusal = refused(validator, JOB + f"callback: {{url: '{url}'}}\n", callback_target=target)
    assert refusal.code == "callback"
    assert_no_leak(words(refusal), ("SECRET1", "SECRET2", "SECRET3", "me:S"))
    assert "callback to https://hooks.example/***" in refusal.reason


def test_secret_named_fields_and_receiver_urls_are_quoted_hidden() -> None:
    assert quoted("hunter2", ("variables", "DB_PASSWORD")) == HIDDEN
    assert quoted("x", ("steps", 0, "product", "api_token")) == HIDDEN
    assert quoted("x", ("variables", "GITHUB_TOKEN")) == HIDDEN
    assert quoted("x", ("callback", "secret")) == HIDDEN
    url = "https://u:p@h.example:8443/a?b=c"
    assert quoted(url, ("callback", "url")) == "'https://h.example:8443/***'"
    assert quoted(url, ("notify", 2, "webhook", "url")) == "'https://h.example:8443/***'"
    assert quoted("no host here", ("notify", 0, "webhook", "url")) == HIDDEN
    assert quoted("http://[::1", ("callback", "url")) == HIDDEN  # unparseable
    assert quoted(url, ("variables", "URL")) == "'https://***@h.example:8443/a?b=c'"
    assert quoted("token_id", ("product", "token_id")) == "'token_id'"  # not secret-named


def test_a_password_is_taken_out_before_a_long_value_is_cut() -> None:
    url = "https://user:" + "P" * 80 + "@h.example/x"
    assert "P" not in show_value(url).removeprefix("'https://")
    assert format_path(("variables", url, 0)) == 'variables["https://***@h.example/x"][0]'


def test_a_redaction_hunts_cut_pieces_but_names_secrets() -> None:
    document = {"variables": {"DB_PASSWORD": "${secret:DB}suffix-literal-text" + "z" * 80},
                "callback": {"url": "https://h.example/path-key"}}  # fmt: skip
    hide = Redaction(document)
    said = hide.text("'suffix-literal-textzzzz...' and secret 'DB' and https://h.example/path-key")
    assert said == f"{HIDDEN} and secret 'DB' and https://h.example/***"
    issue = ValidationIssue("x", 'variables["https://a:b@c"]')
    assert hide.issues([issue])[0].path == 'variables["https://***@c"]'


# -- 2. what cannot start ----------------------------------------------------------------------


def env_sized(name: str, total: int) -> dict[str, str]:
    """A variable whose NAME=value is ``total`` bytes."""
    return {name: "a" * (total - len(name) - 1)}


def test_the_bound_is_linuxs() -> None:
    """What admission allows starts; one byte more does not (E2BIG)."""
    subprocess.run(["/bin/true"], env=env_sized("V", MAX_ARG_STRLEN - 1), check=True, timeout=30)
    with pytest.raises(OSError) as too_big:
        subprocess.run(["/bin/true"], env=env_sized("V", MAX_ARG_STRLEN), check=True, timeout=30)
    assert too_big.value.errno == errno.E2BIG
    script = "#" * (MAX_ARG_STRLEN - 1)
    subprocess.run(["/bin/sh", "-c", script], check=True, timeout=30)
    with pytest.raises(OSError):
        subprocess.run(["/bin/sh", "-c", script + "#"], check=True, timeout=30)


def variables_yaml(variables: dict[str, str], where: str = "") -> str:
    return where + "variables: " + json.dumps(variables) + "\n"


def test_a_variable_longer_than_linux_execs_is_refused(validator: JobValidator) -> None:
    ok = env_sized("BIG", MAX_ARG_STRLEN - 1)
    Admission(validator, max_file_size=1 << 22).admit(
        (JOB + variables_yaml(ok)).encode(), "job.yaml", now=FakeClock().now()
    )
    refusal = refused(validator, JOB + variables_yaml({"BIG": "x" * 200_000}))
    [issue] = refusal.issues
    assert issue.path == "variables.BIG" and issue.line == 3
    assert "variable BIG is 200004 bytes" in issue.message
    assert "131071 bytes" in issue.message and "MAX_ARG_STRLEN" in issue.message
    over = refused(validator, JOB + variables_yaml(env_sized("BIG", MAX_ARG_STRLEN)))
    assert over.issues[0].path == "variables.BIG"
    wide = refused(validator, JOB + variables_yaml({"W": "é" * 70_000}))  # 140 kB in UTF-8
    assert "variable W is 140002 bytes" in wide.issues[0].message


def test_variables_past_the_total_are_refused_also_a_steps(validator: JobValidator) -> None:
    each = {f"V{i}": "x" * 100_000 for i in range(11)}
    refusal = refused(validator, JOB + variables_yaml(each))
    [issue] = refusal.issues
    assert issue.path == "variables"
    assert f"over spoold's limit of {MAX_VARIABLES_BYTES} bytes" in issue.message
    half = {f"V{i}": "x" * 100_000 for i in range(6)}
    other = {f"W{i}": "x" * 100_000 for i in range(6)}
    text = (
        "executor: local\n" + variables_yaml(half) + "steps:\n"
        f"- id: a\n  product: {{commands: 'true'}}\n  variables: {json.dumps(other)}\n"
    )
    refusal = refused(validator, text)
    assert [issue.path for issue in refusal.issues] == ["steps[0].variables"]


@pytest.mark.parametrize(
    ("executor", "product", "field"),
    [
        ("local", {"commands": "#" * MAX_ARG_STRLEN}, "commands"),
        ("local", {"commands": ["#" * 70_000, "#" * 70_000]}, "commands"),
        ("custom", {"script": "#" * (MAX_ARG_STRLEN - 14)}, "script"),
        ("docker", {"image": "alpine", "script": "#" * MAX_ARG_STRLEN}, "script"),
    ],
    ids=["local-string", "local-list", "custom", "docker"],
)
def test_a_script_longer_than_one_argument_is_refused(
    validator: JobValidator, executor: str, product: dict[str, Any], field: str
) -> None:
    text = json.dumps({"executor": executor, "product": product})
    refusal = refused(validator, text)
    [issue] = refusal.issues
    assert issue.path == f"product.{field}"
    assert "over Linux's limit of 131071 bytes" in issue.message


def test_a_script_that_fits_and_one_sent_over_stdin_are_admitted(validator: JobValidator) -> None:
    admission = Admission(validator, max_file_size=1 << 22)
    now = FakeClock().now()
    fits = {"executor": "local", "product": {"commands": "#" * (MAX_ARG_STRLEN - 2)}}
    admission.admit(json.dumps(fits).encode(), "job.json", now=now)
    ssh = {"executor": "ssh", "product": {"host": "h", "user": "u", "commands": "#" * 200_000}}
    admission.admit(json.dumps(ssh).encode(), "job.json", now=now)


def test_a_file_of_many_secrets_still_hides_its_receivers_url() -> None:
    """The values hunted are bounded (a refusal's cost); the receivers' come first."""
    document = {"callback": {"url": "https://h.example/SECRET1"},
                "x_secret": [f"value-{i:06d}" for i in range(20_000)]}  # fmt: skip
    said = Redaction(document).text("callback to https://h.example/SECRET1 has no secret")
    assert said == "callback to https://h.example/*** has no secret"
