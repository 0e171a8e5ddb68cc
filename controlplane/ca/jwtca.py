"""JWT authorities: the keys that sign JWT-SVIDs, each with a key ID and an expiry.

A key signs with ES256 (``ec-p256``, the default), ES384 (``ec-p384``) or RS256 (``rsa-2048``).
Tokens follow SPIRE: header ``alg``, ``kid``, ``typ: JWT``; claims ``sub``, ``aud`` (always a
list), ``exp`` and ``iat``. A token that would outlive its key is refused, never shortened.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final

import jwt

from controlplane.ca.errors import CAError
from controlplane.ca.keys import KeyType, PublicKey, SigningKey, key_type_of
from controlplane.ca.schedule import Window, format_duration, require_aware
from spiffecore import SpiffeID, TrustDomain

KID_BYTES: Final = 24
"""Random bytes in a key ID: 32 URL-safe characters, like SPIRE's."""

NO_KID: Final = "JWT authority key ID must be a non-empty URL-safe string"
UNSUPPORTED_KEY: Final = "JWT authority key must be EC P-256, EC P-384 or RSA-2048"
BAD_WINDOW: Final = "JWT authority must expire after it was issued"
WRONG_TRUST_DOMAIN: Final = "JWT-SVID SPIFFE ID is not in the authority's trust domain"
NO_PATH: Final = "JWT-SVID SPIFFE ID must have a path"
NO_AUDIENCE: Final = "JWT-SVID audience must be one or more non-empty strings"
BAD_TTL: Final = "JWT-SVID TTL must be a positive whole number of seconds"
OUTLIVES_AUTHORITY: Final = "JWT-SVID would outlive its signing key"
_KID_ALPHABET: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def new_kid() -> str:
    """A random key ID: URL-safe base64 of 24 random bytes."""
    return secrets.token_urlsafe(KID_BYTES)


@dataclass(frozen=True, slots=True, kw_only=True)
class JWTAuthority:
    """A JWT signing key of one trust domain. The key is left out of ``repr`` and comparisons."""

    trust_domain: TrustDomain
    kid: str
    private_key: SigningKey = field(repr=False, compare=False)
    issued_at: datetime
    not_after: datetime

    def __post_init__(self) -> None:
        if not self.kid or not set(self.kid) <= _KID_ALPHABET:
            raise CAError(NO_KID, self.kid)
        if key_type_of(self.private_key) is None:
            raise CAError(UNSUPPORTED_KEY, self.kid)
        require_aware(self.issued_at, "issued_at")
        require_aware(self.not_after, "not_after")
        if self.not_after <= self.issued_at:
            raise CAError(BAD_WINDOW, self.kid)

    @property
    def key_type(self) -> KeyType:
        key_type = key_type_of(self.private_key)
        assert key_type is not None  # checked at construction
        return key_type

    @property
    def algorithm(self) -> str:
        return self.key_type.jwt_algorithm

    @property
    def public_key(self) -> PublicKey:
        return self.private_key.public_key()

    @property
    def window(self) -> Window:
        return Window(not_before=self.issued_at, not_after=self.not_after)


def create_jwt_authority(
    trust_domain: TrustDomain, key: SigningKey, *, ttl: timedelta, now: datetime, kid: str | None = None
) -> JWTAuthority:
    """A new JWT authority for ``key``, valid from ``now`` for ``ttl``, with a random key ID unless given."""
    require_aware(now)
    now = now.replace(microsecond=0)
    return JWTAuthority(
        trust_domain=trust_domain, kid=kid or new_kid(), private_key=key, issued_at=now, not_after=now + ttl
    )


def sign_jwt_svid(
    authority: JWTAuthority,
    *,
    spiffe_id: SpiffeID,
    audience: str | Sequence[str],
    ttl: timedelta,
    now: datetime,
) -> str:
    """A JWT-SVID for ``spiffe_id`` and ``audience``, valid from ``now`` for ``ttl`` (compact JWS)."""
    require_aware(now)
    if spiffe_id.trust_domain != authority.trust_domain:
        raise CAError(f"{WRONG_TRUST_DOMAIN} ({authority.trust_domain})", str(spiffe_id))
    if spiffe_id.is_trust_domain_id:
        raise CAError(NO_PATH, str(spiffe_id))
    audiences = [audience] if isinstance(audience, str) else list(audience)
    if not audiences or not all(isinstance(item, str) and item for item in audiences):
        raise CAError(NO_AUDIENCE, audiences)
    if ttl <= timedelta(0) or ttl % timedelta(seconds=1):
        raise CAError(BAD_TTL, format_duration(ttl))
    now = now.replace(microsecond=0)
    expires = now + ttl
    if expires > authority.not_after:
        raise CAError(
            f"{OUTLIVES_AUTHORITY} (TTL {format_duration(ttl)} from {now.isoformat()} ends at {expires.isoformat()},"
            f" the key at {authority.not_after.isoformat()})",
            str(spiffe_id),
        )
    claims = {
        "sub": str(spiffe_id),
        "aud": audiences,
        "exp": int(expires.timestamp()),
        "iat": int(now.timestamp()),
    }
    headers = {"kid": authority.kid, "typ": "JWT"}
    return jwt.encode(claims, authority.private_key, algorithm=authority.algorithm, headers=headers)


__all__ = ["JWTAuthority", "create_jwt_authority", "new_kid", "sign_jwt_svid"]
