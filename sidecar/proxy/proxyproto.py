"""PROXY protocol version 2 headers (HAProxy's ``proxy-protocol.txt``, section 2.2): bytes in, bytes out.

With ``--proxy-protocol`` the proxy writes one header to the upstream before any payload, so a
legacy service behind it learns the real client address and, as TLVs, how the client was
authenticated. This module does no I/O: :func:`encode` builds a header, :func:`decode` parses one
(for tests, for peers written in Python, and for diagnostics).

The TLVs we send, in the spirit of ghostunnel's ``--proxy-protocol-mode tls-full``:

* ``PP2_TYPE_SSL`` (0x20): the client flag bits (``PP2_CLIENT_SSL``, ``PP2_CLIENT_CERT_CONN``,
  ``PP2_CLIENT_CERT_SESS``), ``verify`` = 0 because the peer's X.509-SVID was verified, and the
  sub-TLVs ``PP2_SUBTYPE_SSL_VERSION`` (0x21, ``"TLSv1.3"``), ``PP2_SUBTYPE_SSL_CIPHER`` (0x23)
  and, only when the certificate has one, ``PP2_SUBTYPE_SSL_CN`` (0x22). The CN is not the
  identity: an X.509-SVID's identity is its URI SAN, and the spec has no sub-type for it.
* ``PP2_TYPE_SPIFFE_ID`` (**0xE0**, the first of the application-specific range 0xE0-0xEF that
  the spec promises never to assign): the peer's SPIFFE ID as a UTF-8 URI, such as
  ``spiffe://example.org/ns/prod/sa/web``. HAProxy 2.9 and later read it with
  ``fc_pp_tlv(0xE0)``, e.g. ``http-request set-header X-Spiffe-Id %[fc_pp_tlv(0xE0)]``.
* optionally ``PP2_TYPE_AUTHORITY`` (0x02, the client's SNI), ``PP2_TYPE_UNIQUE_ID`` (0x05, up to
  128 bytes) and ``PP2_TYPE_CRC32C`` (0x03, a checksum of the whole header).

Encoding runs once per forwarded connection, so the constant parts are precomputed and the
header is assembled with precompiled ``struct`` formats. The CRC-32C is table-driven pure Python
(neither the standard library nor the project's dependencies provide CRC-32C); it costs some
microseconds per header, is off by default, and is never on the byte-relaying path.
"""

from __future__ import annotations

import enum
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from sidecar.proxy.errors import ProxyError
from spiffecore import SpiffeID, SpiffeIDError

__all__ = [
    "LOCAL_HEADER",
    "PP2_CLIENT_CERT_CONN",
    "PP2_CLIENT_CERT_SESS",
    "PP2_CLIENT_SSL",
    "PP2_SUBTYPE_SSL_CIPHER",
    "PP2_SUBTYPE_SSL_CN",
    "PP2_SUBTYPE_SSL_KEY_ALG",
    "PP2_SUBTYPE_SSL_SIG_ALG",
    "PP2_SUBTYPE_SSL_VERSION",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NETNS",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_SPIFFE_ID",
    "PP2_TYPE_SSL",
    "PP2_TYPE_UNIQUE_ID",
    "SIGNATURE",
    "TLV",
    "Address",
    "Command",
    "DecodedAddress",
    "Family",
    "Header",
    "HeaderError",
    "IncompleteHeaderError",
    "ProxyProtocolError",
    "SSLInfo",
    "Transport",
    "connection_tlvs",
    "crc32c",
    "decode",
    "encode",
]

SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
"""The 12 bytes every version 2 header starts with."""

PP2_TYPE_ALPN: Final = 0x01
PP2_TYPE_AUTHORITY: Final = 0x02
PP2_TYPE_CRC32C: Final = 0x03
PP2_TYPE_NOOP: Final = 0x04
PP2_TYPE_UNIQUE_ID: Final = 0x05
PP2_TYPE_SSL: Final = 0x20
PP2_SUBTYPE_SSL_VERSION: Final = 0x21
PP2_SUBTYPE_SSL_CN: Final = 0x22
PP2_SUBTYPE_SSL_CIPHER: Final = 0x23
PP2_SUBTYPE_SSL_SIG_ALG: Final = 0x24
PP2_SUBTYPE_SSL_KEY_ALG: Final = 0x25
PP2_TYPE_NETNS: Final = 0x30
PP2_TYPE_SPIFFE_ID: Final = 0xE0
"""Ours: the peer's SPIFFE ID, in the spec's application-specific range (0xE0-0xEF)."""

PP2_CLIENT_SSL: Final = 0x01
PP2_CLIENT_CERT_CONN: Final = 0x02
PP2_CLIENT_CERT_SESS: Final = 0x04

MAX_UNIQUE_ID_BYTES: Final = 128
UNIX_PATH_BYTES: Final = 108
_HEADER_BYTES: Final = 16
_MAX_LENGTH: Final = 0xFFFF

Address = tuple[str, int] | tuple[str, int, int, int] | str
"""What ``getpeername()``/``getsockname()`` return: ``(host, port)`` for IPv4, ``(host, port,
flowinfo, scope_id)`` or ``(host, port)`` for IPv6, a path ``str`` for a unix socket (``""`` for
an unnamed client socket)."""

DecodedAddress = tuple[str, int] | str
"""An address read from a header: ``(ip, port)`` with the IP in canonical text, or a unix path."""


class Command(enum.IntEnum):
    LOCAL = 0x0
    PROXY = 0x1


class Family(enum.IntEnum):
    UNSPEC = 0x0
    INET = 0x1
    INET6 = 0x2
    UNIX = 0x3


class Transport(enum.IntEnum):
    UNSPEC = 0x0
    STREAM = 0x1
    DGRAM = 0x2


_ADDRESS_BYTES: Final = {Family.UNSPEC: 0, Family.INET: 12, Family.INET6: 36, Family.UNIX: 216}
_VALID_FAMILY_BYTES: Final = frozenset({0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32})
# TLVs that make sense once only: a second SPIFFE ID or checksum would be ambiguous.
_SINGLE_TLVS: Final = frozenset(
    {PP2_TYPE_ALPN, PP2_TYPE_AUTHORITY, PP2_TYPE_CRC32C, PP2_TYPE_UNIQUE_ID, PP2_TYPE_SSL, PP2_TYPE_SPIFFE_ID}
)
_SSL_NAMED_SUBTYPES: Final = frozenset({PP2_SUBTYPE_SSL_VERSION, PP2_SUBTYPE_SSL_CN, PP2_SUBTYPE_SSL_CIPHER})

_PREFIX: Final = struct.Struct(">12sBBH")
_INET4: Final = struct.Struct(">12sBBH4s4sHH")
_INET6: Final = struct.Struct(">12sBBH16s16sHH")
_UNIX: Final = struct.Struct(">12sBBH108s108s")
_TLV_HEAD: Final = struct.Struct(">BH")
_SSL_HEAD: Final = struct.Struct(">BI")
_CRC_TLV_BYTES: Final = 7
_CRC_TLV_HEAD: Final = _TLV_HEAD.pack(PP2_TYPE_CRC32C, 4)
_VER_PROXY: Final = 0x21
_VER_LOCAL: Final = 0x20
_V4_MAPPED_PREFIX: Final = b"\x00" * 10 + b"\xff\xff"


class ProxyProtocolError(ProxyError, ValueError):
    """Root of this module's errors. Raised as such when the caller misuses :func:`encode`."""

    layer = "proxyproto"


class HeaderError(ProxyProtocolError):
    """The bytes are not a valid PROXY protocol v2 header: the peer misbehaved."""


class IncompleteHeaderError(HeaderError):
    """The bytes so far are a valid beginning, but the header is longer. ``needed`` is how many
    more bytes it takes at least. (A receiver should reject the connection anyway: a sender must
    send the whole header at once.)"""

    def __init__(self, rule: str, needed: int) -> None:
        super().__init__(rule)
        self.needed = needed


@dataclass(frozen=True, slots=True)
class TLV:
    """One type-length-value vector: ``type`` 0-255 and up to 65535 bytes of ``value``."""

    type: int
    value: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.type, int) or not 0 <= self.type <= 0xFF:
            raise ProxyProtocolError("a TLV type must be an int from 0 to 255", self.type)
        if not isinstance(self.value, bytes):
            raise ProxyProtocolError(f"a TLV value must be bytes, not {type(self.value).__name__}")
        if len(self.value) > _MAX_LENGTH:
            raise ProxyProtocolError(f"a TLV value must not be longer than {_MAX_LENGTH} bytes", len(self.value))

    def to_bytes(self) -> bytes:
        return _TLV_HEAD.pack(self.type, len(self.value)) + self.value

    @classmethod
    def spiffe_id(cls, spiffe_id: SpiffeID) -> TLV:
        """``PP2_TYPE_SPIFFE_ID`` (0xE0) carrying ``spiffe_id`` as a URI."""
        return cls(PP2_TYPE_SPIFFE_ID, str(spiffe_id).encode())

    @classmethod
    def authority(cls, host: str) -> TLV:
        """``PP2_TYPE_AUTHORITY`` (0x02): the host name the client asked for (its SNI)."""
        return cls(PP2_TYPE_AUTHORITY, host.encode())

    @classmethod
    def unique_id(cls, value: bytes) -> TLV:
        """``PP2_TYPE_UNIQUE_ID`` (0x05): an opaque connection ID of at most 128 bytes."""
        if len(value) > MAX_UNIQUE_ID_BYTES:
            raise ProxyProtocolError(f"a unique ID must not be longer than {MAX_UNIQUE_ID_BYTES} bytes", len(value))
        return cls(PP2_TYPE_UNIQUE_ID, value)


@dataclass(frozen=True, slots=True, kw_only=True)
class SSLInfo:
    """The value of a ``PP2_TYPE_SSL`` TLV.

    ``client`` is the bit field of ``PP2_CLIENT_*`` flags; ``verify`` is 0 when the client's
    certificate was verified. ``version``, ``cipher`` and ``cn`` are the sub-TLVs 0x21, 0x23 and
    0x22; ``extra`` holds any other sub-TLVs, in order.
    """

    client: int = PP2_CLIENT_SSL
    verify: int = 0
    version: str | None = None
    cipher: str | None = None
    cn: str | None = None
    extra: tuple[TLV, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.client <= 0xFF:
            raise ProxyProtocolError("the SSL client field must be an int from 0 to 255", self.client)
        if not 0 <= self.verify <= 0xFFFFFFFF:
            raise ProxyProtocolError("the SSL verify field must be an int from 0 to 2**32 - 1", self.verify)
        for sub in self.extra:
            if sub.type in _SSL_NAMED_SUBTYPES:
                raise ProxyProtocolError(
                    f"sub-TLV 0x{sub.type:02X} has its own field in SSLInfo: set version, cipher or cn"
                )

    def to_tlv(self) -> TLV:
        parts = [_SSL_HEAD.pack(self.client, self.verify)]
        for sub_type, text in (
            (PP2_SUBTYPE_SSL_VERSION, self.version),
            (PP2_SUBTYPE_SSL_CIPHER, self.cipher),
            (PP2_SUBTYPE_SSL_CN, self.cn),
        ):
            if text is not None:
                raw = text.encode()
                parts.append(_TLV_HEAD.pack(sub_type, len(raw)) + raw)
        parts.extend(sub.to_bytes() for sub in self.extra)
        return TLV(PP2_TYPE_SSL, b"".join(parts))

    @classmethod
    def from_tlv(cls, tlv: TLV) -> SSLInfo:
        """Parse the value of a ``PP2_TYPE_SSL`` TLV; raises :class:`HeaderError` if malformed."""
        if tlv.type != PP2_TYPE_SSL:
            raise ProxyProtocolError(f"not an SSL TLV: its type is 0x{tlv.type:02X}, not 0x20")
        value = tlv.value
        if len(value) < _SSL_HEAD.size:
            raise HeaderError(
                f"the SSL TLV is {len(value)} bytes long, shorter than its 5-byte client and verify fields"
            )
        client, verify = _SSL_HEAD.unpack_from(value)
        named: dict[int, str] = {}
        extra: list[TLV] = []
        for sub in _parse_tlvs(memoryview(value)[_SSL_HEAD.size :], "SSL sub-TLV", offset=_SSL_HEAD.size):
            if sub.type in _SSL_NAMED_SUBTYPES:
                if sub.type in named:
                    raise HeaderError(f"the SSL TLV has more than one sub-TLV of type 0x{sub.type:02X}")
                named[sub.type] = _text(sub, f"SSL sub-TLV 0x{sub.type:02X}")
            else:
                extra.append(sub)
        return cls(
            client=client,
            verify=verify,
            version=named.get(PP2_SUBTYPE_SSL_VERSION),
            cipher=named.get(PP2_SUBTYPE_SSL_CIPHER),
            cn=named.get(PP2_SUBTYPE_SSL_CN),
            extra=tuple(extra),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Header:
    """A decoded header. For ``LOCAL`` and for the ``UNSPEC`` family, ``source`` and
    ``destination`` are None: the receiver uses the real connection's endpoints. ``tlvs`` holds
    every TLV in order, the checksum included (it was verified)."""

    command: Command
    family: Family
    transport: Transport
    source: DecodedAddress | None
    destination: DecodedAddress | None
    tlvs: tuple[TLV, ...] = ()

    def tlv(self, tlv_type: int) -> bytes | None:
        """The value of the first TLV of ``tlv_type``, or None."""
        for tlv in self.tlvs:
            if tlv.type == tlv_type:
                return tlv.value
        return None

    @property
    def spiffe_id(self) -> SpiffeID | None:
        value = self.tlv(PP2_TYPE_SPIFFE_ID)
        return None if value is None else _parse_spiffe_id(value)

    @property
    def ssl(self) -> SSLInfo | None:
        for tlv in self.tlvs:
            if tlv.type == PP2_TYPE_SSL:
                return SSLInfo.from_tlv(tlv)
        return None

    @property
    def authority(self) -> str | None:
        value = self.tlv(PP2_TYPE_AUTHORITY)
        return None if value is None else _text(TLV(PP2_TYPE_AUTHORITY, value), "the authority TLV")

    @property
    def unique_id(self) -> bytes | None:
        return self.tlv(PP2_TYPE_UNIQUE_ID)


def connection_tlvs(
    *,
    peer_id: SpiffeID | None,
    tls_version: str,
    cipher: str,
    cn: str | None = None,
    client_cert: bool = True,
    resumed: bool = False,
    authority: str | None = None,
    unique_id: bytes | None = None,
) -> tuple[TLV, ...]:
    """The TLVs describing a verified mTLS client: SSL (with version, cipher, CN), the SPIFFE ID,
    and the optional authority and unique ID.

    ``client_cert`` sets ``PP2_CLIENT_CERT_CONN`` (the certificate came on this connection) unless
    ``resumed``, when the session was resumed and ``PP2_CLIENT_CERT_SESS`` is set instead.
    ``verify`` is 0 whenever a certificate was presented: the proxy forwards nothing else.
    """
    flags = PP2_CLIENT_SSL
    if client_cert:
        flags |= PP2_CLIENT_CERT_SESS if resumed else PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS
    tlvs = [SSLInfo(client=flags, verify=0 if client_cert else 1, version=tls_version, cipher=cipher, cn=cn).to_tlv()]
    if peer_id is not None:
        tlvs.append(TLV.spiffe_id(peer_id))
    if authority is not None:
        tlvs.append(TLV.authority(authority))
    if unique_id is not None:
        tlvs.append(TLV.unique_id(unique_id))
    return tuple(tlvs)


def encode(
    source: Address | None, destination: Address | None, *, tlvs: Sequence[TLV] = (), crc: bool = False
) -> bytes:
    """Build a header: ``PROXY`` over TCP/IPv4, TCP/IPv6 or a unix stream socket from the family of
    the addresses, or ``LOCAL`` (family ``UNSPEC``) when both are None. An IPv4 address paired with
    an IPv6 one is sent as IPv4-mapped IPv6. ``crc`` appends a ``PP2_TYPE_CRC32C`` TLV.

    Raises :class:`ProxyProtocolError` for addresses that cannot be encoded or a header over 65535
    bytes.
    """
    tail = b"".join([_TLV_HEAD.pack(t.type, len(t.value)) + t.value for t in tlvs]) if tlvs else b""
    extra = len(tail) + (_CRC_TLV_BYTES if crc else 0)
    if source is None or destination is None:
        if source is not None or destination is not None:
            raise ProxyProtocolError("source and destination must both be addresses, or both None for LOCAL")
        header = _PREFIX.pack(SIGNATURE, _VER_LOCAL, 0x00, _length(extra)) + tail
    elif isinstance(source, str) or isinstance(destination, str):
        if not (isinstance(source, str) and isinstance(destination, str)):
            raise ProxyProtocolError("cannot mix a unix address with an IP address", f"{source!r} -> {destination!r}")
        header = (
            _UNIX.pack(SIGNATURE, _VER_PROXY, 0x31, _length(216 + extra), _unix_path(source), _unix_path(destination))
            + tail
        )
    else:
        src_ip, src_port = _ip(source)
        dst_ip, dst_port = _ip(destination)
        try:
            if len(src_ip) == 4 and len(dst_ip) == 4:
                prefix = _INET4.pack(
                    SIGNATURE, _VER_PROXY, 0x11, _length(12 + extra), src_ip, dst_ip, src_port, dst_port
                )
            else:
                if len(src_ip) == 4:
                    src_ip = _V4_MAPPED_PREFIX + src_ip
                if len(dst_ip) == 4:
                    dst_ip = _V4_MAPPED_PREFIX + dst_ip
                prefix = _INET6.pack(
                    SIGNATURE, _VER_PROXY, 0x21, _length(36 + extra), src_ip, dst_ip, src_port, dst_port
                )
        except struct.error:
            raise ProxyProtocolError(
                "a port must be an int from 0 to 65535", f"{source!r} -> {destination!r}"
            ) from None
        header = prefix + tail
    if crc:
        header += _CRC_TLV_HEAD
        header += crc32c(header + b"\x00\x00\x00\x00").to_bytes(4, "big")
    return header


def decode(data: bytes | bytearray | memoryview) -> tuple[Header, int]:
    """Parse the header at the start of ``data``; return it and its length in bytes (the bytes
    after it are payload). Reads nothing past ``data``.

    Raises :class:`IncompleteHeaderError` when ``data`` is a valid but partial header and
    :class:`HeaderError` for anything malformed: a wrong signature, version, command, family or
    length, an address block too short for its family, a truncated or duplicated TLV, a
    checksum that does not match, or an SSL, SPIFFE-ID, authority or unique-ID TLV that does not
    parse.
    """
    view = memoryview(data).cast("B")
    if len(view) < _HEADER_BYTES:
        got = bytes(view)
        _check_prefix(got)
        raise IncompleteHeaderError(
            f"incomplete header: got {len(got)} bytes, a header has at least {_HEADER_BYTES}",
            _HEADER_BYTES - len(got),
        )
    _check_prefix(bytes(view[:_HEADER_BYTES]))
    _, ver_cmd, fam, length = _PREFIX.unpack_from(view)
    total = _HEADER_BYTES + length
    if len(view) < total:
        raise IncompleteHeaderError(
            f"incomplete header: its length field says {total} bytes, got {len(view)}", total - len(view)
        )
    command = Command(ver_cmd & 0x0F)
    family, transport = Family(fam >> 4), Transport(fam & 0x0F)
    address_bytes = _ADDRESS_BYTES[family]
    if length < address_bytes:
        raise HeaderError(
            f"the address block is {length} bytes, too short for family {family.name} ({address_bytes} bytes)"
        )
    source: DecodedAddress | None = None
    destination: DecodedAddress | None = None
    if command is Command.PROXY:
        if family is Family.INET:
            src, dst, src_port, dst_port = struct.unpack_from(">4s4sHH", view, _HEADER_BYTES)
            source = (socket.inet_ntop(socket.AF_INET, src), src_port)
            destination = (socket.inet_ntop(socket.AF_INET, dst), dst_port)
        elif family is Family.INET6:
            src, dst, src_port, dst_port = struct.unpack_from(">16s16sHH", view, _HEADER_BYTES)
            source = (socket.inet_ntop(socket.AF_INET6, src), src_port)
            destination = (socket.inet_ntop(socket.AF_INET6, dst), dst_port)
        elif family is Family.UNIX:
            src, dst = struct.unpack_from(">108s108s", view, _HEADER_BYTES)
            source, destination = _decode_unix(src), _decode_unix(dst)
    start = _HEADER_BYTES + address_bytes
    tlvs = _parse_tlvs(view[start:total], "TLV", offset=start)
    header = Header(
        command=command, family=family, transport=transport, source=source, destination=destination, tlvs=tlvs
    )
    _check_tlvs(header, view[:total], start)
    return header, total


def _crc_table() -> tuple[int, ...]:
    # The reflected Castagnoli polynomial 0x1EDC6F41 (RFC 4960 appendix B), one entry per byte value.
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE: Final = _crc_table()


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C (Castagnoli), as the ``PP2_TYPE_CRC32C`` TLV and iSCSI/SCTP use it."""
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _length(length: int) -> int:
    if length > _MAX_LENGTH:
        raise ProxyProtocolError(f"a header must not be longer than 16 + {_MAX_LENGTH} bytes", 16 + length)
    return length


def _ip(address: tuple[str, int] | tuple[str, int, int, int]) -> tuple[bytes, int]:
    host, port = address[0], address[1]
    if not isinstance(host, str) or not isinstance(port, int) or isinstance(port, bool):
        raise ProxyProtocolError("an IP address must be a (host, port) tuple of a str and an int", repr(address))
    try:
        if ":" in host:
            return socket.inet_pton(socket.AF_INET6, host.partition("%")[0]), port
        return socket.inet_pton(socket.AF_INET, host), port
    except OSError:
        raise ProxyProtocolError("not an IPv4 or IPv6 address", host) from None


def _unix_path(path: str) -> bytes:
    raw = os.fsencode(path)
    if b"\x00" in raw:
        raise ProxyProtocolError("a unix address must be a filesystem path without NUL bytes", path)
    if len(raw) > UNIX_PATH_BYTES:
        raise ProxyProtocolError(f"a unix address must not be longer than {UNIX_PATH_BYTES} bytes", path)
    return raw


def _decode_unix(raw: bytes) -> str:
    # A path ends at its first NUL; an unnamed socket (a connecting client) is all NULs.
    path, _, _ = raw.partition(b"\x00")
    return os.fsdecode(path)


def _check_prefix(got: bytes) -> None:
    """Check the (at most 16) first bytes: signature, version, command and family."""
    signature = got[:12]
    if got.startswith(b"PROXY "):
        raise HeaderError("a PROXY protocol v1 (text) header: only version 2 is accepted", got[:12])
    if signature != SIGNATURE[: len(signature)]:
        raise HeaderError("not a PROXY protocol v2 header: the 12-byte signature does not match", got[:12])
    if len(got) > 12:
        version, command = got[12] >> 4, got[12] & 0x0F
        if version != 2:
            raise HeaderError(f"unsupported version {version}: only version 2 is accepted", got[12:13])
        if command not in (Command.LOCAL, Command.PROXY):
            raise HeaderError(f"unknown command 0x{command:X}: only LOCAL (0x0) and PROXY (0x1) exist", got[12:13])
    if len(got) > 13 and got[13] not in _VALID_FAMILY_BYTES:
        raise HeaderError(
            "unknown address family and transport: expected one of 0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32",
            got[13:14],
        )


def _parse_tlvs(view: memoryview, what: str, *, offset: int) -> tuple[TLV, ...]:
    tlvs: list[TLV] = []
    position, end = 0, len(view)
    while position < end:
        if end - position < _TLV_HEAD.size:
            raise HeaderError(
                f"truncated {what} at byte {offset + position}: {end - position} bytes left, a TLV needs at least 3"
            )
        tlv_type, length = _TLV_HEAD.unpack_from(view, position)
        position += _TLV_HEAD.size
        if length > end - position:
            raise HeaderError(
                f"{what} 0x{tlv_type:02X} at byte {offset + position - 3} claims {length} bytes "
                f"but only {end - position} remain"
            )
        tlvs.append(TLV(tlv_type, bytes(view[position : position + length])))
        position += length
    return tuple(tlvs)


def _check_tlvs(header: Header, raw: memoryview, start: int) -> None:
    """Reject duplicated single-valued TLVs, a wrong checksum, and our TLVs when they do not parse."""
    seen: set[int] = set()
    position = start
    for tlv in header.tlvs:
        if tlv.type in _SINGLE_TLVS:
            if tlv.type in seen:
                raise HeaderError(f"more than one TLV of type 0x{tlv.type:02X}")
            seen.add(tlv.type)
        if tlv.type == PP2_TYPE_CRC32C:
            if len(tlv.value) != 4:
                raise HeaderError(f"the CRC32C TLV must be 4 bytes long, not {len(tlv.value)}")
            zeroed = bytearray(raw)
            zeroed[position + 3 : position + 7] = b"\x00\x00\x00\x00"
            expected, got = crc32c(zeroed), int.from_bytes(tlv.value, "big")
            if expected != got:
                raise HeaderError(
                    f"the CRC32C checksum does not match: the header says 0x{got:08X}, it is 0x{expected:08X}"
                )
        elif tlv.type == PP2_TYPE_UNIQUE_ID and len(tlv.value) > MAX_UNIQUE_ID_BYTES:
            raise HeaderError(
                f"the unique ID TLV must not be longer than {MAX_UNIQUE_ID_BYTES} bytes, got {len(tlv.value)}"
            )
        position += _TLV_HEAD.size + len(tlv.value)
    # Parse the TLVs we define so that a malformed one is an error here, not later.
    _ = header.ssl, header.spiffe_id, header.authority


def _text(tlv: TLV, what: str) -> str:
    try:
        return tlv.value.decode()
    except UnicodeDecodeError:
        raise HeaderError(f"{what} is not valid UTF-8", tlv.value) from None


def _parse_spiffe_id(value: bytes) -> SpiffeID:
    text = _text(TLV(PP2_TYPE_SPIFFE_ID, value), "the SPIFFE ID TLV")
    try:
        return SpiffeID.parse(text)
    except SpiffeIDError as err:
        raise HeaderError(f"the SPIFFE ID TLV does not hold a valid SPIFFE ID: {err.rule}", text) from err


LOCAL_HEADER: Final = encode(None, None)
"""``LOCAL`` with no TLVs: for connections the proxy makes on its own behalf (health checks)."""
