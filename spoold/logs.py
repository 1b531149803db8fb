"""spoold's own log (not a job's): where it goes and how its lines look."""

from __future__ import annotations

import logging
import sys

from spoold.config import Config
from spoold.secrets import Masker


class _MaskingFormatter(logging.Formatter):
    """Formats as usual, then masks: a secret may hide in a message, an argument or a traceback."""

    def __init__(self, fmt: str, masker: Masker) -> None:
        super().__init__(fmt)
        self._masker = masker

    def format(self, record: logging.LogRecord) -> str:
        return self._masker.mask_text(super().format(record))


def configure_logging(config: Config, masker: Masker | None = None) -> logging.Logger:
    """spoold's own log: standard error (journald under systemd), and logdir/spoold.log if set.

    ``masker``: the secrets read in this process, masked in every line.
    """
    logger = logging.getLogger("spoold")
    logger.setLevel(config.log_level.upper())
    logger.propagate = False
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    formatter = logging.Formatter(fmt) if masker is None else _MaskingFormatter(fmt, masker)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if config.logdir is not None:
        config.logdir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(config.logdir / "spoold.log"))
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger
