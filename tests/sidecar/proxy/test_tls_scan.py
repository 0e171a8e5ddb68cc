"""A TLS scan of the real ``spiffe-proxy`` server port with ``sslscan`` (Debian's package, installed by
``make services``): TLS 1.2 and 1.3 only, AEAD ciphers with ECDHE only, no renegotiation, no
compression, not vulnerable to Heartbleed.

The scan presents a valid client SVID (``--certs``/``--pk``): the proxy requires a client
certificate, and without one sslscan cannot complete a TLS 1.2 handshake to enumerate its suites.
"""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from tests.sidecar.proxy.test_cli import Setup, Upstream, allow_client, setup, upstream, write_identity

__all__ = ["setup", "upstream"]  # the fixtures, re-exported for pytest

SSLSCAN = shutil.which("sslscan")

TLS13_SUITES = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}
TLS12_SUITES = {
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
}
AEAD = ("GCM", "CHACHA20", "CCM")


def scan(host: str, port: int, cert: Path, key: Path) -> ET.Element:
    assert SSLSCAN is not None, "sslscan is not installed: `make services` installs it (apt-get install -y sslscan)"
    result = subprocess.run(  # noqa: S603 - a fixed tool on our own port
        [SSLSCAN, "--no-colour", "--xml=-", f"--certs={cert}", f"--pk={key}", f"{host}:{port}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    document = result.stdout[result.stdout.index("<?xml") :]
    root = ET.fromstring(document)  # noqa: S314 - the output of a local tool scanning our own port
    test = root.find("ssltest")
    assert test is not None, document
    return test


def test_server_port_offers_tls12_and_13_with_aead_ecdhe_ciphers_only(
    setup: Setup, upstream: Upstream, tmp_path: Path
) -> None:
    proxy = setup.start(upstream.address, *allow_client(setup))
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    cert, key, _ = write_identity(client_dir, setup.ca, setup.ca.mint("/client"))
    test = scan(proxy.listen.host, proxy.listen.port, cert, key)

    protocols = {f"{p.get('type')}{p.get('version')}": p.get("enabled") for p in test.iter("protocol")}
    assert protocols == {"ssl2": "0", "ssl3": "0", "tls1.0": "0", "tls1.1": "0", "tls1.2": "1", "tls1.3": "1"}

    ciphers: dict[str, set[str]] = {}
    for cipher in test.iter("cipher"):
        assert cipher.get("status") in {"preferred", "accepted"}
        ciphers.setdefault(cipher.get("sslversion", ""), set()).add(cipher.get("cipher", ""))
    assert ciphers == {"TLSv1.3": TLS13_SUITES, "TLSv1.2": TLS12_SUITES}
    for name in ciphers["TLSv1.2"]:
        assert name.startswith("ECDHE-"), name
        assert any(mode in name for mode in AEAD), name
    for name in ciphers["TLSv1.3"]:
        assert any(mode in name for mode in AEAD), name

    [renegotiation] = test.iter("renegotiation")
    assert renegotiation.get("supported") == "0"
    for compression in test.iter("compression"):  # reported only when sslscan's OpenSSL has zlib
        assert compression.get("supported") == "0"
    heartbleed = list(test.iter("heartbleed"))
    assert heartbleed
    assert all(h.get("vulnerable") == "0" for h in heartbleed)
    assert proxy.stop() == 0
