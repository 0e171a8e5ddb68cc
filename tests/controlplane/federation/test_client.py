"""Fetching a foreign bundle: each profile's authentication, and every way an endpoint's answer is refused."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from controlplane.federation.client import BundleFetchError, FetchLimits, Target, fetch_bundle, web_context
from controlplane.federation.relationship import BundleEndpointProfile, FederationError, FederationRelationship
from spiffecore import SpiffeBundle, TrustDomain
from tests.controlplane.federation.support import ForeignDomain, RawHTTPS, key_pem, write_pem
from tests.support.ca import TestCA

OTHER = TrustDomain.parse("other.org")


def now() -> datetime:
    return datetime.now(UTC)


def test_targets_of_urls() -> None:
    assert Target.of("https://other.org/") == Target("other.org", 443, "/")
    assert Target.of("https://127.0.0.1:8443") == Target("127.0.0.1", 8443, "/")
    assert Target.of("https://[::1]:8443/b?x=1") == Target("::1", 8443, "/b?x=1")


async def test_an_https_spiffe_endpoint_must_present_the_configured_id() -> None:
    domain = ForeignDomain.create()
    domain.present(domain.ca.mint("/spire/other-server"))
    endpoint = await domain.start()
    try:
        with pytest.raises(BundleFetchError) as caught:
            await asyncio.to_thread(fetch_bundle, domain.relationship(), trusted=domain.bundle, now=now())
        assert str(caught.value) == (
            "federation: bundle endpoint presented spiffe://other.org/spire/other-server, not the endpoint SPIFFE ID "
            f'spiffe://other.org/spire/server: "{domain.url}"'
        )
        async with asyncio.timeout(5):
            while not domain.metrics.requests:
                await asyncio.sleep(0.01)
        assert domain.metrics.requests == ["disconnected"]  # refused before a request was sent
    finally:
        await endpoint.close()


async def test_an_https_spiffe_endpoint_is_verified_with_that_domains_bundle_only() -> None:
    domain = ForeignDomain.create()
    endpoint = await domain.start()
    try:
        stranger = TestCA.create("other.org").bundle()  # the same trust domain name, other roots
        with pytest.raises(BundleFetchError, match="bundle endpoint's certificate was refused"):
            await asyncio.to_thread(fetch_bundle, domain.relationship(), trusted=stranger, now=now())
        with pytest.raises(
            BundleFetchError, match=re.escape("no bundle of other.org is known to verify its https_spiffe")
        ):
            await asyncio.to_thread(fetch_bundle, domain.relationship(), trusted=None, now=now())
        # An SVID past its validity, judged at the time given, is refused by the SPIFFE verification.
        later = datetime(2100, 1, 1, tzinfo=UTC)
        with pytest.raises(BundleFetchError, match="bundle endpoint's X509-SVID was refused"):
            await asyncio.to_thread(fetch_bundle, domain.relationship(), trusted=domain.bundle, now=later)
    finally:
        await endpoint.close()


async def test_an_https_spiffe_endpoint_serving_with_a_plain_web_certificate_is_refused() -> None:
    domain = ForeignDomain.create()
    domain.present(domain.ca.mint(uris=[], dns_names=["other.org"]))
    endpoint = await domain.start()
    try:
        with pytest.raises(BundleFetchError, match="bundle endpoint's X509-SVID was refused"):
            await asyncio.to_thread(fetch_bundle, domain.relationship(), trusted=domain.bundle, now=now())
    finally:
        await endpoint.close()


def http(status: str, body: bytes, *headers: str) -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers, "Connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (http("500 Internal Server Error", b"oops"), "bundle endpoint answered HTTP 500"),
        (
            http("302 Found", b"", "Location: https://elsewhere/"),
            "bundle endpoint answered HTTP 302 (redirects are not followed)",
        ),
        (
            http("200 OK", b"<html>"),
            "bundle endpoint did not send a usable SPIFFE bundle (bundle: could not parse JSON",
        ),
        (
            http("200 OK", b'{"keys": []}'),
            "bundle endpoint did not send a usable SPIFFE bundle (federation: a federated bundle must hold X.509 "
            'authorities: "other.org")',
        ),
        (http("200 OK", b"x" * 2048), "bundle endpoint's answer is larger than 1024 bytes"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n"
            + b"x" * 1024
            + b"\r\n400\r\n"
            + b"x" * 1024,
            "bundle endpoint's answer is larger than 1024 bytes",
        ),
        (b"garbage\r\n\r\n", "could not read the bundle endpoint's answer (BadStatusLine"),
    ],
)
def test_bad_answers_are_refused(response: bytes, message: str) -> None:
    domain = ForeignDomain.create()
    assert domain.svid is not None
    with RawHTTPS(domain.svid.chain, key_pem(domain.svid), response) as peer:
        url = f"https://127.0.0.1:{peer.port}/"
        with pytest.raises(BundleFetchError) as caught:
            fetch_bundle(domain.relationship(url), trusted=domain.bundle, now=now(), limits=FetchLimits(max_bytes=1024))
    assert message in str(caught.value)
    assert str(caught.value).endswith(f'"{url}"')


def test_a_chunked_bundle_is_read_whole() -> None:
    domain = ForeignDomain.create()
    assert domain.svid is not None
    assert domain.bundle is not None
    body = domain.bundle.to_json()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:100], body[100:]))
    response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked + b"0\r\n\r\n"
    with RawHTTPS(domain.svid.chain, key_pem(domain.svid), response) as peer:
        fetched = fetch_bundle(domain.relationship(f"https://127.0.0.1:{peer.port}/"), trusted=domain.bundle, now=now())
    assert fetched == domain.bundle


def test_a_slow_endpoint_times_out_within_the_limit() -> None:
    domain = ForeignDomain.create()
    assert domain.svid is not None
    assert domain.bundle is not None
    with RawHTTPS(domain.svid.chain, key_pem(domain.svid), http("200 OK", domain.bundle.to_json()), delay=3) as peer:
        started = time.monotonic()
        with pytest.raises(BundleFetchError, match=r"could not read the bundle endpoint's answer \(timed out\)"):
            fetch_bundle(
                domain.relationship(f"https://127.0.0.1:{peer.port}/"),
                trusted=domain.bundle,
                now=now(),
                limits=FetchLimits(timeout=0.5),
            )
        assert time.monotonic() - started < 2


def test_nothing_listening_is_a_connect_error() -> None:
    domain = ForeignDomain.create()
    with pytest.raises(BundleFetchError, match=r"could not connect to the bundle endpoint \(ConnectionRefusedError"):
        fetch_bundle(domain.relationship("https://127.0.0.1:1/"), trusted=domain.bundle, now=now())


def web_relationship(port: int, host: str = "localhost") -> FederationRelationship:
    return FederationRelationship(
        trust_domain=OTHER, bundle_endpoint_url=f"https://{host}:{port}/", profile=BundleEndpointProfile.HTTPS_WEB
    )


def test_https_web_checks_the_chain_and_the_host_name(tmp_path: Path) -> None:
    web_ca = TestCA.create("web.example")
    served = TestCA.create("other.org").bundle()
    leaf = web_ca.mint(uris=[], dns_names=["localhost"])
    roots = write_pem(tmp_path / "roots.pem", [web_ca.cert])
    with RawHTTPS(leaf.chain, key_pem(leaf), http("200 OK", served.to_json())) as peer:
        fetched: SpiffeBundle = fetch_bundle(
            web_relationship(peer.port), trusted=None, now=now(), web=web_context(roots)
        )
        assert fetched == served
        # The system's roots alone do not know this CA.
        with pytest.raises(BundleFetchError, match=r"certificate was refused .*unable to get local issuer certificate"):
            fetch_bundle(web_relationship(peer.port), trusted=None, now=now())
        # The URL's host must be a name of the certificate.
        with pytest.raises(BundleFetchError, match=r"certificate was refused .*IP address mismatch"):
            fetch_bundle(web_relationship(peer.port, "127.0.0.1"), trusted=None, now=now(), web=web_context(roots))


def test_a_bad_extra_web_roots_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FederationError, match="could not load the extra web CA file"):
        web_context(tmp_path / "missing.pem")
