"""Worker-process entries for tests that drive spoold.run.pool with real processes."""

from __future__ import annotations

import os
import sys

from spoold.wiring import serve_worker_process

#: While set in the environment, a worker process started by ``serve_unless_refused`` ends at once.
REFUSE = "SPOOLD_TEST_REFUSE_WORKER"


def serve_unless_refused(fd: int) -> None:
    """A worker process, unless REFUSE is set: then one that cannot start (exit code 3)."""
    if os.environ.get(REFUSE):
        sys.exit(3)
    serve_worker_process(fd)
