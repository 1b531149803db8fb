"""Artifacts are found and opened below the work dir, never through a link (round 31): a job
that swaps a directory for a link at any moment of the collection reaches nothing outside its
work dir; a deep tree is walked without recursion, to a bound the log names; the walk stops
opening files at ``limits.max_artifacts``; a file that changes size while copied is not kept."""

from __future__ import annotations

import errno
import os
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import spoold.core.spool.jobs as jobs_module
import spoold.run.launcher as launcher_module
from spoold.core.spool import JobDir, Spool
from spoold.run.launcher import ARTIFACT_DEPTH, ArtifactsLeft, Chore, Launcher
from tests.test_artifact_limits import _run_job

SECRET = b"root only\n"


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for relative, data in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    return root


def _collected(
    workdir: Path, patterns: tuple[tuple[str, str], ...], **fields: Any
) -> tuple[dict[str, bytes], list[str | ArtifactsLeft]]:
    """What an artifacts chore done in this process opens (path -> content), and what it says."""
    kept: dict[str, bytes] = {}
    said: list[str | ArtifactsLeft] = []
    chore = Chore("artifacts", None, str(workdir), patterns, **fields)
    for found in Launcher(chores_here=True).artifacts(chore):
        if isinstance(found, (str, ArtifactsLeft)):
            said.append(found)
            continue
        relative, fd = found
        with open(fd, "rb") as source:
            assert relative not in kept, relative
            kept[relative] = source.read()
    return kept, said


class _Os(types.ModuleType):
    """The os module as the launcher sees it, with ``open`` calling ``before`` first."""

    def __init__(self, before: Callable[[int], None]) -> None:
        super().__init__("os")
        self._before = before
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def open(self, path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        self._before(self.calls)
        self.calls += 1
        return os.open(path, flags, mode, dir_fd=dir_fd)


# -- the race: a directory swapped for a link ------------------------------------------------


@pytest.fixture
def raced(tmp_path: Path) -> tuple[Path, Path]:
    """A work dir holding d/sub/secret.txt and d/zzz/*, and outside it a root-only tree with
    the same names."""
    workdir = _tree(tmp_path / "work", {"d/sub/secret.txt": b"decoy\n",
                                        **{f"d/zzz/f{n}": b"" for n in range(5)}})  # fmt: skip
    outside = _tree(tmp_path / "rootonly", {"secret.txt": SECRET, "sub/secret.txt": SECRET,
                                            "zzz/f0": SECRET, "d/sub/secret.txt": SECRET})  # fmt: skip
    for path in outside.rglob("*"):
        path.chmod(0o700 if path.is_dir() else 0o600)
    return workdir, outside


@pytest.mark.parametrize("swapped", ["d/sub", "d"])
@pytest.mark.parametrize("at", range(10))
def test_a_directory_swapped_for_a_link_at_any_open_leads_nowhere_outside(
    raced: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, swapped: str, at: int
) -> None:
    """The swap is made just before the collection's ``at``-th open, whatever that opens: the
    old code found every match first and opened each by its path, following the link."""
    workdir, outside = raced
    target = workdir / swapped

    def swap(calls: int) -> None:
        if calls == at:
            target.rename(target.with_name(target.name + "_real"))
            target.symlink_to(outside, target_is_directory=True)

    monkeypatch.setattr(launcher_module, "os", _Os(swap))
    kept, _ = _collected(workdir, (("d", "dir"),))
    assert SECRET not in kept.values(), kept
    assert all(path.startswith("d/") for path in kept)
    assert set(kept.values()) <= {b"decoy\n", b""}


def test_a_link_anywhere_in_a_path_is_never_followed(tmp_path: Path) -> None:
    outside = _tree(tmp_path / "outside", {"a.log": SECRET, "sub/b.log": SECRET, "x": SECRET})
    workdir = _tree(tmp_path / "work", {"real/c.log": b"c\n"})
    (workdir / "out").symlink_to(outside, target_is_directory=True)
    (workdir / "real" / "up").symlink_to(outside, target_is_directory=True)
    (workdir / "real" / "x").symlink_to(outside / "x")
    patterns = (("out/*.log", "file"), ("out", "dir"), ("out/sub", "dir"), ("*/x", "file"),
                ("real", "dir"), ("real/up/*.log", "file"), ("**/*.log", "file"))  # fmt: skip
    kept, said = _collected(workdir, patterns)
    assert kept == {"real/c.log": b"c\n"}
    links = [s for s in said if isinstance(s, ArtifactsLeft) and s.reason == "not followed"]
    assert len(links) == 1, said
    assert (links[0].number, links[0].what) == (3, "link(s)")
    assert links[0].names == ("out", "real/up", "real/x")


def test_a_work_dir_swapped_for_a_link_is_not_followed(raced: tuple[Path, Path]) -> None:
    workdir, outside = raced
    workdir.rename(workdir.with_name("moved"))
    workdir.symlink_to(outside, target_is_directory=True)
    kept, said = _collected(workdir, (("d", "dir"), ("secret.txt", "file")))
    assert kept == {}
    assert said == [f"artifacts: the work dir {workdir}: Not a directory"]  # O_DIRECTORY's word


# -- the globs' meaning, as pathlib's glob has it --------------------------------------------


def test_globs_match_as_pathlib_glob_in_path_order(tmp_path: Path) -> None:
    files = ["out/a.log", "out/.hidden.log", "out/b.txt", "out/sub/c.log", "out/sub/deep/d.log",
             "a-c", "a/b", "a0", "reports/x/index.html", "reports/y.html", "rep2/z", "top.txt",
             "q/sub/e.txt", "q/other/f.txt"]  # fmt: skip
    workdir = _tree(tmp_path / "work", {name: name.encode() for name in files})
    (workdir / "empty").mkdir()
    patterns = (("out/*.log", "file"), ("**/*.txt", "file"), ("out/**", "dir"), ("rep*", "dir"),
                ("*/sub/*", "file"), ("a*", "file"), ("a", "dir"), ("./top.txt", "file"),
                ("out//sub", "dir"), ("[ab]/?", "file"), ("reports", "file"),
                ("missing/*", "file"), ("empty", "dir"), ("out/*.log", "file"))  # fmt: skip
    expected: dict[str, Path] = {}
    for pattern, kind in patterns:
        for match in workdir.glob(pattern):
            found = [match] if kind == "file" else list(match.rglob("*")) if match.is_dir() else []
            for path in found:
                if path.is_file():
                    expected[path.relative_to(workdir).as_posix()] = path
    kept, said = _collected(workdir, patterns)
    assert list(kept) == sorted(expected)  # in path order, as the old code sorted them
    assert {name: data.decode() for name, data in kept.items()} == {n: n for n in expected}
    assert said == ["artifact 'missing/*': nothing matched"]


def test_the_whole_work_dir_and_a_pattern_that_leaves_it(tmp_path: Path) -> None:
    workdir = _tree(tmp_path / "work", {"a": b"a", "b/c": b"c"})
    kept, said = _collected(workdir, ((".", "dir"), ("b/../../x", "file")))
    assert list(kept) == ["a", "b/c"]
    assert said == ["artifact 'b/../../x': a path with '..' is not kept"]


# -- a deep tree -----------------------------------------------------------------------------


def _flatten(base: Path) -> None:
    """Remove a chain ``base/a/a/...`` of any depth, without recursion or long paths."""
    while (base / "a").is_dir():
        top = base / "a"
        if (top / "a").is_dir():
            (top / "a").rename(base / "a.next")
            for entry in top.iterdir():
                entry.unlink()
            top.rmdir()
            (base / "a.next").rename(top)
        else:
            for entry in top.iterdir():
                entry.unlink()
            top.rmdir()


@pytest.fixture
def deep(tmp_path: Path) -> Iterator[Path]:
    """A work dir with d/top.txt and d/a/a/... 1200 deep (past the recursion limit of 1000:
    the old walk, pathlib's rglob, raised RecursionError), a file at each level."""
    workdir = _tree(tmp_path / "work", {"d/top.txt": b"top\n"})
    fd = os.open(workdir / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in range(1, 1201):
            os.mkdir("a", dir_fd=fd)
            inner = os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
            file = os.open(f"f{level}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
            os.close(file)
    finally:
        os.close(fd)
    yield workdir
    _flatten(workdir / "d")


def test_a_deep_tree_is_walked_to_a_bound_and_says_what_it_left(
    deep: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held: list[int] = []

    def count_open(calls: int) -> None:
        held.append(len(os.listdir("/proc/self/fd")))

    monkeypatch.setattr(launcher_module, "os", _Os(count_open))
    kept, said = _collected(deep, (("d", "dir"),))
    chain = "/".join(["a"] * ARTIFACT_DEPTH)
    assert len(kept) == ARTIFACT_DEPTH  # the files of each level within the bound, not below
    assert "d/top.txt" in kept and f"d/{chain[:-2]}/f{ARTIFACT_DEPTH - 1}" in kept
    assert said == [ArtifactsLeft(f"deeper than {ARTIFACT_DEPTH} levels, not looked into", 1,
                                  False, (f"d/{chain}",), "director(ies)")]  # fmt: skip
    # A descriptor per level, no more (a few to spare for the test process's other threads).
    assert max(held) - min(held) <= ARTIFACT_DEPTH + 8


def test_a_job_with_a_deep_tree_keeps_its_outcome_and_what_is_within_the_bound(
    tmp_path: Path,
) -> None:
    depth = ARTIFACT_DEPTH + 20
    job, status = _run_job(tmp_path, [
        "mkdir out && echo top > out/top.txt",
        f"cd out && for i in $(seq {depth}); do mkdir a && cd a && : > f; done",
    ])  # fmt: skip
    assert status["state"] == "succeeded"
    assert len(status["artifacts"]) == ARTIFACT_DEPTH  # top.txt, an f in each level looked into
    said = [line for line in job.log_path.read_text().splitlines() if "not kept" in line]
    assert len(said) == 1
    assert (
        f"1 director(ies), deeper than {ARTIFACT_DEPTH} levels, not looked into: out/a/a/"
        in said[0]
    )


# -- the walk stops at limits.max_artifacts ----------------------------------------------------


def test_the_walk_opens_no_more_than_max_artifacts_files_and_counts_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workdir = _tree(tmp_path / "work", {"d/sub/secret.txt": b"s"})
    (workdir / "d" / "zzz").mkdir()
    for n in range(3000):
        (workdir / "d" / "zzz" / f"f{n:04}").touch()
    opened = _Os(lambda calls: None)
    monkeypatch.setattr(launcher_module, "os", opened)
    kept, said = _collected(workdir, (("d", "dir"), ("d/zzz/*", "file")), max_files=10)
    assert list(kept) == ["d/sub/secret.txt"] + [f"d/zzz/f{n:04}" for n in range(9)]
    assert opened.calls <= 10 + 4  # the work dir, d, sub, zzz and the files kept
    assert said == [ArtifactsLeft("past limits.max_artifacts", 2991, False,
                                  ("d/zzz/f0009", "d/zzz/f0010", "d/zzz/f0011"))]  # fmt: skip


def test_the_count_goes_through_the_launcher_and_into_one_line(tmp_path: Path) -> None:
    job, status = _run_job(tmp_path, ["mkdir -p out/b && cd out && touch $(seq -f 'f%03g' 1 40)",
                                      "touch b/x b/y"], max_artifacts=10)  # fmt: skip
    assert status["state"] == "succeeded"
    assert [a["path"] for a in status["artifacts"]] == ["out/b/x", "out/b/y"] + [
        f"out/f{n:03}" for n in range(1, 9)
    ]
    said = [line for line in job.log_path.read_text().splitlines() if "not kept" in line]
    assert len(said) == 1
    assert said[0].endswith("artifacts not kept: 32 file(s), past limits.max_artifacts "
                            "(10 files): out/f009, out/f010, out/f011, ...")  # fmt: skip


def test_in_a_fork_as_the_job_user_the_walk_is_the_same(tmp_path: Path) -> None:
    workdir = _tree(tmp_path / "work", {f"out/f{n}": b"x" for n in range(5)})
    (workdir / "out" / "link").symlink_to("/etc/passwd")
    launcher = Launcher(chores_here=False)
    try:
        found = list(launcher.artifacts(Chore("artifacts", None, str(workdir),
                                              (("out", "dir"), ("nothing", "file")),
                                              max_files=2)))  # fmt: skip
    finally:
        launcher.close()
    opened = [item for item in found if isinstance(item, tuple) and len(item) == 2]
    for _, fd in opened:
        os.close(fd)
    assert [relative for relative, _ in opened] == ["out/f0", "out/f1"]
    assert found[2:] == ["artifact 'nothing': nothing matched",
                         ArtifactsLeft("past limits.max_artifacts", 3, False,
                                       ("out/f2", "out/f3", "out/f4"))]  # fmt: skip


# -- a file that changes size while copied ---------------------------------------------------


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.init()
    return spool


class _CopyOs(types.ModuleType):
    """The os module as the spool's jobs see it, with the source changed at the first copy."""

    def __init__(self, change: Callable[[], None], *, copy_range: bool) -> None:
        super().__init__("os")
        self._change = change
        self._copy_range = copy_range

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def _changed(self) -> None:
        change, self._change = self._change, lambda: None
        change()

    def copy_file_range(self, *args: Any) -> int:
        self._changed()
        if not self._copy_range:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return os.copy_file_range(*args)

    def pread(self, *args: Any) -> bytes:
        self._changed()
        return os.pread(*args)


@pytest.mark.parametrize("copy_range", [True, False])
@pytest.mark.parametrize("change", ["shrinks", "grows"])
def test_a_file_that_changes_size_while_copied_is_not_kept_and_said(
    spool: Spool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str, copy_range: bool
) -> None:
    source = _tree(tmp_path / "work", {"out/log.txt": b"x" * 100_000}) / "out" / "log.txt"
    steady = _tree(tmp_path / "work", {"out/steady.txt": b"steady\n"}) / "out" / "steady.txt"

    def changing() -> None:
        with open(source, "r+b") as handle:
            if change == "shrinks":
                handle.truncate(10)
            else:
                handle.seek(0, os.SEEK_END)
                handle.write(b"more")

    monkeypatch.setattr(jobs_module, "os", _CopyOs(changing, copy_range=copy_range))
    path = spool.dir("running") / "art"
    path.mkdir()
    job = JobDir("art", "running", str(path))
    store = spool.jobs.artifact_store(job, max_count=None, max_size=None)
    with open(source, "rb") as handle:
        assert store.store("out/log.txt", handle) is None
    with open(steady, "rb") as handle:
        assert store.store("out/steady.txt", handle) is not None
    assert store.left_out() == ("artifacts not kept: 1 file(s), 100 kB, changed size while "
                                "copied: out/log.txt")  # fmt: skip
    assert sorted(p.name for p in (path / "artifacts" / "out").iterdir()) == ["steady.txt"]


def test_the_walk_stops_at_its_budget_of_entries_and_says_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workdir = _tree(tmp_path / "work", {"a/one": b"1", **{f"big/f{n:02}": b"" for n in range(30)}})
    monkeypatch.setattr(launcher_module, "ARTIFACT_ENTRIES", 10)
    kept, said = _collected(workdir, ((".", "dir"), ("nothing", "file")), max_files=1)
    assert list(kept) == ["a/one"]
    assert said == [  # no "nothing matched": past the budget, it may have
        ArtifactsLeft("past 10 entries looked at, not looked into", 1, False, ("big",),
                      "director(ies)"),
    ]  # fmt: skip


def test_a_work_dir_deeper_than_pythons_recursion_is_removed(tmp_path: Path) -> None:
    """Seen: a job with 1,500 nested directories kept its artifacts and its outcome, then
    failed `internal error: RecursionError` when its work dir was removed (shutil.rmtree)."""
    from spoold.run.launcher import _remove_tree  # noqa: PLC0415

    work = tmp_path / "work"
    fd = os.open(tmp_path, os.O_RDONLY)  # made by relative names: the whole path passes PATH_MAX
    try:
        os.mkdir("work", dir_fd=fd)
        current = os.open("work", os.O_RDONLY, dir_fd=fd)
        for _ in range(3000):
            os.mkdir("d", dir_fd=current)
            below = os.open("d", os.O_RDONLY, dir_fd=current)
            os.close(current)
            current = below
        os.close(current)
    finally:
        os.close(fd)
    assert _remove_tree(str(work)) is True
    assert not work.exists()
