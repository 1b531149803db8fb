"""Secrets, round 30: a secret given through a variable, escaped and encoded forms of a
secret, short secrets, and config errors that must not show a secret."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest

from spoold.core.config import Config, load_config
from spoold.core.errors import ConfigError
from spoold.core.secrets import Masker, SecretStore, encoded_forms
from spoold.core.spool import JobDir, Spool
from spoold.intake.incoming import Intake
from spoold.intake.validation import job_validator
from spoold.out.outbox import callbacks_for
from spoold.run.registry import ExecutorRegistry
from spoold.run.worker import JobRunner
from tests.fakes import FakeClock
from tests.harness import accept_and_run
from tests.loopback import MethodHandler, serve_in_thread, stop_serving

LOGGER = logging.getLogger("spoold.test.round30")


class Runner:
    """A spool, intake with callbacks, and a runner, in this process, on a fake clock."""

    def __init__(self, tmp_path: Path, secrets: dict[str, str] | None = None) -> None:
        self.spool = Spool(tmp_path / "spool")
        self.spool.init()
        self.clock = FakeClock()
        self.masker = Masker()
        secrets_dir = None
        if secrets is not None:
            secrets_dir = tmp_path / "secrets"
            secrets_dir.mkdir(mode=0o700)
            for name, value in secrets.items():
                (secrets_dir / name).write_text(value + "\n")
                (secrets_dir / name).chmod(0o600)
        config = Config(spool=self.spool.root, hostname="here", worker_id="w1", kill_grace=0.5,
                        secrets_dir=secrets_dir)  # fmt: skip
        registry = ExecutorRegistry.from_entry_points()
        callbacks = callbacks_for(config, self.spool, self.clock, LOGGER)
        self.intake = Intake(self.spool, job_validator(registry), self.clock,
                             max_file_size=config.max_file_size, settle_time=0,
                             on_accepted=lambda job, document: None, logger=LOGGER,
                             callbacks=callbacks)  # fmt: skip
        self.runner = JobRunner(self.spool, registry, config, self.clock, LOGGER,
                                secrets=SecretStore(secrets_dir), masker=self.masker,
                                callbacks=callbacks)  # fmt: skip

    def run(self, document: dict[str, Any]) -> tuple[JobDir, dict[str, Any]]:
        return accept_and_run(self.spool, self.intake, self.runner, document)

    def written(self) -> str:
        """Everything spoold wrote into the spool (logs, status.json, outbox/), but job.yaml,
        which stays as submitted."""
        files = (p for p in sorted(self.spool.root.rglob("*")) if p.is_file())
        return "".join(p.read_text(errors="replace") for p in files if p.name != "job.yaml")


class _Echo(MethodHandler):
    """A vendor API that refuses every token, quoting it back as vendors do: as sent, in a
    list (Python repr once the executor formats it) and URL-encoded."""

    def serve(self, method: str) -> None:
        token = self.headers.get("Authorization", "").removeprefix("Bearer ")
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        said = f"bad token {token} ({quote(token, safe='')} {quote_plus(token)})"
        body = json.dumps({"message": said, "error": {"message": said},
                           "details": [{"token": token}]}).encode()  # fmt: skip
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def vendor() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = serve_in_thread(server)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        stop_serving(server, thread)


def _said(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(record.getMessage() for record in caplog.records)


# --- 1: a secret given through a variable -----------------------------------------------------


def test_a_token_given_through_a_variable_is_masked_everywhere(
    tmp_path: Path, vendor: str, caplog: pytest.LogCaptureFixture
) -> None:
    parts = Runner(tmp_path)
    document = {
        "job_id": "viavar", "executor": "sevdesk", "type": "cancel_invoice",
        "variables": {"TOK": "VIATOK-RRR"},
        "product": {"base_url": f"{vendor}/api/v1", "api_token": "${TOK}", "invoice_id": 123},
        "callback": {"url": "http://127.0.0.1:9/hook", "secret": "cb-secret-4711"},
    }  # fmt: skip
    with caplog.at_level(logging.INFO, logger=LOGGER.name):
        job, status = parts.run(document)
    assert job.directory == "failed", status
    assert "sevDesk refused the API token" in status["error"] and "***" in status["error"]
    written = parts.written()
    assert "failed" in written and "outbox" in str(list(parts.spool.root.rglob("*")))
    assert "VIATOK-RRR" not in written, "log, status.json and the callbacks' bodies"
    assert "job viavar failed" in _said(caplog)
    assert "VIATOK-RRR" not in _said(caplog), "spoold's own log"


def test_a_callback_secret_given_through_a_variable_is_masked_in_the_jobs_output(
    tmp_path: Path,
) -> None:
    parts = Runner(tmp_path)
    document = {"job_id": "cbvar", "executor": "local", "variables": {"CBS": "ZEBRA-VAR"},
                "callback": {"url": "http://127.0.0.1:9/hook", "secret": "${CBS}"},
                "product": {"commands": ["echo $CBS", "exit 3"]}}  # fmt: skip
    job, status = parts.run(document)
    assert status["exit_code"] == 3
    assert "INFO ***" in job.log_path.read_text()
    assert "ZEBRA-VAR" not in parts.written()


def test_secret_named_fields_filled_in_steps_are_masked(
    tmp_path: Path, vendor: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A step's product (with the step's own variables over the job's), a field that mixes a
    variable, text and a secret file, and a variable whose own name says it is a secret."""
    parts = Runner(tmp_path, secrets={"PART": "from-the-file-77"})
    sevdesk = {"executor": "sevdesk", "type": "cancel_invoice", "continue_on_error": True}
    document = {
        "job_id": "many", "executor": "local",
        "variables": {"DB_PASSWORD": "pg-pass-5150", "PREFIX": "pre-fix-9"},
        "steps": [
            {"id": "a", **sevdesk, "variables": {"STEPTOK": "STEP-TOKEN-31"},
             "product": {"base_url": f"{vendor}/api/v1", "api_token": "${STEPTOK}",
                         "invoice_id": 1}},
            {"id": "b", **sevdesk,
             "product": {"base_url": f"{vendor}/api/v1", "api_token": "${PREFIX}-${secret:PART}",
                         "invoice_id": 2}},
            {"id": "c", "executor": "local", "product": {"commands": ['echo "db $DB_PASSWORD"']}},
        ],
    }  # fmt: skip
    with caplog.at_level(logging.INFO, logger=LOGGER.name):
        job, _ = parts.run(document)
    log = job.log_path.read_text()
    assert "sevDesk refused the API token" in log and "db ***" in log, log
    written = parts.written() + _said(caplog)
    for value in ("STEP-TOKEN-31", "pg-pass-5150", "pre-fix-9-from-the-file-77", "from-the-file"):
        assert value not in written, value


def test_steps_and_notify_secret_fields_through_variables_are_masked(tmp_path: Path) -> None:
    """Without a job: the runner's walk over a document masks what each secret-named field
    holds once filled in, wherever it is, a step's with the step's variables over the job's."""
    parts = Runner(tmp_path, secrets={"HOOKKEY": "hook-key-8080"})
    document = {
        "variables": {"TOK": "JOB-TOK-11", "DB_PASSWORD": "${secret:HOOKKEY}"},
        "product": {"nested": [{"api_key": "k-${TOK}"}]},
        "notify": [{"webhook": {"url": "https://x.example", "token_secret": "${TOK}"}}],
        "steps": [{"id": "s", "variables": {"TOK": "STEP-TOK-22"},
                   "product": {"api_token": "${TOK}"}}],
    }  # fmt: skip
    from spoold.run.worker import ActiveRun  # noqa: PLC0415 - the runner's own record

    job = JobDir("walk", "running", str(tmp_path / "walk"))
    run = ActiveRun(job, {})
    parts.runner._learn_secrets(run, document)
    text = "k-JOB-TOK-11 JOB-TOK-11 STEP-TOK-22 hook-key-8080 ${TOK}"
    assert run.masker.mask_text(text) == "*** *** *** *** ***"
    assert parts.masker.mask_text("hook-key-8080") == "***", "a secret file: spoold's log too"


# --- 2: escaped and encoded forms --------------------------------------------------------------

LEXKEY = 'LEXKEY"Q/1+2 3\\z'


def _lower_hex(text: str) -> str:
    return re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), text)


@pytest.mark.parametrize(
    "shown",
    [
        LEXKEY,
        repr(LEXKEY)[1:-1],  # 'LEXKEY"Q/1+2 3\\\\z': an f"{x!r}" doubles the backslash
        json.dumps(LEXKEY)[1:-1],
        json.dumps(LEXKEY)[1:-1].replace("/", "\\/"),  # PHP's json_encode
        quote(LEXKEY, safe=""),
        quote(LEXKEY),
        quote_plus(LEXKEY),
        _lower_hex(quote(LEXKEY, safe="")),  # seen: %2b (RFC 3986 allows either case)
        _lower_hex(quote_plus(LEXKEY)),
    ],
    ids=[
        "raw",
        "repr",
        "json",
        "php-json",
        "quote",
        "quote-slash",
        "quote-plus",
        "quote-lower",
        "quote-plus-lower",
    ],
)
def test_escaped_and_encoded_forms_of_a_secret_are_masked(shown: str) -> None:
    masker = Masker([LEXKEY])
    assert masker.mask_text(f"401: <{shown}>") == "401: <***>"


def test_a_secret_with_non_ascii_is_masked_json_escaped_both_ways() -> None:
    value = "pässwörd/ü"
    masker = Masker([value])
    for shown in (json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]):
        assert masker.mask_text(f"[{shown}]") == "[***]"


def test_forms_are_few_per_value_and_none_for_a_plain_token() -> None:
    assert encoded_forms("abcDEF123-_.~") == []
    assert Masker(["abcDEF123"]).values() == ("abcDEF123",)
    assert 0 < len(encoded_forms(LEXKEY)) <= 12  # four URL-encoded ones in either case
    pem = "-----BEGIN KEY-----\n" + "\n".join(["QUJD+/=" * 9] * 200) + "\n-----END KEY-----"
    assert len(Masker([pem]).values()) <= 1 + 3 + 12, "forms of the whole value, not per line"


def test_a_masker_given_anothers_values_masks_the_same_without_forms_of_forms() -> None:
    """A job's supervisor gets the runner's masker's values(): it must mask the same, and
    not add a form of each form (%2B of %2B...)."""
    first = Masker([LEXKEY, "plain-token-1"])
    second = Masker(first.values())
    assert second.values() == first.values()
    for shown in first.values():
        assert second.mask_text(shown) == "***"


def test_nothing_to_mask_still_costs_nothing() -> None:
    text = "a line of output"
    assert Masker().mask_text(text) is text
    assert not Masker(["  "])


def test_lexware_echoing_the_key_in_repr_and_url_encoded_leaks_no_form(
    tmp_path: Path, vendor: str, caplog: pytest.LogCaptureFixture
) -> None:
    parts = Runner(tmp_path)
    document = {"job_id": "lex", "executor": "lexware", "type": "cancel_invoice",
                "product": {"base_url": vendor, "api_key": LEXKEY,
                            "invoice_id": "3fa85f64-5717-4562-b3fc-2c963f66afa6"}}  # fmt: skip
    with caplog.at_level(logging.INFO, logger=LOGGER.name):
        job, status = parts.run(document)
    assert job.directory == "failed", status
    assert "401" in status["error"]
    written = parts.written() + _said(caplog)
    for form in [LEXKEY, *encoded_forms(LEXKEY)]:
        assert form not in written, form
    assert "LEXKEY" not in written


# --- 5: short secrets ----------------------------------------------------------------------------


def test_a_short_secret_is_masked_and_warned_of_by_name_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    parts = Runner(tmp_path, secrets={"TINY": "ab"})
    document = {"job_id": "short", "executor": "local",
                "product": {"commands": ["echo ${secret:TINY} table", "echo $API_KEY"]},
                "variables": {"API_KEY": "xy", "TOKEN": "${secret:TINY}"}}  # fmt: skip
    with caplog.at_level(logging.WARNING, logger=LOGGER.name):
        job, status = parts.run(document)
    assert status["state"] == "succeeded", job.log_path.read_text()
    log = job.log_path.read_text()
    assert "INFO *** t***le" in log, "still masked"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    about_file = [w for w in warnings if "secret 'TINY'" in w]
    about_field = [w for w in warnings if "variables.API_KEY" in w]
    assert len(about_file) == 1 and len(about_field) == 1, warnings
    assert "shorter than 4 characters" in about_file[0]
    for warning in warnings:
        assert " ab " not in f" {warning} " and " xy " not in f" {warning} "


# --- 4: config errors never show a secret --------------------------------------------------------


@pytest.mark.parametrize("check_schema", [True, False], ids=["schema", "no-schema"])
def test_a_config_error_about_a_secret_key_says_its_type_not_its_value(
    tmp_path: Path, check_schema: bool
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("default_callback_url: https://x.example/hook\n"
                    "default_callback_secret: 8675309123\n")  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={}, check_schema=check_schema)
    message = str(caught.value)
    assert "default_callback_secret" in message and "an integer" in message, message
    assert "8675309123" not in message


@pytest.mark.parametrize(
    "text",
    [
        "mail: {host: smtp.example, user: u, password_secret: ['TOPSECRET1']}\n",
        "job_user: {password: TOPSECRET1}\n",
        "default_callback_secret: [TOPSECRET1]\n",
    ],
    ids=["password-secret", "inside-another-key", "list"],
)
def test_no_config_error_shows_the_value_of_a_secret_key(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    for check_schema in (True, False):
        with pytest.raises(ConfigError) as caught:
            load_config(path, env={}, check_schema=check_schema)
        assert "TOPSECRET1" not in str(caught.value), str(caught.value)


def test_a_config_error_about_an_ordinary_key_still_shows_its_value(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("watch: 12345\n")
    with pytest.raises(ConfigError, match="12345"):
        load_config(path, env={})
