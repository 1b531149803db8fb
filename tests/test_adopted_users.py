"""A job adopted after a restart goes on as the user it ran as; a job that starts beside it runs
as another (SPEC 13: a job reaches no other job, and jobs outlive a daemon restart).

Found by reading the last round's closing note: the adopted job went to whichever worker slot
was free first, and the slot whose own user it runs as started the next job as that same
user, beside it (its environ, its signals, its work dir open to that job). Now the daemon
sends an adopted job to the worker process with its user's slot, which keeps that slot for it
from the start; a new job there runs as the user of a slot not kept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from spoold.core.clock import SystemClock
from spoold.core.config import Config
from spoold.run.lane import default_job_users, user_slots
from spoold.run.worker import WorkerPool
from tests.harness import StartDaemon, daemon_starter, drop, needs_root, wait_finished, wait_for
from tests.test_steps_round31 import BOUND, _held_step, _marks


def test_each_default_user_belongs_to_its_slot_and_a_shared_one_to_none() -> None:
    assert user_slots(Config(workers=3)) == dict(zip(default_job_users(3), "012", strict=True))
    assert user_slots(Config(workers=2, job_users=("deploy",))) == {}  # shared by both
    assert user_slots(Config(workers=3, job_users=("a", "b", "a"))) == {"b": "1"}


class _Runner:
    """A runner the pool never calls here: only its choice of users is under test."""


def test_a_worker_process_runs_a_new_job_as_a_user_no_adopted_job_runs_as() -> None:
    pool = WorkerPool(_Runner(), ("0", "2"), None, lambda job_id: None, SystemClock())  # type: ignore[arg-type]
    pool.submit("adopted", adopt=True, slot="0")
    assert pool._take_user("adopted", "2", adopt=True) == "0"  # in slot 2's thread, as 0's user
    assert pool._take_user("new", "0", adopt=False) == "2"  # slot 0's own is taken
    pool.submit("told", slot="2")  # beside a slot kept for an adoption: the daemon names it
    assert pool._take_user("told", "0", adopt=False) == "2"


@pytest.fixture
def start_daemon(spool_dir: Path, tmp_path: Path) -> Any:
    yield from daemon_starter(spool_dir, tmp_path / "config.yaml")


def _user_job(job_id: str, marks: Path) -> dict[str, Any]:
    """A job that writes who it runs as, then holds on until ``marks/go-<id>``."""
    held = _held_step(job_id, marks)["product"]["commands"]
    commands = f'id -un > "{marks}/{job_id}.user"; {held}'
    return {"job_id": job_id, "executor": "local", "product": {"commands": commands}}


def _user_of(marks: Path, job_id: str) -> str:
    found = marks / f"{job_id}.user"
    wait_for(lambda: found.exists() and found.read_text().strip(), bound=BOUND,
             what=f"{job_id} to say who it runs as")  # fmt: skip
    return found.read_text().strip()


def test_a_job_that_starts_beside_an_adopted_one_runs_as_another_user(
    spool_dir: Path, tmp_path: Path, start_daemon: StartDaemon
) -> None:
    needs_root()
    marks = _marks(tmp_path)
    settings = {"workers": 2, "worker_processes": 2}
    first = start_daemon(**settings)
    for job_id in ("a", "b"):
        drop(spool_dir, f"{job_id}.yaml", _user_job(job_id, marks))
    users = {job_id: _user_of(marks, job_id) for job_id in ("a", "b")}
    assert sorted(users.values()) == sorted(default_job_users(2)), users
    first.kill(leave_jobs=True)
    # The job of the first slot's user ends while no daemon runs; the second slot's runs on.
    ended = next(job_id for job_id, user in users.items() if user == default_job_users(2)[0])
    adopted = next(job_id for job_id in users if job_id != ended)
    (marks / f"go-{ended}").touch()
    wait_for((marks / f"{ended}.ended").exists, bound=BOUND, what=f"{ended} to end")
    second = start_daemon(**settings)
    lease = spool_dir / "running" / adopted / "lease"
    wait_for(lambda: json.loads(lease.read_text()).get("pid") == second.pid, bound=BOUND,
             what=f"{adopted} adopted")  # fmt: skip
    drop(spool_dir, "beside.yaml", _user_job("beside", marks))
    assert _user_of(marks, "beside") != users[adopted]  # not the adopted job's user
    for job_id in (adopted, "beside"):
        (marks / f"go-{job_id}").touch()
    for job_id in (ended, adopted, "beside"):
        assert wait_finished(spool_dir, job_id)[0] == "done"
