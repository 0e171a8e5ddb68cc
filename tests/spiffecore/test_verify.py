"""Verification of a peer's X.509-SVID chain against the bundle of the leaf's own trust domain.

Path validation is cryptography's; where a message embeds its reason, our prefix and quoted ID are
compared exactly and the library's reason only for the words that show which check failed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from spiffecore import (
    BundleSet,
    SpiffeBundle,
    SpiffeID,
    TrustDomain,
    VerificationCache,
    VerificationError,
    VerifiedX509SVID,
    X509Bundle,
    X509BundleSource,
    X509SVIDError,
    verify_x509_svid,
)
from tests.support.ca import CA_KEY_USAGE, HOUR, NOW, KeyType, Minted, TestCA, key_usage, new_key

WORKLOAD = "spiffe://example.org/workload"
NOT_VERIFIED = "x509svid: could not verify leaf certificate ("

# Words of cryptography's reasons that show which check failed (the library's text, not ours).
EXPIRED = "not valid at validation time"
BAD_SIGNATURE = "signature does not match"
NO_KEY_CERT_SIGN = "keyCertSign must be asserted"
NOT_A_CA = "basicConstraints.cA must be asserted"
NO_PATH = "candidates exhausted"


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA.create("example.org")


@pytest.fixture(scope="module")
def intermediate(ca: TestCA) -> TestCA:
    return ca.intermediate()


@pytest.fixture(scope="module")
def other_ca() -> TestCA:
    return TestCA.create("other.org")


@pytest.fixture(scope="module")
def bundles(ca: TestCA, other_ca: TestCA) -> BundleSet:
    return BundleSet.of(ca.bundle(), other_ca.bundle())


def _verify(chain: Sequence[x509.Certificate], source: X509BundleSource, *, at: datetime = NOW) -> VerifiedX509SVID:
    return verify_x509_svid(chain, source, at=at)


def _refused(chain: Sequence[x509.Certificate], source: X509BundleSource, *, at: datetime = NOW) -> VerificationError:
    with pytest.raises(VerificationError) as info:
        verify_x509_svid(chain, source, at=at)
    err = info.value
    assert not isinstance(err, X509SVIDError), "verification failures are VerificationError, not X509SVIDError"
    return err


def _assert_not_verified(err: VerificationError, spiffe_id: str, reason: str) -> None:
    """Our prefix and the quoted ID exactly; the library's reason by the words that identify it."""
    message = str(err)
    assert message.startswith(NOT_VERIFIED)
    assert message.endswith(f'): "{spiffe_id}"')
    assert reason in message[len(NOT_VERIFIED) :]
    assert err.value == spiffe_id
    assert isinstance(err.__cause__, x509.verification.VerificationError)


# --- chains that verify ---------------------------------------------------------------------------


def test_leaf_signed_by_the_root_verifies_to_the_root(ca: TestCA, bundles: BundleSet) -> None:
    leaf = ca.mint()

    verified = _verify(leaf.chain, bundles)

    assert verified.id == SpiffeID.parse(WORKLOAD)
    assert verified.chain == (leaf.leaf, ca.cert)


def test_leaf_with_intermediate_verifies_through_it(intermediate: TestCA, bundles: BundleSet) -> None:
    leaf = intermediate.mint("/ns/prod/sa/web")

    verified = _verify(leaf.chain, bundles)

    assert verified.id == SpiffeID.parse("spiffe://example.org/ns/prod/sa/web")
    assert verified.chain == (leaf.leaf, intermediate.cert, intermediate.root.cert)


def test_leaf_below_two_intermediates_verifies(intermediate: TestCA, bundles: BundleSet) -> None:
    lower = intermediate.intermediate()
    leaf = lower.mint()

    verified = _verify(leaf.chain, bundles)

    assert leaf.chain == (leaf.leaf, lower.cert, intermediate.cert)
    assert verified.chain == (leaf.leaf, lower.cert, intermediate.cert, intermediate.root.cert)
    assert verified.chain[-1] in bundles.x509_bundle_for(TrustDomain.parse("example.org")).authorities


def test_chain_that_carries_the_root_itself_verifies(intermediate: TestCA, bundles: BundleSet) -> None:
    leaf = intermediate.mint()

    verified = _verify((*leaf.chain, intermediate.root.cert), bundles)

    assert verified.chain == (leaf.leaf, intermediate.cert, intermediate.root.cert)


@pytest.mark.parametrize("ca_key_type", ["rsa-2048", "ec-p384", "ec-p521"])
def test_ca_of_each_supported_key_type_verifies(ca_key_type: KeyType) -> None:
    root = TestCA.create("keys.example", key_type=ca_key_type)
    lower = root.intermediate(key_type=ca_key_type)
    leaf = lower.mint()

    verified = _verify(leaf.chain, root.x509_bundle())

    assert verified.chain == (leaf.leaf, lower.cert, root.cert)


@pytest.mark.parametrize("leaf_key_type", ["ec-p256", "ec-p384", "ed25519"])
def test_leaf_of_each_key_type_verifies(ca: TestCA, bundles: BundleSet, leaf_key_type: KeyType) -> None:
    leaf = ca.mint(key_type=leaf_key_type)

    assert _verify(leaf.chain, bundles).id == SpiffeID.parse(WORKLOAD)


def test_rsa_leaf_below_rsa_ca_verifies() -> None:
    root = TestCA.create("rsa.example", key_type="rsa-2048")
    leaf = root.mint(key=root.key)  # reuse the root's key: RSA generation is slow, and only the type matters

    assert _verify(leaf.chain, root.x509_bundle()).id == SpiffeID.parse("spiffe://rsa.example/workload")


@pytest.mark.parametrize(
    "knobs",
    [
        pytest.param({"authority_key_id": False}, id="no-authority-key-id"),
        pytest.param({"eku": None}, id="no-extended-key-usage"),
        pytest.param({"is_ca": None}, id="no-basic-constraints"),
        pytest.param({"subject": "web", "dns_names": ["web.example"]}, id="subject-and-dns-names"),
        pytest.param(
            {"usage": key_usage(digital_signature=True, key_encipherment=True, key_agreement=True)},
            id="key-encipherment-and-agreement",
        ),
    ],
)
def test_leaf_variants_the_specification_allows_verify(
    intermediate: TestCA, bundles: BundleSet, knobs: dict[str, Any]
) -> None:
    leaf = intermediate.mint(**knobs)

    assert _verify(leaf.chain, bundles).id == SpiffeID.parse(WORKLOAD)


def test_root_without_san_or_subject_key_id_verifies() -> None:
    root = TestCA.create("bare.example", uri=None, subject_key_id=False)
    leaf = root.mint(authority_key_id=False)

    verified = _verify(leaf.chain, root.x509_bundle())

    assert verified.chain == (leaf.leaf, root.cert)


def test_leaf_verifies_against_any_root_of_its_bundle(ca: TestCA) -> None:
    new_root = TestCA.create("example.org")
    both = X509Bundle(trust_domain=ca.trust_domain, authorities=(ca.cert, new_root.cert))

    assert _verify(ca.mint().chain, both).chain[-1] == ca.cert
    assert _verify(new_root.mint().chain, both).chain[-1] == new_root.cert


@pytest.mark.parametrize("at", [NOW - HOUR, NOW + HOUR], ids=["at-not-before", "at-not-after"])
def test_leaf_is_valid_at_both_ends_of_its_validity(ca: TestCA, bundles: BundleSet, at: datetime) -> None:
    leaf = ca.mint(not_before=NOW - HOUR, not_after=NOW + HOUR)

    assert _verify(leaf.chain, bundles, at=at).id == SpiffeID.parse(WORKLOAD)


# --- verification is per trust domain -------------------------------------------------------------


def test_leaf_claiming_another_trust_domain_fails_even_when_its_signer_is_trusted(
    ca: TestCA, other_ca: TestCA, bundles: BundleSet
) -> None:
    # other.org's CA mints an SVID for example.org. other.org's root is in the set, but only
    # example.org's roots may vouch for an example.org ID.
    forged = other_ca.mint(uris=["spiffe://example.org/admin"])

    err = _refused(forged.chain, bundles)

    _assert_not_verified(err, "spiffe://example.org/admin", NO_PATH)


def test_forged_leaf_fails_even_when_the_peer_sends_its_signers_root(other_ca: TestCA, bundles: BundleSet) -> None:
    forged = other_ca.mint(uris=["spiffe://example.org/admin"])

    err = _refused((*forged.chain, other_ca.cert), bundles)

    _assert_not_verified(err, "spiffe://example.org/admin", NO_PATH)


def test_forged_leaf_below_another_domains_intermediate_fails(other_ca: TestCA, bundles: BundleSet) -> None:
    forged = other_ca.intermediate().mint(uris=["spiffe://example.org/admin"])

    err = _refused(forged.chain, bundles)

    _assert_not_verified(err, "spiffe://example.org/admin", NO_PATH)


def test_each_domains_own_leaf_verifies_against_the_same_set(ca: TestCA, other_ca: TestCA, bundles: BundleSet) -> None:
    assert _verify(other_ca.mint().chain, bundles).chain[-1] == other_ca.cert
    assert _verify(ca.mint().chain, bundles).chain[-1] == ca.cert


def test_leaf_of_a_trust_domain_without_bundle_names_the_trust_domain(ca: TestCA) -> None:
    stranger = TestCA.create("stranger.org").mint()

    err = _refused(stranger.chain, BundleSet.of(ca.bundle()))

    assert str(err) == 'x509svid: could not get X.509 bundle (no X.509 bundle for trust domain): "stranger.org"'


@pytest.mark.parametrize(
    "source",
    [
        pytest.param(lambda td: X509Bundle(trust_domain=td), id="empty-x509-bundle"),
        pytest.param(lambda td: BundleSet.of(SpiffeBundle.create(td)), id="bundle-set-with-empty-bundle"),
        pytest.param(
            lambda td: BundleSet.of(
                SpiffeBundle.create(td, jwt_authorities={"k": ec.generate_private_key(ec.SECP256R1()).public_key()})
            ),
            id="bundle-with-jwt-keys-only",
        ),
    ],
)
def test_leaf_of_a_trust_domain_with_no_x509_authorities_fails(
    ca: TestCA, source: Callable[[TrustDomain], X509BundleSource]
) -> None:
    err = _refused(ca.mint().chain, source(ca.trust_domain))

    assert str(err) == 'x509svid: could not get X.509 bundle (bundle has no X.509 authorities): "example.org"'


def test_single_x509_bundle_verifies_its_own_trust_domain_only(ca: TestCA, other_ca: TestCA) -> None:
    bundle = ca.x509_bundle()
    leaf = ca.mint()

    verified = _verify(leaf.chain, bundle)
    err = _refused(other_ca.mint().chain, bundle)

    assert verified.chain == (leaf.leaf, ca.cert)
    assert str(err) == 'x509svid: could not get X.509 bundle (no X.509 bundle for trust domain): "other.org"'


def test_spiffe_bundle_is_a_bundle_source_for_its_own_trust_domain(ca: TestCA, other_ca: TestCA) -> None:
    bundle = ca.bundle()

    assert _verify(ca.mint().chain, bundle).id == SpiffeID.parse(WORKLOAD)
    err = _refused(other_ca.mint().chain, bundle)
    assert str(err) == 'x509svid: could not get X.509 bundle (no X.509 bundle for trust domain): "other.org"'


# --- chains that do not verify --------------------------------------------------------------------


def test_leaf_of_an_untrusted_root_of_the_same_trust_domain_fails(bundles: BundleSet) -> None:
    impostor = TestCA.create("example.org").mint()

    err = _refused(impostor.chain, bundles)

    _assert_not_verified(err, WORKLOAD, NO_PATH)


def test_leaf_signed_by_a_key_other_than_its_issuers_fails(ca: TestCA, bundles: BundleSet) -> None:
    leaf = ca.mint(signer=new_key())

    err = _refused(leaf.chain, bundles)

    _assert_not_verified(err, WORKLOAD, BAD_SIGNATURE)


def test_leaf_signed_by_a_key_other_than_its_intermediates_fails(intermediate: TestCA, bundles: BundleSet) -> None:
    leaf = intermediate.mint(signer=intermediate.root.key)

    err = _refused(leaf.chain, bundles)

    _assert_not_verified(err, WORKLOAD, BAD_SIGNATURE)


def test_chain_missing_its_intermediate_fails(intermediate: TestCA, bundles: BundleSet) -> None:
    leaf = intermediate.mint()

    err = _refused(leaf.chain[:1], bundles)

    _assert_not_verified(err, WORKLOAD, NO_PATH)


@pytest.mark.parametrize(
    ("at", "validity"),
    [
        pytest.param(NOW + 2 * HOUR, (NOW - HOUR, NOW + HOUR), id="expired"),
        pytest.param(NOW, (NOW - 2 * HOUR, NOW - HOUR), id="expired-an-hour-ago"),
        pytest.param(NOW, (NOW + HOUR, NOW + 2 * HOUR), id="not-yet-valid"),
        pytest.param(NOW + HOUR + timedelta(seconds=1), (NOW - HOUR, NOW + HOUR), id="one-second-after-not-after"),
        pytest.param(NOW - HOUR - timedelta(seconds=1), (NOW - HOUR, NOW + HOUR), id="one-second-before-not-before"),
    ],
)
def test_leaf_outside_its_validity_fails(
    ca: TestCA, bundles: BundleSet, at: datetime, validity: tuple[datetime, datetime]
) -> None:
    not_before, not_after = validity
    leaf = ca.mint(not_before=not_before, not_after=not_after)

    err = _refused(leaf.chain, bundles, at=at)

    _assert_not_verified(err, WORKLOAD, EXPIRED)


@pytest.mark.parametrize(
    "validity",
    [
        pytest.param((NOW - 3 * HOUR, NOW - HOUR), id="expired-intermediate"),
        pytest.param((NOW + HOUR, NOW + 3 * HOUR), id="not-yet-valid-intermediate"),
    ],
)
def test_intermediate_outside_its_validity_fails(
    ca: TestCA, bundles: BundleSet, validity: tuple[datetime, datetime]
) -> None:
    not_before, not_after = validity
    leaf = ca.intermediate(not_before=not_before, not_after=not_after).mint()

    err = _refused(leaf.chain, bundles)

    _assert_not_verified(err, WORKLOAD, EXPIRED)


def test_expired_root_fails() -> None:
    root = TestCA.create("old.example", not_before=NOW - 3 * HOUR, not_after=NOW - 2 * HOUR)
    leaf = root.mint()

    err = _refused(leaf.chain, root.x509_bundle())

    _assert_not_verified(err, "spiffe://old.example/workload", EXPIRED)


def test_the_time_given_decides_not_the_clock(ca: TestCA, bundles: BundleSet) -> None:
    leaf = ca.mint(not_before=NOW + 10 * HOUR, not_after=NOW + 11 * HOUR)

    assert _verify(leaf.chain, bundles, at=NOW + 10 * HOUR + timedelta(minutes=30)).id == SpiffeID.parse(WORKLOAD)
    _assert_not_verified(_refused(leaf.chain, bundles, at=NOW), WORKLOAD, EXPIRED)


def test_intermediate_without_key_cert_sign_fails(ca: TestCA, bundles: BundleSet) -> None:
    leaf = ca.intermediate(usage=key_usage(digital_signature=True, crl_sign=True)).mint()

    err = _refused(leaf.chain, bundles)

    _assert_not_verified(err, WORKLOAD, NO_KEY_CERT_SIGN)


def _signer_from_leaf(parent: TestCA, minted: Minted) -> TestCA:
    """A 'CA' whose certificate is ``minted``'s leaf: it can sign, but the chain must not accept it."""
    return TestCA(trust_domain=parent.trust_domain, key=minted.key, cert=minted.leaf, parent=parent)


def test_intermediate_that_is_not_a_ca_fails(ca: TestCA, bundles: BundleSet) -> None:
    not_a_ca = ca.mint(
        "/signer", subject="not a ca", is_ca=False, usage=key_usage(digital_signature=True, key_cert_sign=True)
    )
    leaf = _signer_from_leaf(ca, not_a_ca).mint()

    err = _refused(leaf.chain, bundles)

    _assert_not_verified(err, WORKLOAD, NOT_A_CA)


def test_intermediate_that_is_an_ordinary_svid_fails(ca: TestCA, bundles: BundleSet) -> None:
    workload = ca.mint("/signer", subject="a workload")  # a valid SVID of the trust domain
    leaf = _signer_from_leaf(ca, workload).mint()

    err = _refused(leaf.chain, bundles)

    _assert_not_verified(err, WORKLOAD, NOT_A_CA)


def _intermediate_with(ca: TestCA, *extensions: x509.ExtensionType) -> TestCA:
    """An intermediate of ``ca`` carrying ``extensions`` (non-critical) besides the CA basics."""
    key = new_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "constrained intermediate")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - HOUR)
        .not_valid_after(NOW + HOUR)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return TestCA(trust_domain=ca.trust_domain, key=key, cert=builder.sign(ca.key, hashes.SHA256()), parent=ca)


@pytest.mark.parametrize(
    "constraints",
    [
        pytest.param(
            x509.NameConstraints(
                permitted_subtrees=[x509.UniformResourceIdentifier("example.org")], excluded_subtrees=None
            ),
            id="permitted-uri",
        ),
        pytest.param(
            x509.NameConstraints(
                permitted_subtrees=None, excluded_subtrees=[x509.UniformResourceIdentifier("evil.org")]
            ),
            id="excluded-uri",
        ),
    ],
)
def test_ca_with_uri_name_constraints_is_refused(
    ca: TestCA, bundles: BundleSet, constraints: x509.NameConstraints
) -> None:
    """cryptography does not evaluate URI name constraints and fails closed; so do we, even when they would allow."""
    leaf = _intermediate_with(ca, constraints).mint()

    err = _refused(leaf.chain, bundles)

    _assert_not_verified(err, WORKLOAD, "unsupported name constraint")


def test_ca_with_dns_name_constraints_verifies_a_uri_only_leaf(ca: TestCA, bundles: BundleSet) -> None:
    constraints = x509.NameConstraints(permitted_subtrees=[x509.DNSName("example.org")], excluded_subtrees=None)
    leaf = _intermediate_with(ca, constraints).mint()

    assert _verify(leaf.chain, bundles).id == SpiffeID.parse(WORKLOAD)


@pytest.mark.parametrize(
    ("usages", "verifies"),
    [
        pytest.param([ExtendedKeyUsageOID.SERVER_AUTH], False, id="server-auth-only"),
        pytest.param([ExtendedKeyUsageOID.CODE_SIGNING], False, id="code-signing-only"),
        pytest.param([ExtendedKeyUsageOID.CLIENT_AUTH], True, id="client-auth-only"),
        pytest.param([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], True, id="both"),
    ],
)
def test_intermediate_whose_extended_key_usage_lacks_client_auth_is_refused(
    ca: TestCA, bundles: BundleSet, usages: list[x509.ObjectIdentifier], verifies: bool
) -> None:
    """Paths are checked with a client-verifier policy: an intermediate's EKU, if present, must allow clientAuth."""
    leaf = _intermediate_with(ca, x509.ExtendedKeyUsage(usages)).mint()

    if verifies:
        assert _verify(leaf.chain, bundles).id == SpiffeID.parse(WORKLOAD)
    else:
        _assert_not_verified(_refused(leaf.chain, bundles), WORKLOAD, "Neither EKU nor anyEKU could be found")


def test_ca_whose_key_type_the_verifier_forbids_fails_cleanly() -> None:
    # cryptography's web PKI profile permits RSA and ECDSA signatures only; SPIRE's CAs use those too.
    root = TestCA.create("ed.example", key_type="ed25519")

    err = _refused(root.mint().chain, root.x509_bundle())

    _assert_not_verified(err, "spiffe://ed.example/workload", "public key algorithm")


def _tampered(cert: x509.Certificate, old: bytes, new: bytes) -> x509.Certificate:
    der = cert.public_bytes(Encoding.DER)
    assert der.count(old) == 1
    return x509.load_der_x509_certificate(der.replace(old, new))


def _point(holder: TestCA | Minted) -> bytes:
    return holder.key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


KEY_USAGE_OID, EKU_OID, SKI_OID = (bytes.fromhex(h) for h in ("0603551d0f", "0603551d25", "0603551d0e"))


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        pytest.param(
            lambda leaf, issuer: (_tampered(leaf.leaf, _point(leaf), b"\x04" + bytes(64)), issuer.cert),
            BAD_SIGNATURE,
            id="leaf-key-not-on-curve",
        ),
        pytest.param(
            lambda leaf, issuer: (leaf.leaf, _tampered(issuer.cert, _point(issuer), b"\x04" + bytes(64))),
            "malformed public key",
            id="intermediate-key-not-on-curve",
        ),
        pytest.param(
            lambda leaf, issuer: (leaf.leaf, _tampered(issuer.cert, SKI_OID, KEY_USAGE_OID)),
            "duplicate extension",
            id="intermediate-duplicate-extension",
        ),
    ],
)
def test_tampered_certificates_fail_with_verification_error(
    intermediate: TestCA, bundles: BundleSet, tamper: Any, reason: str
) -> None:
    chain = tamper(intermediate.mint(), intermediate)

    err = _refused(chain, bundles)

    _assert_not_verified(err, WORKLOAD, reason)


def test_leaf_with_malformed_extensions_fails_naming_the_certificate(intermediate: TestCA, bundles: BundleSet) -> None:
    leaf = _tampered(intermediate.mint().leaf, EKU_OID, KEY_USAGE_OID)  # two key usage extensions

    err = _refused((leaf, intermediate.cert), bundles)

    assert str(err).startswith("x509svid: certificate extensions are malformed (")
    assert str(err).endswith(f"): \"subject='' serial={leaf.serial_number:x}\"")


# --- leaf rules are checked before the path, and reported as VerificationError ----------------------

LEAF_RULES: list[Any] = [
    pytest.param({"is_ca": True}, "leaf certificate must not have CA flag set to true", id="ca-flag-true"),
    pytest.param({"usage": None}, "leaf certificate must have a key usage extension", id="no-key-usage"),
    pytest.param(
        {"usage": key_usage(key_encipherment=True)},
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
]


@pytest.mark.parametrize(("knobs", "rule"), LEAF_RULES)
def test_leaf_rule_violation_fails_with_the_rule(
    intermediate: TestCA, bundles: BundleSet, knobs: dict[str, Any], rule: str
) -> None:
    leaf = intermediate.mint(**knobs)  # otherwise a chain that cryptography's verifier would accept

    err = _refused(leaf.chain, bundles)

    assert str(err) == f'x509svid: {rule}: "{WORKLOAD}"'
    assert err.rule == rule
    assert isinstance(err.__cause__, X509SVIDError)


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        pytest.param(
            {"path": ""}, 'x509svid: leaf certificate SPIFFE ID must have a path: "spiffe://example.org"', id="no-path"
        ),
        pytest.param(
            {"uris": ["spiffe://example.org/a", "spiffe://example.org/b"]},
            'x509svid: certificate contains more than one URI SAN: "spiffe://example.org/a, spiffe://example.org/b"',
            id="two-uri-sans",
        ),
        pytest.param(
            {"uris": ["https://example.org/workload"]},
            "x509svid: certificate URI SAN is not a valid SPIFFE ID (scheme is missing or invalid): "
            '"https://example.org/workload"',
            id="non-spiffe-uri",
        ),
        pytest.param(
            {"uris": ["spiffe://EXAMPLE.org/workload"]},
            "x509svid: certificate URI SAN is not a valid SPIFFE ID (trust domain characters are limited to "
            'lowercase letters, numbers, dots, dashes, and underscores): "spiffe://EXAMPLE.org/workload"',
            id="upper-case-trust-domain",
        ),
    ],
)
def test_leaf_without_one_valid_spiffe_id_fails_with_the_reason(
    ca: TestCA, bundles: BundleSet, knobs: dict[str, Any], message: str
) -> None:
    leaf = ca.mint(**knobs)

    err = _refused(leaf.chain, bundles)

    assert str(err) == message


@pytest.mark.parametrize("dns_names", [[], ["web.example"]], ids=["no-san", "dns-names-only"])
def test_leaf_without_uri_san_fails_naming_the_certificate(
    ca: TestCA, bundles: BundleSet, dns_names: list[str]
) -> None:
    leaf = ca.mint(uris=[], dns_names=dns_names, subject="web").leaf

    err = _refused([leaf], bundles)

    assert str(err) == (
        f"x509svid: certificate contains no URI SAN: \"subject='CN=web' serial={leaf.serial_number:x}\""
    )


def test_chain_sent_intermediate_first_fails_on_the_first_certificate(intermediate: TestCA, bundles: BundleSet) -> None:
    leaf = intermediate.mint()

    err = _refused((intermediate.cert, leaf.leaf), bundles)

    assert str(err) == 'x509svid: leaf certificate SPIFFE ID must have a path: "spiffe://example.org"'


@pytest.mark.parametrize("chain", [[], ()], ids=["list", "tuple"])
def test_empty_chain_fails(bundles: BundleSet, chain: Sequence[x509.Certificate]) -> None:
    err = _refused(chain, bundles)

    assert str(err) == "x509svid: peer certificate chain is empty"


# --- VerificationCache ------------------------------------------------------------------------


@pytest.mark.parametrize("cached", [False, True])
def test_a_naive_time_is_refused_with_or_without_cache(ca: TestCA, bundles: BundleSet, cached: bool) -> None:
    chain = ca.mint().chain
    cache = VerificationCache() if cached else None
    verify_x509_svid(chain, bundles, at=NOW, cache=cache)  # a cache would now hold it
    for at in (NOW.replace(tzinfo=None), datetime(2030, 1, 1)):  # naive on purpose
        with pytest.raises(ValueError, match=r"^at must be a timezone-aware datetime$") as caught:
            verify_x509_svid(chain, bundles, at=at, cache=cache)
        assert not isinstance(caught.value, VerificationError)


def test_a_time_in_another_zone_is_the_same_instant(ca: TestCA, bundles: BundleSet) -> None:
    chain = ca.mint(not_after=NOW + timedelta(minutes=30)).chain
    east = timezone(timedelta(hours=5))
    assert _verify(chain, bundles, at=(NOW + timedelta(minutes=29)).astimezone(east)).id == SpiffeID.parse(WORKLOAD)
    _refused(chain, bundles, at=(NOW + timedelta(minutes=31)).astimezone(east))


def test_cache_returns_the_remembered_result_for_the_same_chain() -> None:
    ca = TestCA.create("cache.example")
    bundles = BundleSet.of(ca.bundle())
    cache = VerificationCache()
    chain = ca.intermediate().mint("/web").chain
    first = verify_x509_svid(chain, bundles, at=NOW, cache=cache)
    again = verify_x509_svid(chain, bundles, at=NOW + timedelta(minutes=5), cache=cache)
    assert again is first
    assert (cache.hits, cache.misses, len(cache)) == (1, 1, 1)


def test_cache_is_keyed_by_the_chain_bytes_not_the_objects() -> None:
    ca = TestCA.create("cache.example")
    bundles = BundleSet.of(ca.bundle())
    cache = VerificationCache()
    chain = ca.mint("/web").chain
    reparsed = tuple(x509.load_der_x509_certificate(cert.public_bytes(Encoding.DER)) for cert in chain)
    verify_x509_svid(chain, bundles, at=NOW, cache=cache)
    verify_x509_svid(reparsed, bundles, at=NOW, cache=cache)
    assert cache.hits == 1


def test_cache_never_extends_a_certificates_validity() -> None:
    ca = TestCA.create("cache.example")
    bundles = BundleSet.of(ca.bundle())
    cache = VerificationCache()
    chain = ca.mint("/web", not_after=NOW + timedelta(minutes=10)).chain
    verify_x509_svid(chain, bundles, at=NOW, cache=cache)
    with pytest.raises(VerificationError, match="could not verify leaf certificate"):
        verify_x509_svid(chain, bundles, at=NOW + timedelta(minutes=11), cache=cache)
    with pytest.raises(VerificationError, match="could not verify leaf certificate"):
        verify_x509_svid(chain, bundles, at=NOW - timedelta(hours=2), cache=cache)
    assert cache.hits == 0


def test_cache_misses_when_the_bundle_changes() -> None:
    ca = TestCA.create("cache.example")
    cache = VerificationCache()
    chain = ca.mint("/web").chain
    verify_x509_svid(chain, BundleSet.of(ca.bundle()), at=NOW, cache=cache)
    rotated_away = BundleSet.of(TestCA.create("cache.example").bundle())
    with pytest.raises(VerificationError, match="could not verify leaf certificate"):
        verify_x509_svid(chain, rotated_away, at=NOW, cache=cache)
    gone = BundleSet.of(TestCA.create("elsewhere.example").bundle())
    with pytest.raises(VerificationError, match=r"could not get X\.509 bundle"):
        verify_x509_svid(chain, gone, at=NOW, cache=cache)
    assert cache.hits == 0


def test_cache_matches_bundles_by_identity_so_a_source_of_new_objects_never_hits() -> None:
    ca = TestCA.create("cache.example")
    bundle = ca.x509_bundle()

    class FreshCopies:
        """A bundle source that builds an equal but new bundle on every call."""

        def x509_bundle_for(self, trust_domain: TrustDomain) -> X509Bundle:
            return X509Bundle(trust_domain=trust_domain, authorities=bundle.authorities)

    cache = VerificationCache()
    chain = ca.mint("/web").chain
    for _ in range(3):
        assert verify_x509_svid(chain, FreshCopies(), at=NOW, cache=cache).id.path == "/web"
    assert (cache.hits, cache.misses) == (0, 3)
    for _ in range(2):
        verify_x509_svid(chain, bundle, at=NOW, cache=cache)
    assert (cache.hits, cache.misses) == (1, 4)


def test_cache_remembers_no_failures_and_keeps_at_most_max_entries() -> None:
    ca = TestCA.create("cache.example")
    bundles = BundleSet.of(ca.bundle())
    cache = VerificationCache(max_entries=2)
    with pytest.raises(VerificationError):
        verify_x509_svid(ca.mint("/ca", is_ca=True).chain, bundles, at=NOW, cache=cache)
    assert len(cache) == 0
    chains = [ca.mint(f"/w{i}").chain for i in range(3)]
    for chain in chains:
        verify_x509_svid(chain, bundles, at=NOW, cache=cache)
    assert len(cache) == 2
    verify_x509_svid(chains[0], bundles, at=NOW, cache=cache)
    assert cache.hits == 0, "the oldest entry was evicted"
    verify_x509_svid(chains[2], bundles, at=NOW, cache=cache)
    assert cache.hits == 1
    with pytest.raises(ValueError, match="max_entries must be at least 1, not 0"):
        VerificationCache(max_entries=0)


def test_cache_is_safe_to_share_between_threads() -> None:
    ca = TestCA.create("cache.example")
    bundles = BundleSet.of(ca.bundle())
    cache = VerificationCache(max_entries=8)
    chains = [ca.mint(f"/w{i}").chain for i in range(16)]
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(20):
                for chain in chains:
                    assert verify_x509_svid(chain, bundles, at=NOW, cache=cache).id.path == chain_path(chain)
        except BaseException as err:  # noqa: BLE001 - collected and reported by the test
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(cache) <= 8
    assert cache.hits + cache.misses == 4 * 20 * 16


def chain_path(chain: tuple[x509.Certificate, ...]) -> str:
    uri = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return "/" + str(uri.get_values_for_type(x509.UniformResourceIdentifier)[0]).split("/", 3)[3]
