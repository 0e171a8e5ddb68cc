"""Helpers of the federation tests: a foreign trust domain with its bundle endpoint, and a raw HTTPS responder.

:class:`ForeignDomain` is a trust domain made with :class:`TestCA` whose bundle endpoint is our real
:class:`BundleEndpoint` serving its bundle with a server SVID (``spiffe://<td>/spire/server``);
what it serves and the SVID it presents can be changed while it runs. :class:`RawHTTPS` is a
peer that misbehaves on purpose: it answers every connection with fixed bytes over TLS, after an
optional delay, in a thread, so that blocking fetches can be tested against it.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from controlplane.federation.endpoint import BundleDocument, BundleEndpoint, SVIDCredentials
from controlplane.federation.relationship import BundleEndpointProfile, FederationRelationship
from spiffecore import SpiffeBundle, SpiffeID
from spiffecore.der import dump_pem_certificates
from spiffecore.tls import private_pem_file
from tests.support.ca import Minted, TestCA


def key_pem(minted: Minted) -> bytes:
    return minted.key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


class RecordingMetrics:
    """Collects what the endpoint and the poller report."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.fetches: list[str] = []

    def bundle_endpoint_request(self, result: str) -> None:
        self.requests.append(result)

    def federation_fetch(self, result: str) -> None:
        self.fetches.append(result)


@dataclass
class ForeignDomain:
    """A trust domain (``ca``) with the bundle its endpoint serves and the SVID the endpoint presents."""

    ca: TestCA
    bundle: SpiffeBundle | None = None
    svid: Minted | None = None
    metrics: RecordingMetrics = field(default_factory=RecordingMetrics)
    endpoint: BundleEndpoint | None = None
    _presented: tuple[tuple[x509.Certificate, ...], bytes] | None = None

    @classmethod
    def create(cls, name: str = "other.org") -> ForeignDomain:
        ca = TestCA.create(name)
        return cls(ca=ca, bundle=ca.bundle(sequence=1), svid=ca.mint("/spire/server"))

    @property
    def endpoint_id(self) -> SpiffeID:
        return SpiffeID.from_segments(self.ca.trust_domain, "spire", "server")

    def present(self, svid: Minted) -> None:
        """Serve with ``svid`` from the next handshake on."""
        self.svid = svid

    def _current(self) -> tuple[tuple[x509.Certificate, ...], bytes]:
        assert self.svid is not None
        if self._presented is None or self._presented[0] != self.svid.chain:
            self._presented = (self.svid.chain, key_pem(self.svid))
        return self._presented

    async def start(self, *, timeout: float = 10.0, max_connections: int = 256) -> BundleEndpoint:
        self.endpoint = BundleEndpoint(
            host="127.0.0.1",
            port=0,
            credentials=SVIDCredentials(self._current),
            document=BundleDocument(lambda: self.bundle, refresh_hint=300),
            metrics=self.metrics,
            timeout=timeout,
            max_connections=max_connections,
        )
        await self.endpoint.start()
        return self.endpoint

    @property
    def url(self) -> str:
        assert self.endpoint is not None
        return f"https://127.0.0.1:{self.endpoint.port}/"

    def relationship(self, url: str | None = None) -> FederationRelationship:
        return FederationRelationship(
            trust_domain=self.ca.trust_domain,
            bundle_endpoint_url=url or self.url,
            profile=BundleEndpointProfile.HTTPS_SPIFFE,
            endpoint_spiffe_id=self.endpoint_id,
        )


def write_pem(path: Path, certificates: Sequence[x509.Certificate]) -> Path:
    path.write_bytes(dump_pem_certificates(certificates))
    return path


class RawHTTPS:
    """Answers each TLS connection with ``response`` (after ``delay`` seconds), then closes it."""

    def __init__(self, chain: Sequence[x509.Certificate], key: bytes, response: bytes, *, delay: float = 0.0) -> None:
        self.response = response
        self.delay = delay
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with private_pem_file(dump_pem_certificates(chain) + key) as path:
            self._context.load_cert_chain(path)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> RawHTTPS:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            with contextlib.suppress(OSError), self._context.wrap_socket(sock, server_side=True) as tls:
                tls.settimeout(5)
                tls.recv(65536)
                deadline = time.monotonic() + self.delay
                while time.monotonic() < deadline and not self._stop.is_set():
                    time.sleep(0.05)
                tls.sendall(self.response)
