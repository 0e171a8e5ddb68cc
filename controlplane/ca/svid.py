"""Signing X.509-SVIDs with SPIRE's workload template, and reading the public key out of a CSR.

The SPIFFE ID and DNS names come from the registration entry the caller has matched, never from
the CSR: a CSR only proves possession of the key it carries.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controlplane.ca.errors import CAError
from controlplane.ca.keys import PublicKey, signature_hash
from controlplane.ca.schedule import format_duration, require_aware
from controlplane.ca.x509ca import BACKDATE, X509Authority
from spiffecore import SpiffeID

MAX_CSR_BYTES: Final = 32 * 1024
MIN_RSA_BITS: Final = 2048
MAX_RSA_BITS: Final = 8192
# A CN holds at most 64 characters (RFC 5280 ub-common-name); a longer first DNS name stays a SAN only.
MAX_COMMON_NAME: Final = 64

CSR_TOO_LARGE: Final = f"certificate signing request must not be longer than {MAX_CSR_BYTES} bytes"
CSR_UNPARSABLE: Final = "could not parse certificate signing request as DER"
CSR_BAD_SIGNATURE: Final = "certificate signing request signature is not valid"
CSR_BAD_KEY: Final = "could not read the certificate signing request's public key"
CSR_KEY_TYPE: Final = "certificate signing request key type is not supported (want EC P-256, EC P-384 or RSA)"
CSR_CURVE: Final = "certificate signing request EC key must be on P-256 or P-384"
CSR_RSA_SIZE: Final = f"certificate signing request RSA key must have {MIN_RSA_BITS} to {MAX_RSA_BITS} bits"
WRONG_TRUST_DOMAIN: Final = "SVID SPIFFE ID is not in the authority's trust domain"
NO_PATH: Final = "SVID SPIFFE ID must have a path"
BAD_TTL: Final = "SVID TTL must be positive"
OUTLIVES_AUTHORITY: Final = "SVID would outlive its signing authority"


def public_key_from_csr(der: bytes) -> PublicKey:
    """The public key of a DER PKCS#10 CSR, once its self-signature is verified and its key accepted.

    Only EC P-256/P-384 and RSA of 2048 to 8192 bits are accepted. The CSR's subject and SANs are
    ignored: what the SVID says is decided by the registration entry.
    """
    if len(der) > MAX_CSR_BYTES:
        raise CAError(CSR_TOO_LARGE, f"{len(der)} bytes")
    try:
        csr = x509.load_der_x509_csr(der)
    except ValueError as err:
        raise CAError(CSR_UNPARSABLE, f"{len(der)} bytes") from err
    try:
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as err:
        raise CAError(CSR_BAD_KEY) from err
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1):
            raise CAError(CSR_CURVE, key.curve.name)
    elif isinstance(key, rsa.RSAPublicKey):
        if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
            raise CAError(CSR_RSA_SIZE, f"{key.key_size} bits")
    else:
        raise CAError(CSR_KEY_TYPE, type(key).__name__)
    # Checked after the key, so an oversized RSA key is refused before it costs a signature check.
    try:
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm) as err:
        raise CAError(CSR_BAD_SIGNATURE) from err
    if not valid:
        raise CAError(CSR_BAD_SIGNATURE)
    return key


def _key_usage(*, is_rsa: bool) -> x509.KeyUsage:
    # SPIRE sets digitalSignature, keyEncipherment and keyAgreement on every SVID. Each bit is kept
    # here only for the key that can do it: keyAgreement for EC keys (ECDH), keyEncipherment for
    # RSA keys (RSA key transport). digitalSignature, which the X509-SVID spec requires, always.
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=is_rsa,
        data_encipherment=False,
        key_agreement=not is_rsa,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


_KEY_USAGE_RSA: Final = _key_usage(is_rsa=True)
_KEY_USAGE_EC: Final = _key_usage(is_rsa=False)
_SUBJECT: Final = x509.Name(
    [x509.NameAttribute(NameOID.COUNTRY_NAME, "US"), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIRE")]
)


def _subject(dns_names: Sequence[str]) -> x509.Name:
    if not dns_names or len(dns_names[0]) > MAX_COMMON_NAME:
        return _SUBJECT
    return x509.Name([*_SUBJECT, x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])])


@functools.lru_cache(maxsize=16)
def _template(authority: X509Authority, *, is_rsa: bool) -> x509.CertificateBuilder:
    """What every SVID of ``authority`` shares, built once: the issuer and the constant extensions.

    Builders are immutable, so each SVID extends this one; that halves the Python work of a signing.
    """
    return (
        x509.CertificateBuilder()
        .issuer_name(authority.certificate.subject)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_KEY_USAGE_RSA if is_rsa else _KEY_USAGE_EC, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                x509.SubjectKeyIdentifier(authority.subject_key_id)
            ),
            critical=False,
        )
    )


def sign_x509_svid(
    authority: X509Authority,
    *,
    spiffe_id: SpiffeID,
    public_key: PublicKey,
    dns_names: Sequence[str] = (),
    ttl: timedelta,
    now: datetime,
) -> tuple[x509.Certificate, ...]:
    """Sign an X.509-SVID for ``public_key``: the leaf, then the intermediates (never the root).

    Valid from ``now`` - 10 s to ``now + ttl``. An SVID that would outlive the authority is an
    error, never silently shortened: the start-up TTL check and the rotation schedule make it
    unreachable, so reaching it is a bug (or ``tick`` was not run before signing).
    """
    require_aware(now)
    if spiffe_id.trust_domain != authority.trust_domain:
        raise CAError(f"{WRONG_TRUST_DOMAIN} ({authority.trust_domain})", str(spiffe_id))
    if spiffe_id.is_trust_domain_id:
        raise CAError(NO_PATH, str(spiffe_id))
    if ttl <= timedelta(0):
        raise CAError(BAD_TTL, format_duration(ttl))
    now = now.replace(microsecond=0)
    not_after = now + ttl
    if not_after > authority.not_after:
        raise CAError(
            f"{OUTLIVES_AUTHORITY} (TTL {format_duration(ttl)} from {now.isoformat()} ends at"
            f" {not_after.isoformat()}, the authority at {authority.not_after.isoformat()})",
            str(spiffe_id),
        )
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
    names.extend(x509.DNSName(name) for name in dns_names)
    builder = (
        _template(authority, is_rsa=isinstance(public_key, rsa.RSAPublicKey))
        .subject_name(_subject(dns_names))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        # The subject is not empty, so the X509-SVID spec lets the SAN be non-critical, as SPIRE has it.
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    leaf = builder.sign(authority.private_key, signature_hash(authority.private_key))
    return (leaf, *authority.signing_chain)


__all__ = ["public_key_from_csr", "sign_x509_svid"]
