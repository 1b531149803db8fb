"""The lowest layer: what every other part stands on, importing nothing of spoold's above it.

The job as data (states and their transitions, the parsed spec, ids), the spool tree (the only
code that touches it), time, units, documents with their positions, secrets, the job's own log,
spoold's own log, and the configuration.
"""
