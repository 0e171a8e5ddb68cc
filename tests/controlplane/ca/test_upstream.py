"""An upstream CA read from disk: every way its files can be wrong has its own message."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from controlplane.ca.errors import CAConfigError, CAError
from controlplane.ca.keys import dump_private_key_pem
from controlplane.ca.upstream import Upstream
from spiffecore.der import dump_pem_certificates
from tests.controlplane.ca.conftest import T0
from tests.support.ca import CA_KEY_USAGE, TestCA

H = timedelta(hours=1)


@pytest.fixture(scope="module")
def root() -> TestCA:
    return TestCA.create("example.org", not_before=T0 - H, not_after=T0 + 100 * H)


@pytest.fixture(scope="module")
def mid(root: TestCA) -> TestCA:
    return root.intermediate(not_before=T0 - H, not_after=T0 + 50 * H)


def _pem(*certs: x509.Certificate) -> bytes:
    return dump_pem_certificates(certs)


def _write(tmp_path: Path, certs: bytes, key: bytes) -> tuple[Path, Path]:
    cert_path, key_path = tmp_path / "upstream.crt", tmp_path / "upstream.key"
    cert_path.write_bytes(certs)
    key_path.write_bytes(key)
    return cert_path, key_path


def _load(paths: tuple[Path, Path], *, now: datetime = T0, ca_ttl: timedelta = 24 * H) -> Upstream:
    return Upstream.load(*paths, now=now, ca_ttl=ca_ttl)


def test_loads_a_chain_up_to_the_root(tmp_path: Path, root: TestCA, mid: TestCA) -> None:
    upstream = _load(_write(tmp_path, _pem(mid.cert, root.cert), dump_private_key_pem(mid.key)))  # type: ignore[arg-type]
    assert upstream.chain == (mid.cert, root.cert)
    assert upstream.certificate == mid.cert
    assert upstream.not_after == T0 + 50 * H
    assert upstream.source == str(tmp_path / "upstream.crt")


def test_loads_a_root_alone(tmp_path: Path, root: TestCA) -> None:
    upstream = _load(_write(tmp_path, _pem(root.cert), dump_private_key_pem(root.key)))  # type: ignore[arg-type]
    assert upstream.chain == (root.cert,)


def _path_length_zero(root: TestCA) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "no intermediates below")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(T0 - H)
        .not_valid_after(T0 + 50 * H)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .sign(root.key, hashes.SHA256())
    )
    return cert, key


Case = Callable[[Path, TestCA, TestCA], tuple[tuple[Path, Path], str]]


def _missing_cert(tmp: Path, root: TestCA, mid: TestCA) -> tuple[tuple[Path, Path], str]:
    paths = (tmp / "nope.crt", _write(tmp, b"", dump_private_key_pem(mid.key))[1])  # type: ignore[arg-type]
    return paths, f'ca: could not read upstream CA file (No such file or directory): "{tmp}/nope.crt"'


def _garbage_cert(tmp: Path, root: TestCA, mid: TestCA) -> tuple[tuple[Path, Path], str]:
    paths = _write(tmp, b"garbage", dump_private_key_pem(mid.key))  # type: ignore[arg-type]
    return paths, f'ca: could not parse upstream certificate file as PEM certificates: "{tmp}/upstream.crt"'


def _garbage_key(tmp: Path, root: TestCA, mid: TestCA) -> tuple[tuple[Path, Path], str]:
    paths = _write(tmp, _pem(mid.cert, root.cert), b"garbage")
    return paths, f'ca: could not parse private key as unencrypted PEM: "{tmp}/upstream.key"'


def _wrong_key(tmp: Path, root: TestCA, mid: TestCA) -> tuple[tuple[Path, Path], str]:
    paths = _write(tmp, _pem(mid.cert, root.cert), dump_private_key_pem(root.key))  # type: ignore[arg-type]
    return paths, (
        "ca: upstream private key does not match the upstream certificate (the first in its file):"
        f' "{tmp}/upstream.crt"'
    )


def _leaf(tmp: Path, root: TestCA, mid: TestCA) -> tuple[tuple[Path, Path], str]:
    minted = root.mint()
    paths = _write(tmp, _pem(minted.leaf, root.cert), dump_private_key_pem(minted.key))  # type: ignore[arg-type]
    return paths, (
        "ca: upstream certificate cannot sign CA certificates (signing certificate must have CA flag set to true;"
        f' certificate 1 in the file): "{tmp}/upstream.crt"'
    )


def _path_length(tmp: Path, root: TestCA, mid: TestCA) -> tuple[tuple[Path, Path], str]:
    cert, key = _path_length_zero(root)
    paths = _write(tmp, _pem(cert, root.cert), dump_private_key_pem(key))
    return paths, (
        "ca: upstream certificate has path length constraint 0, so it cannot sign an intermediate CA:"
        f' "{tmp}/upstream.crt"'
    )


def _not_a_chain(tmp: Path, root: TestCA, mid: TestCA) -> tuple[tuple[Path, Path], str]:
    stranger = TestCA.create("example.org")
    paths = _write(tmp, _pem(mid.cert, stranger.cert), dump_private_key_pem(mid.key))  # type: ignore[arg-type]
    return paths, (
        "ca: upstream certificate file is not a chain: a certificate is not signed by the one after it"
        f' (certificate 1 by certificate 2): "{tmp}/upstream.crt"'
    )


def _no_root(tmp: Path, root: TestCA, mid: TestCA) -> tuple[tuple[Path, Path], str]:
    paths = _write(tmp, _pem(mid.cert), dump_private_key_pem(mid.key))  # type: ignore[arg-type]
    return (
        paths,
        f'ca: upstream certificate file must end with the self-signed root of the upstream chain: "{tmp}/upstream.crt"',
    )


@pytest.mark.parametrize(
    "case",
    [_missing_cert, _garbage_cert, _garbage_key, _wrong_key, _leaf, _path_length, _not_a_chain, _no_root],
)
def test_bad_upstream_files(tmp_path: Path, root: TestCA, mid: TestCA, case: Case) -> None:
    paths, message = case(tmp_path, root, mid)
    with pytest.raises(CAError) as info:
        _load(paths)
    assert str(info.value) == message


def test_unreadable_key_file(tmp_path: Path, root: TestCA, mid: TestCA) -> None:
    cert_path, _ = _write(tmp_path, _pem(mid.cert, root.cert), b"")
    with pytest.raises(CAError) as info:
        _load((cert_path, tmp_path))  # a directory
    assert str(info.value) == f'ca: could not read upstream CA file (Is a directory): "{tmp_path}"'


def test_expired_and_not_yet_valid(tmp_path: Path, root: TestCA, mid: TestCA) -> None:
    paths = _write(tmp_path, _pem(mid.cert, root.cert), dump_private_key_pem(mid.key))  # type: ignore[arg-type]
    describe = f"subject={mid.cert.subject.rfc4514_string()!r} serial={mid.cert.serial_number:x}"
    with pytest.raises(CAError) as info:
        _load(paths, now=T0 + 50 * H)
    assert str(info.value) == (
        f'ca: upstream certificate has expired (at {(T0 + 50 * H).isoformat()}; {describe}): "{paths[0]}"'
    )
    with pytest.raises(CAError) as info:
        _load(paths, now=T0 - 2 * H)
    assert str(info.value) == (
        f'ca: upstream certificate is not valid yet (until {(T0 - H).isoformat()}; {describe}): "{paths[0]}"'
    )


def test_a_ca_ttl_beyond_the_upstreams_life_is_a_config_error(tmp_path: Path, root: TestCA, mid: TestCA) -> None:
    paths = _write(tmp_path, _pem(mid.cert, root.cert), dump_private_key_pem(mid.key))  # type: ignore[arg-type]
    _load(paths, now=T0 + 26 * H, ca_ttl=24 * H)  # ends exactly when the upstream does: fine
    with pytest.raises(CAConfigError) as info:
        _load(paths, now=T0 + 26 * H + timedelta(seconds=1), ca_ttl=24 * H)
    assert str(info.value) == (
        "ca: ca_ttl 24h outlives the upstream chain: an authority created now would expire at"
        " 2030-01-03T02:00:01+00:00, the upstream chain at 2030-01-03T02:00:00+00:00 (in 23h59m59s);"
        f' renew the upstream CA or lower ca_ttl: "{paths[0]}"'
    )
