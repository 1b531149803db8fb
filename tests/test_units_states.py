"""Durations, sizes, and the state machine's transition table."""

from __future__ import annotations

import pytest

from spoold.core.errors import InvalidTransition
from spoold.core.states import TRANSITIONS, JobState, check_transition
from spoold.core.units import format_duration, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("10m", 600),
        ("1h30m", 5400),
        ("500ms", 0.5),
        ("2d", 172800),
        (45, 45),
        ("12", 12),
    ],
)
def test_parse_duration(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["ten minutes", "-5s", "5 fortnights", -1, True, ""])
def test_parse_duration_refuses(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "size"),
    [("1MiB", 1048576), ("512k", 512000), ("2 GB", 2 * 10**9), (100, 100), ("7", 7)],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


def test_format_duration_round_trips() -> None:
    for seconds in (0.25, 1, 59, 90, 3600, 5400, 90061):
        assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


def test_every_state_has_a_directory_and_terminal_states_do_not_move_on_their_own() -> None:
    assert {s.directory for s in JobState} == {"pending", "running", "done", "failed", "rejected"}
    assert not TRANSITIONS[JobState.SUCCEEDED]
    assert not TRANSITIONS[JobState.REJECTED]
    check_transition(JobState.PENDING, JobState.RUNNING)
    check_transition(JobState.RUNNING, JobState.PENDING)  # requeue after an interruption
    with pytest.raises(InvalidTransition, match="succeeded job cannot become running"):
        check_transition(JobState.SUCCEEDED, JobState.RUNNING)
