"""X.509 authorities: SPIRE's CA template, self-signed and as an intermediate of an upstream CA."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controlplane.ca.errors import CAError
from controlplane.ca.keys import KeyType, SigningKey
from controlplane.ca.upstream import Upstream
from controlplane.ca.x509ca import X509Authority, create_intermediate, create_self_signed
from spiffecore import TrustDomain
from tests.controlplane.ca.conftest import T0, TD
from tests.support.ca import TestCA

H = timedelta(hours=1)


@pytest.fixture(scope="module")
def root() -> X509Authority:
    return create_self_signed(TD, ec.generate_private_key(ec.SECP256R1()), ttl=24 * H, now=T0)


@pytest.fixture(scope="module")
def upstream_ca() -> TestCA:
    return TestCA.create("example.org", not_before=T0 - H, not_after=T0 + 100 * H)


@pytest.fixture(scope="module")
def upstream(upstream_ca: TestCA) -> Upstream:
    mid = upstream_ca.intermediate(not_before=T0 - H, not_after=T0 + 50 * H)
    return Upstream(chain=(mid.cert, upstream_ca.cert), private_key=mid.key, source="up.pem")  # type: ignore[arg-type]


def _ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_class(kind)


def test_self_signed_follows_spires_ca_template(root: X509Authority) -> None:
    cert = root.certificate
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COUNTRY_NAME)[0].value == "US"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "SPIFFE"
    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == str(cert.serial_number)
    assert cert.not_valid_before_utc == T0 - timedelta(seconds=10)
    assert cert.not_valid_after_utc == T0 + 24 * H
    constraints = _ext(cert, x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value == x509.BasicConstraints(ca=True, path_length=None)
    usage = _ext(cert, x509.KeyUsage)
    assert usage.critical
    assert isinstance(usage.value, x509.KeyUsage)
    assert usage.value.key_cert_sign
    assert usage.value.crl_sign
    assert not usage.value.digital_signature
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert isinstance(san, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org"]
    assert _ext(cert, x509.SubjectKeyIdentifier).value.digest == root.subject_key_id  # type: ignore[attr-defined]
    with pytest.raises(x509.ExtensionNotFound):
        _ext(cert, x509.AuthorityKeyIdentifier)
    cert.verify_directly_issued_by(cert)


def test_self_signed_is_its_own_root_and_adds_nothing_to_chains(root: X509Authority) -> None:
    assert root.is_self_signed
    assert root.roots == (root.certificate,)
    assert root.signing_chain == ()
    assert root.window.not_after == T0 + 24 * H
    assert x509.load_pem_x509_certificates(root.chain_pem()) == [root.certificate]


def test_two_authorities_have_different_subjects(root: X509Authority) -> None:
    other = create_self_signed(TD, ec.generate_private_key(ec.SECP256R1()), ttl=24 * H, now=T0)
    assert other.certificate.subject != root.certificate.subject


@pytest.mark.parametrize("key_type", list(KeyType))
def test_self_signed_with_each_key_type(keys: dict[KeyType, SigningKey], key_type: KeyType) -> None:
    authority = create_self_signed(TD, keys[key_type], ttl=H, now=T0)
    assert authority.certificate.public_key() == keys[key_type].public_key()


def test_microseconds_of_now_are_dropped(root: X509Authority) -> None:
    authority = create_self_signed(TD, root.private_key, ttl=H, now=T0 + timedelta(microseconds=999_999))
    assert authority.not_after == T0 + H


def test_intermediate_is_signed_by_the_upstream_and_publishes_its_root(upstream: Upstream, upstream_ca: TestCA) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    authority = create_intermediate(TD, key, upstream, ttl=24 * H, now=T0)
    cert = authority.certificate
    assert cert.issuer == upstream.certificate.subject
    cert.verify_directly_issued_by(upstream.certificate)
    upstream_ski = _ext(upstream.certificate, x509.SubjectKeyIdentifier).value
    aki = _ext(cert, x509.AuthorityKeyIdentifier).value
    assert isinstance(aki, x509.AuthorityKeyIdentifier)
    assert aki.key_identifier == upstream_ski.digest  # type: ignore[attr-defined]
    assert not authority.is_self_signed
    assert authority.roots == (upstream_ca.cert,)
    assert authority.signing_chain == (cert, upstream.certificate)
    assert x509.load_pem_x509_certificates(authority.chain_pem()) == [cert, upstream.certificate, upstream_ca.cert]


def test_intermediate_of_a_root_carries_only_itself(upstream_ca: TestCA) -> None:
    top = Upstream(chain=(upstream_ca.cert,), private_key=upstream_ca.key, source="root.pem")  # type: ignore[arg-type]
    authority = create_intermediate(TD, ec.generate_private_key(ec.SECP256R1()), top, ttl=H, now=T0)
    assert authority.signing_chain == (authority.certificate,)
    assert authority.roots == (upstream_ca.cert,)


def test_intermediate_may_not_outlive_the_upstream(upstream: Upstream) -> None:
    with pytest.raises(CAError, match=r"^ca: ca_ttl 51h outlives the upstream chain"):
        create_intermediate(TD, ec.generate_private_key(ec.SECP256R1()), upstream, ttl=51 * H, now=T0)


def test_authority_checks_its_parts(root: X509Authority, upstream: Upstream) -> None:
    cert = root.certificate
    serial = f"serial={cert.serial_number:x} not_after={cert.not_valid_after_utc.isoformat()}"
    cases: list[tuple[dict[str, object], str]] = [
        (
            {"private_key": ec.generate_private_key(ec.SECP256R1())},
            "private key does not match the authority certificate",
        ),
        (
            {"trust_domain": TrustDomain.parse("other.org")},
            "authority certificate's URI SAN is not the trust domain's ID (spiffe://other.org)",
        ),
        (
            {"upstream_chain": (upstream.certificate,)},
            "authority certificate is not signed by the first certificate of its upstream chain",
        ),
    ]
    values: dict[str, object] = {"trust_domain": TD, "certificate": cert, "private_key": root.private_key}
    for change, rule in cases:
        with pytest.raises(CAError) as info:
            X509Authority(**(values | change))  # type: ignore[arg-type]
        assert info.value.rule == rule
    assert str(info.value) == f'ca: {rule}: "{serial}"'


def test_a_leaf_is_not_an_authority() -> None:
    ca = TestCA.create("example.org")
    minted = ca.mint()
    with pytest.raises(CAError) as info:
        X509Authority(trust_domain=TD, certificate=minted.leaf, private_key=minted.key)  # type: ignore[arg-type]
    assert info.value.rule == "signing certificate must have CA flag set to true"


def test_an_authority_without_an_upstream_chain_must_be_self_signed() -> None:
    ca = TestCA.create("example.org")
    mid = ca.intermediate()
    with pytest.raises(CAError) as info:
        X509Authority(trust_domain=TD, certificate=mid.cert, private_key=mid.key)  # type: ignore[arg-type]
    assert info.value.rule == "authority certificate without an upstream chain must be self-signed"


def test_an_authority_needs_a_subject_key_id() -> None:
    ca = TestCA.create("example.org", subject_key_id=False)
    with pytest.raises(CAError) as info:
        X509Authority(trust_domain=TD, certificate=ca.cert, private_key=ca.key)  # type: ignore[arg-type]
    assert info.value.rule == "authority certificate has no subject key identifier"


def test_authority_ttl_must_be_positive(root: X509Authority) -> None:
    with pytest.raises(CAError) as info:
        create_self_signed(TD, root.private_key, ttl=timedelta(0), now=T0)
    assert str(info.value) == 'ca: authority TTL must be positive: "0s"'


def test_repr_leaves_the_key_out(root: X509Authority) -> None:
    assert "private_key" not in repr(root)
