"""When an authority is prepared and activated, and which SVID TTLs a CA TTL can honour. Pure.

SPIRE's rotation (``pkg/server/ca/manager``), for X.509 authorities and JWT keys alike:

- an authority of lifetime ``L`` ending at ``not_after`` has its successor **prepared** at
  ``not_after - min(L/2, 30 days)``; the successor goes into the trust bundle at once, so it
  reaches every verifier long before it signs anything;
- the successor is **activated** (starts signing) at ``not_after - min(L/6, 7 days)``.

An authority therefore signs only while at least ``min(L/6, 7 days)`` of its life is left, which
is the longest SVID TTL it can always give in full (:func:`max_svid_ttl`). SPIRE then caps longer
SVIDs at the authority's expiry and logs a warning; here such a configuration is an error at
start-up (:func:`check_ttls`), and signing beyond the authority's life is refused outright.

No I/O and no clock: every function takes the time. The caller runs :func:`next_action` until it
says :attr:`Action.NOTHING`, persisting each step; it does so before each signing and periodically.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from controlplane.ca.errors import CAConfigError

MAX_PREPARE_LEAD: Final = timedelta(days=30)
MAX_ACTIVATE_LEAD: Final = timedelta(days=7)
MIN_CA_TTL: Final = timedelta(minutes=1)


def require_aware(value: datetime, name: str = "now") -> None:
    """Times are compared across zones, so a naive datetime is a programming error."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, not {value!r}")


def format_duration(value: timedelta) -> str:
    """A duration as configuration files write it: ``24h``, ``1h30m``, ``5m``, ``0s``, ``-10s``, ``0.5s``."""
    seconds = value.total_seconds()
    if seconds != int(seconds):
        return f"{seconds}s"
    sign, total = ("-" if seconds < 0 else ""), abs(int(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "") + (f"{secs}s" if secs else "")
    return sign + (text or "0s")


@dataclass(frozen=True, slots=True, kw_only=True)
class Window:
    """The validity period of an authority (an X.509 CA certificate or a JWT signing key)."""

    not_before: datetime
    not_after: datetime

    def __post_init__(self) -> None:
        require_aware(self.not_before, "not_before")
        require_aware(self.not_after, "not_after")
        if self.not_after <= self.not_before:
            raise ValueError(f"not_after ({self.not_after}) must be later than not_before ({self.not_before})")

    @property
    def lifetime(self) -> timedelta:
        return self.not_after - self.not_before

    @property
    def prepare_at(self) -> datetime:
        """When this authority's successor is prepared (and published)."""
        return self.not_after - min(self.lifetime / 2, MAX_PREPARE_LEAD)

    @property
    def activate_at(self) -> datetime:
        """When this authority's successor takes over signing."""
        return self.not_after - min(self.lifetime / 6, MAX_ACTIVATE_LEAD)


def max_svid_ttl(ca_ttl: timedelta) -> timedelta:
    """The longest SVID TTL an authority of lifetime ``ca_ttl`` gives in full whenever it signs."""
    return min(ca_ttl / 6, MAX_ACTIVATE_LEAD)


def _ttl_problem(name: str, ttl: timedelta, ca_ttl: timedelta) -> str | None:
    if ttl <= timedelta(0) or ttl % timedelta(seconds=1):
        return f"{name} must be a positive whole number of seconds, not {format_duration(ttl)}"
    if ttl > MAX_ACTIVATE_LEAD:
        return (
            f"{name} {format_duration(ttl)} is too long for any ca_ttl: an authority signs only while more than"
            f" {format_duration(MAX_ACTIVATE_LEAD)} of its life is left; lower {name} to at most"
            f" {format_duration(MAX_ACTIVATE_LEAD)}"
        )
    limit = max_svid_ttl(ca_ttl)
    if ttl > limit:
        return (
            f"{name} {format_duration(ttl)} is too long for ca_ttl {format_duration(ca_ttl)}: an authority signs only"
            f" while more than a sixth of its life is left, so SVIDs get their full TTL only up to"
            f" {format_duration(limit)}; lower {name} to at most {format_duration(limit)}"
            f" or raise ca_ttl to at least {format_duration(ttl * 6)}"
        )
    return None


def check_ttls(
    *,
    ca_ttl: timedelta,
    x509_svid_ttl: timedelta,
    jwt_svid_ttl: timedelta,
    agent_svid_ttl: timedelta,
) -> None:
    """Raise :class:`CAConfigError` unless every SVID TTL can always be given in full.

    The message lists every problem, each naming the TTL, the CA TTL and what to change.
    """
    if ca_ttl < MIN_CA_TTL or ca_ttl % timedelta(seconds=1):
        raise CAConfigError(
            f"ca_ttl must be a whole number of seconds, at least {format_duration(MIN_CA_TTL)},"
            f" not {format_duration(ca_ttl)}"
        )
    problems = [
        problem
        for name, ttl in (
            ("x509_svid_ttl", x509_svid_ttl),
            ("jwt_svid_ttl", jwt_svid_ttl),
            ("agent_svid_ttl", agent_svid_ttl),
        )
        if (problem := _ttl_problem(name, ttl, ca_ttl)) is not None
    ]
    if problems:
        raise CAConfigError("; ".join(problems))


class Action(enum.Enum):
    """What the rotation of one kind of authority (X.509 or JWT) needs next."""

    NOTHING = "nothing"
    PREPARE = "prepare"
    """Create a new authority in the next slot (replacing a stale one there) and publish it."""
    ACTIVATE = "activate"
    """Make the next slot current: it signs from now on."""


def next_action(current: Window | None, next_: Window | None, now: datetime) -> Action:
    """The one step the two slots need at ``now``; call again after taking it until NOTHING.

    | current                 | next                        | action   |
    |-------------------------|-----------------------------|----------|
    | any                     | present, past its activate_at | PREPARE (too old to take over: replace it) |
    | none                    | none                        | PREPARE  |
    | none                    | present                     | ACTIVATE |
    | before its prepare_at   | none                        | NOTHING  |
    | at/after its prepare_at | none                        | PREPARE  |
    | before its activate_at  | present                     | NOTHING  |
    | at/after its activate_at| present                     | ACTIVATE |

    A freshly prepared authority is never stale, so the steps end after at most three.
    """
    require_aware(now)
    if next_ is not None and now >= next_.activate_at:
        return Action.PREPARE
    if current is None:
        return Action.PREPARE if next_ is None else Action.ACTIVATE
    if next_ is None:
        return Action.PREPARE if now >= current.prepare_at else Action.NOTHING
    return Action.ACTIVATE if now >= current.activate_at else Action.NOTHING


__all__ = [
    "MAX_ACTIVATE_LEAD",
    "MAX_PREPARE_LEAD",
    "MIN_CA_TTL",
    "Action",
    "Window",
    "check_ttls",
    "format_duration",
    "max_svid_ttl",
    "next_action",
    "require_aware",
]
