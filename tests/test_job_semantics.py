"""Job semantics run in-process (issue 3), with a clock the test moves: retries, secrets."""

from __future__ import annotations

import hashlib
import logging
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from spoold.executors.base import ExecResult, Executor, RunContext

from spoold.core.clock import Clock, SystemClock, parse_rfc3339
from spoold.core.config import Config
from spoold.core.errors import ExecutorError
from spoold.core.job import JobStatus
from spoold.core.secrets import Masker, SecretStore
from spoold.core.spool import JobDir, Spool
from spoold.intake.incoming import Accepted, Intake, Rejected
from spoold.intake.validation import job_validator
from spoold.run.registry import ExecutorRegistry
from spoold.run.worker import JobRunner
from tests.fakes import FakeClock

LOGGER = logging.getLogger("spoold.test")


class Parts:
    """A spool, intake and a runner sharing one fake clock; remembers deferred jobs."""

    def __init__(
        self,
        tmp_path: Path,
        draw: float = 0.0,
        secrets: Path | None = None,
        clock: Clock | None = None,
        registry: ExecutorRegistry | None = None,
        **settings: Any,
    ) -> None:
        self.spool = Spool(tmp_path / "spool")
        self.spool.init()
        self.clock: Any = clock or FakeClock()
        self.masker = Masker()
        registry = registry or ExecutorRegistry.from_entry_points()
        config = Config(spool=self.spool.root, hostname="here", worker_id="w1", kill_grace=0.5,
                        **settings)  # fmt: skip
        self.deferred: list[tuple[str, float]] = []
        self.intake = Intake(self.spool, job_validator(registry), self.clock,
                             max_file_size=config.max_file_size, settle_time=0,
                             on_accepted=lambda job, document: None, logger=LOGGER)  # fmt: skip
        self.runner = JobRunner(self.spool, registry, config, self.clock, LOGGER,
                                draw=lambda: draw,
                                on_deferred=lambda job_id, due: self.deferred.append((job_id, due)),
                                secrets=SecretStore(secrets), masker=self.masker)  # fmt: skip

    def submit(self, document: dict[str, Any]) -> str:
        (self.spool.dir("incoming") / "j.yaml").write_text(yaml.safe_dump(document))
        outcome = self.intake.offer("j.yaml", complete=True)
        assert isinstance(outcome, Accepted), outcome
        return outcome.job.job_id

    def attempt(self, job_id: str) -> tuple[JobDir, dict[str, Any]]:
        claimed = self.runner.claim(job_id)
        assert claimed is not None
        final = self.runner.run(claimed)
        assert final is not None
        return final, self.spool.jobs.read_status(final)


def _flaky(job_id: str, fail_times: int, **fields: Any) -> dict[str, Any]:
    """A job that fails its first ``fail_times`` attempts (exit 75), then succeeds."""
    script = f'test "$SPOOLD_ATTEMPT" -gt {fail_times} || exit 75'
    return {"job_id": job_id, "executor": "local", "product": {"commands": script}, **fields}


def test_a_failed_attempt_waits_in_pending_for_its_backoff_then_succeeds(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    job_id = parts.submit(_flaky("flaky", 2, retries=3, backoff="30s"))
    start = parts.clock.now().timestamp()
    job, status = parts.attempt(job_id)
    assert job.directory == "pending"
    assert (status["state"], status["exit_code"]) == ("pending", 75)
    assert parse_rfc3339(status["next_attempt_at"]).timestamp() == start + 30
    assert parts.deferred == [("flaky", start + 30)]
    parts.clock.advance(30)
    job, status = parts.attempt(job_id)
    assert job.directory == "pending" and len(parts.deferred) == 2
    parts.clock.advance(30)
    job, status = parts.attempt(job_id)
    assert job.directory == "done"
    assert status["state"] == "succeeded" and status["next_attempt_at"] is None
    assert [a["exit_code"] for a in status["attempts"]] == [75, 75, 0]
    log = job.log_path.read_text()
    for n in (1, 2, 3):  # each attempt has its own section, opened and closed in the log
        assert f"attempt {n} started" in log
    assert log.count("retrying in 30s") == 2
    assert "attempt 2 of 4 is due at" in log and "attempt 3 of 4 is due at" in log


def test_retries_run_out_and_the_job_fails_with_every_attempt_recorded(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    job_id = parts.submit(_flaky("hopeless", 99, retries=2, backoff={"initial": "1s"}))
    waits = []
    for _ in range(2):
        job, status = parts.attempt(job_id)
        assert job.directory == "pending"
        due = parse_rfc3339(status["next_attempt_at"]).timestamp()
        waits.append(due - parts.clock.now().timestamp())
        parts.clock.advance(waits[-1])
    job, status = parts.attempt(job_id)
    assert job.directory == "failed" and len(status["attempts"]) == 3
    assert waits == [1, 2], "exponential by default: 1s, then 2s"


def test_only_the_exit_codes_of_retry_on_are_retried(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    document = {"job_id": "other", "executor": "local", "product": {"commands": "exit 3"},
                "retries": 5, "retry_on": [75]}  # fmt: skip
    job, status = parts.attempt(parts.submit(document))
    assert job.directory == "failed" and len(status["attempts"]) == 1
    assert parts.deferred == []


def test_a_cancelled_or_succeeded_job_is_never_retried(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    job, status = parts.attempt(parts.submit(_flaky("fine", 0, retries=3)))
    assert job.directory == "done" and len(status["attempts"]) == 1


def test_jitter_comes_from_the_injected_source(tmp_path: Path) -> None:
    parts = Parts(tmp_path, draw=0.5)
    document = _flaky("jit", 9, retries=1, backoff={"initial": "40s", "jitter": True})
    start = parts.clock.now().timestamp()
    _, status = parts.attempt(parts.submit(document))
    assert parse_rfc3339(status["next_attempt_at"]).timestamp() == start + 30  # 20 + 0.5 * 20


SECRET = "pa55-w0rd-7f3a"


def _secrets(tmp_path: Path, mode: int = 0o600, **values: str) -> Path:
    directory = tmp_path / "secrets"
    directory.mkdir(mode=0o700, exist_ok=True)
    for name, value in values.items():
        path = directory / name
        path.write_text(value + "\n")
        path.chmod(mode)
    return directory


def _written(root: Path) -> str:
    """Everything spoold wrote under ``root``, as one text."""
    return "".join(p.read_text(errors="replace") for p in sorted(root.rglob("*")) if p.is_file())


def test_a_secret_reaches_the_job_but_no_file_spoold_writes(tmp_path: Path) -> None:
    parts = Parts(tmp_path, secrets=_secrets(tmp_path, DB_PASSWORD=SECRET))
    digest = hashlib.sha256(SECRET.encode()).hexdigest()  # job.yaml must not hold the value
    commands = [
        f'test "$(printf %s "$SPOOLD_SECRET_DB_PASSWORD" | sha256sum)" = "{digest}  -"'
        " && echo value-arrived",
        "echo stdout ${secret:DB_PASSWORD}",
        "echo stderr ${secret:DB_PASSWORD} >&2",
        'echo "from a variable: $TOKEN"',
    ]
    document = {"job_id": "sec", "executor": "local", "product": {"commands": commands},
                "variables": {"TOKEN": "${secret:DB_PASSWORD}"}}  # fmt: skip
    job, status = parts.attempt(parts.submit(document))
    assert status["state"] == "succeeded", job.log_path.read_text()
    log = job.log_path.read_text()
    assert "value-arrived" in log
    assert "INFO stdout ***" in log and "ERROR stderr ***" in log
    assert "from a variable: ***" in log
    assert SECRET not in _written(parts.spool.root)
    assert SECRET not in parts.masker.mask_text(SECRET), "spoold's own log masks it too"


def test_values_of_secret_named_fields_are_masked_too(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    document = {"job_id": "cb", "executor": "local", "product": {"commands": f"echo {SECRET}"},
                "callback": {"url": "http://127.0.0.1:9/hook", "secret": SECRET}}  # fmt: skip
    job, status = parts.attempt(parts.submit(document))
    assert status["state"] == "succeeded"
    assert "INFO ***" in job.log_path.read_text()
    assert SECRET not in (job.path / "status.json").read_text()


def test_a_secret_file_others_can_read_is_refused(tmp_path: Path) -> None:
    parts = Parts(tmp_path, secrets=_secrets(tmp_path, mode=0o644, API=SECRET))
    document = {"job_id": "loose", "executor": "local",
                "product": {"commands": "echo ${secret:API}"}}  # fmt: skip
    job, status = parts.attempt(parts.submit(document))
    assert job.directory == "failed"
    assert "chmod 600" in status["error"] and "API" in status["error"]
    assert SECRET not in _written(parts.spool.root)


def test_without_a_secrets_dir_a_secret_fails_the_job_clearly(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    document = {"job_id": "nodir", "executor": "local",
                "product": {"commands": "echo ${secret:API}"}}  # fmt: skip
    job, status = parts.attempt(parts.submit(document))
    assert job.directory == "failed"
    assert "secret 'API'" in status["error"] and "no secrets_dir is configured" in status["error"]


def test_a_variable_cannot_inject_shell_syntax_or_yaml(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    evil = "x; touch injected-1 #$(touch injected-2)`touch injected-3`"
    document = {"job_id": "inj", "executor": "local",
                "variables": {"EVIL": evil, "DOC": "a\nproduct: {commands: touch injected-4}"},
                "product": {"commands": ['echo "${EVIL}"', "echo ${EVIL}", 'echo "$DOC"',
                                         'echo "files made: $(ls -A | wc -l)"']}}  # fmt: skip
    job, status = parts.attempt(parts.submit(document))
    assert status["state"] == "succeeded", job.log_path.read_text()
    log = job.log_path.read_text()
    assert f"INFO {evil}" in log, "the value arrives as data, whole"
    assert "INFO product: {commands: touch injected-4}" in log
    assert "INFO files made: 0" in log


def test_values_are_filled_into_fields_that_are_not_programs(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    document = {"job_id": "cwd", "executor": "local", "variables": {"SUB": "deep/er"},
                "product": {"commands": "pwd", "cwd": "${SUB}"}}  # fmt: skip
    job, status = parts.attempt(parts.submit(document))
    assert status["state"] == "succeeded"
    assert "/deep/er\n" in job.log_path.read_text()


def test_hitting_a_limit_fails_the_job_saying_which(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    hog = {"job_id": "hog", "executor": "local", "limits": {"cpu_seconds": 1},
           "product": {"commands": "while :; do :; done"}}  # fmt: skip
    job, status = parts.attempt(parts.submit(hog))
    assert job.directory == "failed"
    assert status["error"].startswith("cpu_seconds limit reached (1 s of CPU)"), status["error"]
    greedy = {"job_id": "greedy", "executor": "local", "limits": {"memory": "64MiB"},
              "product": {"commands": f"{sys.executable} -c 'bytearray(256 << 20)'"}}  # fmt: skip
    job, status = parts.attempt(parts.submit(greedy))
    assert job.directory == "failed"
    assert status["error"].startswith("memory limit reached (64 MiB)"), status["error"]
    assert "limits: memory 64 MiB" in job.log_path.read_text()


def test_a_job_within_its_limits_runs_as_usual(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    document = {"job_id": "fine", "executor": "local",
                "limits": {"memory": "512MiB", "cpu_seconds": 30, "open_files": 64},
                "product": {"commands": "ulimit -n; echo done"}}  # fmt: skip
    job, status = parts.attempt(parts.submit(document))
    assert status["state"] == "succeeded"
    assert "INFO 64\n" in job.log_path.read_text()


def test_run_as_runs_a_local_job_as_that_user(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    parts.intake = Intake(parts.spool, job_validator(ExecutorRegistry.from_entry_points()),
                          parts.clock, max_file_size=1 << 20, settle_time=0,
                          on_accepted=lambda job, document: None, logger=LOGGER,
                          allowed_run_as=("nobody",))  # fmt: skip
    document = {"job_id": "who", "executor": "local", "run_as": "nobody",
                "artifacts": [{"path": "out.txt"}],
                "product": {"commands": ['echo "$(id -un) $HOME"', "echo kept > out.txt"]}}  # fmt: skip
    job, status = parts.attempt(parts.submit(document))
    assert status["state"] == "succeeded", job.log_path.read_text()
    # nobody's home does not exist: the job's work dir is its HOME (README, the environment)
    assert re.search(r"INFO nobody /\S+/who\b", job.log_path.read_text()), job.log_path.read_text()
    assert [a["path"] for a in status["artifacts"]] == ["out.txt"]


def test_run_as_a_user_the_config_does_not_allow_is_rejected(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    document = {"job_id": "root-please", "executor": "local", "run_as": "daemon",
                "product": {"commands": "id"}}  # fmt: skip
    (parts.spool.dir("incoming") / "j.yaml").write_text(yaml.safe_dump(document))
    outcome = parts.intake.offer("j.yaml", complete=True)
    assert isinstance(outcome, Rejected)
    assert outcome.reason["code"] == "not_allowed"
    assert "user 'daemon' is not allowed here" in outcome.reason["reason"]


def _hooked(job_id: str, commands: str, **hooks: str | list[str]) -> dict[str, Any]:
    return {"job_id": job_id, "executor": "local", "product": {"commands": commands},
            "hooks": hooks}  # fmt: skip


REPORT = 'echo "$SPOOLD_HOOK state=$SPOOLD_JOB_STATE exit=$SPOOLD_EXIT_CODE job=$JOB_ID"'


def test_hooks_run_around_the_job_with_its_state_and_exit_code(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    document = _hooked("ok", "echo main", pre_run=REPORT, post_run=REPORT, on_success=REPORT,
                       on_failure=REPORT)  # fmt: skip
    job, status = parts.attempt(parts.submit(document))
    assert status["state"] == "succeeded"
    lines = [line.split(" INFO ", 1)[1] for line in job.log_path.read_text().splitlines()
             if " INFO " in line and "spoold:" not in line]  # fmt: skip
    assert lines == [
        "pre_run state=running exit= job=ok",
        "main",
        "post_run state=running exit=0 job=ok",
        "on_success state=succeeded exit=0 job=ok",
    ]


def test_on_failure_runs_once_the_job_has_failed_for_good(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    document = _hooked("bad", "exit 4", on_success=REPORT, on_failure=REPORT)
    document.update(retries=1, backoff="1s")
    job, _ = parts.attempt(parts.submit(document))
    assert job.directory == "pending"
    assert "on_failure" not in job.log_path.read_text(), "not after an attempt that is retried"
    parts.clock.advance(1)
    job, _ = parts.attempt("bad")
    assert job.directory == "failed"
    log = job.log_path.read_text()
    assert log.count("on_failure state=failed exit=4 job=bad") == 1 and "on_success" not in log


def test_a_failing_pre_run_fails_the_attempt_and_the_job_does_not_run(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    document = _hooked("pre", "echo must-not-run", pre_run="exit 9", on_failure=REPORT)
    job, status = parts.attempt(parts.submit(document))
    assert job.directory == "failed" and status["error"] == "the pre_run hook failed"
    log = job.log_path.read_text()
    assert "must-not-run" not in log.replace("echo must-not-run", "")
    assert "hook pre_run failed: exit code 9" in log
    assert "on_failure state=failed" in log


def test_a_failing_post_run_or_on_success_hook_is_logged_and_changes_nothing(
    tmp_path: Path,
) -> None:
    parts = Parts(tmp_path)
    document = _hooked("post", "echo fine", post_run="exit 3", on_success=["false"])
    job, status = parts.attempt(parts.submit(document))
    assert status["state"] == "succeeded"
    log = job.log_path.read_text()
    assert "hook post_run failed: exit code 3" in log and "hook on_success failed" in log


def _step(step_id: str, commands: str, *needs: str, **fields: Any) -> dict[str, Any]:
    return {"id": step_id, "needs": list(needs), "product": {"commands": commands}, **fields}


def twenty_steps() -> list[dict[str, Any]]:
    """a -> (b, c) -> d is the diamond; m fails in the middle of a chain; x.. runs beside."""
    mark = 'echo "$SPOOLD_STEP_ID" >> order.txt'
    steps = [
        _step("a", mark),
        _step("b", mark, "a"),
        _step("c", mark, "a"),
        _step("d", f"{mark}; test -s order.txt", "b", "c"),
        *[_step(f"k{n}", mark, "d" if n == 1 else f"k{n - 1}") for n in range(1, 6)],
        _step("m", f"{mark}; exit 5", "k5"),
        *[_step(f"after{n}", mark, "m" if n == 1 else f"after{n - 1}") for n in range(1, 4)],
        *[_step(f"x{n}", mark, *([f"x{n - 1}"] if n > 1 else [])) for n in range(1, 6)],
        _step("tolerant", "exit 1", "a", continue_on_error=True),
        _step(
            "z", "cp order.txt kept.txt", "tolerant", "x5", "k5", artifacts=[{"path": "kept.txt"}]
        ),
    ]
    assert len(steps) == 20
    return steps


def check_twenty_steps(job: JobDir, status: dict[str, Any]) -> None:
    """What twenty_steps() must come to, wherever it ran."""
    assert job.directory == "failed"
    assert status["error"].startswith("step m failed: exit code 5"), status["error"]
    states = {step_id: record["state"] for step_id, record in status["steps"].items()}
    assert states["m"] == "failed" and states["tolerant"] == "failed"
    assert {s for s, state in states.items() if state == "skipped"} == {
        "after1",
        "after2",
        "after3",
    }
    ran = {s for s, state in states.items() if state == "succeeded"}
    assert ran == {"a", "b", "c", "d", "k1", "k2", "k3", "k4", "k5", "x1", "x2", "x3", "x4",
                   "x5", "z"}  # fmt: skip
    order = (job.path / "artifacts" / "kept.txt").read_text().split()
    assert order.index("a") < order.index("b") < order.index("d")
    assert order.index("c") < order.index("d") < order.index("k1") < order.index("k5")
    log = job.log_path.read_text()
    assert "[m] spoold: step m failed: exit code 5" in log
    assert "spoold: step after1 skipped: a step it needs failed" in log
    assert "[tolerant] spoold: step tolerant failed: exit code 1 (continue_on_error)" in log


def test_twenty_steps_with_a_diamond_and_a_failure_in_the_middle(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    document = {"job_id": "dag", "executor": "local", "steps": twenty_steps()}
    check_twenty_steps(*parts.attempt(parts.submit(document)))


def test_a_retried_job_runs_only_the_steps_that_did_not_succeed(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    steps = [
        _step("once", "echo ran-once"),
        _step("flaky", 'test "$SPOOLD_ATTEMPT" -gt 1', "once"),
        _step("last", "echo last", "flaky"),
    ]
    document = {"job_id": "resume", "executor": "local", "steps": steps,
                "retries": 1, "backoff": "1s"}  # fmt: skip
    job, status = parts.attempt(parts.submit(document))
    assert job.directory == "pending" and status["steps"]["last"]["state"] == "skipped"
    parts.clock.advance(1)
    job, status = parts.attempt("resume")
    assert job.directory == "done", job.log_path.read_text()
    assert job.log_path.read_text().count("INFO [once] ran-once") == 1
    assert {s: r["state"] for s, r in status["steps"].items()} == dict.fromkeys(
        ("once", "flaky", "last"), "succeeded"
    )


def test_a_step_retries_on_its_own_and_has_its_own_timeout(tmp_path: Path) -> None:
    parts = Parts(tmp_path, clock=SystemClock())  # a timeout is measured on a real clock
    flaky = 'n=$(cat count 2>/dev/null || echo 0); echo $((n+1)) > count; test "$n" -ge 1'
    steps = [
        _step("flaky", flaky, retries=2, backoff="10ms"),
        _step("slow", "sleep 5", "flaky", timeout="300ms"),
    ]
    document = {"job_id": "own", "executor": "local", "steps": steps}
    _, status = parts.attempt(parts.submit(document))
    flaky_entry = status["steps"]["flaky"]
    assert {k: v for k, v in flaky_entry.items() if k not in ("usage", "usage_attempt")} | {
        "started_at": None, "finished_at": None
    } == {
        "state": "succeeded", "attempts": 2, "exit_code": 0, "error": None,
        "started_at": None, "finished_at": None, "continue_on_error": False,
        "executor": "local",
    }  # fmt: skip
    assert flaky_entry["usage_attempt"] == 1 and flaky_entry["usage"]["wall_seconds"] is not None
    assert status["steps"]["slow"]["state"] == "failed"
    assert "timed out after 300ms" in status["steps"]["slow"]["error"]


def test_a_steps_retries_back_off_as_its_backoff_says(tmp_path: Path) -> None:
    """Each wait between a step's tries grows by its multiplier, as a job's does."""
    parts = Parts(tmp_path, clock=SystemClock())  # a step's wait runs on the clock's monotonic
    backoff = {"initial": "10ms", "multiplier": 20}
    steps = [_step("flaky", "exit 75", retries=2, backoff=backoff)]
    job, status = parts.attempt(parts.submit({"job_id": "grows", "executor": "local",
                                              "steps": steps}))  # fmt: skip
    assert status["steps"]["flaky"]["attempts"] == 3
    log = job.log_path.read_text()
    waits = re.findall(r"step flaky failed \(.*?\); retrying in (\S+)", log)
    assert waits == ["10ms", "200ms"]


def test_a_job_that_writes_too_much_keeps_its_log_within_the_limit(tmp_path: Path) -> None:
    parts = Parts(tmp_path, max_log_size=8192)
    document = {"job_id": "chatty", "executor": "local",
                "product": {"commands": "i=0; while [ $i -lt 5000 ]; do echo line $i; i=$((i+1)); done"}}  # fmt: skip
    job, status = parts.attempt(parts.submit(document))
    assert status["state"] == "succeeded"
    log = job.log_path.read_text()
    assert len(log) < 8192 + 1024, "the limit, plus spoold's own closing lines"
    assert "the log reached its limit of 8192 bytes" in log
    kept = log.count(" INFO line ")
    assert f"{5000 - kept} line(s) of output were not kept (log limit)" in log


def test_a_secret_named_fields_literal_value_is_masked_in_spoolds_own_log_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A value written into the file (not a ${secret:...}) is known to the job's masker alone;
    the job's error may echo it, and spoold's own line about the job's end says the error."""

    class Echoing(Executor):
        """An API executor whose vendor's error page quotes the request's token."""

        name = "echoing"
        schema_resource = "local.schema.json"

        def execute(self, ctx: RunContext) -> ExecResult:
            raise ExecutorError(f"502 Bad gateway for {ctx.product['shell']}")

    registry = ExecutorRegistry({"echoing": Echoing})
    parts = Parts(tmp_path, registry=registry)
    document = {"job_id": "lit", "executor": "echoing", "variables": {"API_TOKEN": SECRET},
                "product": {"commands": "true", "shell": "${API_TOKEN}"}}  # fmt: skip
    with caplog.at_level(logging.INFO, logger=LOGGER.name):
        job, status = parts.attempt(parts.submit(document))
    assert job.directory == "failed", status
    said = "\n".join(record.getMessage() for record in caplog.records)
    assert "job lit failed" in said and "***" in said, said
    assert SECRET not in said


def test_a_job_whose_start_cannot_be_recorded_goes_back_to_pending_not_to_failed(
    tmp_path: Path,
) -> None:
    """Its supervisor cannot make units/1 (a full disk; here a file where units/ goes, which
    fails the same way, every time): nothing of the job ran, so it is tried again later,
    retries: 0 or not, as intake retries a file it could not take."""
    parts = Parts(tmp_path)
    runs = tmp_path / "runs"
    job_id = parts.submit({"job_id": "nospace", "executor": "local",
                           "product": {"commands": f"echo run >> {runs}"}})  # fmt: skip
    blocker = parts.spool.dir("pending") / job_id / "units"
    blocker.write_text("")
    job, status = parts.attempt(job_id)
    assert (job.directory, status["state"]) == ("pending", "pending"), status
    assert not runs.exists()
    assert status["next_attempt_at"] is not None
    assert "cannot record the start of the job" in status["attempts"][-1]["error"]
    assert "it did not start: tried again in 10s" in job.log_path.read_text()
    (Path(job.location) / "units").unlink()
    parts.clock.advance(10.0)
    job, status = parts.attempt(job_id)
    assert (job.directory, status["state"]) == ("done", "succeeded"), status
    assert runs.read_text() == "run\n"


def test_each_unit_knows_the_jobs_key_the_same_for_every_attempt_and_host(tmp_path: Path) -> None:
    """RunContext.job_key (what the ssh executor's remote units carry, so that a host that took
    a job over ends what another host left running of it) is the job's, not the attempt's,
    step's or host's: the status's identity, from its id and when it was accepted."""
    keys: list[tuple[str, str]] = []

    class Keyed(Executor):
        name = "keyed"
        schema_resource = "local.schema.json"

        def execute(self, ctx: RunContext) -> ExecResult:
            keys.append((ctx.unit_key, ctx.job_key))
            return ExecResult(exit_code=1 if ctx.unit_key.startswith("1.") else 0)

    parts = Parts(tmp_path, registry=ExecutorRegistry({"keyed": Keyed}))
    document = {"job_id": "key", "executor": "keyed", "retries": 1, "backoff": "1s",
                "steps": [{"id": "a", "product": {"commands": "true"}},
                          {"id": "b", "product": {"commands": "true"}}]}  # fmt: skip
    job_id = parts.submit(document)
    parts.attempt(job_id)
    parts.clock.advance(1.0)
    _, status = parts.attempt(job_id)
    assert status["state"] == "succeeded", status
    assert sorted(unit for unit, _ in keys) == ["1.a.1", "1.b.1", "2.a.1", "2.b.1"]
    expected = JobStatus.from_dict(status).identity
    assert {key for _, key in keys} == {expected} and len(expected) == 16
    other = JobStatus.from_dict({**status, "submitted_at": "2026-01-01T00:00:00Z"})
    assert other.identity != expected  # the same id in another spool, accepted another time


def test_a_steps_result_is_kept_in_its_entry(tmp_path: Path) -> None:
    """Seen: the plugin example's checksum step succeeded, yet neither status.json's result nor
    its step's entry held the digest its executor returned (README: `result` becomes
    status.json's `result`). A step's is its entry's; a later try without one leaves none."""
    tries: list[str] = []

    class Summing(Executor):
        name = "summing"
        schema_resource = "local.schema.json"

        def execute(self, ctx: RunContext) -> ExecResult:
            tries.append(ctx.unit_key)
            if ctx.unit_key.endswith("b.1"):
                return ExecResult(exit_code=1, result={"partial": True})
            return ExecResult(exit_code=0, result={"digest": f"d-{ctx.unit_key}"} if
                              "a" in ctx.unit_key else {})  # fmt: skip

    parts = Parts(tmp_path, registry=ExecutorRegistry({"summing": Summing}))
    document = {"job_id": "sums", "executor": "summing",
                "steps": [{"id": "a", "product": {"commands": "true"}},
                          {"id": "b", "retries": 1, "backoff": "1s",
                           "product": {"commands": "true"}}]}  # fmt: skip
    job_id = parts.submit(document)
    claimed = parts.runner.claim(job_id)
    assert claimed is not None
    import threading  # noqa: PLC0415

    done: list[Any] = []
    thread = threading.Thread(target=lambda: done.append(parts.runner.run(claimed)))
    thread.start()
    for _ in range(500):  # the step's retry waits on the fake clock
        if "1.b.2" in tries or not thread.is_alive():
            break
        parts.clock.advance(0.5)
        thread.join(0.01)
    thread.join(30)
    assert not thread.is_alive() and done
    status = parts.spool.jobs.read_status(done[0])
    assert status["state"] == "succeeded", status
    assert status["steps"]["a"]["result"] == {"digest": "d-1.a.1"}
    assert "result" not in status["steps"]["b"], status["steps"]["b"]  # its first try's is gone
