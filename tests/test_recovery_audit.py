"""Crash safety and recovery, in-process: what the tests of the daemon (slow, by kill -9) did not
pin down, found by breaking the code on purpose (a mutation audit).

- a worker's pid that names another process now is a worker that is gone: not kept waiting
  for, not killed;
- a unit its supervisor recorded as cut short (a system shutdown) leaves the job to its
  ``on_interrupt``; one it recorded as ended is not run again;
- the beat a supervisor keeps while no daemon renews the lease keeps another host's hands off;
- what each transition fsyncs, and in which order (README "What is fsynced");
- a fence made while a finish writes stops the move;
- an adopted unit of an executor without a supervisor is never run twice;
- a claim fenced while its unit runs here in the worker process ends that unit.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from spoold.executors.base import ExecResult, Executor, RunContext

from spoold.core.clock import SystemClock, rfc3339
from spoold.core.config import Config
from spoold.core.errors import JobFenced, SpoolError
from spoold.core.job import JobStatus
from spoold.core.procfs import process_start_time
from spoold.core.secrets import SecretStore
from spoold.core.spool import JobDir, Spool
from spoold.core.spool import fs as fs_module
from spoold.core.spool import jobs as jobs_module
from spoold.core.spool.fs import fsync_path, rename_noreplace
from spoold.core.states import JobState
from spoold.intake.incoming import Accepted, Intake
from spoold.intake.validation import job_validator
from spoold.out.outbox import Callbacks
from spoold.run.control import JobControl
from spoold.run.recovery import Recovery
from spoold.run.registry import ExecutorRegistry
from spoold.run.worker import JobRunner
from tests.fakes import FakeClock
from tests.harness import intake_for

LOG = logging.getLogger("spoold.test")
LEASE_TIMEOUT = 10.0
#: A ceiling for what happens at once on clean code (a thread's reaction), not a measurement.
BOUND = 10.0


def _spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.init()
    return spool


def _config(spool: Spool, **settings: Any) -> Config:
    settings.setdefault("lease_timeout", LEASE_TIMEOUT)
    return Config(spool=spool.root, hostname="here", worker_id="w1", kill_grace=0.5, **settings)


def _accept(
    spool: Spool, document: dict[str, Any], registry: ExecutorRegistry | None = None
) -> str:
    registry = registry or ExecutorRegistry.from_entry_points()
    intake = Intake(spool, job_validator(registry), SystemClock(), max_file_size=1 << 20,
                    settle_time=0, on_accepted=lambda job, document: None, logger=LOG)  # fmt: skip
    (spool.dir("incoming") / "j.yaml").write_text(yaml.safe_dump(document))
    outcome = intake.offer("j.yaml", complete=True)
    assert isinstance(outcome, Accepted), outcome
    return outcome.job.job_id


def _running(spool: Spool, job_id: str, lease: dict[str, Any]) -> JobDir:
    """``job_id`` claimed, its first attempt begun, ``lease`` its claim: as a worker leaves it
    when it dies."""
    job = spool.jobs.claim(job_id)
    assert job is not None
    spool.jobs.write_lease(job, lease)
    status = JobStatus.from_dict(spool.jobs.read_status(job))
    status.begin_attempt(SystemClock().now(), str(lease.get("worker", "old")))
    spool.jobs.write_status(job, status.to_dict())
    return job


def _local(job_id: str, on_interrupt: str = "fail") -> dict[str, Any]:
    return {"job_id": job_id, "executor": "local", "on_interrupt": on_interrupt,
            "product": {"commands": "true"}}  # fmt: skip


@pytest.fixture(name="sleeper")
def _sleeper() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        yield process
    finally:
        process.kill()
        process.wait()


# -- a worker judged by the process table: a pid and its start time ---------------------------


def test_a_daemon_pid_that_names_another_process_now_is_a_worker_that_is_gone(
    tmp_path: Path,
) -> None:
    """README: a worker is gone when "the daemon's or the worker process's pid is not alive
    with the same start time". Judged by the pid alone, a reused pid (here: this test's own
    process, started at another time than the lease says) would keep the job in running/
    for as long as that other process lives."""
    spool = _spool(tmp_path)
    me = os.getpid()
    start = process_start_time(me)
    assert start is not None
    lease = {"worker": "old", "host": "here", "pid": me, "pid_start": start + 1}
    _running(spool, _accept(spool, _local("reused")), lease)
    (moved,) = Recovery(spool, _config(spool), SystemClock(), LOG).reap()
    assert (moved.job_id, moved.directory) == ("reused", "failed")
    assert spool.jobs.read_status(moved)["error"].startswith("interrupted: worker old")


def test_a_worker_pid_that_names_another_process_now_is_never_killed(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    """Recovery kills a dead daemon's worker process before the job moves on; a pid the lease
    names that is another process now (its start differs) is someone else's: left alone."""
    spool = _spool(tmp_path)
    start = process_start_time(sleeper.pid)
    assert start is not None
    lease = {"worker": "old", "host": "here", "pid": 999_999, "pid_start": 1,
             "worker_pid": sleeper.pid, "worker_pid_start": start + 1}  # fmt: skip
    _running(spool, _accept(spool, _local("other")), lease)
    (moved,) = Recovery(spool, _config(spool), SystemClock(), LOG).reap()
    assert moved.directory == "failed"
    assert sleeper.poll() is None, "an unrelated process that reuses the pid was killed"


# -- what a supervisor recorded of a unit's end ------------------------------------------------


@pytest.mark.parametrize(
    ("end", "directory", "said"),
    [
        # A system shutdown stopped the supervisor: its end is no end of the command.
        ({"exit_code": -15, "interrupted": True}, "pending", "requeued (on_interrupt: requeue)"),
        # Its command ran to its end: requeued, it would run twice.
        ({"exit_code": 0, "interrupted": False}, "failed", "its command had ended (exit code 0)"),
    ],
    ids=["cut-short", "ended"],
)
def test_a_units_recorded_end_decides_whether_on_interrupt_does(
    tmp_path: Path, end: dict[str, Any], directory: str, said: str
) -> None:
    """README (Jobs outlive the daemon): at a system shutdown each supervisor ends its job and
    "records it as interrupted; at the next start the job's on_interrupt decides"; a command
    that had ended is not run again, requeue or not."""
    spool = _spool(tmp_path)
    lease = {"worker": "old", "host": "here", "pid": 999_999, "pid_start": 1}
    job = _running(spool, _accept(spool, _local("unit", on_interrupt="requeue")), lease)
    assert spool.jobs.begin_unit(job, "1", {"pid": 999_998})
    spool.jobs.end_unit(job, "1", end)
    (moved,) = Recovery(spool, _config(spool), SystemClock(), LOG).reap()
    assert moved.directory == directory
    assert said in moved.log_path.read_text()


# -- another host's claim, kept by its supervisor ----------------------------------------------


def test_a_claim_whose_supervisor_keeps_its_beat_is_not_taken_over(tmp_path: Path) -> None:
    """A host whose daemon was killed (no word of a stop) leaves its job running under its
    supervisor, which moves the claim's beat itself (``kept.<generation>.<beat>``) while no
    worker renews the lease: another host must not take over a job that still runs there (it
    would run twice); once that beat stands still too, it does."""
    spool, clock = _spool(tmp_path), FakeClock()
    lease = {"worker": "a-1", "host": "a", "generation": 1, "beat": 7, "pid": 1}
    job = _running(spool, _accept(spool, _local("kept", on_interrupt="requeue")), lease)
    job = job._replace(generation=1)
    judge = Recovery(spool, Config(spool=spool.root, runner_id="b", lease_timeout=LEASE_TIMEOUT),
                     clock, LOG)  # fmt: skip
    assert judge.reap() == []
    for beat in range(1, 5):  # the lease stands still for 36 s; the supervisor's beat moves
        spool.jobs.keep_claim(job, beat)
        clock.advance(LEASE_TIMEOUT - 1)
        assert judge.reap() == [], f"taken over while its supervisor keeps it (beat {beat})"
    clock.advance(1.0)
    assert judge.reap() == [], "the beat last moved 1 s ago (by this host's look)"
    clock.advance(LEASE_TIMEOUT)
    (moved,) = judge.reap()
    assert moved.directory == "pending"


def test_another_hosts_stale_claim_on_this_machine_is_taken_over_never_adopted(
    tmp_path: Path,
) -> None:
    """Adoption is for this host's own jobs (README: "if it began on this host since this
    boot, it is adopted"). Another host id's lease written on this machine (two host ids on
    one machine, or a lease of an older spoold, which names no machine) is that host's claim:
    once stale it is fenced and taken over, never taken on unfenced as if it were ours (its
    old owner, waking, would go on writing for it beside this host's run)."""
    spool, clock = _spool(tmp_path), FakeClock()
    lease = {"worker": "a-1", "host": "a", "generation": 1, "beat": 3, "pid": 1}
    _running(spool, _accept(spool, _local("theirs", on_interrupt="requeue")), lease)
    judge = Recovery(spool, Config(spool=spool.root, runner_id="b", lease_timeout=LEASE_TIMEOUT),
                     clock, LOG)  # fmt: skip
    handed: list[str] = []

    def adopter(job: JobDir, lease: dict[str, Any], status: dict[str, Any]) -> bool:
        handed.append(job.job_id)
        return True

    judge.adopter = adopter
    assert judge.reap() == []
    clock.advance(LEASE_TIMEOUT)
    (moved,) = judge.reap()
    assert handed == [], "another host's claim was adopted as this host's own"
    assert moved.directory == "pending"
    assert (Path(moved.location) / "fenced.1").exists()


# -- what each transition fsyncs, in order ------------------------------------------------------


class Disk:
    """Each fsync and each rename of the job stores, in order, named by what they are."""

    def __init__(self, spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
        self.steps: list[str] = []
        self._spool = spool
        real_fsync, real_rename = os.fsync, rename_noreplace

        def fsync(fd: int) -> None:
            self.steps.append(f"sync {self._name(os.readlink(f'/proc/self/fd/{fd}'))}")
            real_fsync(fd)

        def rename(source: str | Path, target: str | Path) -> None:
            self.steps.append(f"rename {self._name(source)} -> {self._name(target)}")
            real_rename(source, target)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(jobs_module, "rename_noreplace", rename)

    def _name(self, path: str | Path) -> str:
        """A job's file by its own name (a status.json written aside counts as status.json),
        a job directory as ``<state>/<id>``, one of the tree's directories as ``<name>/``."""
        relative = Path(os.path.realpath(path)).relative_to(os.path.realpath(self._spool.root))
        parts = relative.parts
        if len(parts) == 1:
            return f"{parts[0]}/"
        if len(parts) == 2:
            return f"{parts[0]}/{parts[1]}"
        return "status.json" if "status.json" in parts[-1] else parts[-1]


def test_a_claim_syncs_running_after_its_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: the claim fsyncs running/ "before any process of the job starts, so that after
    a power loss a job that may have run is never found in pending/ again"."""
    spool = _spool(tmp_path)
    job_id = _accept(spool, _local("c"))
    disk = Disk(spool, monkeypatch)
    assert spool.jobs.claim(job_id) is not None
    assert disk.steps == ["rename pending/c -> running/c", "sync running/"]


def test_a_finish_syncs_status_and_log_then_moves_then_syncs_where_it_went(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: finish: "status.json and log, then done/ or failed/". A status not synced before
    the rename may come back empty after a power loss, in done/: an outcome lost."""
    spool = _spool(tmp_path)
    job = spool.jobs.claim(_accept(spool, _local("f")))
    assert job is not None
    disk = Disk(spool, monkeypatch)
    spool.jobs.finish(job, JobState.FAILED, {"job_id": "f", "state": "failed"})
    assert disk.steps == [
        "sync status.json", "sync log", "rename running/f -> failed/f", "sync failed/",
    ]  # fmt: skip


def test_a_requeue_moves_syncs_pending_then_writes_its_status_durably(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """jobs.py: requeue: "rename into pending/, fsync pending/, then the new status written
    durably" (``spoold retry``)."""
    spool = _spool(tmp_path)
    job = spool.jobs.claim(_accept(spool, _local("r")))
    assert job is not None
    failed = spool.jobs.finish(job, JobState.FAILED, {"job_id": "r", "state": "failed"})
    disk = Disk(spool, monkeypatch)
    spool.jobs.requeue(failed, {"job_id": "r", "state": "pending"})
    assert disk.steps == ["rename failed/r -> pending/r", "sync pending/", "sync status.json"]


def test_a_pending_status_rebuilt_after_a_power_loss_is_written_durably(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The status.json intake writes is not fsynced; one found lost is rebuilt, and the rebuilt
    one is fsynced: a second power loss must not lose it again."""
    spool = _spool(tmp_path)
    job_id = _accept(spool, _local("p"))
    (spool.dir("pending") / job_id / "status.json").write_bytes(b"")
    disk = Disk(spool, monkeypatch)
    assert Recovery(spool, _config(spool), SystemClock(), LOG).repair_pending() == ["p"]
    assert disk.steps == ["sync status.json"]


class PowerCut:
    """What a power loss keeps of the files in a spool: a file's content only as it was at its
    last fsync (or a syncfs since which it was not written), else nothing: a file whose
    content never reached the disk comes back empty. Names (renames, new entries) are kept: a
    test undoes by hand one it means to lose."""

    def __init__(self, spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
        self._spool = spool
        #: (device, inode) -> (size, mtime) of a file when it was last made durable
        self._durable: dict[tuple[int, int], tuple[int, int]] = {}
        real_fsync, real_syncfs = os.fsync, fs_module.syncfs_path

        def fsync(fd: int) -> None:
            real_fsync(fd)
            self._keep(os.fstat(fd))

        def syncfs(path: str | Path) -> None:
            real_syncfs(path)
            for directory, _, files in os.walk(spool.root):
                for name in files:
                    self._keep(os.lstat(os.path.join(directory, name)))

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(fs_module, "syncfs_path", syncfs)

    def _keep(self, st: os.stat_result) -> None:
        self._durable[st.st_dev, st.st_ino] = (st.st_size, st.st_mtime_ns)

    def cut(self, *directories: str) -> list[str]:
        """Empty each file in these directories of the spool whose content is not durable;
        the paths emptied, relative to the spool."""
        lost = []
        for top in directories:
            for directory, _, files in os.walk(self._spool.dir(top)):
                for name in files:
                    path = os.path.join(directory, name)
                    st = os.lstat(path)
                    if self._durable.get((st.st_dev, st.st_ino)) != (st.st_size, st.st_mtime_ns):
                        os.truncate(path, 0)
                        lost.append(os.path.relpath(path, self._spool.root))
        return sorted(lost)


@pytest.mark.parametrize("committed", [False, True], ids=["commit-lost", "commit-kept"])
@pytest.mark.parametrize("together", [False, True], ids=["alone", "together"])
def test_a_power_loss_after_accept_keeps_the_accepted_callback_and_its_sequence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, together: bool, committed: bool
) -> None:
    """README (Callbacks): the backend hears what became of its job "even if it was down",
    nothing is lost, in order by ``sequence``; SPEC 1: the files written before a transition
    are fsynced. A power cut just after intake placed a job (pending/ fsynced, its prepared
    ``accepted`` fsynced, the commit's rename in outbox/ not yet) keeps the job and the
    delivery: its status.json, which names the change (``callback_delivery``), must be kept
    too. Lost, recovery dropped the ``accepted`` of a job that exists (its status no longer
    named it) and rebuilt the status at sequence 0; or, the commit kept, the job's next event
    took sequence 1 again and replaced the ``accepted`` before it was sent. Alone (intake's
    ``_place``, as a schedule's firing) and in a group (``_place_together``: one syncfs)."""
    spool, clock = _spool(tmp_path), FakeClock()
    callbacks = Callbacks(spool, clock, SecretStore(None), logger=LOG,
                          default_url="http://127.0.0.1:9/hook", default_secret="s")  # fmt: skip
    intake = intake_for(spool, clock, callbacks=callbacks)
    ids = ["a", "b", "c"] if together else ["a"]
    for job_id in ids:
        (spool.dir("incoming") / f"{job_id}.yaml").write_text(yaml.safe_dump(_local(job_id)))
    power = PowerCut(spool, monkeypatch)
    outcomes = intake.offer_all([f"{job_id}.yaml" for job_id in ids], complete=True)
    assert all(isinstance(outcome, Accepted) for outcome in outcomes), outcomes
    outbox = spool.dir("outbox")
    if not committed:  # outbox/ is not fsynced after a commit: its rename may be lost
        for job_id in ids:
            os.rename(outbox / f"{job_id}~00000001.json", outbox / f"{job_id}~00000001.prepared")
    lost = power.cut("pending", "outbox")
    assert not [path for path in lost if path.startswith("outbox/")], lost
    # The next start, as the daemon's ``recover``; then each job's next change.
    callbacks.settle_all()
    spool.stages.recover()
    Recovery(spool, _config(spool), clock, LOG).repair_pending()
    control = JobControl(spool, clock, who="tester", callbacks=callbacks)
    for job_id in ids:
        assert control.cancel(job_id).cancelled
    records = [spool.deliveries.read(name) or {} for name in sorted(os.listdir(outbox))]
    sent = [(record.get("key"), record.get("sequence"), record.get("event")) for record in records]
    expected = [(job_id, 1, "accepted") for job_id in ids]
    expected += [(job_id, 2, "cancelled") for job_id in ids]
    assert sorted(sent) == sorted(expected), f"lost to the power cut: {lost}"


@pytest.mark.parametrize("delivered", [False, True], ids=["no-callback", "callback"])
def test_accept_fsyncs_a_jobs_status_only_where_it_names_a_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, delivered: bool
) -> None:
    """stages.py (accept): a status that names the job's ``accepted`` change is fsynced with
    job.yaml, before the stage is renamed into pending/ (the test above: what is lost else);
    one that names none is rebuilt after a power loss (``repair_pending``): no fsync for it."""
    spool, clock = _spool(tmp_path), FakeClock()
    callbacks = Callbacks(spool, clock, SecretStore(None), logger=LOG,
                          default_url="http://127.0.0.1:9/hook", default_secret="s")  # fmt: skip
    intake = intake_for(spool, clock, callbacks=callbacks if delivered else None)
    (spool.dir("incoming") / "a.yaml").write_text(yaml.safe_dump(_local("a")))
    disk = Disk(spool, monkeypatch)
    assert isinstance(intake.offer("a.yaml", complete=True), Accepted)
    steps = [
        "sync tmp/<stage>" if step.startswith("sync tmp/in-") else
        "sync outbox/<delivery>" if step.startswith("sync outbox/.spoold-a~") else step
        for step in disk.steps
    ]  # fmt: skip
    job = ["sync job.yaml", *(["sync status.json"] if delivered else []), "sync tmp/<stage>"]
    delivery = ["sync outbox/<delivery>", "sync outbox/"] if delivered else []
    assert steps == [*delivery, *job, "sync pending/"]


# -- the one gate: fences ---------------------------------------------------------------------


def test_a_fence_made_while_a_finish_writes_stops_its_move(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finish checks the fence again after its writes (they take time: two fsyncs): a host
    that took the job over meanwhile owns it, and the fenced owner must not move it under the
    taker's feet (its outcome beside the taker's run)."""
    spool = _spool(tmp_path)
    job = spool.jobs.claim(_accept(spool, _local("raced")))
    assert job is not None
    real = fsync_path

    def taken_over_meanwhile(path: str | Path) -> None:
        if str(path).endswith("/log"):  # between the status's write and the rename
            assert spool.jobs.fence(job, 1, {"by": "b"})
        real(path)

    monkeypatch.setattr(jobs_module, "fsync_path", taken_over_meanwhile)
    with pytest.raises(JobFenced, match="taken over by b"):
        spool.jobs.finish(job, JobState.SUCCEEDED, {"job_id": "raced", "state": "succeeded"})
    assert spool.jobs.find("raced") == job._replace(generation=None), "moved by its fenced owner"


def test_a_job_in_pending_and_running_at_once_is_said_not_taken_for_a_lost_race(
    tmp_path: Path,
) -> None:
    """Each job sits in exactly one state directory; a claim that finds both is a broken
    spool, said, not a claim another worker won (which would leave it so, silently)."""
    spool = _spool(tmp_path)
    job_id = _accept(spool, _local("twice"))
    (spool.dir("running") / job_id).mkdir()
    with pytest.raises(SpoolError, match="in pending/ and running/ at once"):
        spool.jobs.claim(job_id)


# -- adoption of a unit no supervisor ran (an API call in the worker process) -----------------


class _Calls(Executor):
    """A call made in the worker process (as sevdesk's, lexware's, proxmox's): no supervisor
    records it and it cannot outlive spoold (not resumable). Counts its calls."""

    name = "calls"
    schema_resource = "local.schema.json"
    made: list[str] = []  # reset by each test (the fixture)
    users: list[str | None] = []  # whom each call ran as (its job user: hooks, environment)
    started = threading.Event()
    cancelled = threading.Event()
    wait_for_cancel = False

    def execute(self, ctx: RunContext) -> ExecResult:
        type(self).made.append(ctx.unit_key)
        type(self).users.append(None if ctx.run_as is None else ctx.run_as.name)
        type(self).started.set()
        if type(self).wait_for_cancel and ctx.cancel.wait(BOUND):
            type(self).cancelled.set()
            return ExecResult(exit_code=None, cancelled=True)
        return ExecResult(exit_code=0, result={"invoice": "R-1"})


@pytest.fixture(name="calls")
def _calls() -> Iterator[type[_Calls]]:
    _Calls.made, _Calls.users = [], []
    _Calls.started, _Calls.cancelled = threading.Event(), threading.Event()
    _Calls.wait_for_cancel = False
    yield _Calls
    _Calls.wait_for_cancel = False


def _runner(spool: Spool) -> JobRunner:
    return JobRunner(spool, ExecutorRegistry({"calls": _Calls}), _config(spool), SystemClock(),
                     LOG)  # fmt: skip


def _call_job(spool: Spool, on_interrupt: str = "requeue") -> str:
    document = {"job_id": "invoice", "executor": "calls", "on_interrupt": on_interrupt,
                "product": {"commands": "true"}}  # fmt: skip
    return _accept(spool, document, ExecutorRegistry({"calls": _Calls}))


def _adopted_and_run(spool: Spool, job_id: str) -> tuple[JobDir, dict[str, Any]]:
    """``job_id`` adopted by a new daemon's runner and run to its end; where and how it ended."""
    runner = _runner(spool)
    adopted = runner.adopt(job_id)
    assert adopted is not None
    final = runner.run(adopted)
    assert final is not None
    return final, spool.jobs.read_status(final)


def test_an_adopted_unit_that_had_ended_is_taken_as_recorded_not_called_again(
    tmp_path: Path, calls: type[_Calls]
) -> None:
    """README: on adoption a unit "that ended while no daemon watched is taken as it was
    recorded": its worker made the call and recorded its end, then died before the job's
    outcome was recorded. Called again, an invoice would be made twice; taken for cut short,
    on_interrupt would requeue it, and it would be made twice all the same."""
    spool = _spool(tmp_path)
    job_id = _call_job(spool)
    first = _runner(spool)
    claimed = first.claim(job_id)
    assert claimed is not None
    assert first.attempt(claimed) is not None  # and its daemon dies before recording it
    assert calls.made == ["1"] and Path(claimed.location, "units", "1.end").exists()
    final, status = _adopted_and_run(spool, job_id)
    assert (final.directory, status["state"]) == ("done", "succeeded"), status
    assert status["result"] == {"invoice": "R-1"}
    assert calls.made == ["1"], "the call was made again"
    assert "unit 1 had ended: its outcome is taken as recorded" in final.log_path.read_text()


def test_an_adopted_unit_of_an_executor_that_cannot_resume_is_not_called_again(
    tmp_path: Path, calls: type[_Calls]
) -> None:
    """README: "A unit of an executor that cannot outlive spoold (proxmox, sevdesk, lexware: a
    call in the worker process) that was under way is not started again: on_interrupt
    decides." Its worker began it (units/1) and died before its end was recorded."""
    spool = _spool(tmp_path)
    job_id = _call_job(spool, on_interrupt="fail")
    lease = {"worker": "old", "host": "here", "pid": 999_999, "pid_start": 1}
    job = _running(spool, job_id, lease)
    assert spool.jobs.begin_unit(job._replace(generation=1), "1",
                                 {"executor": "calls", "started_at": rfc3339(SystemClock().now())})  # fmt: skip
    final, status = _adopted_and_run(spool, job_id)
    assert calls.made == [], "a call that was under way was made again"
    assert (final.directory, status["state"]) == ("failed", "failed"), status
    assert "interrupted" in status["error"]
    assert "cannot be resumed" in final.log_path.read_text()


def test_an_adopted_job_goes_on_as_the_job_user_its_old_lease_names(
    tmp_path: Path, calls: type[_Calls]
) -> None:
    """worker.py: an adoption keeps the user the job ran as, "whichever slot adopts it". A job
    whose executor works elsewhere has a work dir of spoold's own, which names no job user:
    only its old lease says it ran as slot 1's user. Adopted in slot 0, it still runs as that
    user, and its new lease says so for whoever adopts it next."""
    spool = _spool(tmp_path)
    job_id = _call_job(spool)
    workdir = tmp_path / "work" / f"{job_id}.1.abc"
    workdir.mkdir(parents=True)
    old = {"worker": "old", "host": "here", "pid": 999_999, "pid_start": 1,
           "workdir": str(workdir), "job_user": "spoold-job2"}  # fmt: skip
    _running(spool, job_id, old)
    runner = _runner(spool)
    assert runner.job_user("0") == "spoold-job", "slot 0's own user is another"
    adopted = runner.adopt(job_id)
    assert adopted is not None
    leases: list[dict[str, Any] | None] = []  # as the call starts
    attempt = runner.attempt(
        adopted, meanwhile=lambda: leases.append(spool.jobs.read_lease(adopted))
    )
    assert attempt is not None and calls.made == ["1"]
    assert calls.users == ["spoold-job2"], "it went on as the adopting slot's user"
    assert [lease and lease.get("job_user") for lease in leases] == ["spoold-job2"]
    final = runner.record(attempt)
    assert final is not None and final.directory == "done"


class _Cut:
    """A job's directory out of reach while ``on``: every look at its claim fails with EIO, as
    on a network filesystem cut off."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.on = False
        looked = jobs_module.check_fence

        def check_fence(job: JobDir) -> None:
            if self.on:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            looked(job)

        monkeypatch.setattr(jobs_module, "check_fence", check_fence)


@pytest.mark.parametrize("takers", [True, False], ids=["another-host-may-take-over", "alone"])
def test_a_unit_in_the_worker_process_ends_once_its_lease_could_be_taken_over(
    tmp_path: Path,
    calls: type[_Calls],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    takers: bool,
) -> None:
    """A job with ``on_interrupt: requeue`` whose lease its worker cannot renew (the spool cut
    off) would be run again by a host that finds it stale: its run here ends first, once the
    lease has stood still for lease_timeout - 3 beats - kill_grace (10 - 3 - 0.5 s here). A
    unit in the worker process (the API executors, docker, ssh) has no supervisor to end it.
    Back, the job goes to pending/, interrupted, saying why. Not on a spool no other host
    serves (this host's record shows none): there it runs on."""
    spool = _spool(tmp_path)
    calls.wait_for_cancel = True
    job_id = _call_job(spool)
    clock = FakeClock()
    config = _config(spool, heartbeat_interval=1.0)
    if not takers:
        spool.hosts.write(config.host_id, {"host": config.host_id, "beat": 1, "view": {}})
    runner = JobRunner(spool, ExecutorRegistry({"calls": _Calls}), config, clock, LOG)
    cut = _Cut(monkeypatch)
    claimed = runner.claim(job_id)
    assert claimed is not None
    thread = threading.Thread(target=runner.run, args=(claimed,))
    thread.start()
    try:
        assert calls.started.wait(BOUND)
        runner.renew_leases()  # reads this host's record: may another host take over?
        cut.on = True
        clock.advance(6.0)
        runner.renew_leases()
        assert "ends first" not in caplog.text, "ended before its lease could be taken over"
        clock.advance(1.0)
        runner.renew_leases()
        if not takers:
            clock.advance(100.0)
            runner.renew_leases()
            assert "ends first" not in caplog.text and not calls.cancelled.is_set()
            return
        assert calls.cancelled.wait(BOUND), "the unit went on running"
        assert "this host's copy of it ends first" in caplog.text
    finally:
        if not takers:
            runner.interrupt_all()  # the test's end
        thread.join(BOUND + 5)
        cut.on = False
    assert not thread.is_alive()
    runner.retry_finishing()  # its outcome, held while the spool was cut off
    found = spool.jobs.find(job_id)
    assert found is not None and found.directory == "pending", found
    status = spool.jobs.read_status(found)
    error = status["attempts"][0]["error"]
    assert error.startswith("interrupted: the spool was out of reach and its lease not renewed"), (
        error
    )


def test_a_unit_in_the_worker_process_ends_once_its_claim_is_fenced(
    tmp_path: Path, calls: type[_Calls]
) -> None:
    """A host that finds at its lease's renewal that another host took the job over ends
    its copy: a supervised process has its supervisor to see the fence, a unit that runs in
    the worker process only the worker's renewal. It records nothing for the job."""
    spool = _spool(tmp_path)
    calls.wait_for_cancel = True
    job_id = _call_job(spool)
    runner = _runner(spool)
    claimed = runner.claim(job_id)
    assert claimed is not None
    ended: list[JobDir | None] = []
    thread = threading.Thread(target=lambda: ended.append(runner.run(claimed)))
    thread.start()
    try:
        assert calls.started.wait(BOUND)
        status = Path(claimed.location, "status.json").read_bytes()
        assert spool.jobs.fence(claimed, 1, {"by": "b"})
        runner.renew_leases()
        assert calls.cancelled.wait(BOUND), "the fenced unit went on running"
    finally:
        thread.join(BOUND + 5)
    assert not thread.is_alive() and ended == [None]
    assert spool.jobs.find(job_id) == claimed._replace(generation=None)
    assert Path(claimed.location, "status.json").read_bytes() == status
    assert runner.active_ids() == []
