"""When the agent renews an SVID, and how long it waits before retrying. Pure: no I/O, no clock.

**Rotation.** An X.509-SVID (a workload's or the agent's own) is renewed at
``not_before + lifetime * f``, where ``f`` lies in ``[0.4, 0.6)``: half its life, give or take a
tenth of it, as SPIRE does, so that SVIDs signed together do not all come due together. ``f`` is
derived from the certificate's serial number (a hash of it, mapped onto the interval), so an SVID's
rotation time is fixed once it is issued: evaluating the schedule again, or after a restart of the
agent, gives the same answer, and the schedule needs no state. An SVID that has expired is
:attr:`SVIDState.MISSING`, exactly as if there were none.

**Backoff.** Retries against the control plane wait with "full jitter" exponential backoff:
attempt ``n`` (from 0) waits a uniform random time in ``[0, min(cap, base * 2**n)]``, with
``base`` 0.5 s and ``cap`` 10 s by default: the agent has one control plane to reach, and
after an outage rotation should resume within seconds (SPIRE's agent re-syncs every 5 s); full
jitter still spreads a fleet's reconnections. The random generator is passed in.
"""

from __future__ import annotations

import enum
import hashlib
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final

from cryptography import x509

ROTATION_LOW: Final = 0.4
"""The earliest rotation point, as a fraction of the lifetime (half minus a tenth)."""
ROTATION_HIGH: Final = 0.6
"""The latest rotation point, as a fraction of the lifetime (half plus a tenth); never reached."""
BACKOFF_BASE: Final = 0.5
BACKOFF_CAP: Final = 10.0

_HASH_SCALE: Final = float(1 << 64)


class SVIDState(enum.Enum):
    """Where an SVID stands on its schedule."""

    MISSING = "missing"
    """No SVID, or an expired one: a workload has nothing valid to use."""
    DUE = "due"
    """Valid, but past its rotation time: renew it."""
    FRESH = "fresh"
    """Valid and not yet due."""


def rotation_fraction(serial: int) -> float:
    """The point of its life in ``[0.4, 0.6)`` at which the SVID with this serial is renewed.

    Deterministic: a SHA-256 of the serial, mapped uniformly onto the interval. CA serials are
    random, so the fractions of a batch of SVIDs are spread evenly.
    """
    digest = hashlib.sha256(b"%x" % serial).digest()
    unit = int.from_bytes(digest[:8], "big") / _HASH_SCALE  # [0, 1)
    return ROTATION_LOW + (ROTATION_HIGH - ROTATION_LOW) * unit


def rotation_time(not_before: datetime, not_after: datetime, fraction: float) -> datetime:
    """``not_before + (not_after - not_before) * fraction``."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"rotation: fraction must be within [0, 1], got {fraction!r}")
    return not_before + (not_after - not_before) * fraction


def renew_at(certificate: x509.Certificate) -> datetime:
    """When the SVID whose leaf is ``certificate`` should be renewed (UTC)."""
    return rotation_time(
        certificate.not_valid_before_utc,
        certificate.not_valid_after_utc,
        rotation_fraction(certificate.serial_number),
    )


def state(*, renew_at: datetime, expires_at: datetime, now: datetime) -> SVIDState:
    """The state of an SVID due at ``renew_at`` and valid until ``expires_at``, at ``now``."""
    if now >= expires_at:
        return SVIDState.MISSING
    if now >= renew_at:
        return SVIDState.DUE
    return SVIDState.FRESH


def certificate_state(certificate: x509.Certificate | None, now: datetime) -> SVIDState:
    """The state of the SVID whose leaf is ``certificate`` (``None``: there is none)."""
    if certificate is None:
        return SVIDState.MISSING
    return state(renew_at=renew_at(certificate), expires_at=certificate.not_valid_after_utc, now=now)


def backoff_delay(attempt: int, rng: random.Random, *, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Seconds to wait before retry number ``attempt`` (from 0): uniform in ``[0, min(cap, base * 2**attempt)]``."""
    if attempt < 0:
        raise ValueError(f"rotation: attempt must be non-negative, got {attempt}")
    ceiling = cap if attempt >= 64 else min(cap, base * (1 << attempt))
    return rng.uniform(0.0, ceiling)


@dataclass(slots=True, kw_only=True)
class Backoff:
    """Consecutive failures of one activity and the delay before its next try.

    ``next_delay()`` after each failure, ``reset()`` after a success. ``failing`` tells whether a
    streak of failures is under way, so a caller can log the first failure of a streak and the
    recovery, not every retry.
    """

    rng: random.Random
    base: float = BACKOFF_BASE
    cap: float = BACKOFF_CAP
    attempts: int = field(default=0, init=False)

    @property
    def failing(self) -> bool:
        return self.attempts > 0

    def next_delay(self) -> float:
        delay = backoff_delay(self.attempts, self.rng, base=self.base, cap=self.cap)
        self.attempts += 1
        return delay

    def reset(self) -> None:
        self.attempts = 0


def seconds_until(when: datetime, now: datetime) -> float:
    """Seconds from ``now`` to ``when``, never negative."""
    return max(0.0, (when - now) / timedelta(seconds=1))
