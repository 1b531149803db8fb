"""The command line: a thin layer over the spool, the validator, the runner and the daemon."""

from __future__ import annotations

import argparse
import json
import logging
import os
import pwd
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from spoold import __version__
from spoold.clock import SystemClock, parse_rfc3339
from spoold.config import Config, load_config
from spoold.control import JobControl
from spoold.daemon import (
    Daemon,
    Systemd,
    apply_retention,
    detach,
    job_validator,
    lock_holder,
)
from spoold.dag import plan_text
from spoold.documents import load_document
from spoold.errors import ConfigError, InvalidJobFile, SpooldError, SpoolError
from spoold.intake import Accepted, Intake
from spoold.logs import close_logging, configure_logging
from spoold.logtap import LogTap
from spoold.outbox import callbacks_for
from spoold.plugins import ExecutorRegistry
from spoold.retention import STATES, Retention, Rule
from spoold.secrets import Masker, SecretStore
from spoold.spool import SPOOL_DIRECTORIES, Spool
from spoold.states import JOB_DIRECTORIES, JobState
from spoold.units import parse_duration
from spoold.validation import compose_job_schema, load_base_schema
from spoold.worker import JobRunner

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

Command = Callable[[argparse.Namespace, Config], int]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``spoold`` command."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, spool=args.spool)
        result: int = args.handler(args, config)
    except ConfigError as exc:
        print(f"spoold: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SpoolError as exc:
        print(f"spoold: {exc}", file=sys.stderr)
        return EXIT_USAGE if "not a spool" in str(exc) else EXIT_FAILED
    except SpooldError as exc:
        print(f"spoold: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    return result


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--spool", type=Path, help="spool directory (default: ./spool, or SPOOLD_SPOOL)"
    )
    common.add_argument(
        "--config", type=Path, help="config file (default: ./config.yaml, /etc/spoold/config.yaml)"
    )
    parser = argparse.ArgumentParser(prog="spoold", description="Crash-safe spool job runner.")
    parser.add_argument("--version", action="version", version=f"spoold {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Command, text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, parents=[common], help=text, description=text)
        command.set_defaults(handler=handler)
        return command

    add("init", cmd_init, "create the spool tree with safe permissions")
    run = add("run", cmd_run, "run the daemon in the foreground")
    run.add_argument("--daemon", action="store_true", help="detach into the background")
    run.add_argument("--pidfile", type=Path, help="with --daemon: write the pid here")
    submit = add("submit", cmd_submit, "validate files, then place them atomically into incoming/")
    submit.add_argument("files", nargs="+", type=Path)
    validate = add("validate", cmd_validate, "check job files; exit 1 if any is invalid")
    validate.add_argument("files", nargs="+", type=Path)
    validate.add_argument(
        "--plan", action="store_true", help="also print the order a job's steps run in"
    )
    execute = add("exec", cmd_exec, "run one job now, in the foreground, without a daemon")
    execute.add_argument("file", type=Path)
    status = add("status", cmd_status, "one job's status, or a summary of the spool")
    status.add_argument("job_id", nargs="?")
    status.add_argument("--json", action="store_true")
    listing = add("list", cmd_list, "jobs, newest first")
    listing.add_argument(
        "--state", choices=[*(s.value for s in JobState if s is not JobState.REJECTED), "scheduled"]
    )
    listing.add_argument("--limit", type=int, default=100, help="at most this many (0: all)")
    listing.add_argument("--json", action="store_true")
    logs = add("logs", cmd_logs, "a job's log")
    logs.add_argument("job_id")
    logs.add_argument("-f", "--follow", action="store_true", help="follow while the job runs")
    cancel = add("cancel", cmd_cancel, "stop a pending or running job; it ends as cancelled")
    cancel.add_argument("job_id")
    cancel.add_argument(
        "--wait", type=float, default=None, metavar="SECONDS",
        help="how long to wait for a running job to end (default: kill_grace + 30s; 0: not)",
    )  # fmt: skip
    again = add("retry", cmd_retry, "run a failed or cancelled job again, as a new attempt")
    again.add_argument("job_id")
    unschedule = add("unschedule", cmd_unschedule, "remove a recurring job (its runs stay)")
    unschedule.add_argument("job_id")
    purge = add("purge", cmd_purge, "remove finished jobs older than a given age")
    purge.add_argument("--older-than", required=True, metavar="AGE", help="e.g. 30d, 12h")
    purge.add_argument("--state", choices=STATES, help="done or failed (default: both)")
    add("schema", cmd_schema, "print the job file's JSON Schema")
    return parser


def _spool(config: Config) -> Spool:
    spool = Spool(config.spool, durable=config.durable)
    spool.check()
    return spool


def cmd_init(args: argparse.Namespace, config: Config) -> int:
    Spool(config.spool).init()
    print(f"spool ready at {config.spool}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    """The daemon: in the foreground (systemd, Type=notify), or detached with ``--daemon``.

    One daemon per spool and host: if another holds the lock, say which and exit 2.
    """
    daemon = Daemon.build(config)  # every check that can fail, while the terminal still sees it
    if daemon.spool.daemon_on(config.hostname) is not None:
        print(f"spoold: {lock_holder(daemon.spool, config.hostname)}", file=sys.stderr)
        return EXIT_USAGE
    if args.daemon:
        close_logging()  # its files would be closed under it, their numbers reused
        detach(args.pidfile.absolute() if args.pidfile else None)
        configure_logging(config)
        daemon.systemd = Systemd()  # a new pid: WATCHDOG_PID names the process that detached
    return daemon.run()


def cmd_validate(args: argparse.Namespace, config: Config) -> int:
    validator = job_validator(ExecutorRegistry.from_entry_points())
    failed = False
    for path in args.files:
        try:
            data = path.read_bytes()
        except OSError as exc:
            print(f"{path}: cannot read: {exc.strerror}", file=sys.stderr)
            failed = True
            continue
        try:
            document = validator.parse(data, path.name)
        except InvalidJobFile as exc:
            for issue in exc.issues:
                print(issue.format(str(path)), file=sys.stderr)
            failed = True
            continue
        print(f"{path}: valid")
        if args.plan:
            steps = document.get("steps")
            print(plan_text(steps) if steps else "one step: the job itself (no steps:)")
    return EXIT_FAILED if failed else EXIT_OK


def cmd_submit(args: argparse.Namespace, config: Config) -> int:
    spool = _spool(config)
    validator = job_validator(ExecutorRegistry.from_entry_points())
    failed = False
    for path in args.files:
        try:
            data = path.read_bytes()
            validator.parse(data, path.name)
        except OSError as exc:
            print(f"{path}: cannot read: {exc.strerror}", file=sys.stderr)
            failed = True
            continue
        except InvalidJobFile as exc:
            for issue in exc.issues:
                print(issue.format(str(path)), file=sys.stderr)
            failed = True
            continue
        placed = spool.submit_file(path.name, data)
        print(f"{path}: submitted as {placed}")
    return EXIT_FAILED if failed else EXIT_OK


def cmd_exec(args: argparse.Namespace, config: Config) -> int:
    spool = Spool(config.spool, durable=config.durable)
    spool.init()
    clock = SystemClock()
    masker = Masker()
    logger = configure_logging(config, masker)
    registry = ExecutorRegistry.from_entry_points()
    callbacks = callbacks_for(config, spool, clock, logger)
    runner = JobRunner(spool, registry, config, clock, logger,
                       secrets=SecretStore(config.secrets_dir), masker=masker,
                       tap=LogTap.open(config.log_socket), callbacks=callbacks)  # fmt: skip
    intake = Intake(
        spool,
        job_validator(registry),
        clock,
        max_file_size=config.max_file_size,
        settle_time=0.0,
        on_accepted=lambda job, document: runner.remember(job.job_id, document),
        logger=logger,
        allowed_run_as=config.allowed_run_as,
        callbacks=callbacks,
    )
    if _has_schedule(args.file):
        print(f"{args.file}: has a schedule: exec runs one job now; submit it to spoold instead",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    outcome = intake.process(spool.stage_file(args.file, max_size=config.max_file_size))
    if not isinstance(outcome, Accepted):
        for error in outcome.reason["errors"] or [{"message": outcome.reason["reason"]}]:
            line, column = error.get("line"), error.get("column")
            where = f":{line}:{column}" if line else ""
            print(
                f"{args.file}{where}: {error.get('path') or ''} {error['message']}", file=sys.stderr
            )
        print(f"rejected into {outcome.path}", file=sys.stderr)
        return EXIT_FAILED
    job_id = outcome.job.job_id
    beat = _Heartbeat(runner, config.heartbeat_interval, config.poll_interval)
    try:
        while True:
            job = runner.claim(job_id)
            if job is None:
                raise SpoolError(f"job {job_id} was claimed by a running daemon")
            final = runner.run(job, slot=f"exec-{os.getpid()}", tee=sys.stdout)
            if final is None or final.directory != "pending":
                break
            # A retry: wait here for it, in the foreground, as the daemon would in the background.
            due = spool.read_status(final).get("next_attempt_at")
            if not isinstance(due, str):
                break
            time.sleep(max(parse_rfc3339(due).timestamp() - clock.now().timestamp(), 0.0))
    finally:
        beat.stop()
    if final is None:
        print(f"{job_id}: its outcome could not be recorded (see above)", file=sys.stderr)
        return EXIT_FAILED
    state = spool.read_status(final)["state"]
    print(f"{final.job_id}: {state} ({final.path})", file=sys.stderr)
    return EXIT_OK if state == JobState.SUCCEEDED.value else EXIT_FAILED


def _has_schedule(path: Path) -> bool:
    try:
        document = load_document(path.read_bytes(), path.name)
    except (OSError, SpooldError):
        return False  # intake reports what is wrong with it
    return isinstance(document, dict) and "schedule" in document


class _Heartbeat:
    """Renews leases and looks for cancel requests while ``spoold exec`` runs a job."""

    def __init__(self, runner: JobRunner, every: float, look: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(runner, every, look), daemon=True)
        self._thread.start()

    def _loop(self, runner: JobRunner, every: float, look: float) -> None:
        next_beat = time.monotonic() + every
        while not self._stop.wait(min(look, every)):
            runner.check_cancels()  # `spoold cancel` works on a job run by `spoold exec` too
            if time.monotonic() >= next_beat:
                runner.renew_leases()
                next_beat = time.monotonic() + every

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    spool = _spool(config)
    if args.job_id:
        status = spool.read_status(spool.get(args.job_id))
        if args.json:  # status.json as it is
            print(json.dumps(status, indent=2))
        else:
            _print_status(status)
            waiting = [n for n in spool.list_outbox() if n.startswith(f"{args.job_id}~")]
            if waiting:
                print(f"{'callbacks:':<17}{len(waiting)} waiting in outbox/")
        return EXIT_OK
    counts = {
        name: spool.count(name) for name in SPOOL_DIRECTORIES if name not in ("tmp", "outbox")
    }
    counts["outbox"] = len(spool.list_outbox())
    given_up = [
        {"name": name, **_delivery_summary(spool.read_delivery(name, "failed") or {})}
        for name in spool.list_outbox("failed")
    ]
    if args.json:
        print(json.dumps(
            {"spool": str(spool.root), "counts": counts, "callbacks_given_up": given_up}, indent=2
        ))  # fmt: skip
        return EXIT_OK
    print(f"spool {spool.root}")
    for name, count in counts.items():
        print(f"  {name + '/':<11} {count}" + ("  callbacks waiting" if name == "outbox" else ""))
    if given_up:
        print(f"  {len(given_up)} callback(s) given up, kept in outbox/failed/:")
        for item in given_up:
            print(
                f"    {item['name']}: {item['event']} to {item['url']} after {item['tries']} "
                f"tries; last: {item['last_error']}"
            )
    return EXIT_OK


def _delivery_summary(record: dict[str, Any]) -> dict[str, Any]:
    return {key: record.get(key) for key in ("event", "url", "tries", "last_error", "created")}


def _print_status(status: dict[str, Any]) -> None:
    keys = ("job_id", "state", "executor", "type", "source", "submitted_at", "started_at",
            "finished_at", "next_attempt_at", "exit_code", "error", "worker", "schedule",
            "last_fired")  # fmt: skip
    for key in keys:
        if status.get(key) is not None:
            print(f"{key + ':':<17}{status[key]}")
    for moment in status.get("next_fire_times") or ():
        print(f"{'next firing:':<17}{moment}")
    for run in (status.get("runs") or [])[-5:]:
        print(f"{'run:':<17}{run['run_id']}")
    for note in (status.get("notes") or [])[-5:]:
        print(f"{'note:':<17}{note['at']} {note['what']}")
    for attempt in status.get("attempts") or ():
        print(
            f"attempt {attempt['number']}:    {attempt['started_at']} -> {attempt.get('finished_at')}"
            f" exit {attempt.get('exit_code')}"
            + (f" ({attempt['error']})" if attempt.get("error") else "")
        )
    for artifact in status.get("artifacts") or ():
        print(
            f"artifact:     {artifact['path']} ({artifact['size']} bytes, sha256 {artifact['sha256'][:12]})"
        )


def cmd_list(args: argparse.Namespace, config: Config) -> int:
    spool = _spool(config)
    scheduled = args.state == "scheduled"
    wanted = JobState(args.state) if args.state and not scheduled else None
    directories = ["scheduled"] if scheduled else [wanted.directory] if wanted else JOB_DIRECTORIES
    rows = []
    for job in (j for d in directories for j in spool.list_jobs(d)):
        try:
            status = spool.read_status(job)
        except SpoolError:
            continue  # moved on while we looked
        if not wanted or status.get("state") == wanted.value:
            rows.append(status)
    if scheduled:
        for row in rows:
            times = row.get("next_fire_times") or ["never again"]
            row["error"] = f"next: {times[0]}; last run: {_last_run(row)}"
    # Directory times change with every state change; submission time does not.
    rows.sort(key=lambda row: str(row.get("submitted_at") or ""), reverse=True)
    if args.limit:
        rows = rows[: args.limit]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for row in rows:
        print(f"{row['job_id']:<40} {row['state']:<10} {row.get('executor') or '':<8} "
              f"{row.get('submitted_at') or '':<28} {row.get('error') or ''}")  # fmt: skip
    return EXIT_OK


def _last_run(status: dict[str, Any]) -> str:
    runs = status.get("runs") or []
    return str(runs[-1]["run_id"]) if runs else "none yet"


def cmd_unschedule(args: argparse.Namespace, config: Config) -> int:
    control = _control(config)
    _spool(config).unschedule(args.job_id)
    woke = control.wake_daemon(config.hostname)
    print(f"{args.job_id}: unscheduled (its runs stay where they are)")
    if not woke:
        print("no spoold runs here: others sharing the spool notice at their next scan",
              file=sys.stderr)  # fmt: skip
    return EXIT_OK


def cmd_purge(args: argparse.Namespace, config: Config) -> int:
    try:
        age = parse_duration(args.older_than)
    except ValueError as exc:
        raise ConfigError(f"--older-than: {exc}") from exc
    states = [args.state] if args.state else list(STATES)
    # The config's per-executor ages still hold: what billing keeps longer, a purge keeps too.
    rules = Retention({state: Rule(max_age=age) for state in states}, config.retention.executors)
    removed = apply_retention(_spool(config), rules, SystemClock())
    print(f"removed {removed} finished job(s) older than {args.older_than}")
    return EXIT_OK


def cmd_logs(args: argparse.Namespace, config: Config) -> int:
    spool = _spool(config)
    job = spool.get(args.job_id)
    out = sys.stdout.buffer
    with open(job.log_path, "rb") as log:
        while True:
            chunk = log.read(65536)
            if chunk:
                out.write(chunk)
                out.flush()
                continue
            if not args.follow:
                return EXIT_OK
            where = spool.find(args.job_id)
            if where is None or where.directory not in ("pending", "running"):
                # The job ended: whatever it wrote before that is already in the file.
                rest = log.read()
                out.write(rest)
                out.flush()
                return EXIT_OK
            time.sleep(0.2)


def _control(config: Config) -> JobControl:
    user = pwd.getpwuid(os.geteuid()).pw_name
    spool, clock = _spool(config), SystemClock()
    callbacks = callbacks_for(config, spool, clock, logging.getLogger("spoold"))
    return JobControl(spool, clock, who=f"{user} on {config.hostname}", callbacks=callbacks)


def cmd_cancel(args: argparse.Namespace, config: Config) -> int:
    control = _control(config)
    outcome = control.cancel(args.job_id)
    if outcome.cancelled:
        print(f"{args.job_id}: cancelled before it started ({outcome.job.path})")
        return EXIT_OK
    if outcome.state is not JobState.RUNNING:
        print(f"{args.job_id}: already {outcome.state.value}; nothing to cancel", file=sys.stderr)
        return EXIT_FAILED
    bound = config.kill_grace + 30.0 if args.wait is None else args.wait
    print(f"{args.job_id}: cancel requested; its worker stops it", file=sys.stderr)
    end = time.monotonic() + bound
    spool = _spool(config)
    while time.monotonic() < end:
        job = spool.find(args.job_id)
        if job is not None and job.directory in ("done", "failed"):
            state = spool.read_status(job)["state"]
            print(f"{args.job_id}: {state} ({job.path})")
            return EXIT_OK if state == JobState.CANCELLED.value else EXIT_FAILED
        time.sleep(0.1)
    if bound > 0:
        print(f"{args.job_id}: still running after {bound:g}s", file=sys.stderr)
    return EXIT_FAILED if bound > 0 else EXIT_OK


def cmd_retry(args: argparse.Namespace, config: Config) -> int:
    control = _control(config)
    job = control.retry(args.job_id)
    woke = control.wake_daemon(config.hostname)
    print(f"{args.job_id}: back in pending/ ({job.path})")
    if not woke:
        print("no spoold runs here: the job runs when one starts", file=sys.stderr)
    return EXIT_OK


def cmd_schema(args: argparse.Namespace, config: Config) -> int:
    schemas = ExecutorRegistry.from_entry_points().schemas()
    print(json.dumps(compose_job_schema(load_base_schema(), schemas), indent=2))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
