"""Concatenated DER certificates, the wire form of chains and bundles in the Workload API.

cryptography parses one DER certificate at a time; the Workload API sends several back to back
(``x509_svid`` is the chain leaf first, ``bundle`` the roots). This splits them by reading each
outer ASN.1 SEQUENCE header.
"""

from __future__ import annotations

from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from spiffecore.errors import SpiffeError

_SEQUENCE = 0x30

CERTIFICATE_PARSE_ERRORS = (ValueError, x509.InvalidVersion)
"""What cryptography raises for a malformed certificate (``InvalidVersion`` is no ``ValueError``)."""


class DERError(SpiffeError, ValueError):
    """The bytes are not a sequence of whole DER certificates. The message states why.

    The quoted value is the bytes of the offending element header, never the whole input.
    """

    layer = "der"


def split_der(data: bytes) -> list[bytes]:
    """Split concatenated DER SEQUENCEs, rejecting any trailing garbage."""
    view = memoryview(data)
    parts: list[bytes] = []
    offset = 0
    end = len(view)
    while offset < end:
        if view[offset] != _SEQUENCE:
            raise DERError(f"expected an ASN.1 SEQUENCE (tag 0x30) at byte {offset}", bytes(view[offset : offset + 1]))
        if offset + 2 > end:
            raise DERError(f"truncated length at byte {offset + 1}", bytes(view[offset:end]))
        first = view[offset + 1]
        header = 2
        if first < 0x80:
            length = first
        else:
            count = first & 0x7F
            if count == 0 or count > 4:
                raise DERError(f"unsupported length encoding at byte {offset + 1}", bytes(view[offset : offset + 2]))
            if offset + 2 + count > end:
                raise DERError(f"truncated length at byte {offset + 1}", bytes(view[offset:end]))
            length = int.from_bytes(view[offset + 2 : offset + 2 + count], "big")
            header += count
        stop = offset + header + length
        if stop > end:
            raise DERError(
                f"element at byte {offset} claims {length} bytes but only {end - offset - header} remain",
                bytes(view[offset : offset + header]),
            )
        parts.append(bytes(view[offset:stop]))
        offset = stop
    return parts


def load_der_certificates(data: bytes) -> tuple[x509.Certificate, ...]:
    """Parse concatenated DER certificates. Raises :class:`DERError` (a ``ValueError``) for any bad input."""
    certificates: list[x509.Certificate] = []
    offset = 0
    for part in split_der(data):
        try:
            certificates.append(x509.load_der_x509_certificate(part))
        except CERTIFICATE_PARSE_ERRORS as err:
            raise DERError(f"element at byte {offset} is not an X.509 certificate ({err})") from err
        offset += len(part)
    return tuple(certificates)


def dump_der_certificates(certificates: Iterable[x509.Certificate]) -> bytes:
    """Concatenate the DER encodings of ``certificates``."""
    return b"".join(cert.public_bytes(Encoding.DER) for cert in certificates)


def dump_pem_certificates(certificates: Iterable[x509.Certificate]) -> bytes:
    """Concatenate the PEM encodings of ``certificates``."""
    return b"".join(cert.public_bytes(Encoding.PEM) for cert in certificates)
