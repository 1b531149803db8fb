"""The command line against a hostile submitter and a careless operator: the id `submit` prints
is the one the job gets; what a submitter wrote (file names, descriptions, labels, errors, a
job's output) reaches the terminal with its control characters escaped; `--limit` and job ids
the command line cannot use are usage errors (2), as is an id that names no job, for every
command; a timeout of 0 is refused at validation. No daemon: intake is driven in-process."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from spoold.core.clock import SystemClock
from spoold.core.spool import Spool
from spoold.core.units import MAX_DURATION
from spoold.face.views import printable
from spoold.intake.incoming import Accepted, Rejected
from spoold.intake.validation import load_base_schema
from tests.harness import drop, intake_for, local_job, run_cli
from tests.test_cli_status import make_job

#: What a terminal acts on: C0 controls (tab and newline aside), DEL, C1 controls.
RAW_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@pytest.fixture
def spool_root(tmp_path: Path) -> Path:
    root = tmp_path / "spool"
    Spool(root).init()
    return root


def take_incoming(spool_root: Path) -> list[Accepted | Rejected | None]:
    """Every file in incoming/, taken as the daemon's intake takes it."""
    intake = intake_for(Spool(spool_root), SystemClock())
    names = sorted(p.name for p in (spool_root / "incoming").iterdir() if p.name[0] != ".")
    return intake.offer_all(names, complete=True)


# -- 1. the id submit prints ----------------------------------------------------------------------


def submitted_ids(stdout: str) -> list[str]:
    return re.findall(r"submitted as \S+ \(job ([^)]+)\)", stdout)


def test_submit_prints_the_id_the_job_gets(spool_root: Path, tmp_path: Path) -> None:
    anonymous = tmp_path / "ok.yaml"
    anonymous.write_text("executor: local\nproduct: {commands: 'true'}\n")
    as_json = tmp_path / "ok.json"
    as_json.write_text('{"executor": "local", "product": {"commands": "true"}}\n')
    result = run_cli(spool_root, "submit", str(anonymous), str(as_json))
    assert result.returncode == 0, result.stderr
    printed = submitted_ids(result.stdout)
    assert len(printed) == 2, result.stdout
    outcomes = take_incoming(spool_root)
    assert all(isinstance(o, Accepted) for o in outcomes), outcomes
    assert sorted(o.job.job_id for o in outcomes if isinstance(o, Accepted)) == sorted(printed)
    for job_id in printed:
        assert run_cli(spool_root, "status", job_id).returncode == 0


def test_submit_names_no_id_it_cannot_give(spool_root: Path, tmp_path: Path) -> None:
    """A file spoold cannot add a job_id to without changing the rest: the id is the daemon's
    to make, and submit says so instead of printing one that will not be."""
    odd = tmp_path / "odd.yaml"
    odd.write_text("? executor\n: local\nproduct: {commands: 'true'}\n")  # an explicit key
    result = run_cli(spool_root, "submit", str(odd))
    assert result.returncode == 0, result.stderr
    assert submitted_ids(result.stdout) == [], result.stdout
    assert "given one when spoold takes the file" in result.stdout, result.stdout
    [outcome] = take_incoming(spool_root)
    assert isinstance(outcome, Accepted), outcome
    assert outcome.job.job_id not in result.stdout


# -- 2. what a submitter wrote, escaped -----------------------------------------------------------


def test_printable_escapes_control_characters_and_undecodable_bytes() -> None:
    assert printable("esc\x1b[31mRED\x1b[0m.yaml") == "esc\\x1b[31mRED\\x1b[0m.yaml"
    assert printable("a\nb\tc\rd\x07\x7f\x9b") == "a\\nb\\tc\\rd\\x07\\x7f\\x9b"
    assert printable("a\nb\tc\rd", lines=True) == "a\nb\tc\\rd"
    assert printable(b"bad \xff".decode("utf-8", "surrogateescape")) == "bad \\xff"
    assert printable("caf\u00e9 \u2713") == "caf\u00e9 \u2713", "printable text stays as it is"
    # A backslash is escaped too: an escape shown reads one way back (never idempotent, then).
    assert printable("\\x1b") == "\\\\x1b" != printable("\x1b")


def test_a_rejected_file_name_is_shown_escaped(spool_root: Path) -> None:
    name = "esc\x1b[31mRED\x1b[0m.yaml"
    drop(spool_root, name, local_job("esc", "true"))
    [outcome] = take_incoming(spool_root)
    assert isinstance(outcome, Rejected), outcome
    for command in (
        ("list", "--state", "rejected"),
        ("list", "--state", "rejected", "--ids"),
        ("purge", "--state", "rejected", "--dry-run"),
    ):
        shown = run_cli(spool_root, *command)
        assert shown.returncode == 0, (command, shown.stderr)
        said = shown.stdout + shown.stderr
        assert not RAW_CONTROL.search(said), (command, said)
        assert "esc\\x1b[31mRED\\x1b[0m.yaml" in shown.stdout, (command, shown.stdout)
    listed = json.loads(run_cli(spool_root, "list", "--state", "rejected", "--json").stdout)
    assert listed[0]["name"] == name, "--json carries the name as it is, JSON-escaped"


def test_descriptions_labels_and_errors_are_shown_escaped(spool_root: Path) -> None:
    hostile = "hi\x1b]0;OWNED\x07\x1b[2J\nstate:           succeeded"
    make_job(spool_root, "told", description=hostile, labels={"team": "\x1b[31mred"})
    make_job(spool_root, "broke", "failed", exit_code=1, error="boom\x1b[2J\x9b1m")
    status = run_cli(spool_root, "status", "told")
    assert status.returncode == 0, status.stderr
    assert not RAW_CONTROL.search(status.stdout), status.stdout
    assert "hi\\x1b]0;OWNED\\x07\\x1b[2J\\nstate:" in status.stdout, status.stdout
    assert "team=\\x1b[31mred" in status.stdout, status.stdout
    assert status.stdout.count("\nstate:") == 1, "a description cannot add a line of its own"
    for command in (("status", "broke"), ("list",), ("wait", "broke")):
        shown = run_cli(spool_root, *command)
        said = shown.stdout + shown.stderr
        assert not RAW_CONTROL.search(said), (command, said)
        assert "boom\\x1b[2J\\x9b1m" in shown.stdout, (command, shown.stdout)
    as_json = json.loads(run_cli(spool_root, "status", "told", "--json").stdout)
    assert as_json["description"] == hostile


def test_logs_escape_control_characters_but_keep_lines_and_tabs(spool_root: Path) -> None:
    job = make_job(spool_root, "noisy", "succeeded", exit_code=0,
                   log="out \x1b[31mred\x1b[0m\n\tindented\rover\n")  # fmt: skip
    with open(Path(job.path) / "log", "ab") as log:
        log.write(b"split \xe2\x9c\x93 \xff \xc2\x9b done\n")  # a mark, a bad byte, C1 CSI
    for follow in ((), ("-f",)):
        shown = run_cli(spool_root, "logs", "noisy", *follow)
        assert shown.returncode == 0, shown.stderr
        assert not RAW_CONTROL.search(shown.stdout), shown.stdout
        assert "out \\x1b[31mred\\x1b[0m\n\tindented\\rover\n" in shown.stdout, shown.stdout
        assert "split \u2713 \\xff \\x9b done\n" in shown.stdout, shown.stdout


# -- 3. --limit ------------------------------------------------------------------------------------


def test_list_limit_below_zero_is_a_usage_error(spool_root: Path) -> None:
    for n in range(3):
        make_job(spool_root, f"j{n}", submitted_at=f"2026-12-02T10:00:0{n}Z")
    for wrong in ("-1", "-40", "x", "1.5"):
        refused = run_cli(spool_root, "list", "--limit", wrong)
        assert refused.returncode == 2, (wrong, refused.stdout)
        assert "--limit" in refused.stderr and refused.stdout == "", refused.stderr
    two = json.loads(run_cli(spool_root, "list", "--limit", "2", "--json").stdout)
    assert [row["job_id"] for row in two] == ["j2", "j1"], two
    every = run_cli(spool_root, "list", "--limit", "0", "--ids")  # as the bash completion asks
    assert sorted(every.stdout.split()) == ["j0", "j1", "j2"], every.stdout


# -- 4. an id that names no job --------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [("status",), ("logs",), ("cancel",), ("retry",), ("wait",), ("unschedule",),
     ("schedule", "run"), ("schedule", "pause"), ("schedule", "resume")],
)  # fmt: skip
def test_an_unknown_or_invalid_job_id_is_a_usage_error_for_every_command(
    spool_root: Path, command: tuple[str, ...]
) -> None:
    for job_id in ("no-such-job", "../x", "a b", "x\x1b[2J"):
        result = run_cli(spool_root, *command, job_id)
        assert result.returncode == 2, (command, job_id, result.stderr)
        assert not RAW_CONTROL.search(result.stderr), result.stderr
        assert "Traceback" not in result.stderr, result.stderr


# -- 5. timeout: 0 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [0, 0.0, "0", "0s", "0ms", "0.0s", "0m 0s", " 00s "])
def test_a_zero_timeout_is_refused_at_validation(
    spool_root: Path, tmp_path: Path, timeout: object
) -> None:
    for where, document in (
        ("timeout", local_job("t0", "true", timeout=timeout)),
        ("steps[0].timeout", {"job_id": "t0", "executor": "local", "steps": [
            {"id": "a", "product": {"commands": "true"}, "timeout": timeout}]}),
    ):  # fmt: skip
        path = tmp_path / "t0.yaml"
        path.write_text(yaml.safe_dump(document))
        result = run_cli(spool_root, "validate", str(path))
        assert result.returncode == 1, (timeout, result.stdout)
        assert f"{where}: " in result.stderr and "more than 0" in result.stderr, result.stderr


def test_a_short_timeout_and_a_zero_backoff_stay_valid(spool_root: Path, tmp_path: Path) -> None:
    for fields in ({"timeout": "0.5s"}, {"timeout": 0.001}, {"timeout": "10ms"},
                   {"timeout": "1m", "retries": 1, "backoff": 0}):  # fmt: skip
        path = tmp_path / "fine.yaml"
        path.write_text(yaml.safe_dump(local_job("fine", "true", **fields)))
        result = run_cli(spool_root, "validate", str(path))
        assert result.returncode == 0, (fields, result.stderr)


def test_intake_rejects_a_zero_timeout(spool_root: Path) -> None:
    drop(spool_root, "zero.yaml", local_job("zero", "true", timeout="0s"))
    [outcome] = take_incoming(spool_root)
    assert isinstance(outcome, Rejected), outcome
    assert "timeout" in outcome.reason["reason"] and "more than 0" in outcome.reason["reason"]


def test_a_timeouts_bound_is_the_durations() -> None:
    defs = load_base_schema()["$defs"]
    number = next(option for option in defs["timeout"]["anyOf"] if option.get("type") == "number")
    assert number["maximum"] == MAX_DURATION


@pytest.mark.parametrize("command", ["submit", "validate", "exec"])
def test_a_fifo_given_as_a_job_file_is_refused_not_waited_on(
    spool_root: Path, tmp_path: Path, command: str
) -> None:
    """`spoold submit f.yaml` on a FIFO hung for ever, reading it for a writer that never
    came; intake rejects a FIFO without reading it."""
    fifo = tmp_path / "f.yaml"
    os.mkfifo(fifo)
    result = run_cli(spool_root, command, str(fifo), bound=30)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{fifo}: cannot read: it is a FIFO" in result.stderr
    assert os.listdir(spool_root / "incoming") == []


@pytest.mark.parametrize("every", ["999999999d", "99999999999999999999999s", "3000000d"])
def test_an_every_past_the_calendar_is_rejected_not_kept_in_incoming(
    spool_root: Path, tmp_path: Path, every: str
) -> None:
    """`every: 999999999d` made intake fail on each try (OverflowError: date value out of
    range), the file in incoming/ for good, and validate print a traceback."""
    document = {**local_job("ev", "true"), "schedule": {"every": every}}
    drop(spool_root, "ev.yaml", document)
    [outcome] = take_incoming(spool_root)
    assert isinstance(outcome, Rejected), outcome
    assert "at most 315360000 seconds, 10 years" in outcome.reason["reason"]
    job = tmp_path / "ev.yaml"
    job.write_text(yaml.safe_dump(document))
    result = run_cli(spool_root, "validate", str(job))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "schedule.every: must be at most 315360000 seconds" in result.stderr


def test_a_file_spoolds_checks_fail_on_is_rejected_not_tried_for_ever(
    spool_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever a check of spoold's raises on a file (a bug: here a stand-in), the file goes
    to rejected/ with the reason, where it was kept in incoming/ and tried again for ever."""

    def broken(*args: object, **kwargs: object) -> None:
        raise ArithmeticError("a check that fails")

    monkeypatch.setattr("spoold.intake.admission.Admission.admit", broken)
    drop(spool_root, "odd.yaml", local_job("odd", "true"))
    [outcome] = take_incoming(spool_root)
    assert isinstance(outcome, Rejected), outcome
    assert outcome.reason["code"] == "internal"
    assert "ArithmeticError: a check that fails" in outcome.reason["reason"]
    assert os.listdir(spool_root / "incoming") == []
