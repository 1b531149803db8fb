"""Old against new in the benchmarks compares spoold with spoold, on one interpreter."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from benchmarks.bench_spool import same_interpreter


def test_a_venv_of_the_same_interpreter_is_taken() -> None:
    same_interpreter(sys.executable, sys.executable)


def test_another_build_of_python_is_refused_with_both_named(tmp_path: Path) -> None:
    """Another build differs by more than a round of work (a venv on pyenv's 3.11.7 held
    ~3 MiB more a process than one on Debian's 3.11.2)."""
    other = tmp_path / "python"
    other.write_text("#!/bin/sh\necho '3.11.7 (main, another build)'\necho /opt/python3.11\n")
    other.chmod(0o755)
    with pytest.raises(SystemExit) as refused:
        same_interpreter(sys.executable, str(other))
    message = str(refused.value)
    assert "3.11.7 (main, another build)" in message and sys.version.split()[0] in message
    assert str(other) in message
