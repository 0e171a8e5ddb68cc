"""X.509-SVIDs: a SPIFFE ID, its certificate chain (leaf first) and private key.

Construction checks everything the X509-SVID specification asks of an SVID one holds: the leaf
carries exactly one URI SAN, a SPIFFE ID with a path; it is not a CA, has a key usage with
``digitalSignature`` and without ``keyCertSign``/``cRLSign``, and an extended key usage, if any,
with both ``serverAuth`` and ``clientAuth``; every certificate after the leaf is a CA allowed to
sign certificates; and the private key belongs to the leaf.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, TypeAlias

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_der_private_key,
    load_pem_private_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID

from spiffecore.der import CERTIFICATE_PARSE_ERRORS, dump_der_certificates, dump_pem_certificates, load_der_certificates
from spiffecore.errors import SpiffeIDError, X509SVIDError
from spiffecore.spiffeid import SpiffeID

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
_PRIVATE_KEY_TYPES: Final = (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)
"""The classes of :data:`PrivateKey`, for ``isinstance``."""
MAX_HINT_BYTES: Final = 1024

NO_URI_SAN: Final = "certificate contains no URI SAN"
MANY_URI_SANS: Final = "certificate contains more than one URI SAN"
BAD_URI_SAN: Final = "certificate URI SAN is not a valid SPIFFE ID"
MALFORMED_EXTENSIONS: Final = "certificate extensions are malformed"
LEAF_NO_PATH: Final = "leaf certificate SPIFFE ID must have a path"
LEAF_IS_CA: Final = "leaf certificate must not have CA flag set to true"
LEAF_NO_KEY_USAGE: Final = "leaf certificate must have a key usage extension"
LEAF_NO_DIGITAL_SIGNATURE: Final = "leaf certificate must have 'digitalSignature' set as key usage"
LEAF_KEY_CERT_SIGN: Final = "leaf certificate must not have 'keyCertSign' set as key usage"
LEAF_CRL_SIGN: Final = "leaf certificate must not have 'cRLSign' set as key usage"
LEAF_EKU: Final = "leaf certificate extended key usage must include both 'serverAuth' and 'clientAuth'"
SIGNER_NOT_CA: Final = "signing certificate must have CA flag set to true"
SIGNER_NO_KEY_CERT_SIGN: Final = "signing certificate must have 'keyCertSign' set as key usage"
EMPTY_CHAIN: Final = "certificate chain must not be empty"
BAD_CHAIN: Final = "could not parse certificate chain"
BAD_KEY: Final = "could not parse private key"
ENCRYPTED_KEY: Final = "private key is encrypted (want an unencrypted key)"
UNSUPPORTED_KEY: Final = "private key type is not supported (want EC, RSA or Ed25519)"
KEY_MISMATCH: Final = "private key does not match the leaf certificate's public key"
BAD_LEAF_KEY: Final = "could not read the leaf certificate's public key"
ID_MISMATCH: Final = "SPIFFE ID does not match the leaf certificate"
HINT_TOO_LONG: Final = f"hint must not be longer than {MAX_HINT_BYTES} bytes"
HINT_NOT_UTF8: Final = "hint must be encodable as UTF-8"

_SERVER_AUTH: Final = ExtendedKeyUsageOID.SERVER_AUTH
_CLIENT_AUTH: Final = ExtendedKeyUsageOID.CLIENT_AUTH
# A PEM label shown in errors: the whole "-----BEGIN <label>-----" line, of label characters only.
# Anything looser could run past a broken header into the base64 body of a key.
_PEM_LABEL_RE: Final = re.compile(rb"-----BEGIN ([A-Z0-9 ]{1,40})-----")


def _describe(cert: x509.Certificate) -> str:
    """How a certificate is named in errors: its subject and serial, never key material."""
    try:
        subject = repr(cert.subject.rfc4514_string())
    except ValueError:  # cryptography parses the subject only when asked for it
        subject = "(malformed)"
    return f"subject={subject} serial={cert.serial_number:x}"


def _extensions(cert: x509.Certificate) -> x509.Extensions:
    try:
        return cert.extensions
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as err:
        raise X509SVIDError(f"{MALFORMED_EXTENSIONS} ({err})", _describe(cert)) from err


def _leaf_extensions(
    cert: x509.Certificate,
) -> tuple[list[str], x509.BasicConstraints | None, x509.KeyUsage | None, x509.ExtendedKeyUsage | None]:
    """The extensions the leaf rules read, in one pass: URI SANs, basic constraints, key usages.

    This runs on every handshake, so it compares exact types: cryptography returns these classes
    themselves, and ``isinstance`` against its abstract base classes costs several times more.
    """
    uris: list[str] = []
    constraints = usage = extended = None
    for extension in _extensions(cert):
        value = extension.value
        kind = type(value)
        if kind is x509.SubjectAlternativeName:
            uris = [name.value for name in value if type(name) is x509.UniformResourceIdentifier]
        elif kind is x509.BasicConstraints:
            constraints = value
        elif kind is x509.KeyUsage:
            usage = value
        elif kind is x509.ExtendedKeyUsage:
            extended = value
    return uris, constraints, usage, extended


def _id_from_uris(cert: x509.Certificate, uris: list[str]) -> SpiffeID:
    if not uris:
        raise X509SVIDError(NO_URI_SAN, _describe(cert))
    if len(uris) > 1:
        raise X509SVIDError(MANY_URI_SANS, ", ".join(uris))
    try:
        return SpiffeID.parse(uris[0])
    except SpiffeIDError as err:
        raise X509SVIDError(f"{BAD_URI_SAN} ({err.rule})", uris[0]) from err


def id_from_cert(cert: x509.Certificate) -> SpiffeID:
    """The SPIFFE ID of a certificate: its one URI SAN, which must be a valid SPIFFE ID."""
    return _id_from_uris(cert, _leaf_extensions(cert)[0])


def check_leaf(cert: x509.Certificate) -> SpiffeID:
    """Check the X509-SVID leaf rules and return the leaf's SPIFFE ID."""
    uris, constraints, usage, extended = _leaf_extensions(cert)
    spiffe_id = _id_from_uris(cert, uris)
    if spiffe_id.is_trust_domain_id:
        raise X509SVIDError(LEAF_NO_PATH, str(spiffe_id))
    if constraints is not None and constraints.ca:
        raise X509SVIDError(LEAF_IS_CA, str(spiffe_id))
    if usage is None:
        raise X509SVIDError(LEAF_NO_KEY_USAGE, str(spiffe_id))
    if not usage.digital_signature:
        raise X509SVIDError(LEAF_NO_DIGITAL_SIGNATURE, str(spiffe_id))
    if usage.key_cert_sign:
        raise X509SVIDError(LEAF_KEY_CERT_SIGN, str(spiffe_id))
    if usage.crl_sign:
        raise X509SVIDError(LEAF_CRL_SIGN, str(spiffe_id))
    if extended is not None and (_SERVER_AUTH not in extended or _CLIENT_AUTH not in extended):
        raise X509SVIDError(LEAF_EKU, str(spiffe_id))
    return spiffe_id


def check_signing_cert(cert: x509.Certificate) -> None:
    """Check that a certificate after the leaf may sign certificates (CA, with keyCertSign).

    Exact types, as in :func:`_leaf_extensions`: this too runs for every chain an SVID is built from.
    """
    is_ca = False
    can_sign = False
    for extension in _extensions(cert):
        value = extension.value
        kind = type(value)
        if kind is x509.BasicConstraints:
            is_ca = value.ca
        elif kind is x509.KeyUsage:
            can_sign = value.key_cert_sign
    if not is_ca:
        raise X509SVIDError(SIGNER_NOT_CA, _describe(cert))
    if not can_sign:
        raise X509SVIDError(SIGNER_NO_KEY_CERT_SIGN, _describe(cert))


@dataclass(frozen=True, slots=True, kw_only=True)
class X509SVID:
    """An X.509-SVID one holds: ID, chain (leaf first) and the leaf's private key.

    The private key is left out of ``repr`` and comparisons.
    """

    id: SpiffeID
    cert_chain: tuple[x509.Certificate, ...]
    private_key: PrivateKey = field(repr=False, compare=False)
    hint: str = ""

    def __post_init__(self) -> None:
        if not self.cert_chain:
            raise X509SVIDError(EMPTY_CHAIN)
        leaf_id = check_leaf(self.cert_chain[0])
        if leaf_id != self.id:
            raise X509SVIDError(f"{ID_MISMATCH} ({leaf_id})", str(self.id))
        self._check_signers_key_and_hint()

    def _check_signers_key_and_hint(self) -> None:
        """The checks after the leaf rules: signing certificates, private key, hint."""
        for cert in self.cert_chain[1:]:
            check_signing_cert(cert)
        if not isinstance(self.private_key, _PRIVATE_KEY_TYPES):
            raise X509SVIDError(UNSUPPORTED_KEY, type(self.private_key).__name__)
        try:
            leaf_key = self.cert_chain[0].public_key()
        except (ValueError, UnsupportedAlgorithm) as err:  # cryptography parses the key only now
            raise X509SVIDError(f"{BAD_LEAF_KEY} ({err})", str(self.id)) from err
        if self.private_key.public_key() != leaf_key:
            raise X509SVIDError(KEY_MISMATCH, str(self.id))
        try:
            hint_bytes = len(self.hint.encode("utf-8"))
        except UnicodeEncodeError as err:
            raise X509SVIDError(HINT_NOT_UTF8, self.hint) from err
        if hint_bytes > MAX_HINT_BYTES:
            raise X509SVIDError(HINT_TOO_LONG, self.hint)

    @classmethod
    def from_chain(
        cls, cert_chain: tuple[x509.Certificate, ...], private_key: PrivateKey, *, hint: str = ""
    ) -> X509SVID:
        """Build an SVID from a parsed chain and key, taking the ID from the leaf."""
        if not cert_chain:
            raise X509SVIDError(EMPTY_CHAIN)
        # The ID comes from check_leaf itself, so the constructor's second run of the leaf rules
        # (and its ID comparison) is skipped; every other check still runs.
        svid = object.__new__(cls)
        object.__setattr__(svid, "id", check_leaf(cert_chain[0]))
        object.__setattr__(svid, "cert_chain", cert_chain)
        object.__setattr__(svid, "private_key", private_key)
        object.__setattr__(svid, "hint", hint)
        svid._check_signers_key_and_hint()
        return svid

    @classmethod
    def load_pem(cls, cert_chain_pem: bytes, private_key_pem: bytes, *, hint: str = "") -> X509SVID:
        """Parse a PEM chain (leaf first) and a PEM private key (PKCS#8, SEC1 or PKCS#1)."""
        try:
            chain = tuple(x509.load_pem_x509_certificates(cert_chain_pem))
        except CERTIFICATE_PARSE_ERRORS as err:
            raise X509SVIDError(f"{BAD_CHAIN} ({err})", _pem_label(cert_chain_pem)) from err
        try:
            key = load_pem_private_key(private_key_pem, password=None)
        except TypeError as err:  # cryptography's way of saying "encrypted, and no password given"
            raise X509SVIDError(ENCRYPTED_KEY, _pem_label(private_key_pem)) from err
        except (ValueError, UnsupportedAlgorithm) as err:
            raise X509SVIDError(f"{BAD_KEY} as unencrypted PEM", _pem_label(private_key_pem)) from err
        return cls.from_chain(chain, _supported_key(key), hint=hint)

    @classmethod
    def load_der(cls, cert_chain_der: bytes, private_key_der: bytes, *, hint: str = "") -> X509SVID:
        """Parse concatenated DER certificates (leaf first) and a DER PKCS#8 private key.

        This is the form of ``x509_svid`` and ``x509_svid_key`` in the Workload API.
        """
        try:
            chain = load_der_certificates(cert_chain_der)
        except CERTIFICATE_PARSE_ERRORS as err:
            raise X509SVIDError(f"{BAD_CHAIN} as DER ({err})", f"{len(cert_chain_der)} bytes") from err
        try:
            key = load_der_private_key(private_key_der, password=None)
        except TypeError as err:  # cryptography's way of saying "encrypted, and no password given"
            raise X509SVIDError(ENCRYPTED_KEY, f"{len(private_key_der)} bytes") from err
        except (ValueError, UnsupportedAlgorithm) as err:
            raise X509SVIDError(f"{BAD_KEY} as unencrypted DER PKCS#8", f"{len(private_key_der)} bytes") from err
        return cls.from_chain(chain, _supported_key(key), hint=hint)

    @property
    def leaf(self) -> x509.Certificate:
        return self.cert_chain[0]

    @property
    def expires_at(self) -> datetime:
        """When the leaf stops being valid (UTC)."""
        return self.cert_chain[0].not_valid_after_utc

    @property
    def issued_at(self) -> datetime:
        """When the leaf became valid (UTC)."""
        return self.cert_chain[0].not_valid_before_utc

    def cert_chain_pem(self) -> bytes:
        return dump_pem_certificates(self.cert_chain)

    def cert_chain_der(self) -> bytes:
        return dump_der_certificates(self.cert_chain)

    def private_key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM. Handle with care: write 0600, never log."""
        return self.private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())

    def private_key_der(self) -> bytes:
        """The private key as unencrypted DER PKCS#8, the Workload API's ``x509_svid_key``."""
        return self.private_key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())


def _supported_key(key: object) -> PrivateKey:
    if isinstance(key, _PRIVATE_KEY_TYPES):
        return key
    raise X509SVIDError(UNSUPPORTED_KEY, type(key).__name__)


def _pem_label(data: bytes) -> str:
    """Describe PEM input without quoting it (it may hold a key): its size and first label."""
    start = data.find(b"-----BEGIN ")
    if start < 0:
        return f"{len(data)} bytes, no PEM block"
    match = _PEM_LABEL_RE.match(data, start)
    if match is None:
        return f"{len(data)} bytes, first block has a malformed header"
    return f"{len(data)} bytes, first block {match.group(1).decode('ascii')!r}"


__all__ = [
    "X509SVID",
    "PrivateKey",
    "check_leaf",
    "check_signing_cert",
    "id_from_cert",
]
