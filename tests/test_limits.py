"""Job resource limits: parsing, the prlimit command line, and real processes hitting each limit."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from spoold.core.errors import ExecutorError
from spoold.core.limits import Limits, format_size
from spoold.core.units import parse_size

# Bounds every wait on a child: a limit that failed to apply must fail the test, not hang it.
CHILD_TIMEOUT = 30


def run_limited(limits: Limits, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` under ``limits`` the way the daemon would, output merged as in a job log."""
    return subprocess.run(
        limits.wrap(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=CHILD_TIMEOUT,
        check=False,
    )


# -- parsing -----------------------------------------------------------------------------------


def test_from_document_reads_every_limit() -> None:
    limits = Limits.from_document({"memory": "512MiB", "cpu_seconds": 60, "open_files": 256})
    assert limits == Limits(memory=512 * 1024**2, cpu_seconds=60, open_files=256)


def test_from_document_takes_memory_as_bytes_or_size_string() -> None:
    assert Limits.from_document({"memory": 4096}) == Limits(memory=4096)
    assert Limits.from_document({"memory": "512M"}) == Limits(memory=512 * 1000**2)


@pytest.mark.parametrize("document", [None, {}, {"memory": None, "open_files": None}])
def test_from_document_without_limits_is_none(document: dict[str, Any] | None) -> None:
    assert Limits.from_document(document) is None


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"memroy": "1G"}, "unknown key limits.memroy"),
        ({"memory": "lots"}, "limits.memory"),
        ({"memory": 1.5}, "limits.memory"),
        ({"memory": True}, "limits.memory"),
        ({"memory": 0}, "limits.memory"),
        ({"cpu_seconds": 0}, "limits.cpu_seconds"),
        ({"cpu_seconds": "60"}, "limits.cpu_seconds"),
        ({"cpu_seconds": True}, "limits.cpu_seconds"),
        ({"open_files": -1}, "limits.open_files"),
        ({"open_files": 2.0}, "limits.open_files"),
    ],
)
def test_from_document_refuses_bad_values_naming_the_key(
    document: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Limits.from_document(document)


# -- the command line ----------------------------------------------------------------------------


def test_wrap_prefixes_only_the_limits_that_are_set() -> None:
    argv = ["/bin/sh", "-c", "echo hi"]
    assert Limits(memory=1000, cpu_seconds=60, open_files=256).wrap(argv, prlimit="/p") == [
        "/p", "--as=1000", "--cpu=60:61", "--nofile=256", "--", "/bin/sh", "-c", "echo hi",
    ]  # fmt: skip
    assert Limits(open_files=16).wrap(argv, prlimit="/p") == ["/p", "--nofile=16", "--", *argv]


def test_wrap_finds_prlimit_on_path() -> None:
    wrapped = Limits(cpu_seconds=5).wrap(["true"])
    assert wrapped[0] == shutil.which("prlimit")
    assert wrapped[1:] == ["--cpu=5:6", "--", "true"]


def test_wrap_without_prlimit_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no prlimit anywhere
    with pytest.raises(ExecutorError, match="util-linux's prlimit"):
        Limits(memory=1000).wrap(["true"])


def test_wrapped_command_starting_with_a_dash_is_not_a_prlimit_option(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    command = tmp_path / "-V"
    command.write_text("#!/bin/sh\necho ran\n")
    command.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    # Without the `--`, prlimit would read `-V` as its own option and print its version.
    done = run_limited(Limits(open_files=64), ["-V"])
    assert (done.returncode, done.stdout) == (0, "ran\n")


def test_describe() -> None:
    assert (
        Limits(memory=512 * 1024**2, cpu_seconds=60, open_files=256).describe()
        == "memory 512 MiB, cpu 60 s, open files 256"
    )
    assert Limits(memory=512 * 1000**2).describe() == "memory 512 MB"
    assert Limits().describe() == "no limits"


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (512 * 1024**2, "512 MiB"),
        (512 * 1000**2, "512 MB"),
        (2 * 1024**3, "2 GiB"),
        (1536 * 1024, "1536 KiB"),
        (100_000_001, "95.4 MiB"),
        (100, "100 B"),
    ],
)
def test_format_size_reads_as_written_and_parses_back(size: int, text: str) -> None:
    assert format_size(size) == text
    assert parse_size(text) == pytest.approx(size, rel=0.001)


# -- real processes ------------------------------------------------------------------------------


def test_cpu_limit_ends_a_busy_loop_with_sigxcpu() -> None:
    limits = Limits(cpu_seconds=1)
    done = run_limited(limits, ["sh", "-c", "while :; do :; done"])
    # SIGXCPU, not SIGKILL: the hard limit one second above the soft one gives the warning room.
    assert done.returncode == -signal.SIGXCPU
    assert limits.explain(done.returncode, done.stdout) == "cpu_seconds limit reached (1 s of CPU)"


def test_cpu_limit_is_recognised_when_a_shell_reports_the_killed_child() -> None:
    limits = Limits(cpu_seconds=1)
    # The `exit` keeps sh from exec'ing the inner shell: sh itself survives and reports 128+24.
    done = run_limited(limits, ["sh", "-c", "sh -c 'while :; do :; done'; exit $?"])
    assert done.returncode == 128 + signal.SIGXCPU
    assert limits.explain(done.returncode, done.stdout) == "cpu_seconds limit reached (1 s of CPU)"


def test_memory_limit_fails_a_large_allocation() -> None:
    argv = [sys.executable, "-c", "bytearray(400 * 1024 * 1024)"]
    # The same allocation without the limit succeeds: the limit, not the host, refused it.
    assert run_limited(Limits(), argv).returncode == 0
    limits = Limits.from_document({"memory": "100M"})
    assert limits is not None
    done = run_limited(limits, argv)
    assert done.returncode == 1
    assert "MemoryError" in done.stdout
    assert limits.explain(done.returncode, done.stdout) == "memory limit reached (100 MB)"


def test_open_files_limit_fails_the_seventeenth_file() -> None:
    argv = [sys.executable, "-c", "files = [open('/dev/null') for _ in range(64)]"]
    assert run_limited(Limits(), argv).returncode == 0
    limits = Limits(open_files=16)
    done = run_limited(limits, argv)
    assert done.returncode == 1
    assert "Too many open files" in done.stdout
    assert limits.explain(done.returncode, done.stdout) == "open_files limit reached (16)"


def test_an_ordinary_failure_is_no_limit() -> None:
    limits = Limits(memory=512 * 1024**2, cpu_seconds=60, open_files=256)
    done = run_limited(limits, ["sh", "-c", "echo 'no such thing' >&2; exit 3"])
    assert done.returncode == 3
    assert done.stdout == "no such thing\n"
    assert limits.explain(done.returncode, done.stdout) is None


# -- explain on its own ----------------------------------------------------------------------------


def test_explain_takes_sigkill_as_the_cpu_hard_limit_only_when_one_is_set() -> None:
    assert Limits(cpu_seconds=5).explain(-signal.SIGKILL, "") == (
        "cpu_seconds limit reached (5 s of CPU)"
    )
    assert Limits(cpu_seconds=5).explain(128 + signal.SIGKILL, "") is not None
    assert Limits(memory=1024).explain(-signal.SIGKILL, "") is None
    assert Limits(open_files=8).explain(-signal.SIGXCPU, "") is None


@pytest.mark.parametrize(
    "output",
    [
        "mmap: Cannot allocate memory",
        "MemoryError",
        "fatal: Out of memory, malloc failed",
        "terminate called after throwing an instance of 'std::bad_alloc'",
    ],
)
def test_explain_recognises_how_programs_say_they_ran_out_of_memory(output: str) -> None:
    assert Limits(memory=2 * 1024**3).explain(1, f"starting\n{output}\n") == (
        "memory limit reached (2 GiB)"
    )


def test_explain_blames_only_limits_that_are_set_and_jobs_that_failed() -> None:
    assert Limits(open_files=16).explain(1, "MemoryError") is None
    assert Limits(memory=1024).explain(1, "OSError: [Errno 24] Too many open files") is None
    assert Limits(memory=1024).explain(0, "MemoryError, recovered") is None


def test_explain_names_the_refusal_printed_last() -> None:
    limits = Limits(memory=1024, open_files=16)
    assert limits.explain(1, "Too many open files\n...\nMemoryError") == (
        "memory limit reached (1 KiB)"
    )
    assert limits.explain(1, "MemoryError\n...\nToo many open files") == (
        "open_files limit reached (16)"
    )
