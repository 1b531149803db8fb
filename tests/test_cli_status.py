"""What `spoold status`, `list` and the other commands say, as a user types them: no Python
None, no doubled words, steps and why a pending job waits in text, the callbacks of a job, the
daemon; `list --state rejected` and `--label`; which config is used when it is not the
expected one. Jobs are laid into the spool through the spool's own methods (no daemon)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from spoold import app
from spoold.core import config
from spoold.core.clock import SystemClock
from spoold.core.errors import InvalidTransition
from spoold.core.job import JobStatus
from spoold.core.spool import JobDir, Spool
from spoold.core.states import JobState
from spoold.run.control import JobControl
from tests.harness import local_job, run_cli, write_config

NOW = "2026-12-02T10:00:00Z"


def make_job(
    spool_root: Path,
    job_id: str,
    state: str = "pending",
    *,
    document: dict[str, Any] | None = None,
    log: str = "",
    **fields: Any,
) -> JobDir:
    """A job in ``state``, as intake and a worker would leave it, without running anything."""
    spool = Spool(spool_root, durable=False)
    document = document or local_job(job_id, "true")
    text = yaml.safe_dump(document)
    source = spool_root.parent / f"{job_id.replace('@', '-')}.yaml"
    source.write_text(text)
    taken = spool.stages.stage_file(source, max_size=1 << 20)
    status = JobStatus(
        job_id=job_id, state=JobState.PENDING, executor=str(document.get("executor") or "local"),
        type=None, submitted_at=fields.pop("submitted_at", NOW), source=source.name,
        sha256=hashlib.sha256(text.encode()).hexdigest(),
        concurrency=document.get("concurrency"),
    ).to_dict()  # fmt: skip
    line = f"{NOW} INFO spoold: accepted {source.name} as {job_id}\n{log}"
    job = spool.stages.accept(
        taken, job_id, {**status, **(fields if state == "pending" else {})}, line
    )
    if state == "pending":
        return job
    running = spool.jobs.claim(job_id)
    assert running is not None
    status = {**status, "state": "running", "started_at": NOW, "worker": "w-1"}
    if state == "running":
        spool.jobs.write_status(running, {**status, **fields})
        return running
    status = {**status, "state": state, "finished_at": NOW, **fields}
    return spool.jobs.finish(running, JobState(state), status)


def attempt(exit_code: int | None, error: str | None, number: int = 1) -> dict[str, Any]:
    return {"number": number, "started_at": NOW, "finished_at": NOW, "exit_code": exit_code,
            "error": error}  # fmt: skip


@pytest.fixture
def spool_root(tmp_path: Path) -> Path:
    root = tmp_path / "spool"
    Spool(root).init()
    return root


def status_text(spool_root: Path, job_id: str) -> str:
    result = run_cli(spool_root, "status", job_id)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_no_python_none_and_no_doubled_words_in_status(spool_root: Path) -> None:
    make_job(spool_root, "three", "failed", exit_code=3, error="exit code 3",
             attempts=[attempt(3, "exit code 3")])  # fmt: skip
    make_job(spool_root, "slow", "failed", exit_code=None, error="timed out after 1s",
             attempts=[attempt(None, "timed out after 1s")])  # fmt: skip
    three = status_text(spool_root, "three")
    assert "exit code 3 (exit code 3)" not in three and "exit 3 (" not in three, three
    assert "attempt 1:" in three and three.count("exit code 3") == 2, three  # error:, attempt
    slow = status_text(spool_root, "slow")
    assert "None" not in slow, slow
    assert "timed out after 1s" in slow, slow


def test_states_read_as_words(spool_root: Path) -> None:
    make_job(spool_root, "fine", "succeeded", exit_code=0, attempts=[attempt(0, None)])
    refused = run_cli(spool_root, "retry", "fine")
    assert refused.returncode == 1
    assert "job fine succeeded: only a failed or cancelled job runs again" in refused.stderr
    assert "is succeeded" not in refused.stderr


#: What no line spoold writes may say: Python's None, "is succeeded", an exit code said twice
#: ("exit code 4 (exit code 4)", "exit code 4 (exit 4, ..."), a word twice ("schedule: schedule:").
NEVER = re.compile(
    r"\bNone\b|\bis succeeded\b|exit code (-?\d+)\b.*\(exit(?: code)? \1\b|\b(\w+):? \2\b"
)
#: The stamp spoold's own log lines start with: on the 4th at 04:xx it says "04 04" (a word
#: twice to NEVER), and it is not what the line says.
STAMP = re.compile(r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:[,.]\d+)?Z? ")


def _never_said(lines: list[str]) -> list[str]:
    """The lines that say what NEVER matches, their time stamps aside."""
    return [line for line in lines if NEVER.search(STAMP.sub("", line))]


def test_the_check_of_what_is_said_reads_past_the_time_stamp() -> None:
    assert _never_said(["2026-12-04 04:01:30,736 INFO spoold: accepted a.yaml as a (local)"]) == []
    assert _never_said(["2026-12-04T04:01:30.736Z INFO spoold: job a failed (exit code 4)"]) == []
    said = "2026-12-04 04:01:30,736 WARNING spoold: job a failed: exit code 4 (exit code 4)"
    assert _never_said([said]) == [said]


def test_real_outputs_say_no_none_and_nothing_twice(spool_root: Path, tmp_path: Path) -> None:
    """A job whose step fails, run for real, then looked at as a user would; a retry refused."""
    steps = {"job_id": "pipe", "executor": "local", "steps": [
        {"id": "a", "product": {"commands": "echo hi"}},
        {"id": "b", "needs": ["a"], "product": {"commands": "exit 4"}},
    ]}  # fmt: skip
    said: list[str] = []
    for document in (steps, local_job("three", "exit 3")):
        path = tmp_path / f"{document['job_id']}.yaml"
        path.write_text(yaml.safe_dump(document))
        ran = run_cli(spool_root, "exec", str(path))
        assert ran.returncode == 1, ran.stderr
        said += [ran.stdout, ran.stderr]
    assert "job pipe failed: step b failed (exit 4, " in said[1], said[1]
    for command in (("status", "pipe"), ("logs", "pipe"), ("wait", "pipe", "three")):
        shown = run_cli(spool_root, *command)
        said += [shown.stdout, shown.stderr]
    assert "attempt 1 failed: step b failed (exit code 4)" in said[6], said[6]  # its log
    never = tmp_path / "never.yaml"
    never.write_text("job_id: n\nexecutor: local\nproduct: {commands: 'true'}\n"
                     "schedule: {cron: '0 0 31 2 *'}\n")  # fmt: skip
    said.append(run_cli(spool_root, "validate", str(never)).stderr)
    make_job(spool_root, "fine", "succeeded", exit_code=0)
    with pytest.raises(InvalidTransition) as refused:  # what `spoold retry` says, from its source
        JobControl(Spool(spool_root), SystemClock(), who="test").retry("fine")
    said.append(str(refused.value))
    assert str(refused.value).startswith("job fine succeeded: only a failed or cancelled job")
    lines = [line for text in said for line in text.splitlines()]
    assert _never_said(lines) == []


def test_status_shows_steps_and_a_failed_continue_on_error_step(spool_root: Path) -> None:
    steps = {
        "fetch": {"state": "succeeded", "attempts": 1, "exit_code": 0, "error": None},
        "lint": {"state": "failed", "attempts": 2, "exit_code": 4, "error": "exit code 4"},
    }
    document = {
        "job_id": "pipe", "executor": "local",
        "steps": [{"id": "fetch", "product": {"commands": "true"}},
                  {"id": "lint", "product": {"commands": "exit 4"}, "continue_on_error": True}],
    }  # fmt: skip
    make_job(spool_root, "pipe", "succeeded", document=document, steps=steps, exit_code=0)
    text = status_text(spool_root, "pipe")
    assert "step fetch:      succeeded, exit code 0" in text, text
    assert "step lint:       failed, exit code 4, 2 attempts (continue_on_error" in text, text


def test_status_and_list_show_labels_and_steps_without_reading_the_job_file(
    spool_root: Path, tmp_path: Path
) -> None:
    """A submitter may not read job.yaml (0600, spoold's alone): status.json keeps what they
    see, secret-named labels masked as a worker masks status.json."""
    document = {
        "job_id": "kept", "executor": "local", "description": "nightly export",
        "labels": {"team": "ops", "api_token": "s3cr3t-label"},
        "steps": [{"id": "lint", "product": {"commands": "exit 4"}, "continue_on_error": True},
                  {"id": "ship", "needs": ["lint"], "product": {"commands": "true"}}],
    }  # fmt: skip
    path = tmp_path / "kept.yaml"
    path.write_text(yaml.safe_dump(document))
    ran = run_cli(spool_root, "exec", str(path))
    assert ran.returncode == 0, ran.stderr
    # From here on job.yaml is not the file accepted (its sha256 differs): nothing reads it.
    (spool_root / "done" / "kept" / "job.yaml").write_text("labels: {team: dev}\n")
    status = json.loads(run_cli(spool_root, "status", "kept", "--json").stdout)
    assert status["labels"] == {"team": "ops", "api_token": "***"}, status
    assert status["description"] == "nightly export"
    assert [status["steps"][s]["continue_on_error"] for s in ("lint", "ship")] == [True, False]
    text = status_text(spool_root, "kept")
    assert "description:     nightly export" in text, text
    assert "labels:          api_token=***, team=ops" in text, text
    assert "step lint:       failed, exit code 4 (continue_on_error: the job went on)" in text
    assert "step ship:       succeeded" in text, text
    listed = run_cli(spool_root, "list", "--label", "team=ops", "--json")
    assert [row["job_id"] for row in json.loads(listed.stdout)] == ["kept"], listed.stderr


def test_status_says_why_a_pending_job_waits(spool_root: Path) -> None:
    key = {"key": "customer-4711", "limit": 1}
    make_job(spool_root, "busy", "running", document=local_job("busy", "sleep 9", concurrency=key))
    make_job(spool_root, "queued", document=local_job("queued", "true", concurrency=key))
    make_job(spool_root, "later", next_attempt_at="2999-01-01T00:00:00Z")
    queued = status_text(spool_root, "queued")
    assert "waits:           for concurrency key 'customer-4711': 1 running, limit 1" in queued
    assert "waits:           for a daemon: none runs on" in queued, queued
    assert "daemon:          none: no spoold runs on" in queued, queued
    later = status_text(spool_root, "later")
    assert "for its next attempt, due at 2999-01-01T00:00:00Z" in later, later


def test_status_shows_a_jobs_callback_last_error_and_next_try(spool_root: Path) -> None:
    make_job(spool_root, "told", "succeeded", exit_code=0)
    record = {"key": "told", "event": "succeeded", "url": "http://backend.invalid/hook",
              "tries": 3, "last_error": "HTTP 503", "next_try": 4102444800.0,
              "created": 1.0}  # fmt: skip
    (spool_root / "outbox" / "told~00000002.json").write_text(json.dumps(record))
    text = status_text(spool_root, "told")
    assert "callback:        succeeded: 3 tries failed, last: HTTP 503; next try 2100-01-01" in text


def test_status_summary_names_the_daemon_or_its_absence(spool_root: Path) -> None:
    result = run_cli(spool_root, "status")
    assert result.returncode == 0, result.stderr
    assert "daemon:     none: no spoold runs on" in result.stdout, result.stdout
    data = json.loads(run_cli(spool_root, "status", "--json").stdout)
    assert data["daemon"]["pid"] is None and data["counts"]["pending"] == 0


def test_list_rejected_with_the_reason(spool_root: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("job_id: bad\nexecutor: local\nproduct: {commands: 'true'}\ntimeuot: 5s\n")
    spool = Spool(spool_root, durable=False)
    taken = spool.stages.stage_file(bad, max_size=1 << 20)
    reason = {"file": "bad.yaml", "rejected_at": NOW, "code": "invalid",
              "reason": "timeuot: unknown field 'timeuot' (line 4)", "errors": [], "size": 60}  # fmt: skip
    spool.stages.reject(taken, reason)
    listed = run_cli(spool_root, "list", "--state", "rejected")
    assert listed.returncode == 0, listed.stderr
    assert "bad.yaml" in listed.stdout and "invalid: timeuot: unknown field" in listed.stdout
    rows = json.loads(run_cli(spool_root, "list", "--state", "rejected", "--json").stdout)
    assert [(r["name"], r["code"]) for r in rows] == [("bad.yaml", "invalid")]


def test_list_filters_by_label(spool_root: Path) -> None:
    make_job(spool_root, "ops-1", document=local_job("ops-1", "true", labels={"team": "ops"}))
    make_job(spool_root, "dev-1", document=local_job("dev-1", "true", labels={"team": "dev"}))
    make_job(spool_root, "none-1")
    ops = run_cli(spool_root, "list", "--label", "team=ops", "--json")
    assert [r["job_id"] for r in json.loads(ops.stdout)] == ["ops-1"], ops.stderr
    teams = run_cli(spool_root, "list", "--label", "team", "--json")
    assert sorted(r["job_id"] for r in json.loads(teams.stdout)) == ["dev-1", "ops-1"]
    shown = status_text(spool_root, "ops-1")
    assert "labels:          team=ops" in shown, shown


def test_global_options_stand_before_or_after_the_command(spool_root: Path, tmp_path: Path) -> None:
    make_job(spool_root, "here")
    other = tmp_path / "other"
    Spool(other).init()
    spoold = [sys.executable, "-m", "spoold"]

    def listed(*args: str) -> list[str]:
        done = subprocess.run([*spoold, *args], capture_output=True, text=True, timeout=60,
                              check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return [row["job_id"] for row in json.loads(done.stdout)]

    assert listed("--spool", str(spool_root), "list", "--json") == ["here"]
    assert listed("list", "--json", "--spool", str(spool_root)) == ["here"]
    assert listed("--spool", str(other), "list", "--spool", str(spool_root), "--json") == ["here"]
    assert listed("--spool", str(spool_root), "list", "--spool", str(other), "--json") == []


def test_a_config_found_elsewhere_than_expected_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkout's spoold once the package is installed: no ./config.yaml, and the search
    finds /etc/spoold/config.yaml (here a stand-in for it), whose spool it then uses."""
    spool_root = tmp_path / "var-spool"
    Spool(spool_root).init()
    etc = write_config(tmp_path / "etc-config.yaml", spool_root)
    work = tmp_path / "checkout"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("SPOOLD_SPOOL", raising=False)
    monkeypatch.setattr(config, "SEARCH_PATH", (Path("config.yaml"), etc))
    assert app.main(["status"]) == 0
    err = capsys.readouterr().err
    assert f"using the config {etc} (there is no ./config.yaml here), spool {spool_root}" in err
    assert app.main(["status", "--config", str(etc)]) == 0  # named: nothing to say
    assert capsys.readouterr().err == ""
    write_config(work / "config.yaml", spool_root)  # the expected one
    assert app.main(["status"]) == 0
    assert capsys.readouterr().err == ""


def test_exec_of_a_missing_file_or_a_directory_says_so_without_a_traceback(
    spool_root: Path, tmp_path: Path
) -> None:
    for path, why in (
        (tmp_path / "nope.yaml", "No such file or directory"),
        (tmp_path, "Is a directory"),
    ):
        result = run_cli(spool_root, "exec", str(path))
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip() == f"{path}: cannot read: {why}", result.stderr


def test_logs_follow_ends_with_the_jobs_outcome(spool_root: Path) -> None:
    make_job(spool_root, "good", "succeeded", exit_code=0, log=f"{NOW} INFO hello\n")
    make_job(spool_root, "bad", "failed", exit_code=2, error="exit code 2")
    good = run_cli(spool_root, "logs", "-f", "good")
    assert (good.returncode, "hello" in good.stdout) == (0, True), good.stderr
    assert run_cli(spool_root, "logs", "-f", "bad").returncode == 1
    assert run_cli(spool_root, "logs", "bad").returncode == 0, "without -f: the log was shown"


def test_light_commands_load_no_heavy_module(spool_root: Path) -> None:
    """`--version`, `status ID`, `list`, `logs` and `wait` start without jsonschema,
    APScheduler, requests or watchdog (each costs tens of milliseconds to import), and without
    YAML or the modules that bring it and the job model (a job file that names no labels,
    description or continue_on_error is not parsed); `--version` without spoold's own modules."""
    make_job(spool_root, "quick", "succeeded", exit_code=0)
    heavy = {"jsonschema", "fastjsonschema", "apscheduler", "requests", "watchdog", "yaml"}
    freed = {"spoold.out.sender", "spoold.out.outbox", "spoold.core.documents", "spoold.core.job",
             "spoold.intake.validation", "spoold.daemon"}  # fmt: skip

    def imported(*args: str) -> set[str]:
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "spoold", *args],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return {
            line.rsplit("|", 1)[1].strip()
            for line in done.stderr.splitlines()
            if line.startswith("import time:") and "|" in line
        }

    spool = ("--spool", str(spool_root))
    for command in (("status", "quick"), ("list",), ("logs", "quick"), ("wait", "quick")):
        modules = imported(*command, *spool)
        found = ({name.split(".")[0] for name in modules} & heavy) | (modules & freed)
        assert not found, (command, sorted(found))
    version = imported("--version")
    own = {"spoold", "spoold.app", "spoold.face", "spoold.face.cli"}
    assert {m for m in version if m.startswith("spoold")} <= own, version
    assert not {name.split(".")[0] for name in version} & heavy


def test_a_bad_memory_limit_names_the_accepted_forms(tmp_path: Path, spool_root: Path) -> None:
    job = tmp_path / "mem.yaml"
    job.write_text("job_id: m\nexecutor: local\nproduct: {commands: 'true'}\n"
                   "limits: {memory: 12 parsecs}\n")  # fmt: skip
    result = run_cli(spool_root, "validate", str(job))
    assert result.returncode == 1
    assert "512MiB" in result.stderr and "^\\s*" not in result.stderr, result.stderr


def test_a_schedule_problem_says_schedule_once(tmp_path: Path, spool_root: Path) -> None:
    job = tmp_path / "never.yaml"
    job.write_text("job_id: n\nexecutor: local\nproduct: {commands: 'true'}\n"
                   "schedule: {cron: '0 0 31 2 *'}\n")  # fmt: skip
    result = run_cli(spool_root, "validate", str(job))
    assert result.returncode == 1 and "it never fires" in result.stderr, result.stderr
    assert "schedule: schedule:" not in result.stderr, result.stderr


def test_a_window_opening_decades_ahead_is_refused_with_its_date(
    tmp_path: Path, spool_root: Path
) -> None:
    job = tmp_path / "far.yaml"
    job.write_text("job_id: f\nexecutor: local\nproduct: {commands: 'true'}\n"
                   "schedule: {every: 1h, window: {start: '2080-01-01T00:00:00Z'}}\n")  # fmt: skip
    result = run_cli(spool_root, "validate", str(job))
    said = "far.yaml:4:11: schedule: it would first fire at 2080-01-01T00:00:00Z, more than "
    assert result.returncode == 1 and said in result.stderr, result.stderr
    assert "never fires" not in result.stderr, result.stderr
