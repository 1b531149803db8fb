"""kill -9 of the real daemon: every accepted job ends in exactly one place, none runs twice.

Each job's command first appends ``start <attempt>`` to its own marker file, carries a unique
token in its command line (so that its processes can be found in /proc), and last appends
``end <attempt>``. A marker file therefore tells how often the job's command began and whether
it ever completed.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml

from spoold.core.procfs import process_start_time
from tests.harness import (
    LAUNCHER,
    WORKER_PROCESS,
    DaemonProcess,
    daemon_children,
    drop,
    found_in,
    job_state,
    kill_processes_with,
    processes_with,
    tmp_leftovers,
    wait_finished,
    wait_for,
    wait_rejected,
    write_config,
)

pytestmark = pytest.mark.daemon

JOB_DIRS = ("pending", "running", "done", "failed")


@dataclass(frozen=True)
class Env:
    """Where the jobs of one test leave their traces, and the token in their command lines."""

    spool: Path
    marks: Path
    go: Path
    token: str

    def job(
        self, job_id: str, work: str = "", *, wait_go: bool = False, **fields: Any
    ) -> dict[str, Any]:
        lines = [
            f'echo "start $SPOOLD_ATTEMPT" >> "{self.marks}/$JOB_ID"',
            f": {self.token}-{job_id}",
            work,
        ]
        if wait_go:
            # Bounded, so that a test that fails cannot leave it behind for long.
            lines.append(
                f'i=0; while [ ! -e "{self.go}" ] && [ $i -lt 1200 ]; do sleep 0.05; '
                "i=$((i+1)); done"
            )
        lines.append(f'echo "end $SPOOLD_ATTEMPT" >> "{self.marks}/$JOB_ID"')
        command = "\n".join(line for line in lines if line)
        return {"job_id": job_id, "executor": "local", "product": {"commands": command}, **fields}

    def marks_of(self, job_id: str) -> list[str]:
        path = self.marks / job_id
        return path.read_text().splitlines() if path.exists() else []

    def lease(self, job_id: str) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(
                (self.spool / "running" / job_id / "lease").read_text()
            )
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return data

    def lease_with_process(self, job_id: str) -> dict[str, Any] | None:
        lease = self.lease(job_id)
        return lease if lease and lease.get("job_pid") else None


@pytest.fixture
def env(spool_dir: Path, tmp_path: Path) -> Iterator[Env]:
    marks = tmp_path / "marks"
    marks.mkdir()
    marks.chmod(0o1777)  # the jobs' user writes their marks
    environment = Env(spool_dir, marks, tmp_path / "go", f"spoold-chaos-{uuid.uuid4().hex}")
    yield environment
    (tmp_path / "go").touch()
    kill_processes_with(environment.token)


def assert_spool_drained(spool: Path) -> None:
    for directory in ("incoming", "pending", "running"):
        assert os.listdir(spool / directory) == [], directory
    leftovers = tmp_leftovers(spool)
    assert leftovers == [], f"left in tmp/: {leftovers}"


def test_kill_9_with_running_and_pending_jobs(env: Env, tmp_path: Path) -> None:
    spool = env.spool
    daemon = DaemonProcess(spool, write_config(tmp_path / "config.yaml", spool, workers=2))
    daemon.start()
    try:
        drop(spool, "run-fail.yaml", env.job("run-fail", wait_go=True))
        drop(
            spool, "run-requeue.yaml", env.job("run-requeue", wait_go=True, on_interrupt="requeue")
        )
        leases: dict[str, dict[str, Any]] = {}
        for job_id in ("run-fail", "run-requeue"):
            # Running for real: its command began, and its lease names its process group.
            wait_for(partial(env.marks_of, job_id), what=f"{job_id} to start")
            leases[job_id] = wait_for(
                partial(env.lease_with_process, job_id), what=f"{job_id}'s lease to name its pid"
            )
        pending = [f"pend-{n}" for n in range(3)]
        for job_id in pending:
            drop(spool, f"{job_id}.yaml", env.job(job_id, wait_go=True))
        for job_id in pending:
            wait_for(partial(found_in, spool, job_id), what=f"{job_id} to be accepted")
            assert found_in(spool, job_id) == ["pending"], "both workers are busy"

        daemon.kill(leave_jobs=True)
        # The jobs' processes outlive the daemon, under their supervisors: the next adopts them.
        assert processes_with(f"{env.token}-run-fail")
        for lease in leases.values():
            assert process_start_time(lease["job_pid"]) == lease["job_pid_start"]
        # Its worker processes do not outlive it (PR_SET_PDEATHSIG).
        for lease in leases.values():
            wait_for(
                partial(gone, lease["worker_pid"], lease["worker_pid_start"]),
                bound=10,
                what=f"worker process {lease['worker_pid']} to die with its daemon",
            )

        daemon.start()
        # Recovery runs before the daemon reports READY: both running jobs were adopted,
        # whatever their on_interrupt, and their processes go on.
        for job_id, lease in leases.items():
            assert found_in(spool, job_id) == ["running"], job_id
            assert process_start_time(lease["job_pid"]) == lease["job_pid_start"], job_id
        env.go.touch()
        final = {job_id: wait_finished(spool, job_id) for job_id in [*leases, *pending]}
        for job_id, (directory, status) in final.items():
            assert directory == "done", (job_id, status)
            assert found_in(spool, job_id) == ["done"]
        for job_id in leases:
            assert env.marks_of(job_id) == ["start 1", "end 1"], "ran once, to its end"
            assert [a["number"] for a in final[job_id][1]["attempts"]] == [1]
            assert "adopted" in (spool / "done" / job_id / "log").read_text()
        for job_id in pending:
            assert env.marks_of(job_id) == ["start 1", "end 1"]
            assert len(final[job_id][1]["attempts"]) == 1
        assert daemon.stop() == 0
        assert_spool_drained(spool)
        assert processes_with(env.token) == []
    finally:
        daemon.kill()


def gone(pid: int, start: int) -> bool:
    return process_start_time(pid) != start


def test_kill_9_of_a_worker_process(env: Env, tmp_path: Path) -> None:
    """The OOM killer takes one worker process: its job is recovered, a new one takes over."""
    spool = env.spool
    config = write_config(tmp_path / "config.yaml", spool, workers=2, worker_processes=2)
    daemon = DaemonProcess(spool, config)
    daemon.start()
    try:
        drop(spool, "victim.yaml", env.job("victim", wait_go=True))
        drop(spool, "survivor.yaml", env.job("survivor", wait_go=True, on_interrupt="requeue"))
        victim = wait_for(partial(env.lease_with_process, "victim"), what="victim's lease")
        survivor = wait_for(partial(env.lease_with_process, "survivor"), what="survivor's lease")
        assert victim["pid"] == survivor["pid"] == daemon.process.pid  # type: ignore[union-attr]
        assert victim["worker_pid"] != survivor["worker_pid"], "one job per worker process"

        os.kill(victim["worker_pid"], signal.SIGKILL)
        # Its job goes on under its supervisor; the replacement worker process adopts it.
        wait_for(lambda: "adopted" in (spool / "running" / "victim" / "log").read_text(),
                 what="the victim's job to be adopted")  # fmt: skip
        assert process_start_time(victim["job_pid"]) == victim["job_pid_start"]
        assert daemon.alive
        assert found_in(spool, "survivor") == ["running"], "the other worker process is untouched"

        drop(spool, "after.yaml", env.job("after", wait_go=True))
        env.go.touch()
        assert wait_finished(spool, "after")[0] == "done"
        assert wait_finished(spool, "survivor")[0] == "done"
        assert wait_finished(spool, "victim")[0] == "done"
        assert env.marks_of("survivor") == ["start 1", "end 1"]
        assert env.marks_of("victim") == ["start 1", "end 1"]
        assert "worker process 0" in daemon.log() or "worker process 1" in daemon.log()
        assert daemon.stop() == 0
        assert_spool_drained(spool)
    finally:
        daemon.kill()


def _at_rest(daemon: DaemonProcess) -> bool:
    """No worker process, and no launcher: the daemon alone."""
    return not daemon_children(daemon, WORKER_PROCESS) and not daemon_children(daemon, LAUNCHER)


def test_idle_worker_processes_leave_and_come_back(env: Env, tmp_path: Path) -> None:
    """A quiet daemon keeps no worker process and no launcher; jobs that come start them
    again, as many worker processes as jobs run at once, and they leave again once idle."""
    spool = env.spool
    config = write_config(tmp_path / "config.yaml", spool, workers=2, worker_processes=2,
                          worker_idle_exit="300ms")  # fmt: skip
    daemon = DaemonProcess(spool, config)
    daemon.start()
    try:
        wait_for(partial(_at_rest, daemon), what="the idle worker processes and launcher to end")
        drop(spool, "a.yaml", env.job("a", wait_go=True))
        drop(spool, "b.yaml", env.job("b", wait_go=True))
        a = wait_for(partial(env.lease_with_process, "a"), what="a's lease")
        # b may come to a's process first, held behind a: the second one takes it back.
        b = wait_for(partial(env.lease_with_process, "b"), what="b to run beside a")
        assert a["worker_pid"] != b["worker_pid"], "two jobs at once: two worker processes"
        assert set(daemon_children(daemon, WORKER_PROCESS)) == {a["worker_pid"], b["worker_pid"]}
        assert len(daemon_children(daemon, LAUNCHER)) == 1, "one launcher for both"
        env.go.touch()
        assert wait_finished(spool, "a")[0] == wait_finished(spool, "b")[0] == "done"
        wait_for(partial(_at_rest, daemon), what="the worker processes and launcher to end again")
        drop(spool, "c.yaml", env.job("c"))
        assert wait_finished(spool, "c")[0] == "done"
        assert env.marks_of("a") == env.marks_of("b") == env.marks_of("c") == ["start 1", "end 1"]
        assert daemon.alive and "ended with" not in daemon.log(), "leaving is not dying"
        assert daemon.stop() == 0
        assert_spool_drained(spool)
    finally:
        daemon.kill()


def test_jobs_that_come_as_idle_worker_processes_leave_each_run_once(
    env: Env, tmp_path: Path
) -> None:
    """Worker processes that stay a moment leave often, and jobs come just as one says it
    is leaving (the main process answers Stop, or the job keeps it), or just after it left (a
    new one starts): each job runs once, and no worker process dies. The arrivals are a
    seeded pattern around the stay; the race itself is the machine's, the check is not."""
    config = write_config(tmp_path / "config.yaml", env.spool, workers=2, worker_processes=2,
                          worker_idle_exit="40ms", log_level="debug")  # fmt: skip
    daemon = DaemonProcess(env.spool, config)
    daemon.start()
    try:
        gaps = random.Random(23)
        ids: list[str] = []
        # At least 60 jobs, and on until a few leaves came among them (a loaded machine
        # stretches each job): at most 200.
        while len(ids) < 60 or (daemon.log().count("stopping it") < 3 and len(ids) < 200):
            ids.append(job_id := f"r{len(ids):03d}")
            drop(env.spool, f"{job_id}.yaml", env.job(job_id))
            time.sleep(gaps.choice([0.0, 0.01, 0.03, 0.04, 0.05, 0.08, 0.12]))
        for job_id in ids:
            assert wait_finished(env.spool, job_id)[0] == "done", job_id
            assert env.marks_of(job_id) == ["start 1", "end 1"], job_id
        log = daemon.log()
        assert log.count("stopping it") >= 3, "worker processes left among the jobs"
        assert daemon.alive and "ended with" not in log, "leaving is not dying"
        assert daemon.stop() == 0
        assert_spool_drained(env.spool)
    finally:
        daemon.kill()


def test_worker_processes_stay_when_told_to(env: Env, tmp_path: Path) -> None:
    """``worker_idle_exit: 0``: the worker processes run as long as the daemon."""
    config = write_config(tmp_path / "config.yaml", env.spool, workers=2, worker_processes=2,
                          worker_idle_exit=0)  # fmt: skip
    daemon = DaemonProcess(env.spool, config)
    daemon.start()
    try:
        first = set(daemon_children(daemon, WORKER_PROCESS))
        assert len(first) == 2, "started before READY"
        drop(env.spool, "a.yaml", env.job("a"))
        assert wait_finished(env.spool, "a")[0] == "done"
        # Not a wait for luck: were 0 taken for "at once", they would be gone in milliseconds.
        time.sleep(1.5)
        assert set(daemon_children(daemon, WORKER_PROCESS)) == first
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def test_a_job_held_behind_a_long_one_moves_to_a_free_process(env: Env, tmp_path: Path) -> None:
    """A worker process holds one job beyond its slots; it gives it back when another frees up."""
    spool = env.spool
    config = write_config(tmp_path / "config.yaml", spool, workers=2, worker_processes=2)
    daemon = DaemonProcess(spool, config)
    daemon.start()

    def gated(job_id: str) -> dict[str, Any]:
        gate = tmp_path / f"go-{job_id}"
        wait = f'i=0; while [ ! -e "{gate}" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done'
        return env.job(job_id, wait)

    try:
        drop(spool, "long.yaml", gated("long"))
        long = wait_for(partial(env.lease_with_process, "long"), what="the long job to run")
        drop(spool, "short.yaml", gated("short"))
        short = wait_for(partial(env.lease_with_process, "short"), what="the short job to run")
        assert long["worker_pid"] != short["worker_pid"]
        # Both slots are busy: the next job waits, held by one of the two processes.
        drop(spool, "next.yaml", env.job("next"))
        wait_for(partial(found_in, spool, "next"), what="next to be accepted")
        assert found_in(spool, "next") == ["pending"]

        (tmp_path / "go-short").touch()
        # It runs now, in the process that freed a slot, while the long job still runs.
        assert wait_finished(spool, "next")[0] == "done"
        assert found_in(spool, "long") == ["running"]
        assert env.marks_of("next") == ["start 1", "end 1"]
        (tmp_path / "go-long").touch()
        assert wait_finished(spool, "long")[0] == "done"
        assert daemon.stop() == 0
        assert_spool_drained(spool)
    finally:
        (tmp_path / "go-long").touch()
        (tmp_path / "go-short").touch()
        daemon.kill()


@pytest.mark.slow
def test_kill_9_at_random_moments(env: Env, tmp_path: Path) -> None:
    seed = int(os.environ.get("SPOOLD_CHAOS_SEED") or random.randrange(2**32))
    print(f"chaos seed: {seed} (rerun with SPOOLD_CHAOS_SEED={seed})")
    rng = random.Random(seed)
    spool = env.spool
    daemon = DaemonProcess(spool, write_config(tmp_path / "config.yaml", spool, workers=2))
    valid: dict[str, str] = {}  # job id -> on_interrupt
    invalid: set[str] = set()
    counter = 0

    def drop_some(count: int) -> None:
        nonlocal counter
        for _ in range(count):
            counter += 1
            job_id = f"c{counter:03d}"
            kind = rng.choices(["quick", "sleep", "invalid"], weights=[5, 4, 1])[0]
            if kind == "invalid":
                invalid.add(f"{job_id}.yaml")
                drop(spool, f"{job_id}.yaml", f"job_id: {job_id}\nexecutor: [\n")
                continue
            policy = rng.choice(["fail", "requeue"])
            work = "true" if kind == "quick" else f"sleep {rng.choice([0.05, 0.1, 0.2, 0.3])}"
            drop(spool, f"{job_id}.yaml", env.job(job_id, work, on_interrupt=policy))
            valid[job_id] = policy

    try:
        for _ in range(12):
            if rng.random() < 0.4:
                drop_some(rng.randint(1, 2))  # arrives while the daemon is down
            daemon.start()
            drop_some(rng.randint(1, 4))
            # The moment of the crash is the point of this test, not a wait for an outcome.
            time.sleep(rng.uniform(0.0, 0.4))
            daemon.kill(leave_jobs=True)

        daemon.start()
        for job_id in valid:
            wait_finished(spool, job_id, bound=30)
        for name in invalid:
            wait_rejected(spool, name, bound=30)
        assert daemon.stop() == 0

        context = f"(seed {seed})"
        for job_id, policy in valid.items():
            places = found_in(spool, job_id)
            assert places in (["done"], ["failed"]), (job_id, places, context)
            status = json.loads((spool / places[0] / job_id / "status.json").read_text())
            marks = env.marks_of(job_id)
            if places == ["done"]:
                # Whatever the crashes, a job that began ran once, to its end: adopted by
                # the next daemon, never requeued or failed.
                assert status["state"] == "succeeded", (job_id, status, context)
                assert marks == [
                    f"start {len(status['attempts'])}",
                    f"end {len(status['attempts'])}",
                ], (
                    job_id,
                    marks,
                    status["attempts"],
                    context,
                )
            else:
                # Its command cannot fail: only a crash before it began (claimed, never leased)
                # can have ended it in failed/, and then it never ran.
                assert policy == "fail", (job_id, status, context)
                assert "interrupted" in (status["error"] or ""), (job_id, status, context)
                assert marks == [], (job_id, marks, context)
        assert set(os.listdir(spool / "rejected")) == invalid, context
        assert set(os.listdir(spool / "done")) | set(os.listdir(spool / "failed")) == set(valid)
        assert_spool_drained(spool)
        wait_for(lambda: not processes_with(env.token), bound=10, what="no job process left")
    finally:
        daemon.kill()


def test_a_job_process_no_lease_names_is_killed_by_recovery(env: Env, tmp_path: Path) -> None:
    """The crash state between spawning a job and writing its lease: a process, no lease.

    The lease cannot name the process before it exists; its environment names its job.
    """
    spool = env.spool
    job_dir = spool / "running" / "orphan"
    (job_dir / "artifacts").mkdir(parents=True)
    (job_dir / "job.yaml").write_text(yaml.safe_dump(env.job("orphan")))
    status = accepted_status("orphan", "orphan.yaml")
    attempt = {"number": 1, "started_at": "2026-01-01T00:00:01.000000Z", "finished_at": None,
               "exit_code": None, "error": None}  # fmt: skip
    status.update(state="running", started_at=attempt["started_at"], attempts=[attempt])
    (job_dir / "status.json").write_text(json.dumps(status))
    (job_dir / "log").write_text("2026-01-01T00:00:01.000000Z INFO spoold: attempt 1 started\n")
    # Its own session, as every job's: no process group of a daemon leads to it.
    orphan = subprocess.Popen(
        ["sh", "-c", f": {env.token}-orphan; sleep 60"],
        env={**os.environ, "SPOOLD_JOB_DIR": str(job_dir)},
        start_new_session=True,
    )
    try:
        config = write_config(tmp_path / "config.yaml", spool)  # lease_timeout: 3s
        daemon = DaemonProcess(spool, config)
        daemon.start()
        try:
            directory, final = wait_finished(spool, "orphan")
            assert directory == "failed" and "never leased" in final["error"], final
            assert orphan.wait(timeout=10) == -signal.SIGKILL
            # The shell and its sleep (if the shell forked): the environment is inherited.
            assert re.search(r"killed [12] leftover process\(es\) of job orphan", daemon.log())
        finally:
            daemon.kill()
    finally:
        orphan.kill()
        orphan.wait()


@pytest.mark.parametrize("policy", ["requeue", "fail"])
def test_recorded_outcome_survives_a_crash(env: Env, tmp_path: Path, policy: str) -> None:
    """The state kill -9 leaves between Spool.finish()'s status write and its rename."""
    spool = env.spool
    job_dir = spool / "running" / "recorded"
    (job_dir / "artifacts").mkdir(parents=True)
    (job_dir / "job.yaml").write_text(yaml.safe_dump(env.job("recorded", on_interrupt=policy)))
    (env.marks / "recorded").write_text("start 1\nend 1\n")
    status = accepted_status("recorded", "recorded.yaml")
    attempt = {
        "number": 1,
        "started_at": "2026-01-01T00:00:01.000000Z",
        "finished_at": "2026-01-01T00:00:02.000000Z",
        "exit_code": 0,
        "error": None,
    }
    status.update(
        state="succeeded",
        started_at=attempt["started_at"],
        finished_at=attempt["finished_at"],
        exit_code=0,
        attempts=[attempt],
        worker="gone-worker",
    )
    (job_dir / "status.json").write_text(json.dumps(status))
    (job_dir / "log").write_text(
        "2026-01-01T00:00:01.000000Z INFO spoold: attempt 1 started\n"
        "2026-01-01T00:00:02.000000Z INFO spoold: attempt 1 succeeded (exit code 0)\n"
    )
    # Its daemon is gone: a pid that has exited, on this host (so no waiting for a lease).
    lease = {
        "worker": "gone-worker",
        "host": socket.gethostname(),
        "pid": dead_pid(),
        "pid_start": 1,
        "claimed_at": attempt["started_at"],
        "heartbeat": attempt["finished_at"],
        "job_pid": None,
        "job_pid_start": None,
    }
    (job_dir / "lease").write_text(json.dumps(lease))

    daemon = DaemonProcess(spool, write_config(tmp_path / "config.yaml", spool))
    daemon.start()
    try:
        directory, final = wait_finished(spool, "recorded")
        assert env.marks_of("recorded") == ["start 1", "end 1"], "it ran again"
        assert (directory, final["state"]) == ("done", "succeeded"), final
        assert len(final["attempts"]) == 1
    finally:
        daemon.kill()


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


# -- crash states of intake, made by hand -----------------------------------------------------


def new_stage(spool: Path) -> Path:
    stage = spool / "tmp" / f"in-{uuid.uuid4().hex}"
    stage.mkdir()
    return stage


def accepted_status(job_id: str, source: str) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "state": "pending",
        "executor": "local",
        "type": None,
        "submitted_at": "2026-01-01T00:00:00.000000Z",
        "started_at": None,
        "finished_at": None,
        "exit_code": None,
        "error": None,
        "attempts": [],
        "steps": {},
        "artifacts": [],
        "worker": None,
        "source": source,
        "sha256": None,
        "schedule": None,
        "result": {},
    }


def test_intake_interrupted_at_each_step_is_finished_once(env: Env, tmp_path: Path) -> None:
    spool = env.spool
    texts = {
        job_id: yaml.safe_dump(env.job(job_id))
        for job_id in ("taken", "swapped", "accept-written", "accept-half")
    }
    # Taken: moved out of incoming/ into a stage, nothing else (Stages.take_incoming).
    stage = new_stage(spool)
    (stage / "taken.yaml").write_text(texts["taken"])

    # Taken, spoold's copy swapped in, the submitter's file still beside it under the copy's
    # temporary name; and a submitted file moved aside, not yet removed.
    stage = new_stage(spool)
    (stage / "swapped.yaml").write_text(texts["swapped"])
    (stage / ".spoold-copy").write_text(texts["swapped"])
    (spool / "tmp" / "spent-0123456789abcdef").write_text(texts["taken"])

    # Accepted but not yet renamed into pending/: everything written.
    stage = new_stage(spool)
    (stage / "status.json").write_text(json.dumps(accepted_status("accept-written", "aw.yaml")))
    (stage / "log").write_text("2026-01-01T00:00:00.000000Z INFO spoold: accepted aw.yaml\n")
    (stage / "artifacts").mkdir()
    (stage / "job.yaml").write_text(texts["accept-written"])

    # Accept half done: the file renamed to job.yaml and status written, the log not yet.
    stage = new_stage(spool)
    (stage / "job.yaml").write_text(texts["accept-half"])
    (stage / "status.json").write_text(json.dumps(accepted_status("accept-half", "ah.yaml")))

    # Reject nearly done: reason written and the file moved beside it, not yet in rejected/.
    broken = b"job_id: [\n"
    reason = {"file": "rj.yaml", "code": "invalid", "reason": "bad", "errors": [], "size": 10}
    stage = new_stage(spool)
    (stage / "reason.json").write_text(json.dumps(reason))
    (stage / "rj.yaml").write_bytes(broken)

    # Taken and found invalid, the reason not yet written: taken again, then rejected.
    stage = new_stage(spool)
    (stage / "rh.yaml").write_bytes(broken)

    # Stages made and nothing moved into them yet.
    new_stage(spool)
    new_stage(spool)

    daemon = DaemonProcess(spool, write_config(tmp_path / "config.yaml", spool))
    daemon.start()
    try:
        for job_id, text in texts.items():
            directory, status = wait_finished(spool, job_id)
            assert directory == "done", (job_id, status)
            assert found_in(spool, job_id) == ["done"]
            assert (spool / "done" / job_id / "job.yaml").read_text() == text
            assert env.marks_of(job_id) == ["start 1", "end 1"]
            assert len(status["attempts"]) == 1
        for name in ("rj.yaml", "rh.yaml"):
            assert wait_rejected(spool, name)["code"] == "invalid"
            assert (spool / "rejected" / name / name).read_bytes() == broken
        assert daemon.stop() == 0
        assert sorted(os.listdir(spool / "rejected")) == ["rh.yaml", "rj.yaml"]
        assert sorted(os.listdir(spool / "done")) == sorted(texts)
        assert os.listdir(spool / "failed") == []
        assert_spool_drained(spool)
    finally:
        daemon.kill()


def test_returned_file_whose_name_was_taken_meanwhile_still_runs(env: Env, tmp_path: Path) -> None:
    spool = env.spool
    stage = new_stage(spool)
    (stage / "same.yaml").write_text(yaml.safe_dump(env.job("from-stage")))
    # While spoold was down, a client dropped another file of the same name.
    drop(spool, "same.yaml", env.job("dropped-later"))
    daemon = DaemonProcess(spool, write_config(tmp_path / "config.yaml", spool))
    daemon.start()
    try:
        wait_finished(spool, "dropped-later")

        def handled() -> bool:
            return bool(job_state(spool, "from-stage") or os.listdir(spool / "rejected"))

        wait_for(handled, what="the returned file to be taken")
        assert os.listdir(spool / "rejected") == []
        directory, _ = wait_finished(spool, "from-stage")
        assert directory == "done"
    finally:
        daemon.kill()
