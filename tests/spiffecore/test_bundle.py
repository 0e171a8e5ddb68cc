"""Tests for spiffecore.bundle: X.509 and JWT bundles, SPIFFE bundles and bundle maps."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import Store
from hypothesis import given, settings
from hypothesis import strategies as st

from spiffecore.bundle import (
    BundleSet,
    JWTBundle,
    JWTBundleSource,
    JWTPublicKey,
    SpiffeBundle,
    X509Bundle,
    X509BundleSource,
)
from spiffecore.errors import BundleError, BundleNotFoundError, SpiffeError
from spiffecore.spiffeid import TrustDomain
from tests.support.ca import HOUR, NOW, TestCA

TD = TrustDomain.parse("example.org")
OTHER = TrustDomain.parse("other.org")
THIRD = TrustDomain.parse("third.org")


@dataclass(frozen=True)
class Pool:
    """Authorities minted once per module: roots of several key types and JWT keys."""

    roots: tuple[x509.Certificate, ...]  # EC P-256, EC P-384, RSA 2048, Ed25519
    jwt_keys: dict[str, JWTPublicKey]  # EC P-256, EC P-384, EC P-521, RSA 2048
    ca: TestCA
    other_ca: TestCA


@pytest.fixture(scope="module")
def pool() -> Pool:
    ca = TestCA.create("example.org")
    roots = (
        ca.cert,
        TestCA.create("example.org", key_type="ec-p384").cert,
        TestCA.create("example.org", key_type="rsa-2048").cert,
        TestCA.create("example.org", key_type="ed25519").cert,
    )
    jwt_keys: dict[str, JWTPublicKey] = {
        "ec256": ec.generate_private_key(ec.SECP256R1()).public_key(),
        "ec384": ec.generate_private_key(ec.SECP384R1()).public_key(),
        "ec521": ec.generate_private_key(ec.SECP521R1()).public_key(),
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key(),
    }
    return Pool(roots=roots, jwt_keys=jwt_keys, ca=ca, other_ca=TestCA.create("other.org"))


@pytest.fixture(scope="module")
def full(pool: Pool) -> SpiffeBundle:
    """A bundle with every kind of authority, a sequence number and a refresh hint."""
    return SpiffeBundle.create(
        TD, x509_authorities=pool.roots, jwt_authorities=pool.jwt_keys, sequence=42, refresh_hint=2419200
    )


def jwk(key: object, **members: Any) -> dict[str, Any]:
    """A key as JWK members plus ``members`` (a member set to ``None`` is removed)."""
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        entry: dict[str, Any] = jwt.algorithms.ECAlgorithm.to_jwk(key, as_dict=True)
    elif isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        entry = jwt.algorithms.RSAAlgorithm.to_jwk(key, as_dict=True)
    else:
        assert isinstance(key, ed25519.Ed25519PublicKey)
        entry = jwt.algorithms.OKPAlgorithm.to_jwk(key, as_dict=True)
    entry.update(members)
    return {name: value for name, value in entry.items() if value is not None}


def b64(cert: x509.Certificate) -> str:
    return base64.b64encode(cert.public_bytes(Encoding.DER)).decode()


def x509_entry(cert: x509.Certificate, **members: Any) -> dict[str, Any]:
    return jwk(cert.public_key(), **({"use": "x509-svid", "x5c": [b64(cert)]} | members))


def document(*keys: Any, **members: Any) -> bytes:
    return json.dumps({"keys": list(keys), **members}).encode()


def bundle_error(parse: Callable[[], object]) -> BundleError:
    with pytest.raises(BundleError) as caught:
        parse()
    return caught.value


# --- X509Bundle --------------------------------------------------------------------------------


def test_x509_bundle_pem_round_trip(pool: Pool) -> None:
    bundle = X509Bundle(trust_domain=TD, authorities=pool.roots)
    pem = bundle.pem()
    assert pem.count(b"-----BEGIN CERTIFICATE-----") == len(pool.roots)
    assert X509Bundle.load_pem(TD, pem) == bundle


def test_x509_bundle_der_round_trip(pool: Pool) -> None:
    bundle = X509Bundle(trust_domain=TD, authorities=pool.roots)
    der = bundle.der()
    assert der == b"".join(cert.public_bytes(Encoding.DER) for cert in pool.roots)
    assert X509Bundle.load_der(TD, der) == bundle


def test_x509_bundle_load_pem_skips_text_around_certificates(pool: Pool) -> None:
    pem = b"# roots of example.org\n" + pool.roots[0].public_bytes(Encoding.PEM) + b"\ntrailing words\n"
    assert X509Bundle.load_pem(TD, pem).authorities == (pool.roots[0],)


def test_x509_bundle_load_der_of_nothing_is_an_empty_bundle() -> None:
    bundle = X509Bundle.load_der(TD, b"")
    assert bundle == X509Bundle(trust_domain=TD)
    assert bundle.authorities == ()
    assert bundle.der() == b""
    assert bundle.pem() == b""


def test_x509_bundle_store_of_an_empty_bundle_is_an_error() -> None:
    error = bundle_error(X509Bundle(trust_domain=TD).store)
    assert str(error) == 'bundle: bundle has no X.509 authorities: "example.org"'


def test_x509_bundle_store_holds_the_authorities(pool: Pool) -> None:
    bundle = X509Bundle(trust_domain=TD, authorities=pool.roots[:2])
    assert isinstance(bundle.store(), Store)
    assert bundle.store() is bundle.store()


def test_x509_bundle_equality_ignores_the_store(pool: Pool) -> None:
    first = X509Bundle(trust_domain=TD, authorities=pool.roots[:1])
    assert first == X509Bundle.load_pem(TD, first.pem())
    assert first != X509Bundle(trust_domain=OTHER, authorities=pool.roots[:1])
    assert first != X509Bundle(trust_domain=TD, authorities=pool.roots[1:2])


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"garbage", id="no-pem"),
        pytest.param(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", id="bad-der-in-pem"),
        pytest.param(b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n", id="bad-base64"),
    ],
)
def test_x509_bundle_load_pem_rejects_bad_input(data: bytes) -> None:
    error = bundle_error(lambda: X509Bundle.load_pem(TD, data))
    cause = error.__cause__
    assert isinstance(cause, ValueError)
    assert str(error) == f'bundle: could not parse X.509 authorities from PEM ({cause}): "example.org"'


def test_x509_bundle_load_pem_rejects_a_truncated_certificate(pool: Pool) -> None:
    pem = pool.roots[0].public_bytes(Encoding.PEM)
    lines = pem.splitlines(keepends=True)
    damaged = b"".join(lines[:2] + lines[-1:])
    error = bundle_error(lambda: X509Bundle.load_pem(TD, damaged))
    assert str(error) == f'bundle: could not parse X.509 authorities from PEM ({error.__cause__}): "example.org"'


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(b"\x04\x00", "der: expected an ASN.1 SEQUENCE (tag 0x30) at byte 0: 0x04", id="wrong-tag"),
        pytest.param(b"\x30", "der: truncated length at byte 1: 0x30", id="truncated"),
        pytest.param(b"\x30\x05ab", "der: element at byte 0 claims 5 bytes but only 2 remain: 0x3005", id="short"),
    ],
)
def test_x509_bundle_load_der_rejects_bad_framing(data: bytes, reason: str) -> None:
    error = bundle_error(lambda: X509Bundle.load_der(TD, data))
    assert str(error) == f'bundle: could not parse X.509 authorities from DER ({reason}): "example.org"'


def test_x509_bundle_load_der_rejects_a_sequence_that_is_not_a_certificate(pool: Pool) -> None:
    good = pool.roots[0].public_bytes(Encoding.DER)
    error = bundle_error(lambda: X509Bundle.load_der(TD, good + b"\x30\x00"))
    assert str(error) == f'bundle: could not parse X.509 authorities from DER ({error.__cause__}): "example.org"'
    assert str(error.__cause__).startswith(f"der: element at byte {len(good)} is not an X.509 certificate (")


def test_x509_bundle_serves_only_its_own_trust_domain(pool: Pool) -> None:
    bundle = X509Bundle(trust_domain=TD, authorities=pool.roots[:1])
    source: X509BundleSource = bundle
    assert source.x509_bundle_for(TD) is bundle
    with pytest.raises(BundleNotFoundError) as caught:
        source.x509_bundle_for(OTHER)
    assert str(caught.value) == 'bundle: no X.509 bundle for trust domain: "other.org"'


P256_OID = bytes.fromhex("06082a8648ce3d030107")


def _unknown_curve(cert: x509.Certificate) -> bytes:
    """``cert``'s DER with its P-256 curve OID changed to an OID that names no curve (1.2.840.10045.3.1.8)."""
    der = cert.public_bytes(Encoding.DER)
    assert der.count(P256_OID) == 1
    return der.replace(P256_OID, bytes.fromhex("06082a8648ce3d030108"))


def _corrupt_point(cert: x509.Certificate) -> bytes:
    """``cert``'s DER with its EC public key replaced by the point (0, 0), which is on no curve."""
    der = cert.public_bytes(Encoding.DER)
    point = cert.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    assert der.count(point) == 1
    return der.replace(point, b"\x04" + bytes(64))


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        pytest.param(_unknown_curve, "Curve 1.2.840.10045.3.1.8 is not supported", id="unknown-curve"),
        pytest.param(_corrupt_point, "Invalid key", id="corrupt-point"),
    ],
)
def test_x509_authority_whose_public_key_is_unreadable_is_refused_when_the_bundle_is_built(
    pool: Pool, tamper: Callable[[x509.Certificate], bytes], reason: str
) -> None:
    der = tamper(pool.ca.cert)
    bad = x509.load_der_x509_certificate(der)  # cryptography reads the key only when asked for it
    pem = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(der) + b"-----END CERTIFICATE-----\n"
    entry = {"kty": "EC", "use": "x509-svid", "x5c": [base64.b64encode(der).decode()]}
    for build in (
        lambda: X509Bundle(trust_domain=TD, authorities=(pool.roots[1], bad)),
        lambda: X509Bundle.load_der(TD, der),
        lambda: X509Bundle.load_pem(TD, pem),
        lambda: SpiffeBundle.create(TD, x509_authorities=[bad]),
        lambda: SpiffeBundle.parse(TD, document(x509_entry(pool.roots[1]), entry)),
        lambda: BundleSet.parse_map(json.dumps({"trust_domains": {"example.org": {"keys": [entry]}}})),
    ):
        error = bundle_error(build)
        assert str(error) == f'bundle: X.509 authority public key is unreadable ({reason}): "example.org"'
        assert isinstance(error.__cause__, ValueError | UnsupportedAlgorithm)


# --- JWTBundle ---------------------------------------------------------------------------------


def test_jwt_bundle_jwks_round_trip(pool: Pool) -> None:
    bundle = JWTBundle(trust_domain=TD, authorities=pool.jwt_keys)
    assert JWTBundle.load_jwks(TD, bundle.jwks()) == bundle
    assert JWTBundle.load_jwks(TD, bundle.jwks().decode()) == bundle


def test_jwt_bundle_jwks_is_a_standard_jwks_without_use(pool: Pool) -> None:
    keys = json.loads(JWTBundle(trust_domain=TD, authorities=pool.jwt_keys).jwks())["keys"]
    assert [key["kid"] for key in keys] == list(pool.jwt_keys)
    assert [key["kty"] for key in keys] == ["EC", "EC", "EC", "RSA"]
    assert all("use" not in key for key in keys)


def test_jwt_bundle_of_no_keys_round_trips() -> None:
    bundle = JWTBundle(trust_domain=TD)
    assert bundle.jwks() == b'{"keys":[]}'
    assert JWTBundle.load_jwks(TD, b'{"keys":[]}') == bundle


def test_jwt_bundle_load_jwks_skips_x509_svid_keys(pool: Pool, full: SpiffeBundle) -> None:
    assert JWTBundle.load_jwks(TD, full.to_json()) == full.jwt
    data = document(x509_entry(pool.roots[0]), jwk(pool.jwt_keys["ec256"], kid="k"))
    assert dict(JWTBundle.load_jwks(TD, data).authorities) == {"k": pool.jwt_keys["ec256"]}


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"use": "jwt-svid"}, id="use-jwt-svid"),
        pytest.param({}, id="no-use"),
        pytest.param({"alg": "ES256"}, id="alg-es256"),
        pytest.param({"alg": "ES512"}, id="alg-es512-any-ec-curve"),
    ],
)
def test_jwt_bundle_load_jwks_takes_keys_with_jwt_svid_use_or_no_use(pool: Pool, extra: dict[str, str]) -> None:
    data = document(jwk(pool.jwt_keys["ec256"], kid="k", **extra))
    assert dict(JWTBundle.load_jwks(TD, data).authorities) == {"k": pool.jwt_keys["ec256"]}


@pytest.mark.parametrize("alg", ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"])
def test_jwt_bundle_load_jwks_takes_rsa_keys_with_an_rsa_algorithm(pool: Pool, alg: str) -> None:
    data = document(jwk(pool.jwt_keys["rsa"], kid="k", alg=alg))
    assert dict(JWTBundle.load_jwks(TD, data).authorities) == {"k": pool.jwt_keys["rsa"]}


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param({"use": "x509-svid"}, id="use-x509-svid"),
        pytest.param({"use": "sig"}, id="use-sig"),
        pytest.param({"use": "JWT-SVID"}, id="use-is-case-sensitive"),
        pytest.param({"use": ["jwt-svid"]}, id="use-not-a-string"),
        pytest.param({"kty": None}, id="no-kty"),
        pytest.param({"kty": "oct"}, id="kty-oct"),
        pytest.param({"kty": "ec"}, id="kty-is-case-sensitive"),
        pytest.param({"kty": ["EC"]}, id="kty-a-list"),
        pytest.param({"kty": {"EC": 1}}, id="kty-an-object"),
        pytest.param({"kty": 1}, id="kty-a-number"),
    ],
)
def test_jwt_bundle_load_jwks_ignores_keys_of_other_uses_and_unknown_types(pool: Pool, entry: dict[str, Any]) -> None:
    ignored = jwk(pool.jwt_keys["ec256"], kid="ignored") | entry
    ignored = {name: value for name, value in ignored.items() if value is not None}
    data = document(ignored, "not an object", 7, None, jwk(pool.jwt_keys["rsa"], kid="kept"))
    assert dict(JWTBundle.load_jwks(TD, data).authorities) == {"kept": pool.jwt_keys["rsa"]}


def _ed25519_jwk(**members: Any) -> dict[str, Any]:
    return jwk(ed25519.Ed25519PrivateKey.generate().public_key(), **members)


_ENTRY = "bundle: jwt-svid entry 1 of example.org"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(lambda p: jwk(p.jwt_keys["ec256"]), f"{_ENTRY}: key ID (kid) must be set", id="missing-kid"),
        pytest.param(lambda p: jwk(p.jwt_keys["ec256"], kid=""), f"{_ENTRY}: key ID (kid) must be set", id="empty-kid"),
        pytest.param(
            lambda p: jwk(p.jwt_keys["ec256"], kid=7), f"{_ENTRY}: key ID (kid) must be set", id="kid-a-number"
        ),
        pytest.param(
            lambda p: jwk(p.jwt_keys["ec384"], kid="k1"), f'{_ENTRY}: duplicate key ID: "k1"', id="duplicate-kid"
        ),
        pytest.param(
            lambda p: jwk(p.jwt_keys["ec256"], kid="k2", alg="none"),
            f'{_ENTRY}: algorithm (alg) must be a JWT-SVID algorithm for key type EC: "none"',
            id="alg-none",
        ),
        pytest.param(
            lambda p: jwk(p.jwt_keys["ec256"], kid="k2", alg="HS256"),
            f'{_ENTRY}: algorithm (alg) must be a JWT-SVID algorithm for key type EC: "HS256"',
            id="alg-hs256",
        ),
        pytest.param(
            lambda p: jwk(p.jwt_keys["ec256"], kid="k2", alg="RS256"),
            f'{_ENTRY}: algorithm (alg) must be a JWT-SVID algorithm for key type EC: "RS256"',
            id="alg-of-another-key-type",
        ),
        pytest.param(
            lambda p: jwk(p.jwt_keys["rsa"], kid="k2", alg="ES256"),
            f'{_ENTRY}: algorithm (alg) must be a JWT-SVID algorithm for key type RSA: "ES256"',
            id="rsa-with-ec-alg",
        ),
        pytest.param(
            lambda p: jwk(p.jwt_keys["ec256"], kid="k2", alg="ES256K"),
            f'{_ENTRY}: algorithm (alg) must be a JWT-SVID algorithm for key type EC: "ES256K"',
            id="alg-es256k",
        ),
        pytest.param(
            lambda p: jwk(p.jwt_keys["ec256"], kid="k2", alg=["ES256"]),
            f"{_ENTRY}: algorithm (alg) must be a JWT-SVID algorithm for key type EC: \"['ES256']\"",
            id="alg-a-list",
        ),
        pytest.param(
            lambda p: jwk(ec.generate_private_key(ec.SECP256R1()), kid="k2"),
            f'{_ENTRY}: key must be a public key: "k2"',
            id="ec-private-key",
        ),
    ],
)
def test_jwt_bundle_load_jwks_rejects_bad_keys_with_exact_message(
    pool: Pool, make: Callable[[Pool], dict[str, Any]], message: str
) -> None:
    data = document(jwk(pool.jwt_keys["ec256"], kid="k1"), make(pool))
    assert str(bundle_error(lambda: JWTBundle.load_jwks(TD, data))) == message


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param({"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA"}, id="short-coordinates"),
        pytest.param({"kty": "EC", "x": "A" * 43, "y": "A" * 43}, id="no-curve"),
        pytest.param({"kty": "EC", "crv": "P-256"}, id="no-coordinates"),
        pytest.param({"kty": "EC", "crv": "P-256", "x": 1, "y": 2}, id="numeric-coordinates"),
        pytest.param({"kty": "EC", "crv": "P-256", "x": "A" * 43, "y": "A" * 43}, id="point-not-on-curve"),
        pytest.param({"kty": "EC", "crv": ["P-256"], "x": "AAAA", "y": "AAAA"}, id="curve-a-list"),
        pytest.param({"kty": "RSA", "e": "AQAB"}, id="rsa-no-modulus"),
        pytest.param({"kty": "RSA", "n": "", "e": "AQAB"}, id="rsa-empty-modulus"),
        pytest.param({"kty": "RSA", "n": "AQAB", "e": "AQAB", "d": "AQAB"}, id="rsa-bad-private"),
        pytest.param({"kty": "RSA", "n": "!!", "e": "AQAB"}, id="rsa-bad-base64"),
    ],
)
def test_jwt_bundle_load_jwks_rejects_bad_key_material(entry: dict[str, Any]) -> None:
    error = bundle_error(lambda: JWTBundle.load_jwks(TD, document(entry | {"kid": "k"})))
    assert str(error) == f'bundle: jwt-svid entry 0 of example.org: could not parse key ({error.__cause__}): "k"'


def test_jwt_bundle_find_returns_the_key_by_id(pool: Pool) -> None:
    bundle = JWTBundle(trust_domain=TD, authorities=pool.jwt_keys)
    for kid, key in pool.jwt_keys.items():
        assert bundle.find(kid) == key


def test_jwt_bundle_find_of_an_unknown_key_id_is_an_error(pool: Pool) -> None:
    bundle = JWTBundle(trust_domain=TD, authorities=pool.jwt_keys)
    with pytest.raises(BundleNotFoundError) as caught:
        bundle.find("nope")
    assert str(caught.value) == 'bundle: no JWT authority with this key ID in trust domain "example.org": "nope"'
    assert isinstance(caught.value, LookupError)


def test_jwt_bundle_serves_only_its_own_trust_domain(pool: Pool) -> None:
    bundle = JWTBundle(trust_domain=TD, authorities=pool.jwt_keys)
    source: JWTBundleSource = bundle
    assert source.jwt_bundle_for(TD) is bundle
    with pytest.raises(BundleNotFoundError) as caught:
        source.jwt_bundle_for(OTHER)
    assert str(caught.value) == 'bundle: no JWT bundle for trust domain: "other.org"'


def test_jwt_bundle_constructor_rejects_an_empty_key_id(pool: Pool) -> None:
    error = bundle_error(lambda: JWTBundle(trust_domain=TD, authorities={"": pool.jwt_keys["ec256"]}))
    assert str(error) == 'bundle: JWT authority key ID must not be empty: "example.org"'


def test_jwt_bundle_constructor_rejects_other_key_types() -> None:
    key: Any = ed25519.Ed25519PrivateKey.generate().public_key()
    error = bundle_error(lambda: JWTBundle(trust_domain=TD, authorities={"k": key}))
    assert str(error) == 'bundle: JWT authority key must be an EC or RSA public key: "k"'


def test_jwt_bundle_authorities_are_a_read_only_copy(pool: Pool) -> None:
    keys = dict(pool.jwt_keys)
    bundle = JWTBundle(trust_domain=TD, authorities=keys)
    keys.clear()
    assert dict(bundle.authorities) == pool.jwt_keys
    with pytest.raises(TypeError):
        bundle.authorities["new"] = pool.jwt_keys["rsa"]  # type: ignore[index]


def _secp256k1_jwk(**members: Any) -> dict[str, Any]:
    return jwk(ec.generate_private_key(ec.SECP256K1()).public_key(), **members)


def _rsa_1024_jwk(**members: Any) -> dict[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - too short on purpose
    return jwk(key.public_key(), **members)


UNUSABLE_JWT_KEYS = [
    pytest.param(_ed25519_jwk, id="okp-ed25519"),
    pytest.param(_secp256k1_jwk, id="ec-secp256k1"),
    pytest.param(lambda: {"kty": "EC", "crv": "secp256k1", "x": "AAAA", "y": "AAAA"}, id="secp256k1-not-parsed"),
    pytest.param(lambda: {"kty": "EC", "crv": "P-192", "x": "AAAA", "y": "AAAA"}, id="ec-p192-not-parsed"),
    pytest.param(lambda: {"kty": "EC", "crv": "P-256K", "x": "A" * 43, "y": "A" * 43}, id="ec-unknown-curve"),
    pytest.param(_rsa_1024_jwk, id="rsa-1024"),
]


@pytest.mark.parametrize("make", UNUSABLE_JWT_KEYS)
def test_jwt_keys_that_no_jwt_svid_algorithm_can_use_are_skipped(
    pool: Pool, make: Callable[[], dict[str, Any]]
) -> None:
    """Such a key cannot verify any JWT-SVID; skipping it keeps the rest of the bundle usable."""
    kept = {"kept": pool.jwt_keys["ec256"]}
    unusable = make() | {"kid": "skipped"}
    usable = jwk(pool.jwt_keys["ec256"], kid="kept")
    assert dict(JWTBundle.load_jwks(TD, document(unusable, usable)).authorities) == kept
    spiffe = SpiffeBundle.parse(TD, document(unusable | {"use": "jwt-svid"}, usable | {"use": "jwt-svid"}))
    assert dict(spiffe.jwt.authorities) == kept


def test_jwt_keys_of_at_least_2048_bits_and_the_three_curves_are_kept(pool: Pool) -> None:
    entries = [jwk(key, kid=kid) for kid, key in pool.jwt_keys.items()]  # P-256, P-384, P-521, RSA 2048
    assert dict(JWTBundle.load_jwks(TD, document(*entries)).authorities) == pool.jwt_keys


@pytest.mark.parametrize("make", UNUSABLE_JWT_KEYS)
def test_skipped_jwt_keys_still_need_a_key_id_that_no_other_entry_has(
    pool: Pool, make: Callable[[], dict[str, Any]]
) -> None:
    first = jwk(pool.jwt_keys["ec256"], kid="k1")
    error = bundle_error(lambda: JWTBundle.load_jwks(TD, document(first, make())))
    assert str(error) == f"{_ENTRY}: key ID (kid) must be set"
    error = bundle_error(lambda: JWTBundle.load_jwks(TD, document(make() | {"kid": "k1"}, first)))
    assert str(error) == 'bundle: jwt-svid entry 1 of example.org: duplicate key ID: "k1"'
    error = bundle_error(lambda: JWTBundle.load_jwks(TD, document(first, make() | {"kid": "k1"})))
    assert str(error) == f'{_ENTRY}: duplicate key ID: "k1"'


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(
            lambda: ec.generate_private_key(ec.SECP256K1()).public_key(),
            'bundle: JWT authority EC key must be on P-256, P-384 or P-521 (not secp256k1): "k"',
            id="ec-secp256k1",
        ),
        pytest.param(
            lambda: ec.generate_private_key(ec.SECP224R1()).public_key(),
            'bundle: JWT authority EC key must be on P-256, P-384 or P-521 (not secp224r1): "k"',
            id="ec-p224",
        ),
        pytest.param(
            lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key(),  # noqa: S505
            'bundle: JWT authority RSA key must have at least 2048 bits (not 1024): "k"',
            id="rsa-1024",
        ),
    ],
)
def test_jwt_bundle_constructor_rejects_keys_no_jwt_svid_algorithm_can_use(
    make: Callable[[], Any], message: str
) -> None:
    """What the parsers skip, the constructor refuses: a bundle we build can use every key it holds."""
    error = bundle_error(lambda: JWTBundle(trust_domain=TD, authorities={"k": make()}))
    assert str(error) == message
    error = bundle_error(lambda: SpiffeBundle.create(TD, jwt_authorities={"k": make()}))
    assert str(error) == message


# --- document shape, shared by every JSON reader -----------------------------------------------

READERS: dict[str, Callable[[bytes], object]] = {
    "spiffe-bundle": lambda data: SpiffeBundle.parse(TD, data),
    "jwks": lambda data: JWTBundle.load_jwks(TD, data),
}


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(b"[]", 'bundle: bundle must be a JSON object: "example.org"', id="array"),
        pytest.param(b'"keys"', 'bundle: bundle must be a JSON object: "example.org"', id="string"),
        pytest.param(b"null", 'bundle: bundle must be a JSON object: "example.org"', id="null"),
        pytest.param(b"{}", 'bundle: bundle must have a "keys" array: "example.org"', id="no-keys"),
        pytest.param(b'{"keys":null}', 'bundle: bundle must have a "keys" array: "example.org"', id="keys-null"),
        pytest.param(b'{"keys":{}}', 'bundle: bundle must have a "keys" array: "example.org"', id="keys-object"),
        pytest.param(b'{"Keys":[]}', 'bundle: bundle must have a "keys" array: "example.org"', id="keys-misspelled"),
        pytest.param(b'{"keys":[],"keys":[]}', 'bundle: duplicate key in JSON object: "keys"', id="dup-top"),
        pytest.param(
            b'{"keys":[{"kty":"EC","kty":"RSA"}]}', 'bundle: duplicate key in JSON object: "kty"', id="dup-in-key"
        ),
        pytest.param(
            b'{"keys":[{"kty":"oct","k":{"a":1,"a":2}}]}',
            'bundle: duplicate key in JSON object: "a"',
            id="dup-deep-in-ignored-key",
        ),
        pytest.param(
            b'{"keys":[],"extension":[{"z":1,"z":1}]}',
            'bundle: duplicate key in JSON object: "z"',
            id="dup-in-unknown-member",
        ),
    ],
)
def test_bundle_readers_reject_bad_documents_with_exact_message(reader: str, data: bytes, message: str) -> None:
    assert str(bundle_error(lambda: READERS[reader](data))) == message


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"{", id="truncated"),
        pytest.param(b'{"keys":[]} x', id="trailing"),
        pytest.param(b"\xff\xfe\xfa", id="not-utf8"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="deeply-nested"),
        pytest.param(b'{"keys":[],"spiffe_sequence":' + b"9" * 5000 + b"}", id="huge-integer"),
    ],
)
def test_bundle_readers_reject_bad_json(reader: str, data: bytes) -> None:
    error = bundle_error(lambda: READERS[reader](data))
    assert str(error) == f'bundle: could not parse JSON ({error.__cause__}): "example.org"'


# --- SpiffeBundle ------------------------------------------------------------------------------


def test_spiffe_bundle_round_trip(full: SpiffeBundle) -> None:
    assert SpiffeBundle.parse(TD, full.to_json()) == full
    assert SpiffeBundle.parse(TD, full.to_json().decode()) == full


def test_spiffe_bundle_document_has_use_x5c_and_kid_as_the_spec_wants(pool: Pool, full: SpiffeBundle) -> None:
    doc = json.loads(full.to_json())
    assert doc["spiffe_sequence"] == 42
    assert doc["spiffe_refresh_hint"] == 2419200
    x509_keys = [key for key in doc["keys"] if key["use"] == "x509-svid"]
    jwt_keys = [key for key in doc["keys"] if key["use"] == "jwt-svid"]
    assert len(x509_keys) + len(jwt_keys) == len(doc["keys"])
    assert [key["x5c"] for key in x509_keys] == [[b64(cert)] for cert in pool.roots]
    assert all("kid" not in key for key in x509_keys)
    assert [key["kty"] for key in x509_keys] == ["EC", "EC", "RSA", "OKP"]
    assert [key["kid"] for key in jwt_keys] == list(pool.jwt_keys)


def test_spiffe_bundle_to_document_can_leave_out_the_refresh_hint(full: SpiffeBundle) -> None:
    doc = full.to_document(include_refresh_hint=False)
    assert "spiffe_refresh_hint" not in doc
    assert doc["spiffe_sequence"] == 42


def test_spiffe_bundle_of_no_keys_round_trips() -> None:
    empty = SpiffeBundle.create(TD)
    assert empty.to_json() == b'{"keys":[]}'
    parsed = SpiffeBundle.parse(TD, b'{"keys":[]}')
    assert parsed == empty
    assert parsed.sequence is None
    assert parsed.refresh_hint is None
    assert parsed.x509.authorities == ()
    assert dict(parsed.jwt.authorities) == {}


def test_spiffe_bundle_parses_the_ca_bundle(pool: Pool) -> None:
    bundle = pool.ca.bundle(sequence=7, refresh_hint=60)
    parsed = SpiffeBundle.parse(TD, bundle.to_json())
    assert parsed == bundle
    assert parsed.trust_domain == TD
    assert parsed.x509.authorities == (pool.ca.cert,)
    assert parsed.jwt.find(pool.ca.jwt_kid) == pool.ca.jwt_key.public_key()
    assert (parsed.sequence, parsed.refresh_hint) == (7, 60)


@pytest.mark.parametrize(
    ("members", "sequence", "refresh_hint"),
    [
        ({}, None, None),
        ({"spiffe_sequence": 0, "spiffe_refresh_hint": 0}, 0, 0),
        ({"spiffe_sequence": 2**64 - 1, "spiffe_refresh_hint": 300}, 2**64 - 1, 300),
        ({"spiffe_sequence": None, "spiffe_refresh_hint": None}, None, None),
    ],
)
def test_spiffe_bundle_parses_sequence_and_refresh_hint(
    members: dict[str, Any], sequence: int | None, refresh_hint: int | None
) -> None:
    parsed = SpiffeBundle.parse(TD, document(**members))
    assert (parsed.sequence, parsed.refresh_hint) == (sequence, refresh_hint)


@pytest.mark.parametrize("name", ["spiffe_sequence", "spiffe_refresh_hint"])
@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (True, '"True"'),
        (False, '"False"'),
        (-1, '"-1"'),
        ("1", '"1"'),
        ("", '""'),
        (1.0, '"1.0"'),
        (1.5, '"1.5"'),
        ([1], '"[1]"'),
        ({"n": 1}, "\"{'n': 1}\""),
    ],
)
def test_spiffe_bundle_rejects_sequence_and_refresh_hint_that_are_not_non_negative_integers(
    name: str, value: object, shown: str
) -> None:
    error = bundle_error(lambda: SpiffeBundle.parse(TD, document(**{name: value})))
    assert str(error) == f"bundle: {name} of example.org must be a non-negative integer: {shown}"


@pytest.mark.parametrize("name", ["sequence", "refresh_hint"])
@pytest.mark.parametrize(("value", "shown"), [(-1, '"-1"'), (True, '"True"'), ("1", '"1"'), (1.0, '"1.0"')])
def test_spiffe_bundle_constructor_rejects_bad_sequence_and_refresh_hint(name: str, value: Any, shown: str) -> None:
    error = bundle_error(lambda: SpiffeBundle.create(TD, **{name: value}))
    assert str(error) == f"bundle: {name} must be a non-negative integer: {shown}"


def test_spiffe_bundle_parts_must_share_a_trust_domain(pool: Pool) -> None:
    error = bundle_error(lambda: SpiffeBundle(x509=X509Bundle(trust_domain=TD), jwt=JWTBundle(trust_domain=OTHER)))
    assert str(error) == 'bundle: X.509 and JWT parts belong to different trust domains (other.org): "example.org"'


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"use": None}, id="no-use"),
        pytest.param({"use": "sig"}, id="use-sig"),
        pytest.param({"use": "wit-svid"}, id="use-wit-svid"),
        pytest.param({"use": "X509-SVID"}, id="use-is-case-sensitive"),
        pytest.param({"use": ["x509-svid"]}, id="use-a-list"),
        pytest.param({"kty": None}, id="no-kty"),
        pytest.param({"kty": "oct"}, id="kty-oct"),
        pytest.param({"kty": "ec"}, id="kty-is-case-sensitive"),
        pytest.param({"kty": ["EC"]}, id="kty-a-list"),
        pytest.param({"kty": {"EC": True}}, id="kty-an-object"),
        pytest.param({"kty": 3}, id="kty-a-number"),
    ],
)
def test_spiffe_bundle_ignores_entries_with_unknown_or_missing_use_or_kty(pool: Pool, change: dict[str, Any]) -> None:
    def altered(entry: dict[str, Any]) -> dict[str, Any]:
        return {name: value for name, value in (entry | change).items() if value is not None}

    data = document(
        altered(x509_entry(pool.roots[1])),
        altered(jwk(pool.jwt_keys["ec384"], use="jwt-svid", kid="ignored")),
        x509_entry(pool.roots[0]),
        jwk(pool.jwt_keys["rsa"], use="jwt-svid", kid="kept"),
    )
    parsed = SpiffeBundle.parse(TD, data)
    assert parsed.x509.authorities == (pool.roots[0],)
    assert dict(parsed.jwt.authorities) == {"kept": pool.jwt_keys["rsa"]}


def test_spiffe_bundle_ignores_entries_that_are_not_objects(pool: Pool) -> None:
    parsed = SpiffeBundle.parse(TD, document(None, 1, "x509-svid", [], x509_entry(pool.roots[0])))
    assert parsed.x509.authorities == (pool.roots[0],)


@pytest.mark.parametrize(
    "x5c",
    [
        pytest.param(None, id="missing"),
        pytest.param([], id="empty-array"),
        pytest.param("", id="empty-string"),
    ],
)
def test_spiffe_bundle_ignores_x509_svid_entries_without_x5c(pool: Pool, x5c: Any) -> None:
    entry = x509_entry(pool.roots[1], x5c=x5c)
    parsed = SpiffeBundle.parse(TD, document(entry, x509_entry(pool.roots[0])))
    assert parsed.x509.authorities == (pool.roots[0],)


def test_spiffe_bundle_uses_only_the_first_x5c_certificate(pool: Pool) -> None:
    entry = x509_entry(pool.roots[0], x5c=[b64(pool.roots[0]), "not even base64!"])
    assert SpiffeBundle.parse(TD, document(entry)).x509.authorities == (pool.roots[0],)


def test_spiffe_bundle_takes_x509_svid_entries_of_okp_keys(pool: Pool) -> None:
    assert SpiffeBundle.parse(TD, document(x509_entry(pool.roots[3]))).x509.authorities == (pool.roots[3],)


@pytest.mark.parametrize(
    ("x5c", "shown"),
    [
        pytest.param("MIIB", '"MIIB"', id="a-string"),
        pytest.param([1], '"[1]"', id="array-of-number"),
        pytest.param([None], '"[None]"', id="array-of-null"),
        pytest.param([["MIIB"]], "\"[['MIIB']]\"", id="nested-array"),
        pytest.param({"0": "MIIB"}, "\"{'0': 'MIIB'}\"", id="an-object"),
        pytest.param(7, '"7"', id="a-number"),
        pytest.param(True, '"True"', id="true"),
    ],
)
def test_spiffe_bundle_rejects_x5c_that_is_not_an_array_of_strings(pool: Pool, x5c: Any, shown: str) -> None:
    data = document(x509_entry(pool.roots[0]), x509_entry(pool.roots[1], x5c=x5c))
    error = bundle_error(lambda: SpiffeBundle.parse(TD, data))
    assert str(error) == f"bundle: x509-svid entry 1 of example.org: x5c must be an array of strings: {shown}"


@pytest.mark.parametrize(
    "first",
    [
        pytest.param("!!!!", id="not-base64"),
        pytest.param("AAA", id="bad-padding"),
        pytest.param("é", id="not-ascii"),
        pytest.param("MIIB AAAA", id="space"),
        pytest.param("", id="empty-string"),
        pytest.param("AAAA", id="not-der"),
        pytest.param(base64.b64encode(b"\x30\x00").decode(), id="empty-sequence"),
    ],
)
def test_spiffe_bundle_rejects_x5c_that_is_not_a_base64_der_certificate(pool: Pool, first: str) -> None:
    data = document(x509_entry(pool.roots[0]), x509_entry(pool.roots[1], x5c=[first]))
    error = bundle_error(lambda: SpiffeBundle.parse(TD, data))
    assert isinstance(error.__cause__, ValueError)
    assert str(error) == (
        f"bundle: x509-svid entry 1 of example.org: could not parse x5c certificate ({error.__cause__}): "
        + json.dumps(first)
    )


def test_spiffe_bundle_rejects_a_truncated_x5c_certificate(pool: Pool) -> None:
    truncated = base64.b64encode(pool.roots[0].public_bytes(Encoding.DER)[:-8]).decode()
    error = bundle_error(lambda: SpiffeBundle.parse(TD, document(x509_entry(pool.roots[0], x5c=[truncated]))))
    assert str(error) == (
        f"bundle: x509-svid entry 0 of example.org: could not parse x5c certificate ({error.__cause__}): "
        + json.dumps(truncated[:200])
        + f"... ({len(truncated)} characters)"
    )


def test_spiffe_bundle_rejects_bad_jwt_svid_entries(pool: Pool) -> None:
    data = document(x509_entry(pool.roots[0]), {"kty": "OKP", "use": "jwt-svid", "kid": "k"})
    assert SpiffeBundle.parse(TD, data).jwt.authorities == {}  # skipped, not rejected: no JWT-SVID algorithm
    data = document(jwk(pool.jwt_keys["ec256"], use="jwt-svid"))
    error = bundle_error(lambda: SpiffeBundle.parse(TD, data))
    assert str(error) == "bundle: jwt-svid entry 0 of example.org: key ID (kid) must be set"
    data = document(
        jwk(pool.jwt_keys["ec256"], use="jwt-svid", kid="k"), jwk(pool.jwt_keys["rsa"], use="jwt-svid", kid="k")
    )
    error = bundle_error(lambda: SpiffeBundle.parse(TD, data))
    assert str(error) == 'bundle: jwt-svid entry 1 of example.org: duplicate key ID: "k"'


def test_spiffe_bundle_serves_only_its_own_trust_domain(full: SpiffeBundle) -> None:
    x509_source: X509BundleSource = full
    jwt_source: JWTBundleSource = full
    assert x509_source.x509_bundle_for(TD) is full.x509
    assert jwt_source.jwt_bundle_for(TD) is full.jwt
    with pytest.raises(BundleNotFoundError) as x509_caught:
        x509_source.x509_bundle_for(OTHER)
    assert str(x509_caught.value) == 'bundle: no X.509 bundle for trust domain: "other.org"'
    with pytest.raises(BundleNotFoundError) as jwt_caught:
        jwt_source.jwt_bundle_for(OTHER)
    assert str(jwt_caught.value) == 'bundle: no JWT bundle for trust domain: "other.org"'


@pytest.mark.parametrize(
    ("name", "largest"),
    [pytest.param("spiffe_sequence", 2**64 - 1, id="sequence-uint64"), ("spiffe_refresh_hint", 2**31 - 1)],
)
def test_spiffe_bundle_sequence_and_refresh_hint_have_upper_bounds(name: str, largest: int) -> None:
    parsed = SpiffeBundle.parse(TD, document(**{name: largest}))
    assert parsed.to_document()[name] == largest
    error = bundle_error(lambda: SpiffeBundle.parse(TD, document(**{name: largest + 1})))
    assert str(error) == f'bundle: {name} of example.org must be at most {largest}: "{largest + 1}"'
    field_name = name.removeprefix("spiffe_")
    fits: dict[str, Any] = {field_name: largest}
    too_big: dict[str, Any] = {field_name: largest + 1}
    assert getattr(SpiffeBundle.create(TD, **fits), field_name) == largest
    error = bundle_error(lambda: SpiffeBundle.create(TD, **too_big))
    assert str(error) == f'bundle: {field_name} must be at most {largest}: "{largest + 1}"'


@pytest.mark.parametrize(
    ("root", "kty", "actual"),
    [
        pytest.param(0, "RSA", "EC", id="rsa-kty-ec-certificate"),
        pytest.param(0, "OKP", "EC", id="okp-kty-ec-certificate"),
        pytest.param(2, "EC", "RSA", id="ec-kty-rsa-certificate"),
        pytest.param(3, "EC", "OKP", id="ec-kty-ed25519-certificate"),
    ],
)
def test_spiffe_bundle_rejects_x509_svid_entries_whose_kty_is_not_the_certificates(
    pool: Pool, root: int, kty: str, actual: str
) -> None:
    data = document(x509_entry(pool.roots[1]), x509_entry(pool.roots[root], kty=kty))
    error = bundle_error(lambda: SpiffeBundle.parse(TD, data))
    assert str(error) == (
        f"bundle: x509-svid entry 1 of example.org: key type (kty) does not match the x5c certificate's key ({actual})"
        f": {json.dumps(kty)}"
    )


def _self_signed(key: Any) -> x509.Certificate:
    """A minimal CA certificate of ``key`` (for key types the test CA does not mint)."""
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "odd key")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - HOUR)
        .not_valid_after(NOW + HOUR)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, None if isinstance(key, ed448.Ed448PrivateKey) else hashes.SHA256())
    )


@pytest.mark.parametrize(
    ("make", "shown"),
    [
        pytest.param(lambda: ec.generate_private_key(ec.SECP224R1()), "EC key on secp224r1", id="ec-p224"),
        pytest.param(
            lambda: ec.generate_private_key(ec.BrainpoolP256R1()), "EC key on brainpoolP256r1", id="brainpool"
        ),
        pytest.param(lambda: dsa.generate_private_key(key_size=1024), "DSAPublicKey", id="dsa"),  # noqa: S505
    ],
)
def test_spiffe_bundle_to_document_of_a_key_without_jwk_form_is_a_bundle_error(
    make: Callable[[], Any], shown: str
) -> None:
    """Such a root can verify (the X.509 bundle holds it) but not be written as a SPIFFE bundle."""
    bundle = SpiffeBundle.create(TD, x509_authorities=[_self_signed(make())])
    message = f'bundle: cannot express this public key as a JWK: "{shown}"'
    for write in (bundle.to_document, bundle.to_json, BundleSet.of(bundle).to_map_json):
        assert str(bundle_error(write)) == message


def test_spiffe_bundle_round_trips_an_ed448_root() -> None:
    bundle = SpiffeBundle.create(TD, x509_authorities=[_self_signed(ed448.Ed448PrivateKey.generate())])
    assert bundle.to_document()["keys"][0]["crv"] == "Ed448"
    assert SpiffeBundle.parse(TD, bundle.to_json()) == bundle


def test_spiffe_bundle_is_never_equal_to_another_type(full: SpiffeBundle) -> None:
    others: list[object] = [full.to_json(), full.to_document(), full.x509, full.jwt]
    assert all(full != other for other in others)
    assert issubclass(BundleError, SpiffeError)


# --- BundleSet ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle_set(pool: Pool) -> BundleSet:
    return BundleSet.of(
        pool.ca.bundle(sequence=3, refresh_hint=None), pool.other_ca.bundle(sequence=None, refresh_hint=None)
    )


def test_bundle_set_of_rejects_two_bundles_of_one_trust_domain(pool: Pool) -> None:
    error = bundle_error(lambda: BundleSet.of(pool.ca.bundle(), pool.other_ca.bundle(), SpiffeBundle.create(TD)))
    assert str(error) == 'bundle: duplicate bundle for trust domain: "example.org"'


def test_bundle_set_rejects_a_bundle_filed_under_another_trust_domain(pool: Pool) -> None:
    error = bundle_error(lambda: BundleSet({OTHER: pool.ca.bundle()}))
    assert str(error) == 'bundle: bundle of example.org filed under another trust domain: "other.org"'


def test_bundle_set_looks_bundles_up_by_trust_domain(pool: Pool, bundle_set: BundleSet) -> None:
    assert len(bundle_set) == 2
    assert set(bundle_set) == {TD, OTHER}
    assert TD in bundle_set
    assert THIRD not in bundle_set
    assert "example.org" not in bundle_set
    assert bundle_set.get(TD) == pool.ca.bundle(sequence=3, refresh_hint=None)
    assert bundle_set.x509_bundle_for(OTHER) == pool.other_ca.x509_bundle()
    assert bundle_set.jwt_bundle_for(TD) == pool.ca.bundle().jwt


@pytest.mark.parametrize(
    ("lookup", "message"),
    [
        (BundleSet.get, 'bundle: no SPIFFE bundle for trust domain: "third.org"'),
        (BundleSet.x509_bundle_for, 'bundle: no X.509 bundle for trust domain: "third.org"'),
        (BundleSet.jwt_bundle_for, 'bundle: no JWT bundle for trust domain: "third.org"'),
    ],
)
def test_bundle_set_lookup_of_an_unknown_trust_domain_is_an_error(
    bundle_set: BundleSet, lookup: Callable[[BundleSet, TrustDomain], object], message: str
) -> None:
    with pytest.raises(BundleNotFoundError) as caught:
        lookup(bundle_set, THIRD)
    assert str(caught.value) == message
    assert isinstance(caught.value, LookupError)
    assert isinstance(caught.value, BundleError)


def test_bundle_set_is_a_bundle_source(bundle_set: BundleSet) -> None:
    x509_source: X509BundleSource = bundle_set
    jwt_source: JWTBundleSource = bundle_set
    assert x509_source.x509_bundle_for(TD).trust_domain == TD
    assert jwt_source.jwt_bundle_for(OTHER).trust_domain == OTHER


def test_bundle_set_with_bundle_adds_or_replaces(pool: Pool, bundle_set: BundleSet) -> None:
    newer = SpiffeBundle.create(TD, x509_authorities=pool.roots[1:3], sequence=4)
    replaced = bundle_set.with_bundle(newer)
    assert replaced.get(TD) == newer
    assert replaced.get(OTHER) == bundle_set.get(OTHER)
    assert len(replaced) == 2
    assert bundle_set.get(TD) != newer  # the original set is unchanged
    third = SpiffeBundle.create(THIRD)
    added = replaced.with_bundle(third)
    assert set(added) == {TD, OTHER, THIRD}
    assert added.get(THIRD) == third
    assert THIRD not in replaced


def test_bundle_set_bundles_are_read_only(pool: Pool) -> None:
    bundles = {TD: pool.ca.bundle()}
    bundle_set = BundleSet(bundles)
    bundles[OTHER] = pool.other_ca.bundle()
    assert OTHER not in bundle_set
    with pytest.raises(TypeError):
        bundle_set.bundles[OTHER] = pool.other_ca.bundle()  # type: ignore[index]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(
            lambda p: {"example.org": p.ca.bundle()}, "bundle set keys must be TrustDomain, not str", id="str-key"
        ),
        pytest.param(
            lambda p: {TD: p.ca.x509_bundle()},
            "bundle set values must be SpiffeBundle, not X509Bundle",
            id="x509-value",
        ),
        pytest.param(lambda p: {TD: None}, "bundle set values must be SpiffeBundle, not NoneType", id="none-value"),
    ],
)
def test_bundle_set_checks_the_types_of_its_keys_and_values(
    pool: Pool, make: Callable[[Pool], dict[Any, Any]], message: str
) -> None:
    with pytest.raises(TypeError) as caught:
        BundleSet(make(pool))
    assert str(caught.value) == message


def test_bundles_hash_consistently_with_equality(pool: Pool, full: SpiffeBundle) -> None:
    """Equal values built apart (here by a round trip through their wire form) hash alike."""
    x509_bundle = X509Bundle(trust_domain=TD, authorities=pool.roots)
    jwt_bundle = JWTBundle(trust_domain=TD, authorities=pool.jwt_keys)
    no_hint = SpiffeBundle.create(TD, x509_authorities=pool.roots, jwt_authorities=pool.jwt_keys, sequence=42)
    bundle_set = BundleSet.of(no_hint, pool.other_ca.bundle(refresh_hint=None))
    pairs: list[tuple[object, object]] = [
        (x509_bundle, X509Bundle.load_der(TD, x509_bundle.der())),
        (jwt_bundle, JWTBundle.load_jwks(TD, jwt_bundle.jwks())),
        (full, SpiffeBundle.parse(TD, full.to_json())),
        (bundle_set, BundleSet.parse_map(bundle_set.to_map_json())),
    ]
    for value, twin in pairs:
        assert value is not twin
        assert value == twin
        assert hash(value) == hash(twin)
        assert len({value, twin}) == 1
    assert len({full, no_hint, bundle_set.get(OTHER)}) == 3
    assert {bundle_set: "set"}[BundleSet.parse_map(bundle_set.to_map_json())] == "set"


def test_bundle_map_round_trip(bundle_set: BundleSet) -> None:
    assert BundleSet.parse_map(bundle_set.to_map_json()) == bundle_set
    assert BundleSet.parse_map(bundle_set.to_map_json().decode()) == bundle_set


def test_bundle_map_is_sorted_and_leaves_out_refresh_hints(pool: Pool) -> None:
    bundle_set = BundleSet.of(pool.other_ca.bundle(sequence=5, refresh_hint=60), pool.ca.bundle(sequence=6))
    document_ = json.loads(bundle_set.to_map_json())
    assert list(document_) == ["trust_domains"]
    assert list(document_["trust_domains"]) == ["example.org", "other.org"]
    assert all("spiffe_refresh_hint" not in bundle for bundle in document_["trust_domains"].values())
    parsed = BundleSet.parse_map(bundle_set.to_map_json())
    assert parsed.get(OTHER).sequence == 5
    assert parsed.get(OTHER).refresh_hint is None
    assert parsed.get(TD) == pool.ca.bundle(sequence=6, refresh_hint=None)


def test_empty_bundle_map_round_trips() -> None:
    assert BundleSet({}).to_map_json() == b'{"trust_domains":{}}'
    assert BundleSet.parse_map(b'{"trust_domains":{}}') == BundleSet({})


def test_bundle_map_accepts_trust_domain_ids_as_keys(pool: Pool) -> None:
    bundle = pool.ca.bundle(refresh_hint=None)
    data = json.dumps({"trust_domains": {"spiffe://example.org": bundle.to_document()}})
    assert BundleSet.parse_map(data) == BundleSet.of(bundle)


def test_bundle_map_keeps_a_refresh_hint_it_is_given(pool: Pool) -> None:
    bundle = pool.ca.bundle(sequence=1, refresh_hint=300)
    data = json.dumps({"trust_domains": {"example.org": bundle.to_document()}})
    assert BundleSet.parse_map(data).get(TD) == bundle


def _map_with_two(first: str, second: str, bundle: dict[str, Any]) -> bytes:
    """A bundle map text with two members, written by hand: json.dumps would merge equal keys."""
    body = json.dumps(bundle)
    return f'{{"trust_domains":{{{json.dumps(first)}:{body},{json.dumps(second)}:{body}}}}}'.encode()


def test_bundle_map_rejects_duplicate_trust_domain(pool: Pool) -> None:
    data = _map_with_two("example.org", "example.org", pool.ca.bundle().to_document())
    error = bundle_error(lambda: BundleSet.parse_map(data))
    assert str(error) == 'bundle: duplicate key in JSON object: "example.org"'


def test_bundle_map_rejects_a_trust_domain_spelled_twice(pool: Pool) -> None:
    data = _map_with_two("example.org", "spiffe://example.org", pool.ca.bundle().to_document())
    error = bundle_error(lambda: BundleSet.parse_map(data))
    assert str(error) == 'bundle: duplicate trust domain in bundle map: "spiffe://example.org"'


def test_bundle_map_rejects_duplicate_keys_inside_a_bundle() -> None:
    data = b'{"trust_domains":{"example.org":{"keys":[],"spiffe_sequence":1,"spiffe_sequence":2}}}'
    error = bundle_error(lambda: BundleSet.parse_map(data))
    assert str(error) == 'bundle: duplicate key in JSON object: "spiffe_sequence"'


def test_bundle_map_rejects_duplicate_top_level_members() -> None:
    data = b'{"trust_domains":{},"trust_domains":{}}'
    error = bundle_error(lambda: BundleSet.parse_map(data))
    assert str(error) == 'bundle: duplicate key in JSON object: "trust_domains"'


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"[]", id="array"),
        pytest.param(b"null", id="null"),
        pytest.param(b"{}", id="no-trust-domains"),
        pytest.param(b'{"trust_domains":[]}', id="trust-domains-array"),
        pytest.param(b'{"trust_domains":null}', id="trust-domains-null"),
        pytest.param(b'{"keys":[]}', id="a-bundle-not-a-map"),
    ],
)
def test_bundle_map_must_be_an_object_with_trust_domains(data: bytes) -> None:
    error = bundle_error(lambda: BundleSet.parse_map(data))
    assert str(error) == 'bundle: bundle map must be an object with a "trust_domains" object'


@pytest.mark.parametrize(
    ("key", "rule"),
    [
        ("", "trust domain is missing"),
        (
            "Example.org",
            "trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores",
        ),
        ("example.org:443", "trust domain must not include a port"),
        ("spiffe://example.org/path", "trust domain ID must not have a path"),
        ("https://example.org", "scheme is missing or invalid"),
    ],
)
def test_bundle_map_rejects_keys_that_are_not_trust_domains(key: str, rule: str) -> None:
    data = json.dumps({"trust_domains": {key: {"keys": []}}})
    error = bundle_error(lambda: BundleSet.parse_map(data))
    assert str(error) == f"bundle: bundle map key is not a trust domain ({rule}): {json.dumps(key)}"


@pytest.mark.parametrize(
    ("bundle", "message"),
    [
        ([], 'bundle: bundle must be a JSON object: "other.org"'),
        ({}, 'bundle: bundle must have a "keys" array: "other.org"'),
        (
            {"keys": [], "spiffe_sequence": -1},
            'bundle: spiffe_sequence of other.org must be a non-negative integer: "-1"',
        ),
    ],
)
def test_bundle_map_rejects_bad_bundles_naming_their_trust_domain(bundle: Any, message: str) -> None:
    data = json.dumps({"trust_domains": {"example.org": {"keys": []}, "other.org": bundle}})
    assert str(bundle_error(lambda: BundleSet.parse_map(data))) == message


def test_bundle_map_rejects_bad_json() -> None:
    error = bundle_error(lambda: BundleSet.parse_map(b"{"))
    assert str(error) == f'bundle: could not parse JSON ({error.__cause__}): "1 bytes"'


# --- properties --------------------------------------------------------------------------------

_json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10)
)
_json_values = st.recursive(
    _json_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=12,
)
_interesting = st.sampled_from(
    [
        "EC",
        "RSA",
        "OKP",
        "oct",
        "x509-svid",
        "jwt-svid",
        "P-256",
        "P-384",
        "P-521",
        "secp256k1",
        "Ed25519",
        "none",
        "HS256",
        "ES256",
        "RS256",
        "PS256",
        "AQAB",
        "",
        "AAAA",
        "!!",
        "MIIB",
        "A" * 43,
        "A" * 64,
    ]
)
_member_names = st.sampled_from(["kty", "use", "kid", "x5c", "crv", "x", "y", "n", "e", "d", "alg"]) | st.text(
    max_size=4
)
_member_values = _interesting | _json_values | st.lists(_interesting, max_size=2)
_entries = st.dictionaries(_member_names, _member_values, max_size=8)
_jwks_documents = st.fixed_dictionaries(
    {"keys": st.lists(_entries | _json_values, max_size=4)},
    optional={"spiffe_sequence": _json_scalars, "spiffe_refresh_hint": _json_scalars},
)
_any_json = _json_values | _jwks_documents
_trust_domain_names = st.from_regex(r"[a-z0-9._-]{1,20}", fullmatch=True)
_text_or_bytes = st.text(max_size=80) | st.binary(max_size=80)


def _only_bundle_errors(parse: Callable[[], object]) -> None:
    """Run ``parse``; anything it raises must be our BundleError (a SpiffeError), never a library's."""
    try:
        parse()
    except BundleError:
        return


@settings(max_examples=300)
@given(data=_text_or_bytes)
def test_readers_on_arbitrary_text_raise_only_bundle_errors(data: str | bytes) -> None:
    _only_bundle_errors(lambda: SpiffeBundle.parse(TD, data))
    _only_bundle_errors(lambda: JWTBundle.load_jwks(TD, data))
    _only_bundle_errors(lambda: BundleSet.parse_map(data))


@settings(max_examples=300)
@given(value=_any_json)
def test_readers_on_arbitrary_json_raise_only_bundle_errors(value: Any) -> None:
    data = json.dumps(value)
    _only_bundle_errors(lambda: SpiffeBundle.parse(TD, data))
    _only_bundle_errors(lambda: JWTBundle.load_jwks(TD, data))
    _only_bundle_errors(lambda: BundleSet.parse_map(data))
    _only_bundle_errors(lambda: BundleSet.parse_map(json.dumps({"trust_domains": {"example.org": value}})))


@settings(max_examples=200)
@given(bundles=st.dictionaries(st.text(max_size=25) | _trust_domain_names, _any_json, max_size=3))
def test_parse_map_on_arbitrary_bundle_maps_raises_only_bundle_errors(bundles: dict[str, Any]) -> None:
    _only_bundle_errors(lambda: BundleSet.parse_map(json.dumps({"trust_domains": bundles})))


@settings(max_examples=300)
@given(data=st.data())
def test_readers_on_damaged_real_bundles_raise_only_bundle_errors(full: SpiffeBundle, data: st.DataObject) -> None:
    doc = full.to_document()
    entry = doc["keys"][data.draw(st.integers(min_value=0, max_value=len(doc["keys"]) - 1))]
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        name = data.draw(st.sampled_from(sorted(entry)) | _member_names)
        if data.draw(st.booleans()):
            entry.pop(name, None)
        else:
            entry[name] = data.draw(_member_values)
    text = json.dumps(doc)
    _only_bundle_errors(lambda: SpiffeBundle.parse(TD, text))
    _only_bundle_errors(lambda: JWTBundle.load_jwks(TD, text))


_sequences = st.none() | st.integers(min_value=0, max_value=2**64 - 1)
_refresh_hints = st.none() | st.integers(min_value=0, max_value=2**31 - 1)


@settings(max_examples=200, deadline=None)
@given(
    roots=st.lists(st.integers(min_value=0, max_value=3), max_size=4),
    kids=st.dictionaries(st.text(min_size=1, max_size=12), st.integers(min_value=0, max_value=3), max_size=4),
    sequence=_sequences,
    refresh_hint=_refresh_hints,
)
def test_spiffe_bundle_parse_inverts_to_json(
    pool: Pool, roots: list[int], kids: dict[str, int], sequence: int | None, refresh_hint: int | None
) -> None:
    keys = list(pool.jwt_keys.values())
    bundle = SpiffeBundle.create(
        TD,
        x509_authorities=[pool.roots[index] for index in roots],
        jwt_authorities={kid: keys[index] for kid, index in kids.items()},
        sequence=sequence,
        refresh_hint=refresh_hint,
    )
    assert SpiffeBundle.parse(TD, bundle.to_json()) == bundle
    assert JWTBundle.load_jwks(TD, bundle.jwt.jwks()) == bundle.jwt
    assert X509Bundle.load_der(TD, bundle.x509.der()) == bundle.x509


@settings(max_examples=100, deadline=None)
@given(
    contents=st.dictionaries(
        _trust_domain_names,
        st.tuples(st.lists(st.integers(min_value=0, max_value=3), max_size=2), _sequences),
        max_size=4,
    )
)
def test_bundle_set_parse_map_inverts_to_map_json(
    pool: Pool, contents: dict[str, tuple[list[int], int | None]]
) -> None:
    keys = list(pool.jwt_keys.values())
    bundle_set = BundleSet.of(
        *(
            SpiffeBundle.create(
                TrustDomain.parse(name),
                x509_authorities=[pool.roots[index] for index in roots],
                jwt_authorities={f"kid-{index}": keys[index] for index in roots},
                sequence=sequence,
            )
            for name, (roots, sequence) in contents.items()
        )
    )
    assert BundleSet.parse_map(bundle_set.to_map_json()) == bundle_set


def _with_version(cert: x509.Certificate, version: int) -> bytes:
    """The DER of ``cert`` with its version field set to ``version`` (cryptography knows v1 and v3 only)."""
    der = cert.public_bytes(Encoding.DER)
    v3 = bytes.fromhex("a003020102")
    assert der.count(v3) == 1
    return der.replace(v3, bytes.fromhex("a0030201") + bytes([version]))


def test_certificates_of_unknown_version_are_bundle_errors(pool: Pool) -> None:
    bad = _with_version(pool.ca.cert, 7)
    pem = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(bad) + b"-----END CERTIFICATE-----\n"
    for parse in (
        lambda: X509Bundle.load_der(TD, bad),
        lambda: X509Bundle.load_pem(TD, pem),
        lambda: SpiffeBundle.parse(
            TD, document({"kty": "EC", "use": "x509-svid", "x5c": [base64.b64encode(bad).decode()]})
        ),
    ):
        error = bundle_error(parse)
        assert "version" in str(error).lower()
