"""The ``federation`` section of server.yaml: defaults, and each mistake named with its line."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from controlplane.config import ServerConfig
from spiffeops.config import ConfigError, parse_config


def parse(federation: str) -> ServerConfig:
    return parse_config(f"trust_domain: a.test\nfederation:\n{federation}", ServerConfig, source="server.yaml")


def test_defaults_fetch_every_few_minutes_and_serve_no_endpoint() -> None:
    section = parse_config("trust_domain: a.test\n", ServerConfig, source="server.yaml").federation
    assert section.bundle_endpoint is None
    assert (section.min_refresh_interval, section.max_refresh_interval) == (timedelta(minutes=1), timedelta(hours=1))
    assert section.fetch_timeout == timedelta(seconds=10)
    assert section.web_roots is None


def test_an_https_spiffe_endpoint_needs_only_an_address() -> None:
    endpoint = parse("  bundle_endpoint:\n    address: 0.0.0.0:8443\n").federation.bundle_endpoint
    assert endpoint is not None
    assert (endpoint.profile, endpoint.refresh_hint) == ("https_spiffe", timedelta(minutes=5))


def test_an_https_web_endpoint_takes_its_files() -> None:
    endpoint = parse(
        "  bundle_endpoint:\n    address: :8443\n    profile: https_web\n    cert: web.pem\n    key: web.key\n"
        "    refresh_hint: 1h\n"
    ).federation.bundle_endpoint
    assert endpoint is not None
    assert (endpoint.cert, endpoint.key, endpoint.refresh_hint) == (
        Path("web.pem"),
        Path("web.key"),
        timedelta(hours=1),
    )


@pytest.mark.parametrize(
    ("federation", "message"),
    [
        (
            "  bundle_endpoint:\n    address: 127.0.0.1:8443\n    profile: https_web\n",
            "server.yaml:4: federation.bundle_endpoint: the https_web profile needs cert and key",
        ),
        (
            "  bundle_endpoint:\n    address: 127.0.0.1:8443\n    cert: web.pem\n",
            "server.yaml:4: federation.bundle_endpoint: cert and key are for the https_web profile",
        ),
        (
            "  bundle_endpoint:\n    address: nonsense\n",
            "server.yaml:4: federation.bundle_endpoint: address must be HOST:PORT, [IPV6]:PORT or :PORT: 'nonsense'",
        ),
        (
            "  bundle_endpoint:\n    address: 127.0.0.1:8443\n    refresh_hint: 0s\n",
            "federation.bundle_endpoint: refresh_hint must be at least 1s",
        ),
        (
            "  bundle_endpoint:\n    address: 127.0.0.1:8443\n    profile: https_plain\n",
            'server.yaml:5: federation.bundle_endpoint.profile: expected one of "https_spiffe", "https_web", '
            'got string "https_plain"',
        ),
        ("  min_refresh_interval: 2h\n", "federation: min_refresh_interval must not exceed max_refresh_interval"),
        ("  min_refresh_interval: 0s\n", "federation: min_refresh_interval must be at least 1s"),
        ("  fetch_timeout: 1h\n", "federation: fetch_timeout must be from 1s to 5m"),
        ("  poll_interval: 1m\n", 'unknown key "poll_interval" in "federation"'),
    ],
)
def test_mistakes_are_named_with_their_line(federation: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(federation)
    assert message in str(caught.value)
