"""What a new user met following the README literally (round 30): `spoold status` counting
notification files as callbacks, a misspelled required field reported twice, a digest that
counted notices as jobs, a stop message that promised every job the grace, `list --ids`
missing from its help."""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from spoold.core.config import Config, NotifySettings, NotifyTarget, load_config
from spoold.core.job import JobStatus
from spoold.core.secrets import SecretStore
from spoold.core.spool import Spool
from spoold.core.states import JobState
from spoold.daemon import stop_words
from spoold.face import views
from spoold.face.cli import build_parser
from spoold.face.completion import bash_script
from spoold.face.metrics import Metrics
from spoold.intake.validation import JobValidator, job_validator
from spoold.out.messages import digest_title, mail, webhook_body
from spoold.out.notices import Notices
from spoold.out.outbox import Callbacks, CallbackTarget
from spoold.run.registry import ExecutorRegistry
from tests.apiclient import start_api
from tests.fakes import FakeClock
from tests.harness import DaemonProcess, drop, local_job, run_cli, wait_for, write_config
from tests.test_api import wait_state

T0 = datetime(2026, 12, 7, 2, 51, 0, tzinfo=UTC)


# -- 1: status counts callbacks apart from notifications -----------------------------------------


def _outbox_of_a_delivered_job(spool: Spool) -> None:
    """What the user's outbox/ held: every callback delivered, a notification window and held
    notices (one of them given up), and one callback given up and one still waiting."""
    outbox = spool.dir("outbox")
    for name in (
        "_w.h1.0123456789abcdef~00000000.json",  # a window: when its target may hear again
        "_t.0123456789abcdef.hello~00000002.json",  # held notices
        "_t.0123456789abcdef.hello~00000003.json",
        "_n.other~00000001.json",  # a change not yet split into notices
        "_t.0123456789abcdef.other~00000001.prepared",  # a change under way: nothing yet
        "late~00000001.json",  # a callback waiting
        "late~00000002.prepared",
    ):
        (outbox / name).write_text("{}")
    (outbox / "failed").mkdir()
    record = {"event": "failed", "url": "https://backend.example.net/hook?key=k", "tries": 9,
              "last_error": "HTTP 503", "created": 1.0}  # fmt: skip
    (outbox / "failed" / "gone~00000004.json").write_text(json.dumps(record))
    (outbox / "failed" / "_t.0123456789abcdef.gone~00000004.json").write_text("{}")


def test_status_counts_callbacks_and_notifications_apart_as_the_metrics_do(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool")
    spool.init()
    _outbox_of_a_delivered_job(spool)
    config = Config(spool=spool.root, hostname="here")
    found = views.summary(spool, config)
    assert found["outbox"] == {"callbacks_waiting": 1, "notifications_waiting": 3,
                               "callbacks_given_up": 1, "notifications_given_up": 1}  # fmt: skip
    assert found["counts"]["outbox"] == 1, "counts' outbox/ is its callbacks"
    assert [item["name"] for item in found["callbacks_given_up"]] == ["gone~00000004.json"]
    text = views.summary_text(spool, config)
    assert "  outbox/     1 callback waiting, 3 notifications waiting\n" in text, text
    assert "1 callback(s) given up, kept in outbox/failed/:" in text, text
    assert "  1 notification given up, kept in outbox/failed/" in text, text
    metrics = Metrics(spool, config, FakeClock(T0), build_info={"version": "0", "python": "3"})
    scraped = metrics.render()[0].decode()
    assert "spoold_callbacks_waiting 1.0" in scraped
    assert "spoold_callbacks_given_up 1.0" in scraped


def test_status_of_an_outbox_of_notifications_alone_says_no_callback_waits(
    tmp_path: Path,
) -> None:
    """The user's case: 4 files, a window and held notices; every callback delivered."""
    spool = Spool(tmp_path / "spool")
    spool.init()
    outbox = spool.dir("outbox")
    (outbox / "_w.vm.0123456789abcdef~00000000.json").write_text("{}")
    for sequence in (1, 2, 3):
        (outbox / f"_t.0123456789abcdef.q~0000000{sequence}.json").write_text("{}")
    text = views.summary_text(spool, Config(spool=spool.root, hostname="here"))
    assert "  outbox/     0 callbacks waiting, 3 notifications waiting\n" in text, text


# -- 2: a misspelled required field is one problem, not two --------------------------------------


@pytest.fixture(scope="module")
def validator() -> JobValidator:
    return job_validator(ExecutorRegistry.from_entry_points())


def _said(validator: JobValidator, text: str) -> list[str]:
    return [issue.format("job.yaml") for issue in validator.check(text.encode(), "job.yaml")]


def test_a_misspelled_required_field_is_said_once_by_its_suggestion(
    validator: JobValidator,
) -> None:
    """The README's own example: its one line is all that validate says."""
    said = _said(validator, "job_id: provision-4711\nexecutor: local\nproduct:\n"
                            "  comands: [\"echo hi\"]\n")  # fmt: skip
    assert said == [
        "job.yaml:4:3: product.comands: unknown field 'comands' (did you mean 'commands'?)"
    ]
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "$ spoold validate job.yaml\n" + said[0] + "\n$ spoold validate --spool" in readme


def test_one_of_several_required_fields_misspelled_is_said_once(validator: JobValidator) -> None:
    said = _said(validator, "job_id: a\nexecutor: local\nproduct: {commands: 'true'}\n"
                            "schedule: {cronn: '* * * * *'}\n")  # fmt: skip
    assert said == ["job.yaml:4:12: schedule.cronn: unknown field 'cronn' (did you mean 'cron'?)"]


def test_a_missing_field_no_suggestion_names_is_still_said(validator: JobValidator) -> None:
    """Only the field a suggestion names is left to it: beside other problems the misspelling
    is still said once, and a field missing that no unknown field is taken for is said."""
    said = _said(validator, "job_id: a\nexecutor: local\nproduct: {comands: 'true'}\n"
                            "schedule: {tz: UTC, evry: 5m, cron: '* * * * *'}\n")  # fmt: skip
    assert any("did you mean 'commands'" in line for line in said), said
    assert not any("missing required field 'commands'" in line for line in said), said
    said = _said(validator, "job_id: a\nexecutor: local\nproduct: {shell: bash}\n")
    assert any("missing required field 'commands'" in line for line in said), said


# -- 5: a digest counts jobs, and its notices by event -----------------------------------------


def _notice(job_id: str | None, event: str, **more: object) -> dict[str, object]:
    return {"job_id": job_id, "event": event, "state": event, "error": None, "host": "vm",
            "attempt": 1, **more}  # fmt: skip


def test_a_digest_of_one_jobs_two_notices_says_one_job() -> None:
    """The user's json webhook: two ``retrying`` notices of job q were "2 jobs on vm"."""
    body = webhook_body("json", [_notice("q", "retrying"), _notice("q", "retrying")], window=300)
    assert (body["summary"], body["count"]) == ("1 job on vm: 2 retrying", 2)
    mixed = [
        _notice("q", "retrying"),
        _notice("q", "failed"),
        _notice("r", "failed"),
        _notice(None, "rejected", file="a.yaml"),
        _notice("a", "rejected", file="a.yaml"),
    ]
    assert digest_title(mixed) == "2 jobs and 2 files on vm: 2 failed, 2 rejected, 1 retrying"
    subject = mail(mixed[:2], sender="s@example.net", to=["a@example.net"], message_id="m",
                   window=300)["Subject"]  # fmt: skip
    assert subject == "[spoold] 1 job on vm: 1 failed, 1 retrying"


# -- 6: a callback's sequence orders a job's changes; it need not count its deliveries -----------


def _announced(spool: Spool, target: CallbackTarget, events: list[str]) -> list[dict[str, Any]]:
    """Announce ``events`` of job j in turn; the bodies of the callbacks they left in outbox/."""
    clock = FakeClock(T0)
    made = Callbacks(spool, clock, SecretStore(None), logger=logging.getLogger("spoold.test"),
                     notices=Notices(NotifySettings(), hostname="vm"))  # fmt: skip
    status = JobStatus(job_id="j", state=JobState.PENDING, executor="local", type=None,
                       submitted_at="2026-12-07T02:51:00Z", source=None)  # fmt: skip
    for event in events:
        with made.announce(target, event, status):
            pass
    bodies = []
    for name in spool.deliveries.names():
        record = spool.deliveries.read(name) or {}
        if not name.startswith("_"):
            bodies.append(json.loads(record["body"]))
    return bodies


@pytest.mark.parametrize("notified", [False, True], ids=["callback-alone", "with-notify"])
def test_a_filtered_callback_has_a_gap_in_its_sequence_only_where_a_change_is_notified(
    tmp_path: Path, notified: bool
) -> None:
    """The README's words: each change that is called back or notified takes the next number;
    with ``events:`` a receiver may meet gaps, and every body names its claim's generation."""
    spool = Spool(tmp_path / "spool")
    spool.init()
    hook = NotifyTarget("webhook", url="http://127.0.0.1:9/n",
                        on=frozenset({"accepted", "started", "succeeded"}))  # fmt: skip
    target = CallbackTarget("http://127.0.0.1:9/cb", "s3cret", frozenset({"succeeded"}),
                            notify=(hook,) if notified else ())  # fmt: skip
    (body,) = _announced(spool, target, ["accepted", "started", "succeeded"])
    assert (body["event"], body["sequence"]) == ("succeeded", 3 if notified else 1)
    assert body["generation"] == 0, "no claim made this change"
    readme = " ".join((Path(__file__).resolve().parent.parent / "README.md").read_text().split())
    assert "usage, generation, timestamp, delivery_id, sequence" in readme


# -- 7: the stop message says which jobs get the grace and which go on ---------------------------


def test_the_stop_words_say_only_what_applies() -> None:
    held = ("lexware", "proxmox", "sevdesk")
    assert stop_words(30.0, held, running=0) == "stopping: no new jobs; none running"
    assert stop_words(30.0, held, running=2) == (
        "stopping: no new jobs; jobs of the lexware, proxmox and sevdesk executors get 30s, "
        "the others go on for the next start"
    )
    assert stop_words(1.5, ("proxmox",), running=1) == (
        "stopping: no new jobs; jobs of the proxmox executor get 1.5s, "
        "the others go on for the next start"
    )
    assert stop_words(30.0, (), running=1) == (
        "stopping: no new jobs; running jobs go on for the next start"
    )
    assert stop_words(30.0, None, running=1) == (
        "stopping: no new jobs; jobs that cannot outlive spoold get 30s, "
        "the others go on for the next start"
    )


@pytest.mark.daemon
def test_a_stopping_daemon_says_its_local_job_goes_on(spool_dir: Path, tmp_path: Path) -> None:
    """The user's log said "running jobs get 30.0s", and their local job went on."""
    config = write_config(tmp_path / "config.yaml", spool_dir, shutdown_grace="30s")
    daemon = DaemonProcess(spool_dir, config)
    daemon.start()
    try:
        drop(spool_dir, "long.yaml", local_job("long", "sleep 60"))
        wait_for((spool_dir / "running" / "long" / "lease").exists, what="long to run")
        assert daemon.stop(leave_jobs=True) == 0
        said = [line for line in daemon.log().splitlines() if "stopping: " in line]
        assert len(said) == 1 and said[0].endswith(
            "stopping: no new jobs; jobs of the lexware, proxmox and sevdesk executors get 30s, "
            "the others go on for the next start"
        ), said
        assert (spool_dir / "running" / "long").is_dir(), "left for the next start"
    finally:
        daemon.kill()


# -- 10: what the completion calls, and every option, is in its command's --help ----------------


def _parsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every command's parser (``schedule list``), by its words."""
    for action in parser._actions:  # argparse keeps no public list
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                for deeper, subsub in _parsers(sub):
                    yield f"{name} {deeper}", subsub


def test_every_option_of_every_command_is_in_its_help() -> None:
    parser = build_parser()
    hidden = [
        (name, option)
        for name, sub in _parsers(parser)
        for action in sub._actions
        if action.option_strings
        and (action.help in (None, argparse.SUPPRESS) or action.option_strings[-1]
             not in sub.format_help())
        for option in action.option_strings
        if option not in ("-h", "--help")
    ]  # fmt: skip
    assert hidden == []


def test_the_options_the_completion_calls_are_in_list_help(spool_dir: Path) -> None:
    script = bash_script(build_parser())
    called = re.search(r"local -a args=\(list ([^)]*)\)", script)
    assert called is not None, script
    shown = run_cli(spool_dir, "list", "--help").stdout
    options = [word for word in called.group(1).split() if word.startswith("--")]
    for option in [*options, "--state", "--spool", "--config"]:
        assert f"  {option}" in shown, (option, shown)
    nothing = run_cli(spool_dir, "list", "--ids")
    assert (nothing.returncode, nothing.stdout) == (0, ""), "no job: no line at all"


# -- 3, 4: the API section's examples, followed in order after `make run` ----------------------

ROOT = Path(__file__).resolve().parent.parent


def _api_section() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("\n## HTTP API\n", 1)[1].split("\n## ", 1)[0]


def test_the_readmes_api_config_line_turns_the_api_on(tmp_path: Path) -> None:
    line = re.search(r"^echo '(api: [^']*)' > config\.yaml", _api_section(), re.M)
    assert line is not None
    (tmp_path / "config.yaml").write_text(line.group(1) + "\n")
    api = load_config(tmp_path / "config.yaml", spool=tmp_path / "spool").api
    assert api is not None and (api.host, api.port) == ("127.0.0.1", 8420)


@pytest.mark.daemon
def test_the_readmes_api_examples_after_make_run(tmp_path: Path) -> None:
    """`make run` ran hello: the README's POST names another id and gets 201, its log and
    artifact are there, and the bodies of a 409 and a 422 are as the README words them."""
    tmp_path.chmod(0o755)
    api = start_api(tmp_path)
    try:
        hello = (ROOT / "examples" / "hello.yaml").read_text()
        assert api.submit(hello).status_code == 201  # what make run submitted
        wait_state(api, "hello", "succeeded")
        sed = re.search(r"^sed 's/\^(job_id: hello)\$/([^/]*)/' examples/hello\.yaml", _api_section(),
                        re.M)  # fmt: skip
        assert sed is not None
        posted = re.sub(f"^{sed.group(1)}$", sed.group(2), hello, flags=re.M)
        answer = api.submit(posted)
        assert answer.status_code == 201, answer.text
        job_id = answer.json()["job_id"]
        assert f"/api/v1/jobs/{job_id}/artifacts/out/when.txt" in _api_section()
        wait_state(api, job_id, "succeeded")
        assert api.call("GET", f"/api/v1/jobs/{job_id}/artifacts/out/when.txt").status_code == 200
        taken = api.submit(hello)
        assert taken.status_code == 409
        detail = taken.json()["detail"]
        assert (set(detail), detail["code"]) == ({"message", "code", "errors"}, "duplicate")
        assert [error["path"] for error in detail["errors"]] == ["job_id"]
        invalid = api.submit(hello.replace("  commands:", "  comands:").replace("hello", "h2"))
        assert invalid.status_code == 422
        detail = invalid.json()["detail"]
        assert (set(detail), detail["code"]) == ({"message", "code", "errors"}, "invalid")
        assert [set(error) for error in detail["errors"]] == [{"message", "path", "line", "column"}]
        retried = api.call("POST", "/api/v1/jobs/hello/retry")
        assert retried.status_code == 409 and isinstance(retried.json()["detail"], str)
    finally:
        api.daemon.kill()
