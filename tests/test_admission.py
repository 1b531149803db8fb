"""Admission (issue 15): `spoold validate` and `submit` refuse what intake or the executor would.

Each case is a file a careless user or an attacker would write. `spoold validate` runs as a
subprocess, as a user types it, and must refuse each with its path and line; the same file
dropped into a real spool must be rejected by intake with the same code and the same words.
The command line costs seconds to start on a shared machine, so the refused files go through
one `spoold validate` run, and each case looks at its own lines.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from spoold.core.errors import SecretError, ValidationIssue
from spoold.core.job import interpolate, refer_to_secrets
from spoold.core.secrets import SecretAccessDenied, SecretStore
from spoold.core.spool import Spool
from spoold.core.units import MAX_DURATION
from spoold.intake.admission import MAX_MEMORY, Admission, Refused
from spoold.intake.incoming import Accepted, Intake, Rejected
from spoold.intake.validation import JobValidator, job_validator, load_base_schema
from spoold.out.outbox import Callbacks
from spoold.run.registry import ExecutorRegistry
from tests.fakes import FakeClock

REPO = Path(__file__).resolve().parent.parent
LOG = logging.getLogger("spoold.test")
BOUND = 120.0
JOB = "executor: local\nproduct: {commands: 'true'}\n"
CONFIG = "secrets_dir: secrets\nallowed_run_as: [deploy]\n"
LINE = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?P<path>\S+): (?P<msg>.+)$")


@dataclass(frozen=True)
class Case:
    """A file intake would refuse, and what validate must say of it."""

    text: str
    code: str
    path: str
    line: int
    words: str
    suffix: str = ".yaml"


CASES = {
    "callback-without-secret": Case(
        JOB + "callback:\n  url: http://127.0.0.1:9/hook\n",
        "callback", "callback.url", 4, "has no secret to sign with",
    ),
    "callback-secret-missing": Case(
        JOB + "callback:\n  url: http://127.0.0.1:9/hook\n  secret: ${secret:NOT_THERE}\n",
        "callback", "callback.secret", 5, "NOT_THERE does not exist",
    ),
    "callback-and-a-variable-naming-a-missing-secret": Case(
        JOB + "variables: {T: '${secret:GONE}'}\ncallback: {url: 'http://127.0.0.1:9/h', secret: s}\n",
        "callback", "variables.T", 3, "secret 'GONE'",
    ),
    "run-as-not-allowed": Case(
        JOB + "run_as: root\n",
        "not_allowed", "run_as", 3, "user 'root' is not allowed here (the config's allowed_run_as: deploy)",
    ),
    "run-as-on-a-remote-executor": Case(
        "executor: ssh\nproduct: {host: h.example.net, user: u, commands: 'true'}\nrun_as: deploy\n",
        "not_allowed", "run_as", 3, "applies to local and custom jobs only, not to ssh jobs",
    ),
    "secret-dotdot": Case(
        "executor: local\nproduct:\n  commands: 'cat ${secret:../x}'\n",
        "invalid", "product.commands", 3, "'${secret:../x}' names no secret spoold can read",
    ),
    "secret-absolute-path": Case(
        JOB + "variables:\n  TOKEN: '${secret:/etc/shadow}'\n",
        "invalid", "variables.TOKEN", 4, "'${secret:/etc/shadow}' names no secret",
    ),
    "secret-empty": Case(
        JOB + "callback:\n  url: http://127.0.0.1:9/hook\n  secret: '${secret:}'\n",
        "invalid", "callback.secret", 5, "'${secret:}' names no secret",
    ),
    "secret-dotfile": Case(
        JOB + "hooks:\n  pre_run: 'echo ${secret:.hidden}'\n",
        "invalid", "hooks.pre_run", 4, "'${secret:.hidden}' names no secret",
    ),
    "secret-nested": Case(
        JOB + "hooks:\n  on_failure: ['true', 'echo ${secret:${X}}']\n",
        "invalid", "hooks.on_failure[1]", 4, "'${secret:${X}}' puts a reference inside a reference",
    ),
    "variable-nested": Case(
        "executor: local\nproduct:\n  commands:\n    - 'true'\n    - 'echo ${${X}}'\n",
        "invalid", "product.commands[1]", 5, "'${${X}}' puts a reference inside a reference",
    ),
    "secret-nested-in-a-step": Case(
        "executor: local\nsteps:\n  - id: one\n    product: {commands: 'echo ${secret:a${b}}'}\n",
        "invalid", "steps[0].product.commands", 4, "'${secret:a${b}}' puts a reference",
    ),
    "secret-never-closed": Case(
        JOB + "variables: {T: '${secret:abc'}\n",
        "invalid", "variables.T", 3, "'${secret:abc' has no closing '}'",
    ),
    "nul-in-a-variable": Case(
        JOB + 'variables:\n  A: "x\\0y"\n',
        "invalid", "variables.A", 4, "contains a NUL character, which no program argument",
    ),
    "nul-in-a-command-json": Case(
        '{\n  "executor": "local",\n  "product": {"commands": ["true", "rm -rf \\u0000/"]}\n}\n',
        "invalid", "product.commands[1]", 3, "contains a NUL character", suffix=".json",
    ),
    "nul-in-a-key": Case(
        "executor: docker\nproduct:\n  image: alpine\n  commands: 'true'\n  env: {\"A\\0B\": x}\n",
        "invalid", 'product.env["A\\u0000B"]', 5, "contains a NUL character",
    ),
    "retries-beyond-bounds": Case(
        JOB + "retries: 99999999999999999999999\n",
        "invalid", "retries", 3, "must be at most 1000 (got 99999999999999999999999)",
    ),
    "priority-1e23": Case(
        JOB + "priority: 1.0e+23\n",
        "invalid", "priority", 3, "must be at most 1000000 (got 1e+23)",
    ),
    "priority-1e23-json": Case(
        '{"executor": "local", "product": {"commands": "true"},\n "priority": 1e23}\n',
        "invalid", "priority", 2, "must be at most 1000000 (got 1e+23)", suffix=".json",
    ),
    "open-files-beyond-bounds": Case(
        JOB + "limits:\n  open_files: 99999999999\n",
        "invalid", "limits.open_files", 4, "must be at most 1048576 (got 99999999999)",
    ),
    "timeout-as-a-huge-string": Case(
        JOB + "timeout: 99999999999d\n",
        "invalid", "timeout", 3, "must be at most 315360000 seconds, 10 years (got '99999999999d')",
    ),
    "backoff-max-as-a-huge-string-in-a-step": Case(
        "executor: local\nsteps:\n  - id: one\n    product: {commands: 'true'}\n"
        "    backoff: {max: 3651d}\n",
        "invalid", "steps[0].backoff.max", 5, "must be at most 315360000 seconds",
    ),
    "every-as-a-huge-number": Case(
        JOB + "schedule: {every: 1.0e+12}\n",
        "invalid", "schedule.every", 3, "must be at most 315360000 (got 1000000000000.0)",
    ),
    "notify-email-without-a-mail-server": Case(
        JOB + "notify:\n  - email: {to: [ops@example.net]}\n",
        "callback", "notify", 4, "need a mail server, and the config names none",
    ),
    "timeout-nan": Case(
        JOB + "timeout: .nan\n",
        "invalid", "timeout", 3, "must be a finite number (got nan)",
    ),
    "memory-as-a-huge-string": Case(
        JOB + "limits: {memory: 2048TiB}\n",
        "invalid", "limits.memory", 3, "must be at most 1 PiB, 1125899906842624 bytes",
    ),
}  # fmt: skip
#: The cases intake meets as well, in a real spool: one of each kind.
AT_INTAKE = [
    "callback-without-secret", "callback-secret-missing", "run-as-not-allowed", "secret-dotdot",
    "callback-and-a-variable-naming-a-missing-secret",
    "secret-nested", "nul-in-a-variable", "retries-beyond-bounds", "priority-1e23-json",
    "timeout-as-a-huge-string",
]  # fmt: skip

#: What must stay valid: the bounds themselves, and a shell's own ${X:-${Y}}.
VALID = {
    "at-the-bounds": (
        JOB + "retries: 1000\npriority: -1000000\ntimeout: 3650d\nbackoff: {multiplier: 100}\n"
        "limits: {open_files: 1048576, cpu_seconds: 315360000, memory: 1024TiB}\n"
        "concurrency: {key: k, limit: 1024}\nrun_as: deploy\n"
    ),
    "shell-default": (
        "executor: local\nvariables: {TOKEN: '${secret:API_TOKEN}'}\n"
        "product: {commands: 'echo ${NAME:-${HOME}} ${secret:API_TOKEN}'}\n"
        "callback: {url: 'http://127.0.0.1:9/hook', secret: '${secret:CALLBACK}'}\n"
    ),
}


def spoold(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The installed `spoold` command, as a user runs it."""
    script = Path(sys.executable).with_name("spoold")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "spoold"]
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=BOUND, check=False)  # fmt: skip


def lines_of(result: subprocess.CompletedProcess[str], path: Path) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith(f"{path}:")]


def make_config(root: Path) -> Path:
    """A config the daemon would run with: secrets_dir with two secrets, run_as: deploy."""
    secrets = root / "secrets"
    secrets.mkdir(mode=0o700)
    for name in ("API_TOKEN", "CALLBACK"):
        (secrets / name).write_text("value\n")
        (secrets / name).chmod(0o600)
    config = root / "config.yaml"
    config.write_text(CONFIG)
    return config


@dataclass
class Refusals:
    """One `spoold validate` run over every case and every valid file."""

    root: Path
    config: Path
    files: dict[str, Path]
    result: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def refusals(tmp_path_factory: pytest.TempPathFactory) -> Refusals:
    root = tmp_path_factory.mktemp("admission")
    config = make_config(root)
    files = {}
    for name, case in CASES.items():
        files[name] = root / f"{name}{case.suffix}"
        files[name].write_text(case.text)
    for name, text in VALID.items():
        files[name] = root / f"{name}.yaml"
        files[name].write_text(text)
    examples = sorted((REPO / "examples").glob("*.yaml"))
    files |= {f"example-{path.stem}": path for path in examples}
    # No --spool: validate needs no spool, and there is none in `root`.
    result = spoold("validate", "--config", str(config), *map(str, files.values()), cwd=root)
    return Refusals(root, config, files, result)


@pytest.fixture(scope="module")
def validator() -> JobValidator:
    return job_validator(ExecutorRegistry.from_entry_points())


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_validate_refuses_what_intake_would_with_path_and_line(
    refusals: Refusals, name: str
) -> None:
    case, path = CASES[name], refusals.files[name]
    assert refusals.result.returncode == 1, refusals.result.stderr
    assert f"{path}: valid" not in refusals.result.stdout
    lines = lines_of(refusals.result, path)
    parsed = [m.groupdict() for m in map(LINE.match, lines) if m]
    assert len(parsed) == len(lines) == 1, lines
    assert parsed[0]["path"] == case.path, lines  # escaped once, where the issue was made
    assert int(parsed[0]["line"]) == case.line, lines
    assert case.words in parsed[0]["msg"], lines
    assert "Traceback" not in refusals.result.stderr


def test_valid_files_and_the_examples_still_validate(refusals: Refusals) -> None:
    names = [*VALID, *(n for n in refusals.files if n.startswith("example-"))]
    assert len(names) >= 5
    for name in names:
        path = refusals.files[name]
        assert f"{path}: valid" in refusals.result.stdout.splitlines(), refusals.result.stderr
        assert lines_of(refusals.result, path) == []


def test_a_single_refused_file_exits_1(refusals: Refusals) -> None:
    result = spoold("validate", "--config", str(refusals.config),
                    str(refusals.files["nul-in-a-variable"]), cwd=refusals.root)  # fmt: skip
    assert result.returncode == 1
    assert result.stdout == ""
    assert lines_of(result, refusals.files["nul-in-a-variable"]) == lines_of(
        refusals.result, refusals.files["nul-in-a-variable"]
    )


def intake_for(spool: Spool, config_dir: Path, validator: JobValidator) -> Intake:
    """The daemon's intake with the config `make_config` wrote."""
    clock = FakeClock()
    callbacks = Callbacks(spool, clock, SecretStore(config_dir / "secrets"), logger=LOG)
    return Intake(spool, validator, clock, max_file_size=1 << 20, settle_time=0.0,
                  on_accepted=lambda job, document: None, logger=LOG,
                  allowed_run_as=("deploy",), callbacks=callbacks)  # fmt: skip


@pytest.mark.parametrize("name", AT_INTAKE, ids=AT_INTAKE)
def test_intake_rejects_the_same_file_with_the_same_words(
    refusals: Refusals, validator: JobValidator, tmp_path: Path, name: str
) -> None:
    spool = Spool(tmp_path / "spool")
    spool.init()
    intake = intake_for(spool, refusals.root, validator)
    path = refusals.files[name]
    (spool.dir("incoming") / path.name).write_bytes(path.read_bytes())
    outcome = intake.offer(path.name, complete=True)
    assert isinstance(outcome, Rejected), outcome
    assert outcome.reason["code"] == CASES[name].code
    said = [ValidationIssue(**error).format(str(path)) for error in outcome.reason["errors"]]
    assert said == lines_of(refusals.result, path)
    kept = json.loads((outcome.path / "reason.json").read_text())
    assert kept["code"] == CASES[name].code
    assert CASES[name].words in kept["reason"]


@pytest.fixture
def spool_with_job(tmp_path: Path, validator: JobValidator) -> tuple[Spool, Path]:
    """A spool holding job `taken` in pending/, and a config for the command line."""
    config = make_config(tmp_path)
    spool = Spool(tmp_path / "spool")
    spool.init()
    (spool.dir("incoming") / "first.yaml").write_text("job_id: taken\n" + JOB)
    assert isinstance(intake_for(spool, tmp_path, validator).offer("first.yaml", complete=True),
                      Accepted)  # fmt: skip
    return spool, config


def test_an_existing_job_id_is_refused_by_validate_with_spool_and_by_submit(
    spool_with_job: tuple[Spool, Path], validator: JobValidator, tmp_path: Path
) -> None:
    spool, config = spool_with_job
    again = tmp_path / "again.yaml"
    again.write_text(JOB + "job_id: taken\n")
    expected = (
        f"{again}:3:9: job_id: a job with id 'taken' already exists in pending/; "
        "a job id is never run twice"
    )
    plain = spoold("validate", "--config", str(config), str(again), cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr  # without --spool no spool is looked at
    checked = spoold("validate", "--config", str(config), "--spool", str(spool.root), str(again),
                     cwd=tmp_path)  # fmt: skip
    assert checked.returncode == 1
    assert lines_of(checked, again) == [expected]
    submitted = spoold("submit", "--config", str(config), "--spool", str(spool.root), str(again),
                       cwd=tmp_path)  # fmt: skip
    assert submitted.returncode == 1
    assert lines_of(submitted, again) == [expected]
    assert spool.stages.list_incoming() == []
    # Intake says the same of it.
    (spool.dir("incoming") / "again.yaml").write_bytes(again.read_bytes())
    outcome = intake_for(spool, tmp_path, validator).offer("again.yaml", complete=True)
    assert isinstance(outcome, Rejected) and outcome.reason["code"] == "duplicate"
    said = [ValidationIssue(**error).format(str(again)) for error in outcome.reason["errors"]]
    assert said == [expected]


def test_submit_refuses_a_policy_refusal_and_a_second_file_with_one_id(
    spool_with_job: tuple[Spool, Path], tmp_path: Path
) -> None:
    spool, config = spool_with_job
    first, second = tmp_path / "one.yaml", tmp_path / "two.yaml"
    first.write_text("job_id: fresh\n" + JOB)
    second.write_text("job_id: fresh\n" + JOB)
    root = tmp_path / "root.yaml"
    root.write_text(JOB + "run_as: root\n")
    result = spoold("submit", "--config", str(config), "--spool", str(spool.root),
                    str(first), str(second), str(root), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1
    assert f"{first}: submitted as" in result.stdout
    assert lines_of(result, second) == [
        f"{second}:1:9: job_id: a job with id 'fresh' is in {first}, submitted just now; "
        "a job id is never run twice"
    ]
    assert lines_of(result, root) == [
        f"{root}:3:9: run_as: user 'root' is not allowed here (the config's allowed_run_as: deploy)"
    ]
    assert spool.stages.list_incoming() == ["one.yaml"]


def test_exec_prints_a_refusal_as_validate_does(refusals: Refusals, tmp_path: Path) -> None:
    path = refusals.files["run-as-not-allowed"]
    result = spoold("exec", "--config", str(refusals.config), "--spool", str(tmp_path / "spool"),
                    str(path), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1
    assert lines_of(result, path) == lines_of(refusals.result, path)


# -- in process: what the command line cannot show cheaply ------------------------------------


def admission(validator: JobValidator, target: Any, *, strict: bool) -> Admission:
    return Admission(
        validator, max_file_size=1 << 20, callback_target=target, strict_secrets=strict
    )


def _denied_open(monkeypatch: pytest.MonkeyPatch, name: str, code: int) -> None:
    """Opening the secret ``name`` fails with ``code`` (root may open anything: as a user
    who may not, EACCES)."""
    real = os.open

    def opened(path: Any, *args: Any, **kwargs: Any) -> int:
        if os.path.basename(str(path)) == name:
            raise OSError(code, os.strerror(code))
        return int(real(path, *args, **kwargs))

    monkeypatch.setattr("spoold.core.secrets.os.open", opened)


def test_a_callback_secret_this_user_may_not_read_is_left_to_intake(
    validator: JobValidator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real callbacks' target, on a secret this user may not open: what it raises must
    still say "access denied" (its cause), which admission tells apart."""
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    (secrets / "CB").write_text("value\n")
    (secrets / "CB").chmod(0o600)
    spool = Spool(tmp_path / "spool")
    spool.init()
    target = Callbacks(spool, FakeClock(), SecretStore(secrets),
                       logger=logging.getLogger("spoold.test")).target  # fmt: skip
    _denied_open(monkeypatch, "CB", errno.EACCES)
    data = (JOB + "callback: {url: 'http://127.0.0.1:9/x', secret: '${secret:CB}'}\n").encode()
    now = FakeClock().now()
    admitted = admission(validator, target, strict=False).admit(data, "j.yaml", now=now)
    assert admitted.callback is None
    [note] = admitted.notes
    assert note.path == "callback.secret" and note.line == 3
    assert note.message.startswith("not checked here: this user may not read secrets_dir")
    with pytest.raises(Refused) as refused:  # the daemon itself must be able to read it
        admission(validator, target, strict=True).admit(data, "j.yaml", now=now)
    assert refused.value.code == "callback"


@pytest.mark.parametrize(
    ("code", "denied"), [(errno.EACCES, True), (errno.EPERM, True), (errno.EIO, False),
                         (errno.EMFILE, False)],
)  # fmt: skip
def test_permission_denied_on_a_secret_is_told_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, denied: bool
) -> None:
    """Denied, and only denied: another failure to open it (a disk's, too many files) is the
    secret's error, which admission does not pass over."""
    _denied_open(monkeypatch, "token", code)
    with pytest.raises(SecretError, match=os.strerror(code)) as raised:
        SecretStore(tmp_path).read("token")
    assert isinstance(raised.value, SecretAccessDenied) == denied


def test_a_number_longer_than_python_converts_is_refused_not_a_crash(
    validator: JobValidator,
) -> None:
    data = (JOB + "variables: {A: " + "9" * 5000 + "}\n").encode()
    with pytest.raises(Refused) as refused:
        admission(validator, None, strict=True).admit(data, "j.yaml", now=FakeClock().now())
    assert refused.value.code == "invalid"
    assert refused.value.issues[0].line == 3


@pytest.mark.parametrize(
    "text",
    ["${secret:../x}", "${secret:/etc/shadow}", "${secret:}", "${secret:a${b}}", "${secret:ab"],
)
def test_the_runtime_resolves_no_reference_validation_would_refuse(text: str) -> None:
    """Jobs accepted before validation refused these fail at run time, saying why."""
    with pytest.raises(SecretError, match="names no secret spoold can read"):
        interpolate({"x": [f"a {text} b"]}, {}, lambda name: "value")
    with pytest.raises(SecretError, match="names no secret spoold can read"):
        refer_to_secrets(f"echo {text}", set())


def test_the_runtime_still_resolves_what_validation_admits() -> None:
    assert interpolate("${X} ${secret:a.b-c_1} ${Y}", {"X": "x"}, str.upper) == "x A.B-C_1 ${Y}"
    used: set[str] = set()
    assert refer_to_secrets("${X:-${secret:k}}", used) == "${X:-${SPOOLD_SECRET_K}}"
    assert used == {"k"}


def test_the_bounds_admission_applies_to_text_are_the_schemas() -> None:
    defs = load_base_schema()["$defs"]
    number = next(option for option in defs["duration"]["anyOf"] if option.get("type") == "number")
    assert number["maximum"] == MAX_DURATION
    memory = defs["limits"]["properties"]["memory"]["oneOf"][0]
    assert memory["maximum"] == MAX_MEMORY
    assert defs["limits"]["properties"]["cpu_seconds"]["maximum"] == MAX_DURATION


def test_a_refusal_reads_like_a_validation_error(validator: JobValidator) -> None:
    data = (JOB + 'variables:\n  A: "x\\0y"\n').encode()
    with pytest.raises(Refused) as refused:
        admission(validator, None, strict=True).admit(data, "j.yaml", now=FakeClock().now())
    issue = refused.value.issues[0]
    assert issue.format("j.yaml").startswith("j.yaml:4:6: variables.A: contains a NUL character")
    assert refused.value.reason.startswith("variables.A: contains a NUL character")
    assert refused.value.reason.endswith("(line 4)")
    assert os.path.sep not in refused.value.code


def test_a_file_intake_refuses_by_its_name_or_size_is_refused_by_validate(
    tmp_path: Path,
) -> None:
    """validate is the preview of intake, file-level rules included."""
    config = tmp_path / "config.yaml"
    config.write_text("limits: {max_file_size: 100}\n")
    big = tmp_path / "big.yaml"
    big.write_text("executor: local\nproduct: {commands: 'true'}\n" + "#" * 200 + "\n")
    named = tmp_path / "job.txt"
    named.write_text("executor: local\nproduct: {commands: 'true'}\n")
    result = spoold("validate", "--config", str(config), str(big), str(named), cwd=tmp_path)
    assert result.returncode == 1
    size = big.stat().st_size
    assert f"{big}: the file is {size} bytes, over the limit of 100 bytes" in result.stderr
    assert f"{named}: job files must end in .yaml, .yml or .json" in result.stderr
