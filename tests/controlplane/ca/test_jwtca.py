"""JWT authorities and JWT-SVIDs, validated by spiffecore against a bundle of the authority's key."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from controlplane.ca.errors import CAError
from controlplane.ca.jwtca import JWTAuthority, create_jwt_authority, new_kid, sign_jwt_svid
from controlplane.ca.keys import KeyType, SigningKey
from spiffecore import JWTSVID, JWTBundle, SpiffeID, TrustDomain
from tests.controlplane.ca.conftest import T0, TD

H = timedelta(hours=1)
M = timedelta(minutes=1)
WEB = SpiffeID.parse("spiffe://example.org/web")


def _part(token: str, index: int) -> dict[str, Any]:
    segment = token.split(".")[index]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    return decoded


@pytest.fixture(scope="module")
def authority() -> JWTAuthority:
    return create_jwt_authority(TD, ec.generate_private_key(ec.SECP256R1()), ttl=24 * H, now=T0)


def test_kids_are_random_and_url_safe() -> None:
    kids = {new_kid() for _ in range(100)}
    assert len(kids) == 100
    assert all(len(kid) == 32 and kid.replace("-", "").replace("_", "").isalnum() for kid in kids)


def test_created_authority(authority: JWTAuthority) -> None:
    assert authority.issued_at == T0
    assert authority.not_after == T0 + 24 * H
    assert authority.algorithm == "ES256"
    assert authority.key_type is KeyType.EC_P256
    assert authority.window.activate_at == T0 + 20 * H
    assert "private_key" not in repr(authority)


@pytest.mark.parametrize(
    ("key_type", "algorithm"), [(KeyType.EC_P256, "ES256"), (KeyType.EC_P384, "ES384"), (KeyType.RSA_2048, "RS256")]
)
def test_tokens_validate_with_spiffecore(keys: dict[KeyType, SigningKey], key_type: KeyType, algorithm: str) -> None:
    authority = create_jwt_authority(TD, keys[key_type], ttl=24 * H, now=T0)
    token = sign_jwt_svid(authority, spiffe_id=WEB, audience=["db", "cache"], ttl=5 * M, now=T0 + H)
    assert _part(token, 0) == {"alg": algorithm, "kid": authority.kid, "typ": "JWT"}
    iat = int((T0 + H).timestamp())
    assert _part(token, 1) == {"sub": str(WEB), "aud": ["db", "cache"], "exp": iat + 300, "iat": iat}
    bundle = JWTBundle(trust_domain=TD, authorities={authority.kid: authority.public_key})
    svid = JWTSVID.parse_and_validate(token, bundle, "db", at=T0 + H + M)
    assert svid.id == WEB
    assert svid.audience == ("db", "cache")
    assert svid.expiry == T0 + H + 5 * M


def test_a_single_audience_is_still_a_list(authority: JWTAuthority) -> None:
    token = sign_jwt_svid(authority, spiffe_id=WEB, audience="db", ttl=5 * M, now=T0)
    assert _part(token, 1)["aud"] == ["db"]


def test_a_token_must_not_outlive_its_key(authority: JWTAuthority) -> None:
    sign_jwt_svid(authority, spiffe_id=WEB, audience="db", ttl=H, now=T0 + 23 * H)
    with pytest.raises(CAError) as info:
        sign_jwt_svid(authority, spiffe_id=WEB, audience="db", ttl=H, now=T0 + 23 * H + timedelta(seconds=1))
    assert str(info.value) == (
        "ca: JWT-SVID would outlive its signing key (TTL 1h from 2030-01-01T23:00:01+00:00 ends at"
        ' 2030-01-02T00:00:01+00:00, the key at 2030-01-02T00:00:00+00:00): "spiffe://example.org/web"'
    )


@pytest.mark.parametrize(
    ("spiffe_id", "audience", "ttl", "message"),
    [
        (
            "spiffe://other.org/web",
            "db",
            M,
            'ca: JWT-SVID SPIFFE ID is not in the authority\'s trust domain (example.org): "spiffe://other.org/web"',
        ),
        ("spiffe://example.org", "db", M, 'ca: JWT-SVID SPIFFE ID must have a path: "spiffe://example.org"'),
        ("spiffe://example.org/web", [], M, 'ca: JWT-SVID audience must be one or more non-empty strings: "[]"'),
        (
            "spiffe://example.org/web",
            ["db", ""],
            M,
            "ca: JWT-SVID audience must be one or more non-empty strings: \"['db', '']\"",
        ),
        (
            "spiffe://example.org/web",
            "db",
            timedelta(0),
            'ca: JWT-SVID TTL must be a positive whole number of seconds: "0s"',
        ),
        (
            "spiffe://example.org/web",
            "db",
            timedelta(milliseconds=1500),
            'ca: JWT-SVID TTL must be a positive whole number of seconds: "1.5s"',
        ),
    ],
)
def test_sign_refuses(
    authority: JWTAuthority, spiffe_id: str, audience: str | list[str], ttl: timedelta, message: str
) -> None:
    with pytest.raises(CAError) as info:
        sign_jwt_svid(authority, spiffe_id=SpiffeID.parse(spiffe_id), audience=audience, ttl=ttl, now=T0)
    assert str(info.value) == message


def test_authority_checks_its_parts(authority: JWTAuthority) -> None:
    values: dict[str, Any] = {
        "trust_domain": TrustDomain.parse("example.org"),
        "kid": "k1",
        "private_key": authority.private_key,
        "issued_at": T0,
        "not_after": T0 + H,
    }
    cases: list[tuple[dict[str, Any], str]] = [
        ({"kid": ""}, 'ca: JWT authority key ID must be a non-empty URL-safe string: ""'),
        ({"kid": "a b"}, 'ca: JWT authority key ID must be a non-empty URL-safe string: "a b"'),
        (
            {"private_key": ec.generate_private_key(ec.SECP521R1())},
            'ca: JWT authority key must be EC P-256, EC P-384 or RSA-2048: "k1"',
        ),
        ({"not_after": T0}, 'ca: JWT authority must expire after it was issued: "k1"'),
    ]
    for change, message in cases:
        with pytest.raises(CAError) as info:
            JWTAuthority(**(values | change))
        assert str(info.value) == message
