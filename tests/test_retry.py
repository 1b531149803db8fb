"""The retry policy: which failures are retried, and the waits between attempts."""

from __future__ import annotations

import pytest

from spoold.core.retry import RetryPolicy


def test_no_retries_by_default() -> None:
    policy = RetryPolicy.from_document({})
    assert policy.attempts == 1
    assert not policy.should_retry(1, 1)


def test_retries_alone_back_off_exponentially_up_to_ten_minutes() -> None:
    policy = RetryPolicy.from_document({"retries": 10})
    waits = [policy.delay(n, lambda: 0.0) for n in range(1, 9)]
    assert waits == [10, 20, 40, 80, 160, 320, 600, 600]
    assert policy.should_retry(10, 1) and not policy.should_retry(11, 1)


def test_a_plain_duration_is_a_fixed_wait() -> None:
    policy = RetryPolicy.from_document({"retries": 3, "backoff": "30s"})
    assert [policy.delay(n, lambda: 0.5) for n in (1, 2, 3)] == [30, 30, 30]


def test_a_plain_duration_longer_than_the_default_ceiling_is_waited_in_full() -> None:
    policy = RetryPolicy.from_document({"retries": 2, "backoff": "30m"})
    assert [policy.delay(n, lambda: 0.0) for n in (1, 2)] == [1800, 1800]


def test_an_exponential_policy_with_its_own_ceiling() -> None:
    policy = RetryPolicy.from_document(
        {"retries": 5, "backoff": {"initial": "1s", "max": "5s", "multiplier": 3}}
    )
    assert [policy.delay(n, lambda: 0.0) for n in (1, 2, 3, 4)] == [1, 3, 5, 5]


def test_an_initial_wait_above_the_default_ceiling_is_kept() -> None:
    policy = RetryPolicy.from_document({"retries": 2, "backoff": {"initial": "1h"}})
    assert policy.delay(1, lambda: 0.0) == 3600


@pytest.mark.parametrize(("draw", "expected"), [(0.0, 20.0), (0.5, 30.0), (0.999, 39.98)])
def test_jitter_spreads_the_wait_over_its_upper_half(draw: float, expected: float) -> None:
    policy = RetryPolicy.from_document({"retries": 3, "backoff": {"initial": 20, "jitter": True}})
    assert policy.delay(2, lambda: draw) == pytest.approx(expected)


def test_retry_on_limits_retries_to_those_exit_codes() -> None:
    policy = RetryPolicy.from_document({"retries": 2, "retry_on": [75, 111]})
    assert policy.should_retry(1, 75)
    assert not policy.should_retry(1, 1)
    assert not policy.should_retry(1, None), "a timeout has no exit code: not retried"
    assert not policy.should_retry(3, 75), "no attempts left"


def test_huge_retry_counts_do_not_overflow() -> None:
    policy = RetryPolicy.from_document({"retries": 5000, "backoff": {"multiplier": 10}})
    assert policy.delay(4999, lambda: 0.0) == 600
