"""Bash completion: the script the package installs is the one `spoold completion` writes, and
bash completes commands, options, --state values and the job ids of the spool on the line."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spoold.core.spool import Spool
from tests.test_cli_status import make_job

SCRIPT = Path(__file__).resolve().parent.parent / "packaging" / "spoold.bash-completion"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def test_the_packaged_script_is_the_generated_one() -> None:
    made = subprocess.run([sys.executable, "-m", "spoold", "completion"], capture_output=True,
                          text=True, timeout=60, check=True)  # fmt: skip
    assert made.stdout == SCRIPT.read_text(), (
        "packaging/spoold.bash-completion is stale: spoold completion > "
        "packaging/spoold.bash-completion"
    )


def complete(*words: str) -> list[str]:
    """What bash offers for the command line ``spoold WORDS`` (the last word being typed)."""
    line = " ".join(shlex.quote(w) for w in ("spoold", *words))
    program = (
        f"source {shlex.quote(str(SCRIPT))}\n"
        "complete -p spoold >/dev/null || exit 3\n"
        f"COMP_WORDS=({line}); COMP_CWORD={len(words)}; COMP_LINE={shlex.quote(line)}\n"
        '_spoold; printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    # `spoold` as the completion calls it: the console script of this venv, first on PATH.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    done = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=60,
                          check=False, env={**os.environ, "PATH": path})  # fmt: skip
    assert done.returncode == 0, done.stderr
    return [word for word in done.stdout.splitlines() if word]


def test_sourcing_defines_the_completion() -> None:
    done = subprocess.run(["bash", "-c", f"source {shlex.quote(str(SCRIPT))}; complete -p spoold"],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0 and "-F _spoold spoold" in done.stdout, done.stderr


def test_commands_options_and_states_complete() -> None:
    assert complete("st") == ["status"]
    assert complete("--spool", "/tmp", "li") == ["list"]
    assert complete("list", "--st") == ["--state"]
    assert complete("list", "--state", "r") == ["running", "rejected"]
    assert complete("purge", "--state", "") == ["done", "failed", "rejected"]
    assert "--dry-run" in complete("purge", "--")


@pytest.mark.skipif(
    not (Path(sys.executable).parent / "spoold").exists(), reason="no spoold console script"
)
def test_job_ids_complete_from_the_spool_on_the_line(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    Spool(root).init()
    make_job(root, "alpha-1")
    make_job(root, "alpha-2", "succeeded", exit_code=0)
    make_job(root, "beta")
    assert complete("status", "--spool", str(root), "al") == ["alpha-1", "alpha-2"]
    assert complete("--spool", str(root), "wait", "b") == ["beta"]
