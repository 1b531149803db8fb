"""Two hosts on one spool, each a real daemon (two host ids on this machine), and a job that
outlives its host's daemon: it is the same job, run once, whatever happens to that daemon.

- A stop leaves the job running (README: "they go on, and the next start adopts them"): its
  supervisor keeps the claim's beat while no worker does, so the other host does not take it
  over and run it again.
- A job its host's daemon could no longer watch (frozen) and that the other host took over
  ends here at once, by its own supervisor, not beside the taker's run; and the woken host
  ends nothing of the taker's.
- A job whose command ended while no daemon of its host ran is not run again by a takeover.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from spoold.core.clock import rfc3339
from spoold.core.config import Config
from spoold.core.procfs import Machine, children, process_start_time, this_machine
from spoold.core.secrets import Masker
from spoold.core.spool import JobDir, Spool
from spoold.run.hostbeat import HostBeat
from spoold.run.launcher import Launcher, Supervised
from spoold.run.recovery import Recovery
from tests.fakes import FakeClock
from tests.harness import (
    DaemonProcess,
    drop,
    end_supervisors,
    local_job,
    run_cli,
    running,
    wait_finished,
    wait_for,
    write_config,
)

LEASE_TIMEOUT = 2.0  # write_config's heartbeat is 0.5 s
CLONE_BOUND = 60.0  # a ceiling for a refusing daemon's start, not a measurement


#: Host b's daemon runs in a process namespace of its own, as on another machine: it sees
#: none of host a's processes (a takeover on one machine would end them itself, by their
#: environment), and they see none of its.
ANOTHER_MACHINE = ("unshare", "--pid", "--fork", "--kill-child", "--mount-proc")


class Hosts:
    """Daemons of host ids "a" and "b" on one spool, each with its own log."""

    def __init__(self, spool: Path, root: Path) -> None:
        self.spool = spool
        config = write_config(root / "config.yaml", spool, lease_timeout=f"{LEASE_TIMEOUT:g}s")
        self.daemons = {host: self._daemon(spool, config, root, host) for host in ("a", "b")}

    @staticmethod
    def _daemon(spool: Path, config: Path, root: Path, host: str) -> DaemonProcess:
        prefix = ANOTHER_MACHINE if host == "b" else ()
        env = {"RUNNER_ID": host}
        return DaemonProcess(spool, config, env, log_path=root / f"{host}.log", prefix=prefix)

    def __getitem__(self, host: str) -> DaemonProcess:
        return self.daemons[host]

    def seen_still_for(self, watcher: str, host: str) -> float:
        """How long ``watcher``'s daemon has seen ``host``'s beat stand still (its record)."""
        try:
            record = json.loads((self.spool / "hosts" / watcher).read_text())
        except (OSError, ValueError):
            return 0.0
        return float(record.get("view", {}).get(host, {}).get("unchanged_for", 0.0))


@pytest.fixture(name="hosts")
def _hosts(spool_dir: Path, tmp_path: Path) -> Iterator[Hosts]:
    hosts = Hosts(spool_dir, tmp_path)
    try:
        yield hosts
    finally:
        for daemon in hosts.daemons.values():
            if daemon.alive and daemon.pid is not None:
                os.killpg(daemon.pid, signal.SIGCONT)  # a frozen one must die, not wait
            daemon.kill()
        end_supervisors(spool_dir)


def _job(job_id: str, tmp_path: Path) -> dict[str, Any]:
    """It notes each start (attempt, host, pid) in ``runs``, then waits for the test's go."""
    runs, go = tmp_path / "runs", tmp_path / "go"
    note = f'echo "$SPOOLD_ATTEMPT $RUNNER_ID $$" >> {runs}'
    return local_job(job_id, f"{note}; until [ -e {go} ]; do sleep 0.05; done",
                     on_interrupt="requeue")  # fmt: skip


def _started_on_a(hosts: Hosts, job_id: str, tmp_path: Path) -> int:
    """Host a's daemon started, running ``job_id``: the pid of its first process."""
    hosts["a"].start()
    drop(hosts.spool, f"{job_id}.yaml", _job(job_id, tmp_path))
    wait_for(lambda: len(_runs(tmp_path)) == 1, what=f"{job_id}'s start on host a")
    return int(_runs(tmp_path)[0][2])


def _runs(tmp_path: Path) -> list[list[str]]:
    path = tmp_path / "runs"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def _lease(spool: Path, job_id: str) -> dict[str, Any]:
    lease: dict[str, Any] = json.loads((spool / "running" / job_id / "lease").read_text())
    return lease


def _freeze(daemon: DaemonProcess, sig: signal.Signals) -> None:
    """Stop (or go on with) the daemon and its worker processes, not the jobs' supervisors:
    they are sessions of their own, as a job's are, and go on while spoold is frozen."""
    assert daemon.pid is not None
    os.killpg(daemon.pid, sig)


def test_a_stopped_hosts_job_runs_on_untaken_and_its_next_start_adopts_it(
    hosts: Hosts, spool_dir: Path, tmp_path: Path
) -> None:
    _started_on_a(hosts, "kept", tmp_path)
    hosts["b"].start()
    hosts["a"].stop(leave_jobs=True)
    # Host b has watched a's beat stand still for twice the lease's timeout: long enough to
    # have taken over any claim of a's that stood still too.
    wait_for(lambda: hosts.seen_still_for("b", "a") >= 2 * LEASE_TIMEOUT,
             what="host b watching host a's beat stand still")  # fmt: skip
    assert (spool_dir / "running" / "kept").is_dir()
    assert _lease(spool_dir, "kept")["host"] == "a"
    assert not list((spool_dir / "running" / "kept").glob("fenced.*"))
    assert [run[:2] for run in _runs(tmp_path)] == [["1", "a"]]
    assert "its supervisor keeps the claim" in (spool_dir / "running" / "kept" / "log").read_text()

    hosts["a"].start()
    wait_for(lambda: "adopted" in (spool_dir / "running" / "kept" / "log").read_text(),
             what="host a's next daemon adopting the job")  # fmt: skip
    (tmp_path / "go").touch()
    directory, status = wait_finished(spool_dir, "kept")
    assert (directory, status["state"]) == ("done", "succeeded"), status
    assert [run[:2] for run in _runs(tmp_path)] == [["1", "a"]]
    assert not list((spool_dir / "done" / "kept").glob("kept.*")), "its beat's mark is left"


def test_a_frozen_hosts_job_taken_over_ends_there_and_the_woken_host_spares_the_takers_run(
    hosts: Hosts, spool_dir: Path, tmp_path: Path
) -> None:
    first = _started_on_a(hosts, "moved", tmp_path)
    hosts["b"].start()
    _freeze(hosts["a"], signal.SIGSTOP)
    wait_for(lambda: len(_runs(tmp_path)) == 2, what="host b taking the job over, running it")
    assert _runs(tmp_path)[1][:2] == ["2", "b"]
    # Host a's daemon is still frozen: its job's own supervisor ended its copy.
    wait_for(lambda: not running(first), what="host a's copy of the job to end")
    fenced_log = (spool_dir / "running" / "moved" / "fenced-log.1").read_text()
    assert "this host's copy of it ends" in fenced_log, fenced_log

    _freeze(hosts["a"], signal.SIGCONT)
    wait_for(lambda: "recording nothing" in hosts["a"].log(),
             what="the woken host finding itself fenced")  # fmt: skip
    (tmp_path / "go").touch()
    directory, status = wait_finished(spool_dir, "moved")
    # The taker's run was not ended by the woken host: it ran to its end.
    assert (directory, status["state"]) == ("done", "succeeded"), status
    assert [a["number"] for a in status["attempts"]] == [1, 2], status["attempts"]
    assert len(_runs(tmp_path)) == 2


def test_a_job_that_ended_while_its_host_was_stopped_is_left_for_its_next_start_to_record(
    hosts: Hosts, spool_dir: Path, tmp_path: Path
) -> None:
    """A host that said it stopped keeps its claims: nothing of its keeps the beat once the
    job ended, yet no other host takes the job over; its next start records the end."""
    _started_on_a(hosts, "ended", tmp_path)
    hosts["a"].stop(leave_jobs=True)
    (tmp_path / "go").touch()
    ended = spool_dir / "running" / "ended" / "units" / "1.end"
    wait_for(ended.exists, what="the job's end, recorded by its supervisor")
    hosts["b"].start()
    wait_for(lambda: hosts.seen_still_for("b", "a") >= 2 * LEASE_TIMEOUT,
             what="host b watching host a's beat stand still")  # fmt: skip
    assert (spool_dir / "running" / "ended").is_dir()
    assert "left to host a, which said it stopped" in hosts["b"].log()
    hosts["a"].start()
    directory, status = wait_finished(spool_dir, "ended")
    assert (directory, status["state"]) == ("done", "succeeded"), status
    assert len(_runs(tmp_path)) == 1


@pytest.mark.parametrize("how", ["killed", "forgotten"])
def test_a_job_that_ended_while_its_host_was_down_is_not_run_again_by_a_takeover(
    hosts: Hosts, spool_dir: Path, tmp_path: Path, how: str
) -> None:
    """Its host's daemon killed (no word of a stop), or stopped and then retired for good
    (``spoold hosts --forget``): another host takes the job over, and does not run it again."""
    _started_on_a(hosts, "ended", tmp_path)
    if how == "killed":
        hosts["a"].kill(leave_jobs=True)
    else:
        hosts["a"].stop(leave_jobs=True)
    (tmp_path / "go").touch()
    ended = spool_dir / "running" / "ended" / "units" / "1.end"
    wait_for(ended.exists, what="the job's end, recorded by its supervisor")
    if how == "forgotten":
        forgot = run_cli(spool_dir, "hosts", "--forget", "a")
        assert forgot.returncode == 0, forgot.stderr
    hosts["b"].start()
    directory, status = wait_finished(spool_dir, "ended")
    assert (directory, status["state"]) == ("failed", "failed"), status
    assert "its command had ended (exit code 0)" in status["error"], status["error"]
    assert "not run again" in status["error"], status["error"]
    assert len(_runs(tmp_path)) == 1


def test_the_daemons_own_processes_are_one_group_and_the_supervisors_are_not_in_it(
    hosts: Hosts, spool_dir: Path, tmp_path: Path
) -> None:
    """What ``_freeze`` relies on: a signal to the daemon's group reaches its workers, not the
    jobs' supervisors."""
    _started_on_a(hosts, "group", tmp_path)
    pid = hosts["a"].pid
    assert pid is not None
    worker = _lease(spool_dir, "group")["worker_pid"]
    assert os.getpgid(worker) == pid
    supervisor = json.loads((spool_dir / "running" / "group" / "units" / "1").read_text())["pid"]
    assert os.getpgid(supervisor) != pid
    assert children(pid), "the daemon has no processes of its own"
    (tmp_path / "go").touch()
    wait_finished(spool_dir, "group")


@pytest.mark.parametrize("generation", [1, 2])
def test_a_dead_supervisors_job_process_is_found_by_the_lease_of_its_own_claim_only(
    spool_dir: Path, generation: int
) -> None:
    """The lease names the job's first process; once another host took the job over, the lease
    is the taker's (a generation higher) and that pid is the taker's process, never ours to end
    (on one machine, or where pids of two machines meet)."""
    spool = Spool(spool_dir)
    where = spool_dir / "running" / "taken"
    where.mkdir()
    start = process_start_time(os.getpid())
    lease = {"host": "b", "generation": generation, "job_pid": os.getpid(), "job_pid_start": start}
    (where / "lease").write_text(json.dumps(lease))
    job = JobDir("taken", "running", str(where), 1)
    supervised = Supervised(Launcher(chores_here=True), spool.jobs, job, masker=Masker(),
                            log_limit=None, host="a")  # fmt: skip
    # The choice itself, without the kill that follows it in _ended_unseen.
    found = supervised._leased_process("1")
    assert found == ([(os.getpid(), start)] if generation == 1 else [])


# -- two hosts given one host id ------------------------------------------------------------------

T = datetime(2026, 12, 6, 12, 0, 0, tzinfo=UTC)
HERE, THERE = Machine("m-here", "boot-1", 1), Machine("m-there", "boot-7", 1)


def _waits(beat: HostBeat) -> bool:
    """Read afresh at each call (a property mypy would take as fixed once asserted)."""
    return beat.waiting


def _taken(beat: HostBeat) -> str | None:
    return beat.taken


def _beats(spool_dir: Path, *machines: Machine) -> tuple[FakeClock, list[HostBeat]]:
    spool = Spool(spool_dir)
    config = Config(spool=spool_dir, runner_id="a", lease_timeout=LEASE_TIMEOUT,
                    heartbeat_interval=0.5)  # fmt: skip
    clock = FakeClock(T)
    log = logging.getLogger("spoold.test")
    beats = [HostBeat(spool, config, clock, log, running=list, machine=m) for m in machines]
    return clock, beats


def test_a_daemon_given_the_host_id_another_machine_serves_refuses_to_start(
    spool_dir: Path,
) -> None:
    clock, (there, here) = _beats(spool_dir, THERE, HERE)
    there.tick(clock.monotonic())
    here.tick(clock.monotonic())
    assert _waits(here), "a record of another machine not said stopped may be a live daemon's"
    clock.advance(0.5)
    there.tick(clock.monotonic())
    here.tick(clock.monotonic())
    assert not _waits(here)
    assert here.taken is not None and there.taken is None
    assert "another spoold serves this spool as host 'a' on another machine" in here.taken
    assert "give each host its own RUNNER_ID" in here.taken
    record = Spool(spool_dir).hosts.read("a")
    assert record is not None and record["machine_id"] == "m-there", "the newcomer wrote"


def test_a_host_ids_record_another_machine_left_is_watched_for_lease_timeout_then_taken(
    spool_dir: Path,
) -> None:
    clock, (there, here) = _beats(spool_dir, THERE, HERE)
    there.tick(clock.monotonic())  # and never again: that machine died
    here.tick(clock.monotonic())
    clock.advance(LEASE_TIMEOUT - 0.5)
    here.tick(clock.monotonic())
    assert _waits(here)
    clock.advance(0.5)
    here.tick(clock.monotonic())
    assert not _waits(here) and here.taken is None
    record = Spool(spool_dir).hosts.read("a")
    assert record is not None and record["machine_id"] == "m-here"


def test_a_host_ids_record_said_stopped_or_of_this_machine_is_no_reason_to_wait(
    spool_dir: Path,
) -> None:
    clock, (there, here, again) = _beats(spool_dir, THERE, HERE, HERE)
    there.tick(clock.monotonic())
    there.stopped()
    here.tick(clock.monotonic())
    assert not _waits(here) and here.taken is None
    clock.advance(0.5)
    # Another daemon of this machine writes as "a" (no host lock between them here): the one
    # that finds the other's record over its own stops, and writes nothing more.
    again.tick(clock.monotonic())
    assert not _waits(again)
    clock.advance(0.5)
    here.tick(clock.monotonic())
    taken = _taken(here)
    assert taken is not None and "on this machine" in taken
    here.stopped()
    record = Spool(spool_dir).hosts.read("a")
    assert record is not None and not record["stopped"], "a stop said over the other's record"


def _leased(spool_dir: Path, host: str, **lease: Any) -> JobDir:
    spool = Spool(spool_dir)
    where = spool_dir / "running" / "j1"
    where.mkdir()
    (where / "job.yaml").write_text("job_id: j1\nexecutor: local\ncommand: 'true'\n")
    status = {"job_id": "j1", "state": "running", "executor": "local", "generation": 1,
              "attempts": [{"number": 1, "started_at": rfc3339(T)}]}  # fmt: skip
    (where / "status.json").write_text(json.dumps(status))
    (where / "log").write_text("")
    job = JobDir("j1", "running", str(where), 1)
    spool.jobs.write_lease(job, {"host": host, "generation": 1, "beat": 0, "pid": 1,
                                 "pid_start": 1, **lease})  # fmt: skip
    return job


def test_a_lease_of_this_host_id_written_on_another_machine_is_judged_by_its_beat(
    spool_dir: Path,
) -> None:
    """Its pids are another machine's: not found in this process table, they prove nothing."""
    job = _leased(spool_dir, "a", machine_id="m-there", boot_id="boot-7", pid_ns=1)
    spool, clock = Spool(spool_dir), FakeClock(T)
    config = Config(spool=spool_dir, runner_id="a", lease_timeout=LEASE_TIMEOUT)
    judge = Recovery(spool, config, clock, logging.getLogger("spoold.test"))
    for beat in range(1, 5):
        assert not judge.judge(job, own_runs=frozenset()).gone
        clock.advance(LEASE_TIMEOUT - 0.5)
        lease = spool.jobs.read_lease(job)
        assert lease is not None
        spool.jobs.write_lease(job, {**lease, "beat": beat})
    assert not judge.judge(job, own_runs=frozenset()).gone
    clock.advance(LEASE_TIMEOUT)
    verdict = judge.judge(job, own_runs=frozenset())
    assert verdict.gone and verdict.elsewhere and "unchanged for" in verdict.why


def test_a_lease_of_this_machine_from_an_earlier_boot_is_gone_at_once(spool_dir: Path) -> None:
    here = this_machine()
    job = _leased(spool_dir, "a", machine_id=here.machine_id, boot_id="an-earlier-boot",
                  pid_ns=here.pid_ns, pid=os.getpid(), pid_start=process_start_time(os.getpid()))  # fmt: skip
    config = Config(spool=spool_dir, runner_id="a", lease_timeout=LEASE_TIMEOUT)
    judge = Recovery(Spool(spool_dir), config, FakeClock(T), logging.getLogger("spoold.test"))
    verdict = judge.judge(job, own_runs=frozenset())
    assert verdict.gone and not verdict.elsewhere and "before a reboot" in verdict.why


def test_a_second_daemon_serving_as_a_running_host_on_another_machine_refuses_and_runs_nothing(
    hosts: Hosts, spool_dir: Path, tmp_path: Path
) -> None:
    _started_on_a(hosts, "one", tmp_path)
    # Another machine: its own processes, and its own host lock (flock crosses no network
    # filesystem, and on one kernel it would stop the clone before its first look): a tmp/ of
    # its own, in a mount namespace of its own (bound from the same filesystem: spoold refuses
    # a tmp/ on another).
    clone_tmp = tmp_path / "clone-tmp"
    clone_tmp.mkdir(mode=0o755)
    own_tmp = ("sh", "-c", 'mount --bind "$0" "$1" && shift && exec "$@"', str(clone_tmp),
               str(spool_dir / "tmp"))  # fmt: skip
    command = [*ANOTHER_MACHINE, "--mount", *own_tmp, sys.executable, "-m", "spoold", "run",
               "--spool", str(spool_dir), "--config", str(hosts["a"].config)]  # fmt: skip
    clone = subprocess.run(command, env={**os.environ, "RUNNER_ID": "a"}, capture_output=True,
                           text=True, timeout=CLONE_BOUND, check=False)  # fmt: skip
    assert clone.returncode == 2, clone.stderr
    assert "refusing to run: another spoold serves this spool as host 'a'" in clone.stderr
    assert hosts["a"].alive
    (tmp_path / "go").touch()
    directory, status = wait_finished(spool_dir, "one")
    assert (directory, status["state"]) == ("done", "succeeded"), status
    assert len(_runs(tmp_path)) == 1


def test_a_cancel_asked_while_no_daemon_runs_ends_the_job_and_the_next_start_records_it(
    hosts: Hosts, spool_dir: Path, tmp_path: Path
) -> None:
    first = _started_on_a(hosts, "halt", tmp_path)
    hosts["a"].stop(leave_jobs=True)
    asked = run_cli(spool_dir, "cancel", "halt", "--wait", "0", "--config", str(hosts["a"].config))
    assert asked.returncode == 0, asked.stderr
    wait_for(lambda: not running(first), what="the job's own supervisor to end it")
    assert "its supervisor ends it" in (spool_dir / "running" / "halt" / "log").read_text()
    hosts["a"].start()
    directory, status = wait_finished(spool_dir, "halt")
    assert (directory, status["state"]) == ("failed", "cancelled"), status
    assert len(_runs(tmp_path)) == 1
