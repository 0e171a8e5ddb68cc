"""spiffecore: the SPIFFE vocabulary shared by every part of spiffe-sidecar.

SPIFFE IDs and trust domains, X.509- and JWT-SVIDs, trust bundles, verification, authorization
and TLS contexts. Pure: the standard library, cryptography and pyjwt only; no network I/O, and
functions that depend on time take it as an argument.
"""

from spiffecore.authorize import (
    AuthorizeAny,
    AuthorizeAnyOf,
    AuthorizeID,
    AuthorizeMemberOf,
    AuthorizeOneOf,
    AuthorizePathPrefix,
    AuthorizePattern,
    Authorizer,
    IDPattern,
)
from spiffecore.bundle import (
    BundleSet,
    JWTBundle,
    JWTBundleSource,
    JWTPublicKey,
    SpiffeBundle,
    X509Bundle,
    X509BundleSource,
)
from spiffecore.errors import (
    AuthorizationError,
    BundleError,
    BundleNotFoundError,
    JWTSVIDError,
    PolicyError,
    SpiffeError,
    SpiffeIDError,
    TLSConfigError,
    VerificationError,
    X509SVIDError,
)
from spiffecore.jwtsvid import JWTSVID
from spiffecore.spiffeid import SpiffeID, TrustDomain
from spiffecore.verify import VerificationCache, VerifiedX509SVID, verify_x509_svid
from spiffecore.x509svid import X509SVID, PrivateKey, id_from_cert

__all__ = [
    "JWTSVID",
    "X509SVID",
    "AuthorizationError",
    "AuthorizeAny",
    "AuthorizeAnyOf",
    "AuthorizeID",
    "AuthorizeMemberOf",
    "AuthorizeOneOf",
    "AuthorizePathPrefix",
    "AuthorizePattern",
    "Authorizer",
    "BundleError",
    "BundleNotFoundError",
    "BundleSet",
    "IDPattern",
    "JWTBundle",
    "JWTBundleSource",
    "JWTPublicKey",
    "JWTSVIDError",
    "PolicyError",
    "PrivateKey",
    "SpiffeBundle",
    "SpiffeError",
    "SpiffeID",
    "SpiffeIDError",
    "TLSConfigError",
    "TrustDomain",
    "VerificationCache",
    "VerificationError",
    "VerifiedX509SVID",
    "X509Bundle",
    "X509BundleSource",
    "X509SVIDError",
    "id_from_cert",
    "verify_x509_svid",
]
