"""Verification of a peer's X.509-SVID chain against the bundle of its own trust domain.

The leaf's SPIFFE ID is read first; only that trust domain's authorities are then used as trust
anchors, never a pool mixed from several domains. The path is validated by cryptography's
verifier (RFC 5280, with the time given by the caller); the SPIFFE leaf rules, which that
verifier does not enforce, are checked here. Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from cryptography import x509
from cryptography.x509 import verification

from spiffecore.bundle import X509BundleSource
from spiffecore.errors import BundleError, VerificationError, X509SVIDError
from spiffecore.spiffeid import SpiffeID
from spiffecore.x509svid import check_leaf

EMPTY_CHAIN: Final = "peer certificate chain is empty"
NO_BUNDLE: Final = "could not get X.509 bundle"
NOT_VERIFIED: Final = "could not verify leaf certificate"


def _relax_aki(policy: verification.ExtensionPolicy) -> verification.ExtensionPolicy:
    # RFC 5280 wants an authority key identifier; the X509-SVID specification does not, and Go's
    # verifier (so SPIRE and go-spiffe) does not ask for one. Accept certificates without it.
    return policy.may_be_present(x509.AuthorityKeyIdentifier, verification.Criticality.NON_CRITICAL, None)


_CA_POLICY: Final = _relax_aki(verification.ExtensionPolicy.webpki_defaults_ca())
_EE_POLICY: Final = _relax_aki(verification.ExtensionPolicy.webpki_defaults_ee())


@dataclass(frozen=True, slots=True)
class VerifiedX509SVID:
    """The outcome of a successful verification: the peer's ID and the verified chain."""

    id: SpiffeID
    chain: tuple[x509.Certificate, ...]
    """Leaf first, ending with the trust anchor from the bundle."""


def verify_x509_svid(chain: Sequence[x509.Certificate], bundles: X509BundleSource, *, at: datetime) -> VerifiedX509SVID:
    """Verify ``chain`` (leaf first, as the peer sent it) at time ``at``.

    Raises :class:`VerificationError` naming the broken rule: a leaf that breaks the X509-SVID
    rules, no bundle for the leaf's trust domain, or a chain that does not lead to one of that
    bundle's authorities within its validity period.
    """
    if not chain:
        raise VerificationError(EMPTY_CHAIN)
    leaf = chain[0]
    try:
        spiffe_id = check_leaf(leaf)
    except X509SVIDError as err:
        raise VerificationError(err.rule, err.value) from err
    try:
        store = bundles.x509_bundle_for(spiffe_id.trust_domain).store()
    except BundleError as err:
        raise VerificationError(f"{NO_BUNDLE} ({err.rule})", spiffe_id.trust_domain.name) from err
    verifier = (
        verification.PolicyBuilder()
        .store(store)
        .time(at)
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
        .build_client_verifier()
    )
    try:
        verified = verifier.verify(leaf, list(chain[1:]))
    except verification.VerificationError as err:
        raise VerificationError(f"{NOT_VERIFIED} ({err})", str(spiffe_id)) from err
    return VerifiedX509SVID(spiffe_id, tuple(verified.chain))
