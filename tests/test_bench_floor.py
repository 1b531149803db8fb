"""The compiled floor does what the durable floor does: the same jobs end the same way."""

from __future__ import annotations

import json
import os
from pathlib import Path

from benchmarks.bench_compare import find_cc, make_compiled_floor, make_floor
from benchmarks.bench_spool import Finished, Tool, stage_jobs

#: What each job runs, and with which shell (None: the floors' /bin/sh).
_JOBS: dict[str, tuple[str, str | None]] = {
    "plain": ('echo "$JOB_ID in $(pwd)"; echo to stderr >&2', None),
    "failing": ("echo before; exit 3", None),
    "quoted": ('printf \'%s\\n\' "say \\"hi\\"" \'back\\slash\' "tab\there"', None),
    "bash": ('[ -n "$EPOCHREALTIME" ] && echo bash', "/bin/bash"),
    "list": ("echo one\necho two", None),
}


def _run(tool: Tool, base: Path) -> None:
    """Every job of ``_JOBS`` through ``tool``, a file it cannot read among them."""
    stage = base / f"stage-{tool.name}"
    stage.mkdir()
    names = [
        name
        for job_id, (commands, shell) in _JOBS.items()
        for name in stage_jobs(stage, [job_id], commands, shell=shell)
    ]
    (stage / "broken.yaml").write_text("not: a job file\n")
    tool.daemon.start()
    try:
        with Finished(tool.spool, list(_JOBS)) as finished:
            os.rename(stage / "broken.yaml", tool.incoming / "broken.yaml")
            for name in names:
                os.rename(stage / name, tool.incoming / name)
            finished.wait(60.0)
    finally:
        assert tool.daemon.stop() == 0, tool.daemon.log_tail()


def _outcomes(tool: Tool) -> dict[str, tuple[str, list[str], dict[str, object], str]]:
    """Per job: its state's directory, its files, its status, its log (the spool's own path
    written SPOOL)."""
    found = {}
    for state in ("done", "failed"):
        for job_dir in sorted((tool.spool / state).iterdir()):
            log = (job_dir / "log").read_text().replace(str(tool.spool), "SPOOL")
            status = json.loads((job_dir / "status.json").read_text())
            found[job_dir.name] = (state, sorted(os.listdir(job_dir)), status, log)
    return found


def test_the_compiled_floor_ends_every_job_as_the_durable_floor_does(tmp_path: Path) -> None:
    """Its figures in bench_compare stand for the durable floor's work without an interpreter
    only if it does the same work: each job in the same state, with the same files, status and
    log; a file it cannot read left aside without stopping it."""
    cc = find_cc()
    assert cc is not None, "a C compiler and the C library's headers: make system-deps"
    python = make_floor(tmp_path, 2)
    compiled = make_compiled_floor(tmp_path, 2, cc)
    for tool in (python, compiled):
        _run(tool, tmp_path)
    expected = _outcomes(python)
    assert sorted(expected) == sorted(_JOBS)
    assert expected["failing"][:1] == ("failed",) and expected["plain"][:1] == ("done",)
    assert expected["plain"][3] == "plain in SPOOL/running/plain\nto stderr\n"
    assert expected["quoted"][3] == 'say "hi"\nback\\slash\ntab\there\n'
    assert _outcomes(compiled) == expected
    for tool in (python, compiled):
        assert not os.listdir(tool.incoming), f"{tool.name} took every file"
        left = [p.name for p in (tool.spool / "tmp").glob("*/job.yaml")]
        assert left == ["job.yaml"], f"{tool.name} left the unreadable file in its stage"
