"""Verification of a peer's X.509-SVID chain against the bundle of its own trust domain.

The leaf's SPIFFE ID is read first; only that trust domain's authorities are then used as trust
anchors, never a pool mixed from several domains. The path is validated by cryptography's
verifier (RFC 5280, with the time given by the caller); the SPIFFE leaf rules, which that
verifier does not enforce, are checked here. Pure: no I/O, no clock.

A :class:`VerificationCache`, when the caller passes one, remembers successful verifications:
a peer reconnects with the same chain for as long as its SVID lives (an hour by default), and
each full verification costs a signature check per certificate of the path. A remembered result
is reused only for the very same chain, while the bundle of its trust domain is still the very
same bundle object (a rotated bundle is a new object) and while the time lies inside the validity
periods of every certificate of the verified path. Failures are never remembered.

The cache matches bundles by identity, not by value: comparing bundles would cost more than the
signature checks it spares. A bundle source must therefore return the same :class:`X509Bundle`
object for as long as the bundle does not change (as :class:`BundleSet` does); a source that
builds a new object on every call gets no cache hits, never a wrong one.

The rules applied, and the limits of the verifier, as reviewed:

- The leaf rules are those of the X509-SVID specification, sections 4.3 and 4.4, as an SVID
  must meet them. This is stricter than go-spiffe's ``x509svid.Verify``: a key usage extension
  must be present and assert ``digitalSignature``, and an extended key usage, if present, must
  hold both ``serverAuth`` and ``clientAuth``.
- Paths are validated with cryptography's client-verifier policy, so an intermediate CA whose
  extended key usage lacks ``clientAuth`` is refused (one without the extension is accepted).
- A CA carrying URI name constraints is refused: cryptography does not evaluate URI name
  constraints and fails closed on them. SPIFFE IDs are URI SANs, so such constraints could not be
  honoured anyway; DNS and IP name constraints are evaluated as usual.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from cryptography import x509
from cryptography.x509 import verification

from spiffecore.bundle import X509Bundle, X509BundleSource
from spiffecore.errors import BundleError, VerificationError, X509SVIDError
from spiffecore.spiffeid import SpiffeID
from spiffecore.x509svid import check_leaf

EMPTY_CHAIN: Final = "peer certificate chain is empty"
NAIVE_TIME: Final = "at must be a timezone-aware datetime"
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


@dataclass(frozen=True, slots=True)
class _Remembered:
    bundle: X509Bundle
    result: VerifiedX509SVID
    not_before: datetime
    not_after: datetime


class VerificationCache:
    """Successful verifications, most recently used kept, at most ``max_entries`` of them.

    Safe to share between threads. ``hits`` and ``misses`` count lookups, for metrics.
    """

    def __init__(self, *, max_entries: int = 4096) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {max_entries}")
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[x509.Certificate, ...], _Remembered] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(
        self, chain: tuple[x509.Certificate, ...], bundles: X509BundleSource, at: datetime
    ) -> VerifiedX509SVID | None:
        """The remembered result for ``chain`` if it still holds at ``at``, else ``None``."""
        with self._lock:
            remembered = self._entries.get(chain)
        if remembered is not None and remembered.not_before <= at <= remembered.not_after:
            try:
                bundle: X509Bundle | None = bundles.x509_bundle_for(remembered.result.id.trust_domain)
            except BundleError:
                bundle = None
            if bundle is remembered.bundle:
                with self._lock:
                    self.hits += 1
                    if chain in self._entries:
                        self._entries.move_to_end(chain)
                return remembered.result
        with self._lock:
            self.misses += 1
        return None

    def remember(self, chain: tuple[x509.Certificate, ...], bundle: X509Bundle, result: VerifiedX509SVID) -> None:
        """Remember a successful verification of ``chain`` against ``bundle``."""
        remembered = _Remembered(
            bundle=bundle,
            result=result,
            not_before=max(cert.not_valid_before_utc for cert in result.chain),
            not_after=min(cert.not_valid_after_utc for cert in result.chain),
        )
        with self._lock:
            self._entries[chain] = remembered
            self._entries.move_to_end(chain)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)


def verify_x509_svid(
    chain: Sequence[x509.Certificate],
    bundles: X509BundleSource,
    *,
    at: datetime,
    cache: VerificationCache | None = None,
) -> VerifiedX509SVID:
    """Verify ``chain`` (leaf first, as the peer sent it) at time ``at``.

    Raises :class:`VerificationError` naming the broken rule: a leaf that breaks the X509-SVID
    rules, no bundle for the leaf's trust domain, or a chain that does not lead to one of that
    bundle's authorities within its validity period. With ``cache``, a chain verified before is
    accepted again without its signature checks while the conditions in the module's doc hold.
    Raises ``ValueError`` for a naive ``at``: it would be compared with UTC validity periods.
    """
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(NAIVE_TIME)
    if not chain:
        raise VerificationError(EMPTY_CHAIN)
    if cache is not None:
        key = tuple(chain)
        remembered = cache.lookup(key, bundles, at)
        if remembered is not None:
            return remembered
    leaf = chain[0]
    try:
        spiffe_id = check_leaf(leaf)
    except X509SVIDError as err:
        raise VerificationError(err.rule, err.value) from err
    try:
        bundle = bundles.x509_bundle_for(spiffe_id.trust_domain)
        store = bundle.store()
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
    result = VerifiedX509SVID(spiffe_id, tuple(verified.chain))
    if cache is not None:
        cache.remember(key, bundle, result)
    return result
