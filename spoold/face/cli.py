"""The command line: a thin layer over the spool, the validator, the runner and the daemon.

Start-up is kept light: this module imports the standard library's argparse and little else,
and each command imports what it needs. ``spoold --version`` and the commands that only read
the spool (``status``, ``list``, ``logs``, ``wait``) never load jsonschema, APScheduler,
requests or watchdog.
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spoold import __version__

if TYPE_CHECKING:
    from spoold.core.clock import SystemClock
    from spoold.core.config import Config
    from spoold.core.errors import ValidationIssue
    from spoold.core.policy import Submitter
    from spoold.core.spool import Spool
    from spoold.intake.admission import Admission, Admitted
    from spoold.run.control import JobControl

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

Command = Callable[[argparse.Namespace, "Config"], int]

#: Where the Debian package's venv lives: its CLI's own config is /etc/spoold/config.yaml.
PACKAGED_PREFIX = Path("/usr/lib/spoold/venv")
#: The commands that act on what the config allows: they check the config against its schema.
#: The others read the spool, and take the config's values without that check (load_config
#: still names the key of a value it cannot use).
_CHECKED = frozenset({"run", "validate", "submit", "exec"})
#: The commands that need no config and no spool.
_STANDALONE = frozenset({"schema", "completion"})
_STATES = ("pending", "running", "succeeded", "failed", "cancelled")


def main(argv: Sequence[str] | None = None, *, commands: Mapping[str, Command]) -> int:
    """The ``spoold`` command, given the commands that run spoold's parts (``run``, ``exec``):
    the composition root (spoold.app) owns those, this face parses and shows."""
    parser = build_parser()
    args = parser.parse_args(argv)  # --version and --help end here, having imported nothing
    if args.command == "run":
        hold_hangups()  # before the slow part of start-up: a reload then must not kill it
    if args.handler is None:
        args.handler = commands[args.command]
    if (wrong := _usage_problem(args)) is not None:
        parser.error(wrong)  # exits 2, with the usage
    from spoold.core.errors import ConfigError, JobNotFound, SpooldError, SpoolError  # noqa: PLC0415
    from spoold.core.spool import NotASpool  # noqa: PLC0415
    from spoold.face.access import UsageError, permission_problem  # noqa: PLC0415

    try:
        config = None if args.command in _STANDALONE else _config(args)
        result: int = args.handler(args, config)
    except ConfigError as exc:
        _complain(f"configuration error: {exc}")
        return EXIT_USAGE
    except (UsageError, JobNotFound) as exc:
        # UsageError: NotAllowed too, what this user may not look at. JobNotFound: an id that
        # names no job (or not the kind the command acts on) is the command line's mistake, not
        # a job that failed: 2, whichever command was given it (SPEC 9).
        _complain(str(exc))
        return EXIT_USAGE
    except NotASpool as exc:  # the spool named is none, or not a usable one: a usage error
        _complain(str(exc))
        return EXIT_USAGE
    except SpoolError as exc:
        _complain(str(exc))
        return EXIT_USAGE if "not a spool" in str(exc) else EXIT_FAILED
    except SpooldError as exc:
        _complain(str(exc))
        return EXIT_FAILED
    except PermissionError as exc:
        _complain(permission_problem(exc))
        return EXIT_USAGE
    except OSError as exc:  # a file named on the command line, a full disk: no traceback
        if exc.errno == errno.EROFS:  # the README's "permission error": 2, with the way out
            _complain(read_only_problem(exc))
            return EXIT_USAGE
        where = f"{exc.filename}: " if exc.filename else ""
        _complain(f"{where}{exc.strerror or exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    return result


def read_only_problem(exc: OSError) -> str:
    """EROFS met anywhere (the spool, a logdir, a workdir), as a message naming the path."""
    where = os.fsdecode(exc.filename) if exc.filename else "the spool"
    return (
        f"{where}: Read-only file system: spoold must write there; remount it read-write "
        "(mount -o remount,rw ...), or choose another --spool (or the config key that names "
        "the path)"
    )


class HeldHangup:
    """SIGHUP's handler from the very start of ``spoold run`` until the daemon installs its own
    (the config reload): SIGHUP's default ends the process, and ``systemctl reload`` (or
    logrotate's postrotate) early in a start killed the daemon (exit 129). A hangup that
    came is kept in ``came``, and the daemon then reloads once, as asked."""

    def __init__(self) -> None:
        self.came = False

    def __call__(self, signum: int, frame: object) -> None:
        self.came = True


def hold_hangups() -> None:
    """Install ``HeldHangup`` for SIGHUP (main thread only: a test calling ``main`` elsewhere
    may not take signals)."""
    import signal  # noqa: PLC0415
    import threading  # noqa: PLC0415

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, HeldHangup())


def _complain(text: str) -> None:
    """``spoold: <text>`` on standard error, escaped: an error may quote what a submitter wrote."""
    from spoold.face.views import printable  # noqa: PLC0415

    print(f"spoold: {printable(text, lines=True)}", file=sys.stderr)


# -- the parser ---------------------------------------------------------------------------------


def _locations(parser: argparse.ArgumentParser, default: Any) -> None:
    """--spool and --config: on the main parser (before the command) and on every command.

    On a command they default to SUPPRESS, so that a value given before the command stays
    unless one is given after it too (then that one wins).
    """
    parser.add_argument(
        "--spool", type=Path, default=default, metavar="DIR",
        help="spool directory (default: the config's spool, else ./spool; SPOOLD_SPOOL overrides)",
    )  # fmt: skip
    parser.add_argument(
        "--config", type=Path, default=default, metavar="FILE",
        help="config file (default: ./config.yaml, else /etc/spoold/config.yaml)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The ``spoold`` command's parser (the bash completion script is made from it too)."""
    parser = argparse.ArgumentParser(
        prog="spoold",
        description="Crash-safe spool job runner.",
        epilog="--spool and --config may stand before the command or after it. Exit codes: "
        "0 success, 1 the job or file failed, 2 usage, configuration or permission error.",
    )
    parser.add_argument("--version", action="version", version=f"spoold {__version__}")
    _locations(parser, None)
    common = argparse.ArgumentParser(add_help=False)
    _locations(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Command | None, text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, parents=[common], help=text, description=text)
        command.set_defaults(handler=handler)
        return command

    add("init", cmd_init, "create the spool tree with safe permissions")
    run = add("run", None, "run the daemon in the foreground")
    run.add_argument("--daemon", action="store_true", help="detach into the background")
    run.add_argument("--pidfile", type=Path, help="with --daemon: write the pid here")
    submit = add(
        "submit", cmd_submit,
        "check files as intake would (job ids too), then place them atomically into incoming/",
    )  # fmt: skip
    submit.add_argument("files", nargs="+", type=Path, metavar="FILE")
    submit.add_argument(
        "--wait", action="store_true",
        help="then wait until the jobs end; exit 0 only if every one succeeded (a file without "
        "job_id is given one, written as its first key)",
    )  # fmt: skip
    submit.add_argument("--timeout", type=duration, metavar="SECONDS", help="with --wait: at most")
    validate = add(
        "validate", cmd_validate,
        "check job files as intake would, with the config's run_as users, submitter policy "
        "and callbacks; with --spool DIR, also job ids already in that spool; exit 1 if any is "
        "refused",
    )  # fmt: skip
    validate.add_argument("files", nargs="+", type=Path, metavar="FILE")
    validate.add_argument(
        "--as", dest="as_user", metavar="USER",
        help="check against USER's policy (a name, or uid:N), as if USER dropped the files; "
        "default: yours",
    )  # fmt: skip
    validate.add_argument(
        "--plan", action="store_true", help="also print the order a job's steps run in"
    )
    execute = add("exec", None, "run one job now, in the foreground, without a daemon")
    execute.add_argument("file", type=Path, metavar="FILE")
    status = add("status", cmd_status, "one job's status, or a summary of the spool")
    status.add_argument("job_id", nargs="?", type=job_id_argument, metavar="ID")
    status.add_argument("--json", action="store_true", help="status.json as it is")
    listing = add("list", cmd_list, "jobs, newest first; rejected files with their reason")
    listing.add_argument(
        "--state", choices=[*_STATES, "scheduled", "rejected"],
        help="only jobs in this state (scheduled: the schedules; rejected: the files refused)",
    )  # fmt: skip
    listing.add_argument(
        "--label", action="append", default=[], metavar="KEY[=VALUE]",
        help="only jobs with this label (and value); repeat for several",
    )  # fmt: skip
    listing.add_argument(
        "--limit", type=limit_argument, default=100, metavar="N", help="at most this many (0: all)"
    )
    listing.add_argument("--json", action="store_true", help="the rows as a JSON list")
    listing.add_argument(
        "--ids", action="store_true",
        help="only the job ids (a rejected file's name), one a line: for scripts and the shell "
        "completion",
    )  # fmt: skip
    logs = add("logs", cmd_logs, "a job's log")
    logs.add_argument("job_id", type=job_id_argument, metavar="ID")
    logs.add_argument(
        "-f", "--follow", action="store_true",
        help="follow while the job runs, then exit 0 if it succeeded, 1 if not",
    )  # fmt: skip
    wait = add("wait", cmd_wait, "wait until the jobs end; exit 0 only if every one succeeded")
    wait.add_argument("job_ids", nargs="+", type=job_id_argument, metavar="ID")
    wait.add_argument("--timeout", type=duration, metavar="SECONDS", help="at most (exit 1)")
    cancel = add("cancel", cmd_cancel, "stop a pending or running job; it ends as cancelled")
    cancel.add_argument("job_id", type=job_id_argument, metavar="ID")
    cancel.add_argument(
        "--wait", type=duration, default=None, metavar="SECONDS",
        help="how long to wait for a running job to end (default: kill_grace + 30s; 0: not)",
    )  # fmt: skip
    again = add("retry", cmd_retry, "run a failed or cancelled job again, as a new attempt")
    again.add_argument("job_id", type=job_id_argument, metavar="ID")
    unschedule = add("unschedule", cmd_unschedule, "remove a recurring job (its runs stay)")
    unschedule.add_argument("job_id", type=job_id_argument, metavar="ID")
    purge = add(
        "purge", cmd_purge,
        "remove finished jobs and rejected files older than an age, naming each; "
        "--dry-run lists what would go",
    )  # fmt: skip
    purge.add_argument(
        "--older-than", metavar="AGE",
        help="e.g. 30d, 12h (needed unless --state rejected: then all of rejected/ by default)",
    )  # fmt: skip
    purge.add_argument(
        "--state", choices=("done", "failed", "rejected"), help="only this (default: all three)"
    )
    purge.add_argument("--dry-run", action="store_true", help="list, and remove nothing")
    hosts = add(
        "hosts", cmd_hosts,
        "the hosts serving this spool (hosts/): alive, stale or gone, and what each runs",
    )  # fmt: skip
    hosts.add_argument("--json", action="store_true", help="the hosts as JSON")
    hosts.add_argument(
        "--forget", metavar="HOST",
        help="remove a gone or stale host's record from hosts/ (a host retired for good)",
    )  # fmt: skip
    schedule = add("schedule", None, "schedules: list them, run one now, pause, resume")
    schedule_sub = schedule.add_subparsers(dest="schedule_command", required=True, metavar="ACTION")
    schedule_list = schedule_sub.add_parser(
        "list", parents=[common],
        help="the schedules, soonest firing first: next firings, paused or not, last runs",
    )  # fmt: skip
    schedule_list.add_argument("--json", action="store_true", help="the schedules as JSON")
    schedule_list.set_defaults(handler=cmd_schedule_list)
    for action, text in (
        (
            "run",
            "run a schedule once now, paused or not (its overlap rule applies); prints "
            "the run's id",
        ),
        (
            "pause",
            "stop a schedule's firings until it is resumed (those meanwhile are "
            "skipped, not caught up)",
        ),
        ("resume", "fire a paused schedule again from its next firing on"),
    ):
        acting = schedule_sub.add_parser(action, parents=[common], help=text, description=text)
        acting.add_argument("job_id", type=job_id_argument, metavar="ID")
        acting.set_defaults(handler=cmd_schedule_act)
    token = add("token", None, "HTTP API tokens: create, list, revoke")
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = token_sub.add_parser(
        "create", parents=[common], help="make a token; it is printed once, on standard output",
        description="Make an API token and print it (only its hash is kept). Scopes: read "
        "(jobs, logs, artifacts, schedules, metrics), submit, control (cancel, retry, run now, "
        "pause, resume), admin (all). What it may submit is policy: tokens: NAME's.",
    )  # fmt: skip
    create.add_argument("--name", required=True, help="what the policy, logs and jobs call it")
    create.add_argument(
        "--scope", action="append", required=True, metavar="SCOPES",
        help="comma-separated: read, submit, control, admin (repeatable)",
    )  # fmt: skip
    create.set_defaults(handler=cmd_token_create)
    token_list = token_sub.add_parser("list", parents=[common], help="the tokens (no secrets)")
    token_list.add_argument("--json", action="store_true", help="the tokens as JSON")
    token_list.set_defaults(handler=cmd_token_list)
    revoke = token_sub.add_parser(
        "revoke", parents=[common], help="revoke a token by id, or every token of a name"
    )
    revoke.add_argument("which", metavar="ID|NAME")
    revoke.set_defaults(handler=cmd_token_revoke)
    add("schema", cmd_schema, "print the job file's JSON Schema")
    add("completion", cmd_completion, "print the bash completion script")
    return parser


def _usage_problem(args: argparse.Namespace) -> str | None:
    """What argparse cannot say about a combination of options."""
    if args.command == "submit" and args.timeout is not None and not args.wait:
        return "submit: --timeout goes with --wait"
    if args.command == "purge" and args.older_than is None and args.state != "rejected":
        return (
            "purge: --older-than AGE is needed (e.g. 30d); only --state rejected may leave "
            "it out, to remove every rejected file"
        )
    return None


def duration(text: str) -> float:
    """Seconds, given as a number or a duration (30, 30s, 10m); argparse reports a ValueError
    as "invalid duration value"."""
    from spoold.core.units import parse_duration  # noqa: PLC0415

    return parse_duration(text)


def limit_argument(text: str) -> int:
    """``--limit N``: a whole number, 0 (all) or more. A negative one would be a slice's end,
    dropping the oldest rows without a word."""
    try:
        limit: int | None = int(text)
    except ValueError:
        limit = None
    if limit is None or limit < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of rows: 1 or more, or 0 (all)")
    return limit


def job_id_argument(text: str) -> str:
    """A job id as the spool names its jobs (a schedule's run: ``ID@<time>``); anything else
    is a usage error here, before the spool is looked at. Shown with repr: escaped."""
    from spoold.core.ids import RUN_ID  # noqa: PLC0415 - stdlib only

    if not RUN_ID.fullmatch(text):  # not match: its $ takes a last newline
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a job id: letters, digits, '.', '_' and '-', starting with a "
            "letter or digit (a schedule's run: ID@YYYYMMDDTHHMMSSZ)"
        )
    return text


# -- the config and the spool -----------------------------------------------------------------


def _config(args: argparse.Namespace) -> Config:
    from spoold.core.config import load_config  # noqa: PLC0415

    checked = args.command in _CHECKED  # the others skip jsonschema (~0.1 s to load)
    config = load_config(args.config, spool=args.spool, check_schema=checked)
    if (note := which_config_note(args, config)) is not None:
        print(f"spoold: {note}", file=sys.stderr)
    return config


def which_config_note(args: argparse.Namespace, config: Config) -> str | None:
    """What to say when the config (and so the spool) is not the one this CLI's user expects.

    A checkout's or a pip install's spoold expects ./config.yaml and ./spool; the Debian
    package's, /etc/spoold/config.yaml and its spool. A config found elsewhere by the search
    (a checkout's CLI finding the package's /etc/spoold/config.yaml) is named, with the spool.
    """
    if args.config is not None or config.source is None:
        return None
    packaged = Path(sys.prefix) == PACKAGED_PREFIX
    expected = Path("/etc/spoold/config.yaml") if packaged else Path("config.yaml")
    if config.source.absolute() == expected.absolute():
        return None
    spool = config.spool
    spool_from = (
        "--spool" if args.spool is not None
        else "SPOOLD_SPOOL" if os.environ.get("SPOOLD_SPOOL")
        else "the config's" if spool != Path("spool")
        else "the default"
    )  # fmt: skip
    why = "found in the current directory" if packaged else "there is no ./config.yaml here"
    return (
        f"using the config {config.source} ({why}), spool {spool} ({spool_from}); "
        "--config FILE and --spool DIR choose others"
    )


def _spool(config: Config) -> Spool:
    from spoold.face.access import open_spool  # noqa: PLC0415

    return open_spool(config)


# -- commands -----------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace, config: Config) -> int:
    from spoold.core.spool import Spool  # noqa: PLC0415

    spool = Spool(config.spool)
    for change in spool.init():  # a directory that was there: its mode is never changed unsaid
        print(f"spoold: {change}", file=sys.stderr)
    # What init cannot fix (an owner, a directory above the spool) would make `spoold run`
    # refuse the spool: said now, not as "ready".
    if problems := spool.unsafe_permissions():
        print(f"spoold: the spool at {config.spool} is made, but spoold run would refuse it: "
              + "; ".join(problems), file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    print(f"spool ready at {config.spool}")
    return EXIT_OK


def _admission(config: Config, clock: SystemClock) -> Admission:
    """What intake admits, for a face run by a submitter: secrets it may not read are noted."""
    from spoold.intake.admission import Admission  # noqa: PLC0415
    from spoold.intake.validation import job_validator  # noqa: PLC0415
    from spoold.run.registry import ExecutorRegistry  # noqa: PLC0415

    validator = job_validator(ExecutorRegistry.from_entry_points())
    return Admission.for_config(config, validator, clock, strict_secrets=False)


def read_job_file(path: Path) -> bytes | None:
    """A job file's bytes, or None with why not printed as validate prints a problem.

    A regular file only, as intake takes: opened without waiting, so that a FIFO (which a
    read would wait on for a writer, for ever) or a device is refused, as intake refuses it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as handle:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
            if not stat.S_ISREG(mode):
                kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
                print(f"{path}: cannot read: it is {kind}: only a regular file is a job file "
                      "(intake rejects the others)", file=sys.stderr)  # fmt: skip
                return None
            return handle.read()
    except OSError as exc:
        print(f"{path}: cannot read: {exc.strerror or exc}", file=sys.stderr)
        return None


def _admit(
    admission: Admission,
    path: Path,
    clock: SystemClock,
    spool: Spool | None,
    submitter: Submitter | None = None,
) -> tuple[bytes, Admitted] | None:
    """A file's bytes and its admission, or None with the refusal printed as validate prints it.

    ``submitter``: whose policy applies; None: the caller's (who owns what submit places).
    """
    from spoold.intake.admission import Refused  # noqa: PLC0415

    if (data := read_job_file(path)) is None:
        return None
    try:
        admitted = admission.admit(
            data, path.name, now=clock.now(), spool=spool, submitter=submitter
        )
    except Refused as refused:
        _print_issues(path, refused.issues)
        return None
    return data, admitted


def _print_issues(path: Path, issues: Sequence[ValidationIssue]) -> None:
    from spoold.face.views import issue_line  # noqa: PLC0415

    for issue in issues:
        print(issue_line(path, issue), file=sys.stderr)


def cmd_validate(args: argparse.Namespace, config: Config) -> int:
    from spoold.core.clock import SystemClock  # noqa: PLC0415
    from spoold.run.dag import plan_text  # noqa: PLC0415

    clock = SystemClock()
    submitter = None if args.as_user is None else _submitter(args.as_user)
    admission = _admission(config, clock)
    spool = _spool(config) if args.spool is not None else None  # no spool needed without it
    failed = False
    for path in args.files:
        if (found := _admit(admission, path, clock, spool, submitter)) is None:
            failed = True
            continue
        admitted = found[1]
        print(f"{path}: valid")
        _print_issues(path, admitted.notes)
        if args.plan:
            steps = admitted.document.get("steps")
            print(plan_text(steps) if steps else "one step: the job itself (no steps:)")
    return EXIT_FAILED if failed else EXIT_OK


def _submitter(user: str) -> Submitter:
    """``--as USER``: the user, or a usage error naming what is wrong."""
    from spoold.core.policy import Submitter  # noqa: PLC0415
    from spoold.face.access import UsageError  # noqa: PLC0415

    try:
        return Submitter.named(user)
    except ValueError as exc:
        raise UsageError(f"--as: {exc}") from None


def cmd_submit(args: argparse.Namespace, config: Config) -> int:
    from spoold.core.clock import SystemClock, rfc3339  # noqa: PLC0415
    from spoold.face.views import printable  # noqa: PLC0415
    from spoold.face.waits import Submitted, give_job_id, wait_for_submitted  # noqa: PLC0415

    spool = _spool(config)
    clock = SystemClock()
    admission = _admission(config, clock)
    failed = False
    submitted: dict[str, Path] = {}  # job id -> the file of this run that names it
    waits: list[Submitted] = []
    for path in args.files:
        if (found := _admit(admission, path, clock, spool)) is None:
            failed = True
            continue
        data, admitted = found
        if (first := submitted.get(admitted.job_id)) is not None:
            taken = f"a job with id {admitted.job_id!r} is in {first}, submitted just now"
            _print_issues(path, admission.duplicate(data, admitted.document, taken).issues)
            failed = True
            continue
        if args.wait and "schedule" in admitted.document:
            print(f"{path}: has a schedule, which never ends: submit it without --wait, then "
                  f"`spoold wait` its runs ({admitted.job_id}@<time>)", file=sys.stderr)  # fmt: skip
            failed = True
            continue
        job_id: str | None = admitted.job_id
        if "job_id" not in admitted.document:
            # The daemon reads the id from the file: without one written there, it would make
            # another than the one admitted here (and printed).
            named = give_job_id(data, admitted.job_id)
            if named is None and args.wait:
                print(f"{path}: has no job_id, and spoold cannot add one to it: give it a "
                      "job_id for --wait to know the job by", file=sys.stderr)  # fmt: skip
                failed = True
                continue
            if named is None:
                job_id = None  # the daemon makes one when it takes the file
            else:
                data = named
        _print_issues(path, admitted.notes)
        when = rfc3339(clock.now())
        placed = spool.stages.submit_file(path.name, data)
        if job_id is None:
            said = "no job_id, and none can be added without changing the file: it is given one "
            print(printable(f"{path}: submitted as {placed} ({said}when spoold takes the file)"))
            continue
        submitted[job_id] = path
        print(printable(f"{path}: submitted as {placed} (job {job_id})"))
        waits.append(Submitted(job_id, placed, when))
    if not args.wait:
        return EXIT_FAILED if failed else EXIT_OK
    all_succeeded = wait_for_submitted(spool, config, waits, timeout=args.timeout)
    return EXIT_OK if all_succeeded and not failed else EXIT_FAILED


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    from spoold.face import views  # noqa: PLC0415
    from spoold.face.access import locate, read_status  # noqa: PLC0415

    spool = _spool(config)
    if args.job_id:
        job = locate(spool, args.job_id)
        status = views.job_view(spool, job, read_status(spool, job))
        if args.json:  # status.json, its steps listed from the job file until they start
            import json  # noqa: PLC0415

            print(json.dumps(status, indent=2))
        else:
            print(views.job_text(spool, config, job, status))
        return EXIT_OK
    if args.json:
        import json  # noqa: PLC0415

        print(json.dumps(views.summary(spool, config), indent=2))
    else:
        print(views.summary_text(spool, config))
    return EXIT_OK


def cmd_list(args: argparse.Namespace, config: Config) -> int:
    from spoold.face import listing  # noqa: PLC0415

    spool = _spool(config)
    labels = listing.parse_labels(args.label)
    if args.state == "rejected":
        rows = listing.rejected_rows(spool)
    else:
        rows = listing.job_rows(spool, args.state, labels, ids_only=args.ids)
    if args.limit:
        rows = rows[: args.limit]
    if args.ids:
        if rows:  # none: no line at all, not an empty one
            print("\n".join(listing.row_id(row) for row in rows))
    elif args.json:
        import json  # noqa: PLC0415

        print(json.dumps(rows, indent=2))
    elif rows:
        print("\n".join(listing.row_text(row) for row in rows))
    return EXIT_OK


def cmd_logs(args: argparse.Namespace, config: Config) -> int:
    from spoold.face.waits import show_log  # noqa: PLC0415

    return show_log(_spool(config), args.job_id, follow=args.follow)


def cmd_wait(args: argparse.Namespace, config: Config) -> int:
    from spoold.face.waits import wait_for_jobs  # noqa: PLC0415

    ids = list(dict.fromkeys(args.job_ids))
    done = wait_for_jobs(_spool(config), ids, timeout=args.timeout, host=config.host_id)
    return EXIT_OK if done else EXIT_FAILED


def _control(config: Config) -> JobControl:
    import logging  # noqa: PLC0415

    from spoold.core.clock import SystemClock  # noqa: PLC0415
    from spoold.out.outbox import callbacks_for  # noqa: PLC0415
    from spoold.run.control import JobControl  # noqa: PLC0415

    spool, clock = _spool(config), SystemClock()
    callbacks = callbacks_for(config, spool, clock, logging.getLogger("spoold"))
    return JobControl(spool, clock, who=_who(config), callbacks=callbacks)


def cmd_cancel(args: argparse.Namespace, config: Config) -> int:
    import time  # noqa: PLC0415

    from spoold.core.errors import JobNotFound  # noqa: PLC0415
    from spoold.core.states import JobState  # noqa: PLC0415
    from spoold.face.access import locate, read_status  # noqa: PLC0415
    from spoold.face.views import ended_text, printable  # noqa: PLC0415
    from spoold.face.waits import find_incoming  # noqa: PLC0415

    spool = _spool(config)
    try:
        locate(spool, args.job_id)  # "may not look" is said as such, never as "no job"
    except JobNotFound:
        if (placed := find_incoming(spool, args.job_id)) is None:
            raise
        # A job to come: no record of it to cancel yet, and intake acts on no request.
        print(printable(
            f"{args.job_id}: not accepted yet: its file {placed} waits for spoold to take it "
            f"in; cancel it once it is a job (`spoold wait {args.job_id}` returns when it "
            "ends), or withdraw it now by removing the file"
        ), file=sys.stderr)  # fmt: skip
        return EXIT_FAILED
    control = _control(config)
    outcome = control.cancel(args.job_id)
    if outcome.cancelled:
        attempts = read_status(spool, outcome.job).get("attempts") or []
        waited = f"attempt {len(attempts) + 1}" if attempts else "it"  # a retry it waited for
        print(f"{args.job_id}: cancelled before {waited} started ({outcome.job.path})")
        return EXIT_OK
    if outcome.state is not JobState.RUNNING:
        print(f"{args.job_id}: already {outcome.state.value}; nothing to cancel", file=sys.stderr)
        return EXIT_FAILED
    if control.worker_gone(outcome.job, config.host_id):  # killed, or stopped: none to wait for
        print(f"{args.job_id}: cancel requested; no spoold runs it now: it ends cancelled when "
              "spoold starts again on this host")  # fmt: skip
        return EXIT_OK
    lease = spool.jobs.read_lease(outcome.job) or {}
    here = lease.get("host") in (None, config.host_id)
    # This host's lease names a live holder (worker_gone said so): a daemon's, or an exec's.
    daemon = here and control.daemon_runs(config.host_id)
    if here and not daemon and lease.get("host") is None:
        # No process here watches its cancel requests but the job's supervisor, which ends
        # the job; what records it cancelled (running/ to failed/) is the next daemon: waiting
        # for that here would only end in "still running".
        print(f"{args.job_id}: cancel requested; no spoold runs on {config.hostname} for this "
              "spool: the job's supervisor stops it, and it is recorded cancelled when spoold "
              "starts here again")  # fmt: skip
        return EXIT_OK
    bound = config.kill_grace + 30.0 if args.wait is None else args.wait
    stopper = "its worker" if here else f"its worker on host {lease.get('host')}"
    if here and not daemon:
        stopper = f"its spoold exec (pid {lease.get('pid')})"
    print(f"{args.job_id}: cancel requested; {stopper} stops it", file=sys.stderr)
    end = time.monotonic() + bound
    while time.monotonic() < end:
        job = spool.jobs.find(args.job_id)
        if job is not None and job.directory in ("done", "failed"):
            status = read_status(spool, job)
            print(f"{args.job_id}: {status['state']} ({job.path})")
            if status["state"] != JobState.CANCELLED.value:
                print(f"{args.job_id}: {ended_text(status)} before the cancel reached it",
                      file=sys.stderr)  # fmt: skip
            return EXIT_OK if status["state"] == JobState.CANCELLED.value else EXIT_FAILED
        time.sleep(0.1)
    if bound > 0:
        print(f"{args.job_id}: still running after {bound:g}s", file=sys.stderr)
    return EXIT_FAILED if bound > 0 else EXIT_OK


def cmd_retry(args: argparse.Namespace, config: Config) -> int:
    from spoold.face.access import locate  # noqa: PLC0415

    locate(_spool(config), args.job_id)  # "may not look" is said as such, never as "no job"
    control = _control(config)
    job = control.retry(args.job_id).job  # says why not, for one not failed or cancelled
    woke = control.wake_daemon(config.host_id)
    print(f"{args.job_id}: back in pending/ ({job.path})")
    if not woke:
        print("no spoold runs here: the job runs when one starts", file=sys.stderr)
    return EXIT_OK


def cmd_unschedule(args: argparse.Namespace, config: Config) -> int:
    control = _control(config)
    _spool(config).jobs.unschedule(args.job_id)
    woke = control.wake_daemon(config.host_id)
    print(f"{args.job_id}: unscheduled (its runs stay where they are)")
    if not woke:
        print("no spoold runs here: others sharing the spool notice at their next scan",
              file=sys.stderr)  # fmt: skip
    return EXIT_OK


def cmd_purge(args: argparse.Namespace, config: Config) -> int:
    from spoold.core.errors import ConfigError  # noqa: PLC0415
    from spoold.core.units import parse_duration  # noqa: PLC0415
    from spoold.face.cleanup import purge  # noqa: PLC0415

    try:
        age = None if args.older_than is None else parse_duration(args.older_than)
    except ValueError as exc:
        raise ConfigError(f"--older-than: {exc}") from exc
    states = [args.state] if args.state else ["done", "failed", "rejected"]
    return purge(_spool(config), config, states, age, args.older_than, dry_run=args.dry_run)


def _who(config: Config) -> str:
    """Who runs this command, for records: ``alice on host1``."""
    from spoold.face.access import caller  # noqa: PLC0415

    return caller(config.hostname)


def cmd_hosts(args: argparse.Namespace, config: Config) -> int:
    from spoold.face.views import hosts_rows  # noqa: PLC0415

    spool = _spool(config)
    rows = hosts_rows(spool, config)
    if args.forget is not None:
        row = next((r for r in rows if r["host"] == args.forget), None)
        if row is None:
            print(f"spoold: no host {args.forget!r} in hosts/", file=sys.stderr)
            return EXIT_FAILED
        if row["state"] not in ("gone", "stale"):
            print(f"spoold: host {args.forget} is {row['state']}: only a gone or stale host's "
                  "record is removed", file=sys.stderr)  # fmt: skip
            return EXIT_FAILED
        spool.hosts.remove(args.forget)
        print(f"forgot host {args.forget} ({row['state']})")
        return EXIT_OK
    if args.json:
        import json  # noqa: PLC0415

        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("no host has served this spool yet (hosts/ is empty)")
    for row in rows:
        state = row["state"]
        if row["unchanged_for"]:
            state += f" (beat unchanged {row['unchanged_for']:.0f}s)"
        seen = f"seen by {row['seen_by']}" if row["seen_by"] else "no daemon's view"
        mark = "*" if row["this_host"] else " "
        running = ", ".join(row["running"][:5]) + (" ..." if len(row["running"]) > 5 else "")
        # A host that is not alive runs what its last beat said, not what runs now.
        dated = "" if row.get("running_as_of") is None else f" as of beat {row['running_as_of']}"
        print(f"{mark}{row['host']:<20} {state:<34} beat {row['beat']!s:<8} {seen:<18} "
              f"runs {len(row['running'])}{dated}{': ' + running if running else ''}")  # fmt: skip
    return EXIT_OK


def cmd_schedule_list(args: argparse.Namespace, config: Config) -> int:
    from spoold.face.schedules import schedule_rows  # noqa: PLC0415

    rows = schedule_rows(_spool(config))
    if args.json:
        import json  # noqa: PLC0415

        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for row in rows:
        coming = row.get("next_fire_times") or []
        when = "paused" if row.get("paused") else coming[0] if coming else "never again"
        last = (row.get("last_runs") or [{}])[0]
        ran = f"{last.get('run_id')} {last.get('state')}" if last else "no run yet"
        print(f"{row['job_id']:<32} next: {when:<22} last: {ran}")
    return EXIT_OK


def cmd_schedule_act(args: argparse.Namespace, config: Config) -> int:
    from spoold.face import schedules  # noqa: PLC0415

    spool, who, action = _spool(config), _who(config), args.schedule_command
    if action == "run":
        run = schedules.run_now(spool, args.job_id, who=who)
        said = f"{args.job_id}: run {run} asked for"
    elif action == "pause":
        done = schedules.pause(spool, args.job_id, who=who)
        said = (
            f"{args.job_id}: paused"
            if done["changed"]
            else (
                f"{args.job_id}: paused already, since {done['paused_at']} by {done['paused_by']}"
            )
        )
    else:
        done = schedules.resume(spool, args.job_id, who=who)
        said = f"{args.job_id}: resumed" if done["changed"] else f"{args.job_id}: was not paused"
    print(said)
    if not schedules.wake_daemon(spool, config.host_id):
        print("no spoold runs here: it acts when one starts (or another host sharing the spool "
              "does at its next scan)", file=sys.stderr)  # fmt: skip
    return EXIT_OK


def cmd_token_create(args: argparse.Namespace, config: Config) -> int:
    from spoold.core.clock import SystemClock  # noqa: PLC0415
    from spoold.core.tokens import TokenError, parse_scopes  # noqa: PLC0415
    from spoold.face.access import UsageError  # noqa: PLC0415
    from spoold.face.tokens import create_token  # noqa: PLC0415

    try:
        scopes = parse_scopes(args.scope)
        token, text = create_token(
            _spool(config), args.name, scopes, who=_who(config), now=SystemClock().now()
        )
    except TokenError as exc:
        raise UsageError(f"token create: {exc}") from None
    print(text)
    print(f"spoold: token {token.id} ({token.name}: {', '.join(token.scopes)}) made; it is "
          "shown only now", file=sys.stderr)  # fmt: skip
    return EXIT_OK


def cmd_token_list(args: argparse.Namespace, config: Config) -> int:
    from spoold.face.tokens import list_tokens  # noqa: PLC0415

    tokens = list_tokens(_spool(config))
    if args.json:
        import json  # noqa: PLC0415

        shown = [{k: v for k, v in t.to_dict().items() if k != "secret_sha256"} for t in tokens]
        print(json.dumps(shown, indent=2))
        return EXIT_OK
    for t in tokens:
        print(f"{t.id}  {t.name:<20} {','.join(t.scopes):<24} {t.created_at}  {t.created_by}")
    return EXIT_OK


def cmd_token_revoke(args: argparse.Namespace, config: Config) -> int:
    from spoold.core.tokens import TokenError  # noqa: PLC0415
    from spoold.face.access import UsageError  # noqa: PLC0415
    from spoold.face.tokens import revoke_tokens  # noqa: PLC0415

    try:
        revoked = revoke_tokens(_spool(config), args.which)
    except TokenError as exc:
        raise UsageError(f"token revoke: {exc}") from None
    for t in revoked:
        print(f"token {t.id} ({t.name}) revoked")
    return EXIT_OK


def cmd_schema(args: argparse.Namespace, config: Config | None) -> int:
    import json  # noqa: PLC0415

    from spoold.intake.validation import compose_job_schema, load_base_schema  # noqa: PLC0415
    from spoold.run.registry import ExecutorRegistry  # noqa: PLC0415

    schemas = ExecutorRegistry.from_entry_points().schemas()
    print(json.dumps(compose_job_schema(load_base_schema(), schemas), indent=2))
    return EXIT_OK


def cmd_completion(args: argparse.Namespace, config: Config | None) -> int:
    from spoold.face.completion import bash_script  # noqa: PLC0415

    sys.stdout.write(bash_script(build_parser()))
    return EXIT_OK
