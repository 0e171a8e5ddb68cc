"""When a federated bundle is fetched next: the refresh hint within bounds, backoff after failures."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from controlplane.federation.schedule import RefreshPolicy

NOW = datetime(2026, 5, 20, 12, 0, tzinfo=UTC)
POLICY = RefreshPolicy()


@pytest.mark.parametrize(
    ("hint", "interval"),
    [
        (None, timedelta(minutes=5)),  # no hint: five minutes (SPIFFE Federation 6.1)
        (300, timedelta(minutes=5)),
        (1, timedelta(minutes=1)),  # never more often than the minimum
        (2419200, timedelta(hours=1)),  # a 28-day hint is polled hourly
        (900, timedelta(minutes=15)),
    ],
)
def test_the_interval_follows_the_hint_within_bounds(hint: int | None, interval: timedelta) -> None:
    assert POLICY.interval(hint) == interval
    assert POLICY.after_success(NOW, hint) == NOW + interval


def test_failures_back_off_exponentially_up_to_the_interval() -> None:
    delays = [POLICY.retry_delay(failures, 300) for failures in range(1, 9)]
    assert delays == [timedelta(seconds=s) for s in (5, 10, 20, 40, 80, 160, 300, 300)]
    assert POLICY.retry_delay(10_000, None) == timedelta(minutes=5)


def test_jitter_shortens_a_retry_by_at_most_a_fifth() -> None:
    assert POLICY.retry_delay(1, 300, jitter=0.5) == timedelta(seconds=4.5)
    assert POLICY.retry_delay(1, 300, jitter=7.0) == timedelta(seconds=4)
    with pytest.raises(ValueError, match="at least one failure"):
        POLICY.retry_delay(0, 300)


def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="must not exceed the maximum"):
        RefreshPolicy(min_interval=timedelta(hours=2))
    with pytest.raises(ValueError, match="must be positive"):
        RefreshPolicy(min_interval=timedelta(0))
