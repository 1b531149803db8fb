"""GET /metrics: what spoold counts, in Prometheus's text format (SPEC section 10).

Two kinds of figures, both in one registry of this object's own (never prometheus_client's
global one):

- Counted as it happens, in the daemon's main process: the observations
  (spoold.run.observed) of the changes of state made by its worker processes and its intake,
  handed to ``Metrics.observe``, and the schedules' firings (``schedule_fired``). They start
  at zero with the process, as Prometheus's counters may (``rate()`` and ``increase()`` take a
  restart in their stride). Not prometheus_client's multiprocess mode: it drops custom
  collectors and needs a directory wiped at every start; the process that sees a change is
  told of it instead (SPEC section 10).
- Counted from the spool at scrape time, through its stores: jobs by state, files waiting in
  incoming/, callbacks, stale leases, hosts. True after a restart, and on every host sharing
  the spool. Names are counted, never read; and a count is reused for a while in proportion
  to what it cost (``COUNT_REUSE``), so that a spool of 100,000 finished jobs scraped every
  second costs the daemon no more than a small one.

Counters and histograms are kept here, not in prometheus_client's own classes: one lock and a
few dictionary lookups per observation, and no ``_created`` series beside every counter.
"""

from __future__ import annotations

import bisect
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple, TypeVar, cast

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from spoold.core.clock import Clock
from spoold.core.config import Config
from spoold.core.errors import SpooldError
from spoold.core.spool import Spool
from spoold.face.views import hosts_rows
from spoold.out.notices import count_outbox
from spoold.run.observed import Observation
from spoold.run.recovery import Recovery


class MetricDoc(NamedTuple):
    """One metric as the README lists it."""

    name: str
    type: str  # counter | gauge | histogram
    labels: tuple[str, ...]
    help: str


# Seconds. A job runner's attempts run from a few milliseconds (a script) to hours (a backup,
# a VM clone); the buckets end at an hour, which +Inf counts beyond.
RUN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
               600.0, 1800.0, 3600.0)  # fmt: skip
#: Waiting for a slot: milliseconds when idle, up to an hour behind a backlog.
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                900.0, 3600.0)  # fmt: skip
#: From a file's arrival to its job in pending/: milliseconds with inotify; the settle time or
#: a rescan interval (seconds) when polling.
PICKUP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                  30.0, 60.0)  # fmt: skip
#: A firing's lateness: none to a few seconds, more when the daemon was down or stopped.
LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)

JOBS = MetricDoc(
    "spoold_jobs", "gauge", ("state",),
    "Jobs in the spool by state, counted from its directories at scrape time "
    "(failed includes cancelled jobs; rejected counts rejected files).",
)  # fmt: skip
SCHEDULES = MetricDoc("spoold_schedules", "gauge", (), "Schedules in scheduled/.")
INCOMING = MetricDoc(
    "spoold_incoming_files", "gauge", (), "Files in incoming/ waiting to be taken in."
)
INCOMING_AGE = MetricDoc(
    "spoold_incoming_oldest_age_seconds", "gauge", (),
    "Age of the oldest file waiting in incoming/, from its ctime (its arrival or last write); "
    "0 when none waits.",
)  # fmt: skip
CALLBACKS_WAITING = MetricDoc(
    "spoold_callbacks_waiting", "gauge", (),
    "Callback deliveries in outbox/ not yet acknowledged by their receiver.",
)  # fmt: skip
CALLBACKS_GIVEN_UP = MetricDoc(
    "spoold_callbacks_given_up", "gauge", (),
    "Callback deliveries given up after their last try (outbox/failed/), kept until purged.",
)  # fmt: skip
LEASES_STALE = MetricDoc(
    "spoold_leases_stale", "gauge", (),
    "Jobs in running/ whose worker is gone, as recovery judges them, not yet recovered.",
)  # fmt: skip
HOSTS_ALIVE = MetricDoc(
    "spoold_hosts_alive",
    "gauge",
    (),
    "spoold hosts serving this spool whose heartbeat moves (hosts/).",
)
BUILD_INFO = MetricDoc(
    "spoold_build_info", "gauge", ("version", "python"),
    "The running spoold's version and Python's, as labels; always 1.",
)  # fmt: skip
ACCEPTED = MetricDoc(
    "spoold_jobs_accepted_total", "counter", ("executor",),
    "New jobs accepted into pending/, from a file in incoming/ or the API.",
)  # fmt: skip
FINISHED = MetricDoc(
    "spoold_jobs_finished_total", "counter", ("executor", "outcome"),
    "Jobs that ended, by outcome: succeeded, failed or cancelled (after their last attempt).",
)  # fmt: skip
RETRIES = MetricDoc(
    "spoold_job_retries_total", "counter", ("executor",),
    "Failed attempts sent back to pending/ for a retry (retries:).",
)  # fmt: skip
RUN_DURATION = MetricDoc(
    "spoold_job_run_duration_seconds", "histogram", ("executor",),
    "Wall time of each attempt, from its start to its end.",
)  # fmt: skip
QUEUE_WAIT = MetricDoc(
    "spoold_job_queue_wait_seconds", "histogram", ("executor",),
    "Time from a job being ready to run (submitted, or its retry due) to a worker taking it.",
)  # fmt: skip
PICKUP_LATENCY = MetricDoc(
    "spoold_pickup_latency_seconds", "histogram", (),
    "Time from a file's arrival in incoming/ (its ctime) to its job being in pending/.",
)  # fmt: skip
SCHEDULE_LAG = MetricDoc(
    "spoold_schedule_lag_seconds", "histogram", (),
    "How late a schedule's firing came after the time it was due.",
)  # fmt: skip

# -- what attempts cost: status.json's ``usage`` (the wall time is RUN_DURATION's) -----------

#: Bytes: a shell's few MB to a VM image's tens of GB.
MEMORY_BUCKETS = tuple(float(mib * 2**20) for mib in (4, 16, 32, 64, 128, 256, 512, 1024, 2048,
                                                      4096, 8192, 16384, 65536))  # fmt: skip
#: Bytes of output: none, a line, to a chatty build's gigabyte.
OUTPUT_BUCKETS = (0.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9)
CPU_USED = MetricDoc(
    "spoold_job_cpu_seconds", "histogram", ("executor",),
    "CPU time (user + system) of each attempt's work, where its executor can tell.",
)  # fmt: skip
PEAK_MEMORY = MetricDoc(
    "spoold_job_peak_memory_bytes", "histogram", ("executor",),
    "Peak memory of each attempt's work (the largest max RSS of one of its processes, or the "
    "container's peak), where its executor can tell.",
)  # fmt: skip
OUTPUT_WRITTEN = MetricDoc(
    "spoold_job_output_bytes", "histogram", ("executor",),
    "Bytes each attempt's work wrote to its stdout and stderr.",
)  # fmt: skip
USAGE_METRICS = (CPU_USED, PEAK_MEMORY, OUTPUT_WRITTEN)

# -- notifications (spoold.out.notify) --------------------------------------------------------

NOTIFICATIONS_FOLDED = MetricDoc(
    "spoold_notifications_folded_total", "counter", ("kind",),
    "Notifications sent folded into a digest (one message per target and window), by target "
    "kind: email or webhook.",
)  # fmt: skip

# -- worker processes (spoold.run.pool) -------------------------------------------------------

WORKER_PROCESS_STARTS = MetricDoc(
    "spoold_worker_process_starts_total", "counter", (),
    "Worker processes started: at the daemon's start, for jobs after idle ones left, and in "
    "place of one that died. Each is a new interpreter (~0.15 s of CPU): what the memory "
    "given back between jobs costs (worker_idle_exit).",
)  # fmt: skip

#: Every metric, in the order /metrics gives them.
METRICS = (
    JOBS, SCHEDULES, INCOMING, INCOMING_AGE, CALLBACKS_WAITING, CALLBACKS_GIVEN_UP, LEASES_STALE,
    HOSTS_ALIVE, BUILD_INFO, ACCEPTED, FINISHED, RETRIES, RUN_DURATION, QUEUE_WAIT,
    PICKUP_LATENCY, SCHEDULE_LAG, *USAGE_METRICS, NOTIFICATIONS_FOLDED, WORKER_PROCESS_STARTS,
)  # fmt: skip

#: ``spoold_jobs``'s states and the directory each is counted from.
STATE_DIRECTORIES = (
    ("pending", "pending"), ("running", "running"), ("succeeded", "done"), ("failed", "failed"),
    ("rejected", "rejected"),
)  # fmt: skip
#: A job's outcomes. Each executor's counters are all shown from its first job on, 0 until
#: used, so that a rate() over them has a series to start from.
OUTCOMES = ("succeeded", "failed", "cancelled")
_UNKNOWN = "unknown"  # the executor of a job whose status could not be read
#: Counting done/ of 100,000 jobs takes ~50 ms (ext4): reused for up to 100 times as long, a
#: count costs at most ~1% of a core (and of the main process's GIL) however often /metrics
#: is scraped, and its figure lags by at most ~5 s; a small spool's are fresh at every scrape.
COUNT_REUSE = 100.0

T = TypeVar("T")


class _Histogram:
    """Bucket counts (not cumulative: each observation adds to one), their sum and count."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.total = 0.0

    def add(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative, with ``le`` as Prometheus writes it, +Inf last."""
        running, found = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            found.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return found


class Metrics:
    """The daemon's metrics: ``observe`` and ``schedule_fired`` as things happen, ``render``
    for GET /metrics. Thread-safe: observations come from each worker process's reader thread
    and intake's threads, scrapes from the API's."""

    def __init__(
        self,
        spool: Spool,
        config: Config,
        clock: Clock,
        *,
        build_info: dict[str, str],
        logger: logging.Logger | None = None,
        count_reuse: float = COUNT_REUSE,
    ) -> None:
        """``build_info``: the labels of ``spoold_build_info`` (``version``, ``python``).
        ``count_reuse``: a figure read from the spool is reused for up to this many times
        the time its reading took (0: read at every scrape)."""
        self._spool = spool
        self._config = config
        self._clock = clock
        self._build_info = dict(build_info)
        self._logger = logger or logging.getLogger("spoold")
        # Judges leases as recovery does; it only reads (its judge() writes nothing).
        self._recovery = Recovery(spool, config, clock, self._logger)
        self._lock = threading.Lock()
        self._executors: set[str] = set()
        self._accepted: dict[str, int] = {}
        self._finished: dict[tuple[str, str], int] = {}
        self._retries: dict[str, int] = {}
        self._run: dict[str, _Histogram] = {}
        self._wait: dict[str, _Histogram] = {}
        self._pickup = _Histogram(PICKUP_BUCKETS)
        self._lag = _Histogram(LAG_BUCKETS)
        self._folded: dict[str, int] = {}  # notifications folded, by target kind
        self._worker_starts = 0
        self._cpu: dict[str, _Histogram] = {}
        self._peak: dict[str, _Histogram] = {}
        self._output: dict[str, _Histogram] = {}
        self._count_reuse = count_reuse
        # Spool figures as last read: (value, until when it may be reused; time.monotonic()).
        self._kept: dict[str, tuple[object, float]] = {}
        self._failing: set[str] = set()  # spool figures that could not be read last time
        self.registry = CollectorRegistry()
        self.registry.register(_SpoolCollector(self))
        self.registry.register(_CountedCollector(self))

    @staticmethod
    def describe() -> list[MetricDoc]:
        """Every metric: name, type, labels and help, as /metrics says them (for the README)."""
        return list(METRICS)

    def observe(self, observation: Observation) -> None:
        """Count one change of a job's state. Cheap, and never raises for a strange one."""
        executor = observation.executor or _UNKNOWN
        kind, run = observation.kind, observation.run_seconds
        with self._lock:
            if executor not in self._executors:
                self._seen(executor)
            if kind == "started":
                if observation.wait_seconds is not None:
                    self._histogram(self._wait, executor, WAIT_BUCKETS).add(
                        observation.wait_seconds
                    )
            elif kind == "finished":
                key = (executor, observation.outcome)
                self._finished[key] = self._finished.get(key, 0) + 1
            elif kind == "accepted":
                self._accepted[executor] = self._accepted.get(executor, 0) + 1
                if observation.pickup_seconds is not None:
                    self._pickup.add(observation.pickup_seconds)
            elif kind == "retrying":
                self._retries[executor] = self._retries.get(executor, 0) + 1
            if run is not None:
                self._histogram(self._run, executor, RUN_BUCKETS).add(run)
            # An attempt ended: what it cost, where its executor could tell.
            for histograms, figure, buckets in (
                (self._cpu, observation.cpu_seconds, RUN_BUCKETS),
                (self._peak, observation.peak_memory_bytes, MEMORY_BUCKETS),
                (self._output, observation.output_bytes, OUTPUT_BUCKETS),
            ):
                if figure is not None:
                    self._histogram(histograms, executor, buckets).add(figure)

    def schedule_fired(self, lag_seconds: float) -> None:
        """Count one firing of a schedule, ``lag_seconds`` after it was due."""
        with self._lock:
            self._lag.add(max(lag_seconds, 0.0))

    def notifications_folded(self, kind: str, count: int) -> None:
        """Count ``count`` notifications sent folded into one digest to a ``kind`` target."""
        with self._lock:
            self._folded[kind] = self._folded.get(kind, 0) + count

    def worker_process_started(self) -> None:
        """Count one worker process started (spoold.run.pool.WorkerProcesses)."""
        with self._lock:
            self._worker_starts += 1

    def render(self) -> tuple[bytes, str]:
        """The body of GET /metrics and its content type (Prometheus's text format 0.0.4)."""
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4

    # -- under the lock ---------------------------------------------------------------------

    def _seen(self, executor: str) -> None:
        """An executor's first job: its counters are shown from now on, at 0 until used."""
        self._executors.add(executor)
        self._accepted.setdefault(executor, 0)
        self._retries.setdefault(executor, 0)
        for outcome in OUTCOMES:
            self._finished.setdefault((executor, outcome), 0)

    @staticmethod
    def _histogram(
        found: dict[str, _Histogram], executor: str, bounds: tuple[float, ...]
    ) -> _Histogram:
        histogram = found.get(executor)
        if histogram is None:
            histogram = found[executor] = _Histogram(bounds)
        return histogram

    # -- the collectors' work ---------------------------------------------------------------

    def counted(self) -> Iterator[Metric]:
        """The families of what was counted as it happened: a copy taken under the lock."""
        with self._lock:
            accepted, finished = dict(self._accepted), dict(self._finished)
            retries = dict(self._retries)
            run = {name: (h.buckets(), h.total) for name, h in self._run.items()}
            wait = {name: (h.buckets(), h.total) for name, h in self._wait.items()}
            pickup = (self._pickup.buckets(), self._pickup.total)
            lag = (self._lag.buckets(), self._lag.total)
            folded = sorted(self._folded.items())
            worker_starts = self._worker_starts
            usage = [
                (doc, {name: (h.buckets(), h.total) for name, h in histograms.items()})
                for doc, histograms in ((CPU_USED, self._cpu), (PEAK_MEMORY, self._peak),
                                        (OUTPUT_WRITTEN, self._output))
            ]  # fmt: skip
        yield _counter(ACCEPTED, [((executor,), n) for executor, n in sorted(accepted.items())])
        yield _counter(FINISHED, sorted(finished.items()))
        yield _counter(RETRIES, [((executor,), n) for executor, n in sorted(retries.items())])
        yield _histograms(RUN_DURATION, {(name,): each for name, each in run.items()})
        yield _histograms(QUEUE_WAIT, {(name,): each for name, each in wait.items()})
        yield _histograms(PICKUP_LATENCY, {(): pickup})
        yield _histograms(SCHEDULE_LAG, {(): lag})
        yield _counter(NOTIFICATIONS_FOLDED, [((kind,), n) for kind, n in folded])
        yield _counter(WORKER_PROCESS_STARTS, [((), worker_starts)])
        for doc, each in usage:
            yield _histograms(doc, {(name,): figures for name, figures in each.items()})

    def from_spool(self) -> Iterator[Metric]:
        """The families counted from the spool now (or as lately as ``count_reuse`` lets a
        count be reused); a figure that cannot be read is left out, never the whole scrape."""
        spool = self._spool
        jobs = GaugeMetricFamily(JOBS.name, JOBS.help, labels=JOBS.labels)
        for state, directory in STATE_DIRECTORIES:
            if (count := self._count(directory)) is not None:
                jobs.add_metric([state], float(count))
        yield jobs
        if (schedules := self._count("scheduled")) is not None:
            yield _gauge(SCHEDULES, schedules)
        if (incoming := self._read("incoming", spool.stages.waiting_incoming)) is not None:
            count, oldest = incoming
            age = 0.0 if oldest is None else max(self._clock.now().timestamp() - oldest, 0.0)
            yield _gauge(INCOMING, count)
            yield _gauge(INCOMING_AGE, age)
        if (callbacks := self._read("outbox", self._callbacks)) is not None:
            yield _gauge(CALLBACKS_WAITING, callbacks[0])
            yield _gauge(CALLBACKS_GIVEN_UP, callbacks[1])
        if (stale := self._read("leases", self._stale_leases)) is not None:
            yield _gauge(LEASES_STALE, stale)
        if (hosts := self._read("hosts", self._hosts_alive)) is not None:
            yield _gauge(HOSTS_ALIVE, hosts)
        labels = tuple(sorted(self._build_info))
        build = GaugeMetricFamily(BUILD_INFO.name, BUILD_INFO.help, labels=labels)
        build.add_metric([self._build_info[label] for label in labels], 1.0)
        yield build

    def _read(self, name: str, read: Callable[[], T]) -> T | None:
        """What ``read`` finds in the spool, or what it found lately, if that was less than
        ``count_reuse`` times its reading's own cost ago; None (logged once, until it can be
        read again) if it cannot be read."""
        # Real time, not the injected clock: this bounds what counting costs, in CPU.
        began = time.monotonic()
        kept = self._kept.get(name)
        if kept is not None and began < kept[1]:
            return cast("T", kept[0])
        try:
            found = read()
        except (OSError, SpooldError) as exc:
            if name not in self._failing:
                self._failing.add(name)
                self._logger.warning("metrics: cannot count %s: %s", name, exc)
            return None
        self._failing.discard(name)
        took = time.monotonic() - began
        self._kept[name] = (found, began + took * self._count_reuse)
        return found

    def _count(self, directory: str) -> int | None:
        """How many entries a directory of the spool holds: names only, nothing read."""
        return self._read(directory, functools.partial(self._spool.count, directory))

    def _callbacks(self) -> tuple[int, int]:
        """Callback deliveries waiting and given up, as ``spoold status`` counts them."""
        counted = count_outbox(self._spool.deliveries)
        return counted.callbacks_waiting, counted.callbacks_given_up

    def _stale_leases(self) -> int:
        stale = 0
        for job in self._spool.jobs.list_jobs("running"):
            try:
                stale += self._recovery.judge(job, own_runs=frozenset()).gone
            except (OSError, SpooldError, ValueError):
                continue  # finished while we looked, or a lease half-written
        return stale

    def _hosts_alive(self) -> int:
        """The hosts this host's daemon sees alive in hosts/ (itself included)."""
        return sum(1 for row in hosts_rows(self._spool, self._config) if row["state"] == "alive")


class _SpoolCollector:
    """What ``Metrics`` counts from the spool, at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics.from_spool()


class _CountedCollector:
    """What ``Metrics`` counted as it happened."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics.counted()


def _gauge(doc: MetricDoc, value: float) -> Metric:
    return GaugeMetricFamily(doc.name, doc.help, value=float(value))


def _counter(doc: MetricDoc, samples: Iterable[tuple[tuple[str, ...], int]]) -> Metric:
    family = CounterMetricFamily(doc.name, doc.help, labels=doc.labels)
    for labels, value in samples:
        family.add_metric(list(labels), float(value))
    return family


def _histograms(
    doc: MetricDoc, found: dict[tuple[str, ...], tuple[Sequence[tuple[str, float]], float]]
) -> Metric:
    family = HistogramMetricFamily(doc.name, doc.help, labels=doc.labels)
    for labels, (buckets, total) in sorted(found.items()):
        family.add_metric(list(labels), list(buckets), total)
    return family
