"""X.509 authorities: the CA certificate and key that sign X.509-SVIDs.

An authority is either self-signed (a root of the trust domain) or an intermediate signed by an
upstream CA (:mod:`controlplane.ca.upstream`). Either way its certificate follows SPIRE's CA
template: subject ``C=US, O=SPIFFE, serialNumber=<serial>`` (a distinct subject per authority,
which keeps Go's verifier from trying every authority's signature, SPIRE PR #4585), URI SAN
``spiffe://<td>``, basic constraints CA (critical), key usage keyCertSign and cRLSign (critical),
a subject key identifier, and an authority key identifier when signed by an upstream CA.
NotBefore is backdated 10 s, like SVIDs, against clocks running slightly behind.

What goes into the trust bundle (:attr:`X509Authority.roots`) is the authority itself when
self-signed, and the upstream root otherwise; SVID chains then carry the intermediates
(:attr:`X509Authority.signing_chain`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from controlplane.ca.errors import CAError
from controlplane.ca.keys import SigningKey, signature_hash
from controlplane.ca.schedule import Window, format_duration, require_aware
from controlplane.ca.upstream import Upstream
from spiffecore import TrustDomain, X509SVIDError, id_from_cert
from spiffecore.der import dump_pem_certificates
from spiffecore.x509svid import check_signing_cert

BACKDATE: Final = timedelta(seconds=10)

KEY_MISMATCH: Final = "private key does not match the authority certificate"
WRONG_TRUST_DOMAIN: Final = "authority certificate's URI SAN is not the trust domain's ID"
NO_SKI: Final = "authority certificate has no subject key identifier"
NOT_SIGNED_BY_UPSTREAM: Final = "authority certificate is not signed by the first certificate of its upstream chain"
NOT_SELF_SIGNED: Final = "authority certificate without an upstream chain must be self-signed"


def _describe(cert: x509.Certificate) -> str:
    return f"serial={cert.serial_number:x} not_after={cert.not_valid_after_utc.isoformat()}"


def _verify_issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


@dataclass(frozen=True, slots=True, kw_only=True)
class X509Authority:
    """A CA certificate with its key and, for an intermediate, the upstream chain up to the root.

    ``upstream_chain`` is empty for a self-signed authority; otherwise it starts with the
    certificate that signed ours and ends with the upstream root. The key is left out of ``repr``
    and comparisons.
    """

    trust_domain: TrustDomain
    certificate: x509.Certificate
    private_key: SigningKey = field(repr=False, compare=False)
    upstream_chain: tuple[x509.Certificate, ...] = ()

    def __post_init__(self) -> None:
        cert = self.certificate
        try:
            check_signing_cert(cert)
            cert_id = id_from_cert(cert)
        except X509SVIDError as err:
            raise CAError(err.rule, _describe(cert)) from err
        if cert_id != self.trust_domain.id:
            raise CAError(f"{WRONG_TRUST_DOMAIN} ({self.trust_domain.id_string()})", str(cert_id))
        if self.private_key.public_key() != cert.public_key():
            raise CAError(KEY_MISMATCH, _describe(cert))
        try:
            cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        except x509.ExtensionNotFound:
            raise CAError(NO_SKI, _describe(cert)) from None
        if self.upstream_chain:
            if not _verify_issued_by(cert, self.upstream_chain[0]):
                raise CAError(NOT_SIGNED_BY_UPSTREAM, _describe(cert))
        elif not _verify_issued_by(cert, cert):
            raise CAError(NOT_SELF_SIGNED, _describe(cert))

    @property
    def window(self) -> Window:
        return Window(not_before=self.certificate.not_valid_before_utc, not_after=self.not_after)

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    @property
    def subject_key_id(self) -> bytes:
        return self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest

    @property
    def is_self_signed(self) -> bool:
        return not self.upstream_chain

    @property
    def roots(self) -> tuple[x509.Certificate, ...]:
        """What the trust bundle must hold for this authority's SVIDs to verify."""
        return self.upstream_chain[-1:] if self.upstream_chain else (self.certificate,)

    @property
    def signing_chain(self) -> tuple[x509.Certificate, ...]:
        """The certificates an SVID's chain carries after its leaf: all of ours up to, not including, the root."""
        if not self.upstream_chain:
            return ()
        return (self.certificate, *self.upstream_chain[:-1])

    def chain_pem(self) -> bytes:
        """The certificate and its upstream chain as PEM, as the CA persists them."""
        return dump_pem_certificates((self.certificate, *self.upstream_chain))


def _ca_name(serial: int) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE"),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, str(serial)),
        ]
    )


def _ca_builder(
    trust_domain: TrustDomain, key: SigningKey, issuer: x509.Name | None, *, ttl: timedelta, now: datetime
) -> x509.CertificateBuilder:
    """The CA template; ``issuer=None`` for a self-signed authority."""
    require_aware(now)
    if ttl <= timedelta(0):
        raise CAError("authority TTL must be positive", format_duration(ttl))
    now = now.replace(microsecond=0)
    serial = x509.random_serial_number()
    usage = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    subject = _ca_name(serial)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer is None else issuer)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(trust_domain.id_string())]), False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def create_self_signed(trust_domain: TrustDomain, key: SigningKey, *, ttl: timedelta, now: datetime) -> X509Authority:
    """A new root of ``trust_domain``, valid from ``now`` - 10 s to ``now + ttl``."""
    cert = _ca_builder(trust_domain, key, None, ttl=ttl, now=now).sign(key, signature_hash(key))
    return X509Authority(trust_domain=trust_domain, certificate=cert, private_key=key)


def create_intermediate(
    trust_domain: TrustDomain, key: SigningKey, upstream: Upstream, *, ttl: timedelta, now: datetime
) -> X509Authority:
    """A new intermediate of ``trust_domain`` signed by ``upstream``, valid from ``now`` - 10 s to ``now + ttl``.

    Raises :class:`CAError` if the upstream chain does not cover that whole period.
    """
    upstream.check(now=now, ca_ttl=ttl)
    issuer = upstream.certificate
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        authority_key_id = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        authority_key_id = x509.AuthorityKeyIdentifier.from_issuer_public_key(upstream.private_key.public_key())
    builder = _ca_builder(trust_domain, key, issuer.subject, ttl=ttl, now=now).add_extension(
        authority_key_id, critical=False
    )
    cert = builder.sign(upstream.private_key, signature_hash(upstream.private_key))
    return X509Authority(trust_domain=trust_domain, certificate=cert, private_key=key, upstream_chain=upstream.chain)


__all__ = ["BACKDATE", "X509Authority", "create_intermediate", "create_self_signed"]
