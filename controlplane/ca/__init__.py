"""The control plane's certificate authority: X.509 authorities and JWT keys, rotated SPIRE's way.

- :mod:`~controlplane.ca.schedule`: pure rotation schedule and the start-up TTL check.
- :mod:`~controlplane.ca.keys`: key types, generation, PEM, saving keys 0600.
- :mod:`~controlplane.ca.x509ca` and :mod:`~controlplane.ca.upstream`: X.509 authorities,
  self-signed or intermediates of an upstream CA on disk.
- :mod:`~controlplane.ca.svid`: signing X.509-SVIDs; public keys from CSRs.
- :mod:`~controlplane.ca.jwtca`: JWT keys and signing JWT-SVIDs.
- :mod:`~controlplane.ca.state` and :mod:`~controlplane.ca.manager`: the slots on disk and
  their rotation.
"""

from controlplane.ca.config import CAConfig
from controlplane.ca.errors import CAConfigError, CAError
from controlplane.ca.jwtca import JWTAuthority, create_jwt_authority, sign_jwt_svid
from controlplane.ca.keys import KeyType
from controlplane.ca.manager import CAEvent, CAEventKind, CAManager
from controlplane.ca.schedule import check_ttls, max_svid_ttl
from controlplane.ca.svid import public_key_from_csr, sign_x509_svid
from controlplane.ca.upstream import Upstream
from controlplane.ca.x509ca import X509Authority, create_intermediate, create_self_signed

__all__ = [
    "CAConfig",
    "CAConfigError",
    "CAError",
    "CAEvent",
    "CAEventKind",
    "CAManager",
    "JWTAuthority",
    "KeyType",
    "Upstream",
    "X509Authority",
    "check_ttls",
    "create_intermediate",
    "create_jwt_authority",
    "create_self_signed",
    "max_svid_ttl",
    "public_key_from_csr",
    "sign_jwt_svid",
    "sign_x509_svid",
]
