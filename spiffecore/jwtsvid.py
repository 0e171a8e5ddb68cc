"""JWT-SVIDs: parsing and validation per the JWT-SVID specification.

A JWT-SVID is a JWS in compact serialization whose header holds only ``alg`` (one of nine
asymmetric algorithms; never ``none`` or HMAC), ``kid`` and ``typ`` (``JWT`` or ``JOSE`` when
present), and whose claims hold ``sub`` (a SPIFFE ID), ``aud`` and ``exp``.

The signature is checked with pyjwt's algorithm objects (key handling and the JWS signature
formats). The compact form is split and decoded here rather than by ``jwt.decode``: pyjwt 2.15
checks the base64url alphabet with a Python loop over every byte, which measured at a fifth of the
cost of an ES256 validation; the strict decoder below runs at C speed and rejects the same inputs
(non-alphabet characters, padding, non-canonical encodings). Pure: the caller passes the time.

Errors never quote the token: it is a bearer credential.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import Algorithm, ECAlgorithm, RSAAlgorithm, RSAPSSAlgorithm

from spiffecore.bundle import JWTBundleSource, JWTPublicKey
from spiffecore.errors import BundleError, JWTSVIDError, SpiffeIDError
from spiffecore.spiffeid import SpiffeID

MAX_TOKEN_BYTES: Final = 64 * 1024
DEFAULT_LEEWAY: Final = timedelta(seconds=30)
ALLOWED_HEADERS: Final = frozenset({"alg", "kid", "typ"})
ALLOWED_TYPES: Final = frozenset({"JWT", "JOSE"})

_EC_CURVES: Final = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
_ALGORITHMS: Final[Mapping[str, Algorithm]] = MappingProxyType(
    {
        "RS256": RSAAlgorithm(RSAAlgorithm.SHA256),
        "RS384": RSAAlgorithm(RSAAlgorithm.SHA384),
        "RS512": RSAAlgorithm(RSAAlgorithm.SHA512),
        "PS256": RSAPSSAlgorithm(RSAPSSAlgorithm.SHA256),
        "PS384": RSAPSSAlgorithm(RSAPSSAlgorithm.SHA384),
        "PS512": RSAPSSAlgorithm(RSAPSSAlgorithm.SHA512),
        "ES256": ECAlgorithm(ECAlgorithm.SHA256),
        "ES384": ECAlgorithm(ECAlgorithm.SHA384),
        "ES512": ECAlgorithm(ECAlgorithm.SHA512),
    }
)
ALLOWED_ALGORITHMS: Final = frozenset(_ALGORITHMS)

_URL_TO_STANDARD: Final = bytes.maketrans(b"-_", b"+/")

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
        expected = _expected_audience(audience)
        header, payload, signing_input, signature = _split(token)
        algorithm, kid = _check_header(header)
        if kid is None:
            raise JWTSVIDError(NO_KEY_ID)
        claims = _claims(payload)
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
        expected = _expected_audience(audience)
        header, payload, _, _ = _split(token)
        _check_header(header)
        claims = _claims(payload)
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
    """Strict unpadded base64url: C-speed decode plus a canonical-form check."""
    if len(segment) % 4 == 1:
        raise JWTSVIDError(NOT_COMPACT)
    padded = segment.translate(_URL_TO_STANDARD) + b"=" * (-len(segment) % 4)
    try:
        decoded = binascii.a2b_base64(padded, strict_mode=True)
    except binascii.Error as err:
        raise JWTSVIDError(NOT_COMPACT) from err
    if base64.urlsafe_b64encode(decoded).rstrip(b"=") != segment:
        raise JWTSVIDError(NOT_COMPACT)
    return decoded


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
    header, payload, signature = (_decode_segment(part) for part in parts)
    return header, payload, raw[: len(parts[0]) + 1 + len(parts[1])], signature


def _json_object(data: bytes, rule: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as err:
        raise JWTSVIDError(rule) from err
    if not isinstance(value, dict):
        raise JWTSVIDError(rule)
    return value


def _check_header(data: bytes) -> tuple[str, str | None]:
    """Check the header's parameters; return its algorithm and key ID."""
    header = _json_object(data, BAD_HEADER)
    unknown = header.keys() - ALLOWED_HEADERS
    if unknown:
        raise JWTSVIDError(UNKNOWN_HEADER, ", ".join(sorted(unknown)))
    algorithm = header.get("alg")
    if not isinstance(algorithm, str) or algorithm not in _ALGORITHMS:
        raise JWTSVIDError(BAD_ALGORITHM, algorithm)
    typ = header.get("typ")
    if typ is not None and typ not in ALLOWED_TYPES:
        raise JWTSVIDError(BAD_TYPE, typ)
    kid = header.get("kid")
    if kid is not None and (not isinstance(kid, str) or not kid):
        raise JWTSVIDError(NO_KEY_ID, kid)
    return algorithm, kid


def _check_signature(algorithm: str, key: JWTPublicKey, signing_input: bytes, signature: bytes) -> None:
    curve = _EC_CURVES.get(algorithm)
    if curve is not None:
        fits = isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == curve
    else:
        fits = isinstance(key, rsa.RSAPublicKey)
    if not fits:
        raise JWTSVIDError(KEY_MISMATCH, algorithm)
    try:
        valid = _ALGORITHMS[algorithm].verify(signing_input, key, signature)
    except ValueError:
        valid = False
    if not valid:
        raise JWTSVIDError(BAD_SIGNATURE)


def _claims(data: bytes) -> dict[str, Any]:
    return _json_object(data, BAD_PAYLOAD)


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
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise JWTSVIDError(BAD_TIME_CLAIM, f"{name}={value!r}")
    return float(value)


def _iso(timestamp: float) -> str:
    try:
        return datetime.fromtimestamp(timestamp, UTC).isoformat()
    except (OverflowError, OSError, ValueError):
        return repr(timestamp)
