"""The CA's key types and private keys: generation, PEM (PKCS#8) load and dump, and saving them 0600.

``ec-p256`` is the default, as in SPIRE; ``ec-p384`` and ``rsa-2048`` are selectable. The same
types serve JWT signing keys, as ES256, ES384 and RS256.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Final, TypeAlias

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from controlplane.ca.errors import CAConfigError, CAError
from spiffeops.lifecycle import write_atomically

SigningKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey: TypeAlias = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

RSA_BITS: Final = 2048
RSA_EXPONENT: Final = 65537


class KeyType(enum.StrEnum):
    """A key type the CA creates keys of, named as in SPIRE's ``ca_key_type``."""

    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"

    @classmethod
    def parse(cls, text: str) -> KeyType:
        """The key type named ``text`` (from configuration), or :class:`CAConfigError`."""
        try:
            return cls(text)
        except ValueError:
            choices = ", ".join(member.value for member in cls)
            raise CAConfigError(f"key type must be one of {choices}", text) from None

    @property
    def jwt_algorithm(self) -> str:
        """The JWS algorithm a JWT signing key of this type signs with."""
        return _JWT_ALGORITHMS[self]


_JWT_ALGORITHMS: Final = {KeyType.EC_P256: "ES256", KeyType.EC_P384: "ES384", KeyType.RSA_2048: "RS256"}

UNSUPPORTED_KEY: Final = "private key type is not supported (want EC P-256, P-384, P-521 or RSA of 2048 bits or more)"
BAD_KEY: Final = "could not parse private key as unencrypted PEM"
ENCRYPTED_KEY: Final = "private key is encrypted (want an unencrypted key)"


def generate_key(key_type: KeyType) -> SigningKey:
    """A new private key of ``key_type``."""
    if key_type is KeyType.EC_P256:
        return ec.generate_private_key(ec.SECP256R1())
    if key_type is KeyType.EC_P384:
        return ec.generate_private_key(ec.SECP384R1())
    return rsa.generate_private_key(public_exponent=RSA_EXPONENT, key_size=RSA_BITS)


def key_type_of(key: SigningKey | PublicKey) -> KeyType | None:
    """The :class:`KeyType` of a key, or ``None`` for a key the CA does not create (P-521, RSA-4096)."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return KeyType.EC_P256
        if isinstance(key.curve, ec.SECP384R1):
            return KeyType.EC_P384
        return None
    return KeyType.RSA_2048 if key.key_size == RSA_BITS else None


def signature_hash(key: SigningKey) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512:
    """The hash a key signs certificates with: matched to the curve's strength, SHA-256 for RSA."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.key_size > 384:
            return hashes.SHA512()
        if key.curve.key_size > 256:
            return hashes.SHA384()
    return hashes.SHA256()


def dump_private_key_pem(key: SigningKey) -> bytes:
    """The key as unencrypted PKCS#8 PEM. A secret: never log it, write it only with :func:`save_private_key`."""
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


def load_private_key_pem(data: bytes, *, source: str) -> SigningKey:
    """Parse an unencrypted PEM private key (PKCS#8, or SEC1/PKCS#1 as an upstream CA may have it).

    Accepts EC keys on P-256, P-384 or P-521 and RSA keys of 2048 bits or more. Errors name
    ``source`` (a file name), never the key.
    """
    try:
        key = load_pem_private_key(data, password=None)
    except TypeError as err:  # cryptography's way of saying "encrypted, and no password given"
        raise CAError(ENCRYPTED_KEY, source) from err
    except (ValueError, UnsupportedAlgorithm) as err:
        raise CAError(BAD_KEY, source) from err
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(
        key.curve, ec.SECP256R1 | ec.SECP384R1 | ec.SECP521R1
    ):
        return key
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size >= RSA_BITS:
        return key
    raise CAError(UNSUPPORTED_KEY, source)


def save_private_key(path: Path, key: SigningKey) -> None:
    """Persist ``key`` as PKCS#8 PEM at ``path``: atomically, mode 0600. The only way the CA writes a key."""
    write_atomically(path, dump_private_key_pem(key))


__all__ = [
    "KeyType",
    "PublicKey",
    "SigningKey",
    "dump_private_key_pem",
    "generate_key",
    "key_type_of",
    "load_private_key_pem",
    "save_private_key",
    "signature_hash",
]
