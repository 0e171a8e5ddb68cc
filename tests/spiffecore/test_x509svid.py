"""X.509-SVIDs: reading the SPIFFE ID, the leaf and signing-certificate rules, PEM/DER loading.

Every certificate is minted at runtime by the test CA; each malformed input is compared with the
exact message it must produce. Where a message embeds cryptography's own wording, only our prefix
and the quoted part are compared.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa, x25519
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spiffecore import X509SVID, SpiffeID, X509SVIDError, id_from_cert
from spiffecore.der import DERError, load_der_certificates
from spiffecore.x509svid import check_leaf, check_signing_cert
from tests.support.ca import HOUR, NOW, KeyType, Minted, TestCA, key_usage, new_key

TD_ID = "spiffe://example.org"
WORKLOAD = "spiffe://example.org/workload"
LEAF_KEY_TYPES: tuple[KeyType, ...] = ("ec-p256", "ec-p384", "rsa-2048", "ed25519")


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA.create("example.org")


@pytest.fixture(scope="module")
def intermediate(ca: TestCA) -> TestCA:
    return ca.intermediate()


@pytest.fixture(scope="module")
def leaf_keys() -> dict[KeyType, Any]:
    """One key per type, reused across tests: RSA generation is slow."""
    return {key_type: new_key(key_type) for key_type in LEAF_KEY_TYPES}


@pytest.fixture(scope="module")
def minted(ca: TestCA) -> Minted:
    return ca.mint()


@pytest.fixture(scope="module")
def svid(minted: Minted) -> X509SVID:
    return minted.svid()


def _describe(cert: x509.Certificate) -> str:
    """How our messages name a certificate that has no usable SPIFFE ID."""
    return f"subject={cert.subject.rfc4514_string()!r} serial={cert.serial_number:x}"


def _error(call: Callable[[], object]) -> X509SVIDError:
    with pytest.raises(X509SVIDError) as info:
        call()
    return info.value


# --- id_from_cert ---------------------------------------------------------------------------------


def test_id_from_cert_returns_the_uri_san_as_a_spiffe_id(ca: TestCA) -> None:
    cert = ca.mint("/ns/prod/sa/web", dns_names=["web.example"]).leaf

    assert id_from_cert(cert) == SpiffeID.parse("spiffe://example.org/ns/prod/sa/web")


def test_id_from_cert_reads_a_trust_domain_id_from_a_ca_certificate(ca: TestCA) -> None:
    assert id_from_cert(ca.cert) == SpiffeID.parse(TD_ID)


@pytest.mark.parametrize(
    ("uris", "dns_names"),
    [
        pytest.param([], [], id="no-san-extension"),
        pytest.param([], ["web.example", "api.example"], id="only-dns-names"),
    ],
)
def test_id_from_cert_rejects_a_certificate_without_uri_san(ca: TestCA, uris: list[str], dns_names: list[str]) -> None:
    cert = ca.mint(uris=uris, dns_names=dns_names, subject="web").leaf

    err = _error(lambda: id_from_cert(cert))

    assert str(err) == f'x509svid: certificate contains no URI SAN: "{_describe(cert)}"'
    assert "CN=web" in str(err)


@pytest.mark.parametrize(
    ("uris", "message"),
    [
        pytest.param(
            ["spiffe://example.org/a", "spiffe://example.org/b"],
            'x509svid: certificate contains more than one URI SAN: "spiffe://example.org/a, spiffe://example.org/b"',
            id="two-uri-sans",
        ),
        pytest.param(
            ["spiffe://example.org/a", "https://example.org/b"],
            'x509svid: certificate contains more than one URI SAN: "spiffe://example.org/a, https://example.org/b"',
            id="spiffe-and-https-uri-sans",
        ),
        pytest.param(
            ["https://example.org/workload"],
            "x509svid: certificate URI SAN is not a valid SPIFFE ID (scheme is missing or invalid): "
            '"https://example.org/workload"',
            id="non-spiffe-uri",
        ),
        pytest.param(
            ["spiffe://Example.org/workload"],
            "x509svid: certificate URI SAN is not a valid SPIFFE ID (trust domain characters are limited to "
            'lowercase letters, numbers, dots, dashes, and underscores): "spiffe://Example.org/workload"',
            id="upper-case-trust-domain",
        ),
        pytest.param(
            ["spiffe://example.org/workload/"],
            "x509svid: certificate URI SAN is not a valid SPIFFE ID (path cannot have a trailing slash): "
            '"spiffe://example.org/workload/"',
            id="trailing-slash",
        ),
        pytest.param(
            ["spiffe://example.org/a?b=c"],
            'x509svid: certificate URI SAN is not a valid SPIFFE ID (must not include a query): "spiffe://example.org/a?b=c"',
            id="query",
        ),
    ],
)
def test_id_from_cert_rejects_uri_sans_that_are_not_one_spiffe_id(ca: TestCA, uris: list[str], message: str) -> None:
    cert = ca.mint(uris=uris).leaf

    err = _error(lambda: id_from_cert(cert))

    assert str(err) == message


def test_id_from_cert_ignores_dns_names_next_to_the_uri_san(ca: TestCA) -> None:
    cert = ca.mint(dns_names=["a.example", "b.example"]).leaf

    assert str(id_from_cert(cert)) == WORKLOAD


# --- leaf rules -----------------------------------------------------------------------------------

# (mint knobs, the rule broken). Every message quotes the leaf's SPIFFE ID.
LEAF_VIOLATIONS: list[Any] = [
    pytest.param({"is_ca": True}, "leaf certificate must not have CA flag set to true", id="ca-flag-true"),
    pytest.param({"usage": None}, "leaf certificate must have a key usage extension", id="no-key-usage"),
    pytest.param(
        {"usage": key_usage(key_encipherment=True, key_agreement=True)},
        "leaf certificate must have 'digitalSignature' set as key usage",
        id="no-digital-signature",
    ),
    pytest.param(
        {"usage": key_usage(digital_signature=True, key_cert_sign=True)},
        "leaf certificate must not have 'keyCertSign' set as key usage",
        id="key-cert-sign",
    ),
    pytest.param(
        {"usage": key_usage(digital_signature=True, crl_sign=True)},
        "leaf certificate must not have 'cRLSign' set as key usage",
        id="crl-sign",
    ),
    pytest.param(
        {"eku": [ExtendedKeyUsageOID.SERVER_AUTH]},
        "leaf certificate extended key usage must include both 'serverAuth' and 'clientAuth'",
        id="eku-only-server-auth",
    ),
    pytest.param(
        {"eku": [ExtendedKeyUsageOID.CLIENT_AUTH]},
        "leaf certificate extended key usage must include both 'serverAuth' and 'clientAuth'",
        id="eku-only-client-auth",
    ),
    pytest.param(
        {"eku": [ExtendedKeyUsageOID.CODE_SIGNING]},
        "leaf certificate extended key usage must include both 'serverAuth' and 'clientAuth'",
        id="eku-code-signing",
    ),
]


@pytest.mark.parametrize(("knobs", "rule"), LEAF_VIOLATIONS)
def test_leaf_rule_violation_is_rejected_with_the_rule_and_id(ca: TestCA, knobs: dict[str, Any], rule: str) -> None:
    leaf = ca.mint(**knobs)

    from_check = _error(lambda: check_leaf(leaf.leaf))
    from_svid = _error(lambda: X509SVID.from_chain(leaf.chain, leaf.key))

    assert str(from_check) == f'x509svid: {rule}: "{WORKLOAD}"'
    assert str(from_svid) == str(from_check)
    assert from_svid.rule == rule
    assert from_svid.value == WORKLOAD


def test_leaf_with_trust_domain_id_is_rejected_for_having_no_path(ca: TestCA) -> None:
    leaf = ca.mint("")

    err = _error(lambda: X509SVID.from_chain(leaf.chain, leaf.key))

    assert str(err) == f'x509svid: leaf certificate SPIFFE ID must have a path: "{TD_ID}"'


@pytest.mark.parametrize(
    "knobs",
    [
        pytest.param({"eku": None}, id="no-eku"),
        pytest.param({"eku": [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]}, id="eku-reversed"),
        pytest.param(
            {
                "eku": [
                    ExtendedKeyUsageOID.SERVER_AUTH,
                    ExtendedKeyUsageOID.CLIENT_AUTH,
                    ExtendedKeyUsageOID.CODE_SIGNING,
                ]
            },
            id="eku-with-extra-purpose",
        ),
        pytest.param(
            {"usage": key_usage(digital_signature=True, key_encipherment=True, key_agreement=True)},
            id="key-encipherment-and-agreement",
        ),
        pytest.param({"is_ca": None}, id="no-basic-constraints"),
        pytest.param({"authority_key_id": False}, id="no-authority-key-id"),
        pytest.param({"subject": "web", "dns_names": ["web.example"]}, id="subject-and-dns-names"),
    ],
)
def test_leaf_variants_the_specification_allows_are_accepted(ca: TestCA, knobs: dict[str, Any]) -> None:
    leaf = ca.mint(**knobs)

    assert str(check_leaf(leaf.leaf)) == WORKLOAD
    assert X509SVID.from_chain(leaf.chain, leaf.key).id == SpiffeID.parse(WORKLOAD)


# --- signing-certificate rules --------------------------------------------------------------------


def test_chain_with_intermediate_is_accepted(intermediate: TestCA) -> None:
    leaf = intermediate.mint()

    svid = leaf.svid()

    assert svid.cert_chain == (leaf.leaf, intermediate.cert)


def test_signing_certificate_without_san_is_accepted(minted: Minted) -> None:
    root_without_san = TestCA.create("example.org", uri=None)

    svid = X509SVID.from_chain((minted.leaf, root_without_san.cert), minted.key)

    assert svid.cert_chain[1] == root_without_san.cert


@pytest.mark.parametrize(
    ("knobs", "rule"),
    [
        pytest.param(
            {"is_ca": False, "usage": key_usage(digital_signature=True, key_cert_sign=True)},
            "signing certificate must have CA flag set to true",
            id="ca-flag-false",
        ),
        pytest.param(
            {"is_ca": None, "usage": key_usage(key_cert_sign=True)},
            "signing certificate must have CA flag set to true",
            id="no-basic-constraints",
        ),
        pytest.param(
            {"is_ca": True, "usage": key_usage(crl_sign=True)},
            "signing certificate must have 'keyCertSign' set as key usage",
            id="ca-without-key-cert-sign",
        ),
        pytest.param(
            {"is_ca": True, "usage": None},
            "signing certificate must have 'keyCertSign' set as key usage",
            id="ca-without-key-usage",
        ),
    ],
)
def test_certificate_after_the_leaf_must_be_allowed_to_sign(
    ca: TestCA, minted: Minted, knobs: dict[str, Any], rule: str
) -> None:
    signer = ca.mint("/signer", subject="signer", **knobs).leaf

    from_check = _error(lambda: check_signing_cert(signer))
    from_svid = _error(lambda: X509SVID.from_chain((minted.leaf, signer), minted.key))

    assert str(from_check) == f"x509svid: {rule}: \"subject='CN=signer' serial={signer.serial_number:x}\""
    assert str(from_svid) == str(from_check)


def test_every_certificate_after_the_leaf_is_checked(intermediate: TestCA) -> None:
    not_a_ca = intermediate.mint("/other").leaf
    leaf = intermediate.mint()

    err = _error(lambda: X509SVID.from_chain((*leaf.chain, not_a_ca), leaf.key))

    assert str(err) == f'x509svid: signing certificate must have CA flag set to true: "{_describe(not_a_ca)}"'


def test_intermediate_with_key_cert_sign_passes_the_signing_rules(intermediate: TestCA) -> None:
    check_signing_cert(intermediate.cert)
    check_signing_cert(intermediate.root.cert)


# --- construction ---------------------------------------------------------------------------------


def test_private_key_of_another_certificate_is_rejected(minted: Minted) -> None:
    other_key = new_key()

    err = _error(lambda: X509SVID.from_chain(minted.chain, other_key))

    assert str(err) == f'x509svid: private key does not match the leaf certificate\'s public key: "{WORKLOAD}"'


def test_private_key_of_another_type_is_rejected(ca: TestCA, leaf_keys: dict[KeyType, Any]) -> None:
    leaf = ca.mint(key=leaf_keys["ec-p256"])

    err = _error(lambda: X509SVID.from_chain(leaf.chain, leaf_keys["ed25519"]))

    assert str(err) == f'x509svid: private key does not match the leaf certificate\'s public key: "{WORKLOAD}"'


def test_constructing_with_an_id_other_than_the_leafs_is_rejected(minted: Minted) -> None:
    err = _error(
        lambda: X509SVID(
            id=SpiffeID.parse("spiffe://example.org/other"), cert_chain=minted.chain, private_key=minted.key
        )
    )

    assert str(err) == (
        f'x509svid: SPIFFE ID does not match the leaf certificate ({WORKLOAD}): "spiffe://example.org/other"'
    )


def test_constructing_directly_with_the_leafs_id_equals_from_chain(minted: Minted) -> None:
    direct = X509SVID(id=SpiffeID.parse(WORKLOAD), cert_chain=minted.chain, private_key=minted.key)

    assert direct == minted.svid()


def test_from_chain_builds_the_same_frozen_value_as_the_constructor(minted: Minted) -> None:
    """from_chain skips the constructor's second run of the leaf rules; the value must not differ."""
    built = X509SVID.from_chain(minted.chain, minted.key, hint="h")
    direct = X509SVID(id=SpiffeID.parse(WORKLOAD), cert_chain=minted.chain, private_key=minted.key, hint="h")

    assert (built.id, built.cert_chain, built.private_key, built.hint) == (
        direct.id,
        direct.cert_chain,
        direct.private_key,
        direct.hint,
    )
    assert built == direct
    assert hash(built) == hash(direct)
    assert repr(built) == repr(direct)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.hint = "changed"  # type: ignore[misc]


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda m: X509SVID.from_chain((), m.key), id="from-chain"),
        pytest.param(lambda m: X509SVID(id=SpiffeID.parse(WORKLOAD), cert_chain=(), private_key=m.key), id="direct"),
        pytest.param(lambda m: X509SVID.load_der(b"", m.svid().private_key_der()), id="load-der"),
    ],
)
def test_empty_chain_is_rejected(minted: Minted, make: Callable[[Minted], object]) -> None:
    err = _error(lambda: make(minted))

    assert str(err) == "x509svid: certificate chain must not be empty"


@pytest.mark.parametrize(
    "key",
    [
        # Only the type matters here; a small key keeps generation quick.
        pytest.param(lambda: dsa.generate_private_key(1024), id="dsa"),  # noqa: S505
        pytest.param(x25519.X25519PrivateKey.generate, id="x25519"),
    ],
)
def test_unsupported_key_type_is_rejected_by_name(minted: Minted, key: Callable[[], Any]) -> None:
    private_key = key()

    direct = _error(lambda: X509SVID.from_chain(minted.chain, private_key))
    pem = private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    loaded = _error(lambda: X509SVID.load_pem(minted.svid().cert_chain_pem(), pem))

    name = type(private_key).__name__
    assert str(direct) == f'x509svid: private key type is not supported (want EC, RSA or Ed25519): "{name}"'
    assert str(loaded) == str(direct)


def test_hint_of_1024_bytes_is_accepted(minted: Minted) -> None:
    assert minted.svid(hint="h" * 1024).hint == "h" * 1024


@pytest.mark.parametrize(
    ("hint", "shown"),
    [
        pytest.param("h" * 1025, '"' + "h" * 200 + '"... (1025 characters)', id="ascii"),
        # 513 characters but 1026 bytes: the limit is in bytes.
        pytest.param("é" * 513, '"' + "\\u00e9" * 200 + '"... (513 characters)', id="multi-byte"),
    ],
)
def test_hint_longer_than_1024_bytes_is_rejected(minted: Minted, hint: str, shown: str) -> None:
    err = _error(lambda: minted.svid(hint=hint))

    assert str(err) == f"x509svid: hint must not be longer than 1024 bytes: {shown}"


def test_hint_that_is_not_utf8_is_rejected(minted: Minted) -> None:
    err = _error(lambda: minted.svid(hint="web\ud800"))

    assert str(err) == 'x509svid: hint must be encodable as UTF-8: "web\\ud800"'


def test_expires_at_and_issued_at_are_the_leafs_validity_in_utc(ca: TestCA) -> None:
    svid = ca.mint(not_before=NOW - 2 * HOUR, not_after=NOW + 3 * HOUR).svid()

    assert svid.issued_at == NOW - 2 * HOUR
    assert svid.expires_at == NOW + 3 * HOUR
    assert svid.expires_at.tzinfo == UTC
    assert svid.issued_at.tzinfo == UTC


def test_leaf_property_is_the_first_certificate(intermediate: TestCA) -> None:
    leaf = intermediate.mint()

    assert leaf.svid().leaf == leaf.leaf


# --- loading PEM and DER --------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", LEAF_KEY_TYPES)
@pytest.mark.parametrize("with_intermediate", [False, True], ids=["root-signed", "with-intermediate"])
@pytest.mark.parametrize("encoding", ["pem", "der"])
def test_load_round_trips_the_chain_and_key(
    ca: TestCA,
    intermediate: TestCA,
    leaf_keys: dict[KeyType, Any],
    *,
    key_type: KeyType,
    with_intermediate: bool,
    encoding: str,
) -> None:
    issuer = intermediate if with_intermediate else ca
    original = issuer.mint("/ns/prod", key=leaf_keys[key_type]).svid(hint="internal")

    if encoding == "pem":
        chain_bytes, key_bytes = original.cert_chain_pem(), original.private_key_pem()
        loaded = X509SVID.load_pem(chain_bytes, key_bytes, hint="internal")
        again = loaded.cert_chain_pem(), loaded.private_key_pem()
    else:
        chain_bytes, key_bytes = original.cert_chain_der(), original.private_key_der()
        loaded = X509SVID.load_der(chain_bytes, key_bytes, hint="internal")
        again = loaded.cert_chain_der(), loaded.private_key_der()

    assert loaded == original
    assert loaded.id == SpiffeID.parse("spiffe://example.org/ns/prod")
    assert len(loaded.cert_chain) == (2 if with_intermediate else 1)
    assert loaded.hint == "internal"
    assert type(loaded.private_key) is type(original.private_key)
    assert loaded.private_key.public_key() == original.leaf.public_key()
    assert again == (chain_bytes, key_bytes)


def test_pem_and_der_forms_describe_the_same_svid(intermediate: TestCA) -> None:
    svid = intermediate.mint().svid()

    from_pem = X509SVID.load_pem(svid.cert_chain_pem(), svid.private_key_pem())
    from_der = X509SVID.load_der(svid.cert_chain_der(), svid.private_key_der())

    assert from_pem == from_der == svid
    assert svid.private_key_pem().startswith(b"-----BEGIN PRIVATE KEY-----\n")


@pytest.mark.parametrize(
    ("key_type", "private_format", "label"),
    [
        pytest.param("ec-p256", PrivateFormat.PKCS8, b"PRIVATE KEY", id="ec-pkcs8"),
        pytest.param("ec-p256", PrivateFormat.TraditionalOpenSSL, b"EC PRIVATE KEY", id="ec-sec1"),
        pytest.param("ec-p384", PrivateFormat.TraditionalOpenSSL, b"EC PRIVATE KEY", id="ec-p384-sec1"),
        pytest.param("rsa-2048", PrivateFormat.PKCS8, b"PRIVATE KEY", id="rsa-pkcs8"),
        pytest.param("rsa-2048", PrivateFormat.TraditionalOpenSSL, b"RSA PRIVATE KEY", id="rsa-pkcs1"),
        pytest.param("ed25519", PrivateFormat.PKCS8, b"PRIVATE KEY", id="ed25519-pkcs8"),
    ],
)
def test_pem_private_key_formats_are_accepted(
    ca: TestCA, leaf_keys: dict[KeyType, Any], key_type: KeyType, private_format: PrivateFormat, label: bytes
) -> None:
    leaf = ca.mint(key=leaf_keys[key_type])
    key_pem = leaf.key.private_bytes(Encoding.PEM, private_format, NoEncryption())
    assert key_pem.startswith(b"-----BEGIN " + label + b"-----\n")

    svid = X509SVID.load_pem(leaf.svid().cert_chain_pem(), key_pem)

    assert svid.id == SpiffeID.parse(WORKLOAD)


def test_pem_chain_may_carry_other_blocks_such_as_the_key(svid: X509SVID) -> None:
    combined = svid.private_key_pem() + svid.cert_chain_pem()

    assert X509SVID.load_pem(combined, svid.private_key_pem()) == svid


@pytest.mark.parametrize(
    ("private_format", "shown"),
    [
        pytest.param(PrivateFormat.PKCS8, "first block 'ENCRYPTED PRIVATE KEY'", id="pkcs8"),
        pytest.param(PrivateFormat.TraditionalOpenSSL, "first block 'EC PRIVATE KEY'", id="sec1-with-proc-type"),
    ],
)
def test_encrypted_pem_key_is_rejected_as_encrypted(
    minted: Minted, svid: X509SVID, private_format: PrivateFormat, shown: str
) -> None:
    key_pem = minted.key.private_bytes(Encoding.PEM, private_format, BestAvailableEncryption(b"secret"))

    err = _error(lambda: X509SVID.load_pem(svid.cert_chain_pem(), key_pem))

    assert str(err) == f'x509svid: private key is encrypted (want an unencrypted key): "{len(key_pem)} bytes, {shown}"'


def test_encrypted_der_key_is_rejected_as_encrypted(minted: Minted, svid: X509SVID) -> None:
    key_der = minted.key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, BestAvailableEncryption(b"secret"))

    err = _error(lambda: X509SVID.load_der(svid.cert_chain_der(), key_der))

    assert str(err) == f'x509svid: private key is encrypted (want an unencrypted key): "{len(key_der)} bytes"'


def _chain_error_prefix(form: str) -> str:
    return f"x509svid: could not parse certificate chain{form} ("


@pytest.mark.parametrize(
    ("chain", "shown"),
    [
        pytest.param(b"", "0 bytes, no PEM block", id="empty"),
        pytest.param(b"not pem at all", "14 bytes, no PEM block", id="no-pem-block"),
        pytest.param(
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "59 bytes, first block 'CERTIFICATE'",
            id="garbage-certificate",
        ),
        pytest.param(b"-----BEGIN CERTIFICATE-----\nAAAA\n", "33 bytes, first block 'CERTIFICATE'", id="no-end-line"),
    ],
)
def test_malformed_pem_chain_is_rejected(svid: X509SVID, chain: bytes, shown: str) -> None:
    err = _error(lambda: X509SVID.load_pem(chain, svid.private_key_pem()))

    assert str(err).startswith(_chain_error_prefix(""))
    assert str(err).endswith(f'): "{shown}"')


def test_truncated_pem_certificate_is_rejected(svid: X509SVID) -> None:
    pem = svid.cert_chain_pem()
    truncated = pem[:200] + pem[-26:]  # keeps the framing, cuts the body

    err = _error(lambda: X509SVID.load_pem(truncated, svid.private_key_pem()))

    assert str(err).startswith(_chain_error_prefix(""))
    assert str(err).endswith(f"): \"{len(truncated)} bytes, first block 'CERTIFICATE'\"")


def _der_reason(data: bytes) -> str:
    """What spiffecore.der says about ``data``: its own layer's wording, embedded in ours."""
    with pytest.raises(DERError) as info:
        load_der_certificates(data)
    return str(info.value)


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda der: der[:-10], id="truncated"),
        pytest.param(lambda der: der[:1], id="only-tag"),
        pytest.param(lambda der: der + b"\x00", id="trailing-zero"),
        pytest.param(lambda der: der + b"\x30", id="trailing-half-header"),
        pytest.param(lambda der: der + b"\x30\x03\x02\x01\x01", id="trailing-sequence-not-a-certificate"),
        pytest.param(lambda der: b"-" + der, id="leading-garbage"),
        pytest.param(lambda der: der[:100] + bytes(20) + der[120:], id="zeroed-body"),
    ],
)
def test_malformed_der_chain_is_rejected_with_the_reason(svid: X509SVID, mangle: Callable[[bytes], bytes]) -> None:
    mangled = mangle(svid.cert_chain_der())

    err = _error(lambda: X509SVID.load_der(mangled, svid.private_key_der()))

    reason = _der_reason(mangled)
    assert str(err) == f'x509svid: could not parse certificate chain as DER ({reason}): "{len(mangled)} bytes"'
    assert isinstance(err.__cause__, DERError)


def test_pem_chain_given_to_load_der_is_rejected(svid: X509SVID) -> None:
    pem = svid.cert_chain_pem()

    err = _error(lambda: X509SVID.load_der(pem, svid.private_key_der()))

    assert str(err) == f'x509svid: could not parse certificate chain as DER ({_der_reason(pem)}): "{len(pem)} bytes"'


@pytest.mark.parametrize(
    ("key", "shown"),
    [
        pytest.param(b"", "0 bytes, no PEM block", id="empty"),
        pytest.param(b"garbage", "7 bytes, no PEM block", id="garbage"),
        pytest.param(
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            "59 bytes, first block 'PRIVATE KEY'",
            id="garbage-body",
        ),
        pytest.param(b"-----BEGIN PRIVATE KEY-----\nAAAA\n", "33 bytes, first block 'PRIVATE KEY'", id="no-end-line"),
        pytest.param(
            b"-----BEGIN private key-----\nAAAA\n-----END private key-----\n",
            "59 bytes, first block has a malformed header",
            id="lower-case-label",
        ),
    ],
)
def test_malformed_pem_key_is_rejected(svid: X509SVID, key: bytes, shown: str) -> None:
    err = _error(lambda: X509SVID.load_pem(svid.cert_chain_pem(), key))

    assert str(err) == f'x509svid: could not parse private key as unencrypted PEM: "{shown}"'


def test_certificate_given_as_pem_key_is_rejected(svid: X509SVID) -> None:
    chain = svid.cert_chain_pem()

    err = _error(lambda: X509SVID.load_pem(chain, chain))

    assert str(err) == (
        f"x509svid: could not parse private key as unencrypted PEM: \"{len(chain)} bytes, first block 'CERTIFICATE'\""
    )


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda key: b"", id="empty"),
        pytest.param(lambda key: b"garbage", id="garbage"),
        pytest.param(lambda key: key[:-5], id="truncated"),
        pytest.param(lambda key: key + b"\x00\x00", id="trailing-garbage"),
    ],
)
def test_malformed_der_key_is_rejected(svid: X509SVID, mangle: Callable[[bytes], bytes]) -> None:
    key = mangle(svid.private_key_der())

    err = _error(lambda: X509SVID.load_der(svid.cert_chain_der(), key))

    assert str(err) == f'x509svid: could not parse private key as unencrypted DER PKCS#8: "{len(key)} bytes"'


def test_loaded_key_of_another_certificate_is_rejected(ca: TestCA, svid: X509SVID) -> None:
    other = ca.mint("/other").svid()

    from_pem = _error(lambda: X509SVID.load_pem(svid.cert_chain_pem(), other.private_key_pem()))
    from_der = _error(lambda: X509SVID.load_der(svid.cert_chain_der(), other.private_key_der()))

    expected = f'x509svid: private key does not match the leaf certificate\'s public key: "{WORKLOAD}"'
    assert str(from_pem) == str(from_der) == expected


def test_loaded_chain_breaking_a_leaf_rule_is_rejected(ca: TestCA) -> None:
    bad = ca.mint(is_ca=True)
    chain_pem = b"".join(cert.public_bytes(Encoding.PEM) for cert in bad.chain)
    key_pem = bad.key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())

    err = _error(lambda: X509SVID.load_pem(chain_pem, key_pem))

    assert str(err) == f'x509svid: leaf certificate must not have CA flag set to true: "{WORKLOAD}"'


# --- certificates that parse but are broken inside (found by the fuzz tests below) ------------------


def _der_replacing(cert: x509.Certificate, old: bytes, new: bytes) -> bytes:
    """The certificate's DER with ``old`` (which occurs once) replaced: its signature no longer matters here."""
    der = cert.public_bytes(Encoding.DER)
    assert der.count(old) == 1
    return der.replace(old, new)


def _pem_of(der: bytes) -> bytes:
    return b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(der) + b"-----END CERTIFICATE-----\n"


def test_leaf_with_an_unreadable_public_key_is_rejected(minted: Minted, svid: X509SVID) -> None:
    point = minted.key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    bad = _der_replacing(minted.leaf, point, b"\x04" + bytes(64))  # (0, 0) is not on the curve

    from_der = _error(lambda: X509SVID.load_der(bad, svid.private_key_der()))
    from_pem = _error(lambda: X509SVID.load_pem(_pem_of(bad), svid.private_key_pem()))

    for err in (from_der, from_pem):
        assert str(err).startswith("x509svid: could not read the leaf certificate's public key (")
        assert str(err).endswith(f'): "{WORKLOAD}"')


def test_certificate_with_a_duplicate_extension_is_rejected(minted: Minted, svid: X509SVID) -> None:
    key_usage_oid, eku_oid = bytes.fromhex("0603551d0f"), bytes.fromhex("0603551d25")
    bad = _der_replacing(minted.leaf, eku_oid, key_usage_oid)

    err = _error(lambda: X509SVID.load_der(bad, svid.private_key_der()))

    assert str(err).startswith("x509svid: certificate extensions are malformed (")
    assert str(err).endswith(f"): \"subject='' serial={minted.leaf.serial_number:x}\"")


def test_certificate_with_an_invalid_version_is_rejected(minted: Minted, svid: X509SVID) -> None:
    bad = _der_replacing(minted.leaf, bytes.fromhex("a003020102"), bytes.fromhex("a003020107"))  # v8

    from_der = _error(lambda: X509SVID.load_der(bad, svid.private_key_der()))
    from_pem = _error(lambda: X509SVID.load_pem(_pem_of(bad), svid.private_key_pem()))

    assert str(from_der).startswith("x509svid: could not parse certificate chain as DER (")
    assert str(from_der).endswith(f'): "{len(bad)} bytes"')
    assert str(from_pem).startswith("x509svid: could not parse certificate chain (")
    assert str(from_pem).endswith(f"): \"{len(_pem_of(bad))} bytes, first block 'CERTIFICATE'\"")


def test_certificate_with_a_malformed_subject_is_named_by_its_serial(ca: TestCA) -> None:
    cn_oid = bytes.fromhex("0603550403")
    leaf = ca.mint(uris=[], subject="web").leaf
    bad = x509.load_der_x509_certificate(_der_replacing(leaf, cn_oid + b"\x0c\x03web", cn_oid + b"\x01\x03web"))

    err = _error(lambda: id_from_cert(bad))

    assert str(err) == f'x509svid: certificate contains no URI SAN: "subject=(malformed) serial={leaf.serial_number:x}"'


# --- the private key never shows ------------------------------------------------------------------


def _key_secrets(key: Any) -> Iterator[str]:
    """Every form of the key's secret a message could leak: PEM body pieces, DER hex, the scalar."""
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()
    traditional = (
        key.private_bytes(Encoding.PEM, PrivateFormat.TraditionalOpenSSL, NoEncryption()).decode()
        if not isinstance(key, ed25519.Ed25519PrivateKey)
        else pem
    )
    der = key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())
    for text in (pem, traditional):
        body = "".join(line for line in text.splitlines() if not line.startswith("-----"))
        # Every run of 12 base64 characters of the body: messages never carry base64 at all.
        yield from (body[i : i + 12] for i in range(0, len(body) - 12, 4))
    b64 = base64.b64encode(der).decode()
    yield from (b64[i : i + 12] for i in range(0, len(b64) - 12, 4))
    yield der[-16:].hex()
    if isinstance(key, ec.EllipticCurvePrivateKey):
        value = key.private_numbers().private_value
        yield f"{value:x}"
        yield str(value)
    elif isinstance(key, rsa.RSAPrivateKey):
        yield f"{key.private_numbers().d:x}"[:32]
    else:
        yield key.private_bytes_raw().hex()


def _all_text(err: BaseException) -> str:
    """The messages and reprs of an error and every error chained to it."""
    parts: list[str] = []
    current: BaseException | None = err
    while current is not None:
        parts += [str(current), repr(current)]
        current = current.__cause__ or current.__context__
    return "\n".join(parts)


@pytest.mark.parametrize("key_type", ["ec-p256", "rsa-2048", "ed25519"])
def test_private_key_never_appears_in_errors_or_repr(
    ca: TestCA, leaf_keys: dict[KeyType, Any], key_type: KeyType
) -> None:
    leaf = ca.mint(key=leaf_keys[key_type])
    svid = leaf.svid()
    chain_pem, chain_der = svid.cert_chain_pem(), svid.cert_chain_der()
    key_pem, key_der = svid.private_key_pem(), svid.private_key_der()
    mismatched = ca.mint("/other")
    broken_header = key_pem.replace(b"-----BEGIN PRIVATE KEY-----", b"-----BEGIN PRIVATE KEY", 1)
    failures: list[Callable[[], object]] = [
        lambda: X509SVID.load_pem(key_pem, key_pem),  # key given as the chain
        lambda: X509SVID.load_der(key_der, key_der),
        lambda: X509SVID.load_pem(chain_pem, broken_header),  # header runs into the base64 body
        lambda: X509SVID.load_pem(chain_pem, key_pem[:-40]),
        lambda: X509SVID.load_pem(chain_pem, key_pem.replace(b"\n", b"\n!", 3)),
        lambda: X509SVID.load_der(chain_der, key_der[:-3]),
        lambda: X509SVID.load_der(chain_der, key_der + b"\x01"),
        lambda: X509SVID.load_pem(mismatched.svid().cert_chain_pem(), key_pem),
        lambda: X509SVID.load_der(mismatched.svid().cert_chain_der(), key_der),
        lambda: X509SVID.from_chain(mismatched.chain, leaf.key),
        lambda: X509SVID.from_chain(leaf.chain, leaf.key, hint="x" * 2000),
    ]
    texts = [repr(svid), str(svid)]
    for failure in failures:
        with pytest.raises(X509SVIDError) as info:
            failure()
        texts.append(_all_text(info.value))

    for secret in _key_secrets(leaf.key):
        for text in texts:
            assert secret not in text


def test_repr_shows_the_id_and_chain_but_not_the_key(svid: X509SVID) -> None:
    text = repr(svid)

    assert "private_key" not in text
    assert "example.org" in text
    assert "/workload" in text


# --- fuzzing --------------------------------------------------------------------------------------

_FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# A mutated serial may turn negative: cryptography still loads it, with a deprecation warning that
# this project's pytest settings would turn into an error. It is the library's warning, not ours.
_NEGATIVE_SERIAL = pytest.mark.filterwarnings(
    "ignore:Parsed a serial number which wasn't positive:cryptography.utils.CryptographyDeprecationWarning"
)


@_FUZZ
@given(chain=st.binary(max_size=2048), key=st.binary(max_size=512))
def test_load_der_of_random_bytes_raises_only_x509svid_error(chain: bytes, key: bytes) -> None:
    with pytest.raises(X509SVIDError):
        X509SVID.load_der(chain, key)


@_FUZZ
@given(chain=st.binary(max_size=2048), key=st.binary(max_size=512))
def test_load_pem_of_random_bytes_raises_only_x509svid_error(chain: bytes, key: bytes) -> None:
    with pytest.raises(X509SVIDError):
        X509SVID.load_pem(chain, key)


def _mutations(data: bytes) -> st.SearchStrategy[bytes]:
    """``data`` with a few bytes overwritten, or cut short: inputs that get deep into the parsers."""
    positions = st.integers(min_value=0, max_value=len(data) - 1)
    overwrite = st.lists(st.tuples(positions, st.integers(0, 255)), min_size=1, max_size=4).map(
        lambda edits: _apply(data, edits)
    )
    cut = st.integers(min_value=0, max_value=len(data)).map(lambda n: data[:n])
    return st.one_of(overwrite, cut)


def _apply(data: bytes, edits: Sequence[tuple[int, int]]) -> bytes:
    mutable = bytearray(data)
    for position, value in edits:
        mutable[position] = value
    return bytes(mutable)


_VALID = TestCA.create("fuzz.example").intermediate().mint("/fuzz", dns_names=["fuzz.example"]).svid()


@_NEGATIVE_SERIAL
@_FUZZ
@given(chain=_mutations(_VALID.cert_chain_der()), key=st.one_of(st.just(_VALID.private_key_der()), st.binary()))
def test_load_der_of_mutated_svid_raises_only_x509svid_error(chain: bytes, key: bytes) -> None:
    with contextlib.suppress(X509SVIDError):
        X509SVID.load_der(chain, key)


@_NEGATIVE_SERIAL
@_FUZZ
@given(
    chain=st.one_of(_mutations(_VALID.cert_chain_pem()), st.just(_VALID.cert_chain_pem())),
    key=st.one_of(_mutations(_VALID.private_key_pem()), st.just(_VALID.private_key_pem())),
)
def test_load_pem_of_mutated_svid_raises_only_x509svid_error(chain: bytes, key: bytes) -> None:
    with contextlib.suppress(X509SVIDError):
        X509SVID.load_pem(chain, key)
