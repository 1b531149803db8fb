"""A stage taken over while its host still fills it (spoold.core.spool.stages).

Hosts sharing a spool recover the stages of a host found stale (``Stages.recover(hosts=...)``):
each stage is renamed to one of the recovering host's, then finished or undone. A host found
stale may only be slow (frozen, then thawed) and go on filling the stage it no longer has.
Each test here runs one host's work (``h1``) step by step, every call it makes into the file
system one step, and before one step (each in turn, on a spool of its own) lets another host
(``h2``) recover h1's stages; then h1 goes on. Whatever the step:

- incoming/ never holds anything but the submitter's file, under its name, with its bytes
  (never a placeholder made ahead, a copy not yet whole, a job file spoold made itself);
- the file ends in exactly one place (incoming/, pending/, rejected/ or scheduled/);
- h1, its stage gone, changes nothing in the spool outside its stage;
- once both hosts have recovered, tmp/ and ids/ hold nothing left of it.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from spoold.core.errors import DuplicateJob
from spoold.core.spool import Spool
from spoold.core.spool import fs as fs_module
from spoold.core.spool import stages as stages_module
from spoold.core.spool.jobs import JobDir
from spoold.core.spool.stages import StageLeft

JOB = b"job_id: a\nexecutor: local\nproduct: {commands: 'true'}\n"
SCHEDULE = b"job_id: s\nexecutor: local\nproduct: {commands: 'true'}\nschedule: {every: 60s}\n"
NEW_SCHEDULE = SCHEDULE.replace(b"'true'", b"'false'")
MAX_SIZE = 1 << 20
# The calls a step is made of: each may be where a host is frozen.
_STEPPED = ("open", "write", "rename", "replace", "unlink", "rmdir", "mkdir", "symlink", "link")


@dataclass
class _Steps:
    """Counts h1's steps; before step ``at``, h2 recovers h1's stages."""

    other: Spool
    at: int = 0
    count: int = 0
    active: bool = False
    inside: bool = False
    recovered: list[str] | None = None
    incoming_then: dict[str, bytes] = field(default_factory=dict)
    #: The spool outside h1's stages when h1 began, just before h2 recovered, just after.
    outside_start: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    outside_before: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    outside_then: dict[str, tuple[int, int, int]] | None = None

    def before_step(self) -> None:
        if not self.active or self.inside:
            return
        self.count += 1
        if self.count != self.at:
            return
        self.inside = True
        try:
            self.outside_before = _outside_stages(self.other)
            self.recovered = self.other.stages.recover(frozenset({"h1"}))
            self.incoming_then = _incoming(self.other)
            self.outside_then = _outside_stages(self.other)
        finally:
            self.inside = False


def _kept_out(slow: Spool, steps: _Steps, where: str) -> None:
    """h1, its stage gone from under it, changed nothing outside it since: it added or
    changed nothing, and removed only what it had made there itself before."""
    if steps.outside_then is None:
        return
    now, then = _outside_stages(slow), steps.outside_then
    assert {k: v for k, v in now.items() if then.get(k) != v} == {}, where
    made = steps.outside_before.keys() - steps.outside_start.keys()
    assert then.keys() - now.keys() <= made, where


def _incoming(spool: Spool) -> dict[str, bytes]:
    incoming = spool.dir("incoming")
    return {p.name: p.read_bytes() for p in incoming.iterdir()}


def _outside_stages(spool: Spool) -> dict[str, tuple[int, int, int]]:
    """Every entry of the spool but h1's stages and what they hold (and the submitters'
    files h1 moved aside, its own to remove): kind, size, inode."""
    found = {}
    for parent, dirs, files in os.walk(spool.root):
        rel = os.path.relpath(parent, spool.root)
        if rel.startswith(("tmp/in-h1@", "tmp/spoold-spares")):
            continue
        for name in dirs + files:
            path = os.path.join(parent, name)
            key = os.path.normpath(os.path.join(rel, name))
            if key.startswith(("tmp/in-h1@", "tmp/spent-", "tmp/.spoold-spares")):
                continue
            info = os.lstat(path)
            found[key] = (info.st_mode >> 12, info.st_size, info.st_ino)
    return found


@pytest.fixture
def stepping(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Spool], _Steps]]:
    """Wraps the file system calls h1 makes, so that its work can be cut before any of them;
    a write writes half of what it is given at most, so that a file is seen half written."""
    made: list[_Steps] = []

    def current() -> _Steps | None:
        return made[-1] if made else None

    def wrap(name: str) -> None:
        real = getattr(os, name)

        def stepped(*args: Any, **kwargs: Any) -> Any:
            steps = current()
            if steps is not None:
                steps.before_step()
                if name == "write" and steps.active and not steps.inside and len(args[1]) > 1:
                    args = (args[0], memoryview(args[1])[: len(args[1]) // 2])
            return real(*args, **kwargs)

        monkeypatch.setattr(os, name, stepped)

    for name in _STEPPED:
        wrap(name)
    real_renameat2 = fs_module._renameat2_errno

    def renameat2(source: Any, target: Any, flags: int) -> int | None:
        steps = current()
        if steps is not None:
            steps.before_step()
        return real_renameat2(source, target, flags)

    monkeypatch.setattr(fs_module, "_renameat2_errno", renameat2)

    def start(other: Spool) -> _Steps:
        made.append(_Steps(other))
        return made[-1]

    yield start


def _spools(root: Path) -> tuple[Spool, Spool]:
    slow = Spool(root, host="h1")
    slow.init()
    return slow, Spool(root, host="h2")


def _status(job_id: str, source: str) -> dict[str, Any]:
    return {"job_id": job_id, "state": "pending", "source": source}


def _intake(spool: Spool, name: str, *, schedule: bool = False) -> str:
    """h1's intake of incoming/<name>, as ``Intake`` does it: taken, written, placed; on a
    failure released back to incoming/; a taken id rejects it. How it ended."""
    stages = spool.stages
    try:
        taken = stages.take_incoming(name, now=0.0, max_size=MAX_SIZE)
    except StageLeft as left:
        stages.release(left.taken)
        return "failed"
    except OSError:  # nothing of it taken: it stays in incoming/
        return "failed"
    if taken is None:
        return "not taken"
    if taken.spent is not None:
        stages.remove_spent(taken.spent)
    job_id = "s" if schedule else "a"
    try:
        prepared = stages.prepare(taken, job_id, _status(job_id, name), "accepted\n",
                                  schedule=schedule)  # fmt: skip
        stages.settle([prepared])
        stages.place(prepared)
    except DuplicateJob:
        try:
            stages.reject(taken, {"file": name, "code": "duplicate"})
        except OSError:
            stages.release(taken)
            return "failed"
        return "rejected"
    except OSError:
        stages.release(taken)
        return "failed"
    return "placed"


def _run_at(
    root: Path,
    stepping: Callable[[Spool], _Steps],
    at: int,
    setup: Callable[[Spool], None],
    work: Callable[[Spool], str],
    *,
    swaps: bool = True,
) -> tuple[Spool, _Steps, str]:
    slow, other = _spools(root)
    slow.stages._swaps = swaps
    setup(slow)
    steps = stepping(other)
    steps.at = at
    steps.outside_start = _outside_stages(slow)
    steps.active = True
    try:
        outcome = work(slow)
    finally:
        steps.active = False
    return slow, steps, outcome


def _count_steps(
    root: Path,
    stepping: Callable[[Spool], _Steps],
    setup: Callable[[Spool], None],
    work: Callable[[Spool], str],
    *,
    swaps: bool = True,
) -> int:
    _, steps, outcome = _run_at(root, stepping, 0, setup, work, swaps=swaps)
    assert outcome in ("placed", "rejected"), outcome
    return steps.count


def _settled(slow: Spool, other: Spool) -> None:
    """Both hosts' recovery, as at their next start: nothing of the take may be left."""
    slow.stages.recover()
    other.stages.recover()
    assert not [n for n in os.listdir(slow.dir("tmp")) if n.startswith(("in-", "spent-"))]


def _check(
    slow: Spool, steps: _Steps, outcome: str, name: str, data: bytes, *, placed_as: str
) -> None:
    where = f"h2 recovered before h1's step {steps.at}: {steps.recovered}; h1: {outcome}"
    # What h2 gave back to incoming/ is the submitter's file, whole, under its name.
    assert set(steps.incoming_then) <= {name}, where
    assert all(found == data for found in steps.incoming_then.values()), where
    if outcome != "placed":
        _kept_out(slow, steps, where)
    other = Spool(slow.root, host="h2")
    _settled(slow, other)
    incoming = _incoming(slow)
    pending = os.listdir(slow.dir("pending"))
    rejected = os.listdir(slow.dir("rejected"))
    ids = os.listdir(slow.dir("ids"))
    if outcome == "placed":
        assert incoming == {} and rejected == [], where
        assert (slow.dir(placed_as) / "a" / "job.yaml").read_bytes() == data, where
    elif outcome == "rejected":
        assert incoming == {} and pending == [] and rejected == [name], where
    else:
        assert incoming == {name: data}, where
        assert pending == [] and rejected == [], where
    if placed_as == "pending":
        assert ids == (["a"] if outcome == "placed" else []), where


def _drop(name: str, data: bytes) -> Callable[[Spool], None]:
    def setup(spool: Spool) -> None:
        (spool.dir("incoming") / name).write_bytes(data)

    return setup


def _ready(setup: Callable[[Spool], None]) -> Callable[[Spool], None]:
    def ready(spool: Spool) -> None:
        setup(spool)
        assert spool.stages.make_ready(1, enough=lambda: False) == 1

    return ready


@pytest.mark.parametrize("ready", [True, False], ids=["ready-stage", "new-stage"])
@pytest.mark.parametrize("swaps", [True, False], ids=["exchange", "no-exchange"])
def test_a_file_being_taken_is_given_back_whole_whenever_its_stage_is_taken_over(
    tmp_path: Path, stepping: Callable[[Spool], _Steps], ready: bool, swaps: bool
) -> None:
    setup = _drop("a.yaml", JOB)
    if ready:
        setup = _ready(setup)

    def work(spool: Spool) -> str:
        return _intake(spool, "a.yaml")

    total = _count_steps(tmp_path / "count", stepping, setup, work, swaps=swaps)
    for at in range(1, total + 2):
        slow, steps, outcome = _run_at(tmp_path / str(at), stepping, at, setup, work, swaps=swaps)
        _check(slow, steps, outcome, "a.yaml", JOB, placed_as="pending")


@pytest.mark.parametrize("ready", [True, False], ids=["ready-stage", "new-stage"])
def test_a_duplicate_being_unstaged_is_given_back_under_its_own_name(
    tmp_path: Path, stepping: Callable[[Spool], _Steps], ready: bool
) -> None:
    """A taken id: the job's directory written in the stage is undone (``_unstage``) and the
    file rejected; taken over meanwhile, the file goes back under its name, never as job.yaml."""

    def setup(spool: Spool) -> None:
        (spool.dir("pending") / "a").mkdir()
        (spool.dir("pending") / "a" / "job.yaml").write_bytes(JOB)
        os.symlink("old", spool.dir("ids") / "a")
        _drop("a.yaml", JOB)(spool)
        if ready:
            spool.stages.make_ready(1, enough=lambda: False)

    def work(spool: Spool) -> str:
        return _intake(spool, "a.yaml")

    total = _count_steps(tmp_path / "count", stepping, setup, work)
    for at in range(1, total + 2):
        slow, steps, outcome = _run_at(tmp_path / str(at), stepping, at, setup, work)
        where = f"h2 recovered before h1's step {at}: {steps.recovered}; h1: {outcome}"
        assert set(steps.incoming_then) <= {"a.yaml"}, where
        assert all(found == JOB for found in steps.incoming_then.values()), where
        _settled(slow, Spool(slow.root, host="h2"))
        incoming, rejected = _incoming(slow), os.listdir(slow.dir("rejected"))
        assert (incoming, rejected) in (({"a.yaml": JOB}, []), ({}, ["a.yaml"])), where


def _schedule(spool: Spool, data: bytes = SCHEDULE) -> JobDir:
    """scheduled/s, placed as intake places a schedule."""
    (spool.dir("incoming") / "s.yaml").write_bytes(data)
    taken = spool.stages.take_incoming("s.yaml", now=0.0, max_size=MAX_SIZE)
    assert taken is not None
    status = {**_status("s", "s.yaml"), "sha256": hashlib.sha256(data).hexdigest()}
    return spool.stages.accept(taken, "s", status, "registered\n", schedule=True)


def test_a_firing_being_made_is_never_given_to_incoming(
    tmp_path: Path, stepping: Callable[[Spool], _Steps]
) -> None:
    """A schedule's run is spoold's own job file, no submitter's: a stage holding one, taken
    over, is dropped (the firing, not recorded, is made again), never put into incoming/
    (seen: an empty job.yaml there, rejected as a file nobody submitted)."""

    def setup(spool: Spool) -> None:
        _schedule(spool)

    def work(spool: Spool) -> str:
        schedule = JobDir("s", "scheduled", str(spool.dir("scheduled") / "s"))
        status = {
            **_status("s@20261207T025900Z", "scheduled/s"),
            "sha256": hashlib.sha256(SCHEDULE).hexdigest(),
        }
        try:
            spool.stages.create_run(schedule, "s@20261207T025900Z", status, "fired\n")
        except OSError:
            return "failed"
        return "placed"

    total = _count_steps(tmp_path / "count", stepping, setup, work)
    for at in range(1, total + 2):
        slow, steps, outcome = _run_at(tmp_path / str(at), stepping, at, setup, work)
        where = f"h2 recovered before h1's step {at}: {steps.recovered}; h1: {outcome}"
        assert steps.incoming_then == {}, where
        if outcome != "placed":
            _kept_out(slow, steps, where)
        _settled(slow, Spool(slow.root, host="h2"))
        assert _incoming(slow) == {} and os.listdir(slow.dir("rejected")) == [], where
        runs = os.listdir(slow.dir("pending"))
        assert runs == (["s@20261207T025900Z"] if outcome == "placed" else []), where
        assert sorted(os.listdir(slow.dir("ids"))) == (
            ["s", "s@20261207T025900Z"] if runs else ["s"]
        ), where


def test_a_file_run_by_spoold_exec_is_never_given_to_incoming(
    tmp_path: Path, stepping: Callable[[Spool], _Steps]
) -> None:
    """``spoold exec`` copies a file from outside the spool into a stage: taken over (or left
    by a crash), that copy, whole or not, is no file anybody put into incoming/."""
    outside = tmp_path / "mine.yaml"
    outside.write_bytes(JOB)

    def work(spool: Spool) -> str:
        try:
            taken = spool.stages.stage_file(outside, max_size=MAX_SIZE)
            spool.stages.accept(taken, "a", _status("a", "mine.yaml"), "accepted\n")
        except OSError:
            return "failed"
        return "placed"

    total = _count_steps(tmp_path / "count", stepping, lambda spool: None, work)
    for at in range(1, total + 2):
        slow, steps, outcome = _run_at(tmp_path / str(at), stepping, at, lambda s: None, work)
        where = f"h2 recovered before h1's step {at}: {steps.recovered}; h1: {outcome}"
        assert steps.incoming_then == {}, where
        _settled(slow, Spool(slow.root, host="h2"))
        assert _incoming(slow) == {} and os.listdir(slow.dir("rejected")) == [], where
        assert outside.read_bytes() == JOB


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "no-exchange"])
def test_a_schedule_being_replaced_is_never_lost_when_its_stage_is_taken_over(
    tmp_path: Path,
    stepping: Callable[[Spool], _Steps],
    monkeypatch: pytest.MonkeyPatch,
    exchange: bool,
) -> None:
    """A new definition of a schedule replaces the old in one exchange, or where there is
    none (sshfs) in two renames. Its stage taken over, h1 must not move the definition in
    place out of scheduled/ (into tmp/, where the next recovery deletes it)."""
    if not exchange:

        def no_exchange(source: Any, target: Any) -> None:
            raise OSError(errno.EINVAL, "no exchange here", str(source))

        monkeypatch.setattr(stages_module, "rename_exchange", no_exchange)

    def setup(spool: Spool) -> None:
        _schedule(spool)
        (spool.dir("incoming") / "s.yaml").write_bytes(NEW_SCHEDULE)

    def work(spool: Spool) -> str:
        return _intake(spool, "s.yaml", schedule=True)

    total = _count_steps(tmp_path / "count", stepping, setup, work)
    for at in range(1, total + 2):
        slow, steps, outcome = _run_at(tmp_path / str(at), stepping, at, setup, work)
        where = f"h2 recovered before h1's step {at}: {steps.recovered}; h1: {outcome}"
        assert set(steps.incoming_then) <= {"s.yaml"}, where
        assert all(found == NEW_SCHEDULE for found in steps.incoming_then.values()), where
        if outcome != "placed":
            _kept_out(slow, steps, where)
        _settled(slow, Spool(slow.root, host="h2"))
        definition = (slow.dir("scheduled") / "s" / "job.yaml").read_bytes()
        if outcome == "placed":
            assert definition == NEW_SCHEDULE and _incoming(slow) == {}, where
        else:
            assert definition == SCHEDULE, where
            assert _incoming(slow) == {"s.yaml": NEW_SCHEDULE}, where
        assert os.listdir(slow.dir("ids")) == ["s"], where
