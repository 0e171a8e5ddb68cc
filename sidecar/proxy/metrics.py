"""The proxy's Prometheus metrics, on a registry the caller owns (never the process-wide default).

Every label value comes from a fixed set: a reason the proxy does not know is counted as
``other``, so no peer can create new time series by failing in a new way. The series:

* ``spiffe_proxy_connections_accepted_total`` (counter): connections accepted;
* ``spiffe_proxy_connections_active`` (gauge): connections open now;
* ``spiffe_proxy_connections_closed_total`` (counter): connections closed, for any reason;
* ``spiffe_proxy_handshakes_total{result, reason}`` (counter): ``result="ok"`` (with ``reason=""``)
  or ``result="failed"`` with a reason;
* ``spiffe_proxy_rejections_total{reason}`` (counter): connections closed without forwarding;
* ``spiffe_proxy_bytes_total{direction}`` (counter): ``to_upstream`` or ``to_downstream``;
* ``spiffe_proxy_upstream_connect_failures_total`` (counter): failed connects to the upstream;
* ``spiffe_proxy_identity_rotations_total`` (counter): X.509-SVIDs that replaced the current one;
* ``spiffe_proxy_certificate_expiry_timestamp_seconds`` (gauge): the current SVID's notAfter;
* ``spiffe_proxy_policy_reloads_total{result}`` (counter): policy file reloads, ``ok`` or ``error``
  (a bad file, which left the policy as it was).

With ``--workers N`` every worker counts its own events and the parent's ``/metrics`` adds them
up (prometheus-client's multiprocess mode, :mod:`sidecar.proxy.workers`): counters are summed,
``connections_active`` is the sum over the live workers and the expiry the soonest among them;
a policy reload is counted once per worker, since each worker reads the file.

Reasons: ``handshake_timeout``, ``no_client_cert``, ``untrusted``, ``expired``, ``not_allowed``,
``protocol_error``, ``other``. An empty label value is the same as no label in PromQL, so
``spiffe_proxy_handshakes_total{result="ok"}`` selects the successes.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["Direction", "ProxyMetrics", "Reason", "readiness", "reason_label"]


class Reason(enum.StrEnum):
    """Why a handshake failed or a connection was rejected: the only values of ``reason``."""

    HANDSHAKE_TIMEOUT = "handshake_timeout"
    NO_CLIENT_CERT = "no_client_cert"
    UNTRUSTED = "untrusted"
    EXPIRED = "expired"
    NOT_ALLOWED = "not_allowed"
    PROTOCOL_ERROR = "protocol_error"
    OTHER = "other"


class Direction(enum.StrEnum):
    """Which way bytes went: the only values of ``direction``."""

    TO_UPSTREAM = "to_upstream"
    TO_DOWNSTREAM = "to_downstream"


_REASONS: Final = frozenset(Reason)


def reason_label(reason: str) -> Reason:
    """``reason`` as a :class:`Reason`; anything outside the fixed set is :attr:`Reason.OTHER`."""
    return Reason(reason) if reason in _REASONS else Reason.OTHER


class ProxyMetrics:
    """The proxy's metrics, registered on ``registry`` when built. Safe to call from any thread.

    The relay should add bytes in batches (per read, or per connection at its end), not per byte.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._accepted = Counter(
            "spiffe_proxy_connections_accepted", "Connections accepted by the proxy's listener.", registry=registry
        )
        self._active = Gauge(
            "spiffe_proxy_connections_active", "Connections open now.", registry=registry, multiprocess_mode="livesum"
        )
        self._closed = Counter(
            "spiffe_proxy_connections_closed", "Connections closed, whatever the reason.", registry=registry
        )
        handshakes = Counter(
            "spiffe_proxy_handshakes",
            'TLS handshakes by result: "ok", or "failed" with a reason.',
            ["result", "reason"],
            registry=registry,
        )
        rejections = Counter(
            "spiffe_proxy_rejections",
            "Connections closed without being forwarded, by reason.",
            ["reason"],
            registry=registry,
        )
        transferred = Counter("spiffe_proxy_bytes", "Bytes relayed, by direction.", ["direction"], registry=registry)
        self._upstream_failures = Counter(
            "spiffe_proxy_upstream_connect_failures",
            "Connections to the upstream that failed or timed out.",
            registry=registry,
        )
        self._rotations = Counter(
            "spiffe_proxy_identity_rotations",
            "Times a new X.509-SVID replaced the current one.",
            registry=registry,
        )
        self._expiry = Gauge(
            "spiffe_proxy_certificate_expiry_timestamp_seconds",
            "When the current X.509-SVID expires (its notAfter), in unix seconds; 0 before one is loaded.",
            registry=registry,
            multiprocess_mode="livemin",
        )
        policy_reloads = Counter(
            "spiffe_proxy_policy_reloads",
            'Reloads of the policy file: "ok", or "error" (the policy in force stayed).',
            ["result"],
            registry=registry,
        )
        # Every child is made now, so each series shows (at 0) from the first scrape and the hot
        # path is a dict lookup, never a label check.
        self._handshake_ok = handshakes.labels("ok", "")
        self._handshake_failed = {reason: handshakes.labels("failed", reason.value) for reason in Reason}
        self._rejections = {reason: rejections.labels(reason.value) for reason in Reason}
        self._bytes = {direction: transferred.labels(direction.value) for direction in Direction}
        self._policy_reloads = {ok: policy_reloads.labels("ok" if ok else "error") for ok in (True, False)}

    def connection_opened(self) -> None:
        self._accepted.inc()
        self._active.inc()

    def connection_closed(self) -> None:
        self._active.dec()
        self._closed.inc()

    @contextmanager
    def connection(self) -> Iterator[None]:
        """Count a connection as open for the duration of the ``with`` block."""
        self.connection_opened()
        try:
            yield
        finally:
            self.connection_closed()

    def handshake_ok(self) -> None:
        self._handshake_ok.inc()

    def handshake_failed(self, reason: str) -> None:
        """A failed handshake, which also rejects the connection: counts both."""
        label = reason_label(reason)
        self._handshake_failed[label].inc()
        self._rejections[label].inc()

    def rejected(self, reason: str) -> None:
        """A connection closed without forwarding after its handshake succeeded (such as an ID the
        policy does not allow, checked after the handshake). Do not call it after
        :meth:`handshake_failed`, which counts the rejection already."""
        self._rejections[reason_label(reason)].inc()

    def add_bytes(self, direction: Direction, count: int) -> None:
        if count < 0:
            raise ValueError(f"metrics: a byte count cannot be negative, got {count}")
        self._bytes[Direction(direction)].inc(count)

    def upstream_connect_failed(self) -> None:
        self._upstream_failures.inc()

    def identity_loaded(self, not_after: datetime) -> None:
        """The first X.509-SVID: record its expiry, count no rotation."""
        self._expiry.set(_unix_seconds(not_after))

    def identity_rotated(self, not_after: datetime) -> None:
        """A new X.509-SVID replaced the current one."""
        expiry = _unix_seconds(not_after)
        self._rotations.inc()
        self._expiry.set(expiry)

    def policy_reloaded(self, *, ok: bool) -> None:
        """The policy file was read again: ``ok``, or refused (the policy in force stayed)."""
        self._policy_reloads[ok].inc()


def _unix_seconds(moment: datetime) -> float:
    if moment.tzinfo is None:
        # A naive datetime would be read as local time: an hours-wrong expiry on most hosts.
        raise ValueError(f"metrics: a certificate expiry must be timezone-aware, got {moment.isoformat()}")
    return moment.timestamp()


def readiness(identity_loaded: bool, upstream_reachable: bool) -> tuple[bool, str]:
    """The answer of ``/readyz``: ready when an identity is loaded and the upstream answers."""
    problems = []
    if not identity_loaded:
        problems.append("no X.509-SVID loaded yet")
    if not upstream_reachable:
        problems.append("the upstream is unreachable")
    if problems:
        return False, "not ready: " + "; ".join(problems)
    return True, "ready"
