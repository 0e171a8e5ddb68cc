"""The rotation schedule and the retry backoff: pure functions, time and randomness passed in."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.agent.rotation import (
    BACKOFF_BASE,
    BACKOFF_CAP,
    ROTATION_HIGH,
    ROTATION_LOW,
    Backoff,
    SVIDState,
    backoff_delay,
    certificate_state,
    renew_at,
    rotation_fraction,
    rotation_time,
    seconds_until,
    state,
)
from tests.support.ca import TestCA

T0 = datetime(2025, 1, 1, tzinfo=UTC)
serials = st.integers(min_value=1, max_value=(1 << 159) - 1)  # RFC 5280: at most 20 octets, positive
lifetimes = st.integers(min_value=1, max_value=400 * 86_400)


@given(serials)
def test_the_rotation_fraction_is_half_give_or_take_a_tenth(serial: int) -> None:
    fraction = rotation_fraction(serial)
    assert ROTATION_LOW <= fraction < ROTATION_HIGH
    assert rotation_fraction(serial) == fraction  # fixed per serial: evaluating again never moves it


@given(serials, lifetimes)
def test_the_rotation_time_lies_between_40_and_60_percent_of_the_lifetime(serial: int, seconds: int) -> None:
    lifetime = timedelta(seconds=seconds)
    when = rotation_time(T0, T0 + lifetime, rotation_fraction(serial))
    assert T0 + lifetime * 0.4 <= when <= T0 + lifetime * 0.6
    assert state(renew_at=when, expires_at=T0 + lifetime, now=when - timedelta(microseconds=1)) in (
        SVIDState.FRESH,
        SVIDState.DUE,  # only when 40% of the lifetime rounds to the first microsecond
    )
    assert state(renew_at=when, expires_at=T0 + lifetime, now=when) is SVIDState.DUE


def test_fractions_spread_over_the_whole_interval() -> None:
    fractions = [rotation_fraction(random.Random(seed).getrandbits(128)) for seed in range(2000)]  # noqa: S311
    assert min(fractions) < 0.41
    assert max(fractions) > 0.59
    assert 0.49 < sum(fractions) / len(fractions) < 0.51
    low = sum(1 for f in fractions if f < 0.5)
    assert 900 < low < 1100


def test_renew_at_reads_the_certificate() -> None:
    ca = TestCA.create()
    minted = ca.mint("/w", not_before=T0, not_after=T0 + timedelta(hours=1))
    when = renew_at(minted.leaf)
    assert when == T0 + timedelta(hours=1) * rotation_fraction(minted.leaf.serial_number)
    assert T0 + timedelta(minutes=24) <= when < T0 + timedelta(minutes=36)


def test_states_over_an_svids_life() -> None:
    ca = TestCA.create()
    minted = ca.mint("/w", not_before=T0, not_after=T0 + timedelta(hours=1))
    when = renew_at(minted.leaf)
    assert certificate_state(None, T0) is SVIDState.MISSING
    assert certificate_state(minted.leaf, T0) is SVIDState.FRESH
    assert certificate_state(minted.leaf, when - timedelta(seconds=1)) is SVIDState.FRESH
    assert certificate_state(minted.leaf, when) is SVIDState.DUE
    assert certificate_state(minted.leaf, T0 + timedelta(minutes=59, seconds=59)) is SVIDState.DUE
    assert certificate_state(minted.leaf, T0 + timedelta(hours=1)) is SVIDState.MISSING  # expired = missing
    assert certificate_state(minted.leaf, T0 + timedelta(days=1)) is SVIDState.MISSING


def test_a_fraction_outside_the_lifetime_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match=r"rotation: fraction must be within \[0, 1\], got 1.5"):
        rotation_time(T0, T0 + timedelta(hours=1), 1.5)


@given(st.integers(min_value=0, max_value=200), st.integers(min_value=0, max_value=2**32 - 1))
def test_backoff_is_full_jitter_under_a_doubling_ceiling(attempt: int, seed: int) -> None:
    delay = backoff_delay(attempt, random.Random(seed))  # noqa: S311
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)
    assert 0.0 <= delay <= ceiling
    assert delay <= BACKOFF_CAP


def test_backoff_ceilings_double_from_half_a_second_to_ten() -> None:
    class Top(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return b

    rng = Top()
    assert [backoff_delay(n, rng) for n in range(9)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0, 10.0]
    assert backoff_delay(10_000, rng) == 10.0
    with pytest.raises(ValueError, match="rotation: attempt must be non-negative, got -1"):
        backoff_delay(-1, rng)


def test_backoff_counts_a_streak_and_resets() -> None:
    backoff = Backoff(rng=random.Random(7))  # noqa: S311
    streaks = [backoff.failing]
    delays = [backoff.next_delay() for _ in range(12)]
    streaks.append(backoff.failing)
    assert streaks == [False, True]
    assert backoff.attempts == 12
    assert all(0 <= d <= min(10.0, 0.5 * 2**n) for n, d in enumerate(delays))
    assert len(set(delays)) == 12  # jittered: no two retries of a fleet line up
    backoff.reset()
    assert (backoff.failing, backoff.attempts) == (False, 0)
    assert backoff.next_delay() <= 0.5


def test_seconds_until_is_never_negative() -> None:
    assert seconds_until(T0 + timedelta(seconds=3), T0) == 3.0
    assert seconds_until(T0, T0 + timedelta(seconds=3)) == 0.0
