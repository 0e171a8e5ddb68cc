"""Node attestors against real certificates, signatures and a token store stand-in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from controlplane.attest.base import AttestationError
from controlplane.attest.join_token import JoinTokenAttestor
from controlplane.attest.x509pop import CHALLENGE_CONTEXT, X509PopAttestor, fingerprint
from controlplane.model import JoinToken, ModelError, Selector
from spiffecore import TrustDomain
from spiffecore.der import dump_der_certificates
from tests.support.ca import NOW, Minted, TestCA

TD = TrustDomain.parse("example.org")
TOKEN = "jointoken0123456789"


class Tokens:
    """An in-memory token table with the store's consume semantics (the store has its own tests)."""

    def __init__(self, *tokens: JoinToken) -> None:
        self.tokens = {t.token: t for t in tokens}

    def consume_join_token(self, token: str, now: datetime) -> JoinToken:
        found = self.tokens.pop(token, None)
        if found is None:
            raise ModelError("join token is unknown or already used")
        if found.expires_at <= now:
            raise ModelError("join token has expired")
        return found


class Answers:
    """The agent's side of the challenge conversation."""

    def __init__(self, sign: object) -> None:
        self.sign = sign
        self.challenges: list[bytes] = []

    async def challenge(self, challenge: bytes) -> bytes:
        self.challenges.append(challenge)
        assert callable(self.sign)
        result = self.sign(challenge)
        assert isinstance(result, bytes)
        return result


async def test_join_token_is_single_use() -> None:
    tokens = Tokens(JoinToken(token=TOKEN, expires_at=NOW + timedelta(minutes=10)))
    attestor = JoinTokenAttestor(trust_domain=TD, tokens=tokens, clock=lambda: NOW)
    result = await attestor.attest(TOKEN.encode(), Answers(None))
    assert str(result.agent_id) == f"spiffe://example.org/spire/agent/join_token/{TOKEN}"
    assert not result.can_reattest
    with pytest.raises(AttestationError) as caught:
        await attestor.attest(TOKEN.encode(), Answers(None))
    assert str(caught.value) == "attest: join token refused (join token is unknown or already used)"
    assert TOKEN not in str(caught.value)


async def test_expired_and_non_ascii_join_tokens_are_refused() -> None:
    tokens = Tokens(JoinToken(token=TOKEN, expires_at=NOW - timedelta(seconds=1)))
    attestor = JoinTokenAttestor(trust_domain=TD, tokens=tokens, clock=lambda: NOW)
    with pytest.raises(AttestationError, match=r"join token refused \(join token has expired\)"):
        await attestor.attest(TOKEN.encode(), Answers(None))
    with pytest.raises(AttestationError, match="join token is not ASCII"):
        await attestor.attest("tökén".encode(), Answers(None))


def _node_cert(ca: TestCA, *, key_type: str = "ec-p256") -> Minted:
    """A plain X.509 node certificate (no SPIFFE ID) with a common name, as x509pop uses."""
    return ca.mint(uris=[], subject="node-a", key_type=key_type)  # type: ignore[arg-type]


def _signer(key: object) -> object:
    def sign(nonce: bytes) -> bytes:
        message = CHALLENGE_CONTEXT + nonce
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(message, ec.ECDSA(hashes.SHA256()))
        if isinstance(key, rsa.RSAPrivateKey):
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
            return key.sign(message, pss, hashes.SHA256())
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        return key.sign(message)

    return sign


@pytest.fixture(scope="module")
def node_ca() -> TestCA:
    return TestCA.create("nodes.example")


@pytest.mark.parametrize("key_type", ["ec-p256", "rsa-2048", "ed25519"])
async def test_x509pop_proof_of_possession(node_ca: TestCA, key_type: str) -> None:
    intermediate = node_ca.intermediate()
    node = _node_cert(intermediate, key_type=key_type)
    attestor = X509PopAttestor(trust_domain=TD, roots=[node_ca.cert], clock=lambda: NOW)
    answers = Answers(_signer(node.key))
    result = await attestor.attest(dump_der_certificates(node.chain), answers)
    assert len(answers.challenges) == 1
    assert len(answers.challenges[0]) == 32
    assert str(result.agent_id) == f"spiffe://example.org/spire/agent/x509pop/{fingerprint(node.leaf)}"
    assert result.can_reattest
    assert Selector.parse("x509pop:subject:cn:node-a") in result.selectors
    assert Selector.parse(f"x509pop:ca:fingerprint:{fingerprint(intermediate.cert)}") in result.selectors
    assert Selector.parse(f"x509pop:ca:fingerprint:{fingerprint(node_ca.cert)}") in result.selectors
    assert Selector.parse(f"x509pop:serialnumber:{node.leaf.serial_number:x}") in result.selectors


async def test_x509pop_refuses_a_wrong_signature_and_a_stranger(node_ca: TestCA) -> None:
    node = _node_cert(node_ca)
    attestor = X509PopAttestor(trust_domain=TD, roots=[node_ca.cert], clock=lambda: NOW)
    impostor = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(AttestationError) as caught:
        await attestor.attest(dump_der_certificates(node.chain), Answers(_signer(impostor)))
    assert str(caught.value) == "attest: x509pop proof of possession failed: the challenge signature is not valid"
    stranger = _node_cert(TestCA.create("nodes.example"))
    with pytest.raises(AttestationError, match="x509pop certificate does not chain to a trusted CA"):
        await attestor.attest(dump_der_certificates(stranger.chain), Answers(_signer(stranger.key)))


async def test_x509pop_refuses_an_expired_certificate_before_any_challenge(node_ca: TestCA) -> None:
    node = _node_cert(node_ca)
    attestor = X509PopAttestor(trust_domain=TD, roots=[node_ca.cert], clock=lambda: NOW + timedelta(days=2))
    answers = Answers(_signer(node.key))
    with pytest.raises(AttestationError, match="does not chain to a trusted CA"):
        await attestor.attest(dump_der_certificates(node.chain), answers)
    assert answers.challenges == []


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "attest: x509pop certificate chain is empty"),
        (b"\x30\x03abc", "attest: x509pop certificate chain is malformed"),
        (b"garbage", "attest: x509pop certificate chain is malformed"),
        (b"\x30" * 70_000, "attest: x509pop certificate chain is larger than 65536 bytes"),
    ],
)
async def test_x509pop_malformed_evidence(node_ca: TestCA, payload: bytes, message: str) -> None:
    attestor = X509PopAttestor(trust_domain=TD, roots=[node_ca.cert], clock=lambda: NOW)
    with pytest.raises(AttestationError) as caught:
        await attestor.attest(payload, Answers(None))
    assert str(caught.value).startswith(message)


def test_x509pop_needs_roots() -> None:
    with pytest.raises(AttestationError, match="x509pop needs at least one CA certificate to trust"):
        X509PopAttestor(trust_domain=TD, roots=[], clock=lambda: datetime.now(UTC))


async def test_x509pop_refuses_a_ca_certificate_as_the_leaf(node_ca: TestCA) -> None:
    intermediate = node_ca.intermediate()
    attestor = X509PopAttestor(trust_domain=TD, roots=[node_ca.cert], clock=lambda: NOW)
    with pytest.raises(AttestationError) as caught:
        await attestor.attest(dump_der_certificates([intermediate.cert]), Answers(_signer(intermediate.key)))
    assert str(caught.value) == "attest: x509pop leaf certificate must not be a CA"
