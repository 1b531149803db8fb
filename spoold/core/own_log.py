"""spoold's own log (not a job's): where it goes and how its lines look."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from spoold.core.config import Config
from spoold.core.errors import ConfigError
from spoold.core.secrets import Masker

#: The timestamped form: a terminal, a plain file, anything but journald.
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: journald stamps its own time; the ``<N>`` prefix (added per line) carries the priority.
JOURNAL_FORMAT = "%(name)s: %(message)s"
#: What a continuation line of a multi-line event (a traceback) starts with in the plain form.
CONTINUATION = "    "


def syslog_priority(level: int) -> int:
    """The syslog priority of a logging level, as sd-daemon(3) prefixes take it."""
    if level >= logging.CRITICAL:
        return 2
    if level >= logging.ERROR:
        return 3
    if level >= logging.WARNING:
        return 4
    if level >= logging.INFO:
        return 6
    return 7


class LineFormatter(logging.Formatter):
    """One event, one line: masked, and with its continuation lines kept inside the event.

    ``journal``: the ``<N>`` priority prefix instead of a timestamp, and newlines escaped as
    ``\\n`` (journald takes every line of a stream as an event of its own). Otherwise
    continuation lines are indented, so that every line that starts an event starts unindented.
    ``masker``: the secrets read in this process, masked in messages, arguments and tracebacks.
    """

    def __init__(self, *, journal: bool = False, masker: Masker | None = None) -> None:
        super().__init__(JOURNAL_FORMAT if journal else PLAIN_FORMAT)
        self.journal = journal
        self._masker = masker

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).rstrip("\n")
        if self._masker is not None:
            text = self._masker.mask_text(text)
        if self.journal:
            return f"<{syslog_priority(record.levelno)}>" + text.replace("\n", "\\n")
        return text.replace("\n", "\n" + CONTINUATION)


def stderr_is_journal(stream: TextIO | None = None, env: Mapping[str, str] | None = None) -> bool:
    """True if ``stream`` (stderr) is connected to journald, as systemd says in JOURNAL_STREAM.

    systemd sets ``JOURNAL_STREAM=DEVICE:INODE`` for the stream it connected; a process whose
    stderr went elsewhere (a terminal, a file) keeps the variable but not the stream.
    """
    stream = sys.stderr if stream is None else stream
    env = os.environ if env is None else env
    expected = env.get("JOURNAL_STREAM", "")
    if not expected or stream is None:
        return False
    try:
        if stream.isatty():
            return False
        info = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{info.st_dev}:{info.st_ino}"


def configure_logging(config: Config, masker: Masker | None = None) -> logging.Logger:
    """spoold's own log: standard error (journald under systemd), and logdir/spoold.log if set.

    ``masker``: the secrets read in this process, masked in every line.
    """
    logger = logging.getLogger("spoold")
    logger.setLevel(config.log_level.upper())
    logger.propagate = False
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(LineFormatter(journal=stderr_is_journal(sys.stderr), masker=masker))
    handlers: list[logging.Handler] = [stream]
    if config.logdir is not None:
        file = _log_file(config.logdir)
        file.setFormatter(LineFormatter(masker=masker))
        handlers.append(file)
    close_logging()
    for handler in handlers:
        logger.addHandler(handler)
    return logger


def _log_file(logdir: Path) -> logging.Handler:
    """logdir/spoold.log, opened by a handler that reopens it once it is moved or removed
    (logrotate's default rotation: rename, then a new file), in the daemon and in each worker
    process alike; a plain FileHandler wrote on into the rotated file for ever. ConfigError
    naming the key where the directory cannot be made or the file opened."""
    try:
        logdir.mkdir(parents=True, exist_ok=True)
        return logging.handlers.WatchedFileHandler(logdir / "spoold.log")
    except FileExistsError:
        raise ConfigError(
            f"key logdir: {logdir} is not a directory: spoold writes spoold.log into it; "
            "name a directory (RUNNER_LOG_DIR overrides the key)"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"key logdir: cannot write spoold.log in {logdir}: {exc.strerror or exc}; name a "
            "directory spoold's user may write (RUNNER_LOG_DIR overrides the key)"
        ) from None


def reopen_logging() -> None:
    """Reopen spoold's log file now (SIGHUP): a rotation by copy, or a file moved while no
    line was written, is followed at once rather than at the next line."""
    for handler in logging.getLogger("spoold").handlers:
        if isinstance(handler, logging.handlers.WatchedFileHandler):
            handler.reopenIfNeeded()


def close_logging() -> None:
    """Close spoold's log handlers: before ``--daemon`` detaches, which closes every file."""
    logger = logging.getLogger("spoold")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
