"""Standard-library TLS contexts for mutual TLS between SPIFFE workloads.

The stdlib ``ssl`` module has no per-handshake verify callback, so SPIFFE authentication is two
steps. During the handshake OpenSSL checks that the peer's chain leads to *some* root of the
bundle set (so a stranger is refused with a proper alert). Right after it, :func:`verify_peer`
re-verifies the chain the peer presented against the bundle of the peer's own trust domain only,
applies the SPIFFE leaf rules and then the authorizer. A connection must not carry data before
:func:`verify_peer` has returned.

Contexts allow TLS 1.2 and 1.3 only, and only AEAD cipher suites with forward secrecy.

Session resumption is off: a resumed session carries no peer certificate chain, so there would be
nothing for :func:`verify_peer` to verify. Servers issue no TLS 1.2 tickets (``OP_NO_TICKET``) and
no TLS 1.3 tickets (``num_tickets = 0``); every connection is a full handshake. Should a session be
resumed anyway, :func:`verify_peer` refuses it.

A bundle authority need not be self-signed: with ``VERIFY_X509_PARTIAL_CHAIN`` OpenSSL accepts a
path ending at any certificate of the bundle set (an intermediate used as a root, as go-spiffe
accepts), like the verifier of :mod:`spiffecore.verify` does.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Final

from cryptography import x509

from spiffecore.authorize import Authorizer
from spiffecore.bundle import BundleSet, X509BundleSource
from spiffecore.der import CERTIFICATE_PARSE_ERRORS, dump_pem_certificates
from spiffecore.errors import TLSConfigError, VerificationError
from spiffecore.verify import VerificationCache, VerifiedX509SVID, verify_x509_svid
from spiffecore.x509svid import X509SVID

TLS12_CIPHERS: Final = "ECDHE+AESGCM:ECDHE+CHACHA20"
_DER: Final = 2  # ssl's ENCODING_DER, for the certificates of the pre-3.13 private chain API
HAVE_MEMFD: Final = hasattr(os, "memfd_create") and Path("/proc/self/fd").is_dir()
RESUMED_SESSION: Final = "resumed TLS session carries no peer certificate; session resumption must be disabled"


def server_context(svid: X509SVID, bundles: BundleSet) -> ssl.SSLContext:
    """A server context presenting ``svid``, requiring a client certificate, issuing no session tickets.

    Resumed sessions carry no peer chain for :func:`verify_peer`, so no tickets are sent: neither
    TLS 1.2 (``OP_NO_TICKET``) nor TLS 1.3 (``num_tickets``) ones.
    """
    context = _base_context(ssl.PROTOCOL_TLS_SERVER, svid, bundles)
    context.options |= ssl.OP_NO_TICKET
    context.num_tickets = 0
    return context


def client_context(svid: X509SVID | None, bundles: BundleSet) -> ssl.SSLContext:
    """A client context presenting ``svid`` (if any) and requiring the server's certificate.

    Host names are not checked: SPIFFE authenticates by ID, with :func:`verify_peer`.
    """
    return _base_context(ssl.PROTOCOL_TLS_CLIENT, svid, bundles)


def _base_context(protocol: ssl._SSLMethod, svid: X509SVID | None, bundles: BundleSet) -> ssl.SSLContext:
    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    # Trust anchors need not be self-signed: a bundle may hold an intermediate as its authority.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    roots = [root for td in bundles for root in bundles.x509_bundle_for(td).authorities]
    if not roots:
        raise TLSConfigError("the bundle set has no X.509 authorities; no peer could be verified")
    context.load_verify_locations(cadata=dump_pem_certificates(roots).decode("ascii"))
    if svid is not None:
        load_svid(context, svid)
    return context


def load_svid(context: ssl.SSLContext, svid: X509SVID) -> None:
    """Load ``svid``'s chain and key into ``context`` without the key touching a disk.

    ``SSLContext.load_cert_chain`` reads only files, so the key goes through an anonymous memory
    file (Linux ``memfd``); elsewhere through a 0600 file in a private directory, removed at once.
    """
    with private_pem_file(svid.cert_chain_pem() + svid.private_key_pem()) as path:
        try:
            context.load_cert_chain(path)
        except ssl.SSLError as err:
            raise TLSConfigError(f"could not load the SVID into the TLS context ({err.reason})", str(svid.id)) from err


@contextlib.contextmanager
def private_pem_file(data: bytes, *, use_memfd: bool = HAVE_MEMFD) -> Iterator[str]:
    """A path from which ``data`` can be read while the context is open, readable by this user only."""
    if use_memfd:
        fd = os.memfd_create("spiffe-svid", os.MFD_CLOEXEC)
        try:
            _write_all(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="spiffe-svid-") as directory:
        path = Path(directory) / "svid.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        yield str(path)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def peer_chain(connection: ssl.SSLObject | ssl.SSLSocket) -> tuple[x509.Certificate, ...]:
    """The certificate chain the peer presented, leaf first (empty if it sent none).

    Python 3.13 made ``get_unverified_chain`` public; 3.10 to 3.12 have it on the private
    ``_sslobj``, returning certificate objects instead of DER bytes. A certificate that
    cryptography cannot parse (OpenSSL is laxer, for instance about the version field) is a
    :class:`VerificationError`.
    """
    getter = getattr(connection, "get_unverified_chain", None)
    if getter is None:
        getter = connection._sslobj.get_unverified_chain  # type: ignore[union-attr]
    chain: list[x509.Certificate] = []
    for index, cert in enumerate(getter() or []):
        try:
            chain.append(x509.load_der_x509_certificate(cert if isinstance(cert, bytes) else cert.public_bytes(_DER)))
        except CERTIFICATE_PARSE_ERRORS as err:
            raise VerificationError(f"peer certificate {index} could not be parsed ({err})") from err
    return tuple(chain)


def verify_peer(
    connection: ssl.SSLObject | ssl.SSLSocket,
    bundles: X509BundleSource,
    authorizer: Authorizer,
    *,
    at: datetime,
    cache: VerificationCache | None = None,
) -> VerifiedX509SVID:
    """Authenticate and authorize the peer of a completed handshake.

    Raises :class:`VerificationError` or :class:`AuthorizationError`; close the connection then.
    A :class:`VerificationCache` spares a reconnecting peer the second round of signature checks.
    """
    chain = peer_chain(connection)
    if not chain and connection.session_reused:
        raise VerificationError(RESUMED_SESSION)
    if not chain:
        raise VerificationError("peer presented no certificate")
    verified = verify_x509_svid(chain, bundles, at=at, cache=cache)
    authorizer(verified.id)
    return verified
