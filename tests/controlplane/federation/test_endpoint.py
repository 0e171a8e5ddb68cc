"""The bundle endpoint: GET / over TLS with the server's SVID (renewed) or web certificates (re-read); bad clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509

from controlplane.federation.client import fetch_bundle, web_context
from controlplane.federation.endpoint import (
    BundleDocument,
    BundleEndpoint,
    FileCredentials,
    respond,
)
from controlplane.federation.relationship import BundleEndpointProfile, FederationError, FederationRelationship
from spiffecore import SpiffeBundle
from tests.controlplane.federation.support import ForeignDomain, key_pem, write_pem
from tests.support.ca import TestCA


@pytest.mark.parametrize(
    ("head", "status", "result"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"200", "ok"),
        (b"GET /?probe=1 HTTP/1.0\r\n\r\n", b"200", "ok"),
        (b"GET /bundle HTTP/1.1\r\n\r\n", b"404", "not_found"),
        (b"POST / HTTP/1.1\r\n\r\n", b"405", "method_not_allowed"),
        (b"GET / HTTP/2.0\r\n\r\n", b"400", "bad_request"),
        (b"GET  / HTTP/1.1\r\n\r\n", b"400", "bad_request"),
        (b"\x16\x03\x01\x00\r\n\r\n", b"400", "bad_request"),
    ],
)
def test_requests_and_their_responses(head: bytes, status: bytes, result: str) -> None:
    response = respond(head, b'{"keys":[]}')
    assert response.data.startswith(b"HTTP/1.1 " + status)
    assert response.result == result


def test_a_bundle_is_served_as_json_and_head_gets_no_body() -> None:
    get = respond(b"GET / HTTP/1.1\r\n\r\n", b'{"keys":[]}')
    assert b"\r\nContent-Type: application/json\r\nContent-Length: 11\r\n" in get.data
    assert get.data.endswith(b'\r\n\r\n{"keys":[]}')
    head = respond(b"HEAD / HTTP/1.1\r\n\r\n", b'{"keys":[]}')
    assert head.data.endswith(b"Connection: close\r\n\r\n")
    assert b"Allow: GET, HEAD" in respond(b"PUT / HTTP/1.1\r\n\r\n", b"{}").data
    assert respond(b"GET / HTTP/1.1\r\n\r\n", None).data.startswith(b"HTTP/1.1 503")


def test_the_document_carries_the_refresh_hint_and_is_built_once_per_bundle() -> None:
    ca = TestCA.create("example.org")
    current = ca.bundle(sequence=4, refresh_hint=None)
    document = BundleDocument(lambda: current, refresh_hint=120)

    first = document()
    assert first is not None
    parsed = json.loads(first)
    assert (parsed["spiffe_sequence"], parsed["spiffe_refresh_hint"]) == (4, 120)
    assert {key["use"] for key in parsed["keys"]} == {"x509-svid", "jwt-svid"}
    assert document() is first
    current = ca.bundle(sequence=5)
    assert document() is not first


async def fetch(domain: ForeignDomain, trusted: SpiffeBundle | None = None) -> SpiffeBundle:
    return await asyncio.to_thread(
        fetch_bundle, domain.relationship(), trusted=trusted or domain.bundle, now=datetime.now(UTC)
    )


async def peer_leaf(port: int, *, server_hostname: str | None = None) -> x509.Certificate:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    _reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=server_hostname)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
    return x509.load_der_x509_certificate(der)


async def test_https_spiffe_serves_the_bundle_with_the_server_svid_and_follows_its_renewal() -> None:
    domain = ForeignDomain.create()
    endpoint = await domain.start()
    try:
        fetched = await fetch(domain)
        assert fetched.x509 == domain.ca.bundle().x509
        assert fetched.refresh_hint == 300
        assert fetched.sequence == 1

        renewed = domain.ca.mint("/spire/server")
        domain.present(renewed)
        # Without SNI (an IP address) and with it: every handshake takes the renewed SVID.
        assert await peer_leaf(endpoint.port) == renewed.leaf
        assert await peer_leaf(endpoint.port, server_hostname="bundle.other.org") == renewed.leaf
        assert (await fetch(domain)).x509 == fetched.x509

        domain.bundle = domain.ca.bundle(sequence=2)
        assert (await fetch(domain)).sequence == 2
        await asyncio.sleep(0.1)  # the handlers of the closed probes finish
        # The probes hung up after the handshake without a request.
        assert sorted(domain.metrics.requests) == ["disconnected", "disconnected", "ok", "ok", "ok"]
    finally:
        await endpoint.close()


async def test_https_web_serves_files_and_rereads_them_when_they_change(tmp_path: Path) -> None:
    ca = TestCA.create("web.example")
    first = ca.mint(uris=[], dns_names=["localhost"])
    cert, key = write_pem(tmp_path / "cert.pem", first.chain), tmp_path / "key.pem"
    key.write_bytes(key_pem(first))
    roots = write_pem(tmp_path / "roots.pem", [ca.cert])
    bundle = TestCA.create("example.org").bundle()
    endpoint = BundleEndpoint(
        host="127.0.0.1",
        port=0,
        credentials=FileCredentials(cert, key, check_interval=0.0),
        document=BundleDocument(lambda: bundle, refresh_hint=60),
    )
    await endpoint.start()
    try:
        relationship = FederationRelationship(
            trust_domain=bundle.trust_domain,
            bundle_endpoint_url=f"https://localhost:{endpoint.port}/",
            profile=BundleEndpointProfile.HTTPS_WEB,
        )
        web = web_context(roots)
        fetched = await asyncio.to_thread(fetch_bundle, relationship, trusted=None, now=datetime.now(UTC), web=web)
        assert fetched.x509 == bundle.x509
        assert await peer_leaf(endpoint.port) == first.leaf

        second = ca.mint(uris=[], dns_names=["localhost"])
        cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nhalf written")  # a bad pair is skipped...
        assert await peer_leaf(endpoint.port) == first.leaf
        write_pem(cert, second.chain)  # ... a good one is taken
        key.write_bytes(key_pem(second))
        assert await peer_leaf(endpoint.port) == second.leaf
    finally:
        await endpoint.close()


def test_web_credentials_that_cannot_load_stop_the_start(tmp_path: Path) -> None:
    with pytest.raises(FederationError, match="could not read the bundle endpoint's certificate or key"):
        FileCredentials(tmp_path / "missing.pem", tmp_path / "missing.key")
    ca = TestCA.create("web.example")
    cert = write_pem(tmp_path / "cert.pem", ca.mint(uris=[], dns_names=["localhost"]).chain)
    other_key = tmp_path / "key.pem"
    other_key.write_bytes(key_pem(ca.mint(uris=[], dns_names=["localhost"])))
    with pytest.raises(FederationError, match="could not load the bundle endpoint's certificate and key"):
        FileCredentials(cert, other_key)


async def raw_exchange(port: int, data: bytes, *, tls: bool = True, wait: float = 5.0) -> bytes:
    """Send ``data`` (over TLS or not) and read until the server closes."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context if tls else None)
    try:
        writer.write(data)
        async with asyncio.timeout(wait):
            return await reader.read()
    except (ConnectionError, ssl.SSLError):
        return b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


async def test_bad_clients_are_counted_and_do_not_stop_the_endpoint() -> None:
    domain = ForeignDomain.create()
    endpoint = await domain.start(timeout=0.5)
    try:
        assert await raw_exchange(endpoint.port, b"GET / HTTP/1.1\r\n\r\n", tls=False) == b""  # not TLS
        assert await raw_exchange(endpoint.port, b"", tls=True) == b""  # says nothing: timed out
        too_large = await raw_exchange(endpoint.port, b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 9000 + b"\r\n\r\n")
        assert too_large.startswith(b"HTTP/1.1 400 Bad Request")
        assert (await raw_exchange(endpoint.port, b"DELETE / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405")
        assert (await raw_exchange(endpoint.port, b"GET /x HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
        # A TCP connection that never starts TLS times out too.
        _, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
        await asyncio.sleep(0.8)
        writer.close()

        assert (await fetch(domain)).x509 == domain.ca.bundle().x509
        assert sorted(domain.metrics.requests) == sorted(
            ["tls_error", "timeout", "too_large", "method_not_allowed", "not_found", "tls_error", "ok"]
        )
    finally:
        await endpoint.close()


async def test_connections_beyond_the_limit_are_closed_at_once() -> None:
    domain = ForeignDomain.create()
    endpoint = await domain.start(timeout=2.0, max_connections=2)
    idle = [await asyncio.open_connection("127.0.0.1", endpoint.port) for _ in range(2)]
    try:
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
        async with asyncio.timeout(1):
            assert await reader.read() == b""
        writer.close()
        assert domain.metrics.requests == ["overloaded"]
    finally:
        for _, idle_writer in idle:
            idle_writer.close()
        await endpoint.close()
