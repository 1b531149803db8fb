"""spoold's own log (not a job's): where it goes and how its lines look."""

from __future__ import annotations

import errno
import io
import logging
import logging.handlers
import os
import stat
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
#: The modes of a logdir spoold makes (and of the parents it makes for it) and of spoold.log,
#: whatever the umask: the log names job ids, submitters and errors, for no other user to read
#: (nor for jobs, which run as other users).
LOGDIR_MODE = 0o750
LOG_FILE_MODE = 0o640


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


def configure_logging(
    config: Config, masker: Masker | None = None, *, warn: bool = True
) -> logging.Logger:
    """spoold's own log: standard error (journald under systemd), and logdir/spoold.log if set.

    ``masker``: the secrets read in this process, masked in every line. ``warn``: say, in the
    log, when a logdir or spoold.log that was there already is readable by other users.
    """
    logger = logging.getLogger("spoold")
    logger.setLevel(config.log_level.upper())
    logger.propagate = False
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(LineFormatter(journal=stderr_is_journal(sys.stderr), masker=masker))
    handlers: list[logging.Handler] = [stream]
    exposed: list[str] = []
    if config.logdir is not None:
        file = _log_file(config.logdir)
        file.setFormatter(LineFormatter(masker=masker))
        handlers.append(file)
        exposed = exposed_logs(config.logdir) if warn else []
    close_logging()
    for handler in handlers:
        logger.addHandler(handler)
    for warning in exposed:
        logger.warning(warning)
    return logger


def exposed_logs(logdir: Path) -> list[str]:
    """A warning for logdir and for its spoold.log if other users may read it, with the fix:
    one that spoold did not make is the operator's, whose mode spoold does not change."""
    warnings = []
    for path, what in ((logdir, "directory"), (logdir / "spoold.log", "file")):
        try:
            mode = path.stat().st_mode
        except OSError:
            continue
        if mode & (stat.S_IROTH | stat.S_IWOTH):
            warnings.append(
                f"logdir: the {what} {path} may be read by every local user (mode "
                f"{stat.S_IMODE(mode):04o}), jobs included: spoold's log names job ids, "
                f"submitters and errors; run chmod o-rwx {path}"
            )
    return warnings


class _LogFile(logging.handlers.WatchedFileHandler):
    """A WatchedFileHandler whose file, when it makes it (at start, or after a rotation),
    is LOG_FILE_MODE whatever the umask."""

    def _open(self) -> io.TextIOWrapper:
        # Appended to, as the handler's default mode "a" would.
        return open(_log_fd(self.baseFilename), "a", encoding=self.encoding, errors=self.errors)


def _log_fd(path: str) -> int:
    flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
    for _ in range(3):  # bounded: each round lost a race with a rotation
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, LOG_FILE_MODE)
        except FileExistsError:
            try:
                return os.open(path, flags)
            except FileNotFoundError:
                continue
        os.fchmod(fd, LOG_FILE_MODE)  # the umask may have taken bits from it
        return fd
    return os.open(path, flags | os.O_CREAT, LOG_FILE_MODE)


def _make_logdir(logdir: Path) -> None:
    """logdir and the parents it lacks, each LOGDIR_MODE whatever the umask (Path.mkdir gives
    the parents the umask's mode)."""
    missing = []
    where = logdir.absolute()
    while not os.path.lexists(where) and where != where.parent:  # bounded: the path's depth
        missing.append(where)
        where = where.parent
    for path in reversed(missing):
        try:
            path.mkdir(LOGDIR_MODE)
        except FileExistsError:
            continue  # made meanwhile by someone else: theirs
        path.chmod(LOGDIR_MODE)
    if not logdir.is_dir():
        raise FileExistsError(errno.EEXIST, "not a directory", str(logdir))


def _log_file(logdir: Path) -> logging.Handler:
    """logdir/spoold.log, opened by a handler that reopens it once it is moved or removed
    (logrotate's default rotation: rename, then a new file), in the daemon and in each worker
    process alike; a plain FileHandler wrote on into the rotated file for ever. ConfigError
    naming the key where the directory cannot be made or the file opened."""
    try:
        _make_logdir(logdir)
        return _LogFile(logdir / "spoold.log")
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
