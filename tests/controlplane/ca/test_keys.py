"""Key types, PEM load and dump, and the atomic 0600 writes that persist keys."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    NoEncryption,
    PrivateFormat,
)

from controlplane.ca.errors import CAConfigError, CAError
from controlplane.ca.keys import (
    KeyType,
    SigningKey,
    dump_private_key_pem,
    key_type_of,
    load_private_key_pem,
    save_private_key,
    signature_hash,
)

WEAK_RSA = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 -- weak on purpose
UNSUPPORTED = (
    'ca: private key type is not supported (want EC P-256, P-384, P-521 or RSA of 2048 bits or more): "/x/ca.key"'
)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """A umask that would leave new files world-writable: modes must not depend on it."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_key_types_are_spires_names_with_ec_p256_first() -> None:
    assert [k.value for k in KeyType] == ["ec-p256", "ec-p384", "rsa-2048"]
    assert KeyType.parse("rsa-2048") is KeyType.RSA_2048


def test_key_type_parse_lists_the_choices() -> None:
    with pytest.raises(CAConfigError) as info:
        KeyType.parse("rsa-4096")
    assert str(info.value) == 'ca: key type must be one of ec-p256, ec-p384, rsa-2048: "rsa-4096"'


@pytest.mark.parametrize(
    ("key_type", "algorithm", "digest"),
    [
        (KeyType.EC_P256, "ES256", hashes.SHA256),
        (KeyType.EC_P384, "ES384", hashes.SHA384),
        (KeyType.RSA_2048, "RS256", hashes.SHA256),
    ],
)
def test_generated_keys_have_their_type(
    keys: dict[KeyType, SigningKey], key_type: KeyType, algorithm: str, digest: type[hashes.HashAlgorithm]
) -> None:
    key = keys[key_type]
    assert key_type_of(key) is key_type
    assert key_type_of(key.public_key()) is key_type
    assert key_type.jwt_algorithm == algorithm
    assert isinstance(signature_hash(key), digest)


def test_keys_the_ca_does_not_create_have_no_type() -> None:
    assert key_type_of(ec.generate_private_key(ec.SECP521R1())) is None
    assert isinstance(signature_hash(ec.generate_private_key(ec.SECP521R1())), hashes.SHA512)


@pytest.mark.parametrize("key_type", list(KeyType))
def test_pem_round_trip_is_pkcs8(keys: dict[KeyType, SigningKey], key_type: KeyType) -> None:
    pem = dump_private_key_pem(keys[key_type])
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    loaded = load_private_key_pem(pem, source="ca.key")
    assert loaded.public_key() == keys[key_type].public_key()


def test_load_accepts_sec1_and_p521_as_upstream_cas_may_have_them() -> None:
    key = ec.generate_private_key(ec.SECP521R1())
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.TraditionalOpenSSL, NoEncryption())
    assert pem.startswith(b"-----BEGIN EC PRIVATE KEY-----")
    assert load_private_key_pem(pem, source="up.key").public_key() == key.public_key()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", 'ca: could not parse private key as unencrypted PEM: "/x/ca.key"'),
        (b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n", None),
        (
            ed25519.Ed25519PrivateKey.generate().private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
            UNSUPPORTED,
        ),
        (
            WEAK_RSA.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
            UNSUPPORTED,
        ),
        (
            ec.generate_private_key(ec.SECP256R1()).private_bytes(
                Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(b"secret")
            ),
            'ca: private key is encrypted (want an unencrypted key): "/x/ca.key"',
        ),
    ],
)
def test_load_errors_name_the_source_never_the_key(data: bytes, message: str | None) -> None:
    with pytest.raises(CAError) as info:
        load_private_key_pem(data, source="/x/ca.key")
    expected = message or 'ca: could not parse private key as unencrypted PEM: "/x/ca.key"'
    assert str(info.value) == expected


# --- persisting ------------------------------------------------------------------------------------


@pytest.mark.usefixtures("loose_umask")
def test_save_private_key_writes_pkcs8_with_mode_0600(tmp_path: Path, keys: dict[KeyType, SigningKey]) -> None:
    path = tmp_path / "ca.key.pem"
    save_private_key(path, keys[KeyType.EC_P256])
    assert _mode(path) == 0o600
    assert path.read_bytes() == dump_private_key_pem(keys[KeyType.EC_P256])
    assert [p.name for p in tmp_path.iterdir()] == ["ca.key.pem"]  # no temporary file left


@pytest.mark.usefixtures("loose_umask")
def test_save_private_key_tightens_a_file_that_was_world_readable(
    tmp_path: Path, keys: dict[KeyType, SigningKey]
) -> None:
    path = tmp_path / "ca.key.pem"
    path.write_bytes(b"old")
    path.chmod(0o666)
    save_private_key(path, keys[KeyType.EC_P384])
    assert _mode(path) == 0o600
    assert load_private_key_pem(path.read_bytes(), source=str(path)).public_key() == keys[KeyType.EC_P384].public_key()
