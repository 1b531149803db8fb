"""spoold's own log (not a job's): where it goes and how its lines look."""

from __future__ import annotations

import logging
import sys

from spoold.config import Config


def configure_logging(config: Config) -> logging.Logger:
    """spoold's own log: standard error (journald under systemd), and logdir/spoold.log if set."""
    logger = logging.getLogger("spoold")
    logger.setLevel(config.log_level.upper())
    logger.propagate = False
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
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
