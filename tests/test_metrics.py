"""Prometheus metrics (issue 19): what each change of a job's state is counted as
(spoold.run.observed), how a worker process's observations reach the main process, and what
GET /metrics says (spoold.face.metrics): counted as it happened, and from the spool at scrape
time, so that jobs by state are right after a restart too."""

from __future__ import annotations

import functools
import json
import logging
import marshal
import os
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from multiprocessing import Pipe
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import spoold
from spoold.core.clock import SystemClock, rfc3339
from spoold.core.config import Config, load_config
from spoold.core.errors import WorkerProcessError
from spoold.core.job import Attempt, JobStatus
from spoold.core.own_log import close_logging
from spoold.core.procfs import process_start_time
from spoold.core.spool import JobDir, Spool
from spoold.core.states import JobState
from spoold.core.usage import Usage
from spoold.face import metrics as metrics_module
from spoold.face.metrics import METRICS, Metrics
from spoold.intake.incoming import Accepted, Intake
from spoold.intake.validation import job_validator
from spoold.run import observed
from spoold.run.control import JobControl
from spoold.run.ledger import JobLedger, StateChange
from spoold.run.observed import Observation, observation_of
from spoold.run.pool import (
    Deferred,
    Done,
    Observed,
    ParentLink,
    WorkerProcesses,
    receive_message,
    send_message,
)
from spoold.run.registry import ExecutorRegistry
from spoold.wiring import WORKER_ENTRY, Parts
from tests.fakes import FakeClock
from tests.harness import DEFAULT_BOUND, local_job, wait_for, write_config

LOGGER = logging.getLogger("spoold.test")
T0 = datetime(2026, 11, 22, 12, 0, 0, tzinfo=UTC)
FLAKY = 'test "$SPOOLD_ATTEMPT" -gt 1 || exit 75'  # fails its first attempt only
BUILD = {"version": spoold.__version__, "python": "3.11.2"}


def _at(seconds: float) -> str:
    return rfc3339(T0 + timedelta(seconds=seconds))


def _ts(seconds: float) -> float:
    return (T0 + timedelta(seconds=seconds)).timestamp()


def _status(
    state: JobState,
    attempts: Sequence[tuple[float, float | None]] = (),
    *,
    next_at: float | None = None,
    finished: float | None = None,
    executor: str = "local",
) -> JobStatus:
    """A job submitted at T0, with attempts (start, end) in seconds after it."""
    return JobStatus(
        job_id="j", state=state, executor=executor, type=None, submitted_at=_at(0),
        source="j.yaml",
        attempts=[
            Attempt(n, _at(start), None if end is None else _at(end))
            for n, (start, end) in enumerate(attempts, 1)
        ],
        next_attempt_at=None if next_at is None else _at(next_at),
        finished_at=None if finished is None else _at(finished),
    )  # fmt: skip


def _change(
    before: JobState | None, after: JobState, status: JobStatus | None, arrived: float | None = None
) -> StateChange:
    return StateChange("j", before, after, JobDir("j", after.directory, "/nowhere/j"), status,
                       arrived)  # fmt: skip


P, R, S, F, C = (JobState.PENDING, JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED,
                 JobState.CANCELLED)  # fmt: skip


# -- what a change is counted as (pure) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "now", "expected"),
    [
        pytest.param(
            _change(None, P, _status(P), arrived=_ts(-0.25)),
            0.0,
            Observation("accepted", "j", "local", "pending", pickup_seconds=0.25),
            id="accepted-from-a-file",
        ),
        pytest.param(
            _change(None, P, _status(P)),
            0.0,
            Observation("accepted", "j", "local", "pending"),
            id="accepted-from-no-file",
        ),
        pytest.param(
            _change(P, R, _status(P)),
            3.0,
            Observation("started", "j", "local", "running", wait_seconds=3.0),
            id="first-attempt-waited-since-its-submission",
        ),
        pytest.param(
            _change(P, R, _status(P, [(3, 5)], next_at=35)),
            36.5,
            Observation("started", "j", "local", "running", wait_seconds=1.5),
            id="a-retry-waited-since-it-was-due",
        ),
        pytest.param(
            _change(P, R, _status(P, [(3, 5)])),
            100.0,
            Observation("started", "j", "local", "running"),
            id="requeued-or-retried-by-hand-its-wait-is-not-known",
        ),
        pytest.param(
            _change(P, R, None),
            1.0,
            Observation("started", "j", "", "running"),
            id="unreadable-status",
        ),
        pytest.param(
            _change(R, S, _status(S, [(3, 10)], finished=10)),
            10.0,
            Observation("finished", "j", "local", "succeeded", run_seconds=7.0),
            id="success",
        ),
        pytest.param(
            _change(R, F, _status(F, [(3, 5), (40, 42.5)], finished=42.5)),
            43.0,
            Observation("finished", "j", "local", "failed", run_seconds=2.5),
            id="failure",
        ),
        pytest.param(
            _change(R, P, _status(P, [(3, 5)], next_at=35)),
            5.0,
            Observation("retrying", "j", "local", "pending", run_seconds=2.0),
            id="retry",
        ),
        pytest.param(
            _change(R, P, _status(P, [(3, 9)])),
            9.0,
            Observation("requeued", "j", "local", "pending", run_seconds=6.0),
            id="requeue",
        ),
        pytest.param(
            _change(R, C, _status(C, [(3, 4)], finished=4)),
            4.0,
            Observation("finished", "j", "local", "cancelled", run_seconds=1.0),
            id="cancelled-while-it-ran",
        ),
        pytest.param(
            _change(R, C, _status(C, [(3, 5)], finished=50)),
            50.0,
            Observation("finished", "j", "local", "cancelled"),
            id="cancelled-while-waiting-for-a-retry-no-run-of-its-own",
        ),
        pytest.param(
            _change(P, C, _status(C, finished=1)),
            1.0,
            Observation("finished", "j", "local", "cancelled"),
            id="cancelled-before-it-ran",
        ),
    ],
)
def test_each_change_is_counted_as_what_it_is(
    change: StateChange, now: float, expected: Observation
) -> None:
    assert observation_of(change, now=_ts(now)) == expected


def test_what_an_attempt_cost_rides_with_its_end_to_the_histograms(tmp_path: Path) -> None:
    """The cost is in the observation made as the attempt ends (no file read at scrape time),
    crosses the pool link, and is counted per executor; a figure not known is left out."""
    status = _status(F, [(3, 5)], finished=5)
    status.attempts[-1].usage = Usage(wall_seconds=2.0, cpu_user_seconds=0.75,
                                      cpu_system_seconds=0.25, peak_memory_bytes=300 * 2**20,
                                      output_bytes=12, source="kernel")  # fmt: skip
    seen = observation_of(_change(R, F, status), now=_ts(6))
    assert seen == Observation("finished", "j", "local", "failed", run_seconds=2.0,
                               cpu_seconds=1.0, peak_memory_bytes=300.0 * 2**20,
                               output_bytes=12.0)  # fmt: skip
    assert Observation.from_wire(marshal.loads(marshal.dumps(seen.to_wire()))) == seen
    status.attempts[-1].usage = Usage(wall_seconds=2.0, source="wall")
    walled = observation_of(_change(R, F, status), now=_ts(6))
    assert walled is not None and walled.cpu_seconds is None and walled.output_bytes is None
    spool = Spool(tmp_path / "spool")
    spool.init()
    config = Config(spool=spool.root, hostname="here")
    metrics = Metrics(spool, config, SystemClock(), build_info=BUILD, count_reuse=0)
    metrics.observe(seen)
    metrics.observe(walled)
    text = metrics.render()[0].decode()
    assert 'spoold_job_cpu_seconds_count{executor="local"} 1.0' in text
    assert 'spoold_job_cpu_seconds_sum{executor="local"} 1.0' in text
    assert 'spoold_job_peak_memory_bytes_bucket{executor="local",le="536870912.0"} 1.0' in text
    assert 'spoold_job_output_bytes_sum{executor="local"} 12.0' in text


def test_a_failed_job_put_back_by_hand_is_not_counted() -> None:
    assert observation_of(_change(F, P, _status(P, [(3, 5)])), now=_ts(60)) is None


def test_a_clock_that_went_back_never_counts_negative_time() -> None:
    late = observation_of(_change(None, P, _status(P), arrived=_ts(5)), now=_ts(0))
    assert late is not None and late.pickup_seconds == 0.0
    early = observation_of(_change(P, R, _status(P)), now=_ts(-1))
    assert early is not None and early.wait_seconds == 0.0


# -- over the wire ------------------------------------------------------------------------------


def test_an_observation_crosses_the_pool_link_intact() -> None:
    ours, theirs = Pipe()
    for sent in (
        Observation("finished", "provision-4711", "local", "succeeded", run_seconds=1.25),
        Observation("accepted", "a", "", "pending", pickup_seconds=0.003),
    ):
        assert Observation.from_wire(marshal.loads(marshal.dumps(sent.to_wire()))) == sent
        send_message(ours, Observed((sent,)))
        assert receive_message(theirs) == Observed((sent,))


def test_a_worker_process_sends_its_observations_together_and_never_late() -> None:
    """Held for a moment, they go out together: in the next Done (a slot's, once a job), ahead
    of another message, or alone once the window is over; those held at the end go too."""
    first, second, third, last = (
        Observation("started", job_id, "local", "running", wait_seconds=0.5)
        for job_id in ("a", "b", "c", "d")
    )
    ours, theirs = Pipe()
    patient = ParentLink(ours, window=3600.0)
    try:
        patient.observed(first)
        patient.observed(second)
        patient.done("a")
        assert receive_message(theirs) == Done("a", (first, second)), "one message"
        patient.observed(third)
        patient.deferred("c", 1e9)
        assert receive_message(theirs) == Observed((third,))
        assert receive_message(theirs) == Deferred("c", 1e9)
        patient.done("b")
        assert receive_message(theirs) == Done("b")
    finally:
        patient.close()
    assert not theirs.poll(0)

    ours, theirs = Pipe()
    hasty = ParentLink(ours, window=0.05)
    try:
        hasty.observed(third)
        assert theirs.poll(DEFAULT_BOUND), "sent by itself once its window is over"
        assert receive_message(theirs) == Observed((third,))
        hasty.observed(last)
    finally:
        hasty.close()
    assert receive_message(theirs) == Observed((last,))
    assert not theirs.poll(0)


@pytest.mark.parametrize(
    "junk",
    [
        ("exploded", "j", "local", "x", None, None, None),  # no such kind
        ("finished", "j", "local", "succeeded", "1.0", None, None),  # not a number
        ("finished", "j", "local", "succeeded", True, None, None),  # a bool is no number
        ("finished", "j", 7, "succeeded", None, None, None),
        ("finished", "j"),
        "finished",
    ],
)
def test_junk_is_no_observation(junk: Any) -> None:
    with pytest.raises(ValueError, match="not"):
        Observation.from_wire(junk)
    ours, theirs = Pipe()
    for message in (("observed", junk), ("observed", (junk,)), ("done", "a", (junk,))):
        ours.send_bytes(marshal.dumps(message))
        with pytest.raises(WorkerProcessError):
            receive_message(theirs)


# -- the ledger tells what a listener needs -----------------------------------------------------


def test_a_claim_tells_the_status_it_was_claimed_with_and_reads_none_unheard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path / "spool")
    spool.init()
    for job_id in ("heard", "garbled", "unheard"):
        where = spool.dir("pending") / job_id
        where.mkdir()
        pending = _status(P, [(3, 5)], next_at=35)
        pending.job_id = job_id
        (where / "status.json").write_text(json.dumps(pending.to_dict()))
    (spool.dir("pending") / "garbled" / "status.json").write_text("{not json")
    told: list[StateChange] = []
    ledger = JobLedger(spool, None, listeners=[told.append])
    assert ledger.claim("heard") is not None and ledger.claim("garbled") is not None
    heard, garbled = told
    assert heard.status is not None and heard.status.next_attempt_at == _at(35)
    assert garbled.job_id == "garbled" and garbled.status is None, "told all the same"

    def unexpected(job: JobDir) -> dict[str, Any]:
        raise AssertionError(f"{job.job_id}'s status read with no one to tell")

    monkeypatch.setattr(spool.jobs, "read_status", unexpected)
    assert JobLedger(spool, None).claim("unheard") is not None


# -- in process: intake and a runner, on a clock the test moves ---------------------------------


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[Parts]:
    spool = tmp_path / "spool"
    Spool(spool).init()
    config = load_config(write_config(tmp_path / "config.yaml", spool,
                                      logdir=str(tmp_path / "log")), spool=spool)  # fmt: skip
    made = Parts.build(config, FakeClock(T0))
    yield made
    close_logging()


def _metrics(parts: Parts) -> Metrics:
    return Metrics(parts.spool, parts.config, parts.clock, build_info=BUILD, count_reuse=0)


def _intake(parts: Parts, observe: Any) -> Intake:
    return Intake(parts.spool, job_validator(parts.registry), parts.clock,
                  max_file_size=1 << 20, settle_time=0, on_accepted=lambda job, document: None,
                  logger=LOGGER, on_observed=observe)  # fmt: skip


def _submit(parts: Parts, intake: Intake, document: dict[str, Any]) -> JobDir:
    name = f"{document['job_id']}.yaml"
    (parts.spool.dir("incoming") / name).write_text(yaml.safe_dump(document))
    outcome = intake.offer(name, complete=True)
    assert isinstance(outcome, Accepted), outcome
    return outcome.job


def _samples(body: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample /metrics gave, by its name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_jobs_run_in_process_are_counted_with_their_times(parts: Parts) -> None:
    clock = parts.clock
    assert isinstance(clock, FakeClock)
    seen: list[Observation] = []
    metrics = _metrics(parts)

    def observe(observation: Observation) -> None:
        seen.append(observation)
        metrics.observe(observation)

    intake = _intake(parts, observe)
    runner = parts.runner(observe=observe)
    ok = _submit(parts, intake, local_job("ok", "true"))
    flaky = _submit(parts, intake, local_job("flaky", FLAKY, retries=1, backoff="30s"))
    clock.advance(5)  # they wait for a worker
    for job in (ok, flaky):
        claimed = runner.claim(job.job_id)
        assert claimed is not None
        runner.run(claimed)
    clock.advance(40)  # the retry was due 10s ago
    claimed = runner.claim("flaky")
    assert claimed is not None and runner.run(claimed) is not None

    assert [(o.job_id, o.kind, o.outcome, o.wait_seconds, o.run_seconds) for o in seen] == [
        ("ok", "accepted", "pending", None, None),
        ("flaky", "accepted", "pending", None, None),
        ("ok", "started", "running", 5.0, None),
        ("ok", "finished", "succeeded", None, 0.0),  # the fake clock stood still while it ran
        ("flaky", "started", "running", 5.0, None),
        ("flaky", "retrying", "pending", None, 0.0),
        ("flaky", "started", "running", 10.0, None),
        ("flaky", "finished", "succeeded", None, 0.0),
    ]
    # From the files' ctimes (the real clock) to the fake clock's now: some time, never less.
    assert all((o.pickup_seconds or 0) >= 0 for o in seen if o.kind == "accepted")

    samples = _samples(metrics.render()[0])
    assert _value(samples, "spoold_jobs", state="succeeded") == 2
    assert _value(samples, "spoold_jobs", state="pending") == 0
    assert _value(samples, "spoold_jobs_accepted_total", executor="local") == 2
    assert _value(samples, "spoold_jobs_finished_total", executor="local", outcome="succeeded") == 2
    assert _value(samples, "spoold_jobs_finished_total", executor="local", outcome="failed") == 0
    assert _value(samples, "spoold_job_retries_total", executor="local") == 1
    wait = "spoold_job_queue_wait_seconds"
    assert _value(samples, f"{wait}_count", executor="local") == 3
    assert _value(samples, f"{wait}_sum", executor="local") == 20.0
    assert _value(samples, f"{wait}_bucket", executor="local", le="5.0") == 2
    assert _value(samples, f"{wait}_bucket", executor="local", le="10.0") == 3
    assert _value(samples, "spoold_job_run_duration_seconds_count", executor="local") == 3
    assert _value(samples, "spoold_pickup_latency_seconds_count") == 2

    # A restart: the counters start again, the spool's figures are what the spool holds.
    again = _samples(_metrics(parts).render()[0])
    assert _value(again, "spoold_jobs", state="succeeded") == 2
    assert ("spoold_jobs_finished_total", frozenset({("executor", "local"),
                                                     ("outcome", "succeeded")})) not in again  # fmt: skip


def test_pickup_latency_runs_from_the_files_arrival(parts: Parts) -> None:
    seen: list[Observation] = []
    intake = _intake(parts, seen.append)
    dropped = parts.spool.dir("incoming") / "late.yaml"
    dropped.write_text(yaml.safe_dump(local_job("late", "true")))
    arrived = datetime.fromtimestamp(os.stat(dropped).st_ctime, UTC)
    clock = parts.clock
    assert isinstance(clock, FakeClock)
    clock.advance((arrived - clock.now()).total_seconds() + 2.5)
    assert isinstance(intake.offer("late.yaml", complete=True), Accepted)
    [accepted] = seen
    assert accepted.kind == "accepted" and accepted.pickup_seconds == pytest.approx(2.5)


# -- from the spool, at scrape time -------------------------------------------------------------


def _job_dir(
    spool: Spool, directory: str, job_id: str, lease: dict[str, Any] | None = None
) -> Path:
    where = spool.dir(directory) / job_id
    where.mkdir()
    (where / "status.json").write_text(json.dumps({"job_id": job_id, "state": "running"}))
    if lease is not None:
        (where / "lease").write_text(json.dumps(lease))
    return where


def test_the_spools_figures_are_counted_at_scrape_time(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.init()
    clock = FakeClock(T0)
    config = Config(spool=spool.root, hostname="here", lease_timeout=60.0)
    metrics = Metrics(spool, config, clock, build_info=BUILD, count_reuse=0)
    for directory, count in (("pending", 3), ("done", 5), ("failed", 2), ("scheduled", 1)):
        for n in range(count):
            _job_dir(spool, directory, f"{directory}-{n}")
    (spool.dir("rejected") / "bad.yaml").mkdir()
    incoming = spool.dir("incoming")
    (incoming / "old.yaml").write_text("x")
    (incoming / ".uploading.yaml.tmp").write_text("x")  # still being written: not waiting
    (incoming / "new.yaml").write_text("x")
    oldest = os.stat(incoming / "old.yaml").st_ctime
    clock.advance(oldest + 90.0 - clock.now().timestamp())  # the old file came 90s ago

    def beat(ago: float) -> str:
        return rfc3339(clock.now() - timedelta(seconds=ago))

    # Leases: a live one here, one of a process that is gone, two of another host: one whose
    # beat stands still from here on, one that goes on beating (judged by this host's clock,
    # over scrapes: the times written in them are never compared with it).
    me = {"host": "here", "pid": os.getpid(), "pid_start": process_start_time(os.getpid())}
    _job_dir(spool, "running", "alive", {**me, "heartbeat": beat(0)})
    _job_dir(spool, "running", "orphan", {**me, "pid": 999_999_999, "heartbeat": beat(0)})
    _job_dir(spool, "running", "silent", {"host": "there", "pid": 1, "beat": 4})
    _job_dir(spool, "running", "beating", {"host": "there", "pid": 1, "beat": 9})
    outbox = spool.dir("outbox")
    for name in ("a~00000001.json", "a~00000002.json", "b~00000001.prepared"):
        (outbox / name).write_text("{}")
    (outbox / "failed").mkdir()
    (outbox / "failed" / "c~00000001.json").write_text("{}")
    samples = _samples(metrics.render()[0])
    assert _value(samples, "spoold_leases_stale") == 1, "only the orphan, at first sight"
    clock.advance(61.0)
    running = spool.dir("running")
    (running / "beating" / "lease").write_text(json.dumps({"host": "there", "pid": 1, "beat": 10}))
    samples = _samples(metrics.render()[0])
    jobs = {state: _value(samples, "spoold_jobs", state=state)
            for state in ("pending", "running", "succeeded", "failed", "rejected")}  # fmt: skip
    assert jobs == {"pending": 3, "running": 4, "succeeded": 5, "failed": 2, "rejected": 1}
    assert _value(samples, "spoold_schedules") == 1
    assert _value(samples, "spoold_leases_stale") == 2  # orphan and silent
    assert _value(samples, "spoold_callbacks_waiting") == 2
    assert _value(samples, "spoold_callbacks_given_up") == 1
    assert _value(samples, "spoold_incoming_files") == 2
    assert _value(samples, "spoold_incoming_oldest_age_seconds") == pytest.approx(151.0, abs=0.01)
    assert _value(samples, "spoold_hosts_alive") == 0, "no host has beaten in hosts/"
    assert _value(samples, "spoold_build_info", **BUILD) == 1

    # This host's daemon beats (and holds its lock); one other host stopped, one beats.
    spool.hosts.write("gone", {"host": "gone", "beat": 7, "stopped": True})
    spool.hosts.write("there", {"host": "there", "beat": 3})
    spool.hosts.write("here", {"host": "here", "beat": 1, "view": {
        "there": {"state": "alive", "beat": 3, "unchanged_for": 0.0},
        "gone": {"state": "gone", "beat": 7, "unchanged_for": 0.0},
    }})  # fmt: skip
    lock = spool.host_lock.acquire("here")
    try:
        (incoming / "old.yaml").unlink()
        (incoming / "new.yaml").unlink()
        samples = _samples(metrics.render()[0])
        assert _value(samples, "spoold_hosts_alive") == 2, "here and there; not gone"
        assert _value(samples, "spoold_incoming_oldest_age_seconds") == 0.0, "none waits"
    finally:
        lock.close()


def test_a_big_spools_counts_are_reused_for_a_while_in_proportion_to_their_cost(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool")
    spool.init()
    config = Config(spool=spool.root, hostname="here")
    # So dear that it is reused for the whole test; and one that is never reused.
    dear = Metrics(spool, config, FakeClock(T0), build_info=BUILD, count_reuse=1e9)
    fresh = Metrics(spool, config, FakeClock(T0), build_info=BUILD, count_reuse=0)
    assert _value(_samples(dear.render()[0]), "spoold_jobs", state="succeeded") == 0
    _job_dir(spool, "done", "a")
    assert _value(_samples(dear.render()[0]), "spoold_jobs", state="succeeded") == 0
    assert _value(_samples(fresh.render()[0]), "spoold_jobs", state="succeeded") == 1


def test_a_count_is_reused_for_count_reuse_times_what_it_cost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In proportion to its cost, not for a fixed time: a count of done/ that costs 10 ms is
    reused for 50 ms with ``count_reuse: 5``, then read again; a count that costs nothing is
    read at every scrape."""
    now = [1000.0]
    monkeypatch.setattr(metrics_module, "time", SimpleNamespace(monotonic=lambda: now[0]))
    spool = Spool(tmp_path / "spool")
    spool.init()
    count, dear_from = spool.count, []

    def priced(directory: str) -> int:
        if directory == "done":
            dear_from.append(now[0])
            now[0] += 0.01
        return count(directory)

    setattr(spool, "count", priced)  # noqa: B010 - a spy on the instance
    metrics = Metrics(spool, Config(spool=spool.root, hostname="here"), FakeClock(T0),
                      build_info=BUILD, count_reuse=5)  # fmt: skip

    def succeeded() -> object:
        return _value(_samples(metrics.render()[0]), "spoold_jobs", state="succeeded")

    def pending() -> object:
        return _value(_samples(metrics.render()[0]), "spoold_jobs", state="pending")

    assert succeeded() == 0
    first = dear_from[-1]
    _job_dir(spool, "done", "a")
    _job_dir(spool, "pending", "p")
    now[0] = first + 0.04
    assert succeeded() == 0, "reused: read 40 ms ago, at a cost of 10 ms"
    assert pending() == 1, "a count that cost nothing is read again"
    now[0] = first + 0.06
    assert succeeded() == 1, "read again: 60 ms is past 5 times its cost"


def test_a_figure_that_cannot_be_read_is_left_out_not_the_scrape(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path / "spool")
    spool.init()
    metrics = Metrics(spool, Config(spool=spool.root), FakeClock(T0), build_info=BUILD,
                      count_reuse=0, logger=LOGGER)  # fmt: skip
    spool.dir("incoming").rename(tmp_path / "elsewhere")
    with caplog.at_level(logging.WARNING, logger="spoold.test"):
        first = _samples(metrics.render()[0])
        metrics.render()
    assert ("spoold_incoming_files", frozenset()) not in first
    assert _value(first, "spoold_jobs", state="pending") == 0
    assert caplog.text.count("cannot count incoming") == 1, "logged once, not at every scrape"


def test_every_metric_is_described_as_it_is_rendered(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.init()
    metrics = Metrics(spool, Config(spool=spool.root), FakeClock(T0), build_info=BUILD)
    metrics.observe(Observation("finished", "j", "local", "failed", run_seconds=0.5))
    metrics.observe(Observation("started", "j", "local", "running", wait_seconds=0.5))
    metrics.schedule_fired(0.2)
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    rendered = {
        (f.name, f.type, f.documentation) for f in text_string_to_metric_families(body.decode())
    }
    described = {(d.name.removesuffix("_total"), d.type, d.help) for d in Metrics.describe()}
    assert rendered == described
    assert Metrics.describe() == list(METRICS)
    for doc in METRICS:
        assert doc.name.startswith("spoold_")
        assert doc.name.endswith("_total") == (doc.type == "counter"), doc.name
    assert b"_created" not in body
    samples = _samples(body)
    assert _value(samples, "spoold_schedule_lag_seconds_bucket", le="0.25") == 1
    assert _value(samples, "spoold_schedule_lag_seconds_bucket", le="0.1") == 0


def test_observations_from_many_threads_are_all_counted(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.init()
    metrics = Metrics(spool, Config(spool=spool.root), FakeClock(T0), build_info=BUILD)
    done = Observation("finished", "j", "ssh", "succeeded", run_seconds=0.01)

    def count() -> None:
        for _ in range(2000):
            metrics.observe(done)

    threads = [threading.Thread(target=count) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    samples = _samples(metrics.render()[0])
    assert (
        _value(samples, "spoold_jobs_finished_total", executor="ssh", outcome="succeeded") == 8000
    )
    assert _value(samples, "spoold_job_run_duration_seconds_count", executor="ssh") == 8000


# -- worker processes: their observations reach the main process ---------------------------------


class Gathered:
    """What the main process heard, on the worker processes' reader threads."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.seen: list[Observation] = []
        self.deferred: dict[str, float] = {}
        self._lock = threading.Lock()

    def observe(self, observation: Observation) -> None:
        with self._lock:
            self.seen.append(observation)
        self.metrics.observe(observation)

    def told(self, job_id: str, kind: str) -> bool:
        return any(seen == kind for seen, _ in self.of(job_id))

    def of(self, job_id: str) -> list[tuple[str, str]]:
        with self._lock:
            return [(o.kind, o.outcome) for o in self.seen if o.job_id == job_id]


def test_worker_processes_tell_the_main_process_what_they_did(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    Spool(root).init()
    # Kept for the test's life (worker_idle_exit 0): the two started are all it starts.
    config = load_config(write_config(tmp_path / "config.yaml", root, workers=2,
                                      worker_processes=2, worker_idle_exit=0), spool=root)  # fmt: skip
    spool, clock = Spool(root), SystemClock()
    gathered = Gathered(Metrics(spool, config, clock, build_info=BUILD, count_reuse=0))
    intake = Intake(spool, job_validator(ExecutorRegistry.from_entry_points()), clock,
                    max_file_size=1 << 20, settle_time=0, on_accepted=lambda job, document: None,
                    logger=LOGGER, on_observed=gathered.observe)  # fmt: skip
    workers = WorkerProcesses(
        config, LOGGER, processes=2, entry=WORKER_ENTRY, clock=clock, on_lost=lambda: None,
        on_deferred=gathered.deferred.__setitem__, on_cancel=lambda job_id, why: None,
        on_observed=gathered.observe, on_started=gathered.metrics.worker_process_started,
    )  # fmt: skip
    gate = tmp_path / "gate"
    jobs = {
        "ok": local_job("ok", "true"),
        "bad": local_job("bad", "exit 3"),
        "flaky": local_job("flaky", FLAKY, retries=1, backoff="100ms"),
        "long": local_job("long", f'while [ ! -e "{gate}" ]; do sleep 0.05; done'),
    }
    workers.start()
    try:
        for job_id, document in jobs.items():
            (spool.dir("incoming") / f"{job_id}.yaml").write_text(yaml.safe_dump(document))
            assert isinstance(intake.offer(f"{job_id}.yaml", complete=True), Accepted)
            workers.submit(job_id)
        due = wait_for(lambda: gathered.deferred.get("flaky"), what="flaky's retry")
        wait_for(lambda: time.time() >= due, what="flaky's retry to be due")
        workers.submit("flaky")
        wait_for(functools.partial(gathered.told, "long", "started"), what="long to start")
        JobControl(spool, clock, who="test").cancel("long")
        for job_id in jobs:
            told = functools.partial(gathered.told, job_id, "finished")
            wait_for(told, what=f"{job_id} to be told finished")
    finally:
        gate.touch()
        workers.stop(5.0)

    accepted, started = ("accepted", "pending"), ("started", "running")
    assert gathered.of("ok") == [accepted, started, ("finished", "succeeded")]
    assert gathered.of("bad") == [accepted, started, ("finished", "failed")]
    assert gathered.of("long") == [accepted, started, ("finished", "cancelled")]
    assert gathered.of("flaky") == [
        accepted,
        started,
        ("retrying", "pending"),
        started,
        ("finished", "succeeded"),
    ]
    assert all(o.executor == "local" for o in gathered.seen)
    waits = [o.wait_seconds for o in gathered.seen if o.kind == "started"]
    assert all(w is not None and 0 <= w < 60 for w in waits), waits
    runs = [o.run_seconds for o in gathered.seen if o.kind in ("retrying", "finished")]
    assert all(r is not None and 0 <= r < 60 for r in runs), runs

    samples = _samples(gathered.metrics.render()[0])
    finished = "spoold_jobs_finished_total"
    assert _value(samples, finished, executor="local", outcome="succeeded") == 2
    assert _value(samples, finished, executor="local", outcome="failed") == 1
    assert _value(samples, finished, executor="local", outcome="cancelled") == 1
    assert _value(samples, "spoold_job_retries_total", executor="local") == 1
    assert _value(samples, "spoold_worker_process_starts_total") == 2
    assert _value(samples, "spoold_job_run_duration_seconds_count", executor="local") == 5
    assert _value(samples, "spoold_job_queue_wait_seconds_count", executor="local") == 5
    assert _value(samples, "spoold_jobs", state="succeeded") == 2
    assert _value(samples, "spoold_jobs", state="failed") == 2  # failed/ holds the cancelled


class Overheard(WorkerProcesses):
    """Worker processes that keep whatever observation reaches them, asked for or not."""

    heard: list[Observation]

    def _observed(self, observation: Observation) -> None:
        self.heard.append(observation)


def test_worker_processes_send_nothing_when_no_one_counts(tmp_path: Path) -> None:
    """Without ``on_observed`` a worker process's runner has no listener (no message, no
    status read at a claim). Its claim would have been told long before its job is in done/."""
    root = tmp_path / "spool"
    Spool(root).init()
    config = load_config(write_config(tmp_path / "config.yaml", root, workers=1), spool=root)
    spool = Spool(root)
    intake = Intake(spool, job_validator(ExecutorRegistry.from_entry_points()), SystemClock(),
                    max_file_size=1 << 20, settle_time=0, on_accepted=lambda job, document: None,
                    logger=LOGGER)  # fmt: skip
    workers = Overheard(
        config, LOGGER, processes=1, entry=WORKER_ENTRY, clock=SystemClock(), on_lost=lambda: None,
        on_deferred=lambda job_id, due: None, on_cancel=lambda job_id, why: None,
    )  # fmt: skip
    workers.heard = []
    workers.start()
    try:
        (spool.dir("incoming") / "ok.yaml").write_text(yaml.safe_dump(local_job("ok", "true")))
        assert isinstance(intake.offer("ok.yaml", complete=True), Accepted)
        workers.submit("ok")
        wait_for((spool.dir("done") / "ok").is_dir, what="ok to finish")
        wait_for(lambda: not workers.in_flight(), what="its slot to be free")
    finally:
        workers.stop(5.0)
    assert workers.heard == []


def test_a_listener_built_for_a_runner_hands_on_what_it_counts() -> None:
    seen: list[Observation] = []
    tell = observed.listener(seen.append, FakeClock(T0 + timedelta(seconds=2)))
    tell(_change(P, R, _status(P)))
    tell(_change(F, P, _status(P, [(3, 5)])))  # `spoold retry`: not counted
    assert seen == [Observation("started", "j", "local", "running", wait_seconds=2.0)]


def test_a_pending_job_cancelled_is_counted_finished_and_never_started(parts: Parts) -> None:
    metrics = _metrics(parts)
    intake = _intake(parts, metrics.observe)
    _submit(parts, intake, {"job_id": "never", "executor": "local",
                            "product": {"commands": "true"}})  # fmt: skip
    seen: list[Observation] = []

    def observe(observation: Observation) -> None:
        seen.append(observation)
        metrics.observe(observation)

    control = JobControl(parts.spool, parts.clock, who="a test",
                         listeners=(observed.listener(observe, parts.clock),))  # fmt: skip
    assert control.cancel("never").cancelled
    assert [(o.kind, o.outcome) for o in seen] == [("finished", "cancelled")]
    samples = _samples(metrics.render()[0])
    assert _value(samples, "spoold_jobs_finished_total", executor="local",
                  outcome="cancelled") == 1  # fmt: skip
    assert ("spoold_job_queue_wait_seconds_count", frozenset({("executor", "local")})) not in (
        samples
    )  # no start was seen: no wait
