"""Trust bundles: the X.509 authorities and JWT keys that a trust domain's SVIDs verify against.

- :class:`X509Bundle` holds one trust domain's X.509 roots (PEM or concatenated DER).
- :class:`JWTBundle` holds one trust domain's JWT signing keys by key ID (a standard JWKS, as the
  Workload API's ``FetchJWTBundles`` sends it).
- :class:`SpiffeBundle` is both plus ``spiffe_sequence`` and ``spiffe_refresh_hint``, in the SPIFFE
  bundle format (a JWKS whose keys carry ``use`` ``x509-svid`` or ``jwt-svid``), as bundle
  endpoints and the control plane exchange it.
- :class:`BundleSet` maps trust domains to their bundles; it is how a verifier finds the bundle of
  an SVID's own trust domain, and it reads and writes SPIFFE bundle maps.

Bundles of different trust domains are never merged.

JWT authorities are the keys a JWT-SVID algorithm (JWT-SVID 2.1) can verify with: EC keys on P-256,
P-384 or P-521 and RSA keys of at least 2048 bits. A JWKS entry of another key type (such as
``OKP``), another curve (such as ``secp256k1``) or a shorter RSA key is skipped, as entries of
unknown type are, so one such key does not make a whole bundle unusable. An entry is still an
error when its key ID is missing or repeats one seen before (skipped entries included), or when
its key cannot be parsed. :class:`JWTBundle` itself accepts only usable keys: a bundle we build can
verify with every key it holds.

An X.509 authority's public key is read when the bundle is built, so a certificate whose key
cryptography cannot read (an unknown curve, a corrupt point) is refused there, not at first use.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Protocol, TypeAlias

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import Store

from spiffecore.der import CERTIFICATE_PARSE_ERRORS, dump_der_certificates, dump_pem_certificates, load_der_certificates
from spiffecore.errors import BundleError, BundleNotFoundError, SpiffeIDError, quote
from spiffecore.spiffeid import TrustDomain

JWTPublicKey: TypeAlias = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
# Inside SpiffeBundle the field ``x509`` hides the module, so its signatures use this name.
_Certificate: TypeAlias = x509.Certificate

X509_SVID_USE: Final = "x509-svid"
JWT_SVID_USE: Final = "jwt-svid"
_KNOWN_KTY: Final = frozenset({"EC", "RSA", "OKP"})
# The JWT-SVID algorithms (JWT-SVID 2.1) a JWT authority's optional ``alg`` may name, by key type.
_JWT_ALGORITHMS: Final = {
    "EC": frozenset({"ES256", "ES384", "ES512"}),
    "RSA": frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
}
# The curves of ES256, ES384 and ES512, by JWK name and by cryptography's name.
_JWT_CURVES: Final = frozenset({"P-256", "P-384", "P-521"})
_JWT_CURVE_NAMES: Final = frozenset({"secp256r1", "secp384r1", "secp521r1"})
MIN_JWT_RSA_BITS: Final = 2048
# Sequence numbers are uint64 in the SPIFFE bundle format. A refresh hint (seconds) is bounded by
# int32 so it is a sane number for any consumer; choosing a sane poll interval within that range
# (clamping tiny or huge hints) is the bundle poller's job, not the parser's.
MAX_SEQUENCE: Final = 2**64 - 1
MAX_REFRESH_HINT: Final = 2**31 - 1
_LIMITS: Final = {"sequence": MAX_SEQUENCE, "refresh_hint": MAX_REFRESH_HINT}


class X509BundleSource(Protocol):
    """Anything that can hand out the X.509 bundle of a trust domain."""

    def x509_bundle_for(self, trust_domain: TrustDomain) -> X509Bundle:
        """Return the bundle of ``trust_domain`` or raise :class:`BundleNotFoundError`."""
        ...


class JWTBundleSource(Protocol):
    """Anything that can hand out the JWT bundle of a trust domain."""

    def jwt_bundle_for(self, trust_domain: TrustDomain) -> JWTBundle:
        """Return the bundle of ``trust_domain`` or raise :class:`BundleNotFoundError`."""
        ...


def _not_found(kind: str, trust_domain: TrustDomain) -> BundleNotFoundError:
    return BundleNotFoundError(f"no {kind} bundle for trust domain", trust_domain.name)


@dataclass(frozen=True, slots=True, kw_only=True)
class X509Bundle:
    """The X.509 authorities (roots) of one trust domain."""

    trust_domain: TrustDomain
    authorities: tuple[x509.Certificate, ...] = ()
    _store: Store | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for certificate in self.authorities:
            _authority_key(certificate, self.trust_domain)
        if self.authorities:
            object.__setattr__(self, "_store", Store(list(self.authorities)))

    @classmethod
    def load_pem(cls, trust_domain: TrustDomain, data: bytes) -> X509Bundle:
        """Parse PEM certificates (a ``bundle.pem``). An input with no certificate is an error."""
        try:
            authorities = tuple(x509.load_pem_x509_certificates(data))
        except CERTIFICATE_PARSE_ERRORS as err:
            raise BundleError(f"could not parse X.509 authorities from PEM ({err})", trust_domain.name) from err
        return cls(trust_domain=trust_domain, authorities=authorities)

    @classmethod
    def load_der(cls, trust_domain: TrustDomain, data: bytes) -> X509Bundle:
        """Parse concatenated DER certificates, the Workload API's bundle form (may be empty)."""
        try:
            authorities = load_der_certificates(data)
        except ValueError as err:
            raise BundleError(f"could not parse X.509 authorities from DER ({err})", trust_domain.name) from err
        return cls(trust_domain=trust_domain, authorities=authorities)

    def pem(self) -> bytes:
        return dump_pem_certificates(self.authorities)

    def der(self) -> bytes:
        return dump_der_certificates(self.authorities)

    def store(self) -> Store:
        """The authorities as a verification store, built once with the bundle.

        Raises :class:`BundleError` for an empty bundle: nothing of this trust domain can verify.
        """
        if self._store is None:
            raise BundleError("bundle has no X.509 authorities", self.trust_domain.name)
        return self._store

    def x509_bundle_for(self, trust_domain: TrustDomain) -> X509Bundle:
        if trust_domain != self.trust_domain:
            raise _not_found("X.509", trust_domain)
        return self


@dataclass(frozen=True, slots=True, kw_only=True)
class JWTBundle:
    """The JWT signing keys of one trust domain, by key ID."""

    trust_domain: TrustDomain
    authorities: Mapping[str, JWTPublicKey] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        keys = dict(self.authorities)
        for kid, key in keys.items():
            if not kid:
                raise BundleError("JWT authority key ID must not be empty", self.trust_domain.name)
            if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
                raise BundleError("JWT authority key must be an EC or RSA public key", kid)
            if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name not in _JWT_CURVE_NAMES:
                raise BundleError(f"JWT authority EC key must be on P-256, P-384 or P-521 (not {key.curve.name})", kid)
            if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_JWT_RSA_BITS:
                raise BundleError(
                    f"JWT authority RSA key must have at least {MIN_JWT_RSA_BITS} bits (not {key.key_size})", kid
                )
        object.__setattr__(self, "authorities", MappingProxyType(keys))

    def __hash__(self) -> int:
        # Consistent with the generated __eq__: equal bundles have the same trust domain and key IDs.
        return hash((self.trust_domain, frozenset(self.authorities)))

    @classmethod
    def load_jwks(cls, trust_domain: TrustDomain, data: bytes | str) -> JWTBundle:
        """Parse a JWKS (standard, or a SPIFFE bundle whose non-JWT keys are ignored)."""
        document = _load_json(data, trust_domain)
        keys = _jwks_keys(document, trust_domain)
        authorities: dict[str, JWTPublicKey] = {}
        kids: set[str] = set()
        for index, entry in enumerate(keys):
            if not _usable(entry) or entry.get("use", JWT_SVID_USE) != JWT_SVID_USE:
                continue
            _add_jwt_authority(authorities, kids, index, entry, trust_domain)
        return cls(trust_domain=trust_domain, authorities=authorities)

    def jwks(self) -> bytes:
        """A standard JWKS (no ``use``), as the Workload API's ``FetchJWTBundles`` sends it."""
        keys = [_jwk(key) | {"kid": kid} for kid, key in self.authorities.items()]
        return json.dumps({"keys": keys}, separators=(",", ":")).encode()

    def find(self, kid: str) -> JWTPublicKey:
        """The key with ID ``kid``, or :class:`BundleNotFoundError`."""
        try:
            return self.authorities[kid]
        except KeyError:
            raise BundleNotFoundError(
                f"no JWT authority with this key ID in trust domain {quote(self.trust_domain.name)}", kid
            ) from None

    def jwt_bundle_for(self, trust_domain: TrustDomain) -> JWTBundle:
        if trust_domain != self.trust_domain:
            raise _not_found("JWT", trust_domain)
        return self


@dataclass(frozen=True, slots=True, kw_only=True)
class SpiffeBundle:
    """A trust domain's X.509 and JWT authorities with their sequence number and refresh hint."""

    x509: X509Bundle
    jwt: JWTBundle
    sequence: int | None = None
    refresh_hint: int | None = None

    def __post_init__(self) -> None:
        if self.x509.trust_domain != self.jwt.trust_domain:
            raise BundleError(
                f"X.509 and JWT parts belong to different trust domains ({self.jwt.trust_domain})",
                self.x509.trust_domain.name,
            )
        for name, limit in _LIMITS.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise BundleError(f"{name} must be a non-negative integer", value)
            if value > limit:
                raise BundleError(f"{name} must be at most {limit}", value)

    @classmethod
    def create(
        cls,
        trust_domain: TrustDomain,
        *,
        x509_authorities: Iterable[_Certificate] = (),
        jwt_authorities: Mapping[str, JWTPublicKey] | None = None,
        sequence: int | None = None,
        refresh_hint: int | None = None,
    ) -> SpiffeBundle:
        return cls(
            x509=X509Bundle(trust_domain=trust_domain, authorities=tuple(x509_authorities)),
            jwt=JWTBundle(trust_domain=trust_domain, authorities=dict(jwt_authorities or {})),
            sequence=sequence,
            refresh_hint=refresh_hint,
        )

    @property
    def trust_domain(self) -> TrustDomain:
        return self.x509.trust_domain

    @classmethod
    def parse(cls, trust_domain: TrustDomain, data: bytes | str) -> SpiffeBundle:
        """Parse a SPIFFE bundle (JWKS with ``use`` per key) for ``trust_domain``."""
        return cls._from_document(trust_domain, _load_json(data, trust_domain))

    @classmethod
    def _from_document(cls, trust_domain: TrustDomain, document: object) -> SpiffeBundle:
        keys = _jwks_keys(document, trust_domain)
        assert isinstance(document, dict)
        x509_authorities: list[x509.Certificate] = []
        jwt_authorities: dict[str, JWTPublicKey] = {}
        kids: set[str] = set()
        for index, entry in enumerate(keys):
            if not _usable(entry):
                continue
            use = entry.get("use")
            if use == X509_SVID_USE:
                certificate = _x5c_certificate(index, entry, trust_domain)
                if certificate is not None:
                    x509_authorities.append(certificate)
            elif use == JWT_SVID_USE:
                _add_jwt_authority(jwt_authorities, kids, index, entry, trust_domain)
        return cls.create(
            trust_domain,
            x509_authorities=x509_authorities,
            jwt_authorities=jwt_authorities,
            sequence=_optional_int(document, "spiffe_sequence", MAX_SEQUENCE, trust_domain),
            refresh_hint=_optional_int(document, "spiffe_refresh_hint", MAX_REFRESH_HINT, trust_domain),
        )

    def to_document(self, *, include_refresh_hint: bool = True) -> dict[str, Any]:
        """The bundle as a JSON-ready dict (the refresh hint may be left out, as in bundle maps).

        Raises :class:`BundleError` for an X.509 authority whose key has no JWK form (such as a
        P-224 or DSA key): such a bundle can verify, but not be written in the SPIFFE format.
        """
        keys: list[dict[str, Any]] = []
        for certificate in self.x509.authorities:
            der = certificate.public_bytes(Encoding.DER)
            x5c = [base64.b64encode(der).decode()]
            keys.append(_jwk(certificate.public_key()) | {"use": X509_SVID_USE, "x5c": x5c})
        for kid, key in self.jwt.authorities.items():
            keys.append(_jwk(key) | {"use": JWT_SVID_USE, "kid": kid})
        document: dict[str, Any] = {"keys": keys}
        if self.sequence is not None:
            document["spiffe_sequence"] = self.sequence
        if include_refresh_hint and self.refresh_hint is not None:
            document["spiffe_refresh_hint"] = self.refresh_hint
        return document

    def to_json(self) -> bytes:
        return json.dumps(self.to_document(), separators=(",", ":")).encode()

    def x509_bundle_for(self, trust_domain: TrustDomain) -> X509Bundle:
        return self.x509.x509_bundle_for(trust_domain)

    def jwt_bundle_for(self, trust_domain: TrustDomain) -> JWTBundle:
        return self.jwt.jwt_bundle_for(trust_domain)


@dataclass(frozen=True, slots=True)
class BundleSet:
    """The bundles of several trust domains, one each, looked up by trust domain."""

    bundles: Mapping[TrustDomain, SpiffeBundle]

    def __post_init__(self) -> None:
        bundles = dict(self.bundles)
        for trust_domain, bundle in bundles.items():
            if not isinstance(trust_domain, TrustDomain):
                raise TypeError(f"bundle set keys must be TrustDomain, not {type(trust_domain).__name__}")
            if not isinstance(bundle, SpiffeBundle):
                raise TypeError(f"bundle set values must be SpiffeBundle, not {type(bundle).__name__}")
            if bundle.trust_domain != trust_domain:
                raise BundleError(
                    f"bundle of {bundle.trust_domain} filed under another trust domain", trust_domain.name
                )
        object.__setattr__(self, "bundles", MappingProxyType(bundles))

    def __hash__(self) -> int:
        # Consistent with the generated __eq__, which compares the mappings.
        return hash(frozenset(self.bundles.items()))

    @classmethod
    def of(cls, *bundles: SpiffeBundle) -> BundleSet:
        """A set of ``bundles``; two bundles of the same trust domain are an error."""
        mapping: dict[TrustDomain, SpiffeBundle] = {}
        for bundle in bundles:
            if bundle.trust_domain in mapping:
                raise BundleError("duplicate bundle for trust domain", bundle.trust_domain.name)
            mapping[bundle.trust_domain] = bundle
        return cls(mapping)

    @classmethod
    def parse_map(cls, data: bytes | str) -> BundleSet:
        """Parse a SPIFFE bundle map, ``{"trust_domains": {"<td>": <bundle>, ...}}``.

        Duplicate trust domain keys are rejected, as the specification requires of consumers.
        """
        document = _load_json(data, None)
        if not isinstance(document, dict) or not isinstance(document.get("trust_domains"), dict):
            raise BundleError('bundle map must be an object with a "trust_domains" object')
        mapping: dict[TrustDomain, SpiffeBundle] = {}
        for name, bundle_document in document["trust_domains"].items():
            try:
                trust_domain = TrustDomain.parse(name)
            except SpiffeIDError as err:
                raise BundleError(f"bundle map key is not a trust domain ({err.rule})", name) from err
            if trust_domain in mapping:
                raise BundleError("duplicate trust domain in bundle map", name)
            mapping[trust_domain] = SpiffeBundle._from_document(trust_domain, bundle_document)
        return cls(mapping)

    def to_map_json(self) -> bytes:
        """The set as a SPIFFE bundle map (refresh hints omitted, as the specification advises)."""
        trust_domains = {
            td.name: self.bundles[td].to_document(include_refresh_hint=False) for td in sorted(self.bundles)
        }
        return json.dumps({"trust_domains": trust_domains}, separators=(",", ":")).encode()

    def get(self, trust_domain: TrustDomain) -> SpiffeBundle:
        return self._lookup(trust_domain, "SPIFFE")

    def x509_bundle_for(self, trust_domain: TrustDomain) -> X509Bundle:
        return self._lookup(trust_domain, "X.509").x509

    def jwt_bundle_for(self, trust_domain: TrustDomain) -> JWTBundle:
        return self._lookup(trust_domain, "JWT").jwt

    def _lookup(self, trust_domain: TrustDomain, kind: str) -> SpiffeBundle:
        bundle = self.bundles.get(trust_domain)
        if bundle is None:
            raise _not_found(kind, trust_domain)
        return bundle

    def with_bundle(self, bundle: SpiffeBundle) -> BundleSet:
        """A copy with ``bundle`` added, or replacing the bundle of its trust domain."""
        return BundleSet({**self.bundles, bundle.trust_domain: bundle})

    def __iter__(self) -> Iterator[TrustDomain]:
        return iter(self.bundles)

    def __len__(self) -> int:
        return len(self.bundles)

    def __contains__(self, trust_domain: object) -> bool:
        return trust_domain in self.bundles


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise BundleError("duplicate key in JSON object", key)
        result[key] = value
    return result


def _load_json(data: bytes | str, trust_domain: TrustDomain | None) -> object:
    where = trust_domain.name if trust_domain is not None else f"{len(data)} bytes"
    try:
        return json.loads(data, object_pairs_hook=_reject_duplicate_keys)
    except BundleError:
        raise
    except (ValueError, RecursionError) as err:
        raise BundleError(f"could not parse JSON ({err})", where) from err


def _jwks_keys(document: object, trust_domain: TrustDomain) -> list[Any]:
    if not isinstance(document, dict):
        raise BundleError("bundle must be a JSON object", trust_domain.name)
    keys = document.get("keys")
    if not isinstance(keys, list):
        raise BundleError('bundle must have a "keys" array', trust_domain.name)
    return keys


def _usable(entry: object) -> bool:
    """Entries that are not objects, or whose ``kty`` is missing or unknown, are ignored (spec 4.2)."""
    if not isinstance(entry, dict):
        return False
    kty = entry.get("kty")
    return isinstance(kty, str) and kty in _KNOWN_KTY


def _optional_int(document: dict[str, Any], name: str, limit: int, trust_domain: TrustDomain) -> int | None:
    value = document.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BundleError(f"{name} of {trust_domain.name} must be a non-negative integer", value)
    if value > limit:
        raise BundleError(f"{name} of {trust_domain.name} must be at most {limit}", value)
    return value


def _authority_key(certificate: x509.Certificate, trust_domain: TrustDomain) -> object:
    """The public key of an X.509 authority; cryptography parses it only when asked."""
    try:
        return certificate.public_key()
    except (ValueError, UnsupportedAlgorithm) as err:
        raise BundleError(f"X.509 authority public key is unreadable ({err})", trust_domain.name) from err


def _key_type(key: object) -> str:
    """The JWK ``kty`` of a certificate's public key ("" for a key type JWK has no name for)."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "EC"
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return "OKP"
    return ""


def _x5c_certificate(index: int, entry: dict[str, Any], trust_domain: TrustDomain) -> x509.Certificate | None:
    """The first ``x5c`` certificate of an x509-svid entry; entries with no ``x5c`` are ignored."""
    chain = entry.get("x5c")
    if not chain:
        return None
    if not isinstance(chain, list) or not isinstance(chain[0], str):
        raise BundleError(f"x509-svid entry {index} of {trust_domain.name}: x5c must be an array of strings", chain)
    try:
        certificate = x509.load_der_x509_certificate(base64.b64decode(chain[0], validate=True))
    except CERTIFICATE_PARSE_ERRORS as err:  # binascii.Error is a ValueError
        raise BundleError(
            f"x509-svid entry {index} of {trust_domain.name}: could not parse x5c certificate ({err})", chain[0]
        ) from err
    # As go-spiffe (go-jose) does, refuse an entry whose kty says another key than the certificate's.
    key = _authority_key(certificate, trust_domain)
    kty = _key_type(key)
    if entry["kty"] != kty:
        raise BundleError(
            f"x509-svid entry {index} of {trust_domain.name}: key type (kty) does not match the x5c "
            f"certificate's key ({kty or type(key).__name__})",
            entry["kty"],
        )
    return certificate


def _add_jwt_authority(
    authorities: dict[str, JWTPublicKey], kids: set[str], index: int, entry: dict[str, Any], trust_domain: TrustDomain
) -> None:
    """Add the key of a jwt-svid entry to ``authorities``, or skip a key no JWT-SVID algorithm can use.

    ``kids`` collects every key ID seen, skipped keys included, so a repeated key ID is an error
    whichever of its entries is usable.
    """
    where = f"jwt-svid entry {index} of {trust_domain.name}"
    kid = entry.get("kid")
    if not isinstance(kid, str) or not kid:
        raise BundleError(f"{where}: key ID (kid) must be set")
    if kid in kids:
        raise BundleError(f"{where}: duplicate key ID", kid)
    kids.add(kid)
    kty = entry.get("kty")
    if kty not in _JWT_ALGORITHMS:
        return  # OKP: no JWT-SVID algorithm
    curve = entry.get("crv")
    if kty == "EC" and isinstance(curve, str) and curve not in _JWT_CURVES:
        return  # secp256k1 and other curves: no JWT-SVID algorithm (a curve that is no string is malformed)
    algorithm = entry.get("alg")
    if algorithm is not None and (not isinstance(algorithm, str) or algorithm not in _JWT_ALGORITHMS[kty]):
        raise BundleError(f"{where}: algorithm (alg) must be a JWT-SVID algorithm for key type {kty}", algorithm)
    try:
        key = jwt.PyJWK(entry).key
    except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError) as err:
        raise BundleError(f"{where}: could not parse key ({err})", kid) from err
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise BundleError(f"{where}: key must be a public key", kid)
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_JWT_RSA_BITS:
        return  # too short for the JWT-SVID RSA algorithms
    authorities[kid] = key


def _jwk(key: object) -> dict[str, Any]:
    """A public key as JWK members (``kty`` and the key's parameters)."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        try:
            return jwt.algorithms.ECAlgorithm.to_jwk(key, as_dict=True)
        except jwt.InvalidKeyError as err:  # a curve JWK has no name for, such as P-224
            raise BundleError("cannot express this public key as a JWK", f"EC key on {key.curve.name}") from err
    if isinstance(key, rsa.RSAPublicKey):
        return jwt.algorithms.RSAAlgorithm.to_jwk(key, as_dict=True)
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return jwt.algorithms.OKPAlgorithm.to_jwk(key, as_dict=True)
    raise BundleError("cannot express this public key as a JWK", type(key).__name__)
