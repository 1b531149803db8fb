"""Intake's edges that the other tests left open (a mutation audit): the size limit to the
byte, a file that changes while it is taken (grows, turns into a symlink, is replaced by one
still being written), a job file naming a schedule's id, the retry backoff, a rejection cut
short by a crash, what Linux's exec limits count, and whose a file given back to incoming/ is.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pwd
import stat
from pathlib import Path
from typing import Any

import pytest

from spoold.core.policy import Policy
from spoold.core.spool import Spool
from spoold.core.spool import fs as fs_module
from spoold.core.spool import stages as stages_module
from spoold.intake.admission import Admission, Refused
from spoold.intake.exec_limits import MAX_ARG_STRLEN, MAX_VARIABLES_BYTES
from spoold.intake.incoming import Accepted, Intake, Rejected
from spoold.intake.validation import JobValidator, job_validator
from spoold.run.registry import ExecutorRegistry
from tests.fakes import FakeClock
from tests.harness import intake_for, needs_root

LOG = logging.getLogger("spoold.test")
JOB = "job_id: {id}\nexecutor: local\nproduct: {{commands: 'true'}}\n"
LIMIT = 300  # bytes: limits.max_file_size of the intakes here


@pytest.fixture(scope="module")
def validator() -> JobValidator:
    return job_validator(ExecutorRegistry.from_entry_points())


def _intake(
    tmp_path: Path, validator: JobValidator, *, max_file_size: int = LIMIT, **kwargs: Any
) -> tuple[Spool, Intake, FakeClock]:
    spool = Spool(tmp_path / "spool")
    spool.init()
    clock = FakeClock()
    intake = Intake(spool, validator, clock, max_file_size=max_file_size, settle_time=0.0,
                    on_accepted=lambda job, document: None, logger=LOG, **kwargs)  # fmt: skip
    return spool, intake, clock


def _sized(job_id: str, size: int) -> bytes:
    """A valid job file of exactly ``size`` bytes (padded with a comment line)."""
    text = JOB.format(id=job_id).encode()
    padding = size - len(text) - 2
    assert padding >= 0
    return text + b"#" + b"x" * padding + b"\n"


def _nothing_else(spool: Spool) -> None:
    assert os.listdir(spool.dir("pending")) == []
    assert [p for p in os.listdir(spool.dir("tmp")) if p.startswith("in-")] == []


# -- the size limit ------------------------------------------------------------------------------


def test_a_file_of_exactly_max_file_size_is_taken_and_a_byte_more_is_too_large(
    tmp_path: Path, validator: JobValidator
) -> None:
    """``limits.max_file_size`` is the largest file taken: "over the limit" starts one byte
    past it, in intake's read of the file and in its judgement alike."""
    spool, intake, _ = _intake(tmp_path, validator)
    (spool.dir("incoming") / "fits.yaml").write_bytes(_sized("fits", LIMIT))
    fits = intake.offer("fits.yaml", complete=True)
    assert isinstance(fits, Accepted), fits
    assert (fits.job.path / "job.yaml").read_bytes() == _sized("fits", LIMIT)
    (spool.dir("incoming") / "over.yaml").write_bytes(_sized("over", LIMIT + 1))
    over = intake.offer("over.yaml", complete=True)
    assert isinstance(over, Rejected), over
    assert over.reason["code"] == "too_large"
    assert (
        f"the file is {LIMIT + 1} bytes, over the limit of {LIMIT} bytes" in over.reason["reason"]
    )
    assert spool.jobs.find("over") is None


def test_a_file_that_grows_past_the_limit_while_it_is_read_is_too_large_not_cut(
    tmp_path: Path, validator: JobValidator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer spoold cannot see (another host's, on a shared mount) appends while the file
    is read from its stage: it was within the limit when looked at, and is past it when read.
    What is read must not be cut at the limit (the first LIMIT bytes here are a valid job,
    which is not what the submitter wrote): the file is refused as too large."""
    spool, intake, _ = _intake(tmp_path, validator)
    (spool.dir("incoming") / "g.yaml").write_bytes(_sized("grown", LIMIT - 10))
    read_limited = fs_module.read_limited

    def appended_first(fd: int, limit: int) -> bytes:
        with open(f"/proc/self/fd/{fd}", "ab") as writer:  # the unseen writer goes on
            writer.write(b"#" * 100 + b"\nbogus_field: 1\n")
        return read_limited(fd, limit)

    monkeypatch.setattr("spoold.core.spool.stages.read_limited", appended_first)
    outcome = intake.offer("g.yaml", complete=True)
    assert isinstance(outcome, Rejected), outcome
    assert outcome.reason["code"] == "too_large"
    assert spool.jobs.find("grown") is None
    _nothing_else(spool)


# -- a file swapped while it is taken -----------------------------------------------------------


def test_a_symlink_renamed_over_the_file_being_taken_is_rejected_not_followed(
    tmp_path: Path, validator: JobValidator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between intake's look at incoming/x.yaml (a regular file) and its rename into the
    stage, a submitter renames a symlink over the name: what reaches the stage is the link,
    and the file it points at (another's job file, a secret) must never be read as the job."""
    spool, intake, _ = _intake(tmp_path, validator)
    incoming = spool.dir("incoming")
    (incoming / "x.yaml").write_text(JOB.format(id="mine"))
    elsewhere = tmp_path / "not-theirs.yaml"
    elsewhere.write_text(JOB.format(id="theirs"))
    swapped: list[bool] = []

    def swap_then_answer(fd: int) -> bool:
        if not swapped:
            os.symlink(elsewhere, spool.dir("tmp") / ".link")
            os.rename(spool.dir("tmp") / ".link", incoming / "x.yaml")
            swapped.append(True)
        return False

    monkeypatch.setattr(stages_module, "_has_local_writer", swap_then_answer)
    outcome = intake.offer("x.yaml", complete=True)
    assert isinstance(outcome, Rejected), outcome
    assert outcome.reason["code"] == "not_a_file"
    assert "symbolic link" in outcome.reason["reason"]
    assert (outcome.path / "x.yaml").is_symlink(), "rejected/ keeps the link, not its target"
    assert spool.jobs.find("theirs") is None and spool.jobs.find("mine") is None
    _nothing_else(spool)


def test_a_file_still_being_written_renamed_over_the_one_being_taken_waits_until_closed(
    tmp_path: Path, validator: JobValidator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file renamed over the name between intake's look and its rename is still open for
    writing (half of it written, and that half a valid job): it goes back to incoming/ under
    its name, and is taken whole once its writer closes it."""
    spool, intake, clock = _intake(tmp_path, validator, max_file_size=1 << 20)
    incoming = spool.dir("incoming")
    (incoming / "x.yaml").write_text(JOB.format(id="first"))
    first_half = JOB.format(id="second").encode()
    rest = b"variables: {WHOLE: 'yes'}\n"
    writers: list[int] = []
    has_local_writer = stages_module._has_local_writer

    def swap_then_answer(fd: int) -> bool | None:
        if not writers:
            temp = spool.dir("tmp") / ".upload"
            writer = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            writers.append(writer)
            os.write(writer, first_half)
            os.rename(temp, incoming / "x.yaml")
        return has_local_writer(fd)

    monkeypatch.setattr(stages_module, "_has_local_writer", swap_then_answer)
    try:
        assert intake.offer("x.yaml", complete=True) is None, "not complete: not taken"
        assert (incoming / "x.yaml").stat().st_ino == os.fstat(writers[0]).st_ino
        assert spool.jobs.find("second") is None and os.listdir(spool.dir("rejected")) == []
        _nothing_else(spool)
        os.write(writers[0], rest)
    finally:
        for writer in writers:
            os.close(writer)
    clock.advance(60.0)
    outcome = intake.offer("x.yaml", complete=True)
    assert isinstance(outcome, Accepted), outcome
    assert (outcome.job.path / "job.yaml").read_bytes() == first_half + rest


# -- one id, one record ---------------------------------------------------------------------------


@pytest.mark.parametrize("together", [False, True], ids=["alone", "with-another-file"])
def test_a_job_file_naming_a_schedules_id_is_a_duplicate(
    tmp_path: Path, validator: JobValidator, together: bool
) -> None:
    """A schedule replaces a schedule of its id; a job file of that id is refused, however
    it is placed (alone, or in a group commit): one id, one record."""
    spool, intake, _ = _intake(tmp_path, validator)
    incoming = spool.dir("incoming")
    (incoming / "s.yaml").write_text(JOB.format(id="s") + "schedule: {every: 1h}\n")
    placed = intake.offer("s.yaml", complete=True)
    assert isinstance(placed, Accepted) and placed.job.directory == "scheduled"
    (incoming / "job.yaml").write_text(JOB.format(id="s"))
    names = ["job.yaml"]
    if together:
        (incoming / "other.yaml").write_text(JOB.format(id="other"))
        names.append("other.yaml")
    outcome = intake.offer_all(names, complete=True)[0]
    assert isinstance(outcome, Rejected), outcome
    assert outcome.reason["code"] == "duplicate"
    assert "already exists in scheduled/" in outcome.reason["reason"]
    assert not (spool.dir("pending") / "s").exists()
    found = spool.jobs.find("s")
    assert found is not None and found.directory == "scheduled"


# -- a failed intake is retried with backoff ------------------------------------------------------


def test_a_file_whose_intake_keeps_failing_is_retried_after_1s_doubling_to_60s(
    tmp_path: Path, validator: JobValidator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README (How it stays crash-safe): a failure such as a full disk puts the file back,
    and it is retried with backoff, 1 s doubling to 60 s, not in a loop; once it works the
    file is taken."""
    spool, intake, clock = _intake(tmp_path, validator)
    (spool.dir("incoming") / "j.yaml").write_text(JOB.format(id="j"))
    tries: list[int] = []

    def full_disk(prepared: object) -> None:
        tries.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool.stages, "settle", full_disk)
    assert intake.offer("j.yaml", complete=True) is None
    assert len(tries) == 1
    for n, delay in enumerate([1, 2, 4, 8, 16, 32, 60, 60], start=2):
        clock.advance(delay - 0.5)
        assert intake.offer("j.yaml", complete=True) is None
        assert len(tries) == n - 1, f"tried again before {delay} s"
        clock.advance(0.5)
        assert intake.offer("j.yaml", complete=True) is None
        assert len(tries) == n, f"not tried again after {delay} s"
        assert os.listdir(spool.dir("incoming")) == ["j.yaml"]
    monkeypatch.undo()
    clock.advance(60.0)
    assert isinstance(intake.offer("j.yaml", complete=True), Accepted)


def test_a_failure_judging_a_file_that_may_pass_leaves_it_for_a_retry(
    tmp_path: Path, validator: JobValidator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OSError while a file is judged (the disk, a secret's read) says nothing of the file:
    it goes back to incoming/ and is tried again, never rejected."""
    spool, intake, clock = _intake(tmp_path, validator)
    (spool.dir("incoming") / "j.yaml").write_text(JOB.format(id="j"))
    admit = intake._admission.admit
    failed: list[bool] = []

    def fails_once(*args: Any, **kwargs: Any) -> Any:
        if not failed:
            failed.append(True)
            raise OSError(errno.EIO, "Input/output error")
        return admit(*args, **kwargs)

    monkeypatch.setattr(intake._admission, "admit", fails_once)
    assert intake.offer("j.yaml", complete=True) is None
    assert os.listdir(spool.dir("rejected")) == []
    assert os.listdir(spool.dir("incoming")) == ["j.yaml"]
    clock.advance(1.0)
    assert isinstance(intake.offer("j.yaml", complete=True), Accepted)


# -- a rejection cut short ------------------------------------------------------------------------


def test_a_rejection_cut_short_after_its_reason_was_written_is_finished_at_start(
    tmp_path: Path, validator: JobValidator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between writing reason.json and the move into rejected/: the next start finishes
    the rejection. Given back to incoming/ instead, the file in the stage (spoold's own copy,
    with one name) would be taken again, and a hard link refused a moment before would be
    accepted as a job."""
    spool, intake, _ = _intake(tmp_path, validator)
    mine = tmp_path / "mine.yaml"
    mine.write_text(JOB.format(id="linked"))
    os.link(mine, spool.dir("incoming") / "linked.yaml")

    def killed(*args: object) -> None:
        raise KeyboardInterrupt  # stands for kill -9: nothing after it runs

    monkeypatch.setattr(stages_module, "_move_to_free_name", killed)
    with pytest.raises(KeyboardInterrupt):
        intake.offer("linked.yaml", complete=True)
    monkeypatch.undo()
    restarted = Spool(spool.root)
    assert restarted.stages.recover() == ["finished rejecting linked.yaml"]
    reason = json.loads((spool.dir("rejected") / "linked.yaml" / "reason.json").read_text())
    assert reason["code"] == "hard_link"
    assert (spool.dir("rejected") / "linked.yaml" / "linked.yaml").read_text() == mine.read_text()
    assert os.listdir(spool.dir("incoming")) == []
    assert intake_for(restarted, FakeClock()).sweep() == 0
    assert restarted.jobs.find("linked") is None


# -- what Linux's exec limits count ---------------------------------------------------------------


def _refused(validator: JobValidator, text: str) -> Refused:
    with pytest.raises(Refused) as caught:
        Admission(validator, max_file_size=1 << 22).admit(
            text.encode(), "job.json", now=FakeClock().now()
        )
    return caught.value


def _admits(validator: JobValidator, text: str) -> None:
    Admission(validator, max_file_size=1 << 22).admit(
        text.encode(), "job.json", now=FakeClock().now()
    )


@pytest.mark.parametrize(
    ("executor", "product", "field"),
    [
        # The script the local executor hands to ``sh -c``: the commands and a newline.
        ("local", {"commands": "#" * (MAX_ARG_STRLEN - 1)}, "commands"),
        # The custom executor's environment string: SPOOLD_SCRIPT=, the script, a newline.
        ("custom", {"script": "#" * (MAX_ARG_STRLEN - len("SPOOLD_SCRIPT=") - 1)}, "script"),
    ],
    ids=["local", "custom"],
)
def test_a_script_of_exactly_max_arg_strlen_bytes_is_refused(
    validator: JobValidator, executor: str, product: dict[str, Any], field: str
) -> None:
    """MAX_ARG_STRLEN counts the terminating NUL: a string of 131072 bytes cannot be exec'd
    (test_intake_round30.test_the_bound_is_linuxs), one byte less can."""
    refusal = _refused(validator, json.dumps({"executor": executor, "product": product}))
    [issue] = refusal.issues
    assert issue.path == f"product.{field}"
    assert f"the script is {MAX_ARG_STRLEN} bytes" in issue.message
    shorter = {name: value[:-1] for name, value in product.items()}
    _admits(validator, json.dumps({"executor": executor, "product": shorter}))


def test_a_variable_of_four_byte_characters_is_counted_in_bytes(validator: JobValidator) -> None:
    """40,000 characters, 160,000 bytes in UTF-8: past MAX_ARG_STRLEN, however few characters."""
    value = "\N{GRINNING FACE}" * 40_000
    text = json.dumps({"executor": "local", "product": {"commands": "true"},
                       "variables": {"W": value}}, ensure_ascii=False)  # fmt: skip
    refusal = _refused(validator, text)
    [issue] = refusal.issues
    assert issue.path == "variables.W"
    assert "variable W is 160002 bytes" in issue.message


def test_variables_of_exactly_the_total_are_admitted_and_a_byte_more_is_refused(
    validator: JobValidator,
) -> None:
    """Each NAME=value with its NUL counts; 1 MiB together is the most admitted."""

    def with_last(size: int) -> str:
        # Seven variables of MAX_ARG_STRLEN bytes each (NUL included), then two that fill
        # the rest: V7 of MAX_ARG_STRLEN - 100 bytes, and W of ``size``.
        variables = {f"V{i}": "a" * (MAX_ARG_STRLEN - len(f"V{i}") - 2) for i in range(7)}
        variables["V7"] = "a" * (MAX_ARG_STRLEN - 100 - len("V7") - 2)
        variables["W"] = "a" * (size - len("W") - 2)
        return json.dumps({"executor": "local", "product": {"commands": "true"},
                           "variables": variables})  # fmt: skip

    assert 7 * MAX_ARG_STRLEN + (MAX_ARG_STRLEN - 100) + 100 == MAX_VARIABLES_BYTES
    _admits(validator, with_last(100))
    refusal = _refused(validator, with_last(101))
    [issue] = refusal.issues
    assert issue.path == "variables"
    assert f"take {MAX_VARIABLES_BYTES + 1} bytes together" in issue.message


# -- whose a file given back to incoming/ is --------------------------------------------------------

NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def as_root() -> None:
    needs_root()  # to give files other owners


def _dropped_by_nobody(spool: Spool, name: str, text: str, mode: int = 0o644) -> Path:
    path = spool.dir("incoming") / name
    path.write_text(text)
    os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    path.chmod(mode)
    return path


def _full_disk_at_settle(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(prepared: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool.stages, "settle", full_disk)


@pytest.mark.parametrize("xattrs", [True, False], ids=["marked", "no-user-attributes"])
def test_a_file_given_back_after_a_failed_intake_keeps_its_submitter(
    tmp_path: Path, validator: JobValidator, monkeypatch: pytest.MonkeyPatch, as_root: None,
    xattrs: bool,
) -> None:  # fmt: skip
    """The file a failed intake gives back to incoming/ is spoold's private copy, made by
    spoold's user: taken again, it is still its submitter's (it was recorded as root's). Where
    the filesystem keeps no user attributes (sshfs), the copy is given their owner and mode."""
    spool, intake, clock = _intake(tmp_path, validator)
    _dropped_by_nobody(spool, "j.yaml", JOB.format(id="j"), mode=0o640)
    if not xattrs:

        def no_attributes(*args: object, **kwargs: object) -> None:
            raise OSError(errno.ENOTSUP, "Operation not supported")

        monkeypatch.setattr(os, "setxattr", no_attributes)
    _full_disk_at_settle(spool, monkeypatch)
    assert intake.offer("j.yaml", complete=True) is None
    given_back = (spool.dir("incoming") / "j.yaml").stat()
    if not xattrs:
        assert (given_back.st_uid, given_back.st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid)
        assert stat.S_IMODE(given_back.st_mode) == 0o640
    monkeypatch.undo()
    clock.advance(1.0)
    outcome = intake.offer("j.yaml", complete=True)
    assert isinstance(outcome, Accepted), outcome
    status = json.loads((outcome.job.path / "status.json").read_text())
    assert (status["submitter"], status["submitter_uid"]) == ("nobody", NOBODY.pw_uid)


def test_a_file_given_back_by_recovery_is_still_judged_as_its_submitters(
    tmp_path: Path, validator: JobValidator, as_root: None
) -> None:
    """Killed between the take and the decision, the daemon's next start gives the stage's
    file back to incoming/: spoold's copy, made by spoold's user (root: no policy limits it).
    A file the policy refuses its submitter stays refused, as theirs."""
    policy = Policy.from_document({"users": {"nobody": {"executors": ["sevdesk"]}}})
    spool, intake, _ = _intake(tmp_path, validator, policy=policy)
    _dropped_by_nobody(spool, "a.yaml", JOB.format(id="a"))
    refused = intake.offer("a.yaml", complete=True)
    assert isinstance(refused, Rejected) and refused.reason["code"] == "not_allowed"
    _dropped_by_nobody(spool, "b.yaml", JOB.format(id="b"))
    assert spool.stages.take_incoming("b.yaml", now=0.0, max_size=LIMIT) is not None
    # kill -9 here; the next start:
    restarted = Spool(spool.root)
    assert "returned b.yaml to incoming/ as b.yaml (intake was interrupted)" in (
        restarted.stages.recover()
    )
    outcome = intake.offer("b.yaml", complete=True)
    assert isinstance(outcome, Rejected), f"accepted as {outcome}: not nobody's policy"
    assert outcome.reason["code"] == "not_allowed"
    assert outcome.reason["submitter"] == "nobody"


def test_a_submitter_mark_is_believed_only_on_spools_own_copy(
    tmp_path: Path, validator: JobValidator, as_root: None
) -> None:
    """The mark that names a copy's submitter is a user attribute, which a file's owner may
    set on their own file: on nobody's file, naming root, it changes nothing; nor on a file
    of spoold's user with a second name (a link to a copy): rejected as a link."""
    policy = Policy.from_document({"users": {"nobody": {"executors": ["sevdesk"]}}})
    spool, intake, _ = _intake(tmp_path, validator, policy=policy)
    forged = _dropped_by_nobody(spool, "f.yaml", JOB.format(id="f"))
    os.setxattr(forged, stages_module.SUBMITTER_MARK, b"0:0:600")
    outcome = intake.offer("f.yaml", complete=True)
    assert isinstance(outcome, Rejected) and outcome.reason["submitter"] == "nobody", outcome
    linked = spool.dir("incoming") / "l.yaml"
    linked.write_text(JOB.format(id="l"))
    os.setxattr(linked, stages_module.SUBMITTER_MARK, f"{NOBODY.pw_uid}:0:600".encode())
    os.link(linked, tmp_path / "other-name")
    outcome = intake.offer("l.yaml", complete=True)
    assert isinstance(outcome, Rejected) and outcome.reason["code"] == "hard_link", outcome
