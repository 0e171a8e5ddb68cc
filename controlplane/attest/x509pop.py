"""``x509pop``: the agent proves possession of a key whose certificate chains to a configured CA.

The agent sends its certificate chain (leaf first, concatenated DER); the server verifies it
against the configured roots, then challenges the agent to sign a fresh random nonce with the
leaf's key. The agent's ID is ``spiffe://<td>/spire/agent/x509pop/<sha1 of the leaf>`` and its
selectors are SPIRE's: ``x509pop:subject:cn:<CN>``, ``x509pop:ca:fingerprint:<sha1>`` for every
certificate above the leaf, and ``x509pop:serialnumber:<hex>``. Agents may re-attest.

The signed message is ``CHALLENGE_CONTEXT + nonce``: the context string keeps the signature from
being usable anywhere else. ECDSA keys sign with SHA-256 (DER signature), RSA keys with
RSA-PSS/SHA-256 (salt as long as the digest), Ed25519 keys as they are.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import verification
from cryptography.x509.oid import NameOID

from controlplane.attest.base import Attestation, AttestationError, ChallengeChannel
from controlplane.model import Selector, agent_id
from spiffecore import SpiffeError, TrustDomain
from spiffecore.der import load_der_certificates

NAME: Final = "x509pop"
CHALLENGE_CONTEXT: Final = b"spiffe-sidecar x509pop challenge v1\x00"
NONCE_BYTES: Final = 32
MAX_CHAIN_BYTES: Final = 64 * 1024


# Node certificates are plain X.509, often without a SAN or an EKU, so the end-entity policy asks
# for nothing beyond path validation; a CA certificate as the leaf is refused separately.
_EE_POLICY: Final = verification.ExtensionPolicy.permit_all()
_CA_POLICY: Final = verification.ExtensionPolicy.webpki_defaults_ca().may_be_present(
    x509.AuthorityKeyIdentifier, verification.Criticality.NON_CRITICAL, None
)


def fingerprint(certificate: x509.Certificate) -> str:
    """SHA-1 of the DER certificate in lower-case hex, as SPIRE names x509pop agents."""
    return hashlib.sha1(certificate.public_bytes(Encoding.DER), usedforsecurity=False).hexdigest()


def verify_proof(public_key: object, nonce: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is the leaf key's signature of ``CHALLENGE_CONTEXT + nonce``."""
    message = CHALLENGE_CONTEXT + nonce
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public_key, rsa.RSAPublicKey):
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
            public_key.verify(signature, message, pss, hashes.SHA256())
        elif isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, message)
        else:
            return False
    except InvalidSignature:
        return False
    return True


class X509PopAttestor:
    """Attests agents by X.509 proof of possession against ``roots``."""

    name = NAME

    def __init__(
        self,
        *,
        trust_domain: TrustDomain,
        roots: Sequence[x509.Certificate],
        clock: Callable[[], datetime],
    ) -> None:
        if not roots:
            raise AttestationError("x509pop needs at least one CA certificate to trust")
        self._trust_domain = trust_domain
        self._store = verification.Store(list(roots))
        self._clock = clock

    async def attest(self, payload: bytes, channel: ChallengeChannel) -> Attestation:
        if len(payload) > MAX_CHAIN_BYTES:
            raise AttestationError(f"x509pop certificate chain is larger than {MAX_CHAIN_BYTES} bytes")
        try:
            chain = load_der_certificates(payload)
        except SpiffeError as err:
            raise AttestationError(f"x509pop certificate chain is malformed ({err.rule})") from err
        if not chain:
            raise AttestationError("x509pop certificate chain is empty")
        leaf = chain[0]
        verifier = (
            verification.PolicyBuilder()
            .store(self._store)
            .time(self._clock())
            .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
            .build_client_verifier()
        )
        try:
            verified = verifier.verify(leaf, list(chain[1:]))
        except verification.VerificationError as err:
            raise AttestationError(f"x509pop certificate does not chain to a trusted CA ({err})") from err
        if _is_ca(leaf):
            raise AttestationError("x509pop leaf certificate must not be a CA")
        try:
            public_key = leaf.public_key()
        except ValueError as err:
            raise AttestationError("x509pop leaf public key is unreadable") from err
        nonce = secrets.token_bytes(NONCE_BYTES)
        answer = await channel.challenge(nonce)
        if not verify_proof(public_key, nonce, answer):
            raise AttestationError("x509pop proof of possession failed: the challenge signature is not valid")
        leaf_fingerprint = fingerprint(leaf)
        selectors = [Selector(type=NAME, value=f"serialnumber:{leaf.serial_number:x}")]
        selectors += [Selector(type=NAME, value=f"ca:fingerprint:{fingerprint(cert)}") for cert in verified.chain[1:]]
        try:
            common_names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            if common_names:
                selectors.append(Selector(type=NAME, value=f"subject:cn:{common_names[0].value!s}"))
        except (ValueError, SpiffeError) as err:
            raise AttestationError("x509pop leaf subject common name is unusable as a selector") from err
        return Attestation(
            agent_id=agent_id(self._trust_domain, NAME, leaf_fingerprint),
            selectors=tuple(selectors),
            can_reattest=True,
        )


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        return bool(certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False
    except ValueError as err:
        raise AttestationError("x509pop leaf certificate extensions are malformed") from err
