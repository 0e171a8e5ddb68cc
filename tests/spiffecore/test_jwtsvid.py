"""JWT-SVID parsing and validation, per the JWT-SVID specification."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from spiffecore import JWTSVID, BundleSet, JWTBundle, JWTSVIDError, SpiffeBundle, SpiffeID, TrustDomain
from spiffecore.jwtsvid import _decode_segment
from tests.support.ca import NOW, TestCA, compact

ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA.create("example.org")


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    """One signing key per algorithm family and curve."""
    return {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "ES384": ec.generate_private_key(ec.SECP384R1()),
        "ES512": ec.generate_private_key(ec.SECP521R1()),
    }


def _key_name(algorithm: str) -> str:
    return algorithm if algorithm.startswith("ES") else "rsa"


@pytest.fixture(scope="module")
def bundles(ca: TestCA, keys: dict[str, Any]) -> BundleSet:
    authorities = {ca.jwt_kid: ca.jwt_key.public_key()} | {f"k-{name}": key.public_key() for name, key in keys.items()}
    return BundleSet.of(SpiffeBundle.create(ca.trust_domain, jwt_authorities=authorities))


def _validate(token: str, bundles: BundleSet, audience: str = "service-a", **options: Any) -> JWTSVID:
    return JWTSVID.parse_and_validate(token, bundles, audience, at=NOW, **options)


def _error(call: Callable[[], object]) -> JWTSVIDError:
    with pytest.raises(JWTSVIDError) as caught:
        call()
    return caught.value


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_allowed_algorithm_validates(
    algorithm: str, ca: TestCA, keys: dict[str, Any], bundles: BundleSet
) -> None:
    name = _key_name(algorithm)
    token = ca.mint_jwt("/web", algorithm=algorithm, key=keys[name], kid=f"k-{name}")
    svid = _validate(token, bundles)
    assert svid.id == SpiffeID.parse("spiffe://example.org/web")
    assert svid.audience == ("service-a",)
    assert svid.expiry == NOW + timedelta(minutes=5)
    assert svid.token == token
    assert svid.claims["sub"] == "spiffe://example.org/web"


def test_result_fields_and_repr_hides_the_token(ca: TestCA, bundles: BundleSet) -> None:
    token = ca.mint_jwt(audience="service-a", claims={"extra": [1, 2]})
    svid = _validate(token, bundles, hint="internal")
    assert svid.hint == "internal"
    assert svid.claims["extra"] == [1, 2]
    assert token not in repr(svid)
    assert token.split(".")[2] not in repr(svid)


def test_single_string_audience_and_several_expected_audiences(ca: TestCA, bundles: BundleSet) -> None:
    assert _validate(ca.mint_jwt(audience="service-a"), bundles).audience == ("service-a",)
    token = ca.mint_jwt(audience=["a", "b", "c"])
    assert JWTSVID.parse_and_validate(token, bundles, ["a", "c"], at=NOW).audience == ("a", "b", "c")
    error = _error(lambda: JWTSVID.parse_and_validate(token, bundles, ["a", "d"], at=NOW))
    assert str(error) == 'jwtsvid: token audience does not include "d": "a, b, c"'


def test_expected_audience_is_required(ca: TestCA, bundles: BundleSet) -> None:
    token = ca.mint_jwt()
    for audience in ([], "", ["a", ""]):
        error = _error(lambda audience=audience: JWTSVID.parse_and_validate(token, bundles, audience, at=NOW))  # type: ignore[misc]
        assert str(error) == "jwtsvid: at least one expected audience is required"


def _signed(
    ca: TestCA,
    *,
    header: Mapping[str, Any] | None = None,
    payload: Mapping[str, Any] | None = None,
    drop: tuple[str, ...] = (),
) -> str:
    """A token correctly signed by the CA's JWT key, with header and claims as given."""
    return ca.mint_jwt(headers=header, claims=payload, drop=drop)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda ca: _signed(ca, header={"crit": ["exp"]}),
            'jwtsvid: token header has a parameter the JWT-SVID specification does not allow: "crit"',
        ),
        (
            lambda ca: _signed(ca, header={"jku": "https://evil", "x5u": "https://evil"}),
            'jwtsvid: token header has a parameter the JWT-SVID specification does not allow: "jku, x5u"',
        ),
        (lambda ca: _signed(ca, header={"typ": "jwt"}), 'jwtsvid: token type must be JWT or JOSE when present: "jwt"'),
        (
            lambda ca: _signed(ca, header={"typ": "at+jwt"}),
            'jwtsvid: token type must be JWT or JOSE when present: "at+jwt"',
        ),
        (
            lambda ca: _signed(ca, header={"typ": ["JWT"]}),
            "jwtsvid: token type must be JWT or JOSE when present: \"['JWT']\"",
        ),
        (lambda ca: _signed(ca, drop=("sub",)), "jwtsvid: token has no subject (sub) claim"),
        (lambda ca: _signed(ca, payload={"sub": ""}), "jwtsvid: token has no subject (sub) claim"),
        (lambda ca: _signed(ca, payload={"sub": 42}), "jwtsvid: token has no subject (sub) claim"),
        (
            lambda ca: _signed(ca, payload={"sub": "spiffe://Example.org/x"}),
            "jwtsvid: token subject is not a valid SPIFFE ID (trust domain characters are limited to lowercase letters,"
            ' numbers, dots, dashes, and underscores): "spiffe://Example.org/x"',
        ),
        (lambda ca: _signed(ca, drop=("aud",)), "jwtsvid: token has no audience (aud) claim"),
        (
            lambda ca: _signed(ca, payload={"aud": []}),
            'jwtsvid: token audience must be a string or a non-empty array of strings: "[]"',
        ),
        (
            lambda ca: _signed(ca, payload={"aud": ""}),
            'jwtsvid: token audience must be a string or a non-empty array of strings: ""',
        ),
        (
            lambda ca: _signed(ca, payload={"aud": ["a", 3]}),
            "jwtsvid: token audience must be a string or a non-empty array of strings: \"['a', 3]\"",
        ),
        (lambda ca: _signed(ca, drop=("exp",)), "jwtsvid: token has no expiry (exp) claim"),
        (
            lambda ca: _signed(ca, payload={"exp": "tomorrow"}),
            "jwtsvid: token time claims (exp, nbf, iat) must be finite numbers: \"exp='tomorrow'\"",
        ),
        (
            lambda ca: _signed(ca, payload={"exp": True}),
            'jwtsvid: token time claims (exp, nbf, iat) must be finite numbers: "exp=True"',
        ),
        (
            lambda ca: _signed(ca, payload={"exp": float("inf")}),
            'jwtsvid: token time claims (exp, nbf, iat) must be finite numbers: "exp=inf"',
        ),
        (
            lambda ca: _signed(ca, payload={"exp": 10**400}),
            'jwtsvid: token time claims (exp, nbf, iat) must be finite numbers: "exp=1'
            + "0" * 195
            + '"... (405 characters)',
        ),
        (
            lambda ca: _signed(ca, payload={"nbf": "x"}),
            "jwtsvid: token time claims (exp, nbf, iat) must be finite numbers: \"nbf='x'\"",
        ),
        (
            lambda ca: ca.mint_jwt(expires_in=timedelta(seconds=-31)),
            f'jwtsvid: token has expired: "{(NOW - timedelta(seconds=31)).isoformat()}"',
        ),
        (
            lambda ca: _signed(ca, payload={"nbf": int(NOW.timestamp()) + 31}),
            f'jwtsvid: token is not valid yet (nbf): "{(NOW + timedelta(seconds=31)).isoformat()}"',
        ),
        (
            lambda ca: _signed(ca, payload={"iat": int(NOW.timestamp()) + 31}),
            f'jwtsvid: token was issued in the future (iat): "{(NOW + timedelta(seconds=31)).isoformat()}"',
        ),
        (lambda ca: ca.mint_jwt(audience=["other"]), 'jwtsvid: token audience does not include "service-a": "other"'),
    ],
)
def test_claim_and_header_rules(make: Callable[[TestCA], str], message: str, ca: TestCA, bundles: BundleSet) -> None:
    token = make(ca)
    assert str(_error(lambda: _validate(token, bundles))) == message
    assert str(_error(lambda: JWTSVID.parse_insecure(token, "service-a", at=NOW))) == message


def test_leeway_accepts_small_clock_skew(ca: TestCA, bundles: BundleSet) -> None:
    assert _validate(ca.mint_jwt(expires_in=timedelta(seconds=-29)), bundles)
    assert _validate(_signed(ca, payload={"nbf": int(NOW.timestamp()) + 29}), bundles)
    expired = ca.mint_jwt(expires_in=timedelta(seconds=-5))
    with pytest.raises(JWTSVIDError, match="token has expired"):
        _validate(expired, bundles, leeway=timedelta(0))


@pytest.mark.parametrize("algorithm", ["none", "HS256", "HS512", "EdDSA", "RS1", "", "es256"])
def test_algorithms_outside_the_allow_list_are_rejected(algorithm: str, ca: TestCA, bundles: BundleSet) -> None:
    token = compact(
        {"alg": algorithm, "kid": ca.jwt_kid, "typ": "JWT"},
        {"sub": "spiffe://example.org/x", "aud": "service-a", "exp": 9e9},
    )
    message = (
        "jwtsvid: token algorithm is not allowed (want one of RS256, RS384, RS512, ES256, ES384, ES512, PS256,"
        f' PS384, PS512): "{algorithm}"'
    )
    assert str(_error(lambda: _validate(token, bundles))) == message
    assert str(_error(lambda: JWTSVID.parse_insecure(token, "service-a", at=NOW))) == message


def test_hmac_token_signed_with_the_public_key_is_rejected(ca: TestCA, bundles: BundleSet) -> None:
    """The classic algorithm-confusion attack: HS256 keyed with the issuer's public key bytes."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    public_pem = ca.jwt_key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    payload = {"sub": "spiffe://example.org/x", "aud": "service-a", "exp": int(NOW.timestamp()) + 60}
    unsigned = compact({"alg": "HS256", "kid": ca.jwt_kid, "typ": "JWT"}, payload).rsplit(".", 1)[0]
    mac = hmac.new(public_pem, unsigned.encode(), hashlib.sha256).digest()
    token = unsigned + "." + jwt.utils.base64url_encode(mac).decode()
    assert "token algorithm is not allowed" in str(_error(lambda: _validate(token, bundles)))


def test_key_lookup_failures(ca: TestCA, bundles: BundleSet) -> None:
    no_kid = ca.mint_jwt(kid=None)
    assert str(_error(lambda: _validate(no_kid, bundles))) == "jwtsvid: token header must have a key ID (kid)"
    assert JWTSVID.parse_insecure(no_kid, "service-a", at=NOW).id == SpiffeID.parse("spiffe://example.org/workload")
    unknown = ca.mint_jwt(kid="rotated-away")
    assert (
        str(_error(lambda: _validate(unknown, bundles)))
        == 'jwtsvid: no JWT authority for the token\'s key ID: "rotated-away"'
    )
    empty_kid = _signed(ca, header={"kid": ""})
    assert str(_error(lambda: _validate(empty_kid, bundles))) == 'jwtsvid: token header must have a key ID (kid): ""'
    foreign = TestCA.create("other.org").mint_jwt()
    assert str(_error(lambda: _validate(foreign, bundles))) == (
        'jwtsvid: could not get JWT bundle (no JWT bundle for trust domain): "other.org"'
    )


def test_token_of_one_trust_domain_never_verifies_with_another_domains_keys(ca: TestCA) -> None:
    """A token whose subject is in b.org, signed with a.org's key, must fail even if both bundles are known."""
    other = TestCA.create("other.org")
    both = BundleSet.of(ca.bundle(), other.bundle())
    forged = ca.mint_jwt(claims={"sub": "spiffe://other.org/admin"}, kid=other.jwt_kid)
    assert str(_error(lambda: _validate(forged, both))) == "jwtsvid: token signature is not valid"


def test_key_must_fit_the_algorithm(ca: TestCA, keys: dict[str, Any], bundles: BundleSet) -> None:
    rsa_signed_claims_es256 = compact({"alg": "ES256", "kid": "k-rsa"}, {"sub": "spiffe://example.org/x"})
    assert str(_error(lambda: _validate(rsa_signed_claims_es256, bundles))) == (
        'jwtsvid: token algorithm does not fit the authority\'s key: "ES256"'
    )
    p256_as_es384 = compact({"alg": "ES384", "kid": "k-ES256"}, {"sub": "spiffe://example.org/x"})
    assert "does not fit" in str(_error(lambda: _validate(p256_as_es384, bundles)))
    ec_as_rs256 = compact({"alg": "RS256", "kid": "k-ES256"}, {"sub": "spiffe://example.org/x"})
    assert "does not fit" in str(_error(lambda: _validate(ec_as_rs256, bundles)))


def test_bad_signatures(ca: TestCA, bundles: BundleSet) -> None:
    impostor = ec.generate_private_key(ec.SECP256R1())
    forged = ca.mint_jwt(key=impostor)
    assert str(_error(lambda: _validate(forged, bundles))) == "jwtsvid: token signature is not valid"
    header, _, signature = ca.mint_jwt("/web").split(".")
    _, other_payload, _ = ca.mint_jwt("/admin").split(".")
    spliced = f"{header}.{other_payload}.{signature}"
    assert str(_error(lambda: _validate(spliced, bundles))) == "jwtsvid: token signature is not valid"
    short_signature = compact({"alg": "ES256", "kid": ca.jwt_kid}, {"sub": "spiffe://example.org/x"}, b"\x01\x02\x03")
    assert str(_error(lambda: _validate(short_signature, bundles))) == "jwtsvid: token signature is not valid"


BAD_SIGNATURE = "jwtsvid: token signature is not valid"


def _resigned(token: str, signature: bytes) -> str:
    """``token`` with its signature replaced by ``signature``."""
    return token.rsplit(".", 1)[0] + "." + jwt.utils.base64url_encode(signature).decode()


@pytest.mark.parametrize(
    ("algorithm", "digest"), [("ES256", hashes.SHA256()), ("ES384", hashes.SHA384()), ("ES512", hashes.SHA512())]
)
def test_ecdsa_signature_must_be_r_and_s_of_exactly_the_curve_size(
    algorithm: str, digest: hashes.HashAlgorithm, ca: TestCA, keys: dict[str, Any], bundles: BundleSet
) -> None:
    """RFC 7518 3.4: r || s, each exactly as long as the curve's order in bytes; no DER, no bytes more or less."""
    token = ca.mint_jwt(algorithm=algorithm, key=keys[algorithm], kid=f"k-{algorithm}")
    size = {"ES256": 32, "ES384": 48, "ES512": 66}[algorithm]
    signing_input = token.rsplit(".", 1)[0].encode()
    for _ in range(10_000):  # a signature whose s has a leading zero byte: 1 in 256 (1 in 2 for P-521)
        r, s = decode_dss_signature(keys[algorithm].sign(signing_input, ec.ECDSA(digest)))
        if s < 1 << (8 * (size - 1)):
            break
    else:
        pytest.fail("no signature with a short s")
    signature = r.to_bytes(size) + s.to_bytes(size)
    assert _validate(_resigned(token, signature), bundles)
    variants = (
        r.to_bytes(size) + s.to_bytes(size - 1),  # the same r and s, s without its leading zero byte
        r.to_bytes(size + 1) + s.to_bytes(size + 1),  # the same r and s, each one byte wider
        signature + b"\x00",
        b"\x00" + signature,
        signature[:-1],
        encode_dss_signature(r, s),
    )
    for variant in variants:
        forged = _resigned(token, variant)
        assert str(_error(lambda forged=forged: _validate(forged, bundles))) == BAD_SIGNATURE  # type: ignore[misc]


def test_pss_salt_must_be_as_long_as_the_hash(ca: TestCA, keys: dict[str, Any], bundles: BundleSet) -> None:
    """RFC 7518 3.5: PS256 is PSS with MGF1-SHA-256 and a 32-byte salt; other parameters do not verify."""
    token = ca.mint_jwt(algorithm="PS256", key=keys["rsa"], kid="k-rsa")
    signing_input = token.rsplit(".", 1)[0].encode()
    sha256 = hashes.SHA256()

    def pss(mgf_hash: hashes.HashAlgorithm, salt_length: int) -> str:
        scheme = padding.PSS(mgf=padding.MGF1(mgf_hash), salt_length=salt_length)
        return _resigned(token, keys["rsa"].sign(signing_input, scheme, sha256))

    assert _validate(pss(sha256, 32), bundles)
    pkcs1 = _resigned(token, keys["rsa"].sign(signing_input, padding.PKCS1v15(), sha256))
    longest_salt = keys["rsa"].key_size // 8 - sha256.digest_size - 2
    for forged in (pss(sha256, longest_salt), pss(sha256, 0), pss(hashes.SHA384(), 32), pkcs1):
        assert str(_error(lambda forged=forged: _validate(forged, bundles))) == BAD_SIGNATURE  # type: ignore[misc]


NOT_COMPACT = "jwtsvid: token must be a JWS in compact serialization (three base64url parts separated by dots)"


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: "",
        lambda t: "a.b",
        lambda t: t + ".x",
        lambda t: "..",
        lambda t: t.replace(".", "..", 1),
        lambda t: '{"payload":"x","signatures":[]}',
        lambda t: t + "=",
        lambda t: t.split(".")[0] + "=." + ".".join(t.split(".")[1:]),
        lambda t: t[:10] + "!" + t[11:],
        lambda t: t[:10] + "+" + t[11:],
        lambda t: t[:10] + "\u00e9" + t[11:],
        lambda t: t.rsplit(".", 1)[0] + ".A",
    ],
)
def test_malformed_compact_serialization(mangle: Callable[[str], str], ca: TestCA, bundles: BundleSet) -> None:
    token = mangle(ca.mint_jwt())
    assert str(_error(lambda: _validate(token, bundles))) == NOT_COMPACT


def test_non_canonical_base64_is_rejected(ca: TestCA, bundles: BundleSet) -> None:
    header, payload, signature = ca.mint_jwt().split(".")
    # ES256 signatures are 64 bytes: 86 base64url characters whose last carries 4 unused bits.
    assert len(signature) == 86
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(signature[-1])
    twin = signature[:-1] + alphabet[last | 1]
    assert twin != signature
    assert str(_error(lambda: _validate(f"{header}.{payload}.{twin}", bundles))) == NOT_COMPACT


BASE64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _reference_decode(segment: str) -> bytes | None:
    """Strict unpadded base64url the plain way: decode leniently, then require the canonical encoding back."""
    try:
        decoded = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except ValueError:  # binascii.Error, or a non-ASCII character
        return None
    return decoded if base64.urlsafe_b64encode(decoded).rstrip(b"=") == segment.encode() else None


def _check_decoder_against_reference(segment: str) -> None:
    expected = _reference_decode(segment)
    if expected is None:
        with pytest.raises(JWTSVIDError) as caught:
            _decode_segment(segment.encode("ascii"))
        assert str(caught.value) == NOT_COMPACT
    else:
        assert _decode_segment(segment.encode("ascii")) == expected


@settings(max_examples=3000)
@given(
    st.one_of(
        st.text(st.characters(codec="ascii")),
        st.text(st.sampled_from(BASE64URL + "+/=")),
        st.binary().map(lambda data: jwt.utils.base64url_encode(data).decode()),
    )
)
def test_segment_decoder_accepts_and_rejects_as_the_reference_does(segment: str) -> None:
    _check_decoder_against_reference(segment)


@pytest.mark.parametrize("prefix", ["", "Q", "QU", "QUF", "QUFB"])
def test_segment_decoder_over_every_ascii_last_character(prefix: str) -> None:
    """Every ASCII character as the last one, for each length modulo 4: only canonical forms decode."""
    for code in range(128):
        _check_decoder_against_reference(prefix + chr(code))
        _check_decoder_against_reference(chr(code) + prefix)


@pytest.mark.parametrize(
    ("header", "payload", "message"),
    [
        (b"not json", b"{}", "jwtsvid: token header must be a JSON object"),
        (b"[1,2]", b"{}", "jwtsvid: token header must be a JSON object"),
        (b'{"alg":"ES256","kid":"jwt-key-1"}', b"[]", "jwtsvid: token claims must be a JSON object"),
        (b'{"alg":"ES256","kid":"jwt-key-1"}', b"\xff\xfe", "jwtsvid: token claims must be a JSON object"),
        # RFC 7515 2: the header and claims are UTF-8; no other encoding, no byte-order mark.
        ('{"alg":"ES256","kid":"jwt-key-1"}'.encode("utf-16"), b"{}", "jwtsvid: token header must be a JSON object"),
        ('{"alg":"ES256","kid":"jwt-key-1"}'.encode("utf-8-sig"), b"{}", "jwtsvid: token header must be a JSON object"),
        (b'{"alg":"ES256","kid":"jwt-key-1"}', b"[" * 100_000, "jwtsvid: token claims must be a JSON object"),
    ],
)
def test_malformed_json(header: bytes, payload: bytes, message: str, bundles: BundleSet) -> None:
    token = ".".join(jwt.utils.base64url_encode(p).decode() for p in (header, payload, b"sig"))
    if len(token) > 64 * 1024:
        message = "jwtsvid: token must not be longer than 65536 bytes"
    assert str(_error(lambda: _validate(token, bundles))) == message


def test_oversized_token_is_rejected_before_any_work(bundles: BundleSet) -> None:
    assert str(_error(lambda: _validate("a" * 70_000, bundles))) == "jwtsvid: token must not be longer than 65536 bytes"


def test_errors_never_contain_the_token(ca: TestCA, bundles: BundleSet) -> None:
    tokens = [
        ca.mint_jwt(expires_in=timedelta(hours=-1)),
        ca.mint_jwt(audience="nobody"),
        ca.mint_jwt(key=ec.generate_private_key(ec.SECP256R1())),
        ca.mint_jwt(kid="unknown"),
    ]
    for token in tokens:
        error = _error(lambda token=token: _validate(token, bundles))  # type: ignore[misc]
        for part in token.split("."):
            assert part not in str(error)


def test_jwt_bundle_alone_is_a_bundle_source(ca: TestCA) -> None:
    bundle = JWTBundle(trust_domain=ca.trust_domain, authorities={ca.jwt_kid: ca.jwt_key.public_key()})
    assert JWTSVID.parse_and_validate(ca.mint_jwt(), bundle, "service-a", at=NOW).id.trust_domain == ca.trust_domain
    assert TrustDomain.parse("example.org") == ca.trust_domain


def test_ed25519_key_cannot_be_a_jwt_authority() -> None:
    with pytest.raises(Exception, match="JWT authority key must be an EC or RSA public key"):
        JWTBundle(
            trust_domain=TrustDomain.parse("example.org"),
            authorities={"k": ed25519.Ed25519PrivateKey.generate().public_key()},  # type: ignore[dict-item]
        )


@settings(max_examples=300)
@given(st.text(max_size=400))
def test_arbitrary_text_only_ever_raises_our_error(text: str) -> None:
    bundles = BundleSet.of(SpiffeBundle.create(TrustDomain.parse("example.org")))
    with pytest.raises(JWTSVIDError):
        JWTSVID.parse_and_validate(text, bundles, "service-a", at=NOW)


@settings(max_examples=300)
@given(data=st.data())
def test_any_single_character_change_is_rejected(data: st.DataObject) -> None:
    ca = _FUZZ_CA
    token = _FUZZ_TOKEN
    index = data.draw(st.integers(min_value=0, max_value=len(token) - 1))
    replacement = data.draw(st.characters(codec="ascii").filter(lambda c: c != token[index]))
    mutated = token[:index] + replacement + token[index + 1 :]
    with pytest.raises(JWTSVIDError):
        JWTSVID.parse_and_validate(mutated, BundleSet.of(ca.bundle()), "service-a", at=NOW)


_FUZZ_CA = TestCA.create("fuzz.example")
_FUZZ_TOKEN = _FUZZ_CA.mint_jwt(audience="service-a")


def test_a_naive_time_is_refused(ca: TestCA, bundles: BundleSet) -> None:
    naive = NOW.replace(tzinfo=None)
    with pytest.raises(ValueError, match=r"^at must be a timezone-aware datetime$"):
        JWTSVID.parse_and_validate(ca.mint_jwt(), bundles, "service-a", at=naive)
    with pytest.raises(ValueError, match=r"^at must be a timezone-aware datetime$"):
        JWTSVID.parse_insecure(ca.mint_jwt(), "service-a", at=naive)
