"""The agent's client of the agent API, against a real spiffe-server process.

Also checks that the wire contracts this package duplicates (it may not import the control plane)
are byte-for-byte the control plane's, and that x509pop answers verify with the server's code.
"""

from __future__ import annotations

import pickle
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from controlplane.api.agent import ATTESTATION_CLIENT_CERT_PEM as SERVER_ATTESTATION_CERT
from controlplane.attest.x509pop import CHALLENGE_CONTEXT as SERVER_CHALLENGE_CONTEXT
from controlplane.attest.x509pop import fingerprint, verify_proof
from controlplane.model import SERVER_DNS_NAME as SERVER_SERVER_DNS_NAME
from sidecar.agent.serverapi import (
    ATTESTATION_CLIENT_CERT_PEM,
    ATTESTATION_CLIENT_KEY_PEM,
    CHALLENGE_CONTEXT,
    JOIN_TOKEN,
    SERVER_DNS_NAME,
    X509POP,
    AgentAPIClient,
    AgentIdentity,
    BundleUpdate,
    EntryDeltas,
    FederatedBundlesUpdate,
    ServerAPIError,
    SnapshotPage,
    attest,
    entry_from_proto,
    make_csr,
    x509pop_answerer,
    x509pop_payload,
)
from spiffecore import JWTSVID, BundleSet, SpiffeID, verify_x509_svid
from spiffeproto import agent_pb2, agent_pb2_grpc, types_pb2
from tests.support.ca import TestCA, new_key
from tests.support.server import ServerProcess

TD_ID = "spiffe://example.org"


async def join(server: ServerProcess, roots_pem: bytes, **options: object) -> AgentIdentity:
    token = await server.atoken()
    return await attest(
        server.address,
        roots_pem=roots_pem,
        attestation_type=JOIN_TOKEN,
        payload=token.encode(),
        **options,  # type: ignore[arg-type]
    )


# --- wire contracts -----------------------------------------------------------------------------


def test_wire_constants_are_the_control_planes() -> None:
    assert SERVER_DNS_NAME == SERVER_SERVER_DNS_NAME
    assert CHALLENGE_CONTEXT == SERVER_CHALLENGE_CONTEXT
    assert ATTESTATION_CLIENT_CERT_PEM == SERVER_ATTESTATION_CERT


def test_attestation_client_key_belongs_to_its_certificate() -> None:
    certificate = x509.load_pem_x509_certificate(ATTESTATION_CLIENT_CERT_PEM)
    key = serialization.load_pem_private_key(ATTESTATION_CLIENT_KEY_PEM, password=None)
    assert key.public_key() == certificate.public_key()
    assert certificate.not_valid_after_utc.year == 9999


@pytest.mark.parametrize("key_type", ["ec-p256", "ec-p384", "rsa-2048", "ed25519"])
def test_x509pop_answers_verify_with_the_servers_check(key_type: str) -> None:
    key = new_key(key_type)  # type: ignore[arg-type]
    nonce = b"\x01" * 32
    answer = x509pop_answerer(key)(nonce)
    assert verify_proof(key.public_key(), nonce, answer)
    assert not verify_proof(key.public_key(), b"\x02" * 32, answer)
    assert not verify_proof(new_key(key_type).public_key(), nonce, answer)  # type: ignore[arg-type]


def test_server_api_error_carries_code_and_message_and_survives_pickle() -> None:
    error = ServerAPIError(grpc.StatusCode.PERMISSION_DENIED, 'agent-api: agent is banned: "spiffe://td/x"')
    assert error.code is grpc.StatusCode.PERMISSION_DENIED
    assert error.message == 'agent-api: agent is banned: "spiffe://td/x"'
    assert str(error) == 'server-api: PERMISSION_DENIED: agent-api: agent is banned: "spiffe://td/x"'
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes
    assert (copy.code, copy.message, str(copy)) == (error.code, error.message, str(error))


def test_entry_converter_keeps_the_agents_fields() -> None:
    message = types_pb2.Entry(
        id="e1",
        spiffe_id=f"{TD_ID}/web",
        parent_id=f"{TD_ID}/node",
        selectors=[types_pb2.Selector(type="unix", value="uid:1000"), types_pb2.Selector(type="k8s", value="ns:a")],
        x509_svid_ttl=60,
        jwt_svid_ttl=30,
        dns_names=["web.example.org"],
        federates_with=["other.org"],
        hint="h",
        revision=7,
        admin=True,
    )
    entry = entry_from_proto(message)
    assert entry.spiffe_id == SpiffeID.parse(f"{TD_ID}/web")
    assert entry.parent_id == SpiffeID.parse(f"{TD_ID}/node")
    assert entry.selectors == ("unix:uid:1000", "k8s:ns:a")
    assert (entry.x509_svid_ttl, entry.jwt_svid_ttl, entry.hint, entry.revision) == (60, 30, "h", 7)
    assert entry.dns_names == ("web.example.org",)
    assert [td.name for td in entry.federates_with] == ["other.org"]


def test_a_malformed_entry_from_the_server_is_an_internal_error() -> None:
    with pytest.raises(ServerAPIError) as caught:
        entry_from_proto(types_pb2.Entry(id="e1", spiffe_id="spiffe://Bad/x", parent_id=f"{TD_ID}/node"))
    assert caught.value.code is grpc.StatusCode.INTERNAL
    assert caught.value.message.startswith("the server sent a malformed entry (spiffeid: ")


# --- attestation -------------------------------------------------------------------------------


async def test_join_token_attestation_returns_the_agent_svid_and_bundle(
    server: ServerProcess, roots_pem: bytes
) -> None:
    token = await server.atoken()
    identity = await attest(server.address, roots_pem=roots_pem, attestation_type=JOIN_TOKEN, payload=token.encode())
    assert str(identity.svid.id) == f"{TD_ID}/spire/agent/join_token/{token}"
    assert isinstance(identity.svid.private_key, ec.EllipticCurvePrivateKey)
    assert identity.svid.private_key.curve.name == "secp256r1"
    assert identity.can_reattest is False
    assert identity.bundle.trust_domain.name == "example.org"
    assert identity.roots_pem == roots_pem
    verify_x509_svid(identity.svid.cert_chain, identity.bundle, at=datetime.now(UTC))


async def test_attestation_uses_the_given_key(server: ServerProcess, roots_pem: bytes) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    identity = await join(server, roots_pem, key=key)
    assert identity.svid.private_key is key
    assert identity.svid.leaf.public_key() == key.public_key()


async def test_a_refused_token_raises_with_the_servers_status_and_message(
    server: ServerProcess, roots_pem: bytes
) -> None:
    with pytest.raises(ServerAPIError) as caught:
        await attest(server.address, roots_pem=roots_pem, attestation_type=JOIN_TOKEN, payload=b"x" * 32)
    assert caught.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.message == "attest: join token refused (join token is unknown or was already used)"


async def test_an_unknown_attestation_type_is_an_invalid_argument(server: ServerProcess, roots_pem: bytes) -> None:
    with pytest.raises(ServerAPIError) as caught:
        await attest(server.address, roots_pem=roots_pem, attestation_type="tpm", payload=b"")
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.message == (
        'entry: attestation type is unknown or not enabled (enabled: join_token, x509pop): "tpm"'
    )


async def test_a_server_outside_the_roots_is_not_trusted(server: ServerProcess) -> None:
    stranger = TestCA.create("example.org")
    with pytest.raises(ServerAPIError) as caught:
        await attest(
            server.address,
            roots_pem=stranger.x509_bundle().pem(),
            attestation_type=JOIN_TOKEN,
            payload=b"x" * 32,
            timeout=5,
        )
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE


async def test_x509pop_attestation_answers_the_challenge(
    server: ServerProcess, roots_pem: bytes, node_ca: TestCA
) -> None:
    node = node_ca.mint(uris=[], subject="node-1", key_type="ec-p384")
    identity = await attest(
        server.address,
        roots_pem=roots_pem,
        attestation_type=X509POP,
        payload=x509pop_payload(node.chain),
        answer_challenge=x509pop_answerer(node.key),
    )
    assert str(identity.svid.id) == f"{TD_ID}/spire/agent/x509pop/{fingerprint(node.leaf)}"
    assert identity.can_reattest is True


async def test_a_challenge_without_an_answerer_ends_attestation(
    server: ServerProcess, roots_pem: bytes, node_ca: TestCA
) -> None:
    node = node_ca.mint(uris=[], subject="node-2")
    with pytest.raises(ServerAPIError) as caught:
        await attest(server.address, roots_pem=roots_pem, attestation_type=X509POP, payload=x509pop_payload(node.chain))
    assert caught.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.message == "the server sent a x509pop challenge, and no answer_challenge was given"


# --- the authenticated calls ------------------------------------------------------------------


async def test_calls_need_the_client_to_be_open(server: ServerProcess, roots_pem: bytes) -> None:
    client = AgentAPIClient(await join(server, roots_pem), server.address)
    with pytest.raises(RuntimeError, match="AgentAPIClient is not open"):
        await client.get_bundle()


async def test_get_bundle_and_jwt_svid(server: ServerProcess, roots_pem: bytes) -> None:
    identity = await join(server, roots_pem)
    entry = await server.acli_json(
        "entry", "create", "--spiffe-id", f"{TD_ID}/jwt", "--parent-id", str(identity.svid.id), "--selector", "u:1"
    )
    async with AgentAPIClient(identity, server.address) as client:
        bundle = await client.get_bundle()
        assert bundle.x509 == identity.bundle.x509
        grant = await client.new_jwt_svid(entry["id"], ["service-a", "service-b"])
        assert str(grant.spiffe_id) == f"{TD_ID}/jwt"
        assert grant.expires_at > datetime.now(UTC)
        validated = JWTSVID.parse_and_validate(grant.token, BundleSet.of(bundle), "service-b", at=datetime.now(UTC))
        assert validated.id == grant.spiffe_id
        with pytest.raises(ServerAPIError) as caught:
            await client.new_jwt_svid(entry["id"], [])
        assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.message == "entry: a JWT-SVID needs 1 to 32 non-empty audiences"


async def test_batch_results_carry_the_svid_when_the_key_was_given(server: ServerProcess, roots_pem: bytes) -> None:
    identity = await join(server, roots_pem)
    entry = await server.acli_json(
        "entry", "create", "--spiffe-id", f"{TD_ID}/batch", "--parent-id", str(identity.svid.id), "--selector", "u:2"
    )
    key = new_key()
    csr = x509.load_der_x509_csr(make_csr(new_key()))
    async with AgentAPIClient(identity, server.address) as client:
        by_key, by_csr, by_der = await client.batch_new_x509_svid(
            [(entry["id"], key), (entry["id"], csr), (entry["id"], make_csr(new_key()))]
        )
    assert by_key.ok
    assert by_key.svid is not None
    assert by_key.svid.private_key is key
    assert str(by_key.svid.id) == f"{TD_ID}/batch"
    assert by_csr.ok
    assert by_csr.svid is None
    assert by_csr.cert_chain[0].public_key() == csr.public_key()
    assert by_der.ok
    assert by_der.svid is None
    assert len(by_der.cert_chain) >= 1


async def test_renew_switches_new_calls_to_the_new_svid(server: ServerProcess, roots_pem: bytes) -> None:
    identity = await join(server, roots_pem)
    async with AgentAPIClient(identity, server.address) as client:
        renewed = await client.renew()
        assert renewed.id == identity.svid.id
        assert renewed.leaf.serial_number != identity.svid.leaf.serial_number
        assert client.identity.svid is renewed
        await client.get_bundle()  # over the new channel, with the new SVID
    async with AgentAPIClient(identity, server.address) as stale:
        with pytest.raises(ServerAPIError) as caught:
            await stale.get_bundle()
    assert caught.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.message == f'agent-api: this agent SVID was superseded by a newer one: "{identity.svid.id}"'


async def test_a_watch_survives_renewal_and_the_old_channel_closes_after_it(
    server: ServerProcess, roots_pem: bytes
) -> None:
    identity = await join(server, roots_pem)
    async with AgentAPIClient(identity, server.address) as client:
        events = client.watch_entries()
        assert isinstance(await anext(events), BundleUpdate)
        assert await anext(events) == FederatedBundlesUpdate(bundles={})
        page = await anext(events)
        assert page == SnapshotPage(entries=(), last=True, revision=page.revision)  # type: ignore[union-attr]
        await client.renew()
        created = await server.acli_json(
            "entry", "create", "--spiffe-id", f"{TD_ID}/w", "--parent-id", str(identity.svid.id), "--selector", "u:3"
        )
        delta = await anext(events)
        assert isinstance(delta, EntryDeltas)
        assert [e.id for e in delta.upserted] == [created["id"]]
        await events.aclose()
        await client.get_bundle()


async def test_the_public_attestation_certificate_authenticates_nobody(server: ServerProcess, roots_pem: bytes) -> None:
    credentials = grpc.ssl_channel_credentials(roots_pem, ATTESTATION_CLIENT_KEY_PEM, ATTESTATION_CLIENT_CERT_PEM)
    options = [("grpc.ssl_target_name_override", SERVER_DNS_NAME)]
    async with grpc.aio.secure_channel(server.address, credentials, options=options) as channel:
        stub = agent_pb2_grpc.AgentAPIStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetBundle(agent_pb2.GetBundleRequest(), timeout=10)
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert (caught.value.details() or "").startswith(
        "agent-api: client certificate is not an X.509-SVID of this trust domain (x509svid: "
    )


async def test_an_agent_svid_from_another_ca_is_refused(server: ServerProcess, roots_pem: bytes) -> None:
    identity = await join(server, roots_pem)
    forger = TestCA.create("example.org")
    forged = forger.mint(str(identity.svid.id).removeprefix(TD_ID))
    fake = AgentIdentity(svid=forged.svid(), bundle=identity.bundle)
    async with AgentAPIClient(fake, server.address, timeout=10) as client:
        with pytest.raises(ServerAPIError) as caught:
            await client.get_bundle()
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE  # the handshake fails: no trusted root


def test_agent_identity_expiry_is_the_svids() -> None:
    ca = TestCA.create("example.org")
    minted = ca.mint("/spire/agent/join_token/abc", not_after=datetime.now(UTC) + timedelta(minutes=5))
    identity = AgentIdentity(svid=minted.svid(), bundle=ca.bundle())
    assert identity.svid.expires_at == minted.leaf.not_valid_after_utc
    assert identity.roots_pem == ca.x509_bundle().pem()
