"""Names spoold makes from a submitted file's name (rejected/<name>-2.yaml, a file given back
to incoming/, ``spoold submit``'s temporary name) fit the file system's NAME_MAX, counted in
bytes of the file system encoding: a file whose name is already as long as a name can be
still ends in rejected/ with its reason, however many came before it under that name."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest

from spoold.core.spool import Spool
from spoold.core.spool.stages import _free_names
from spoold.intake.admission import display_name
from spoold.intake.incoming import Rejected
from tests.fakes import FakeClock
from tests.harness import DaemonProcess, intake_for, wait_for, write_config

NAME_MAX = 255
BAD = b"bad: [\n"  # invalid YAML: rejected, never a job


def _name(unit: str, suffix: str = ".yaml") -> bytes:
    """A name of exactly NAME_MAX bytes: ``unit`` repeated, padded with ``c``, then ``suffix``."""
    body = NAME_MAX - len(suffix.encode())
    encoded = unit.encode()
    repeated = encoded * (body // len(encoded))
    return repeated + b"c" * (body - len(repeated)) + suffix.encode()


# In bytes: ASCII; two-, three- and four-byte UTF-8 characters (a cut in one would leave a
# name that is not UTF-8); a name that is not UTF-8 at all; and one without a suffix.
NAMES = {
    "ascii": _name("c"),
    "two-byte": _name("é"),
    "three-byte": _name("€"),
    "four-byte": _name("\N{GRINNING FACE}"),
    "not-utf8": b"\xff\xfe" * 125 + b".yaml",
    "no-suffix": _name("x", suffix=""),
}


def _place(spool: Spool, name: bytes, data: bytes = BAD) -> None:
    """Write the file elsewhere under a short name, then rename it into incoming/ (the name
    is already as long as a name can be: nothing may be added to it)."""
    temp = os.fsencode(spool.dir("tmp")) + b"/.drop"
    with open(temp, "wb") as handle:
        handle.write(data)
    os.rename(temp, os.fsencode(spool.dir("incoming")) + b"/" + name)


def _check_entry(rejected: bytes, entry: bytes, original: bytes) -> None:
    """One entry of rejected/: a name that fits, made recognisably from the original's, the
    file kept in it and the full original name in its reason.json."""
    assert len(entry) <= NAME_MAX, f"{len(entry)} bytes: {entry!r}"
    assert original.startswith(entry[:8]), f"{entry!r} not recognisable as {original!r}"
    if original.endswith(b".yaml"):
        assert entry.endswith(b".yaml"), entry
    try:  # no character cut in two: what was UTF-8 stays UTF-8
        original.decode()
    except UnicodeDecodeError:
        pass
    else:
        entry.decode()
    kept = os.listdir(rejected + b"/" + entry)
    assert sorted(kept) == sorted([original, b"reason.json"]), kept
    with open(rejected + b"/" + entry + b"/reason.json", "rb") as handle:
        reason = json.loads(handle.read())
    assert reason["file"] == display_name(os.fsdecode(original)), reason["file"]
    assert reason["code"] in ("invalid", "file_name"), reason


@pytest.mark.parametrize("name", list(NAMES.values()), ids=list(NAMES))
def test_a_longest_name_rejected_again_and_again_ends_in_rejected_each_time(
    tmp_path: Path, name: bytes
) -> None:
    """Twelve files under one name of NAME_MAX bytes: the second needs ``-2``, the tenth
    ``-10``; each is shortened to fit, and each still ends in rejected/ with its reason."""
    spool = Spool(tmp_path / "spool")
    spool.init()
    intake = intake_for(spool, FakeClock())
    for n in range(1, 13):
        _place(spool, name)
        outcome = intake.offer(os.fsdecode(name), complete=True)
        assert isinstance(outcome, Rejected), f"file {n}: {outcome}"
        assert os.listdir(spool.dir("incoming")) == [], f"file {n} stays in incoming/"
    rejected = os.fsencode(spool.dir("rejected"))
    entries = os.listdir(rejected)
    assert len(entries) == 12, entries
    assert name in entries, "the first keeps its own name"
    for entry in entries:
        _check_entry(rejected, entry, name)


@pytest.mark.parametrize("name", list(NAMES.values()), ids=list(NAMES))
def test_free_names_fit_a_file_system_of_shorter_names(name: bytes) -> None:
    """Where names are shorter (eCryptfs: 143 bytes), even the first is shortened to fit;
    every one differs, keeps the suffix and cuts no character in two."""
    shorter = 143
    names = list(itertools.islice(_free_names(os.fsdecode(name), shorter), 120))
    assert len(set(names)) == len(names)
    for candidate in map(os.fsencode, names):
        assert len(candidate) <= shorter, candidate
        assert candidate.endswith(b".yaml") == name.endswith(b".yaml"), candidate
        assert name.startswith(candidate[:8]), candidate
        if name != NAMES["not-utf8"]:
            candidate.decode()


def test_a_longest_name_given_back_to_incoming_twice_fits(tmp_path: Path) -> None:
    """A file given back to incoming/ (``spoold submit`` of a name already there, an intake
    that could not finish) takes a free name there too: one that fits."""
    spool = Spool(tmp_path / "spool")
    spool.init()
    name = os.fsdecode(NAMES["three-byte"])
    placed = [spool.stages.submit_file(name, BAD) for _ in range(3)]
    assert placed[0].name == name
    assert len({p.name for p in placed}) == 3, placed
    for path in placed:
        assert len(os.fsencode(path.name)) <= NAME_MAX, path.name
        assert path.name.endswith(".yaml") and path.read_bytes() == BAD
    assert sorted(os.listdir(spool.dir("incoming"))) == sorted(p.name for p in placed)


def test_the_daemon_rejects_a_second_file_of_a_longest_name(tmp_path: Path) -> None:
    """The probe's repro, through the daemon: a 255-byte name, then the same name again once
    the first is rejected. The second must not stay in incoming/ failing over and over."""
    spool = Spool(tmp_path / "spool")
    spool.init()
    daemon = DaemonProcess(spool.root, write_config(tmp_path / "config.yaml", spool.root))
    daemon.start()
    rejected = os.fsencode(spool.dir("rejected"))
    incoming = spool.dir("incoming")
    name = NAMES["ascii"]
    try:
        for count in (1, 2):
            _place(spool, name)

            def rejected_and_gone(count: int = count) -> bool:
                entries = os.listdir(rejected)
                kept = all(os.path.exists(rejected + b"/" + e + b"/reason.json") for e in entries)
                return len(entries) == count and kept and not os.listdir(incoming)

            wait_for(rejected_and_gone, what=f"file {count} to be rejected")
        for entry in os.listdir(rejected):
            _check_entry(rejected, entry, name)
        assert "File name too long" not in daemon.log()
        assert daemon.alive
    finally:
        daemon.kill()
