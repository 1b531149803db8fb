"""``spoold purge``: finished jobs (done/, failed/) and rejected files (rejected/) older than an
age, each named; ``--dry-run`` names them and removes nothing.

Finished jobs go as the daemon's retention removes them (``retention.apply_retention``), with
the config's ages per executor too (what billing keeps longer, a purge keeps too); rejected
files through ``Stages.purge_rejected``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from spoold.core.retention import Retention, Rule, apply_retention
from spoold.core.spool import Spool
from spoold.face.views import printable

if TYPE_CHECKING:
    from spoold.core.config import Config


def _rejected_at(spool: Spool, name: str, reason: dict[str, Any] | None) -> float:
    from spoold.core.clock import parse_rfc3339  # noqa: PLC0415

    try:
        return parse_rfc3339(str((reason or {})["rejected_at"])).timestamp()
    except (KeyError, ValueError):
        return (spool.dir("rejected") / name).stat().st_ctime


def purge(
    spool: Spool,
    config: Config,
    states: list[str],
    age: float | None,
    age_text: str | None,
    *,
    dry_run: bool,
) -> int:
    """Remove (or, ``dry_run``, only name) what is older than ``age`` (None: all of rejected/)."""
    now = time.time()
    verb = "would remove" if dry_run else "removed"
    jobs = rejected = 0
    if finished := [s for s in states if s != "rejected"]:
        assert age is not None  # the parser asks for --older-than unless only rejected/ is purged
        # The daemon's retention, with ``age`` for every state: what billing keeps longer stays.
        rules = Retention(dict.fromkeys(finished, Rule(max_age=age)), config.retention.executors)
        for job in apply_retention(spool, rules, now, states=finished, dry_run=dry_run):
            print(printable(f"{verb} {job.directory}/{job.job_id}"))
            jobs += 1
    if "rejected" in states:
        for name, reason in spool.stages.list_rejected():
            if age is not None and now - _rejected_at(spool, name, reason) <= age:
                continue
            if not dry_run:
                try:
                    spool.stages.purge_rejected(name)
                except FileNotFoundError:
                    continue
            print(printable(f"{verb} rejected/{name}"))  # a submitter's file name
            rejected += 1
    counted = []
    if any(s != "rejected" for s in states):
        counted.append(f"{jobs} finished job(s)")
    if "rejected" in states:
        counted.append(f"{rejected} rejected file(s)")
    older = f" older than {age_text}" if age_text else ""
    print(
        f"{verb} {' and '.join(counted)}{older}"
        + (" (a dry run: nothing removed)" if dry_run else "")
    )
    return 0
