"""The job catalogue (spoold.face.catalogue) with many finished jobs, against ``spoold list``.

Makes N finished jobs (done/ and failed/, written directly, no fsync; a realistic status.json of
~1 KB each, labels in it as intake keeps them), lets the directories settle (their stamps
older than ``SETTLE``: the catalogue then trusts them), then prints:

- the first build (every status.json read) and the snapshot written after it;
- a warm start from that snapshot (a new Catalogue's first page), and one where done/ changed
  since the snapshot (then every job directory there is stat'ed for its ctime);
- p50/p99 of ``page()`` (50 rows) once warm: unfiltered, by a common and a rare executor, by a
  rare label, by a label key, by state, by text, combined, and with a cursor deep in the list;
- ``page()`` after a job finished, told (``forget``, as the daemon does), also with a text;
  and untold (another process's change): pages asked back to back until it shows, how long
  that took, and how long the last look into done/ took (spaced by LOOK_SPACING);
- the index's memory (tracemalloc: what the built index holds);
- ``listing.job_rows`` (what ``spoold list`` does) on the same spool, for the ratio.

Usage: .venv/bin/python benchmarks/bench_catalogue.py [--jobs 100000] [--quick] [--dir DIR]
       [--rounds 200] [--json FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: the project root is one up
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spoold.core.spool import Spool
from spoold.core.spool.fs import SETTLE
from spoold.face import catalogue as catalogue_module
from spoold.face.catalogue import Catalogue, JobQuery
from spoold.face.listing import job_rows

EXECUTORS = ("local",) * 70 + ("docker",) * 20 + ("ssh",) * 9 + ("sevdesk",)
TEAMS = ("ops", "web", "billing", "data")
USERS = tuple(f"user{i}" for i in range(10))
RARE_EVERY = 1000  # one job in this many carries the label audit=yes


def status_of(number: int, rng: random.Random) -> tuple[str, dict[str, Any]]:
    """A finished job's status.json as a worker leaves it, and the directory it sits in."""
    job_id = f"job-{number:07d}-{rng.randrange(16**6):06x}"
    day, second = divmod(number, 86_400)
    moment = f"2026-{1 + day // 28 % 12:02d}-{1 + day % 28:02d}T{second // 3600:02d}:" + (
        f"{second // 60 % 60:02d}:{second % 60:02d}.{rng.randrange(10**6):06d}Z"
    )
    roll = rng.random()
    state = "succeeded" if roll < 0.9 else "failed" if roll < 0.98 else "cancelled"
    labels = {"team": rng.choice(TEAMS), "customer": str(rng.randrange(5000))}
    if number % RARE_EVERY == 0:
        labels["audit"] = "yes"
    exit_code = 0 if state == "succeeded" else 1
    attempt = {
        "number": 1, "started_at": moment, "finished_at": moment, "exit_code": exit_code,
        "error": None if state == "succeeded" else "exit code 1",
        "usage": {"cpu_user": 0.01, "cpu_system": 0.0, "max_rss_kb": 4096, "wall": 0.05,
                  "output_bytes": 120},
    }  # fmt: skip
    status = {
        "job_id": job_id, "state": state, "executor": rng.choice(EXECUTORS), "type": None,
        "submitted_at": moment, "source": f"{job_id}.yaml", "started_at": moment,
        "finished_at": moment, "exit_code": exit_code, "error": attempt["error"],
        "attempts": [attempt], "steps": {}, "artifacts": [], "worker": "host-1/w-2",
        "schedule": None, "result": {}, "sha256": f"{rng.getrandbits(256):064x}",
        "log_lines_lost": 0, "next_attempt_at": None, "priority": 0, "concurrency": None,
        "callback_sequence": 0, "labels": labels, "description": "nightly export of a customer",
        "submitter": rng.choice(USERS), "submitter_uid": 1000,
    }  # fmt: skip
    return ("done" if state == "succeeded" else "failed"), status


def make_jobs(root: Path, count: int, seed: int = 7) -> Spool:
    """A spool with ``count`` finished jobs, written directly (no fsync)."""
    spool = Spool(root, durable=False)
    spool.init()
    rng = random.Random(seed)
    for number in range(count):
        directory, status = status_of(number, rng)
        job = f"{root}/{directory}/{status['job_id']}"
        os.mkdir(job, 0o750)
        with open(f"{job}/status.json", "w") as handle:
            json.dump(status, handle, separators=(",", ":"))
    return spool


def finish_one(root: Path, number: int, rng: random.Random) -> str:
    """One more finished job, newer than all before it; its id."""
    directory, status = status_of(number, rng)
    job = root / directory / status["job_id"]
    job.mkdir()
    (job / "status.json").write_text(json.dumps(status))
    return str(status["job_id"])


def settle() -> None:
    """Wait until the stamps of the directories just written have settled (``SETTLE``)."""
    time.sleep(SETTLE + 0.1)


def timed(action: Callable[[], Any]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {
        "p50_ms": statistics.median(ordered) * 1e3,
        "p99_ms": p99 * 1e3,
        "max_ms": ordered[-1] * 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="10,000 jobs, fewer rounds")
    parser.add_argument("--rounds", type=int, default=200, help="page() calls per case")
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary spool goes")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    count, rounds = (10_000, 50) if args.quick else (args.jobs, args.rounds)
    results: dict[str, Any] = {"jobs": count}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-catalogue-") as temp:
        root = Path(temp) / "spool"
        made = timed(lambda: make_jobs(root, count))
        print(f"{count} finished jobs made in {made:.1f} s under {root}")
        settle()
        spool = Spool(root, durable=False)
        results.update(measure(spool, root, count, rounds))
    width = max(len(k) for k in results)
    for key, value in results.items():
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def measure(spool: Spool, root: Path, count: int, rounds: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    everything = JobQuery()

    cold = Catalogue(spool, snapshot_interval=3600)
    results["first_build_s"] = timed(lambda: cold.page(everything))
    results["snapshot_write_s"] = timed(cold.close)
    snapshot = root / "tmp" / "catalogue.snapshot"
    results["snapshot_mb"] = snapshot.stat().st_size / 1e6
    warm = Catalogue(spool, snapshot_interval=3600)
    results["warm_start_s"] = timed(lambda: warm.page(everything))
    results["counts"] = warm.counts()

    cases: dict[str, tuple[JobQuery, str | None]] = {
        "page_unfiltered": (everything, None),
        "page_executor_common(local)": (JobQuery(executor="local"), None),
        "page_executor_rare(sevdesk)": (JobQuery(executor="sevdesk"), None),
        "page_label_rare(audit=yes)": (JobQuery(labels={"audit": "yes"}), None),
        "page_label_key(audit)": (JobQuery(labels={"audit": None}), None),
        "page_state(cancelled)": (JobQuery(state="cancelled"), None),
        "page_submitter(user3)": (JobQuery(submitter="user3"), None),
        "page_text_100_ids": (JobQuery(text=f"JOB-{count // 2:07d}"[:-2]), None),
        "page_text_nomatch": (JobQuery(text="zzz"), None),
        "page_combined_rare(ssh,failed,team=web)": (
            JobQuery(state="failed", executor="ssh", labels={"team": "web"}),
            None,
        ),
    }
    jobs_all = warm._lists[("all",)]  # a cursor 90% down the list: an old page
    deep = catalogue_module._encode_cursor(jobs_all[len(jobs_all) // 10].key)
    cases["page_deep_cursor"] = (everything, deep)
    cases["page_deep_cursor_label_rare"] = (JobQuery(labels={"audit": "yes"}), deep)
    for name, (query, cursor) in cases.items():
        samples = []
        for _ in range(rounds):
            start = time.perf_counter()
            warm.page(query, cursor=cursor)
            samples.append(time.perf_counter() - start)
        shown = len(warm.page(query, cursor=cursor).rows)
        for key, value in percentiles(samples).items():
            results[f"{name}_{key}"] = value
        results[f"{name}_rows"] = shown

    # One job finishes before each call, and the daemon says so (forget).
    rng = random.Random(11)
    told, shown = [], 0
    for number in range(rounds):
        job_id = finish_one(root, 10_000_000 + number, rng)
        warm.forget(job_id)
        start = time.perf_counter()
        rows = warm.page(everything).rows
        told.append(time.perf_counter() - start)
        shown += rows[0]["job_id"] == job_id
    for key, value in percentiles(told).items():
        results[f"page_after_a_job_finished_told_{key}"] = value
    results["finished_job_on_the_next_page_told"] = f"{shown}/{rounds}"
    text = JobQuery(text=f"JOB-{count // 2:07d}"[:-2])
    searched = []
    for number in range(rounds // 4):
        warm.forget(finish_one(root, 15_000_000 + number, rng))
        searched.append(timed(lambda: warm.page(text)))
    for key, value in percentiles(searched).items():
        results[f"page_text_after_a_job_finished_told_{key}"] = value

    # The same untold (another process's change): pages asked for back to back until it shows.
    calls, delays = [], []
    for number in range(rounds // 4):
        job_id = finish_one(root, 20_000_000 + number, rng)
        made = time.perf_counter()
        while True:
            start = time.perf_counter()
            rows = warm.page(everything).rows
            calls.append(time.perf_counter() - start)
            if rows[0]["job_id"] == job_id:
                delays.append(time.perf_counter() - made)
                break
    for key, value in percentiles(calls).items():
        results[f"page_polling_untold_{key}"] = value
    results["untold_job_shown_after_max_s"] = max(delays)
    results["untold_job_shown_after_p50_s"] = statistics.median(delays)
    results["last_look_into_done_ms"] = warm._looked["done"][1] * 1e3
    warm.close()

    # A warm start where done/ changed since the snapshot: ctimes checked.
    settle()
    after = Catalogue(spool, snapshot_interval=3600)
    results["warm_start_done_changed_s"] = timed(lambda: after.page(everything))
    after.close()

    snapshot.unlink()
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    measured = Catalogue(spool, snapshot_interval=3600)
    measured.counts()
    if measured._writer is not None:
        measured._writer.join()  # its temporary copy is not the index
    gc.collect()
    results["index_mb_tracemalloc"] = (tracemalloc.get_traced_memory()[0] - base) / 1e6
    tracemalloc.stop()
    measured._dirty = False  # no snapshot for this one
    measured.close()

    results["listing_job_rows_s"] = timed(lambda: job_rows(spool, None, {}))
    results["listing_job_rows_label_s"] = timed(lambda: job_rows(spool, None, {"audit": "yes"}))
    results["ratio_listing_over_page_p50"] = results["listing_job_rows_s"] / (
        results["page_unfiltered_p50_ms"] / 1e3
    )
    return results


if __name__ == "__main__":
    raise SystemExit(main())
