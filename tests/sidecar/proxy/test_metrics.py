"""The proxy's metrics, scraped through a real status server, and the readiness helper."""

from __future__ import annotations

import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from sidecar.proxy.metrics import Direction, ProxyMetrics, Reason, readiness, reason_label
from spiffeops.status import StatusServer

REASONS = {
    "handshake_timeout",
    "no_client_cert",
    "untrusted",
    "expired",
    "not_allowed",
    "protocol_error",
    "other",
}


def _scrape(registry: CollectorRegistry, ready: tuple[bool, str] = (True, "ready")) -> tuple[str, str]:
    with StatusServer("127.0.0.1", 0, readiness=lambda: ready, registry=registry) as server:
        host, port = server.address
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
            content_type = response.headers["Content-Type"]
            return response.read().decode(), content_type


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


def test_exposition_after_events() -> None:
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry)
    expiry = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    metrics.identity_loaded(expiry - timedelta(hours=1))
    metrics.identity_rotated(expiry)
    for _ in range(3):
        metrics.connection_opened()
    metrics.connection_closed()
    metrics.handshake_ok()
    metrics.handshake_ok()
    metrics.handshake_failed("untrusted")
    metrics.handshake_failed(Reason.HANDSHAKE_TIMEOUT)
    metrics.rejected("not_allowed")
    metrics.add_bytes(Direction.TO_UPSTREAM, 1000)
    metrics.add_bytes(Direction.TO_DOWNSTREAM, 250)
    metrics.add_bytes(Direction.TO_DOWNSTREAM, 5)
    metrics.upstream_connect_failed()

    text, content_type = _scrape(registry)

    assert content_type.startswith("text/plain; version=")
    samples = _samples(text)
    assert samples[("spiffe_proxy_connections_accepted_total", ())] == 3
    assert samples[("spiffe_proxy_connections_active", ())] == 2
    assert samples[("spiffe_proxy_connections_closed_total", ())] == 1
    assert samples[("spiffe_proxy_handshakes_total", (("reason", ""), ("result", "ok")))] == 2
    assert samples[("spiffe_proxy_handshakes_total", (("reason", "untrusted"), ("result", "failed")))] == 1
    assert samples[("spiffe_proxy_handshakes_total", (("reason", "handshake_timeout"), ("result", "failed")))] == 1
    assert samples[("spiffe_proxy_handshakes_total", (("reason", "expired"), ("result", "failed")))] == 0
    # a failed handshake is a rejection too; not_allowed came after a successful handshake
    assert samples[("spiffe_proxy_rejections_total", (("reason", "untrusted"),))] == 1
    assert samples[("spiffe_proxy_rejections_total", (("reason", "handshake_timeout"),))] == 1
    assert samples[("spiffe_proxy_rejections_total", (("reason", "not_allowed"),))] == 1
    assert samples[("spiffe_proxy_rejections_total", (("reason", "other"),))] == 0
    assert samples[("spiffe_proxy_bytes_total", (("direction", "to_upstream"),))] == 1000
    assert samples[("spiffe_proxy_bytes_total", (("direction", "to_downstream"),))] == 255
    assert samples[("spiffe_proxy_upstream_connect_failures_total", ())] == 1
    assert samples[("spiffe_proxy_identity_rotations_total", ())] == 1
    assert samples[("spiffe_proxy_certificate_expiry_timestamp_seconds", ())] == expiry.timestamp() == 1893553445

    # Exact exposition lines a dashboard or alert would match on.
    for line in [
        "# HELP spiffe_proxy_connections_active Connections open now.",
        "# TYPE spiffe_proxy_connections_active gauge",
        "spiffe_proxy_connections_active 2.0",
        '# HELP spiffe_proxy_handshakes_total TLS handshakes by result: "ok", or "failed" with a reason.',
        "# TYPE spiffe_proxy_handshakes_total counter",
        'spiffe_proxy_handshakes_total{reason="",result="ok"} 2.0',
        'spiffe_proxy_handshakes_total{reason="untrusted",result="failed"} 1.0',
        "# HELP spiffe_proxy_rejections_total Connections closed without being forwarded, by reason.",
        'spiffe_proxy_rejections_total{reason="not_allowed"} 1.0',
        'spiffe_proxy_bytes_total{direction="to_upstream"} 1000.0',
        "# HELP spiffe_proxy_certificate_expiry_timestamp_seconds When the current X.509-SVID expires "
        "(its notAfter), in unix seconds; 0 before one is loaded.",
        "spiffe_proxy_certificate_expiry_timestamp_seconds 1.893553445e+09",
    ]:
        assert line in text.splitlines(), line


def test_every_series_exists_from_the_start_and_has_help() -> None:
    registry = CollectorRegistry()
    ProxyMetrics(registry)
    text, _ = _scrape(registry)
    families = {
        family.name: family
        for family in text_string_to_metric_families(text)
        if not family.name.endswith("_created")  # the text format shows creation times as families
    }
    assert set(families) == {
        "spiffe_proxy_connections_accepted",
        "spiffe_proxy_connections_active",
        "spiffe_proxy_connections_closed",
        "spiffe_proxy_handshakes",
        "spiffe_proxy_rejections",
        "spiffe_proxy_bytes",
        "spiffe_proxy_upstream_connect_failures",
        "spiffe_proxy_identity_rotations",
        "spiffe_proxy_certificate_expiry_timestamp_seconds",
        "spiffe_proxy_policy_reloads",
    }
    assert all(family.documentation for family in families.values())
    samples = _samples(text)
    assert all(value == 0 for value in samples.values())
    failed = {dict(labels)["reason"] for name, labels in samples if name == "spiffe_proxy_handshakes_total"}
    assert failed == REASONS | {""}


def test_registries_are_separate() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    ProxyMetrics(first).handshake_ok()
    ProxyMetrics(second)
    assert first.get_sample_value("spiffe_proxy_handshakes_total", {"result": "ok", "reason": ""}) == 1
    assert second.get_sample_value("spiffe_proxy_handshakes_total", {"result": "ok", "reason": ""}) == 0


def test_connection_context_manager_closes_on_error() -> None:
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry)

    def serve() -> None:
        with metrics.connection():
            assert registry.get_sample_value("spiffe_proxy_connections_active") == 1
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        serve()
    assert registry.get_sample_value("spiffe_proxy_connections_active") == 0
    assert registry.get_sample_value("spiffe_proxy_connections_closed_total") == 1


@pytest.mark.parametrize(
    ("reason", "label"),
    [
        ("handshake_timeout", Reason.HANDSHAKE_TIMEOUT),
        ("not_allowed", Reason.NOT_ALLOWED),
        (Reason.EXPIRED, Reason.EXPIRED),
        ("NOT_ALLOWED", Reason.OTHER),
        ("", Reason.OTHER),
        ("tlsv1 alert unknown ca", Reason.OTHER),
        ('x"}\n', Reason.OTHER),
    ],
)
def test_reason_label(reason: str, label: Reason) -> None:
    assert reason_label(reason) is label


@given(reasons=st.lists(st.text(max_size=30), max_size=30))
def test_labels_stay_bounded_whatever_the_peer_causes(reasons: list[str]) -> None:
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry)
    for reason in reasons:
        metrics.handshake_failed(reason)
        metrics.rejected(reason)
    seen = {
        sample.labels["reason"]
        for family in registry.collect()
        for sample in family.samples
        if "reason" in sample.labels
    }
    assert seen <= REASONS | {""}
    total = sum(
        registry.get_sample_value("spiffe_proxy_rejections_total", {"reason": reason}) or 0 for reason in REASONS
    )
    assert total == 2 * len(reasons)


def test_misuse_is_an_error() -> None:
    metrics = ProxyMetrics(CollectorRegistry())
    with pytest.raises(ValueError, match="'sideways' is not a valid Direction"):
        metrics.add_bytes("sideways", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^metrics: a byte count cannot be negative, got -1$"):
        metrics.add_bytes(Direction.TO_UPSTREAM, -1)
    with pytest.raises(
        ValueError, match=r"^metrics: a certificate expiry must be timezone-aware, got 2030-01-01T00:00:00$"
    ):
        metrics.identity_loaded(datetime(2030, 1, 1))


def test_expiry_of_another_timezone() -> None:
    registry = CollectorRegistry()
    ProxyMetrics(registry).identity_loaded(datetime(2030, 1, 1, 1, 0, tzinfo=timezone(timedelta(hours=1))))
    assert (
        registry.get_sample_value("spiffe_proxy_certificate_expiry_timestamp_seconds")
        == datetime(2030, 1, 1, tzinfo=UTC).timestamp()
    )


@pytest.mark.parametrize(
    ("identity_loaded", "upstream_reachable", "expected"),
    [
        (True, True, (True, "ready")),
        (False, True, (False, "not ready: no X.509-SVID loaded yet")),
        (True, False, (False, "not ready: the upstream is unreachable")),
        (False, False, (False, "not ready: no X.509-SVID loaded yet; the upstream is unreachable")),
    ],
)
def test_readiness(identity_loaded: bool, upstream_reachable: bool, expected: tuple[bool, str]) -> None:
    assert readiness(identity_loaded, upstream_reachable) == expected


@pytest.mark.parametrize(
    ("state", "code", "body"),
    [((True, True), 200, "ready\n"), ((False, True), 503, "not ready: no X.509-SVID loaded yet\n")],
)
def test_readiness_through_the_status_server(state: tuple[bool, bool], code: int, body: str) -> None:
    with StatusServer("127.0.0.1", 0, readiness=lambda: readiness(*state), registry=CollectorRegistry()) as server:
        host, port = server.address
        request = urllib.request.Request(f"http://{host}:{port}/readyz")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - a loopback http URL
                got = (response.status, response.read().decode())
        except urllib.error.HTTPError as err:
            with err:
                got = (err.code, err.read().decode())
    assert got == (code, body)
