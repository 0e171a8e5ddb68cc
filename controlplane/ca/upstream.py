"""An upstream CA on disk that signs our X.509 authorities as intermediates.

Two PEM files: the certificate file holds the upstream CA certificate first, then the rest of its
chain up to and including the self-signed root; the key file holds that first certificate's key.
Each problem gets its own message naming the file: unreadable, unparsable, key mismatch, not a
CA (or not allowed to sign CAs below it), not a chain, not ending at a root, expired, or ending
before an authority of ``ca_ttl`` would.

The trust bundle then holds the upstream root, never our intermediates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from controlplane.ca.errors import CAConfigError, CAError
from controlplane.ca.keys import SigningKey, load_private_key_pem
from controlplane.ca.schedule import format_duration, require_aware
from spiffecore import X509SVIDError
from spiffecore.der import CERTIFICATE_PARSE_ERRORS
from spiffecore.x509svid import check_signing_cert

UNREADABLE: Final = "could not read upstream CA file"
BAD_CERTS: Final = "could not parse upstream certificate file as PEM certificates"
KEY_MISMATCH: Final = "upstream private key does not match the upstream certificate (the first in its file)"
NOT_A_CA: Final = "upstream certificate cannot sign CA certificates"
PATH_LENGTH: Final = "upstream certificate has path length constraint 0, so it cannot sign an intermediate CA"
NOT_A_CHAIN: Final = "upstream certificate file is not a chain: a certificate is not signed by the one after it"
NO_ROOT: Final = "upstream certificate file must end with the self-signed root of the upstream chain"
NOT_YET_VALID: Final = "upstream certificate is not valid yet"
EXPIRED: Final = "upstream certificate has expired"


def _describe(cert: x509.Certificate) -> str:
    try:
        subject = cert.subject.rfc4514_string()
    except ValueError:
        subject = "(malformed)"
    return f"subject={subject!r} serial={cert.serial_number:x}"


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise CAError(f"{UNREADABLE} ({err.strerror or err})", str(path)) from err


@dataclass(frozen=True, slots=True, kw_only=True)
class Upstream:
    """The upstream signing certificate, its key, and its chain (that certificate first, the root last)."""

    chain: tuple[x509.Certificate, ...]
    private_key: SigningKey = field(repr=False, compare=False)
    source: str = ""
    """The certificate file's name, for messages."""

    def __post_init__(self) -> None:
        if not self.chain:
            raise CAError(BAD_CERTS, self.source)
        first = self.chain[0]
        if self.private_key.public_key() != first.public_key():
            raise CAError(KEY_MISMATCH, self.source)
        for index, cert in enumerate(self.chain):
            try:
                check_signing_cert(cert)
            except X509SVIDError as err:
                raise CAError(f"{NOT_A_CA} ({err.rule}; certificate {index + 1} in the file)", self.source) from err
        constraints = first.extensions.get_extension_for_class(x509.BasicConstraints).value
        if constraints.path_length == 0:
            raise CAError(PATH_LENGTH, self.source)
        for index, (cert, issuer) in enumerate(zip(self.chain, self.chain[1:], strict=False)):
            if not _issued_by(cert, issuer):
                raise CAError(f"{NOT_A_CHAIN} (certificate {index + 1} by certificate {index + 2})", self.source)
        root = self.chain[-1]
        if root.issuer != root.subject or not _issued_by(root, root):
            raise CAError(NO_ROOT, self.source)

    @property
    def certificate(self) -> x509.Certificate:
        """The certificate that signs our intermediates."""
        return self.chain[0]

    @property
    def not_after(self) -> datetime:
        """When the first certificate of the chain expires: nothing signed below may outlive it."""
        return min(cert.not_valid_after_utc for cert in self.chain)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path, *, now: datetime, ca_ttl: timedelta) -> Upstream:
        """Read and check the upstream CA files; raise :class:`CAError` naming the file at fault."""
        cert_data = _read(cert_path)
        key_data = _read(key_path)
        try:
            chain = tuple(x509.load_pem_x509_certificates(cert_data))
        except CERTIFICATE_PARSE_ERRORS as err:
            raise CAError(BAD_CERTS, str(cert_path)) from err
        key = load_private_key_pem(key_data, source=str(key_path))
        upstream = cls(chain=chain, private_key=key, source=str(cert_path))
        upstream.check(now=now, ca_ttl=ca_ttl)
        return upstream

    def check(self, *, now: datetime, ca_ttl: timedelta) -> None:
        """Raise unless every certificate of the chain is valid from ``now`` to ``now + ca_ttl``."""
        require_aware(now)
        for cert in self.chain:
            if now < cert.not_valid_before_utc:
                raise CAError(
                    f"{NOT_YET_VALID} (until {cert.not_valid_before_utc.isoformat()}; {_describe(cert)})", self.source
                )
            if now >= cert.not_valid_after_utc:
                raise CAError(f"{EXPIRED} (at {cert.not_valid_after_utc.isoformat()}; {_describe(cert)})", self.source)
        ends = now.replace(microsecond=0) + ca_ttl
        if ends > self.not_after:
            raise CAConfigError(
                f"ca_ttl {format_duration(ca_ttl)} outlives the upstream chain: an authority created now would"
                f" expire at {ends.isoformat()}, the upstream chain at {self.not_after.isoformat()}"
                f" (in {format_duration(self.not_after - now.replace(microsecond=0))});"
                " renew the upstream CA or lower ca_ttl",
                self.source,
            )


__all__ = ["Upstream"]
