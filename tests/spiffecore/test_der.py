"""Tests for spiffecore.der: splitting, loading and dumping concatenated DER certificates."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given, settings
from hypothesis import strategies as st

from spiffecore.der import DERError, dump_der_certificates, dump_pem_certificates, load_der_certificates, split_der
from spiffecore.errors import SpiffeError
from tests.support.ca import TestCA


@pytest.fixture(scope="module")
def chain() -> tuple[x509.Certificate, ...]:
    """A leaf, its intermediate and the root: three certificates of different key types."""
    root = TestCA.create("example.org", key_type="rsa-2048")
    intermediate = root.intermediate(key_type="ec-p384")
    minted = intermediate.mint("/web")
    return (*minted.chain, root.cert)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def _sequence(content: bytes) -> bytes:
    """A DER SEQUENCE around ``content`` with the shortest length encoding."""
    length = len(content)
    if length < 0x80:
        return bytes([0x30, length]) + content
    size = (length.bit_length() + 7) // 8
    return bytes([0x30, 0x80 | size]) + length.to_bytes(size, "big") + content


# --- split_der ---------------------------------------------------------------------------------


def test_split_der_of_nothing_is_no_parts() -> None:
    assert split_der(b"") == []


def test_split_der_returns_each_certificate(chain: tuple[x509.Certificate, ...]) -> None:
    data = b"".join(_der(cert) for cert in chain)
    assert split_der(data) == [_der(cert) for cert in chain]


@pytest.mark.parametrize(
    ("data", "parts"),
    [
        pytest.param(b"\x30\x00", [b"\x30\x00"], id="empty-sequence"),
        pytest.param(b"\x30\x01\x05\x30\x00", [b"\x30\x01\x05", b"\x30\x00"], id="two-short-form"),
        pytest.param(b"\x30\x7f" + b"a" * 127, [b"\x30\x7f" + b"a" * 127], id="longest-short-form"),
        pytest.param(b"\x30\x81\x80" + b"a" * 128, [b"\x30\x81\x80" + b"a" * 128], id="one-length-byte"),
        pytest.param(b"\x30\x82\x01\x00" + b"a" * 256, [b"\x30\x82\x01\x00" + b"a" * 256], id="two-length-bytes"),
        pytest.param(
            b"\x30\x84\x00\x00\x00\x02ab", [b"\x30\x84\x00\x00\x00\x02ab"], id="four-length-bytes-not-minimal"
        ),
    ],
)
def test_split_der_reads_short_and_long_length_forms(data: bytes, parts: list[bytes]) -> None:
    assert split_der(data) == parts


def test_split_der_accepts_bytearray_and_memoryview(chain: tuple[x509.Certificate, ...]) -> None:
    data = dump_der_certificates(chain)
    expected = [_der(cert) for cert in chain]
    assert split_der(bytearray(data)) == expected  # type: ignore[arg-type]
    assert split_der(memoryview(data)) == expected  # type: ignore[arg-type]
    assert all(type(part) is bytes for part in split_der(memoryview(data)))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(b"\x04\x00", "der: expected an ASN.1 SEQUENCE (tag 0x30) at byte 0: 0x04", id="wrong-tag"),
        pytest.param(
            b"\x30\x00\x02\x01\x00",
            "der: expected an ASN.1 SEQUENCE (tag 0x30) at byte 2: 0x02",
            id="wrong-tag-after-element",
        ),
        pytest.param(b"\x30\x00\x00", "der: expected an ASN.1 SEQUENCE (tag 0x30) at byte 2: 0x00", id="trailing-zero"),
        pytest.param(b"\x30", "der: truncated length at byte 1: 0x30", id="no-length"),
        pytest.param(b"\x30\x00\x30", "der: truncated length at byte 3: 0x30", id="no-length-second-element"),
        pytest.param(b"\x30\x82\x01", "der: truncated length at byte 1: 0x308201", id="truncated-long-length"),
        pytest.param(b"\x30\x80", "der: unsupported length encoding at byte 1: 0x3080", id="indefinite-length"),
        pytest.param(
            b"\x30\x85\x00\x00\x00\x00\x01a",
            "der: unsupported length encoding at byte 1: 0x3085",
            id="five-length-bytes",
        ),
        pytest.param(b"\x30\x05abc", "der: element at byte 0 claims 5 bytes but only 3 remain: 0x3005", id="short"),
        pytest.param(
            b"\x30\x00\x30\x81\x05ab",
            "der: element at byte 2 claims 5 bytes but only 2 remain: 0x308105",
            id="short-long-form",
        ),
        pytest.param(
            b"\x30\x84\xff\xff\xff\xff",
            "der: element at byte 0 claims 4294967295 bytes but only 0 remain: 0x3084ffffffff",
            id="huge-claim",
        ),
    ],
)
def test_split_der_rejects_malformed_input_with_exact_message(data: bytes, message: str) -> None:
    with pytest.raises(DERError) as caught:
        split_der(data)
    assert str(caught.value) == message


def test_split_der_rejects_trailing_garbage_after_certificates(chain: tuple[x509.Certificate, ...]) -> None:
    data = dump_der_certificates(chain)
    with pytest.raises(DERError) as caught:
        split_der(data + b"\xff")
    assert str(caught.value) == f"der: expected an ASN.1 SEQUENCE (tag 0x30) at byte {len(data)}: 0xff"


def test_split_der_rejects_a_truncated_certificate(chain: tuple[x509.Certificate, ...]) -> None:
    der = _der(chain[0])
    with pytest.raises(DERError) as caught:
        split_der(der[:-1])
    header = der[:4]  # every certificate here is longer than 255 bytes: 0x30 0x82 and two length bytes
    length = int.from_bytes(header[2:], "big")
    assert str(caught.value) == (
        f"der: element at byte 0 claims {length} bytes but only {length - 1} remain: 0x{header.hex()}"
    )


def test_der_error_is_a_spiffe_error_and_a_value_error() -> None:
    with pytest.raises(DERError) as caught:
        split_der(b"\x00")
    assert isinstance(caught.value, SpiffeError)
    assert isinstance(caught.value, ValueError)
    assert caught.value.layer == "der"


# --- load and dump -----------------------------------------------------------------------------


def test_load_der_certificates_of_nothing_is_empty() -> None:
    assert load_der_certificates(b"") == ()


def test_der_certificates_round_trip(chain: tuple[x509.Certificate, ...]) -> None:
    data = dump_der_certificates(chain)
    assert data == b"".join(_der(cert) for cert in chain)
    assert load_der_certificates(data) == chain


def test_dump_der_certificates_of_nothing_is_empty() -> None:
    assert dump_der_certificates(()) == b""
    assert dump_pem_certificates(()) == b""


def test_dump_der_certificates_takes_any_iterable(chain: tuple[x509.Certificate, ...]) -> None:
    assert load_der_certificates(dump_der_certificates(iter(chain))) == chain


def test_pem_certificates_round_trip(chain: tuple[x509.Certificate, ...]) -> None:
    data = dump_pem_certificates(chain)
    assert data == b"".join(cert.public_bytes(Encoding.PEM) for cert in chain)
    assert data.count(b"-----BEGIN CERTIFICATE-----") == len(chain)
    assert tuple(x509.load_pem_x509_certificates(data)) == chain


@pytest.mark.parametrize(
    ("data", "offset"),
    [
        pytest.param(b"\x30\x00", 0, id="empty-sequence"),
        pytest.param(b"\x30\x03\x02\x01\x00", 0, id="sequence-of-integer"),
    ],
)
def test_load_der_certificates_rejects_sequences_that_are_not_certificates(data: bytes, offset: int) -> None:
    with pytest.raises(DERError) as caught:
        load_der_certificates(data)
    cause = caught.value.__cause__
    assert isinstance(cause, ValueError)
    assert not isinstance(cause, SpiffeError)
    assert str(caught.value) == f"der: element at byte {offset} is not an X.509 certificate ({cause})"


def test_load_der_certificates_names_the_offset_of_the_bad_element(chain: tuple[x509.Certificate, ...]) -> None:
    good = dump_der_certificates(chain[:2])
    with pytest.raises(DERError) as caught:
        load_der_certificates(good + b"\x30\x00")
    cause = caught.value.__cause__
    assert str(caught.value) == f"der: element at byte {len(good)} is not an X.509 certificate ({cause})"


def test_load_der_certificates_reports_framing_errors_from_split_der(chain: tuple[x509.Certificate, ...]) -> None:
    data = dump_der_certificates(chain)
    with pytest.raises(DERError) as caught:
        load_der_certificates(data + b"\x04")
    assert str(caught.value) == f"der: expected an ASN.1 SEQUENCE (tag 0x30) at byte {len(data)}: 0x04"


# --- properties --------------------------------------------------------------------------------

_contents = st.lists(st.binary(max_size=300), max_size=6)


@settings(max_examples=300)
@given(data=st.binary(max_size=64))
def test_split_der_on_arbitrary_bytes_raises_only_der_error(data: bytes) -> None:
    try:
        parts = split_der(data)
    except DERError:
        return
    assert b"".join(parts) == data
    assert all(part[0] == 0x30 for part in parts)


@settings(max_examples=300)
@given(data=st.binary(max_size=64))
def test_load_der_certificates_on_arbitrary_bytes_raises_only_der_error(data: bytes) -> None:
    try:
        certificates = load_der_certificates(data)
    except DERError:
        return
    assert all(isinstance(cert, x509.Certificate) for cert in certificates)


@settings(max_examples=200)
@given(contents=_contents)
def test_split_der_recovers_the_sequences_it_was_given(contents: list[bytes]) -> None:
    elements = [_sequence(content) for content in contents]
    assert split_der(b"".join(elements)) == elements


@settings(max_examples=200)
@given(contents=_contents, last=st.binary(max_size=300), cut=st.integers(min_value=1))
def test_split_der_rejects_a_cut_inside_the_last_element(contents: list[bytes], last: bytes, cut: int) -> None:
    head = b"".join(_sequence(content) for content in contents)
    element = _sequence(last)
    with pytest.raises(DERError):
        split_der(head + element[: 1 + cut % (len(element) - 1)])


@settings(max_examples=200)
@given(index=st.integers(min_value=0), value=st.integers(min_value=0, max_value=255), cut=st.integers(min_value=0))
def test_load_der_certificates_on_damaged_certificates_raises_only_der_error(
    chain: tuple[x509.Certificate, ...], index: int, value: int, cut: int
) -> None:
    data = bytearray(dump_der_certificates(chain))
    data[index % len(data)] = value
    damaged = bytes(data[: len(data) - cut % 64])
    try:
        certificates = load_der_certificates(damaged)
    except DERError:
        return
    assert all(isinstance(cert, x509.Certificate) for cert in certificates)
