"""Workload API addresses: the Workload Endpoint rules, with exact messages."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.workload.endpoint import (
    DEFAULT_ADDRESS,
    Endpoint,
    EndpointError,
    grpc_target,
    parse_endpoint,
    resolve_endpoint,
)


@pytest.mark.parametrize(
    ("address", "target", "canonical"),
    [
        ("unix:///run/spiffe/api.sock", "unix:/run/spiffe/api.sock", "unix:///run/spiffe/api.sock"),
        ("unix:/run/spiffe/api.sock", "unix:/run/spiffe/api.sock", "unix:///run/spiffe/api.sock"),
        ("/run/spiffe/api.sock", "unix:/run/spiffe/api.sock", "unix:///run/spiffe/api.sock"),
        ("unix:////run/api.sock", "unix:/run/api.sock", "unix:///run/api.sock"),
        ("tcp://127.0.0.1:8000", "ipv4:127.0.0.1:8000", "tcp://127.0.0.1:8000"),
        ("tcp://[::1]:8000", "ipv6:[::1]:8000", "tcp://[::1]:8000"),
        ("tcp://[0:0::1]:65535", "ipv6:[::1]:65535", "tcp://[::1]:65535"),
    ],
)
def test_valid_addresses(address: str, target: str, canonical: str) -> None:
    endpoint = parse_endpoint(address)
    assert endpoint.target == target
    assert str(endpoint) == canonical
    assert parse_endpoint(str(endpoint)) == endpoint


@pytest.mark.parametrize(
    ("address", "rule"),
    [
        ("", "address must not be empty"),
        ("blah", "address must be a unix:// or tcp:// URI, or an absolute socket path"),
        ("relative/api.sock", "address must be a unix:// or tcp:// URI, or an absolute socket path"),
        ("http://127.0.0.1:80", "address must be a unix:// or tcp:// URI, or an absolute socket path"),
        ("unix://host/api.sock", "unix socket URI must not include an authority (want unix:///absolute/path)"),
        ("unix://user@/api.sock", "unix socket URI must not include an authority (want unix:///absolute/path)"),
        ("unix:", "unix socket URI must include a path"),
        ("unix://", "unix socket URI must include a path"),
        ("unix:api.sock", "unix socket path must be absolute"),
        ("unix:///api.sock?x=1", "unix socket URI must not include query values"),
        ("unix:///api.sock?", "unix socket URI must not include query values"),
        ("unix:///api.sock#frag", "unix socket URI must not include a fragment"),
        ("/api.sock#frag", "unix socket URI must not include a fragment"),
        ("unix:///my%20api.sock", "unix socket path must not include percent-encoded characters"),
        ("tcp:127.0.0.1:8000", "tcp socket URI must not be opaque (want tcp://IP:port)"),
        ("tcp://", "tcp socket URI must include a host"),
        ("tcp://user:pw@127.0.0.1:8000", "tcp socket URI must not include user info"),
        ("tcp://127.0.0.1:8000/foo", "tcp socket URI must not include a path"),
        ("tcp://127.0.0.1:8000/", "tcp socket URI must not include a path"),
        ("tcp://127.0.0.1:8000?x=1", "tcp socket URI must not include query values"),
        ("tcp://127.0.0.1:8000#x", "tcp socket URI must not include a fragment"),
        ("tcp://localhost:8000", "tcp socket URI host must be an IP address"),
        ("tcp://example.org:8000", "tcp socket URI host must be an IP address"),
        ("tcp://127.0.0.1", "tcp socket URI must include a port"),
        ("tcp://127.0.0.1:", "tcp socket URI must include a port"),
        ("tcp://127.0.0.1:http", "tcp socket URI port must be a number from 1 to 65535"),
        ("tcp://127.0.0.1:65536", "tcp socket URI port must be a number from 1 to 65535"),
        ("tcp://127.0.0.1:0", "tcp socket URI port must be a number from 1 to 65535"),
    ],
)
def test_invalid_addresses(address: str, rule: str) -> None:
    with pytest.raises(EndpointError) as caught:
        parse_endpoint(address)
    assert caught.value.rule == rule
    assert str(caught.value) == f'workload endpoint: {rule}: "{address}"'


def test_resolution_order() -> None:
    env = {"SPIFFE_ENDPOINT_SOCKET": "unix:///from/env.sock"}
    assert resolve_endpoint("/explicit.sock", environ=env) == Endpoint(scheme="unix", path="/explicit.sock")
    assert resolve_endpoint(environ=env) == Endpoint(scheme="unix", path="/from/env.sock")
    assert resolve_endpoint(environ={}) == parse_endpoint(DEFAULT_ADDRESS)
    assert resolve_endpoint(environ={"SPIFFE_ENDPOINT_SOCKET": ""}) == parse_endpoint(DEFAULT_ADDRESS)
    assert grpc_target(environ={}) == "unix:/tmp/spiffe-agent/public/api.sock"
    assert grpc_target("tcp://10.0.0.1:81", environ=env) == "ipv4:10.0.0.1:81"


def test_invalid_environment_value_names_the_variable() -> None:
    with pytest.raises(EndpointError) as caught:
        resolve_endpoint(environ={"SPIFFE_ENDPOINT_SOCKET": "tcp://localhost:1"})
    assert str(caught.value) == (
        'workload endpoint: tcp socket URI host must be an IP address (from SPIFFE_ENDPOINT_SOCKET): "tcp://localhost:1"'
    )


def test_explicit_empty_address_is_an_error() -> None:
    with pytest.raises(EndpointError, match="address must not be empty"):
        resolve_endpoint("", environ={"SPIFFE_ENDPOINT_SOCKET": "unix:///x.sock"})


SEGMENT = st.text(
    st.characters(codec="ascii", categories=("L", "N"), include_characters="._-"), min_size=1, max_size=12
)


@given(st.lists(SEGMENT, min_size=1, max_size=5))
def test_unix_paths_round_trip(segments: list[str]) -> None:
    path = "/" + "/".join(segments)
    for address in (path, f"unix:{path}", f"unix://{path}"):
        endpoint = parse_endpoint(address)
        assert endpoint == Endpoint(scheme="unix", path=path)
        assert parse_endpoint(str(endpoint)) == endpoint


@given(st.ip_addresses(), st.integers(min_value=1, max_value=65535))
def test_tcp_addresses_round_trip(ip: object, port: int) -> None:
    host = f"[{ip}]" if ":" in str(ip) else str(ip)
    endpoint = parse_endpoint(f"tcp://{host}:{port}")
    assert (endpoint.host, endpoint.port) == (str(ip), port)
    assert parse_endpoint(str(endpoint)) == endpoint
