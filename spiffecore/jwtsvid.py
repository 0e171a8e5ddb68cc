"""JWT-SVIDs: parsing and validation per the JWT-SVID specification.

A JWT-SVID is a JWS in compact serialization whose header holds only ``alg`` (one of nine
asymmetric algorithms; never ``none`` or HMAC), ``kid`` and ``typ`` (``JWT`` or ``JOSE`` when
present), and whose claims hold ``sub`` (a SPIFFE ID), ``aud`` and ``exp``.

Validation runs once per request wherever JWT-SVIDs are accepted, so what it adds to the signature
check is kept small (``bench/verify.py`` measures it against the bare check):

- The compact form is split and decoded here rather than by ``jwt.decode``: pyjwt 2.15 checks the
  base64url alphabet with a Python loop over every byte, which measured at a fifth of the cost of
  an ES256 validation; the strict decoder below runs at C speed and rejects the same inputs
  (non-alphabet characters, padding, non-canonical encodings).
- The signature is checked with cryptography directly, not through pyjwt's algorithm objects
  (``jwt.algorithms``): those build new hash, padding and ECDSA objects on every call and convert
  ECDSA signatures through extra Python layers. Measured for ES256 (pyjwt 2.15, cryptography 50),
  they added 3.8 µs to the 57 µs signature check itself, against 1.7 µs for the check below, which
  builds each algorithm's cryptography objects once, at import, as RFC 7518 section 3 defines them.

Pure: the caller passes the time.

Errors never quote the token: it is a bearer credential.
"""

from __future__ import annotations

import binascii
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from spiffecore.bundle import JWTBundleSource, JWTPublicKey
from spiffecore.errors import BundleError, JWTSVIDError, SpiffeIDError
from spiffecore.spiffeid import SpiffeID
from spiffecore.verify import NAIVE_TIME

MAX_TOKEN_BYTES: Final = 64 * 1024
DEFAULT_LEEWAY: Final = timedelta(seconds=30)
ALLOWED_HEADERS: Final = frozenset({"alg", "kid", "typ"})
ALLOWED_TYPES: Final = frozenset({"JWT", "JOSE"})


@dataclass(frozen=True, slots=True, kw_only=True)
class _ECDSA:
    """An ES* algorithm (RFC 7518 3.4): an EC key on ``curve`` (its exact type); ECDSA with ``scheme``'s hash.

    The JWS signature is r || s, each big-endian in exactly ``size`` bytes, the curve's order rounded
    up to whole bytes: 64, 96 or 132 bytes in all.
    """

    name: str
    curve: type[ec.EllipticCurve]
    size: int
    scheme: ec.ECDSA

    @classmethod
    def of(cls, name: str, curve: ec.EllipticCurve, digest: hashes.HashAlgorithm) -> _ECDSA:
        return cls(name=name, curve=type(curve), size=(curve.key_size + 7) // 8, scheme=ec.ECDSA(digest))


@dataclass(frozen=True, slots=True, kw_only=True)
class _RSA:
    """An RS* (RFC 7518 3.3) or PS* (3.5) algorithm: an RSA key; ``scheme`` is the padding, PKCS #1 v1.5 or PSS."""

    name: str
    scheme: padding.AsymmetricPadding
    digest: hashes.HashAlgorithm

    @classmethod
    def pkcs1(cls, name: str, digest: hashes.HashAlgorithm) -> _RSA:
        return cls(name=name, scheme=padding.PKCS1v15(), digest=digest)

    @classmethod
    def pss(cls, name: str, digest: hashes.HashAlgorithm) -> _RSA:
        """RFC 7518 3.5: MGF1 with the same hash, and a salt exactly as long as the hash's output."""
        pss = padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
        return cls(name=name, scheme=pss, digest=digest)


_ALGORITHMS: Final[Mapping[str, _ECDSA | _RSA]] = MappingProxyType(
    {
        algorithm.name: algorithm
        for algorithm in (
            _RSA.pkcs1("RS256", hashes.SHA256()),
            _RSA.pkcs1("RS384", hashes.SHA384()),
            _RSA.pkcs1("RS512", hashes.SHA512()),
            _RSA.pss("PS256", hashes.SHA256()),
            _RSA.pss("PS384", hashes.SHA384()),
            _RSA.pss("PS512", hashes.SHA512()),
            _ECDSA.of("ES256", ec.SECP256R1(), hashes.SHA256()),
            _ECDSA.of("ES384", ec.SECP384R1(), hashes.SHA384()),
            _ECDSA.of("ES512", ec.SECP521R1(), hashes.SHA512()),
        )
    }
)
ALLOWED_ALGORITHMS: Final = frozenset(_ALGORITHMS)

# Strict unpadded base64url, decoded at C speed by the standard strict decoder: the URL-safe
# characters become the standard ones, and the standard "+", "/" and "=" (which base64url does not
# have) become "!", which the strict decoder rejects like every other non-alphabet byte.
_URL_TO_STANDARD: Final = bytes.maketrans(b"-_+/=", b"+/!!!")
# The canonical last character of a segment whose last group has 2 (or 3) characters: the one
# whose bits past the last whole byte are zero (RFC 4648 3.5).
_CANONICAL_LAST: Final = {2: frozenset(b"AQgw"), 3: frozenset(b"AEIMQUYcgkosw048")}
_JSON: Final = json.JSONDecoder()

TOO_LONG: Final = f"token must not be longer than {MAX_TOKEN_BYTES} bytes"
NOT_COMPACT: Final = "token must be a JWS in compact serialization (three base64url parts separated by dots)"
BAD_HEADER: Final = "token header must be a JSON object"
UNKNOWN_HEADER: Final = "token header has a parameter the JWT-SVID specification does not allow"
BAD_ALGORITHM: Final = (
    "token algorithm is not allowed (want one of RS256, RS384, RS512, ES256, ES384, ES512, PS256, PS384, PS512)"
)
BAD_TYPE: Final = "token type must be JWT or JOSE when present"
NO_KEY_ID: Final = "token header must have a key ID (kid)"
NO_BUNDLE: Final = "could not get JWT bundle"
NO_AUTHORITY: Final = "no JWT authority for the token's key ID"
KEY_MISMATCH: Final = "token algorithm does not fit the authority's key"
BAD_SIGNATURE: Final = "token signature is not valid"
BAD_PAYLOAD: Final = "token claims must be a JSON object"
NO_SUBJECT: Final = "token has no subject (sub) claim"
BAD_SUBJECT: Final = "token subject is not a valid SPIFFE ID"
NO_AUDIENCE: Final = "token has no audience (aud) claim"
BAD_AUDIENCE: Final = "token audience must be a string or a non-empty array of strings"
NO_EXPIRY: Final = "token has no expiry (exp) claim"
BAD_TIME_CLAIM: Final = "token time claims (exp, nbf, iat) must be finite numbers"
EXPIRED: Final = "token has expired"
NOT_YET_VALID: Final = "token is not valid yet (nbf)"
ISSUED_IN_FUTURE: Final = "token was issued in the future (iat)"
AUDIENCE_MISMATCH: Final = "token audience does not include"
NO_EXPECTED_AUDIENCE: Final = "at least one expected audience is required"


@dataclass(frozen=True, slots=True, kw_only=True)
class JWTSVID:
    """A parsed JWT-SVID. ``token`` is the bearer credential itself and is left out of ``repr``."""

    id: SpiffeID
    audience: tuple[str, ...]
    expiry: datetime
    claims: Mapping[str, Any] = field(compare=False)
    token: str = field(repr=False)
    hint: str = ""

    @classmethod
    def parse_and_validate(
        cls,
        token: str,
        bundles: JWTBundleSource,
        audience: str | Iterable[str],
        *,
        at: datetime,
        leeway: timedelta = DEFAULT_LEEWAY,
        hint: str = "",
    ) -> JWTSVID:
        """Verify the signature against the bundle of the subject's trust domain, then the claims.

        Every audience in ``audience`` must be in the token's ``aud``.
        """
        if at.tzinfo is None:
            raise ValueError(NAIVE_TIME)
        expected = _expected_audience(audience)
        header, payload, signing_input, signature = _split(token)
        algorithm, kid = _check_header(header)
        if kid is None:
            raise JWTSVIDError(NO_KEY_ID)
        claims = _json_object(payload, BAD_PAYLOAD)
        subject = _subject(claims)
        try:
            key = bundles.jwt_bundle_for(subject.trust_domain).find(kid)
        except BundleError as err:
            if err.rule.startswith("no JWT authority"):
                raise JWTSVIDError(NO_AUTHORITY, kid) from err
            raise JWTSVIDError(f"{NO_BUNDLE} ({err.rule})", subject.trust_domain.name) from err
        _check_signature(algorithm, key, signing_input, signature)
        return cls._from_claims(claims, subject, token, expected, at=at, leeway=leeway, hint=hint)

    @classmethod
    def parse_insecure(
        cls,
        token: str,
        audience: str | Iterable[str],
        *,
        at: datetime,
        leeway: timedelta = DEFAULT_LEEWAY,
        hint: str = "",
    ) -> JWTSVID:
        """Parse and check the header and claims WITHOUT verifying the signature.

        Only for a token one received from one's own trusted Workload API; never for a peer's.
        """
        if at.tzinfo is None:
            raise ValueError(NAIVE_TIME)
        expected = _expected_audience(audience)
        header, payload, _, _ = _split(token)
        _check_header(header)
        claims = _json_object(payload, BAD_PAYLOAD)
        return cls._from_claims(claims, _subject(claims), token, expected, at=at, leeway=leeway, hint=hint)

    @classmethod
    def _from_claims(
        cls,
        claims: dict[str, Any],
        subject: SpiffeID,
        token: str,
        expected: tuple[str, ...],
        *,
        at: datetime,
        leeway: timedelta,
        hint: str,
    ) -> JWTSVID:
        audience = _audience(claims)
        expiry = _time_claim(claims, "exp")
        if expiry is None:
            raise JWTSVIDError(NO_EXPIRY)
        now = at.timestamp()
        slack = leeway.total_seconds()
        if now > expiry + slack:
            raise JWTSVIDError(EXPIRED, _iso(expiry))
        not_before = _time_claim(claims, "nbf")
        if not_before is not None and now < not_before - slack:
            raise JWTSVIDError(NOT_YET_VALID, _iso(not_before))
        issued_at = _time_claim(claims, "iat")
        if issued_at is not None and now < issued_at - slack:
            raise JWTSVIDError(ISSUED_IN_FUTURE, _iso(issued_at))
        for wanted in expected:
            if wanted not in audience:
                raise JWTSVIDError(f"{AUDIENCE_MISMATCH} {json.dumps(wanted)}", ", ".join(audience))
        return cls(
            id=subject,
            audience=audience,
            expiry=datetime.fromtimestamp(expiry, UTC),
            claims=MappingProxyType(claims),
            token=token,
            hint=hint,
        )


def _expected_audience(audience: str | Iterable[str]) -> tuple[str, ...]:
    expected = (audience,) if isinstance(audience, str) else tuple(audience)
    if not expected or not all(expected):
        raise JWTSVIDError(NO_EXPECTED_AUDIENCE)
    return expected


def _decode_segment(segment: bytes) -> bytes:
    """Strict unpadded base64url: only the 64 characters, no padding, and the canonical last character."""
    tail = len(segment) % 4
    if tail == 1 or (tail and segment[-1] not in _CANONICAL_LAST[tail]):
        raise JWTSVIDError(NOT_COMPACT)
    try:
        return binascii.a2b_base64(segment.translate(_URL_TO_STANDARD) + b"=" * (-tail % 4), strict_mode=True)
    except binascii.Error as err:
        raise JWTSVIDError(NOT_COMPACT) from err


def _split(token: str) -> tuple[bytes, bytes, bytes, bytes]:
    """Split a compact JWS into decoded header, payload, the signing input and the signature."""
    if not isinstance(token, str):
        raise TypeError(f"token must be a str, not {type(token)!r}")
    if len(token) > MAX_TOKEN_BYTES:
        raise JWTSVIDError(TOO_LONG)
    try:
        raw = token.encode("ascii")
    except UnicodeEncodeError as err:
        raise JWTSVIDError(NOT_COMPACT) from err
    parts = raw.split(b".")
    if len(parts) != 3 or not all(parts):
        raise JWTSVIDError(NOT_COMPACT)
    header, payload, signature = parts
    signing_input = raw[: len(header) + 1 + len(payload)]
    return _decode_segment(header), _decode_segment(payload), signing_input, _decode_segment(signature)


def _json_object(data: bytes, rule: str) -> dict[str, Any]:
    """A JSON object in UTF-8 (RFC 7515 2), decoded from text: faster than ``json.loads`` on bytes."""
    try:
        value = _JSON.decode(data.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise JWTSVIDError(rule) from err
    if not isinstance(value, dict):
        raise JWTSVIDError(rule)
    return value


def _check_header(data: bytes) -> tuple[_ECDSA | _RSA, str | None]:
    """Check the header's parameters; return its algorithm and key ID."""
    header = _json_object(data, BAD_HEADER)
    if not header.keys() <= ALLOWED_HEADERS:
        raise JWTSVIDError(UNKNOWN_HEADER, ", ".join(sorted(header.keys() - ALLOWED_HEADERS)))
    name = header.get("alg")
    algorithm = _ALGORITHMS.get(name) if isinstance(name, str) else None
    if algorithm is None:
        raise JWTSVIDError(BAD_ALGORITHM, name)
    typ = header.get("typ")
    if typ is not None and (not isinstance(typ, str) or typ not in ALLOWED_TYPES):
        raise JWTSVIDError(BAD_TYPE, typ)
    kid = header.get("kid")
    if kid is not None and (not isinstance(kid, str) or not kid):
        raise JWTSVIDError(NO_KEY_ID, kid)
    return algorithm, kid


def _check_signature(algorithm: _ECDSA | _RSA, key: JWTPublicKey, signing_input: bytes, signature: bytes) -> None:
    """Check the key's type (and curve) against the algorithm, then the signature."""
    if isinstance(algorithm, _ECDSA):
        if not isinstance(key, ec.EllipticCurvePublicKey) or type(key.curve) is not algorithm.curve:
            raise JWTSVIDError(KEY_MISMATCH, algorithm.name)
        size = algorithm.size
        if len(signature) != 2 * size:
            raise JWTSVIDError(BAD_SIGNATURE)
        der = encode_dss_signature(int.from_bytes(signature[:size]), int.from_bytes(signature[size:]))
        try:
            key.verify(der, signing_input, algorithm.scheme)
        except InvalidSignature:
            raise JWTSVIDError(BAD_SIGNATURE) from None
        return
    if not isinstance(key, rsa.RSAPublicKey):
        raise JWTSVIDError(KEY_MISMATCH, algorithm.name)
    try:
        key.verify(signature, signing_input, algorithm.scheme, algorithm.digest)
    except InvalidSignature:
        raise JWTSVIDError(BAD_SIGNATURE) from None


def _subject(claims: dict[str, Any]) -> SpiffeID:
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise JWTSVIDError(NO_SUBJECT)
    try:
        return SpiffeID.parse(subject)
    except SpiffeIDError as err:
        raise JWTSVIDError(f"{BAD_SUBJECT} ({err.rule})", subject) from err


def _audience(claims: dict[str, Any]) -> tuple[str, ...]:
    audience = claims.get("aud")
    if audience is None:
        raise JWTSVIDError(NO_AUDIENCE)
    if isinstance(audience, str) and audience:
        return (audience,)
    if isinstance(audience, list) and audience and all(isinstance(item, str) and item for item in audience):
        return tuple(audience)
    raise JWTSVIDError(BAD_AUDIENCE, audience)


def _time_claim(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    # JSON numbers decode to exactly int or float; true and false decode to bool, which is neither.
    if type(value) is int or type(value) is float:
        try:
            seconds = float(value)
        except OverflowError:  # an integer beyond the range of a float
            seconds = math.inf
        if math.isfinite(seconds):
            return seconds
    raise JWTSVIDError(BAD_TIME_CLAIM, f"{name}={value!r}")


def _iso(timestamp: float) -> str:
    try:
        return datetime.fromtimestamp(timestamp, UTC).isoformat()
    except (OverflowError, OSError, ValueError):
        return repr(timestamp)
