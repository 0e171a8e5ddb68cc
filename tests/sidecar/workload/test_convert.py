"""Parsing Workload API responses: malformed ones are clear errors, never raw exceptions."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from sidecar.workload import convert
from sidecar.workload.identities import X509Context
from spiffecore import TrustDomain
from spiffeproto import workload_pb2
from tests.support.ca import TestCA


@pytest.fixture
def ca() -> TestCA:
    return TestCA.create("example.org")


def svid_message(ca: TestCA, path: str = "/web", hint: str = "") -> workload_pb2.X509SVID:
    svid = ca.mint(path).svid(hint=hint)
    return workload_pb2.X509SVID(
        spiffe_id=str(svid.id),
        x509_svid=svid.cert_chain_der(),
        x509_svid_key=svid.private_key_der(),
        bundle=ca.x509_bundle().der(),
        hint=hint,
    )


def test_x509_context_round_trip(ca: TestCA) -> None:
    partner = TestCA.create("partner.org")
    context = X509Context(
        svids=(ca.mint("/a").svid(hint="a"), ca.mint("/b").svid(hint="b")),
        bundle=ca.x509_bundle(),
        federated={partner.trust_domain: partner.x509_bundle()},
    )
    response = convert.x509_svid_response(context)
    assert dict(response.federated_bundles) == {"spiffe://partner.org": partner.x509_bundle().der()}
    assert convert.x509_context_from_response(response) == context


def test_duplicate_hints_keep_the_first(ca: TestCA) -> None:
    response = workload_pb2.X509SVIDResponse(svids=[svid_message(ca, "/a", "h"), svid_message(ca, "/b", "h")])
    context = convert.x509_context_from_response(response)
    assert [str(s.id) for s in context.svids] == ["spiffe://example.org/a"]


def malformed(ca: TestCA, case: str) -> workload_pb2.X509SVIDResponse:
    good = svid_message(ca)
    other = svid_message(ca, "/other")
    if case == "no-svid":
        return workload_pb2.X509SVIDResponse()
    if case == "bad-chain":
        good.x509_svid = b"\x30\x03junk"
    elif case == "wrong-key":
        good.x509_svid_key = other.x509_svid_key
    elif case == "id-mismatch":
        good.spiffe_id = "spiffe://example.org/other"
    elif case == "bad-bundle":
        good.bundle = b"junk"
    elif case == "bad-federated-key":
        return workload_pb2.X509SVIDResponse(svids=[good], federated_bundles={"spiffe://Partner.org": good.bundle})
    return workload_pb2.X509SVIDResponse(svids=[good])


@pytest.mark.parametrize(
    ("case", "start"),
    [
        ("no-svid", "workloadapi: X.509-SVID response has no SVID"),
        ("bad-chain", "workloadapi: X.509-SVID 0 is malformed (x509svid: could not parse certificate chain as DER"),
        ("wrong-key", "workloadapi: X.509-SVID 0 is malformed (x509svid: private key does not match"),
        (
            "id-mismatch",
            "workloadapi: X.509-SVID 0: spiffe_id does not match the certificate (spiffe://example.org/web): "
            '"spiffe://example.org/other"',
        ),
        ("bad-bundle", "workloadapi: X.509-SVID 0: bundle is malformed (bundle: could not parse X.509 authorities"),
        ("bad-federated-key", "workloadapi: federated bundle key is not a trust domain ID (trust domain characters"),
    ],
)
def test_malformed_x509_responses(ca: TestCA, case: str, start: str) -> None:
    with pytest.raises(convert.MalformedResponseError) as caught:
        convert.x509_context_from_response(malformed(ca, case))
    assert str(caught.value).startswith(start)


def test_malformed_jwt_responses(ca: TestCA) -> None:
    td = "spiffe://example.org"
    with pytest.raises(convert.MalformedResponseError, match=r"^workloadapi: JWT bundle is malformed \(bundle: "):
        convert.jwt_bundles_from_response(workload_pb2.JWTBundlesResponse(bundles={td: b"{}"}))
    jwks = ca.bundle().jwt.jwks()
    with pytest.raises(convert.MalformedResponseError, match="duplicate JWT bundle for trust domain"):
        convert.jwt_bundles_from_response(workload_pb2.JWTBundlesResponse(bundles={td: jwks, "example.org": jwks}))
    now = datetime.now(UTC)
    with pytest.raises(convert.MalformedResponseError, match=r"^workloadapi: JWT-SVID response has no SVID$"):
        convert.jwt_svids_from_response(workload_pb2.JWTSVIDResponse(), ("a",), at=now)
    token = ca.mint_jwt("/web", audience="a", now=now)
    response = workload_pb2.JWTSVIDResponse(
        svids=[workload_pb2.JWTSVID(spiffe_id="spiffe://example.org/x", svid=token)]
    )
    with pytest.raises(convert.MalformedResponseError, match="spiffe_id does not match the token's subject"):
        convert.jwt_svids_from_response(response, ("a",), at=now)
    response = workload_pb2.JWTSVIDResponse(svids=[workload_pb2.JWTSVID(svid="not-a-token")])
    with pytest.raises(convert.MalformedResponseError, match=r"^workloadapi: JWT-SVID 0 is malformed \(jwtsvid: "):
        convert.jwt_svids_from_response(response, ("a",), at=now)


def test_bundle_keys_accept_trust_domain_ids_and_names(ca: TestCA) -> None:
    der = ca.x509_bundle().der()
    parsed = convert.x509_bundles_from_response(workload_pb2.X509BundlesResponse(bundles={"example.org": der}))
    assert dict(parsed) == {TrustDomain.parse("example.org"): ca.x509_bundle()}
