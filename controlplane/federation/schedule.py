"""When to fetch a federated bundle next. Pure: times in, times out.

After a successful fetch, the next one is due after the bundle's ``spiffe_refresh_hint`` (SPIFFE
Trust Domain and Bundle 4.1), or :attr:`RefreshPolicy.default_interval` (five minutes, SPIFFE
Federation 6.1) when it has none, always within ``[min_interval, max_interval]``: a hint of one
second must not make us hammer the endpoint (SPIRE's floor is a minute), and a hint of a month
must not leave a revoked key trusted for a month (polling more often than the hint is always
safe). After a failure the fetch is retried with exponential backoff from ``first_retry``, never
later than the regular interval, so a short outage heals quickly and a long one costs one
request per interval, not a storm.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

DEFAULT_INTERVAL: Final = timedelta(minutes=5)
MIN_INTERVAL: Final = timedelta(minutes=1)
MAX_INTERVAL: Final = timedelta(hours=1)
FIRST_RETRY: Final = timedelta(seconds=5)
MAX_DOUBLINGS: Final = 30


@dataclass(frozen=True, slots=True, kw_only=True)
class RefreshPolicy:
    """How often to fetch: the bounds of the refresh interval and the first retry after a failure."""

    default_interval: timedelta = DEFAULT_INTERVAL
    min_interval: timedelta = MIN_INTERVAL
    max_interval: timedelta = MAX_INTERVAL
    first_retry: timedelta = FIRST_RETRY

    def __post_init__(self) -> None:
        if self.min_interval <= timedelta(0) or self.first_retry <= timedelta(0):
            raise ValueError("federation: the minimum refresh interval and the first retry must be positive")
        if self.min_interval > self.max_interval:
            raise ValueError("federation: the minimum refresh interval must not exceed the maximum")

    def interval(self, refresh_hint: int | None) -> timedelta:
        """The time between two successful fetches for a bundle with this refresh hint (seconds)."""
        wanted = self.default_interval if refresh_hint is None else timedelta(seconds=refresh_hint)
        return max(self.min_interval, min(wanted, self.max_interval))

    def after_success(self, now: datetime, refresh_hint: int | None) -> datetime:
        return now + self.interval(refresh_hint)

    def retry_delay(self, failures: int, refresh_hint: int | None, *, jitter: float = 0.0) -> timedelta:
        """The wait after ``failures`` failures in a row (1 for the first); ``jitter`` in [0, 1) shortens
        it by up to a fifth, so servers that failed together do not retry together."""
        if failures < 1:
            raise ValueError("federation: retry_delay needs at least one failure")
        doubled = self.first_retry * (2 ** min(failures - 1, MAX_DOUBLINGS))
        delay = min(doubled, self.interval(refresh_hint))
        shortened: timedelta = delay * (1 - 0.2 * min(max(jitter, 0.0), 1.0))
        return shortened
