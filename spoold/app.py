"""The composition root: the ``spoold`` command's entry point, and the commands that build
and run spoold's parts (``run``: the daemon; ``exec``: one job in the foreground).

The command line itself is a face (spoold.face.cli): it parses, reads and shows, and hands
these two commands back here, the only layer that may wire every other. This module stays as
light as the face: the daemon's parts are imported by the command that runs them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from spoold.face.cli import EXIT_FAILED, EXIT_USAGE, read_job_file
from spoold.face.cli import main as cli_main

if TYPE_CHECKING:
    import argparse

    from spoold.core.config import Config


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``spoold`` command."""
    return cli_main(argv, commands={"run": cmd_run, "exec": cmd_exec})


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    """The daemon: in the foreground (systemd, Type=notify), or detached with ``--daemon``.

    One daemon per spool and host: if another holds the lock, say which and exit 2.
    """
    from spoold.core.own_log import close_logging, configure_logging  # noqa: PLC0415
    from spoold.daemon import Daemon, Systemd, check_detach, detach, lock_holder  # noqa: PLC0415

    if args.daemon:
        check_detach(config)  # detached without a logdir, its log would go nowhere
    daemon = Daemon.build(config)  # every check that can fail, while the terminal still sees it
    daemon.detached = args.daemon  # a reload checks what check_detach did
    if daemon.spool.host_lock.daemon_on(config.host_id) is not None:
        print(f"spoold: {lock_holder(daemon.spool, config.host_id)}", file=sys.stderr)
        return EXIT_USAGE
    if args.daemon:
        close_logging()  # its files would be closed under it, their numbers reused
        detach(args.pidfile.absolute() if args.pidfile else None)
        configure_logging(config, warn=False)  # said before it detached
        daemon.systemd = Systemd()  # a new pid: WATCHDOG_PID names the process that detached
    return daemon.run()


def cmd_exec(args: argparse.Namespace, config: Config) -> int:
    from spoold.oneshot import has_schedule, run_once  # noqa: PLC0415

    # A missing file or a directory is said as validate says it: "FILE: cannot read: ...".
    if (data := read_job_file(args.file)) is None:
        return EXIT_FAILED
    if has_schedule(data, args.file.name):
        print(f"{args.file}: has a schedule: exec runs one job now; submit it to spoold instead",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    return run_once(args.file, config)
