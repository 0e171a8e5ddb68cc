"""Federation relationships: the rules of the URL, the profiles and the bundle given when creating."""

from __future__ import annotations

import re
from datetime import datetime

import pytest

from controlplane.federation.relationship import (
    BundleEndpointProfile,
    FederationError,
    FederationRelationship,
    check_url,
    parse_trust_domain,
    short_error,
)
from spiffecore import SpiffeID, TrustDomain
from tests.support.ca import TestCA

OWN = TrustDomain.parse("example.org")
OTHER = TrustDomain.parse("other.org")
ENDPOINT_ID = SpiffeID.parse("spiffe://other.org/spire/server")


def spiffe(**fields: object) -> FederationRelationship:
    values: dict[str, object] = {
        "trust_domain": OTHER,
        "bundle_endpoint_url": "https://other.org:8443/",
        "profile": BundleEndpointProfile.HTTPS_SPIFFE,
        "endpoint_spiffe_id": ENDPOINT_ID,
    }
    return FederationRelationship(**(values | fields))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "url",
    ["https://other.org/", "https://other.org", "https://127.0.0.1:8443/bundle?td=x", "https://[::1]:443/"],
)
def test_https_urls_with_a_host_are_accepted(url: str) -> None:
    check_url(url)


@pytest.mark.parametrize(
    ("url", "rule"),
    [
        ("http://other.org/", "bundle endpoint URL must use the https scheme"),
        ("other.org:8443", "bundle endpoint URL must use the https scheme"),
        ("https:///path", "bundle endpoint URL must name a host"),
        ("https://user:secret@other.org/", "bundle endpoint URL must not carry user information"),
        ("https://other.org/#top", "bundle endpoint URL must not have a fragment"),
        ("https://other.org:99999/", "bundle endpoint URL could not be parsed (Port out of range 0-65535)"),
        ("https://other.org:0/", "bundle endpoint URL port must be from 1 to 65535"),
        (
            "https://other.org/a b",
            "bundle endpoint URL must be printable ASCII without spaces, at most 2048 characters",
        ),
        (
            "https://bündle.org/",
            "bundle endpoint URL must be printable ASCII without spaces, at most 2048 characters",
        ),
    ],
)
def test_bad_urls_are_refused_naming_the_rule(url: str, rule: str) -> None:
    with pytest.raises(FederationError) as caught:
        check_url(url)
    assert caught.value.rule == rule
    assert caught.value.value == url


def test_https_spiffe_needs_an_endpoint_id_in_the_federated_domain() -> None:
    with pytest.raises(FederationError, match=re.escape('https_spiffe needs the endpoint SPIFFE ID: "other.org"')):
        spiffe(endpoint_spiffe_id=None)
    with pytest.raises(FederationError) as caught:
        spiffe(endpoint_spiffe_id=SpiffeID.parse("spiffe://third.org/spire/server"))
    assert str(caught.value) == (
        "federation: endpoint SPIFFE ID must be in the federated trust domain other.org "
        '(only self-serving bundle endpoints are supported): "spiffe://third.org/spire/server"'
    )


def test_https_web_takes_no_endpoint_id() -> None:
    with pytest.raises(FederationError, match="an endpoint SPIFFE ID is only for the https_spiffe profile"):
        spiffe(profile=BundleEndpointProfile.HTTPS_WEB)
    web = spiffe(profile=BundleEndpointProfile.HTTPS_WEB, endpoint_spiffe_id=None)
    web.check_for(OWN, None)  # an initial bundle is optional for https_web


def test_rules_that_need_the_own_trust_domain_and_the_bundle() -> None:
    with pytest.raises(FederationError, match=re.escape('a trust domain cannot federate with itself: "other.org"')):
        spiffe().check_for(OTHER, TestCA.create("other.org").bundle())
    with pytest.raises(FederationError, match="https_spiffe needs the federated trust domain's bundle"):
        spiffe().check_for(OWN, None)
    with pytest.raises(
        FederationError, match=re.escape("the bundle given is of third.org, not of the federated trust domain")
    ):
        spiffe().check_for(OWN, TestCA.create("third.org").bundle())
    empty = TestCA.create("other.org").bundle()
    with pytest.raises(FederationError, match=re.escape('a federated bundle must hold X.509 authorities: "other.org"')):
        spiffe().check_for(OWN, type(empty).create(OTHER))
    spiffe().check_for(OWN, TestCA.create("other.org").bundle())


def test_profiles_and_trust_domains_from_text() -> None:
    assert BundleEndpointProfile.parse("https_web") is BundleEndpointProfile.HTTPS_WEB
    with pytest.raises(FederationError, match='profile must be https_web or https_spiffe: "HTTPS_WEB"'):
        BundleEndpointProfile.parse("HTTPS_WEB")
    with pytest.raises(FederationError, match="--trust-domain is not a valid trust domain name"):
        parse_trust_domain("Other.org", what="--trust-domain")


def test_a_creation_time_must_carry_a_zone() -> None:
    with pytest.raises(FederationError, match="creation time must carry a time zone"):
        spiffe(created_at=datetime(2026, 1, 1))


def test_stored_errors_are_one_bounded_line() -> None:
    assert short_error("a\nb\t c") == "a b c"
    assert len(short_error("x" * 5000)) == 1024
