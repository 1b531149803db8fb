"""The HTTP API's cost to the job path, and its latency under load (issue 19), on loopback.

1. Throughput, API off against API on: N ``true`` jobs renamed into incoming/ at once, 2
   workers, first rename -> last job in done/ (bench_spool's measure). The "on" daemon serves
   the API and, while its jobs run, a scraper GETs /metrics and GET /api/v1/jobs?limit=50 every
   second (Prometheus and a dashboard). The two daemons take turns in rounds (which goes first
   alternates); each round's on/off ratio is taken within the round, where both met the same
   machine. Daemon CPU per job (all the daemon's processes, the jobs excluded) is steadier.
   The scrapes' own latencies are kept: how the API answers while 1000 jobs run.
2. Latency: 20 client threads, each with a keep-alive ``requests.Session``, looping over
   GET /api/v1/jobs/{id} (a finished job), GET /api/v1/jobs?limit=50 and POST /api/v1/jobs (a
   small ``true`` job) for 30 s: once with no other work ("idle": only the posted jobs run),
   once with 1000 jobs dropped into incoming/ as the clients start ("loaded"; its samples taken
   while those 1000 were unfinished are also shown apart). Each phase has a fresh spool and
   daemon, so that neither inherits the other's backlog of posted jobs.

Every loop is bounded by time and by a count; every wait is bounded; daemons are stopped and the
temporary directory removed on the way out (also on Ctrl-C). Everything is on 127.0.0.1.

Usage: .venv/bin/python benchmarks/bench_api.py [--quick] [--json FILE] [--dir DIR]
       [--jobs N] [--rounds N] [--clients N] [--window SECONDS]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests

if __package__ in (None, ""):  # run as a script: the project root is one up
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_spool import (
    Daemon,
    Finished,
    Run,
    Tool,
    load_average,
    percentile,
    say,
    spoold_cli,
    spread_subdirectories,
    stage_jobs,
    throughput,
)

SCRAPE_INTERVAL = 1.0  # seconds between two scrapes (Prometheus' common 15 s, made harsher)
REQUEST_TIMEOUT = 10.0  # seconds; a request that takes longer counts as an error
LOOPS_PER_CLIENT = 200_000  # the count bound of each client's loop (time is the other)
JOBS_PATH = "/api/v1/jobs"
LIST_PATH = "/api/v1/jobs?limit=50"
POSTED_JOB = "executor: local\nproduct: {commands: 'true'}\n"
ENDPOINTS = ("GET /api/v1/jobs/{id}", "GET /api/v1/jobs?limit=50", "POST /api/v1/jobs")


@dataclass(frozen=True)
class Sizes:
    jobs: int  # throughput: jobs dropped at once per run
    rounds: int  # throughput: runs per daemon (off and on alternate)
    warmup: int  # jobs each daemon runs once before the rounds, not counted
    clients: int  # latency: client threads
    window: float  # latency: seconds each phase's clients run
    load_jobs: int  # latency: jobs dropped into incoming/ for the loaded phase


FULL = Sizes(jobs=1000, rounds=5, warmup=100, clients=20, window=30.0, load_jobs=1000)
QUICK = Sizes(jobs=200, rounds=2, warmup=50, clients=20, window=5.0, load_jobs=1000)


# -- the daemons ------------------------------------------------------------------------------


def free_port() -> int:
    """A port free on 127.0.0.1 now (bound and released: a race only with another binder)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Served:
    """A spoold daemon, its tree, and (with the API on) where and how to call it."""

    tool: Tool
    url: str | None = None  # None: the API is off
    token: str = ""

    def session(self) -> requests.Session:
        """A keep-alive session with the token; one per thread (a Session is not thread-safe)."""
        session = requests.Session()
        session.trust_env = False  # no proxy or netrc look-ups: loopback, and less client work
        session.headers["Authorization"] = f"Bearer {self.token}"
        return session


def make_served(name: str, base: Path, workers: int, *, api: bool) -> Served:
    """A fresh spool under ``base/name``, its config (the API on or off), an admin token, and
    its daemon (not started). Both configs are the same but for ``api:``."""
    home = base / name
    home.mkdir()
    spool = home / "spool"
    cli = spoold_cli()
    subprocess.run([*cli, "init", "--spool", str(spool)], check=True, capture_output=True)
    config = home / "config.yaml"
    text = f"workers: {workers}\nrescan_interval: 30s\nlog_level: warning\n"
    url = None
    if api:
        listen = f"127.0.0.1:{free_port()}"
        text += f"api: {{listen: '{listen}'}}\n"
        url = f"http://{listen}"
    config.write_text(text)
    token = ""
    if api:
        made = subprocess.run(
            [*cli, "token", "create", "--name", "bench", "--scope", "admin",
             "--spool", str(spool), "--config", str(config)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        token = made.stdout.strip()
    argv = [*cli, "run", "--spool", str(spool), "--config", str(config)]
    tool = Tool(name, spool, Daemon(name, argv, home / "daemon.log"), home / "done.aside")
    return Served(tool, url, token)


# -- requests and what they took -------------------------------------------------------------


@dataclass
class Sample:
    endpoint: str
    started: float  # time.monotonic() when it was sent
    seconds: float
    error: str | None  # None: the expected status


@dataclass
class Recorder:
    """Samples from several threads, and the first words of each kind of error."""

    samples: list[Sample] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, batch: list[Sample]) -> None:
        with self.lock:
            self.samples.extend(batch)
            self.errors.update(s.error for s in batch if s.error is not None)


def timed(
    session: requests.Session, endpoint: str, method: str, url: str, expect: int, **kwargs: Any
) -> tuple[Sample, requests.Response | None]:
    """One request, timed from before sending to the whole body read."""
    started = time.monotonic()
    try:
        answer = session.request(method, url, timeout=REQUEST_TIMEOUT, **kwargs)
        _ = answer.content  # read in full: the time is the client's whole wait
    except requests.RequestException as exc:
        failed = f"{endpoint}: {type(exc).__name__}: {str(exc)[:80]}"
        return Sample(endpoint, started, time.monotonic() - started, failed), None
    seconds = time.monotonic() - started
    error = None
    if answer.status_code != expect:
        error = f"{endpoint}: {answer.status_code} {answer.text[:80]!r}"
    return Sample(endpoint, started, seconds, error), answer


def post_job(session: requests.Session, url: str) -> tuple[Sample, requests.Response | None]:
    headers = {"Content-Type": "application/yaml"}
    return timed(session, ENDPOINTS[2], "POST", url + JOBS_PATH, 201, data=POSTED_JOB,
                 headers=headers)  # fmt: skip


class Scraper(threading.Thread):
    """GET /metrics and GET /api/v1/jobs?limit=50 every ``interval`` seconds until stopped,
    ``bound`` seconds have passed, or ``max_scrapes`` were made."""

    def __init__(self, served: Served, interval: float, bound: float, max_scrapes: int) -> None:
        super().__init__(name="scraper", daemon=True)
        assert served.url is not None
        self.url = served.url
        self.session = served.session()
        self.interval = interval
        self.bound = bound
        self.max_scrapes = max_scrapes
        self.recorder = Recorder()
        self.stopped = threading.Event()

    def run(self) -> None:
        end = time.monotonic() + self.bound
        with self.session:
            for scrape in range(self.max_scrapes):
                due = time.monotonic()
                batch = [
                    timed(self.session, "GET /metrics", "GET", self.url + "/metrics", 200)[0],
                    timed(self.session, ENDPOINTS[1], "GET", self.url + LIST_PATH, 200)[0],
                ]
                self.recorder.add(batch)
                if scrape + 1 == self.max_scrapes:
                    break
                wait = due + self.interval - time.monotonic()
                if self.stopped.wait(max(wait, 0)) or time.monotonic() > end:
                    break

    def stop(self) -> Recorder:
        self.stopped.set()
        self.join(REQUEST_TIMEOUT * 2 + 5)
        return self.recorder


def client(served: Served, job_id: str, end: float, stop: threading.Event, out: Recorder) -> None:
    """One client's loop: the three endpoints in turn, until ``end``, ``stop`` or the count."""
    assert served.url is not None
    one = f"{served.url}{JOBS_PATH}/{job_id}"
    batch: list[Sample] = []
    with served.session() as session:
        for _ in range(LOOPS_PER_CLIENT):
            if time.monotonic() >= end or stop.is_set():
                break
            batch.append(timed(session, ENDPOINTS[0], "GET", one, 200)[0])
            batch.append(timed(session, ENDPOINTS[1], "GET", served.url + LIST_PATH, 200)[0])
            batch.append(post_job(session, served.url)[0])
    out.add(batch)


def stats(samples: list[Sample], seconds: float) -> dict[str, Any]:
    """Count, rate, p50/p99/max (ms, of the answers as expected) and errors of some samples."""
    good = [s.seconds * 1000 for s in samples if s.error is None]
    return {
        "count": len(samples),
        "per_s": len(samples) / seconds if seconds > 0 else math.nan,
        "p50_ms": percentile(good, 50),
        "p99_ms": percentile(good, 99),
        "max_ms": max(good, default=math.nan),
        "errors": len(samples) - len(good),
    }


def by_endpoint(samples: list[Sample], seconds: float) -> dict[str, dict[str, Any]]:
    names = sorted({s.endpoint for s in samples}, key=lambda e: (e not in ENDPOINTS, e))
    return {e: stats([s for s in samples if s.endpoint == e], seconds) for e in names}


# -- 1. throughput, the API off and on ---------------------------------------------------------


@dataclass
class Round:
    off: Run
    on: Run
    first: str  # which daemon ran first in this round
    scrapes: list[Sample]

    @property
    def ratio(self) -> float:
        return self.on.jobs_per_s / self.off.jobs_per_s


def run_with_scraper(served: Served, ids: list[str], base: Path) -> tuple[Run, list[Sample]]:
    bound = max(120.0, len(ids) / 5) * 2 + 10  # throughput()'s two waits, and a margin
    scraper = Scraper(served, SCRAPE_INTERVAL, bound, max_scrapes=int(bound / SCRAPE_INTERVAL))
    scraper.start()
    try:
        run = throughput(served.tool, ids, base)
    finally:
        recorder = scraper.stop()
    return run, recorder.samples


def measure_throughput(off: Served, on: Served, sizes: Sizes, base: Path) -> list[Round]:
    for served in (off, on):
        say(f"warm-up: {sizes.warmup} jobs on {served.tool.name}")
        throughput(served.tool, [f"warm-{served.tool.name}-{i:05d}" for i in range(sizes.warmup)],
                   base)  # fmt: skip
    rounds = []
    for number in range(sizes.rounds):
        order = ("off", "on") if number % 2 == 0 else ("on", "off")
        runs: dict[str, Run] = {}
        scrapes: list[Sample] = []
        for which in order:
            served = off if which == "off" else on
            ids = [f"r{number}-{which}-{i:05d}" for i in range(sizes.jobs)]
            say(f"round {number + 1}/{sizes.rounds}: API {which}, {sizes.jobs} jobs")
            if which == "on":
                runs[which], scrapes = run_with_scraper(served, ids, base)
            else:
                runs[which] = throughput(served.tool, ids, base)
        rounds.append(Round(runs["off"], runs["on"], order[0], scrapes))
        say(f"  off {runs['off'].jobs_per_s:.0f} jobs/s, on {runs['on'].jobs_per_s:.0f} jobs/s")
    return rounds


# -- 2. latency under load ---------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    seconds: float  # how long the clients ran, first start to last end
    samples: list[Sample]
    errors: collections.Counter[str]
    daemon_cpu: float  # seconds of CPU, all the daemon's processes, over the window
    client_cpu_percent: float  # this process (the clients), of one core
    load_dropped: float = math.nan  # loaded: time.monotonic() when the drops began
    load_done_after: float | None = None  # loaded: seconds until the dropped jobs were all done
    load_unfinished: int = 0  # loaded: dropped jobs not done by the end of the window
    load_failed: int = 0


def finished_probe(served: Served, bound: float = 60.0) -> str:
    """Submit one job through the API and wait (bounded) until it has succeeded: its id."""
    assert served.url is not None
    with served.session() as session:
        sample, answer = post_job(session, served.url)
        if sample.error is not None or answer is None:
            raise RuntimeError(f"the probe job was not accepted: {sample.error}")
        job_id = str(answer.json()["job_id"])
        end = time.monotonic() + bound
        while time.monotonic() < end:
            shown = session.get(f"{served.url}{JOBS_PATH}/{job_id}", timeout=REQUEST_TIMEOUT)
            if shown.status_code == 200 and shown.json()["state"] == "succeeded":
                return job_id
            time.sleep(0.05)  # a poll, bounded by ``end``
    raise TimeoutError(f"the probe job {job_id} did not succeed within {bound:.0f}s")


def latency_phase(served: Served, sizes: Sizes, base: Path, *, loaded: bool) -> Phase:
    """``sizes.clients`` clients for ``sizes.window`` s; with ``loaded``, ``sizes.load_jobs``
    jobs are renamed into incoming/ as they start."""
    name = "loaded" if loaded else "idle"
    probe = finished_probe(served)
    ids = [f"load-{i:05d}" for i in range(sizes.load_jobs)] if loaded else []
    names = stage_jobs(base / "stage", ids, "true")
    recorder = Recorder()
    stop = threading.Event()
    cpu_before, client_before = served.tool.daemon.cpu_seconds(), time.process_time()
    began = time.monotonic()
    end = began + sizes.window
    threads = [
        threading.Thread(target=client, args=(served, probe, end, stop, recorder),
                         name=f"client-{i}", daemon=True)
        for i in range(sizes.clients)
    ]  # fmt: skip
    phase = Phase(name, 0.0, [], collections.Counter(), 0.0, 0.0)
    try:
        with Finished(served.tool.spool, ids) if loaded else contextlib.nullcontext() as done:
            for thread in threads:
                thread.start()
            if isinstance(done, Finished):
                phase.load_dropped, dropped_at = time.monotonic(), time.time()
                for file_name in names:
                    os.rename(base / "stage" / file_name, served.tool.incoming / file_name)
                with contextlib.suppress(TimeoutError):
                    done.wait(max(end - time.monotonic(), 0.1))
                if not done.remaining:
                    phase.load_done_after = done.completed_at - dropped_at  # both wall-clock
                phase.load_unfinished, phase.load_failed = len(done.remaining), len(done.failed)
            for thread in threads:
                thread.join(max(end - time.monotonic(), 0) + REQUEST_TIMEOUT * 3 + 5)
    finally:
        stop.set()  # Ctrl-C or an error: the clients end at their next request
    elapsed = time.monotonic() - began
    if any(thread.is_alive() for thread in threads):
        say(f"{name}: a client is still in a request after the window and its bound")
    phase.seconds = elapsed
    phase.samples, phase.errors = recorder.samples, recorder.errors
    phase.daemon_cpu = served.tool.daemon.cpu_seconds() - cpu_before
    phase.client_cpu_percent = 100 * (time.process_time() - client_before) / elapsed
    return phase


def phase_summary(phase: Phase, load_jobs: int) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "seconds": phase.seconds,
        "daemon_cpu_percent_of_a_core": 100 * phase.daemon_cpu / phase.seconds,
        "client_cpu_percent_of_a_core": phase.client_cpu_percent,
        # the daemon's CPU over the window per request made, the posted jobs' runs included
        "daemon_cpu_ms_per_request": phase.daemon_cpu * 1000 / max(len(phase.samples), 1),
        "endpoints": by_endpoint(phase.samples, phase.seconds),
        "errors": dict(phase.errors.most_common(5)),
    }
    if phase.name == "loaded":
        summary["load_jobs"] = load_jobs
        summary["load_done_after_s"] = phase.load_done_after
        summary["load_unfinished"] = phase.load_unfinished
        summary["load_failed"] = phase.load_failed
        if phase.load_done_after is not None:
            until = phase.load_dropped + phase.load_done_after
            busy = [s for s in phase.samples if s.started < until]
            summary["while_load_ran"] = by_endpoint(busy, phase.load_done_after)
    return summary


# -- the run -----------------------------------------------------------------------------------


def finite(value: Any) -> Any:
    """NaN and infinities as null: JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def throughput_summary(rounds: list[Round]) -> dict[str, Any]:
    scrapes = [s for r in rounds for s in r.scrapes]
    return {
        "rounds": [
            {"first": r.first, "off": asdict(r.off), "on": asdict(r.on), "ratio": r.ratio}
            for r in rounds
        ],
        "median_ratio_on_off": statistics.median(r.ratio for r in rounds),
        "median_jobs_per_s": {
            "off": statistics.median(r.off.jobs_per_s for r in rounds),
            "on": statistics.median(r.on.jobs_per_s for r in rounds),
        },
        "median_cpu_ms_per_job": {
            "off": statistics.median(r.off.cpu_ms_per_job for r in rounds),
            "on": statistics.median(r.on.cpu_ms_per_job for r in rounds),
        },
        "median_cpu_ratio_on_off": statistics.median(
            r.on.cpu_ms_per_job / r.off.cpu_ms_per_job for r in rounds
        ),
        "failed_jobs": sum(r.off.failed + r.on.failed for r in rounds),
        "late_jobs": sum(r.off.late + r.on.late for r in rounds),
        "scrapes_while_jobs_ran": by_endpoint(scrapes, 0.0),  # a rate says nothing here
        "scrape_errors": dict(
            collections.Counter(s.error for s in scrapes if s.error is not None).most_common(5)
        ),
    }


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def table(summary: dict[str, Any]) -> str:
    sizes = summary["sizes"]
    t = summary["throughput"]
    lines = [
        f"1. throughput, {sizes['jobs']} `true` jobs, 2 workers: API off against API on "
        f"(/metrics and /jobs?limit=50 scraped every {SCRAPE_INTERVAL:.0f} s)",
        f"{'round':<8}{'first':>6}{'off j/s':>9}{'on j/s':>9}{'on/off':>8}"
        f"{'off CPU ms/job':>16}{'on CPU ms/job':>15}",
    ]
    for number, r in enumerate(t["rounds"], 1):
        lines.append(
            f"{number:<8}{r['first']:>6}{r['off']['jobs_per_s']:>9.0f}{r['on']['jobs_per_s']:>9.0f}"
            f"{r['ratio']:>8.2f}{r['off']['cpu_ms_per_job']:>16.2f}{r['on']['cpu_ms_per_job']:>15.2f}"
        )
    med = t["median_jobs_per_s"]
    cpu = t["median_cpu_ms_per_job"]
    lines.append(
        f"{'median':<14}{med['off']:>9.0f}{med['on']:>9.0f}{t['median_ratio_on_off']:>8.2f}"
        f"{cpu['off']:>16.2f}{cpu['on']:>15.2f}   (CPU on/off {t['median_cpu_ratio_on_off']:.2f})"
    )
    lines.append("")
    header = f"{'':<34}{'count':>7}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'errors':>8}"

    def rows(title: str, endpoints: dict[str, dict[str, Any]], rate: bool = True) -> None:
        lines.append(title)
        lines.append(header)
        for name, s in endpoints.items():
            lines.append(
                f"  {name:<32}{s['count']:>7}{fmt(s['per_s'] if rate else None, '.0f'):>8}"
                f"{fmt(s['p50_ms'], '.1f'):>9}{fmt(s['p99_ms'], '.1f'):>9}"
                f"{fmt(s['max_ms'], '.1f'):>9}{s['errors']:>8}"
            )

    rows("scrapes during the API-on runs (while the jobs ran)", t["scrapes_while_jobs_ran"],
         rate=False)  # fmt: skip
    for error, count in t["scrape_errors"].items():
        lines.append(f"  error x{count}: {error}")
    lines.append("")
    for name, phase in summary["latency"].items():
        title = (
            f"2. latency, {sizes['clients']} clients for {phase['seconds']:.0f} s, {name}"
            f" (daemon CPU {phase['daemon_cpu_percent_of_a_core']:.0f}% of a core,"
            f" {phase['daemon_cpu_ms_per_request']:.1f} ms per request;"
            f" clients {phase['client_cpu_percent_of_a_core']:.0f}%)"
        )
        rows(title, phase["endpoints"])
        if name == "loaded":
            after = phase["load_done_after_s"]
            lines.append(
                f"  {phase['load_jobs']} dropped jobs: "
                + (f"all done after {after:.1f} s" if after is not None else
                   f"{phase['load_unfinished']} not done by the end of the window")
                + f", {phase['load_failed']} failed"
            )  # fmt: skip
            if "while_load_ran" in phase:
                rows("  the same, only requests sent while the dropped jobs ran",
                     phase["while_load_ran"])  # fmt: skip
        for error, count in phase["errors"].items():
            lines.append(f"  error x{count}: {error}")
        lines.append("")
    return "\n".join(lines)


def errors_in(summary: dict[str, Any]) -> int:
    scrapes = summary["throughput"]["scrapes_while_jobs_ran"].values()
    phases = summary["latency"].values()
    in_phases = sum(int(s["errors"]) for p in phases for s in p["endpoints"].values())
    return sum(int(s["errors"]) for s in scrapes) + in_phases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test: everything smaller")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    parser.add_argument("--dir", type=Path, help="where the temporary spools go")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--jobs", type=int, help="throughput: jobs per run (1000; quick: 200)")
    parser.add_argument("--rounds", type=int, help="throughput: rounds (5; quick: 2)")
    parser.add_argument("--clients", type=int, help="latency: client threads (20)")
    parser.add_argument("--window", type=float, help="latency: seconds per phase (30; quick: 5)")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    given = {k: getattr(args, k) for k in ("jobs", "rounds", "clients", "window")}
    sizes = dataclasses.replace(sizes, **{k: v for k, v in given.items() if v is not None})
    began = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="bench-api-", dir=args.dir))
    base.chmod(0o711)  # the job user passes through to its work dir
    started: list[Served] = []
    summary: dict[str, Any] = {"sizes": asdict(sizes), "load_average": {}}
    try:
        spread_subdirectories(base)
        (base / "stage").mkdir()
        (base / "archive").mkdir()
        summary["load_average"]["start"] = load_average()
        off = make_served("api-off", base, args.workers, api=False)
        on = make_served("api-on", base, args.workers, api=True)
        for served in (off, on):
            started.append(served)
            served.tool.daemon.start()
        rounds = measure_throughput(off, on, sizes, base)
        summary["throughput"] = throughput_summary(rounds)
        summary["load_average"]["after throughput"] = load_average()
        for served in (off, on):
            served.tool.daemon.stop()
        summary["latency"] = {}
        for loaded in (False, True):
            served = make_served(f"latency-{'loaded' if loaded else 'idle'}", base, args.workers,
                                 api=True)  # fmt: skip
            started.append(served)
            served.tool.daemon.start()
            say(f"latency: {sizes.clients} clients for {sizes.window:.0f} s"
                + (f", {sizes.load_jobs} jobs dropped" if loaded else ", no jobs dropped"))  # fmt: skip
            phase = latency_phase(served, sizes, base, loaded=loaded)
            summary["latency"][phase.name] = phase_summary(phase, sizes.load_jobs)
            summary["load_average"][f"after latency, {phase.name}"] = load_average()
            served.tool.daemon.stop()
        for served in started:
            log = served.tool.daemon.log_path.read_text(errors="replace").strip()
            if log:
                say(f"{served.tool.name} logged {len(log.splitlines())} line(s); the last:\n"
                    f"{served.tool.daemon.log_tail(5)}")  # fmt: skip
    finally:
        for served in started:
            served.tool.daemon.stop()
        say(f"removing {base}")
        shutil.rmtree(base, ignore_errors=True)
    summary["run_seconds"] = round(time.monotonic() - began, 1)
    summary = finite(summary)
    print(table(summary))
    print(f"load average (1, 5, 15 min): {summary['load_average']}")
    print(f"full run: {summary['run_seconds']:.0f} s")
    errors = errors_in(summary)
    bad_jobs = summary["throughput"]["failed_jobs"] + summary["throughput"]["late_jobs"]
    if errors or bad_jobs:
        print(f"errors: {errors} request(s), {bad_jobs} failed or late job(s): see above")
    text = json.dumps(summary, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    return 1 if errors or bad_jobs else 0


if __name__ == "__main__":
    sys.exit(main())
