"""Job ids: what names a job, and the ids spoold makes. Stdlib only: the spool and the
command line's light paths import it."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datetime import datetime

__all__ = ["HOST_ID", "JOB_ID", "RUN_ID", "generate_job_id"]

JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: A job directory's name: a job id, or a schedule's run ``<job_id>@<UTC time of the firing>``.
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(@[0-9]{8}T[0-9]{6}Z)?$")
#: What a host id may be (``host_id``, ``RUNNER_ID``): a file name in hosts/, no dot file.
HOST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


def generate_job_id(moment: datetime) -> str:
    """A unique, sortable id for a job file that names none."""
    return f"job-{moment.strftime('%Y%m%dT%H%M%S')}-{os.urandom(4).hex()}"
