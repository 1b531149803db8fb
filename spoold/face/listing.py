"""What ``spoold list`` shows: the jobs of a state (or every one), by label too, newest first;
or the files in rejected/ with their reason."""

from __future__ import annotations

import sys
from typing import Any

from spoold.core.errors import SpoolError, escape_unprintable
from spoold.core.spool import JobDir, Spool
from spoold.core.states import JOB_DIRECTORIES
from spoold.face.access import NotAllowed, hidden_directories, refusal
from spoold.face.views import labels_of, printable


def parse_labels(given: list[str]) -> dict[str, str | None]:
    """``--label team=ops --label urgent``: {"team": "ops", "urgent": None} (any value)."""
    labels: dict[str, str | None] = {}
    for item in given:
        key, has_value, value = item.partition("=")
        labels[key] = value if has_value else None
    return labels


def _labelled(
    spool: Spool, job: JobDir, status: dict[str, Any], wanted: dict[str, str | None]
) -> bool:
    labels = labels_of(spool, job, status)
    if labels is None:
        return False
    status["labels"] = labels  # shown by --json too
    return all(key in labels and (value is None or str(labels[key]) == value)
               for key, value in wanted.items())  # fmt: skip


def job_rows(
    spool: Spool, state: str | None, labels: dict[str, str | None], *, ids_only: bool = False
) -> list[dict[str, Any]]:
    """``spoold list``: the status of each job in a state (or every job), newest first.

    Directories this user may not look into are left out, said on standard error; NotAllowed
    when that is every one asked for.
    """
    scheduled = state == "scheduled"
    by_directory = {"succeeded": "done", "cancelled": "failed"}
    directories = (
        ["scheduled"]
        if scheduled
        else [by_directory.get(state, state)]
        if state
        else list(JOB_DIRECTORIES)
    )
    if hidden := hidden_directories(spool, tuple(directories)):
        if len(hidden) == len(directories):
            raise NotAllowed(f"cannot list jobs: {refusal(spool, hidden)}")
        print(f"spoold: not listed: {refusal(spool, hidden)}", file=sys.stderr)
    jobs = [j for d in directories if d not in hidden for j in spool.jobs.list_jobs(d)]
    if ids_only and not labels and state in (None, "pending", "running", "scheduled"):
        return [{"job_id": job.job_id} for job in jobs]
    rows = []
    for job in jobs:
        try:
            status = spool.jobs.read_status(job)
        except (SpoolError, PermissionError):
            continue  # moved on while we looked, or one this user may not read
        if state and not scheduled and status.get("state") != state:
            continue
        if labels and not _labelled(spool, job, status, labels):
            continue
        if scheduled:
            times = status.get("next_fire_times") or [
                "paused" if status.get("paused") else "never again"
            ]
            runs = status.get("runs") or []
            last = str(runs[-1]["run_id"]) if runs else "none yet"
            status["error"] = f"next: {times[0]}; last run: {last}"
        rows.append(status)
    # Directory times change with every state change; submission time does not.
    rows.sort(key=lambda row: str(row.get("submitted_at") or ""), reverse=True)
    return rows


def rejected_rows(spool: Spool) -> list[dict[str, Any]]:
    """``spoold list --state rejected``: each file in rejected/ with its reason, newest first."""
    if hidden := hidden_directories(spool, ("rejected",)):
        raise NotAllowed(f"cannot list rejected files: {refusal(spool, hidden)}")
    rows = [
        {"name": name, "state": "rejected", **(reason or {})}
        for name, reason in spool.stages.list_rejected()
    ]
    rows.sort(key=lambda row: str(row.get("rejected_at") or ""), reverse=True)
    return rows


def row_text(row: dict[str, Any]) -> str:
    """One line of ``spoold list`` (a file name, an error: one line, escaped as they come,
    each once: the columns line up as the escaped text is wide)."""
    if "name" in row and row.get("state") == "rejected":
        reason = f"{row.get('code') or '?'}: {row.get('reason') or '(no reason.json)'}"
        fields = [row["name"], "rejected", "", row.get("rejected_at") or "", reason]
    else:
        fields = [row["job_id"], row["state"], row.get("executor") or "",
                  row.get("submitted_at") or "", row.get("error") or ""]  # fmt: skip
    # The names are the submitter's text; a reason or an error quotes its values escaped
    # where it was made (printable would double each backslash of those escapes).
    name, state, executor, when = (printable(field) for field in fields[:4])
    said = escape_unprintable(str(fields[4]))
    return f"{name:<40} {state:<10} {executor:<8} {when:<28} {said}"


def row_id(row: dict[str, Any]) -> str:
    """What ``spoold list --ids`` (the bash completion) says of a row: the job id, or the name
    of a rejected file, escaped."""
    return printable(row.get("job_id") or row.get("name"))
