"""A docker job outlives its daemon: left running on ``detach``, resumed by the next daemon
(``resume``), against a real Docker engine (tests/dockerd.py starts one).

Each "daemon" here is a run of the executor with a JobLog of its own on the job's log file, as
a restarted daemon has. The container waits for files the test creates in it (``/tmp/go1``,
``/tmp/go2``), so that what it prints falls before or after a restart by design, not by timing.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from spoold.executors.base import ExecResult, RunContext
from spoold.executors.docker import (
    LABEL_JOB,
    LABEL_MANAGED,
    LABEL_SPOOL,
    LABEL_UNIT,
    DockerExecutor,
    LoggedOutput,
)

from spoold.core.clock import Clock, SystemClock, parse_rfc3339
from spoold.core.job import ArtifactSpec
from spoold.core.joblog import JobLog
from tests.dockerd import EngineLink
from tests.harness import wait_for

_BOUND = 60.0  # seconds: a ceiling for a wait, not a measurement

#: Lines longer than the engine's 16 KiB entries of its log.
_LONG = ("a" * 20000, "x" * 40000)
#: Prints a line on each stream, a long line, half a line, and the rest of it only after
#: /tmp/go1; exits 3 after /tmp/go2, with an artifact.
_GATED = [
    "echo one; echo err-one >&2; head -c 20000 /dev/zero | tr '\\0' a; echo; printf half",
    "until [ -e /tmp/go1 ]; do sleep 0.05; done",
    "echo '-line'; head -c 40000 /dev/zero | tr '\\0' x; echo; echo away; echo err-away >&2",
    "until [ -e /tmp/go2 ]; do sleep 0.05; done",
    "echo after; mkdir -p out; echo art > out/a.txt; exit 3",
]


class _Later:
    """The real clock, two hours on: a container started two hours ago by its time."""

    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(hours=2)

    def monotonic(self) -> float:
        return time.monotonic()


class _Shifted:
    """The real clock, ``shift`` seconds on by its monotonic time (for a timeout to fall)."""

    shift = 0.0

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic() + self.shift


class _Job:
    """A job in running/ of a spool, and the runs of its docker executor by one daemon or
    the next."""

    def __init__(self, root: Path, image: str, product: dict[str, Any]) -> None:
        self.job_id = f"t-{uuid.uuid4().hex[:10]}"
        self.spool = root / "spool"
        self.dir = self.spool / "running" / self.job_id
        self.dir.mkdir(parents=True)
        self.workdir = root / "work"
        self.workdir.mkdir()
        self.product = {"image": image, **product}
        self.logs: list[JobLog] = []

    def context(self, *, section: str | None = None, **overrides: Any) -> RunContext:
        """The context a daemon gives the unit: a JobLog of its own on the job's log."""
        log = JobLog(open(self.dir / "log", "ab", buffering=0), SystemClock())
        self.logs.append(log)
        fields: dict[str, Any] = {
            "job_id": self.job_id, "executor": "docker", "type": None, "product": self.product,
            "workdir": self.workdir, "env": {}, "job_env": {"SPOOLD_JOB_DIR": str(self.dir)},
            "log": log if section is None else log.section(section), "clock": SystemClock(),
            "timeout": None, "kill_grace": 1.0, "cancel": threading.Event(),
            "read_log": lambda: (self.dir / "log").open("rb"),
        }  # fmt: skip
        fields.update(overrides)
        return RunContext(**fields)

    def labels(self) -> dict[str, str]:
        """What the executor labels unit 1's container with (for one made by hand)."""
        return {LABEL_MANAGED: "1", LABEL_JOB: self.job_id, LABEL_UNIT: "1",
                LABEL_SPOOL: str(self.spool)}  # fmt: skip

    def start(self, ctx: RunContext) -> _Running:
        return _Running(ctx)

    def lines(self) -> list[str]:
        """The log's lines without their stamps: ``INFO text``."""
        text = (self.dir / "log").read_text()
        return [line.split(" ", 1)[1] for line in text.splitlines()]

    def text(self) -> str:
        return "\n".join(self.lines())

    def close(self) -> None:
        for log in self.logs:
            log.close()


class _Running:
    """A run of the executor in a thread of its own."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.result: ExecResult | None = None
        self._thread = threading.Thread(target=self._run, name="test-docker-run")
        self._thread.start()

    def _run(self) -> None:
        self.result = DockerExecutor().run(self.ctx)

    def wait(self, bound: float = _BOUND) -> ExecResult:
        self._thread.join(bound)
        if self._thread.is_alive():
            self.ctx.cancel.set()  # so that the thread ends before the leak guard looks
            self._thread.join(_BOUND)
            raise AssertionError(f"the executor did not return within {bound}s")
        assert self.result is not None
        return self.result


@pytest.fixture
def make_job(tmp_path: Path, dockerd: str, client: Any) -> Iterator[Any]:
    """Jobs for one test; their logs closed and their containers removed at its end."""
    made: list[_Job] = []

    def make(product: dict[str, Any]) -> _Job:
        made.append(_Job(tmp_path / str(len(made)), dockerd, product))
        return made[-1]

    yield make
    for job in made:
        job.close()
        for container in _containers(client, job.job_id):
            with contextlib.suppress(Exception):
                container.remove(force=True)


def _containers(client: Any, job_id: str) -> list[Any]:
    return list(client.containers.list(all=True, filters={"label": f"{LABEL_JOB}={job_id}"}))


def _the_container(client: Any, job: _Job) -> Any:
    (container,) = _containers(client, job.job_id)
    return container


def _open_gate(container: Any, name: str) -> None:
    done = container.exec_run(["touch", f"/tmp/{name}"])
    assert done.exit_code == 0, done.output


def _printed(container: Any, text: bytes) -> bool:
    return text in container.logs()


def _detach_once(job: _Job, ctx: RunContext, line: str) -> ExecResult:
    """Run until the log shows ``line``, then stop watching as a stopping daemon would."""
    running = job.start(ctx)
    wait_for(lambda: line in job.lines(), bound=_BOUND, what=f"{line!r} in the log")
    ctx.detach.set()
    return running.wait()


def test_detach_leaves_the_container_running_and_resume_re_attaches_to_it(
    make_job: Any, client: Any
) -> None:
    job = make_job({"script": _GATED})
    first = job.context(section="build", unit_key="1.build.1")
    result = _detach_once(job, first, "INFO [build] one")
    assert (result.exit_code, result.detached, result.error) == (None, True, None)
    container = _the_container(client, job)
    container.reload()
    assert container.status == "running"
    assert container.labels[LABEL_UNIT] == "1.build.1"
    assert any("left running for the next daemon" in line for line in job.lines())
    # The next daemon's recovery leaves alone the container of a job still in running/.
    DockerExecutor.recover(job.spool, {job.job_id}, logging.getLogger("test"))
    assert _containers(client, job.job_id) == [container]

    _open_gate(container, "go1")  # printed while no daemon watches
    wait_for(lambda: _printed(container, b"away\n"), bound=_BOUND, what="the line printed away")
    second = job.context(section="build", unit_key="1.build.1", resume=True)
    result = _detach_once(job, second, "INFO [build] away")  # and left again
    assert result.detached, result
    assert any("re-attached to container" in line for line in job.lines())

    _open_gate(container, "go2")
    artifacts = (ArtifactSpec("out/a.txt"),)
    third = job.context(section="build", unit_key="1.build.1", resume=True, artifacts=artifacts)
    result = job.start(third).wait()
    assert (result.exit_code, result.error) == (3, "exit code 3"), job.text()
    lines = job.lines()
    for line in ("INFO [build] one", "ERROR [build] err-one", "INFO [build] half-line",
                 "INFO [build] away", "ERROR [build] err-away", "INFO [build] after",
                 *(f"INFO [build] {long}" for long in _LONG)):  # fmt: skip
        assert lines.count(line) == 1, (line[:40], job.text())
    assert "INFO [build] half" not in lines  # the half line was left to be copied whole
    assert (job.workdir / "out" / "a.txt").read_text() == "art\n"
    assert _containers(client, job.job_id) == []


@pytest.mark.parametrize("tty", [False, True])
def test_resume_of_a_container_that_ended_while_no_daemon_watched(
    make_job: Any, client: Any, tty: bool
) -> None:
    job = make_job({"script": _GATED, "tty": tty})
    assert _detach_once(job, job.context(), "INFO one").detached
    container = _the_container(client, job)
    _open_gate(container, "go1")
    _open_gate(container, "go2")

    def ended() -> bool:
        container.reload()
        return bool(container.status == "exited")

    wait_for(ended, bound=_BOUND, what="the container's end")
    result = job.start(job.context(resume=True, artifacts=(ArtifactSpec("out/a.txt"),))).wait()
    assert (result.exit_code, result.detached) == (3, False), job.text()
    # Its end is the engine's (the adopter's own time made a job that ended while spoold was
    # down end when it was adopted, its wall time the downtime's too).
    finished = parse_rfc3339(container.attrs["State"]["FinishedAt"])
    assert result.ended_at is not None and abs((result.ended_at - finished).total_seconds()) < 1
    lines = job.lines()
    assert any("ended while no daemon watched" in line for line in lines)
    err = "INFO" if tty else "ERROR"  # a tty has one stream
    # A tty's log is not framed: a long line copied from it keeps the stamps of its parts.
    longs = () if tty else tuple(f"INFO {long}" for long in _LONG)
    for line in ("INFO one", f"{err} err-one", "INFO half-line", "INFO away", "INFO after", *longs):
        assert lines.count(line) == 1, (line[:40], job.text())
    assert (job.workdir / "out" / "a.txt").read_text() == "art\n"
    assert _containers(client, job.job_id) == []


def test_resume_with_nothing_started_starts_it(make_job: Any, client: Any) -> None:
    job = make_job({"script": "echo fresh"})
    result = job.start(job.context(resume=True, unit_key="2")).wait()
    assert result.succeeded, job.text()
    assert any("no container of unit 2 to re-attach to" in line for line in job.lines())
    assert job.lines().count("INFO fresh") == 1
    assert _containers(client, job.job_id) == []


def test_a_container_created_but_never_started_is_replaced(make_job: Any, client: Any) -> None:
    job = make_job({"script": "echo fresh"})
    client.containers.create(job.product["image"], ["echo", "stale"], labels=job.labels())
    result = job.start(job.context(resume=True)).wait()
    assert result.succeeded, job.text()
    assert any("no container of unit 1 to re-attach to" in line for line in job.lines())
    assert job.lines().count("INFO fresh") == 1 and "stale" not in job.text()
    assert _containers(client, job.job_id) == []


def test_a_resumed_container_has_what_is_left_of_its_timeout(make_job: Any, client: Any) -> None:
    job = make_job({"script": "echo up; sleep 300"})
    assert _detach_once(job, job.context(timeout=3600.0), "INFO up").detached
    # Two hours after its start by the daemon's clock: an hour past its timeout. A fresh
    # timeout would wait an hour more; the bound of wait() fails the test long before.
    later: Clock = _Later()
    result = job.start(job.context(resume=True, timeout=3600.0, clock=later)).wait()
    assert result.timed_out and result.error == "timed out after 1h", job.text()
    assert _containers(client, job.job_id) == []


def test_a_resumed_container_can_be_cancelled(make_job: Any, client: Any) -> None:
    job = make_job({"script": "echo up; sleep 300"})
    assert _detach_once(job, job.context(), "INFO up").detached
    ctx = job.context(resume=True)
    running = job.start(ctx)
    wait_for(lambda: "re-attached to container" in job.text(), bound=_BOUND, what="re-attach")
    ctx.cancel.set()
    result = running.wait()
    assert result.cancelled and result.error == "cancelled"
    assert job.lines().count("INFO up") == 1
    assert _containers(client, job.job_id) == []


def test_a_unit_asked_to_detach_before_it_began_starts_nothing(make_job: Any, client: Any) -> None:
    job = make_job({"script": "echo never"})
    ctx = job.context()
    ctx.detach.set()
    assert job.start(ctx).wait().detached
    assert _containers(client, job.job_id) == []


@pytest.mark.parametrize(
    ("driver", "said", "early"),
    [
        ("json-file", "its output since its start follows from the engine's log; lines", 1),
        ("none", "the engine cannot give back its output", 0),
    ],
)
def test_resume_says_what_it_could_not_copy(
    make_job: Any, client: Any, driver: str, said: str, early: int
) -> None:
    """A container whose start the job's log does not show (a log lost, or one started by
    hand), and one whose log driver keeps nothing to read back."""
    docker = importlib.import_module("docker")
    job = make_job({"script": "unused"})
    script = "echo early; touch /tmp/early; until [ -e /tmp/go1 ]; do sleep 0.05; done; echo late"
    container = client.containers.run(
        job.product["image"], ["/bin/sh", "-c", script], labels=job.labels(), init=True,
        detach=True,
        log_config=docker.types.LogConfig(type=driver),
    )  # fmt: skip

    def printed() -> bool:  # the engine's log cannot say so when its driver is none
        return bool(container.exec_run(["test", "-e", "/tmp/early"]).exit_code == 0)

    wait_for(printed, bound=_BOUND, what="the first line printed")  # before the resume
    running = job.start(job.context(resume=True))
    wait_for(lambda: said in job.text(), bound=_BOUND, what="what the resume could do")
    _open_gate(container, "go1")
    result = running.wait()
    assert result.succeeded, job.text()
    assert (job.lines().count("INFO early"), job.lines().count("INFO late")) == (early, 1)
    assert _containers(client, job.job_id) == []


def test_a_line_logged_just_before_the_engine_stamped_it_is_held() -> None:
    # The engine stamps a line when its log driver reads it, which can be after spoold got it
    # through the attached stream: seen as a repeated line on resume, under load.
    logged = LoggedOutput([("2026-12-03T10:00:00.000100Z", "INFO", "up")])
    assert logged.lines[False].holds("2026-12-03T10:00:00.000900Z", "up")
    older = LoggedOutput([("2026-12-03T10:00:00.000000Z", "INFO", "up")])
    assert not older.lines[False].holds("2026-12-03T10:00:05.000000Z", "up")


def _gated_whole(job: _Job, result: ExecResult) -> list[str]:
    """The log's lines of a ``_GATED`` job that ran to its end, having checked that each line
    it printed is there once."""
    assert (result.exit_code, result.error) == (3, "exit code 3"), job.text()
    lines = job.lines()
    for line in ("INFO one", "ERROR err-one", "INFO half-line", "INFO away", "ERROR err-away",
                 "INFO after", *(f"INFO {long}" for long in _LONG)):  # fmt: skip
        assert lines.count(line) == 1, (line[:40], job.text())
    return lines


def test_output_the_engine_stopped_streaming_is_followed_again(
    make_job: Any, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attached stream ends while the container runs on (a dockerd restarted with
    ``live-restore``, a proxy in front of a remote engine timing out): what the container
    printed after that was lost, and the job's log stayed silent to its end. It follows
    again from the engine's log, each line once, half a line included."""
    docker = importlib.import_module("docker")
    attached: list[Any] = []
    attach = docker.APIClient.attach

    def recorded(api: Any, *args: Any, **kwargs: Any) -> Any:
        attached.append(attach(api, *args, **kwargs))
        return attached[-1]

    monkeypatch.setattr(docker.APIClient, "attach", recorded)
    job = make_job({"script": _GATED})
    running = job.start(job.context())
    wait_for(lambda: "INFO one" in job.lines(), bound=_BOUND, what="'one' in the log")
    container = _the_container(client, job)
    attached[0].close()  # as the engine's end of the connection going
    _open_gate(container, "go1")
    wait_for(lambda: _printed(container, b"away\n"), bound=_BOUND, what="the line printed away")
    _open_gate(container, "go2")
    result = running.wait()
    lines = _gated_whole(job, result)
    assert any("stopped streaming" in line for line in lines), job.text()


def _cut_after_one(client: Any, job: _Job, link: EngineLink) -> Any:
    """Once a ``_GATED`` job printed its first line, cut the way to the engine, and wait for
    the job to say so; its container."""
    wait_for(lambda: "INFO one" in job.lines(), bound=_BOUND, what="'one' in the log")
    container = _the_container(client, job)
    link.cut()
    wait_for(lambda: any("cannot be reached" in line for line in job.lines()),
             bound=_BOUND, what="the engine missed")  # fmt: skip
    return container


def test_a_job_rides_out_an_engine_it_cannot_reach_while_its_container_runs_on(
    make_job: Any, client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine could not be reached for a while (a dockerd restarted with
    ``live-restore``, the job's container running on): the job failed at once with the
    connection's error, and its container was left running, no daemon watching it. It waits
    for the engine now, and follows the container to its end, its output whole."""
    link = EngineLink(tmp_path / "engine.sock")
    try:
        monkeypatch.setenv("DOCKER_HOST", f"unix://{link.path}")
        job = make_job({"script": _GATED})
        running = job.start(job.context())
        container = _cut_after_one(client, job, link)
        _open_gate(container, "go1")  # printed while the engine cannot be reached
        wait_for(lambda: _printed(container, b"away\n"), bound=_BOUND, what="the line printed away")
        link.mend()
        _open_gate(container, "go2")
        result = running.wait()
    finally:
        link.close()
    lines = _gated_whole(job, result)
    assert any("answers again" in line for line in lines), job.text()
    assert _containers(client, job.job_id) == []


def _counted_reloads(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The times of every ``Container.reload`` from now on (the executor's look at the engine)."""
    models = importlib.import_module("docker.models.containers")
    reload, times = models.Container.reload, []

    def counted(container: Any) -> None:
        times.append(time.monotonic())
        reload(container)

    monkeypatch.setattr(models.Container, "reload", counted)
    return times


@pytest.mark.parametrize("end", ["cancel", "timeout"])
def test_a_cancel_or_timeout_while_the_engine_is_away_stops_the_container_once_it_answers(
    end: str, make_job: Any, client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel while the engine could not be reached spun: the wait went round without a
    pause, asking the engine, until it answered; and then stopped the container without the
    output it had printed meanwhile. Now it waits as before, says the stop waits for the
    engine, and stops the container once it answers, its output whole."""
    link = EngineLink(tmp_path / "engine.sock")
    clock = _Shifted()
    running = None
    try:
        monkeypatch.setenv("DOCKER_HOST", f"unix://{link.path}")
        job = make_job({"script": _GATED})
        ctx = job.context(timeout=600.0, clock=clock)
        running = job.start(ctx)
        container = _cut_after_one(client, job, link)
        _open_gate(container, "go1")  # printed while the engine cannot be reached
        wait_for(lambda: _printed(container, b"away\n"), bound=_BOUND, what="the line printed away")
        reloads = _counted_reloads(monkeypatch)
        if end == "cancel":
            ctx.cancel.set()
        else:
            clock.shift = 601.0  # its timeout falls while the engine is away
        said = f"{'cancel' if end == 'cancel' else 'timeout of 10m'}: stopping the container waits"
        wait_for(lambda: any(said in line for line in job.lines()), bound=_BOUND,
                 what="the stop said to wait for the engine")  # fmt: skip
        first = len(reloads)
        time.sleep(1.0)  # a spin asks thousands of times in a second; a wait twice or so
        assert len(reloads) - first <= 5, f"{len(reloads) - first} looks in a second"
        assert running.result is None, "it did not give up on a container still running"
        link.mend()
        result = running.wait()
    finally:
        if running is not None and running.result is None:
            running.ctx.detach.set()  # a failed test's run ends too (the engine stays away)
        link.close()
    assert (result.cancelled, result.timed_out) == (end == "cancel", end == "timeout"), result
    lines = job.lines()
    assert any("answers again" in line for line in lines), job.text()
    for line in ("INFO one", "INFO away", "ERROR err-away"):  # what it printed meanwhile too
        assert lines.count(line) == 1, (line, job.text())
    assert "INFO after" not in lines, job.text()  # stopped before its second gate
    assert _containers(client, job.job_id) == []


def test_a_daemon_stopping_while_the_engine_is_away_leaves_the_container_to_the_next(
    make_job: Any, client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon stopping while the engine could not be reached waited for the engine (its
    detach went unheard until then); the container runs on, and the next daemon takes it up
    as it takes up any other, its output whole."""
    job = make_job({"script": _GATED})
    ctx = job.context()
    link = EngineLink(tmp_path / "engine.sock")
    try:
        monkeypatch.setenv("DOCKER_HOST", f"unix://{link.path}")
        running = job.start(ctx)
        container = _cut_after_one(client, job, link)
        ctx.detach.set()
        assert running.wait(bound=20.0).detached, job.text()
        _open_gate(container, "go1")  # printed while no daemon watches
        link.mend()
        next_daemon = job.start(job.context(resume=True))
        wait_for(lambda: "INFO away" in job.lines(), bound=_BOUND, what="'away' in the log")
        _open_gate(container, "go2")
        result = next_daemon.wait()
    finally:
        ctx.detach.set()
        link.close()
    _gated_whole(job, result)
    assert _containers(client, job.job_id) == []
