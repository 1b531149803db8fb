"""Each worker slot has a job user of its own by default (SPEC 13: a job reaches no other job);
a default account that is missing leaves its slot to the first's, said once at start."""

from __future__ import annotations

from pathlib import Path

import yaml

from spoold.core.config import Config, load_config
from spoold.run.lane import DEFAULT_JOB_USER, Lane, default_job_users, user_slots
from tests.harness import DaemonProcess, local_job, needs_root, run_cli, write_config
from tests.test_deb import user_exists


def _lane(tmp_path: Path, **overrides: object) -> Lane:
    spool = tmp_path / "spool"
    config = load_config(write_config(tmp_path / "c.yaml", spool, **overrides), env={})
    return Lane.from_config(config, lambda: tmp_path / "own-work", switching=True)


def test_the_default_names_one_account_per_slot() -> None:
    assert default_job_users(1) == ("spoold-job",)
    assert default_job_users(4) == ("spoold-job", "spoold-job2", "spoold-job3", "spoold-job4")


def test_without_job_user_each_slot_runs_as_its_own_account(tmp_path: Path) -> None:
    needs_root()
    first, second = default_job_users(2)
    assert user_exists(first) and user_exists(second), "make job-user makes both"
    lane = _lane(tmp_path, workers=2, workdir=str(tmp_path / "work"))
    assert (lane.job_user("0"), lane.job_user("1")) == (first, second)
    assert lane.notes == ()  # nothing shared: nothing to say


def test_a_missing_default_account_leaves_its_slot_to_the_first_and_says_so(
    tmp_path: Path,
) -> None:
    needs_root()
    workers = 40  # the accounts of slots 3 to 40 are nowhere
    missing = [name for name in default_job_users(workers) if not user_exists(name)]
    assert missing, "a machine with 40 job users: the test needs one missing"
    lane = _lane(tmp_path, workers=workers, workdir=str(tmp_path / "work"))
    slot = default_job_users(workers).index(missing[0])
    assert lane.job_user(str(slot)) == DEFAULT_JOB_USER
    assert lane.job_user("1") == "spoold-job2"  # present: its own
    (note,) = lane.notes
    assert missing[0] in note and "may reach each other" in note and "useradd" in note


def test_one_user_named_is_shared_by_every_slot_and_said(tmp_path: Path) -> None:
    needs_root()
    lane = _lane(tmp_path, workers=2, job_user="spoold-job", workdir=str(tmp_path / "work"))
    assert (lane.job_user("0"), lane.job_user("1")) == ("spoold-job", "spoold-job")
    (note,) = lane.notes
    assert "share the user(s) spoold-job" in note


def test_only_a_user_of_one_slot_alone_names_a_slot_for_an_adopted_job(tmp_path: Path) -> None:
    """``user_slots``: a job adopted as a user that no other slot shares gets that user's slot
    kept for it; a user shared by slots names none (jobs beside it run as that user anyway)."""
    config = Config(spool=tmp_path / "spool", workers=3, job_users=("a", "a", "b"))
    assert user_slots(config) == {"b": "2"}
    assert user_slots(Config(spool=tmp_path / "spool", workers=2, job_users=("a",))) == {}
    assert user_slots(Config(spool=tmp_path / "spool", workers=2)) == {
        DEFAULT_JOB_USER: "0",
        f"{DEFAULT_JOB_USER}2": "1",
    }


def test_exec_beside_a_daemon_says_whose_slot_user_its_job_shares(
    spool_dir: Path, tmp_path: Path
) -> None:
    """`spoold exec` runs its job as the user of one of the daemon's worker slots (there is
    no other): beside a running daemon, that slot's jobs and it may reach each other, and
    exec says so; without a daemon it says nothing of the kind."""
    needs_root()
    # No rescan of pending/ while exec runs: the daemon would race it for the claim.
    config = write_config(tmp_path / "config.yaml", spool_dir, rescan_interval="1h")
    files = []
    for job_id in ("beside", "alone"):
        files.append(tmp_path / f"{job_id}.yaml")
        files[-1].write_text(yaml.safe_dump(local_job(job_id, "true")))
    daemon = DaemonProcess(spool_dir, config)
    daemon.start()
    try:
        ran = run_cli(spool_dir, "exec", str(files[0]), "--config", str(config))
    finally:
        daemon.kill()
    assert ran.returncode == 0, ran.stderr
    said = f"a daemon runs on this spool (pid {daemon.pid}): job beside runs as spoold-job"
    assert said in ran.stderr, ran.stderr
    assert "`spoold submit` runs it in a slot of the daemon's own" in ran.stderr
    alone = run_cli(spool_dir, "exec", str(files[1]), "--config", str(config))
    assert alone.returncode == 0, alone.stderr
    assert "a daemon runs" not in alone.stderr
