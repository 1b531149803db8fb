"""A restart within the limits, and adoptions that keep what they adopt.

1. What a killed daemon left running counts against the workers' slots, the executors' limits
   and the concurrency keys from the next start on: until it is adopted, ended or taken over,
   whether its old worker is gone at once or still looks alive for a while.
2. An adopted job keeps its job user and its work dir, whichever slot adopts it (``job_user``
   as a list: one user per slot).
3. ``concurrency`` without a ``key`` is refused, saying so.

The jobs wait on files the test writes (bounded), and say themselves whether they overlapped:
no assertion rests on how long anything took.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spoold.core.procfs import process_start_time
from spoold.intake.validation import job_validator
from spoold.run.dispatch import DispatchQueue, JobMeta
from spoold.run.lane import Lane
from spoold.run.process import RunAs
from spoold.run.registry import ExecutorRegistry
from tests.harness import (
    DaemonProcess,
    drop,
    job_log,
    job_state,
    local_job,
    wait_finished,
    wait_for,
    write_config,
)

# -- the dispatch queue, without processes ------------------------------------------------------


def _drain(queue: DispatchQueue) -> list[str]:
    taken = []
    while (job := queue.take()) is not None:
        taken.append(job[0])
    return taken


def test_an_adoption_goes_first_and_counts_against_its_key() -> None:
    queue = DispatchQueue()
    key = JobMeta(key="cg", limit=1)
    queue.add("cg4", JobMeta(priority=100, key="cg", limit=1))
    queue.add("cg3", key, "adopt", running=True)
    assert _drain(queue) == ["cg3"], "it runs already: cg4 waits for it, whatever its priority"
    queue.finished("cg3")
    assert _drain(queue) == ["cg4"]


def test_an_adoption_is_never_skipped_or_replaced() -> None:
    queue = DispatchQueue()
    queue.add("first", JobMeta(key="k", limit=1))
    assert queue.take() == ("first", None)
    for strategy in ("skip", "replace"):
        meta = JobMeta(key="k", limit=1, strategy=strategy)
        assert queue.add(f"adopted-{strategy}", meta, "adopt", running=True) == []
    assert _drain(queue) == ["adopted-skip", "adopted-replace"]


def test_a_held_claim_counts_until_adopted_or_let_go() -> None:
    queue = DispatchQueue({"local": 1})
    queue.hold("old", JobMeta(executor="local", key="k", limit=1))
    queue.add("same-key", JobMeta(executor="remote", key="k", limit=1))
    queue.add("same-executor", JobMeta(executor="local"))
    assert (queue.claims, _drain(queue)) == (1, []), "both wait for the claim"
    queue.add("old", JobMeta(executor="local", key="k", limit=1), "adopt", running=True)
    assert queue.claims == 0, "adopted: its claim is its count now, not a second one"
    assert _drain(queue) == ["old"]
    queue.finished("old")
    assert sorted(_drain(queue)) == ["same-executor", "same-key"]
    queue.finished("same-key")
    queue.hold("gone", JobMeta(key="k", limit=1))
    queue.add("later", JobMeta(key="k", limit=1))
    assert _drain(queue) == []
    assert queue.let_go("gone") and not queue.let_go("gone")
    assert _drain(queue) == ["later"]


def test_an_adoption_given_back_stays_counted_and_first() -> None:
    queue = DispatchQueue()
    queue.add("waiting", JobMeta(priority=5, key="k", limit=1))
    queue.add("adopted", JobMeta(key="k", limit=1), "adopt", running=True)
    assert queue.take() == ("adopted", "adopt")
    queue.give_back("adopted")
    assert "adopted" in queue and queue.take() == ("adopted", "adopt")
    assert queue.take() is None


def test_a_lost_job_stays_counted_until_adopted_or_let_go() -> None:
    """A job whose worker process died runs on under its supervisor: its key and its
    executor's limit stay taken (as a claim held) until it is adopted or let go, whether or
    not the pool's replacement adopts it before the next take."""
    queue = DispatchQueue({"local": 1})
    meta = JobMeta(executor="local", key="k", limit=1)
    queue.add("ran", meta)
    assert queue.take() == ("ran", None)
    queue.add("same-key", JobMeta(executor="remote", key="k", limit=1))
    queue.add("same-executor", JobMeta(executor="local"))
    queue.lost("ran")
    assert (queue.held_claims(), _drain(queue)) == (frozenset({"ran"}), []), "both wait for it"
    queue.add("ran", meta, "adopt", running=True)
    assert queue.claims == 0 and _drain(queue) == ["ran"]
    queue.lost("ran")  # its new worker process died too
    assert _drain(queue) == []
    assert queue.let_go("ran"), "it ended, or another host took it over"
    assert sorted(_drain(queue)) == ["same-executor", "same-key"]


def test_a_claim_queued_or_handed_out_already_is_not_held_a_second_time() -> None:
    """``hold`` for a job adopted already (queued, or handed out) counts nothing more: its
    end frees its limits in full."""
    queue = DispatchQueue({"local": 1})
    meta = JobMeta(executor="local", key="k", limit=1)
    queue.add("adopted", meta, "adopt", running=True)
    queue.hold("adopted", meta)  # queued: its count is its adoption's
    assert queue.take() == ("adopted", "adopt")
    queue.hold("adopted", meta)  # handed out
    assert queue.claims == 0
    queue.finished("adopted")
    queue.add("next", meta)
    assert _drain(queue) == ["next"], "the limits were counted twice"


def test_adoptions_given_back_go_back_first_in_their_old_order() -> None:
    queue = DispatchQueue()
    for job_id in ("a1", "a2", "a3"):
        queue.add(job_id, JobMeta(key=job_id), job_id, running=True)
    assert queue.take() == ("a1", "a1")
    queue.give_back("a1")
    assert _drain(queue) == ["a1", "a2", "a3"]


# -- a real daemon, killed and started again ----------------------------------------------------

#: How long a job waits for the test's word before it gives up (a ceiling, never reached).
_BOUND_TICKS = 1200  # of 0.05 s


def _held_job(job_id: str, marks: Path, **fields: Any) -> dict[str, Any]:
    """A job that says it started, waits until the test releases it, and says it ended."""
    script = (
        f"touch {marks}/{job_id}.started; i=0; "
        f"while [ ! -e {marks}/release ] && [ $i -lt {_BOUND_TICKS} ]; do sleep 0.05; "
        f"i=$((i+1)); done; touch {marks}/{job_id}.ended"
    )
    return local_job(job_id, script, **fields)


def _overlap_checker(job_id: str, marks: Path, *held: str, **fields: Any) -> dict[str, Any]:
    """A job that writes whether one of the ``held`` jobs had ended when it started."""
    ended = " || ".join(f"[ -e {marks}/{each}.ended ]" for each in held)
    script = (
        f"if {ended}; then echo after > {marks}/{job_id}; else echo overlap > {marks}/{job_id}; fi"
    )
    return local_job(job_id, script, **fields)


def _stand_in_for_its_worker(spool: Path, job_id: str, stand_in: int) -> None:
    """Make the lease name ``stand_in`` as its daemon and its worker process: the judge then
    finds its worker alive (as a killed daemon's worker process not yet gone looks)."""
    lease_path = spool / "running" / job_id / "lease"
    lease = json.loads(lease_path.read_text())
    start = process_start_time(stand_in)
    lease.update(pid=stand_in, pid_start=start, worker_pid=stand_in, worker_pid_start=start)
    lease_path.write_text(json.dumps(lease))


@pytest.fixture
def marks(tmp_path: Path) -> Path:
    made = tmp_path / "marks"
    made.mkdir()
    made.chmod(0o1777)  # the jobs' users write here
    return made


@pytest.fixture
def daemons(spool_dir: Path) -> Iterator[list[DaemonProcess]]:
    """Every daemon a test starts, killed after it with what it left running."""
    started: list[DaemonProcess] = []
    yield started
    for daemon in started:
        daemon.kill()


#: Per limit: the config, the held job's fields and the waiting job's.
_LIMITS: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "concurrency-key": (
        {"workers": 2},
        {"concurrency": {"key": "cg", "limit": 1}},
        {"concurrency": {"key": "cg", "limit": 1}, "priority": 100},
    ),
    "workers": ({"workers": 1}, {}, {"priority": 100}),
    "executor-limit": ({"workers": 2, "limits": {"executors": {"local": 1}}}, {}, {}),
}


@pytest.mark.daemon
@pytest.mark.parametrize("old_worker", ["gone", "still-alive"])
@pytest.mark.parametrize("limit", list(_LIMITS))
def test_a_restart_never_runs_more_than_the_limits_allow(
    spool_dir: Path,
    tmp_path: Path,
    marks: Path,
    daemons: list[DaemonProcess],
    limit: str,
    old_worker: str,
) -> None:
    config, held_fields, waiting_fields = _LIMITS[limit]
    daemon = DaemonProcess(spool_dir, write_config(tmp_path / "c.yaml", spool_dir, **config))
    daemons.append(daemon)
    daemon.start()
    drop(spool_dir, "held.yaml", _held_job("held", marks, **held_fields))
    wait_for((marks / "held.started").exists, what="the held job to start")
    drop(spool_dir, "waits.yaml", _overlap_checker("waits", marks, "held", **waiting_fields))
    wait_for(lambda: (job_state(spool_dir, "waits") or ("",))[0] == "pending", what="it waits")
    daemon.kill(leave_jobs=True)
    stand_in = None
    if old_worker == "still-alive":
        stand_in = subprocess.Popen(["sleep", "300"])
        _stand_in_for_its_worker(spool_dir, "held", stand_in.pid)
    try:
        daemon.start()
        if stand_in is not None:
            # A job arriving now goes out as the limits say, beside the one not adopted yet.
            assert job_state(spool_dir, "held") is not None
            stand_in.kill()
            stand_in.wait()
        wait_for(lambda: "adopted" in job_log(spool_dir, "held"), what="the held job's adoption")
    finally:
        if stand_in is not None and stand_in.poll() is None:
            stand_in.kill()
            stand_in.wait()
    (marks / "release").touch()
    held_dir, held_status = wait_finished(spool_dir, "held")
    assert (held_dir, len(held_status["attempts"])) == ("done", 1), "adopted, the same attempt"
    assert wait_finished(spool_dir, "waits")[0] == "done"
    assert (marks / "waits").read_text().strip() == "after", (
        f"the waiting job ran beside the held one past the {limit} limit"
    )


@pytest.mark.daemon
def test_a_restart_keeps_a_worker_slot_for_a_claim_not_adopted_yet(
    spool_dir: Path, tmp_path: Path, marks: Path, daemons: list[DaemonProcess]
) -> None:
    """workers: 2, one held by a claim whose old worker looks alive: of two jobs that come
    after the restart, one runs, the other waits for the claim's slot."""
    daemon = DaemonProcess(spool_dir, write_config(tmp_path / "c.yaml", spool_dir, workers=2))
    daemons.append(daemon)
    daemon.start()
    drop(spool_dir, "held.yaml", _held_job("held", marks))
    wait_for((marks / "held.started").exists, what="the held job to start")
    daemon.kill(leave_jobs=True)
    with subprocess.Popen(["sleep", "300"]) as stand_in:
        try:
            _stand_in_for_its_worker(spool_dir, "held", stand_in.pid)
            daemon.start()
            drop(spool_dir, "first.yaml", _held_job("first", marks))
            wait_for((marks / "first.started").exists, what="the first job to start")
            drop(spool_dir, "second.yaml", _overlap_checker("second", marks, "first", "held"))
            wait_for(lambda: "accepted second.yaml" in daemon.log(), what="second accepted")
        finally:
            stand_in.kill()
    wait_for(lambda: "adopted" in job_log(spool_dir, "held"), what="the held job's adoption")
    (marks / "release").touch()
    for job_id in ("held", "first", "second"):
        assert wait_finished(spool_dir, job_id)[0] == "done", job_id
    assert (marks / "second").read_text().strip() == "after", "three ran on two workers"


@pytest.mark.daemon
def test_an_adopted_job_keeps_its_job_user_and_work_dir_whichever_slot_adopts_it(
    spool_dir: Path, tmp_path: Path, marks: Path, daemons: list[DaemonProcess]
) -> None:
    config = write_config(
        tmp_path / "c.yaml", spool_dir, workers=2, job_user=["spoold-job", "nobody"]
    )
    daemon = DaemonProcess(spool_dir, config)
    daemons.append(daemon)
    daemon.start()
    # The first slot busy, so that the stepped job runs in the second (as nobody); then free
    # again, so that the next daemon's first slot adopts it.
    (marks / "busy").mkdir()
    (marks / "busy").chmod(0o1777)
    drop(spool_dir, "busy.yaml", _held_job("busy", marks / "busy"))
    wait_for((marks / "busy" / "busy.started").exists, what="the first slot busy")
    says = f"echo $(id -un) $(pwd) >> {marks}/u7"
    step_a = f"{says}; {_held_job('a', marks)['product']['commands']}"
    stepped = {
        "job_id": "u7",
        "executor": "local",
        "steps": [
            {"id": "a", "product": {"commands": step_a}},
            {"id": "c", "needs": ["a"], "product": {"commands": says}},
        ],
    }
    drop(spool_dir, "u7.yaml", stepped)
    wait_for((marks / "a.started").exists, what="step a to start")
    (marks / "busy" / "release").touch()
    assert wait_finished(spool_dir, "busy")[0] == "done"
    daemon.kill(leave_jobs=True)
    daemon.start()
    wait_for(lambda: "adopted" in job_log(spool_dir, "u7"), what="u7's adoption")
    (marks / "release").touch()
    where, status = wait_finished(spool_dir, "u7")
    log = job_log(spool_dir, "u7")
    assert (where, len(status["attempts"])) == ("done", 1), log
    assert "is not this job's work dir" not in log
    assert (marks / "a.ended").exists(), "step a went on to its end: not killed"
    first, then = (marks / "u7").read_text().split("\n")[:2]
    assert first == then, "step c ran as the user and in the work dir step a did"
    assert {step: value["state"] for step, value in status["steps"].items()} == {
        "a": "succeeded",
        "c": "succeeded",
    }


def test_the_lane_names_a_slots_job_user_and_finds_it_again(tmp_path: Path) -> None:
    users = (RunAs.lookup("spoold-job"), RunAs.lookup("nobody"))
    lane = Lane(users, tmp_path, switching=True, notes=())
    assert [lane.job_user(slot) for slot in ("0", "1", "2")] == [
        "spoold-job",
        "nobody",
        "spoold-job",
    ]
    assert lane.user_named("nobody", None) == users[1], "whichever slot asks"
    assert lane.user_named(None, None) is None, "spoold's own user, as recorded"
    assert lane.user_named("nobody", "spoold-job") == users[0], "run_as still wins"
    # A slot's user is the one looked up at start, not looked up again for every job; one
    # recorded by an earlier daemon that is no slot's now is looked up.
    looked: list[str] = []
    real = RunAs.lookup

    def lookup(name: str) -> RunAs:
        looked.append(name)
        return real(name)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RunAs, "lookup", lookup)
        assert lane.user_named("nobody", None) is users[1]
        assert lane.user_named("spoold-job2", None) == real("spoold-job2")
    assert looked == ["spoold-job2"]
    workdir = tmp_path / "u7.1.abc"
    workdir.mkdir()
    assert lane.job_user_of(workdir) is None, "root's: no job user's"
    os.chown(workdir, users[1].uid, users[1].gid)
    assert lane.job_user_of(workdir) == "nobody", "an older lease's job: its work dir says"
    assert lane.job_user_of(tmp_path / "gone") is None


# -- validation --------------------------------------------------------------------------------


def test_concurrency_without_a_key_is_refused_saying_so() -> None:
    validator = job_validator(ExecutorRegistry.from_entry_points())
    text = b"executor: local\nproduct: {commands: x}\nconcurrency: {limit: 1}\n"
    [issue] = validator.check(text, "job.yaml")
    assert (issue.message, issue.path) == ("missing required field 'key'", "concurrency")
    keyed = b"executor: local\nproduct: {commands: x}\nconcurrency: {key: k, limit: 1}\n"
    assert validator.check(keyed, "job.yaml") == []


@pytest.mark.daemon
def test_a_worker_process_that_dies_leaves_its_jobs_counted_until_adopted(
    spool_dir: Path, tmp_path: Path, marks: Path, daemons: list[DaemonProcess]
) -> None:
    """Its replacement starts nothing that the job it ran, going on without it, keeps from
    starting: the job counts against its key until adopted again."""
    key = {"concurrency": {"key": "cg", "limit": 1}}
    daemon = DaemonProcess(spool_dir, write_config(tmp_path / "c.yaml", spool_dir, workers=2))
    daemons.append(daemon)
    daemon.start()
    drop(spool_dir, "held.yaml", _held_job("held", marks, **key))
    wait_for((marks / "held.started").exists, what="the held job to start")
    drop(spool_dir, "waits.yaml", _overlap_checker("waits", marks, "held", priority=100, **key))
    wait_for(lambda: (job_state(spool_dir, "waits") or ("",))[0] == "pending", what="it waits")
    lease = json.loads((spool_dir / "running" / "held" / "lease").read_text())
    os.kill(lease["worker_pid"], signal.SIGKILL)
    wait_for(lambda: "starting a new one" in daemon.log(), what="the worker process replaced")
    wait_for(lambda: "adopted" in job_log(spool_dir, "held"), what="the held job's adoption")
    (marks / "release").touch()
    assert wait_finished(spool_dir, "held")[0] == "done"
    assert wait_finished(spool_dir, "waits")[0] == "done"
    assert (marks / "waits").read_text().strip() == "after", "it ran beside the held job"
