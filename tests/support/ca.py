"""A small certificate authority for tests: mints roots, intermediates, SVIDs and JWT-SVIDs at runtime.

Every knob that an X509-SVID or JWT-SVID rule depends on can be turned, so tests can mint both
well-formed credentials and each kind of malformed one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from spiffecore import X509SVID, JWTPublicKey, PrivateKey, SpiffeBundle, TrustDomain, X509Bundle

KeyType = Literal["ec-p256", "ec-p384", "ec-p521", "rsa-2048", "ed25519"]
NOW = datetime.now(UTC).replace(microsecond=0)
HOUR = timedelta(hours=1)
SERVER_AND_CLIENT = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)


def new_key(key_type: KeyType = "ec-p256") -> PrivateKey:
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "ec-p521":
        return ec.generate_private_key(ec.SECP521R1())
    if key_type == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ed25519.Ed25519PrivateKey.generate()


def _hash_for(key: PrivateKey) -> hashes.HashAlgorithm | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def key_usage(
    *,
    digital_signature: bool = False,
    key_encipherment: bool = False,
    key_agreement: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


LEAF_KEY_USAGE = key_usage(digital_signature=True)
CA_KEY_USAGE = key_usage(key_cert_sign=True, crl_sign=True)


@dataclass(frozen=True)
class Minted:
    """A minted leaf: its chain (leaf first, without the root) and key. May be malformed on purpose."""

    chain: tuple[x509.Certificate, ...]
    key: PrivateKey

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    def svid(self, *, hint: str = "") -> X509SVID:
        return X509SVID.from_chain(self.chain, self.key, hint=hint)


@dataclass
class TestCA:
    """A CA of one trust domain, either a root or an intermediate below ``parent``."""

    __test__ = False  # not a pytest test class

    trust_domain: TrustDomain
    key: PrivateKey
    cert: x509.Certificate
    parent: TestCA | None = None
    jwt_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    jwt_kid: str = "jwt-key-1"

    @classmethod
    def create(
        cls,
        trust_domain: str = "example.org",
        *,
        key_type: KeyType = "ec-p256",
        not_before: datetime = NOW - HOUR,
        not_after: datetime = NOW + 24 * HOUR,
        uri: str | None = "",
        subject_key_id: bool = True,
    ) -> TestCA:
        """A self-signed root with URI SAN ``spiffe://<td>`` (``uri=None`` leaves the SAN out)."""
        td = TrustDomain.parse(trust_domain)
        key = new_key(key_type)
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"{trust_domain} root")])
        builder = _ca_builder(name, name, key.public_key(), not_before, not_after)
        if uri is not None:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri or td.id_string())]), critical=False
            )
        if subject_key_id:
            builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        cert = builder.sign(key, _hash_for(key))  # type: ignore[arg-type]
        return cls(trust_domain=td, key=key, cert=cert)

    def intermediate(
        self,
        *,
        key_type: KeyType = "ec-p256",
        not_before: datetime = NOW - HOUR,
        not_after: datetime = NOW + 12 * HOUR,
        usage: x509.KeyUsage = CA_KEY_USAGE,
    ) -> TestCA:
        key = new_key(key_type)
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"{self.trust_domain} intermediate")])
        builder = _ca_builder(name, self.cert.subject, key.public_key(), not_before, not_after, usage=usage)
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(self.trust_domain.id_string())]), critical=False
        )
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
            critical=False,
        )
        cert = builder.sign(self.key, _hash_for(self.key))  # type: ignore[arg-type]
        return TestCA(trust_domain=self.trust_domain, key=key, cert=cert, parent=self)

    @property
    def root(self) -> TestCA:
        return self if self.parent is None else self.parent.root

    def signing_chain(self) -> tuple[x509.Certificate, ...]:
        """This CA and its parents up to, not including, the root: what a leaf's chain carries."""
        if self.parent is None:
            return ()
        return (self.cert, *self.parent.signing_chain())

    def x509_bundle(self) -> X509Bundle:
        return X509Bundle(trust_domain=self.trust_domain, authorities=(self.root.cert,))

    def bundle(self, *, sequence: int | None = 1, refresh_hint: int | None = 300) -> SpiffeBundle:
        jwt_authorities: Mapping[str, JWTPublicKey] = {self.jwt_kid: self.jwt_key.public_key()}
        return SpiffeBundle.create(
            self.trust_domain,
            x509_authorities=(self.root.cert,),
            jwt_authorities=jwt_authorities,
            sequence=sequence,
            refresh_hint=refresh_hint,
        )

    def mint(
        self,
        path: str = "/workload",
        *,
        uris: Sequence[str] | None = None,
        dns_names: Sequence[str] = (),
        key: PrivateKey | None = None,
        key_type: KeyType = "ec-p256",
        not_before: datetime = NOW - HOUR,
        not_after: datetime = NOW + HOUR,
        is_ca: bool | None = False,
        usage: x509.KeyUsage | None = LEAF_KEY_USAGE,
        eku: Sequence[x509.ObjectIdentifier] | None = SERVER_AND_CLIENT,
        authority_key_id: bool = True,
        subject: str | None = None,
        signer: PrivateKey | None = None,
    ) -> Minted:
        """Mint a leaf; by default a well-formed X509-SVID ``spiffe://<td><path>``.

        ``uris`` replaces the URI SANs outright; ``is_ca=None`` leaves basic constraints out;
        ``usage=None`` and ``eku=None`` leave those extensions out; ``signer`` signs with another key.
        """
        leaf_key = key or new_key(key_type)
        uri_values = list(uris) if uris is not None else [self.trust_domain.id_string() + path]
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uri_values]
        names += [x509.DNSName(d) for d in dns_names]
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]) if subject else x509.Name([])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(self.cert.subject)
            .public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=not subject)
        if is_ca is not None:
            builder = builder.add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        if usage is not None:
            builder = builder.add_extension(usage, critical=True)
        if eku is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        if authority_key_id:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        signing_key = signer or self.key
        leaf = builder.sign(signing_key, _hash_for(signing_key))  # type: ignore[arg-type]
        return Minted(chain=(leaf, *self.signing_chain()), key=leaf_key)

    def mint_jwt(
        self,
        path: str = "/workload",
        *,
        audience: str | Sequence[str] = ("service-a",),
        expires_in: timedelta = timedelta(minutes=5),
        now: datetime = NOW,
        algorithm: str = "ES256",
        key: Any = None,
        kid: str | None = "",
        headers: Mapping[str, Any] | None = None,
        claims: Mapping[str, Any] | None = None,
        drop: Sequence[str] = (),
    ) -> str:
        """Mint a JWT-SVID signed by the CA's JWT key (or ``key``); ``drop`` removes claims."""
        payload: dict[str, Any] = {
            "sub": self.trust_domain.id_string() + path,
            "aud": list(audience) if not isinstance(audience, str) else audience,
            "exp": int((now + expires_in).timestamp()),
            "iat": int(now.timestamp()),
        }
        payload.update(claims or {})
        for name in drop:
            payload.pop(name, None)
        header: dict[str, Any] = {"typ": "JWT"}
        if kid is not None:
            header["kid"] = kid or self.jwt_kid
        header.update(headers or {})
        return jwt.encode(payload, key if key is not None else self.jwt_key, algorithm=algorithm, headers=header)


def _ca_builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: Any,
    not_before: datetime,
    not_after: datetime,
    *,
    usage: x509.KeyUsage = CA_KEY_USAGE,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(usage, critical=True)
    )


def compact(header: Mapping[str, Any], payload: Mapping[str, Any], signature: bytes = b"sig") -> str:
    """A hand-built compact JWS (for malformed-token tests); the signature is arbitrary."""
    return ".".join(
        jwt.utils.base64url_encode(part).decode()
        for part in (json.dumps(header).encode(), json.dumps(payload).encode(), signature)
    )
