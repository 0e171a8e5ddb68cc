"""The pure rotation schedule: prepare and activate times, the SVID TTL limit, the start-up TTL check.

The properties walk authorities through many lifetimes with arbitrary gaps between ticks (a
server down for days included) and check that whatever signs at any moment can give the maximum
TTL in full, and that each authority was published before it signs whenever the server ran.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.ca.errors import CAConfigError, CAError
from controlplane.ca.schedule import (
    MAX_ACTIVATE_LEAD,
    Action,
    Window,
    check_ttls,
    format_duration,
    max_svid_ttl,
    next_action,
)
from spiffecore import SpiffeError

H = timedelta(hours=1)
M = timedelta(minutes=1)
S = timedelta(seconds=1)
D = timedelta(days=1)
T0 = datetime(2030, 1, 1, tzinfo=UTC)
BACKDATE = timedelta(seconds=10)


def window(start: datetime, ttl: timedelta, *, backdate: timedelta = timedelta(0)) -> Window:
    return Window(not_before=start - backdate, not_after=start + ttl)


# --- Window -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lifetime", "prepare_lead", "activate_lead"),
    [
        (24 * H, 12 * H, 4 * H),
        (6 * H, 3 * H, 1 * H),
        (60 * D, 30 * D, 7 * D),  # prepare lead capped at 30 days
        (90 * D, 30 * D, 7 * D),
        (42 * D, 21 * D, 7 * D),  # activate lead just at its cap
        (36 * D, 18 * D, 6 * D),
    ],
)
def test_prepare_and_activate_times(lifetime: timedelta, prepare_lead: timedelta, activate_lead: timedelta) -> None:
    w = window(T0, lifetime)
    assert w.lifetime == lifetime
    assert w.prepare_at == T0 + lifetime - prepare_lead
    assert w.activate_at == T0 + lifetime - activate_lead


def test_window_of_a_24h_ca_prepares_at_12h_and_activates_at_20h() -> None:
    w = window(T0, 24 * H)
    assert (w.prepare_at, w.activate_at) == (T0 + 12 * H, T0 + 20 * H)


def test_window_rejects_naive_times_and_empty_periods() -> None:
    with pytest.raises(ValueError, match="not_before must be a timezone-aware datetime"):
        Window(not_before=datetime(2030, 1, 1), not_after=T0)
    with pytest.raises(ValueError, match="must be later than not_before"):
        Window(not_before=T0, not_after=T0)


# --- max_svid_ttl and check_ttls ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ca_ttl", "expected"),
    [(24 * H, 4 * H), (6 * H, 1 * H), (1 * M, 10 * S), (42 * D, 7 * D), (365 * D, 7 * D)],
)
def test_max_svid_ttl(ca_ttl: timedelta, expected: timedelta) -> None:
    assert max_svid_ttl(ca_ttl) == expected


def test_check_ttls_accepts_spires_defaults_and_the_limit_itself() -> None:
    check_ttls(ca_ttl=24 * H, x509_svid_ttl=1 * H, jwt_svid_ttl=5 * M, agent_svid_ttl=1 * H)
    check_ttls(ca_ttl=6 * H, x509_svid_ttl=1 * H, jwt_svid_ttl=1 * H, agent_svid_ttl=1 * H)
    check_ttls(ca_ttl=100 * D, x509_svid_ttl=7 * D, jwt_svid_ttl=5 * M, agent_svid_ttl=7 * D)


def _message(**ttls: timedelta) -> str:
    values = {"ca_ttl": 24 * H, "x509_svid_ttl": 1 * H, "jwt_svid_ttl": 5 * M, "agent_svid_ttl": 1 * H} | ttls
    with pytest.raises(CAConfigError) as info:
        check_ttls(**values)
    assert isinstance(info.value, CAError)
    assert isinstance(info.value, SpiffeError)
    return str(info.value)


@pytest.mark.parametrize(
    ("ttls", "message"),
    [
        (
            {"ca_ttl": 5 * H},
            "ca: x509_svid_ttl 1h is too long for ca_ttl 5h: an authority signs only while more than a sixth of its"
            " life is left, so SVIDs get their full TTL only up to 50m; lower x509_svid_ttl to at most 50m"
            " or raise ca_ttl to at least 6h; agent_svid_ttl 1h is too long for ca_ttl 5h: an authority signs only"
            " while more than a sixth of its life is left, so SVIDs get their full TTL only up to 50m;"
            " lower agent_svid_ttl to at most 50m or raise ca_ttl to at least 6h",
        ),
        (
            {"jwt_svid_ttl": 4 * H + S},
            "ca: jwt_svid_ttl 4h1s is too long for ca_ttl 24h: an authority signs only while more than a sixth"
            " of its life is left, so SVIDs get their full TTL only up to 4h; lower jwt_svid_ttl to at most 4h"
            " or raise ca_ttl to at least 24h6s",
        ),
        (
            {"ca_ttl": 365 * D, "agent_svid_ttl": 8 * D},
            "ca: agent_svid_ttl 192h is too long for any ca_ttl: an authority signs only while more than 168h of"
            " its life is left; lower agent_svid_ttl to at most 168h",
        ),
        ({"x509_svid_ttl": timedelta(0)}, "ca: x509_svid_ttl must be a positive whole number of seconds, not 0s"),
        ({"jwt_svid_ttl": -S}, "ca: jwt_svid_ttl must be a positive whole number of seconds, not -1s"),
        (
            {"agent_svid_ttl": timedelta(milliseconds=1500)},
            "ca: agent_svid_ttl must be a positive whole number of seconds, not 1.5s",
        ),
        ({"ca_ttl": 59 * S}, "ca: ca_ttl must be a whole number of seconds, at least 1m, not 59s"),
        (
            {"ca_ttl": H + timedelta(microseconds=1)},
            "ca: ca_ttl must be a whole number of seconds, at least 1m, not 3600.000001s",
        ),
    ],
)
def test_check_ttls_names_each_ttl_too_long_and_what_to_change(ttls: dict[str, timedelta], message: str) -> None:
    assert _message(**ttls) == message


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (24 * H, "24h"),
        (H + 30 * M, "1h30m"),
        (5 * M, "5m"),
        (90 * S, "1m30s"),
        (timedelta(0), "0s"),
        (-10 * S, "-10s"),
        (7 * D, "168h"),
        (timedelta(milliseconds=500), "0.5s"),
    ],
)
def test_format_duration(value: timedelta, text: str) -> None:
    assert format_duration(value) == text


# --- next_action ----------------------------------------------------------------------------------

CURRENT = window(T0, 24 * H)  # prepare at 12h, activate at 20h
NEXT = window(T0 + 12 * H, 24 * H)  # activate at 32h


@pytest.mark.parametrize(
    ("current", "next_", "at", "action"),
    [
        (None, None, T0, Action.PREPARE),
        (None, NEXT, T0 + 12 * H, Action.ACTIVATE),
        (CURRENT, None, T0, Action.NOTHING),
        (CURRENT, None, T0 + 12 * H - S, Action.NOTHING),
        (CURRENT, None, T0 + 12 * H, Action.PREPARE),
        (CURRENT, None, T0 + 30 * D, Action.PREPARE),  # expired long ago: rotate
        (CURRENT, NEXT, T0 + 12 * H, Action.NOTHING),
        (CURRENT, NEXT, T0 + 20 * H - S, Action.NOTHING),
        (CURRENT, NEXT, T0 + 20 * H, Action.ACTIVATE),
        (CURRENT, NEXT, T0 + 25 * H, Action.ACTIVATE),  # current expired, next still good
        (CURRENT, NEXT, T0 + 32 * H, Action.PREPARE),  # next too old to take over: replace it
        (None, NEXT, T0 + 40 * H, Action.PREPARE),
        (CURRENT, None, T0 - H, Action.NOTHING),  # clock behind the authority: nothing to do
    ],
)
def test_next_action_table(current: Window | None, next_: Window | None, at: datetime, action: Action) -> None:
    assert next_action(current, next_, at) is action


def test_next_action_rejects_a_naive_time() -> None:
    with pytest.raises(ValueError, match="now must be a timezone-aware datetime"):
        next_action(CURRENT, None, datetime(2030, 1, 1))


# --- properties -----------------------------------------------------------------------------------


class Rotator:
    """A model of the manager over windows only: the slots, and when each authority was prepared."""

    def __init__(self, ca_ttl: timedelta, backdate: timedelta) -> None:
        self.ca_ttl = ca_ttl
        self.backdate = backdate
        self.current: Window | None = None
        self.next: Window | None = None
        self.published: dict[Window, datetime] = {}
        self.steps: list[Action] = []

    def tick(self, now: datetime) -> None:
        for _ in range(4):
            action = next_action(self.current, self.next, now)
            self.steps.append(action)
            if action is Action.NOTHING:
                return
            if action is Action.PREPARE:
                self.next = window(now, self.ca_ttl, backdate=self.backdate)
                self.published[self.next] = now
            else:
                self.current, self.next = self.next, None
        raise AssertionError("the schedule did not settle in 4 steps")


ca_ttls = st.integers(min_value=60, max_value=90 * 24 * 3600).map(lambda s: timedelta(seconds=s))
gaps = st.lists(
    st.one_of(
        st.integers(min_value=0, max_value=600),  # a healthy server ticking
        st.integers(min_value=0, max_value=100 * 24 * 3600),  # down for up to 100 days
    ).map(lambda s: timedelta(seconds=s)),
    min_size=1,
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ca_ttl=ca_ttls, gaps=gaps, backdate=st.sampled_from([timedelta(0), BACKDATE]))
def test_whatever_signs_after_a_tick_gives_the_max_ttl_in_full(
    ca_ttl: timedelta, gaps: list[timedelta], backdate: timedelta
) -> None:
    rotator = Rotator(ca_ttl, backdate)
    now = T0
    for gap in gaps:
        now += gap
        rotator.tick(now)
        current = rotator.current
        assert current is not None
        assert current.not_before <= now
        assert now + max_svid_ttl(ca_ttl) <= current.not_after  # never capped
        assert now < current.activate_at  # and it is not overdue for replacement


@settings(max_examples=200, deadline=None)
@given(ca_ttl=ca_ttls, start=st.integers(min_value=0, max_value=10**6), ticks=st.integers(min_value=2, max_value=40))
def test_with_regular_ticks_an_authority_is_published_a_third_of_a_lifetime_before_it_signs(
    ca_ttl: timedelta, start: int, ticks: int
) -> None:
    """Prepared at half-life, activated at 5/6: a third of a lifetime (at most 23 days) in the bundle first."""
    rotator = Rotator(ca_ttl, timedelta(0))
    interval = ca_ttl / 97  # ticks far more often than anything happens, at no special phase
    now = T0 + timedelta(seconds=start)
    rotator.tick(now)
    first = rotator.current
    lead = min(ca_ttl / 2, timedelta(days=30)) - min(ca_ttl / 6, MAX_ACTIVATE_LEAD)
    for _ in range(ticks * 97 // 2):
        now += interval
        rotator.tick(now)
        current = rotator.current
        assert current is not None
        if current is not first:
            assert now - rotator.published[current] >= lead - interval
        assert rotator.steps.count(Action.ACTIVATE) <= rotator.steps.count(Action.PREPARE)
