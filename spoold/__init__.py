"""spoold: a crash-safe spool job runner."""

__version__ = "0.1.0"
