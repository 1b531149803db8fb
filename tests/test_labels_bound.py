"""Labels are bounded where a job comes in: at most 64 labels, keys of 1-128 characters,
values of at most 256 (the job schema's ``labels``). Unbounded, 300 jobs of 3000 distinct
labels each grew the daemon from 84 MB to 820 MB, a label query took 5 s and the catalogue's
snapshot was 21 MB: every label is kept in status.json and twice in the catalogue's index."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from spoold.core.spool import Spool
from spoold.face.catalogue import Catalogue, JobQuery
from spoold.intake.incoming import Accepted, Rejected
from tests.fakes import FakeClock
from tests.harness import intake_for
from tests.test_catalogue import make_job

MAX_LABELS, MAX_KEY, MAX_VALUE = 64, 128, 256


def _offered(tmp_path: Path, labels: dict[str, str]) -> Accepted | Rejected:
    spool = Spool(tmp_path / "spool")
    spool.init()
    document = {"job_id": "j", "executor": "local", "product": {"commands": "true"},
                "labels": labels}  # fmt: skip
    (spool.dir("incoming") / "j.yaml").write_text(json.dumps(document))  # JSON is YAML too
    outcome = intake_for(spool, FakeClock()).offer("j.yaml", complete=True)
    assert outcome is not None, "the file was not taken"
    return outcome


def _reason(outcome: Accepted | Rejected) -> str:
    assert isinstance(outcome, Rejected), outcome
    return json.dumps(outcome.reason)


def test_labels_within_the_bounds_are_accepted(tmp_path: Path) -> None:
    labels = {f"{i:03d}" + "k" * (MAX_KEY - 3): "v" * MAX_VALUE for i in range(MAX_LABELS)}
    assert isinstance(_offered(tmp_path, labels), Accepted)


def test_more_labels_than_the_bound_are_refused_with_the_bound_not_the_labels(
    tmp_path: Path,
) -> None:
    outcome = _offered(tmp_path, {f"key-{i}": f"value-{i}" for i in range(3000)})
    reason = _reason(outcome)
    assert "at most 64 labels" in reason, reason
    assert "value-2999" not in reason and len(reason) < 2000, "the reason quotes the labels"


@pytest.mark.parametrize(
    ("labels", "said"),
    [
        ({"k" * (MAX_KEY + 1): "v"}, "a label's key is at most 128 characters long"),
        ({"k": "v" * (MAX_VALUE + 1)}, "must be at most 256 characters long"),
        ({"": "v"}, "must not be empty"),
    ],
    ids=["key-too-long", "value-too-long", "empty-key"],
)
def test_a_label_too_long_is_refused_with_its_bound(
    tmp_path: Path, labels: dict[str, str], said: str
) -> None:
    reason = _reason(_offered(tmp_path, labels))
    assert said in reason and '"invalid"' in reason, reason


def test_the_catalogues_label_index_grows_in_proportion_to_the_labels(tmp_path: Path) -> None:
    """At the bound, each job's labels all distinct (the worst case: a list per pair and per
    key), the index grows linearly with the jobs: twice the jobs, about twice the memory, and
    no more than a few KiB a label."""
    spool = Spool(tmp_path / "spool")
    spool.init()

    def index_bytes(jobs: int) -> int:
        for j in range(jobs):
            if not (spool.dir("done") / f"j{j}").exists():
                make_job(spool, f"j{j}", second=j,
                         labels={f"k{j}-{i}": f"v{j}-{i}" for i in range(MAX_LABELS)})  # fmt: skip
        tracemalloc.start()
        try:
            catalogue = Catalogue(spool)
            page = catalogue.page(JobQuery(labels={"k3-5": "v3-5"}))
            size = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        assert [row["job_id"] for row in page.rows] == ["j3"]
        return size

    small, large = index_bytes(40), index_bytes(80)
    assert 1.5 < large / small < 2.5, (small, large)
    assert large / (80 * MAX_LABELS) < 2048, "bytes of index per label"
