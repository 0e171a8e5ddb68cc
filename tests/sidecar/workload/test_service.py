"""The Workload API service over a real grpc.aio server on a unix socket, called with raw stubs."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from sidecar.agent.attestors.base import WorkloadAttestationError
from sidecar.workload import convert
from sidecar.workload.identities import X509Context
from sidecar.workload.service import FOREIGN_CLAIMS, X509ResponseCache
from spiffecore import JWTSVID, X509SVID, BundleSet, JWTSVIDError, TrustDomain, X509Bundle
from spiffeproto import workload_pb2, workload_pb2_grpc
from tests.sidecar.workload.conftest import PARTNER, Served
from tests.sidecar.workload.support import SELECTORS
from tests.support.ca import TestCA

HEADER = (("workload.spiffe.io", "true"),)
if TYPE_CHECKING:
    from spiffeproto.workload_pb2_grpc import SpiffeWorkloadAPIAsyncStub as Stub


@pytest.fixture
async def stub(served: Served) -> AsyncIterator[Stub]:
    async with grpc.aio.insecure_channel(f"unix:{served.socket}") as channel:
        yield workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)


async def first(call: grpc.aio.UnaryStreamCall[Any, Any]) -> Any:
    try:
        async for message in call:
            return message
    finally:
        call.cancel()
    raise AssertionError("stream ended without a message")


async def refusal(make_call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    """Run a unary call or read a stream's first message; the status it was refused with."""

    async def run() -> None:
        call = make_call()
        if isinstance(call, grpc.aio.UnaryStreamCall):
            await first(call)
        else:
            await call

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run()
    return caught.value.code(), caught.value.details() or ""


def calls(stub: Stub, metadata: tuple[tuple[str, str], ...] | None) -> dict[str, Callable[[], Any]]:
    """One well-formed call of each RPC with ``metadata``."""
    return {
        "FetchX509SVID": lambda: stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=metadata),
        "FetchX509Bundles": lambda: stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=metadata),
        "FetchJWTBundles": lambda: stub.FetchJWTBundles(workload_pb2.JWTBundlesRequest(), metadata=metadata),
        "FetchJWTSVID": lambda: stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["a"]), metadata=metadata),
        "ValidateJWTSVID": lambda: stub.ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(audience="a", svid="x.y.z"), metadata=metadata
        ),
    }


METHODS = ("FetchX509SVID", "FetchX509Bundles", "FetchJWTBundles", "FetchJWTSVID", "ValidateJWTSVID")


class Reader:
    """Reads a stream into a queue in the background."""

    def __init__(self, call: grpc.aio.UnaryStreamCall[Any, Any]) -> None:
        self.call = call
        self.queue: asyncio.Queue[Message] = asyncio.Queue()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.call:
            self.queue.put_nowait(message)

    async def next(self) -> Any:
        return await asyncio.wait_for(self.queue.get(), 10)

    async def close(self) -> None:
        self.call.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


# --- the security header and the caller ---------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        (None, 'security header "workload.spiffe.io: true" is missing from the request'),
        ((("workload.spiffe.io", "True"),), 'security header "workload.spiffe.io" must be "true", not "True"'),
        ((("workload.spiffe.io", "yes"),), 'security header "workload.spiffe.io" must be "true", not "yes"'),
        ((("workload.spiffe.io", ""),), 'security header "workload.spiffe.io" must be "true", not ""'),
        (
            (("workload.spiffe.io", "true"), ("workload.spiffe.io", "true")),
            'security header "workload.spiffe.io" must be sent once',
        ),
    ],
)
async def test_security_header_is_required(
    stub: Stub, served: Served, method: str, metadata: tuple[tuple[str, str], ...] | None, message: str
) -> None:
    assert await refusal(calls(stub, metadata)[method]) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    assert served.attestor.attested == []  # refused before any attestation work


@pytest.mark.parametrize("method", METHODS)
async def test_unknown_caller_is_unavailable(stub: Stub, served: Served, method: str) -> None:
    served.caller.caller = None
    code, message = await refusal(calls(stub, HEADER)[method])
    assert (code, message) == (grpc.StatusCode.UNAVAILABLE, "could not identify the calling process")


@pytest.mark.parametrize("method", METHODS)
async def test_failed_attestation_is_unavailable(stub: Stub, served: Served, method: str) -> None:
    served.attestor.error = WorkloadAttestationError("process exited during attestation", 4242)
    assert await refusal(calls(stub, HEADER)[method]) == (
        grpc.StatusCode.UNAVAILABLE,
        'could not attest the calling process (workload: process exited during attestation: "4242")',
    )


@pytest.mark.parametrize("method", METHODS)
async def test_caller_without_entry_is_denied(stub: Stub, served: Served, method: str) -> None:
    served.attestor.selectors = frozenset({"unix:uid:0"})
    assert await refusal(calls(stub, HEADER)[method]) == (grpc.StatusCode.PERMISSION_DENIED, "no identity issued")


async def test_refusals_are_logged_with_the_caller(
    stub: Stub, served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    served.attestor.selectors = frozenset({"unix:uid:0"})
    with caplog.at_level(logging.WARNING, logger="sidecar.workload.service"):
        await refusal(calls(stub, HEADER)["FetchX509SVID"])
    [record] = caplog.records
    assert record.getMessage() == "workload API call refused"
    assert record.__dict__["method"] == "FetchX509SVID"
    assert record.__dict__["code"] == "PERMISSION_DENIED"
    assert record.__dict__["reason"] == "no identity issued"
    assert (record.__dict__["caller_pid"], record.__dict__["caller_uid"]) == (4242, 1000)


# --- FetchX509SVID ---------------------------------------------------------------------------------------


async def test_fetch_x509_svid_sends_svids_and_bundles(
    stub: Stub, served: Served, ca: TestCA, partner_ca: TestCA
) -> None:
    response = await first(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER))
    web, ext = (entry.svid for entry in served.identities.entries)
    assert [s.spiffe_id for s in response.svids] == ["spiffe://example.org/web", "spiffe://example.org/web-ext"]
    assert [s.hint for s in response.svids] == ["internal", "external"]
    assert [s.x509_svid for s in response.svids] == [web.cert_chain_der(), ext.cert_chain_der()]
    assert [s.x509_svid_key for s in response.svids] == [web.private_key_der(), ext.private_key_der()]
    assert {s.bundle for s in response.svids} == {ca.x509_bundle().der()}
    assert dict(response.federated_bundles) == {"spiffe://partner.org": partner_ca.x509_bundle().der()}
    assert list(response.crl) == []


async def test_fetch_x509_svid_streams_changes_only(stub: Stub, served: Served) -> None:
    reader = Reader(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER))
    try:
        initial = await reader.next()
        served.identities.bump()  # a change elsewhere in the cache: nothing to send
        served.identities.bump()
        rotated = served.identities.rotate(0)
        update = await reader.next()
        assert update.svids[0].x509_svid == rotated.cert_chain_der()
        assert update.svids[1] == initial.svids[1]  # the full state again, not a delta
        assert dict(update.federated_bundles) == dict(initial.federated_bundles)
        served.identities.bump()
        new_partner = TestCA.create(PARTNER)
        served.identities.replace_federated(PARTNER, new_partner)
        update = await reader.next()
        assert dict(update.federated_bundles) == {"spiffe://partner.org": new_partner.x509_bundle().der()}
        assert reader.queue.empty()
        assert len(served.attestor.attested) == 1  # attested once, at the start of the stream
    finally:
        await reader.close()


async def test_fetch_x509_svid_waits_for_svids_still_being_signed(stub: Stub, served: Served) -> None:
    """An entry applies but its SVID is not signed yet: nothing is sent until it is."""
    served.identities.remove_entries()
    entry = served.identities.add_entry("/new", pending=True)
    reader = Reader(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER))
    try:
        await asyncio.sleep(0.2)
        assert reader.queue.empty()
        served.identities.issue(entry)
        response = await reader.next()
        assert [s.spiffe_id for s in response.svids] == ["spiffe://example.org/new"]
    finally:
        await reader.close()


async def test_stream_ends_with_permission_denied_when_identity_goes(stub: Stub, served: Served) -> None:
    call = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)
    messages = []

    async def read() -> None:
        async for message in call:
            messages.append(message)
            served.identities.remove_entries()

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read()
    assert len(messages) == 1
    assert (caught.value.code(), caught.value.details()) == (grpc.StatusCode.PERMISSION_DENIED, "no identity issued")


async def test_stream_handler_ends_when_client_goes(stub: Stub, served: Served) -> None:
    reader = Reader(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER))
    await reader.next()
    for _ in range(100):
        if served.identities.waiting == 1:
            break
        await asyncio.sleep(0.01)
    assert served.identities.waiting == 1
    await reader.close()
    for _ in range(200):
        if served.identities.waiting == 0:
            break
        await asyncio.sleep(0.01)
    assert served.identities.waiting == 0


# --- bundles ------------------------------------------------------------------------------------------------


async def test_fetch_x509_bundles_sends_own_and_federated(
    stub: Stub, served: Served, ca: TestCA, partner_ca: TestCA
) -> None:
    reader = Reader(stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=HEADER))
    try:
        response = await reader.next()
        assert dict(response.bundles) == {
            "spiffe://example.org": ca.x509_bundle().der(),
            "spiffe://partner.org": partner_ca.x509_bundle().der(),
        }
        served.identities.rotate(0)  # SVIDs change, bundles do not: nothing to send
        new_root = TestCA.create("example.org")
        served.identities.x509_bundle = new_root.x509_bundle()
        served.identities.bump()
        update = await reader.next()
        assert update.bundles["spiffe://example.org"] == new_root.x509_bundle().der()
        assert reader.queue.empty()
    finally:
        await reader.close()


async def test_fetch_jwt_bundles_sends_standard_jwks(
    stub: Stub, served: Served, ca: TestCA, partner_ca: TestCA
) -> None:
    response = await first(stub.FetchJWTBundles(workload_pb2.JWTBundlesRequest(), metadata=HEADER))
    assert set(response.bundles) == {"spiffe://example.org", "spiffe://partner.org"}
    for key, expected in (("spiffe://example.org", ca), ("spiffe://partner.org", partner_ca)):
        document = json.loads(response.bundles[key])
        assert set(document) == {"keys"}
        [jwk] = document["keys"]
        assert jwk["kid"] == expected.jwt_kid
        assert "use" not in jwk
        assert jwk["kty"] == "EC"


# --- FetchJWTSVID ---------------------------------------------------------------------------------------


async def test_fetch_jwt_svid_for_every_identity(stub: Stub, served: Served, ca: TestCA) -> None:
    response = await stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["db", "cache"]), metadata=HEADER)
    assert [s.spiffe_id for s in response.svids] == ["spiffe://example.org/web", "spiffe://example.org/web-ext"]
    assert [s.hint for s in response.svids] == ["internal", "external"]
    bundles = BundleSet.of(ca.bundle())
    for svid in response.svids:
        token = JWTSVID.parse_and_validate(svid.svid, bundles, ["db", "cache"], at=datetime.now(UTC))
        assert str(token.id) == svid.spiffe_id
    assert served.identities.jwt_requests == [(SELECTORS, ("db", "cache"), None)]


async def test_fetch_jwt_svid_for_one_identity(stub: Stub, served: Served) -> None:
    request = workload_pb2.JWTSVIDRequest(audience=["db"], spiffe_id="spiffe://example.org/web-ext")
    response = await stub.FetchJWTSVID(request, metadata=HEADER)
    assert [s.spiffe_id for s in response.svids] == ["spiffe://example.org/web-ext"]


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (workload_pb2.JWTSVIDRequest(), grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified"),
        (
            workload_pb2.JWTSVIDRequest(audience=["a", ""]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "audience must not contain an empty string",
        ),
        (
            workload_pb2.JWTSVIDRequest(audience=["a"], spiffe_id="spiffe://Example.org/web"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "spiffe_id is not a valid SPIFFE ID (trust domain characters are limited to lowercase letters, "
            'numbers, dots, dashes, and underscores): "spiffe://Example.org/web"',
        ),
        (
            workload_pb2.JWTSVIDRequest(audience=["a"], spiffe_id="spiffe://example.org/db"),
            grpc.StatusCode.PERMISSION_DENIED,
            'the caller has no identity "spiffe://example.org/db"',
        ),
    ],
)
async def test_fetch_jwt_svid_refusals(
    stub: Stub, served: Served, request_: workload_pb2.JWTSVIDRequest, code: grpc.StatusCode, message: str
) -> None:
    assert await refusal(lambda: stub.FetchJWTSVID(request_, metadata=HEADER)) == (code, message)


async def test_fetch_jwt_svid_signing_failure_is_unavailable(stub: Stub, served: Served) -> None:
    served.identities.jwt_error = JWTSVIDError("the server could not sign")
    request = workload_pb2.JWTSVIDRequest(audience=["a"])
    assert await refusal(lambda: stub.FetchJWTSVID(request, metadata=HEADER)) == (
        grpc.StatusCode.UNAVAILABLE,
        "could not fetch JWT-SVIDs (jwtsvid: the server could not sign)",
    )


# --- ValidateJWTSVID ---------------------------------------------------------------------------------------


async def validate(stub: Stub, token: str, audience: str) -> workload_pb2.ValidateJWTSVIDResponse:
    request = workload_pb2.ValidateJWTSVIDRequest(audience=audience, svid=token)
    response: workload_pb2.ValidateJWTSVIDResponse = await stub.ValidateJWTSVID(request, metadata=HEADER)
    return response


def claims(response: workload_pb2.ValidateJWTSVIDResponse) -> dict[str, Any]:
    return json_format.MessageToDict(response.claims)


async def test_validate_jwt_svid_of_own_trust_domain(stub: Stub, served: Served, ca: TestCA) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    token = ca.mint_jwt("/db", now=now, audience="web", claims={"x-team": "payments"})
    response = await validate(stub, token, "web")
    assert response.spiffe_id == "spiffe://example.org/db"
    assert claims(response) == {
        "sub": "spiffe://example.org/db",
        "aud": ["web"],  # a single-string aud comes back as a list
        "exp": float(int((now + timedelta(minutes=5)).timestamp())),
        "iat": float(int(now.timestamp())),
        "x-team": "payments",
    }


async def test_validate_jwt_svid_of_federated_trust_domain(stub: Stub, served: Served, partner_ca: TestCA) -> None:
    token = partner_ca.mint_jwt("/api", now=datetime.now(UTC), audience=["web"], claims={"x-team": "partners"})
    response = await validate(stub, token, "web")
    assert response.spiffe_id == "spiffe://partner.org/api"
    assert set(claims(response)) == set(FOREIGN_CLAIMS)


def expected_error(token: str, audience: str, *cas: TestCA) -> str:
    with pytest.raises(JWTSVIDError) as caught:
        JWTSVID.parse_and_validate(token, BundleSet.of(*(c.bundle() for c in cas)), audience, at=datetime.now(UTC))
    return str(caught.value)


@pytest.mark.parametrize("case", ["expired", "wrong-audience", "unknown-domain", "bad-signature"])
async def test_validate_jwt_svid_refuses_invalid_tokens(
    stub: Stub, served: Served, ca: TestCA, partner_ca: TestCA, case: str
) -> None:
    audience = "web"
    tokens = {
        "expired": ca.mint_jwt("/db", audience="web", now=datetime.now(UTC) - timedelta(hours=2)),
        "wrong-audience": ca.mint_jwt("/db", now=datetime.now(UTC), audience="other"),
        "unknown-domain": TestCA.create("stranger.org").mint_jwt("/x", now=datetime.now(UTC), audience="web"),
        "bad-signature": ca.mint_jwt("/db", now=datetime.now(UTC), audience="web", key=TestCA.create().jwt_key),
    }
    token = tokens[case]
    message = expected_error(token, audience, ca, partner_ca)
    assert message.startswith("jwtsvid: ")
    assert await refusal(lambda: validate(stub, token, audience)) == (grpc.StatusCode.INVALID_ARGUMENT, message)


async def test_validate_jwt_svid_uses_only_the_callers_bundles(stub: Stub, served: Served, partner_ca: TestCA) -> None:
    del served.identities.entries[1]  # the caller no longer federates with partner.org
    token = partner_ca.mint_jwt("/api", now=datetime.now(UTC), audience="web")
    assert await refusal(lambda: validate(stub, token, "web")) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        'jwtsvid: could not get JWT bundle (no JWT bundle for trust domain): "partner.org"',
    )


@pytest.mark.parametrize(
    ("audience", "svid", "message"),
    [("", "a.b.c", "audience must be specified"), ("web", "", "svid must be specified")],
)
async def test_validate_jwt_svid_requires_both_fields(
    stub: Stub, served: Served, audience: str, svid: str, message: str
) -> None:
    assert await refusal(lambda: validate(stub, svid, audience)) == (grpc.StatusCode.INVALID_ARGUMENT, message)


async def test_invalid_token_is_never_logged(
    stub: Stub, served: Served, ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    token = ca.mint_jwt("/db", now=datetime.now(UTC), audience="other")
    with caplog.at_level(logging.DEBUG):
        await refusal(lambda: validate(stub, token, "web"))
    assert caplog.records
    for record in caplog.records:
        assert token not in record.getMessage()
        assert all(token not in str(value) for value in record.__dict__.values())
        for part in token.split("."):
            assert all(part not in str(value) for value in record.__dict__.values())


# --- the built-response cache ------------------------------------------------------------------------


def _context(svids: tuple[X509SVID, ...], bundle: X509Bundle, **federated: X509Bundle) -> X509Context:
    return X509Context(svids=svids, bundle=bundle, federated={TrustDomain.parse(td): b for td, b in federated.items()})


def test_response_cache_builds_once_per_identity(ca: TestCA) -> None:
    responses = X509ResponseCache()
    svid, bundle = ca.mint("/web").svid(), ca.x509_bundle()
    first_response = responses.response(SELECTORS, _context((svid,), bundle))
    # A new context (as the provider makes on every call) of the same SVID and bundle objects.
    assert responses.response(SELECTORS, _context((svid,), bundle)) is first_response
    assert responses.built == 1
    assert first_response == convert.x509_svid_response(_context((svid,), bundle))


@pytest.mark.parametrize("change", ["svid", "relabelled", "bundle", "order", "fewer", "federated"])
def test_response_cache_rebuilds_when_any_part_is_another_object(ca: TestCA, change: str) -> None:
    partner = TestCA.create("partner.org").x509_bundle()
    web, db, bundle = ca.mint("/web").svid(), ca.mint("/db").svid(), ca.x509_bundle()
    responses = X509ResponseCache()
    responses.response(SELECTORS, _context((web, db), bundle, **{"partner.org": partner}))
    changed = {
        "svid": lambda: _context((ca.mint("/web").svid(), db), bundle, **{"partner.org": partner}),
        "relabelled": lambda: _context(
            (X509SVID.from_chain(web.cert_chain, web.private_key, hint="new"), db), bundle, **{"partner.org": partner}
        ),
        "bundle": lambda: _context((web, db), ca.x509_bundle(), **{"partner.org": partner}),
        "order": lambda: _context((db, web), bundle, **{"partner.org": partner}),
        "fewer": lambda: _context((web,), bundle, **{"partner.org": partner}),
        "federated": lambda: _context((web, db), bundle),
    }[change]()
    response = responses.response(SELECTORS, changed)
    assert responses.built == 2
    assert response == convert.x509_svid_response(changed)


def test_response_cache_is_keyed_by_selectors_and_bounded(ca: TestCA) -> None:
    responses = X509ResponseCache(max_size=2)
    context = _context((ca.mint("/web").svid(),), ca.x509_bundle())
    first_set, second_set, third_set = (frozenset({f"unix:uid:{uid}"}) for uid in (1, 2, 3))
    responses.response(first_set, context)
    responses.response(second_set, context)
    responses.response(first_set, context)  # used last: the second set is now the oldest
    responses.response(third_set, context)
    assert (len(responses), responses.built) == (2, 3)
    responses.response(first_set, context)
    assert responses.built == 3
    responses.response(second_set, context)
    assert responses.built == 4
    with pytest.raises(ValueError, match="max_size must be at least 1"):
        X509ResponseCache(max_size=0)


async def test_streams_of_one_identity_share_one_built_response(stub: Stub, served: Served) -> None:
    served.identities.add_entry("/web")
    messages = [await first(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)) for _ in range(3)]
    assert messages[0] == messages[1] == messages[2]
    rotated = served.identities.rotate(0)
    message = await first(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER))
    assert message.svids[0].x509_svid == rotated.cert_chain_der()
