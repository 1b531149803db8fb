"""The leak guard of conftest.py, run on tests written to leak (or not) in a pytest of their own."""

from __future__ import annotations

import threading
import time

import pytest

from tests.harness import running

pytest_plugins = ["pytester"]

# Run in this process: the inner session registers a LeakGuard of its own from tests.conftest,
# so the guards of the two sessions share no state.
CONFTEST = 'pytest_plugins = ["tests.conftest"]\n'

#: The inner leaky thread's gate (TESTS names it too), in the inner session's directory: opened
#: once that session is over.
LEAKY_GATE = "leaky-thread.go"
TESTS = """
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

LEAKY_GATE = "leaky-thread.go"


def _remember(name, pid):
    Path(name).write_text(str(pid))


def _until_opened(gate, bound=60):
    end = time.monotonic() + bound
    while not Path(gate).exists() and time.monotonic() < end:
        time.sleep(0.01)


def test_clean():
    threading.Thread(target=time.sleep, args=(0.05,)).start()  # ends within the grace
    subprocess.run(["true"], check=True)


def test_leaks_a_thread():
    # Alive until the outer test opens its gate: past the guard's look, however late that is.
    threading.Thread(
        target=_until_opened, args=(Path(LEAKY_GATE).resolve(),), name="leaky-thread", daemon=True
    ).start()


def test_leaks_a_child():
    _remember("child.pid", subprocess.Popen(["sleep", "30"]).pid)


def test_leaks_a_grandchild_whose_parent_was_killed():
    shell = subprocess.Popen(
        ["sh", "-c", "sleep 30 & echo $! > grandchild.pid; wait"], start_new_session=True
    )
    while not Path("grandchild.pid").exists() or not Path("grandchild.pid").read_text():
        time.sleep(0.01)
    shell.kill()
    shell.wait()


@pytest.fixture
def half_stopped_server():
    # Its environment without the guard's variable: found as a member of the session only.
    server = subprocess.Popen(
        ["sh", "-c", "sleep 30 & echo $! > member.pid; wait"],
        env={"PATH": os.environ["PATH"]},
        start_new_session=True,
    )
    while not Path("member.pid").exists() or not Path("member.pid").read_text():
        time.sleep(0.01)
    yield
    server.kill()
    server.wait()


def test_leaks_what_the_session_of_its_fixture_holds(half_stopped_server):
    pass


@pytest.fixture
def stopped_server():
    process = subprocess.Popen(["sleep", "30"])
    yield process
    process.kill()
    process.wait()


def test_what_a_function_fixture_stops_is_no_leak(stopped_server):
    assert stopped_server.poll() is None


@pytest.fixture(scope="module")
def shared_server():
    process = subprocess.Popen(["sleep", "30"])
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="shared-server")
    thread.start()
    yield process
    stop.set()
    thread.join()
    process.kill()
    process.wait()


def test_a_module_fixture_is_not_blamed_on_its_first_test(shared_server):
    assert shared_server.poll() is None


def test_nor_on_the_next(shared_server):
    assert shared_server.poll() is None


@pytest.fixture(scope="session")
def session_server():
    process = subprocess.Popen(["sleep", "30"], start_new_session=True)
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="session-server")
    thread.start()
    yield process
    stop.set()
    thread.join()
    process.kill()
    process.wait()


def test_a_session_fixture_is_not_blamed_either(session_server):
    assert session_server.poll() is None


@pytest.mark.leaves_running("declared-thread")
def test_a_declared_thread_may_outlive_the_test():
    threading.Thread(target=time.sleep, args=(1.5,), name="declared-thread").start()
"""

MODULE_LEAK = """
import subprocess

import pytest


@pytest.fixture(scope="module")
def forgotten_server():
    yield subprocess.Popen(["sleep", "30"]).pid


def test_one(forgotten_server):
    pass


def test_two(forgotten_server):
    pass
"""


def _join(name: str) -> None:
    for thread in threading.enumerate():
        if thread.name == name:
            thread.join(5)


def test_leaked_threads_and_processes_fail_their_test_and_clean_ones_pass(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_leaky=TESTS, test_module_leak=MODULE_LEAK)
    try:
        result = pytester.runpytest("-p", "no:cacheprovider", "-o", "leak_grace=0.3", "-rA")
    finally:
        (pytester.path / LEAKY_GATE).touch()
        _join("leaky-thread")
        _join("declared-thread")
    outcomes = result.parseoutcomes()
    assert (outcomes["passed"], outcomes["errors"]) == (12, 5), result.stdout.str()
    result.stdout.fnmatch_lines_random(
        [
            "ERROR test_leaky.py::test_leaks_a_thread*",
            "ERROR test_leaky.py::test_leaks_a_child*",
            "ERROR test_leaky.py::test_leaks_a_grandchild_whose_parent_was_killed*",
            "ERROR test_leaky.py::test_leaks_what_the_session_of_its_fixture_holds*",
            "ERROR test_module_leak.py::test_two*",
            "*thread 'leaky-thread' (*._until_opened, daemon), started in the test body*",
            "*process * (a child of the test process, started in the test body), killed: sleep 30",
            "*process * (started during the test (its environment says so), parent *), killed:"
            " sleep 30",
            "*process * (in the group or session of a child the test started, parent *), killed:"
            " sleep 30",
            "*the module-scoped fixture 'forgotten_server' left running after its teardown:",
            "*process *, killed: sleep 30",
            "PASSED test_leaky.py::test_clean",
            "PASSED test_leaky.py::test_what_a_function_fixture_stops_is_no_leak",
            "PASSED test_leaky.py::test_a_module_fixture_is_not_blamed_on_its_first_test",
            "PASSED test_leaky.py::test_nor_on_the_next",
            "PASSED test_leaky.py::test_a_session_fixture_is_not_blamed_either",
            "PASSED test_leaky.py::test_a_declared_thread_may_outlive_the_test",
            "PASSED test_module_leak.py::test_one",
        ]
    )
    for name in ("child.pid", "grandchild.pid", "member.pid"):
        pid = int((pytester.path / name).read_text())
        end = time.monotonic() + 5
        while running(pid) and time.monotonic() < end:
            time.sleep(0.01)
        assert not running(pid), f"{name}: the guard left {pid} running"
