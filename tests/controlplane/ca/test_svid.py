"""X.509-SVIDs from SPIRE's workload template, checked by spiffecore; public keys from CSRs."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from controlplane.ca.errors import CAError
from controlplane.ca.keys import KeyType, SigningKey
from controlplane.ca.svid import public_key_from_csr, sign_x509_svid
from controlplane.ca.upstream import Upstream
from controlplane.ca.x509ca import X509Authority, create_intermediate, create_self_signed
from spiffecore import X509SVID, SpiffeID, X509Bundle, verify_x509_svid
from tests.controlplane.ca.conftest import T0, TD
from tests.support.ca import TestCA

H = timedelta(hours=1)
S = timedelta(seconds=1)
WEB = SpiffeID.parse("spiffe://example.org/ns/prod/sa/web")


@pytest.fixture(scope="module")
def authority() -> X509Authority:
    return create_self_signed(TD, ec.generate_private_key(ec.SECP256R1()), ttl=24 * H, now=T0)


@pytest.fixture(scope="module")
def upstream_ca() -> TestCA:
    return TestCA.create("example.org", not_before=T0 - H, not_after=T0 + 100 * H)


@pytest.fixture(scope="module")
def intermediate(upstream_ca: TestCA) -> X509Authority:
    mid = upstream_ca.intermediate(not_before=T0 - H, not_after=T0 + 50 * H)
    upstream = Upstream(chain=(mid.cert, upstream_ca.cert), private_key=mid.key, source="up")  # type: ignore[arg-type]
    return create_intermediate(TD, ec.generate_private_key(ec.SECP384R1()), upstream, ttl=24 * H, now=T0)


def _value(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.ExtensionType:
    return cert.extensions.get_extension_for_class(kind).value


def _critical(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> bool:
    return cert.extensions.get_extension_for_class(kind).critical


def test_the_workload_template(authority: X509Authority, keys: dict[KeyType, SigningKey]) -> None:
    key = keys[KeyType.EC_P256]
    (leaf,) = sign_x509_svid(
        authority, spiffe_id=WEB, public_key=key.public_key(), dns_names=("web.example.org", "web"), ttl=H, now=T0
    )
    assert leaf.subject == x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIRE"),
            x509.NameAttribute(NameOID.COMMON_NAME, "web.example.org"),
        ]
    )
    assert leaf.issuer == authority.certificate.subject
    assert leaf.not_valid_before_utc == T0 - 10 * S
    assert leaf.not_valid_after_utc == T0 + H
    san = _value(leaf, x509.SubjectAlternativeName)
    assert isinstance(san, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(WEB)]
    assert san.get_values_for_type(x509.DNSName) == ["web.example.org", "web"]
    assert _critical(leaf, x509.KeyUsage)
    assert _value(leaf, x509.KeyUsage) == x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=True,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    assert list(_value(leaf, x509.ExtendedKeyUsage)) == [  # type: ignore[call-overload]
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    assert _critical(leaf, x509.BasicConstraints)
    assert _value(leaf, x509.BasicConstraints) == x509.BasicConstraints(ca=False, path_length=None)
    assert _value(leaf, x509.SubjectKeyIdentifier) == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki = _value(leaf, x509.AuthorityKeyIdentifier)
    assert isinstance(aki, x509.AuthorityKeyIdentifier)
    assert aki.key_identifier == authority.subject_key_id


def test_rsa_keys_get_key_encipherment_instead_of_key_agreement(
    authority: X509Authority, keys: dict[KeyType, SigningKey]
) -> None:
    (leaf,) = sign_x509_svid(authority, spiffe_id=WEB, public_key=keys[KeyType.RSA_2048].public_key(), ttl=H, now=T0)
    usage = _value(leaf, x509.KeyUsage)
    assert isinstance(usage, x509.KeyUsage)
    assert (usage.digital_signature, usage.key_encipherment, usage.key_agreement) == (True, True, False)


def test_without_dns_names_there_is_no_cn(authority: X509Authority, keys: dict[KeyType, SigningKey]) -> None:
    (leaf,) = sign_x509_svid(authority, spiffe_id=WEB, public_key=keys[KeyType.EC_P256].public_key(), ttl=H, now=T0)
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME) == []
    san = _value(leaf, x509.SubjectAlternativeName)
    assert isinstance(san, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == []


def test_a_dns_name_too_long_for_a_cn_stays_a_san(authority: X509Authority, keys: dict[KeyType, SigningKey]) -> None:
    long_name = ("a" * 60) + ".example.org"
    (leaf,) = sign_x509_svid(
        authority, spiffe_id=WEB, public_key=keys[KeyType.EC_P256].public_key(), dns_names=[long_name], ttl=H, now=T0
    )
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME) == []
    assert _value(leaf, x509.SubjectAlternativeName).get_values_for_type(x509.DNSName) == [long_name]  # type: ignore[attr-defined]


@pytest.mark.parametrize("key_type", list(KeyType))
@pytest.mark.parametrize("signer", ["self-signed", "intermediate"])
def test_svids_verify_with_spiffecore(
    authority: X509Authority,
    intermediate: X509Authority,
    upstream_ca: TestCA,
    keys: dict[KeyType, SigningKey],
    *,
    key_type: KeyType,
    signer: str,
) -> None:
    ca = authority if signer == "self-signed" else intermediate
    key = keys[key_type]
    chain = sign_x509_svid(ca, spiffe_id=WEB, public_key=key.public_key(), dns_names=["web"], ttl=H, now=T0)
    svid = X509SVID(id=WEB, cert_chain=chain, private_key=key)
    bundle = X509Bundle(trust_domain=TD, authorities=ca.roots)
    verified = verify_x509_svid(chain, bundle, at=T0 + 30 * timedelta(minutes=1))
    assert verified.id == WEB
    assert verified.chain[-1] == (authority.certificate if signer == "self-signed" else upstream_ca.cert)
    assert svid.cert_chain == (
        (chain[0],) if signer == "self-signed" else (chain[0], intermediate.certificate, intermediate.upstream_chain[0])
    )
    # Valid from 10 s before issuance; the CA too, so a verifier a little behind accepts it.
    verify_x509_svid(chain, bundle, at=T0 - 9 * S)


def test_an_svid_must_not_outlive_its_authority(authority: X509Authority, keys: dict[KeyType, SigningKey]) -> None:
    public_key = keys[KeyType.EC_P256].public_key()
    sign_x509_svid(authority, spiffe_id=WEB, public_key=public_key, ttl=H, now=T0 + 23 * H)  # ends with the CA
    with pytest.raises(CAError) as info:
        sign_x509_svid(authority, spiffe_id=WEB, public_key=public_key, ttl=H, now=T0 + 23 * H + S)
    assert str(info.value) == (
        "ca: SVID would outlive its signing authority (TTL 1h from 2030-01-01T23:00:01+00:00 ends at"
        ' 2030-01-02T00:00:01+00:00, the authority at 2030-01-02T00:00:00+00:00): "spiffe://example.org/ns/prod/sa/web"'
    )


@pytest.mark.parametrize(
    ("spiffe_id", "ttl", "message"),
    [
        (
            "spiffe://other.org/web",
            H,
            'ca: SVID SPIFFE ID is not in the authority\'s trust domain (example.org): "spiffe://other.org/web"',
        ),
        ("spiffe://example.org", H, 'ca: SVID SPIFFE ID must have a path: "spiffe://example.org"'),
        ("spiffe://example.org/web", timedelta(0), 'ca: SVID TTL must be positive: "0s"'),
    ],
)
def test_sign_refuses(
    authority: X509Authority, keys: dict[KeyType, SigningKey], spiffe_id: str, ttl: timedelta, message: str
) -> None:
    with pytest.raises(CAError) as info:
        sign_x509_svid(
            authority,
            spiffe_id=SpiffeID.parse(spiffe_id),
            public_key=keys[KeyType.EC_P256].public_key(),
            ttl=ttl,
            now=T0,
        )
    assert str(info.value) == message


@settings(max_examples=50, deadline=None)
@given(offset=st.integers(min_value=0, max_value=20 * 3600 - 1), micro=st.integers(0, 999_999))
def test_any_time_before_activation_of_the_next_the_max_ttl_fits(
    authority: X509Authority, keys: dict[KeyType, SigningKey], offset: int, micro: int
) -> None:
    """The 24 h authority signs until its successor activates at 20 h: 4 h SVIDs always fit."""
    now = T0 + timedelta(seconds=offset, microseconds=micro)
    assume(now < authority.window.activate_at)  # 19:59:58.33: the 10 s backdate counts in the lifetime
    (leaf,) = sign_x509_svid(
        authority, spiffe_id=WEB, public_key=keys[KeyType.EC_P256].public_key(), ttl=4 * H, now=now
    )
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == 4 * H + 10 * S


# --- CSRs ----------------------------------------------------------------------------------------


def _csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ignored")]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://example.org/admin")]), critical=False
        )
    )
    digest = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, digest).public_bytes(Encoding.DER)


@pytest.mark.parametrize("key_type", list(KeyType))
def test_public_key_from_csr(keys: dict[KeyType, SigningKey], key_type: KeyType) -> None:
    key = keys[key_type]
    assert public_key_from_csr(_csr(key)) == key.public_key()


def test_the_csrs_requested_id_is_ignored(authority: X509Authority, keys: dict[KeyType, SigningKey]) -> None:
    """The CSR asks for /admin; the SVID carries the ID the caller's entry says."""
    public_key = public_key_from_csr(_csr(keys[KeyType.EC_P256]))
    (leaf,) = sign_x509_svid(authority, spiffe_id=WEB, public_key=public_key, ttl=H, now=T0)
    assert _value(leaf, x509.SubjectAlternativeName).get_values_for_type(x509.UniformResourceIdentifier) == [str(WEB)]  # type: ignore[attr-defined]


def _tampered(der: bytes) -> bytes:
    """The CSR with one bit of its subject flipped: the self-signature no longer matches."""
    index = der.index(b"ignored")
    return der[:index] + b"Ignored" + der[index + len(b"ignored") :]


@pytest.fixture(scope="module")
def weak_rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 -- weak on purpose


def test_csr_errors(keys: dict[KeyType, SigningKey], weak_rsa: rsa.RSAPrivateKey) -> None:
    cases: list[tuple[bytes, str]] = [
        (b"", 'ca: could not parse certificate signing request as DER: "0 bytes"'),
        (b"\x30\x03garbage", 'ca: could not parse certificate signing request as DER: "9 bytes"'),
        (b"x" * 40000, 'ca: certificate signing request must not be longer than 32768 bytes: "40000 bytes"'),
        (_tampered(_csr(keys[KeyType.EC_P256])), "ca: certificate signing request signature is not valid"),
        (_tampered(_csr(keys[KeyType.RSA_2048])), "ca: certificate signing request signature is not valid"),
        (_csr(weak_rsa), 'ca: certificate signing request RSA key must have 2048 to 8192 bits: "1024 bits"'),
        (
            _csr(ec.generate_private_key(ec.SECP521R1())),
            'ca: certificate signing request EC key must be on P-256 or P-384: "secp521r1"',
        ),
        (
            _csr(ed25519.Ed25519PrivateKey.generate()),
            "ca: certificate signing request key type is not supported (want EC P-256, EC P-384 or RSA):"
            ' "Ed25519PublicKey"',
        ),
    ]
    authority_der = TestCA.create("example.org").cert.public_bytes(Encoding.DER)
    cases.append(
        (authority_der, f'ca: could not parse certificate signing request as DER: "{len(authority_der)} bytes"')
    )
    for der, message in cases:
        with pytest.raises(CAError) as info:
            public_key_from_csr(der)
        assert str(info.value) == message
