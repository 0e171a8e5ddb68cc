"""The CA's configuration, checked as a whole when it is built: a bad one never reaches start-up."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Final

from controlplane.ca.errors import CAConfigError
from controlplane.ca.keys import KeyType
from controlplane.ca.schedule import check_ttls
from spiffecore import TrustDomain

DEFAULT_CA_TTL: Final = timedelta(hours=24)
DEFAULT_X509_SVID_TTL: Final = timedelta(hours=1)
DEFAULT_JWT_SVID_TTL: Final = timedelta(minutes=5)
DEFAULT_AGENT_SVID_TTL: Final = timedelta(hours=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class CAConfig:
    """How the CA creates authorities. Defaults are SPIRE's.

    ``ca_ttl`` is the lifetime of every X.509 authority and JWT key. Every SVID TTL must be at
    most ``min(ca_ttl / 6, 7 days)`` so that SVIDs always get their full TTL
    (:func:`controlplane.ca.schedule.check_ttls`). With ``upstream_cert_path`` and
    ``upstream_key_path`` (both or neither), X.509 authorities are intermediates signed by that CA.
    """

    trust_domain: TrustDomain
    key_type: KeyType = KeyType.EC_P256
    jwt_key_type: KeyType = KeyType.EC_P256
    ca_ttl: timedelta = DEFAULT_CA_TTL
    x509_svid_ttl: timedelta = DEFAULT_X509_SVID_TTL
    jwt_svid_ttl: timedelta = DEFAULT_JWT_SVID_TTL
    agent_svid_ttl: timedelta = DEFAULT_AGENT_SVID_TTL
    upstream_cert_path: Path | None = None
    upstream_key_path: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, TrustDomain):
            raise CAConfigError("trust_domain must be a TrustDomain", self.trust_domain)
        for name in ("key_type", "jwt_key_type"):
            value = getattr(self, name)
            if not isinstance(value, KeyType):
                object.__setattr__(self, name, KeyType.parse(str(value)))
        if (self.upstream_cert_path is None) != (self.upstream_key_path is None):
            raise CAConfigError("upstream_cert_path and upstream_key_path must be set together")
        check_ttls(
            ca_ttl=self.ca_ttl,
            x509_svid_ttl=self.x509_svid_ttl,
            jwt_svid_ttl=self.jwt_svid_ttl,
            agent_svid_ttl=self.agent_svid_ttl,
        )

    @property
    def upstream_paths(self) -> tuple[Path, Path] | None:
        """The upstream CA's certificate and key files, or ``None`` for self-signed authorities."""
        if self.upstream_cert_path is None or self.upstream_key_path is None:
            return None
        return self.upstream_cert_path, self.upstream_key_path


__all__ = ["CAConfig"]
