"""TLS contexts and post-handshake SPIFFE verification, over real TLS handshakes on socket pairs."""

from __future__ import annotations

import base64
import socket
import ssl
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from spiffecore import (
    X509SVID,
    AuthorizationError,
    AuthorizeAny,
    AuthorizeID,
    Authorizer,
    BundleSet,
    SpiffeBundle,
    SpiffeID,
    TLSConfigError,
    TrustDomain,
    VerificationCache,
    VerificationError,
    VerifiedX509SVID,
)
from spiffecore.tls import client_context, peer_chain, private_pem_file, server_context, verify_peer
from tests.support.ca import NOW, TestCA

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA.create("example.org")


@pytest.fixture(scope="module")
def other() -> TestCA:
    return TestCA.create("other.org")


@pytest.fixture(scope="module")
def bundles(ca: TestCA, other: TestCA) -> BundleSet:
    return BundleSet.of(ca.bundle(), other.bundle())


@dataclass
class Outcome:
    """What each side of a handshake saw: the verified peer, or the error it raised."""

    server: VerifiedX509SVID | BaseException | None = None
    client: VerifiedX509SVID | BaseException | None = None
    server_chain: tuple[object, ...] = field(default_factory=tuple)
    client_version: str | None = None
    client_cipher: tuple[str, str, int] | None = None
    client_session: ssl.SSLSession | None = None
    server_reused: bool | None = None
    client_reused: bool | None = None
    echoed: bool = False


def handshake(
    server: ssl.SSLContext,
    client: ssl.SSLContext,
    bundles: BundleSet,
    *,
    server_authorizer: Authorizer | None = None,
    client_authorizer: Authorizer | None = None,
    server_cache: VerificationCache | None = None,
    client_session: ssl.SSLSession | None = None,
) -> Outcome:
    """Run a real handshake over a socket pair, then each side's SPIFFE check, and exchange a byte.

    ``client_session`` offers the session of an earlier connection for resumption.
    """
    outcome = Outcome()
    left, right = socket.socketpair()
    left.settimeout(TIMEOUT)
    right.settimeout(TIMEOUT)

    def serve() -> None:
        try:
            with server.wrap_socket(left, server_side=True) as tls:
                outcome.server_reused = tls.session_reused
                authorizer = server_authorizer or AuthorizeAny()
                outcome.server = verify_peer(tls, bundles, authorizer, at=NOW, cache=server_cache)
                outcome.server_chain = peer_chain(tls)
                tls.sendall(tls.recv(1))
        except (ssl.SSLError, OSError, VerificationError, AuthorizationError) as err:
            outcome.server = err
            left.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client.wrap_socket(right, session=client_session) as tls:
            outcome.client_version = tls.version()
            outcome.client_cipher = tls.cipher()
            outcome.client_reused = tls.session_reused
            outcome.client = verify_peer(tls, bundles, client_authorizer or AuthorizeAny(), at=NOW)
            tls.sendall(b"x")
            outcome.echoed = tls.recv(1) == b"x"
            outcome.client_session = tls.session  # after reading: TLS 1.3 tickets arrive after the handshake
    except (ssl.SSLError, OSError, VerificationError, AuthorizationError) as err:
        outcome.client = err
        right.close()
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    return outcome


def test_mutual_tls_between_two_svids(ca: TestCA, bundles: BundleSet) -> None:
    server_svid = ca.intermediate().mint("/server").svid()
    client_svid = ca.mint("/client").svid()
    outcome = handshake(server_context(server_svid, bundles), client_context(client_svid, bundles), bundles)
    assert isinstance(outcome.server, VerifiedX509SVID)
    assert isinstance(outcome.client, VerifiedX509SVID)
    assert outcome.server.id == SpiffeID.parse("spiffe://example.org/client")
    assert outcome.client.id == SpiffeID.parse("spiffe://example.org/server")
    assert outcome.client.chain[-1] == ca.cert
    assert outcome.client_version == "TLSv1.3"
    assert outcome.echoed


def test_peers_of_different_trust_domains_verify_each_against_their_own_bundle(
    ca: TestCA, other: TestCA, bundles: BundleSet
) -> None:
    outcome = handshake(
        server_context(ca.mint("/server").svid(), bundles),
        client_context(other.mint("/client").svid(), bundles),
        bundles,
        server_authorizer=AuthorizeID(SpiffeID.parse("spiffe://other.org/client")),
    )
    assert isinstance(outcome.server, VerifiedX509SVID)
    assert outcome.server.chain[-1] == other.cert


def test_leaf_claiming_another_trust_domain_is_refused_after_the_handshake(
    ca: TestCA, other: TestCA, bundles: BundleSet
) -> None:
    """OpenSSL trusts every root of the set during the handshake; the SPIFFE check must not."""
    impostor = other.mint(uris=["spiffe://example.org/admin"])
    outcome = handshake(
        server_context(ca.mint("/server").svid(), bundles),
        client_context(X509SVID.from_chain(impostor.chain, impostor.key), bundles),
        bundles,
    )
    assert isinstance(outcome.server, VerificationError)
    assert not outcome.echoed
    assert str(outcome.server).startswith("x509svid: could not verify leaf certificate (validation failed: ")
    assert str(outcome.server).endswith(': "spiffe://example.org/admin"')


def test_authorizer_refusal_is_reported_with_the_reason(ca: TestCA, bundles: BundleSet) -> None:
    outcome = handshake(
        server_context(ca.mint("/server").svid(), bundles),
        client_context(ca.mint("/intruder").svid(), bundles),
        bundles,
        server_authorizer=AuthorizeID(SpiffeID.parse("spiffe://example.org/frontend")),
    )
    assert isinstance(outcome.server, AuthorizationError)
    assert str(outcome.server) == (
        'authorize: "spiffe://example.org/intruder" is not allowed: want ID "spiffe://example.org/frontend"'
    )


def test_client_authorizes_the_server_too(ca: TestCA, bundles: BundleSet) -> None:
    outcome = handshake(
        server_context(ca.mint("/not-the-database").svid(), bundles),
        client_context(ca.mint("/client").svid(), bundles),
        bundles,
        client_authorizer=AuthorizeID(SpiffeID.parse("spiffe://example.org/database")),
    )
    assert isinstance(outcome.client, AuthorizationError)


def test_stranger_is_refused_during_the_handshake(ca: TestCA, bundles: BundleSet) -> None:
    stranger = TestCA.create("example.org")  # same name, different root: not in the bundle
    stranger_bundles = BundleSet.of(stranger.bundle())
    outcome = handshake(
        server_context(ca.mint("/server").svid(), bundles),
        client_context(stranger.mint("/client").svid(), stranger_bundles),
        bundles,
    )
    assert isinstance(outcome.server, ssl.SSLError)
    assert isinstance(outcome.client, ssl.SSLError | OSError)


def test_server_requires_a_client_certificate(ca: TestCA, bundles: BundleSet) -> None:
    outcome = handshake(server_context(ca.mint("/server").svid(), bundles), client_context(None, bundles), bundles)
    assert isinstance(outcome.server, ssl.SSLError)


@pytest.mark.parametrize("key_type", ["rsa-2048", "ec-p384", "ed25519"])
def test_other_key_types_handshake(key_type: str, ca: TestCA, bundles: BundleSet) -> None:
    svid = ca.mint("/server", key_type=key_type).svid()  # type: ignore[arg-type]
    outcome = handshake(server_context(svid, bundles), client_context(ca.mint("/c").svid(), bundles), bundles)
    assert isinstance(outcome.client, VerifiedX509SVID)


def test_peer_chain_is_the_chain_the_peer_sent_leaf_first(ca: TestCA, bundles: BundleSet) -> None:
    intermediate = ca.intermediate()
    client = intermediate.mint("/client")
    outcome = handshake(
        server_context(ca.mint("/server").svid(), bundles), client_context(client.svid(), bundles), bundles
    )
    assert outcome.server_chain == client.chain


def test_contexts_allow_only_modern_tls_and_aead_ciphers(ca: TestCA, bundles: BundleSet) -> None:
    for context in (server_context(ca.mint().svid(), bundles), client_context(None, bundles)):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert not context.check_hostname
        ciphers = context.get_ciphers()
        assert ciphers
        for cipher in ciphers:
            assert cipher["aead"], cipher["name"]
            if cipher["protocol"] == "TLSv1.2":
                assert cipher["kea"] == "kx-ecdhe", cipher["name"]


def test_tls_1_1_is_refused(ca: TestCA, bundles: BundleSet) -> None:
    client = client_context(ca.mint("/client").svid(), bundles)
    client.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    with pytest.warns(DeprecationWarning, match="TLSv1_1 is deprecated"):
        client.maximum_version = ssl.TLSVersion.TLSv1_1
    outcome = handshake(server_context(ca.mint("/server").svid(), bundles), client, bundles)
    assert isinstance(outcome.client, ssl.SSLError | OSError)


def test_servers_issue_no_session_tickets(ca: TestCA, bundles: BundleSet) -> None:
    context = server_context(ca.mint().svid(), bundles)
    assert context.num_tickets == 0
    assert context.options & ssl.OP_NO_TICKET


def _client_up_to(version: ssl.TLSVersion, svid: X509SVID, bundles: BundleSet) -> ssl.SSLContext:
    context = client_context(svid, bundles)
    context.maximum_version = version
    return context


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_client_offering_its_last_session_gets_a_full_handshake_that_verifies(
    ca: TestCA, bundles: BundleSet, version: ssl.TLSVersion
) -> None:
    server = server_context(ca.mint("/server").svid(), bundles)
    client = _client_up_to(version, ca.mint("/client").svid(), bundles)
    first = handshake(server, client, bundles)
    assert first.client_session is not None
    assert not first.client_session.has_ticket

    second = handshake(server, client, bundles, client_session=first.client_session)

    assert second.client_version == version.name.replace("v1_", "v1.")
    assert (second.server_reused, second.client_reused) == (False, False)
    assert isinstance(second.server, VerifiedX509SVID)
    assert isinstance(second.client, VerifiedX509SVID)
    assert second.server.id == SpiffeID.parse("spiffe://example.org/client")
    assert second.echoed


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_verify_peer_refuses_a_resumed_session_that_carries_no_chain(
    ca: TestCA, bundles: BundleSet, version: ssl.TLSVersion
) -> None:
    """Why resumption is off: were a server context to issue tickets again, verify_peer still fails closed."""
    server = server_context(ca.mint("/server").svid(), bundles)
    server.options &= ~ssl.OP_NO_TICKET
    server.num_tickets = 1
    client = _client_up_to(version, ca.mint("/client").svid(), bundles)
    first = handshake(server, client, bundles)
    assert first.client_session is not None
    assert first.client_session.has_ticket

    resumed = handshake(server, client, bundles, client_session=first.client_session)

    assert (resumed.server_reused, resumed.client_reused) == (True, True)
    for error in (resumed.server, resumed.client):
        assert isinstance(error, VerificationError)
        assert str(error) == (
            "x509svid: resumed TLS session carries no peer certificate; session resumption must be disabled"
        )
    assert not resumed.echoed


def test_a_peer_certificate_cryptography_cannot_parse_is_a_verification_error(ca: TestCA, bundles: BundleSet) -> None:
    """OpenSSL accepts a version-6 (field value 5) certificate in the chain; cryptography cannot parse it."""
    svid = ca.mint("/client").svid()
    der = ca.mint("/junk").leaf.public_bytes(Encoding.DER)
    assert der.count(bytes.fromhex("a003020102")) == 1
    junk = der.replace(bytes.fromhex("a003020102"), bytes.fromhex("a003020105"))
    junk_pem = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(junk) + b"-----END CERTIFICATE-----\n"
    client = client_context(None, bundles)
    with private_pem_file(svid.cert_chain_pem() + junk_pem + svid.private_key_pem()) as path:
        client.load_cert_chain(path)

    outcome = handshake(server_context(ca.mint("/server").svid(), bundles), client, bundles)

    assert isinstance(outcome.client, VerifiedX509SVID), "the handshake itself succeeded"
    assert isinstance(outcome.server, VerificationError)
    assert str(outcome.server) == "x509svid: peer certificate 1 could not be parsed (5 is not a valid X509 version)"
    assert isinstance(outcome.server.__cause__, x509.InvalidVersion)
    assert not outcome.echoed


def test_a_bundle_whose_authority_is_an_intermediate_anchors_the_handshake(ca: TestCA) -> None:
    """go-spiffe accepts an authority that is not self-signed; so do OpenSSL (partial chains) and the verifier."""
    intermediate = ca.intermediate()
    only_intermediate = BundleSet.of(SpiffeBundle.create(ca.trust_domain, x509_authorities=[intermediate.cert]))
    server_svid = intermediate.mint("/server").svid()
    client_svid = intermediate.mint("/client").svid()

    outcome = handshake(
        server_context(server_svid, only_intermediate),
        client_context(client_svid, only_intermediate),
        only_intermediate,
    )

    assert isinstance(outcome.server, VerifiedX509SVID)
    assert isinstance(outcome.client, VerifiedX509SVID)
    assert outcome.server.chain == client_svid.cert_chain  # leaf, then the intermediate as the anchor
    assert outcome.echoed
    strict = [server_context(server_svid, only_intermediate), client_context(client_svid, only_intermediate)]
    for context in strict:
        assert context.verify_flags & ssl.VERIFY_X509_PARTIAL_CHAIN
        context.verify_flags &= ~ssl.VERIFY_X509_PARTIAL_CHAIN
    refused = handshake(strict[0], strict[1], only_intermediate)
    assert isinstance(refused.client, ssl.SSLError), "without partial chains OpenSSL looks for a self-signed root"


def test_a_bundle_set_without_roots_cannot_make_a_context(ca: TestCA) -> None:
    empty = BundleSet.of(SpiffeBundle.create(TrustDomain.parse("example.org")))
    with pytest.raises(TLSConfigError) as caught:
        server_context(ca.mint().svid(), empty)
    assert str(caught.value) == "tls: the bundle set has no X.509 authorities; no peer could be verified"


@pytest.mark.parametrize("use_memfd", [True, False])
def test_private_pem_file_is_private_and_gone_afterwards(use_memfd: bool) -> None:
    with private_pem_file(b"secret", use_memfd=use_memfd) as path:
        assert Path(path).read_bytes() == b"secret"
        if not use_memfd:
            assert stat.S_IMODE(Path(path).stat().st_mode) == 0o600
            assert stat.S_IMODE(Path(path).parent.stat().st_mode) == 0o700
    assert not Path(path).exists()


def test_a_reconnecting_peer_is_found_in_the_verification_cache(ca: TestCA, bundles: BundleSet) -> None:
    server = server_context(ca.mint("/server").svid(), bundles)
    client = client_context(ca.intermediate().mint("/client").svid(), bundles)
    cache = VerificationCache()
    first = handshake(server, client, bundles, server_cache=cache)
    second = handshake(server, client, bundles, server_cache=cache)
    assert isinstance(first.server, VerifiedX509SVID)
    assert second.server == first.server
    assert (cache.misses, cache.hits) == (1, 1)
    refused = handshake(
        server,
        client,
        bundles,
        server_cache=cache,
        server_authorizer=AuthorizeID(SpiffeID.parse("spiffe://example.org/someone-else")),
    )
    assert isinstance(refused.server, AuthorizationError), "a cache hit still goes through the authorizer"
