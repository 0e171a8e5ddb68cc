"""PROXY protocol v2: byte-exact vectors built by hand from HAProxy's spec, round trips, every
malformed input with its exact message, and interop with a real HAProxy (``accept-proxy``)."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.proxy import proxyproto
from sidecar.proxy.proxyproto import (
    LOCAL_HEADER,
    PP2_CLIENT_CERT_CONN,
    PP2_CLIENT_CERT_SESS,
    PP2_CLIENT_SSL,
    PP2_TYPE_SPIFFE_ID,
    SIGNATURE,
    TLV,
    Command,
    Family,
    Header,
    HeaderError,
    IncompleteHeaderError,
    ProxyProtocolError,
    SSLInfo,
    Transport,
    crc32c,
    decode,
    encode,
)
from spiffecore import SpiffeID, TrustDomain

PEER_ID = SpiffeID.parse("spiffe://example.org/ns/prod/sa/web")
SIG_HEX = "0d0a0d0a000d0a515549540a"


def _hex(text: str) -> bytes:
    return bytes.fromhex(re.sub(r"\s+", "", text))


# --- byte-exact vectors, written out from the spec's field layout -------------------------------


def test_signature_is_the_spec_block() -> None:
    assert _hex("0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A") == SIGNATURE


def test_tcp4_vector() -> None:
    # 127.0.0.1:12345 -> 127.0.0.1:80: ver 2 / PROXY, TCP over IPv4, 12 address bytes.
    expected = _hex(SIG_HEX + "21 11 000c 7f000001 7f000001 3039 0050")
    assert encode(("127.0.0.1", 12345), ("127.0.0.1", 80)) == expected
    assert decode(expected) == (
        Header(
            command=Command.PROXY,
            family=Family.INET,
            transport=Transport.STREAM,
            source=("127.0.0.1", 12345),
            destination=("127.0.0.1", 80),
        ),
        28,
    )


def test_tcp6_vector() -> None:
    # [2001:db8::1]:12345 -> [::1]:443, with the 4-tuple getpeername() gives for AF_INET6.
    expected = _hex(
        SIG_HEX + "21 21 0024" + "20010db8000000000000000000000001" + "00000000000000000000000000000001" + "3039 01bb"
    )
    assert encode(("2001:db8::1", 12345, 0, 0), ("::1", 443)) == expected
    header, consumed = decode(expected)
    assert (header.family, header.source, header.destination, consumed) == (
        Family.INET6,
        ("2001:db8::1", 12345),
        ("::1", 443),
        52,
    )


def test_ipv4_paired_with_ipv6_is_sent_as_ipv4_mapped() -> None:
    expected = _hex(
        SIG_HEX + "21 21 0024" + "00000000000000000000ffffc0000201" + "00000000000000000000000000000001" + "0001 0002"
    )
    assert encode(("192.0.2.1", 1), ("::1", 2)) == expected
    assert decode(expected)[0].source == ("::ffff:192.0.2.1", 1)


def test_ipv6_scope_is_dropped() -> None:
    assert decode(encode(("fe80::1%eth0", 1, 0, 2), ("fe80::2", 2)))[0].source == ("fe80::1", 1)


def test_unix_vector() -> None:
    src, dst = b"", b"/run/app.sock"  # a connecting unix client is unnamed: all NULs
    expected = SIGNATURE + _hex("21 31 00d8") + src.ljust(108, b"\0") + dst.ljust(108, b"\0")
    assert encode("", "/run/app.sock") == expected
    header, consumed = decode(expected)
    assert (header.family, header.transport, header.source, header.destination, consumed) == (
        Family.UNIX,
        Transport.STREAM,
        "",
        "/run/app.sock",
        232,
    )


def test_local_vector() -> None:
    expected = _hex(SIG_HEX + "20 00 0000")
    assert encode(None, None) == expected == LOCAL_HEADER
    assert decode(expected) == (
        Header(command=Command.LOCAL, family=Family.UNSPEC, transport=Transport.UNSPEC, source=None, destination=None),
        16,
    )


def test_local_ignores_addresses_it_carries() -> None:
    # "Receivers MUST always consider this field to skip the appropriate number of bytes."
    data = _hex(SIG_HEX + "20 11 000c 7f000001 7f000001 3039 0050") + b"payload"
    header, consumed = decode(data)
    assert (header.command, header.family, header.source, header.destination, consumed) == (
        Command.LOCAL,
        Family.INET,
        None,
        None,
        28,
    )


def test_proxy_with_unspec_family_has_no_addresses() -> None:
    header, consumed = decode(_hex(SIG_HEX + "21 00 0003 04 0000"))
    assert (header.source, header.destination, header.tlvs, consumed) == (None, None, (TLV(0x04, b""),), 19)


def test_udp_is_decoded() -> None:
    header, _ = decode(_hex(SIG_HEX + "21 12 000c 0a000001 0a000002 0035 0035"))
    assert (header.transport, header.source) == (Transport.DGRAM, ("10.0.0.1", 53))


def test_tlv_vector_spiffe_id_and_ssl() -> None:
    ssl = SSLInfo(
        client=PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS,
        verify=0,
        version="TLSv1.3",
        cipher="TLS_AES_128_GCM_SHA256",
    )
    spiffe_id = b"spiffe://example.org/web"
    ssl_value = _hex("07 00000000") + _hex("21 0007") + b"TLSv1.3" + _hex("23 0016") + b"TLS_AES_128_GCM_SHA256"
    tlvs = _hex("20") + len(ssl_value).to_bytes(2, "big") + ssl_value + _hex("e0 0018") + spiffe_id
    expected = (
        SIGNATURE + _hex("21 11") + (12 + len(tlvs)).to_bytes(2, "big") + _hex("c0000201 c6336401 c350 20fb") + tlvs
    )
    data = encode(
        ("192.0.2.1", 50000),
        ("198.51.100.1", 8443),
        tlvs=[ssl.to_tlv(), TLV.spiffe_id(SpiffeID.parse("spiffe://example.org/web"))],
    )
    assert data == expected
    header, consumed = decode(data)
    assert consumed == len(expected)
    assert header.ssl == ssl
    assert header.spiffe_id == SpiffeID.parse("spiffe://example.org/web")
    assert header.tlv(PP2_TYPE_SPIFFE_ID) == spiffe_id


def test_connection_tlvs() -> None:
    tlvs = proxyproto.connection_tlvs(
        peer_id=PEER_ID,
        tls_version="TLSv1.3",
        cipher="TLS_AES_256_GCM_SHA384",
        cn="web",
        authority="web.example.org",
        unique_id=b"conn-1",
    )
    header, _ = decode(encode(("10.0.0.1", 1), ("10.0.0.2", 2), tlvs=tlvs))
    assert header.ssl == SSLInfo(client=0x07, verify=0, version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", cn="web")
    assert (header.spiffe_id, header.authority, header.unique_id) == (PEER_ID, "web.example.org", b"conn-1")
    assert [t.type for t in header.tlvs] == [0x20, 0xE0, 0x02, 0x05]


def test_connection_tlvs_flags() -> None:
    resumed = proxyproto.connection_tlvs(peer_id=None, tls_version="TLSv1.3", cipher="c", resumed=True)
    no_cert = proxyproto.connection_tlvs(peer_id=None, tls_version="TLSv1.2", cipher="c", client_cert=False)
    assert SSLInfo.from_tlv(resumed[0]).client == PP2_CLIENT_SSL | PP2_CLIENT_CERT_SESS
    assert (SSLInfo.from_tlv(no_cert[0]).client, SSLInfo.from_tlv(no_cert[0]).verify) == (PP2_CLIENT_SSL, 1)
    assert len(resumed) == len(no_cert) == 1


# --- CRC-32C ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"123456789", 0xE3069283),  # the CRC catalogue's check value for CRC-32/ISCSI
        (b"\x00" * 32, 0x8A9136AA),  # RFC 3720 appendix B.4
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
        (bytes(range(31, -1, -1)), 0x113FDB5C),
        (b"", 0),
    ],
)
def test_crc32c_vectors(data: bytes, expected: int) -> None:
    assert crc32c(data) == expected


def test_crc_tlv_is_last_and_covers_the_whole_header() -> None:
    data = encode(("127.0.0.1", 12345), ("127.0.0.1", 80), tlvs=[TLV.unique_id(b"x")], crc=True)
    assert data[:16] == _hex(SIG_HEX + "21 11 0017")
    assert data[-7:-4] == _hex("03 0004")
    assert int.from_bytes(data[-4:], "big") == crc32c(data[:-4] + b"\0\0\0\0")
    header, consumed = decode(data)
    assert consumed == len(data)
    assert header.tlvs[-1] == TLV(0x03, data[-4:])


# --- round trips --------------------------------------------------------------------------------

_ports = st.integers(0, 65535)
_v4 = st.tuples(st.ip_addresses(v=4).map(str), _ports)
_v6 = st.tuples(st.ip_addresses(v=6).map(str), _ports)
_unix = st.binary(max_size=108).map(lambda raw: os.fsdecode(raw.replace(b"\0", b"x")))
_segment = st.from_regex(r"[a-zA-Z0-9._-]{1,12}", fullmatch=True).filter(lambda s: s not in {".", ".."})
_spiffe_ids = st.builds(
    lambda td, segments: SpiffeID.from_segments(TrustDomain(td), *segments),
    st.from_regex(r"[a-z0-9.-]{1,20}", fullmatch=True),
    st.lists(_segment, max_size=4),
)
# TLVs the decoder only carries, never interprets: repeatable, any bytes.
_opaque_tlvs = st.builds(TLV, st.sampled_from([0x04, 0x30, 0xE1, 0xEF, 0xF0, 0x99]), st.binary(max_size=64))
_text = st.text(st.characters(blacklist_categories=["Cs"]), max_size=40)
_ssl = st.builds(
    SSLInfo,
    client=st.integers(0, 255),
    verify=st.integers(0, 2**32 - 1),
    version=st.none() | _text,
    cipher=st.none() | _text,
    cn=st.none() | _text,
    extra=st.lists(st.builds(TLV, st.sampled_from([0x24, 0x25, 0x28]), st.binary(max_size=16)), max_size=3).map(tuple),
)


@st.composite
def _tlv_sets(draw: st.DrawFn) -> list[TLV]:
    tlvs = draw(st.lists(_opaque_tlvs, max_size=4))
    if (ssl := draw(st.none() | _ssl)) is not None:
        tlvs.append(ssl.to_tlv())
    if (spiffe_id := draw(st.none() | _spiffe_ids)) is not None:
        tlvs.append(TLV.spiffe_id(spiffe_id))
    if (authority := draw(st.none() | _text)) is not None:
        tlvs.append(TLV.authority(authority))
    if (unique_id := draw(st.none() | st.binary(max_size=128))) is not None:
        tlvs.append(TLV.unique_id(unique_id))
    return draw(st.permutations(tlvs))


def _ip(address: tuple[str, int]) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    return ipaddress.ip_address(address[0]), address[1]


@given(source=_v4 | _v6, destination=_v4 | _v6, tlvs=_tlv_sets(), crc=st.booleans(), payload=st.binary(max_size=8))
def test_inet_round_trip(
    source: tuple[str, int], destination: tuple[str, int], tlvs: list[TLV], crc: bool, payload: bytes
) -> None:
    data = encode(source, destination, tlvs=tlvs, crc=crc)
    header, consumed = decode(data + payload)
    assert consumed == len(data)
    both_v4 = ipaddress.ip_address(source[0]).version == ipaddress.ip_address(destination[0]).version == 4
    assert (header.command, header.family, header.transport) == (
        Command.PROXY,
        Family.INET if both_v4 else Family.INET6,
        Transport.STREAM,
    )
    assert isinstance(header.source, tuple)
    assert isinstance(header.destination, tuple)
    if both_v4:
        assert (_ip(header.source), _ip(header.destination)) == (_ip(source), _ip(destination))
    else:
        mapped = [
            (ipaddress.ip_address(host) if ":" in host else ipaddress.IPv6Address(f"::ffff:{host}"), port)
            for host, port in (source, destination)
        ]
        assert [_ip(header.source), _ip(header.destination)] == mapped
    assert list(header.tlvs[: len(tlvs)]) == tlvs
    assert len(header.tlvs) == len(tlvs) + crc


@given(source=_unix, destination=_unix, tlvs=_tlv_sets())
def test_unix_round_trip(source: str, destination: str, tlvs: list[TLV]) -> None:
    header, consumed = decode(encode(source, destination, tlvs=tlvs))
    assert (header.family, header.source, header.destination, list(header.tlvs), consumed) == (
        Family.UNIX,
        source,
        destination,
        tlvs,
        16 + 216 + sum(3 + len(t.value) for t in tlvs),
    )


@given(tlvs=_tlv_sets(), crc=st.booleans())
def test_local_round_trip(tlvs: list[TLV], crc: bool) -> None:
    header, _ = decode(encode(None, None, tlvs=tlvs, crc=crc))
    assert (header.command, header.family, header.source, header.destination) == (
        Command.LOCAL,
        Family.UNSPEC,
        None,
        None,
    )
    assert list(header.tlvs[: len(tlvs)]) == tlvs


@given(ssl=_ssl)
def test_ssl_info_round_trip(ssl: SSLInfo) -> None:
    assert SSLInfo.from_tlv(ssl.to_tlv()) == ssl


@given(source=_v4 | _v6, tlvs=_tlv_sets(), crc=st.booleans())
def test_every_strict_prefix_is_incomplete(source: tuple[str, int], tlvs: list[TLV], crc: bool) -> None:
    data = encode(source, source, tlvs=tlvs, crc=crc)
    for end in range(len(data)):
        with pytest.raises(IncompleteHeaderError) as caught:
            decode(data[:end])
        assert caught.value.needed > 0
        assert end + caught.value.needed <= len(data)


@given(data=st.binary(max_size=300) | st.binary(max_size=300).map(lambda tail: SIGNATURE + tail))
def test_garbage_raises_only_header_errors(data: bytes) -> None:
    try:
        header, consumed = decode(data)
    except HeaderError:
        return
    assert 16 <= consumed <= len(data)
    assert isinstance(header, Header)


def test_decode_reads_nothing_past_a_memoryview_slice() -> None:
    data = bytearray(encode(("10.0.0.1", 1), ("10.0.0.2", 2), tlvs=[TLV(0xE1, b"abc")]))
    with pytest.raises(IncompleteHeaderError, match="its length field says 34 bytes, got 33"):
        decode(memoryview(data)[:-1])


# --- malformed input: every case, with its exact message -----------------------------------------

_TCP4_ADDRESSES = "c0000201 c0000202 0001 0002"


@dataclass(frozen=True)
class Bad:
    id: str
    data: bytes
    message: str
    incomplete: bool = False


def _tcp4_with(tlvs_hex: str) -> bytes:
    tail = _hex(_TCP4_ADDRESSES + tlvs_hex)
    return SIGNATURE + _hex("21 11") + len(tail).to_bytes(2, "big") + tail


def _tcp4_with_tlv(tlv_type: int, value: bytes) -> bytes:
    return _tcp4_with(f"{tlv_type:02x} {len(value):04x} {value.hex()}")


def _ssl_tlv(value_hex: str) -> bytes:
    return _tcp4_with_tlv(0x20, _hex(value_hex))


_BAD_CRC = _tcp4_with("03 0004 deadbeef")
_GOOD_CRC = crc32c(_BAD_CRC[:-4] + b"\0\0\0\0")

BAD_INPUTS = [
    Bad("empty", b"", "proxyproto: incomplete header: got 0 bytes, a header has at least 16", incomplete=True),
    Bad(
        "partial-signature",
        b"\r\n\r\n",
        "proxyproto: incomplete header: got 4 bytes, a header has at least 16",
        incomplete=True,
    ),
    Bad(
        "http",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        "proxyproto: not a PROXY protocol v2 header: the 12-byte signature does not match: 0x474554202f20485454502f31",
    ),
    Bad(
        "http-short",
        b"GET",
        "proxyproto: not a PROXY protocol v2 header: the 12-byte signature does not match: 0x474554",
    ),
    Bad(
        "v1",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n",
        "proxyproto: a PROXY protocol v1 (text) header: only version 2 is accepted: 0x50524f585920544350342031",
    ),
    Bad(
        "signature-off-by-one-bit",
        _hex("0d0a0d0a000d0a515549540b 21 11 0000"),
        "proxyproto: not a PROXY protocol v2 header: the 12-byte signature does not match: 0x0d0a0d0a000d0a515549540b",
    ),
    Bad("version-1", SIGNATURE + b"\x11", "proxyproto: unsupported version 1: only version 2 is accepted: 0x11"),
    Bad(
        "version-3",
        SIGNATURE + _hex("31 11 0000"),
        "proxyproto: unsupported version 3: only version 2 is accepted: 0x31",
    ),
    Bad(
        "command-2",
        SIGNATURE + _hex("22 11 0000"),
        "proxyproto: unknown command 0x2: only LOCAL (0x0) and PROXY (0x1) exist: 0x22",
    ),
    *[
        Bad(
            f"family-{fam:02x}",
            SIGNATURE + bytes([0x21, fam]) + b"\0\0",
            "proxyproto: unknown address family and transport: expected one of 0x00, 0x11, 0x12, 0x21, 0x22, "
            f"0x31, 0x32: 0x{fam:02x}",
        )
        for fam in (0x01, 0x10, 0x13, 0x41, 0xFF)
    ],
    Bad(
        "length-beyond-data",
        SIGNATURE + _hex("21 11 000c 7f000001"),
        "proxyproto: incomplete header: its length field says 28 bytes, got 20",
        incomplete=True,
    ),
    Bad(
        "inet-address-block-too-short",
        SIGNATURE + _hex("21 11 0008 7f000001 7f000001"),
        "proxyproto: the address block is 8 bytes, too short for family INET (12 bytes)",
    ),
    Bad(
        "inet6-address-block-too-short",
        SIGNATURE + _hex("21 21 000c") + bytes(12),
        "proxyproto: the address block is 12 bytes, too short for family INET6 (36 bytes)",
    ),
    Bad(
        "unix-address-block-too-short",
        SIGNATURE + _hex("21 31 006c") + bytes(108),
        "proxyproto: the address block is 108 bytes, too short for family UNIX (216 bytes)",
    ),
    Bad(
        "truncated-tlv",
        _tcp4_with("e0 00"),
        "proxyproto: truncated TLV at byte 28: 2 bytes left, a TLV needs at least 3",
    ),
    Bad(
        "tlv-overflows-header",
        _tcp4_with("e0 0010 616263"),
        "proxyproto: TLV 0xE0 at byte 28 claims 16 bytes but only 3 remain",
    ),
    Bad(
        "second-tlv-overflows-header",
        _tcp4_with("04 0000 e1 0002 61"),
        "proxyproto: TLV 0xE1 at byte 31 claims 2 bytes but only 1 remain",
    ),
    Bad(
        "duplicate-spiffe-id",
        _tcp4_with("e0 0014 " + b"spiffe://example.org".hex() + " e0 0014 " + b"spiffe://example.com".hex()),
        "proxyproto: more than one TLV of type 0xE0",
    ),
    Bad(
        "duplicate-ssl",
        _tcp4_with("20 0005 0100000000 20 0005 0100000000"),
        "proxyproto: more than one TLV of type 0x20",
    ),
    Bad(
        "crc-mismatch",
        _BAD_CRC,
        f"proxyproto: the CRC32C checksum does not match: the header says 0xDEADBEEF, it is 0x{_GOOD_CRC:08X}",
    ),
    Bad("crc-wrong-size", _tcp4_with("03 0002 beef"), "proxyproto: the CRC32C TLV must be 4 bytes long, not 2"),
    Bad(
        "unique-id-too-long",
        _tcp4_with_tlv(0x05, b"u" * 129),
        "proxyproto: the unique ID TLV must not be longer than 128 bytes, got 129",
    ),
    Bad(
        "ssl-too-short",
        _ssl_tlv("01 0000"),
        "proxyproto: the SSL TLV is 3 bytes long, shorter than its 5-byte client and verify fields",
    ),
    Bad(
        "ssl-sub-tlv-overflows",
        _ssl_tlv("01 00000000 21 0009 544c53"),
        "proxyproto: SSL sub-TLV 0x21 at byte 5 claims 9 bytes but only 3 remain",
    ),
    Bad(
        "ssl-sub-tlv-truncated",
        _ssl_tlv("01 00000000 21"),
        "proxyproto: truncated SSL sub-TLV at byte 5: 1 bytes left, a TLV needs at least 3",
    ),
    Bad(
        "ssl-duplicate-version",
        _ssl_tlv("01 00000000 21 0001 41 21 0001 42"),
        "proxyproto: the SSL TLV has more than one sub-TLV of type 0x21",
    ),
    Bad(
        "ssl-version-not-utf8",
        _ssl_tlv("01 00000000 21 0001 ff"),
        "proxyproto: SSL sub-TLV 0x21 is not valid UTF-8: 0xff",
    ),
    Bad(
        "spiffe-id-not-utf8",
        _tcp4_with_tlv(0xE0, b"spiffe://\xff"),
        "proxyproto: the SPIFFE ID TLV is not valid UTF-8: 0x7370696666653a2f2fff",
    ),
    Bad(
        "spiffe-id-wrong-scheme",
        _tcp4_with_tlv(0xE0, b"https://example.org/web"),
        "proxyproto: the SPIFFE ID TLV does not hold a valid SPIFFE ID: scheme is missing or invalid: "
        '"https://example.org/web"',
    ),
    Bad(
        "spiffe-id-empty",
        _tcp4_with_tlv(0xE0, b""),
        'proxyproto: the SPIFFE ID TLV does not hold a valid SPIFFE ID: cannot be empty: ""',
    ),
    Bad(
        "authority-not-utf8",
        _tcp4_with_tlv(0x02, b"\xc3"),
        "proxyproto: the authority TLV is not valid UTF-8: 0xc3",
    ),
]


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=[bad.id for bad in BAD_INPUTS])
def test_malformed_input(bad: Bad) -> None:
    with pytest.raises(HeaderError) as caught:
        decode(bad.data)
    assert str(caught.value) == bad.message
    assert isinstance(caught.value, IncompleteHeaderError) == bad.incomplete


def test_incomplete_error_says_how_much_is_missing() -> None:
    with pytest.raises(IncompleteHeaderError) as caught:
        decode(SIGNATURE + _hex("21 11 000c 7f000001"))
    assert caught.value.needed == 8


# --- misuse of the encoder -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: encode(("127.0.0.1", 1), None),
            "proxyproto: source and destination must both be addresses, or both None for LOCAL",
        ),
        (
            lambda: encode("/run/a.sock", ("127.0.0.1", 1)),
            "proxyproto: cannot mix a unix address with an IP address: \"'/run/a.sock' -> ('127.0.0.1', 1)\"",
        ),
        (
            lambda: encode(("example.org", 1), ("127.0.0.1", 1)),
            'proxyproto: not an IPv4 or IPv6 address: "example.org"',
        ),
        (
            lambda: encode(("::1", 1), ("1::2::3", 1)),
            'proxyproto: not an IPv4 or IPv6 address: "1::2::3"',
        ),
        (
            lambda: encode(("127.0.0.1", 65536), ("127.0.0.1", 1)),
            "proxyproto: a port must be an int from 0 to 65535: \"('127.0.0.1', 65536) -> ('127.0.0.1', 1)\"",
        ),
        (
            lambda: encode(("::1", -1), ("::1", 1)),
            "proxyproto: a port must be an int from 0 to 65535: \"('::1', -1) -> ('::1', 1)\"",
        ),
        (
            lambda: encode("/x/" + "a" * 106, "/run/a.sock"),
            f'proxyproto: a unix address must not be longer than 108 bytes: "/x/{"a" * 106}"',
        ),
        (
            lambda: encode("/x\0y", "/run/a.sock"),
            'proxyproto: a unix address must be a filesystem path without NUL bytes: "/x\\u0000y"',
        ),
        (
            lambda: encode(None, None, tlvs=[TLV(0x04, bytes(65533))]),
            'proxyproto: a header must not be longer than 16 + 65535 bytes: "65552"',
        ),
        (lambda: TLV(256, b""), 'proxyproto: a TLV type must be an int from 0 to 255: "256"'),
        (lambda: TLV(-1, b""), 'proxyproto: a TLV type must be an int from 0 to 255: "-1"'),
        (lambda: TLV(1, bytes(65536)), 'proxyproto: a TLV value must not be longer than 65535 bytes: "65536"'),
        (lambda: TLV.unique_id(bytes(129)), 'proxyproto: a unique ID must not be longer than 128 bytes: "129"'),
        (lambda: SSLInfo(client=256), 'proxyproto: the SSL client field must be an int from 0 to 255: "256"'),
        (
            lambda: SSLInfo(verify=2**32),
            'proxyproto: the SSL verify field must be an int from 0 to 2**32 - 1: "4294967296"',
        ),
        (
            lambda: SSLInfo(extra=(TLV(0x21, b"TLSv1.3"),)),
            "proxyproto: sub-TLV 0x21 has its own field in SSLInfo: set version, cipher or cn",
        ),
        (
            lambda: SSLInfo.from_tlv(TLV(0xE0, b"")),
            "proxyproto: not an SSL TLV: its type is 0xE0, not 0x20",
        ),
    ],
)
def test_encoder_misuse(build: object, message: str) -> None:
    assert callable(build)
    with pytest.raises(ProxyProtocolError) as caught:
        build()
    assert str(caught.value) == message
    assert not isinstance(caught.value, HeaderError)


def test_the_largest_header_encodes() -> None:
    data = encode(None, None, tlvs=[TLV(0x04, bytes(65532))])
    assert len(data) == 16 + 65535
    assert decode(data)[1] == len(data)


# --- interop with a real HAProxy -------------------------------------------------------------------

_HAPROXY = shutil.which("haproxy") or next(
    (path for path in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if Path(path).is_file()), None
)


@dataclass(frozen=True)
class HAProxy:
    port: int
    reads_custom_tlvs: bool

    def send(self, header: bytes) -> str:
        """Send ``header`` then an HTTP request; return the body HAProxy answers ("" if it hung up)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as conn:
            conn.sendall(header + b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            chunks = []
            try:
                while chunk := conn.recv(65536):
                    chunks.append(chunk)
            except ConnectionResetError:
                return ""  # it dropped the connection on a header it found invalid
        response = b"".join(chunks).decode()
        return response.partition("\r\n\r\n")[2]


def _haproxy_version(binary: str) -> tuple[int, int]:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, check=True).stdout  # noqa: S603 - our argv
    match = re.search(r"version (\d+)\.(\d+)", out)
    assert match is not None, out
    return int(match[1]), int(match[2])


@pytest.fixture(scope="module")
def haproxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HAProxy]:
    if _HAPROXY is None:
        pytest.fail("haproxy is not installed (make services installs it; or apt-get install -y haproxy)")
    # fc_pp_tlv(<type>) exists from HAProxy 2.9; older ones parse our 0xE0 TLV but cannot show it.
    reads_custom_tlvs = _haproxy_version(_HAPROXY) >= (2, 9)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fields = (
        "src=%[src] sport=%[src_port] dst=%[dst] dport=%[dst_port] authority=%[fc_pp_authority] uid=%[fc_pp_unique_id]"
    )
    if reads_custom_tlvs:
        fields += " spiffe_id=%[fc_pp_tlv(0xE0)]"
    config = tmp_path_factory.mktemp("haproxy") / "haproxy.cfg"
    config.write_text(
        "global\n"
        "    log stderr format raw local0 info\n"
        "defaults\n"
        "    mode http\n"
        "    log global\n"
        "    timeout connect 5s\n"
        "    timeout client 5s\n"
        "    timeout server 5s\n"
        "frontend fe\n"
        f"    bind 127.0.0.1:{port} accept-proxy\n"
        f'    http-request return status 200 content-type text/plain lf-string "{fields}"\n'
    )
    process = subprocess.Popen(  # noqa: S603 - the haproxy binary and our own config file
        [_HAPROXY, "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            assert process.poll() is None, f"haproxy exited: {process.communicate()[1].decode()}"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                    conn.sendall(LOCAL_HEADER + b"GET / HTTP/1.0\r\n\r\n")
                    while conn.recv(4096):
                        pass
                break
            except OSError:
                assert time.monotonic() < deadline, "haproxy did not listen within 10 s"
                time.sleep(0.05)
        yield HAProxy(port=port, reads_custom_tlvs=reads_custom_tlvs)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        finally:
            assert process.stderr is not None
            process.stderr.close()


def _fields(body: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in body.split())


_FULL_TLVS = proxyproto.connection_tlvs(
    peer_id=PEER_ID,
    tls_version="TLSv1.3",
    cipher="TLS_AES_128_GCM_SHA256",
    cn="web",
    authority="web.example.org",
    unique_id=b"conn-42",
)


@pytest.mark.parametrize(
    ("source", "destination"),
    [(("203.0.113.7", 50000), ("192.0.2.1", 8443)), (("2001:db8::7", 50000), ("2001:db8::1", 8443))],
    ids=["tcp4", "tcp6"],
)
@pytest.mark.parametrize("crc", [False, True], ids=["no-crc", "crc"])
def test_haproxy_reads_our_header(
    haproxy: HAProxy, source: tuple[str, int], destination: tuple[str, int], crc: bool
) -> None:
    body = haproxy.send(encode(source, destination, tlvs=_FULL_TLVS, crc=crc))
    fields = _fields(body)
    assert fields["src"] == source[0]
    assert fields["sport"] == str(source[1])
    assert fields["dst"] == destination[0]
    assert fields["dport"] == str(destination[1])
    assert fields["authority"] == "web.example.org"
    assert fields["uid"] == "conn-42"
    if haproxy.reads_custom_tlvs:
        assert fields["spiffe_id"] == str(PEER_ID)


def test_haproxy_uses_the_real_endpoints_for_local(haproxy: HAProxy) -> None:
    fields = _fields(haproxy.send(encode(None, None, tlvs=[TLV.authority("health")], crc=True)))
    assert (fields["src"], fields["dst"], fields["dport"]) == ("127.0.0.1", "127.0.0.1", str(haproxy.port))


def test_haproxy_rejects_a_wrong_checksum(haproxy: HAProxy) -> None:
    good = encode(("203.0.113.7", 50000), ("192.0.2.1", 8443), tlvs=_FULL_TLVS, crc=True)
    bad = good[:-1] + bytes([good[-1] ^ 0x01])
    assert haproxy.send(bad) == ""
    assert _fields(haproxy.send(good))["src"] == "203.0.113.7"
