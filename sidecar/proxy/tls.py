"""TLS for the proxy: pyOpenSSL (OpenSSL 4) contexts that follow an X.509 source.

Why pyOpenSSL and not the stdlib ``ssl``: measured on this machine (``bench/proxy_relay.py
--handshakes``), a full mTLS handshake, both sides in one process, costs ~1.1 ms of CPU with
OpenSSL 4.0.3 against ~1.5 ms with the system OpenSSL 3.0 behind ``ssl``; and pyOpenSSL has a
verify callback, so a peer that is not allowed is refused inside the handshake, with an alert.

The TLS engine runs on memory BIOs (:meth:`ProxyTLS.connection`) and the relay moves its records
over plain asyncio transports: the loop's own TLS transport is never used, so uvloop 0.23's
loss of data on TLS streams (ARCHITECTURE.md section 5) cannot happen here, and the same code
runs on every loop.

Verification, in the callback. OpenSSL first checks the chain against the roots of every trust
domain in the bundle set (a cheap filter that refuses strangers, expired and not-yet-valid
certificates with the matching alert); then, at the leaf, :func:`spiffecore.verify_x509_svid`
re-verifies the chain against the bundle of the leaf's own trust domain only, with the SPIFFE
leaf rules and a :class:`spiffecore.VerificationCache`, and the authorizer decides. The outcome
and the reason of a refusal are kept on the connection's :class:`PeerCheck`.

Contexts: TLS 1.2 and 1.3 only, AEAD suites with forward secrecy only (TLS 1.3's are all AEAD),
no compression, no renegotiation, no session tickets or session cache (a resumed session would
skip the verify callback; tickets can come later, with verification of the resumed peer).

Rotation: each new connection takes the context of the source's current SVID and bundles; when
either object changes a new context is built (once) and replaces the old one. Connections made
earlier keep theirs, untouched. A new policy (``--policy`` reloaded) is the same: assigning
:attr:`ProxyTLS.authorizer` is one reference swap, the next connection gets a context whose
verify callback holds the new authorizer, and a connection made earlier, mid-handshake or
relaying, keeps judging its peer by the rules it started with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from sidecar.workload.source import X509SourceProtocol
from spiffecore import (
    X509SVID,
    AuthorizationError,
    Authorizer,
    BundleSet,
    TLSConfigError,
    VerificationCache,
    VerificationError,
    VerifiedX509SVID,
    verify_x509_svid,
)

ffi: Final[Any] = _ffi
lib: Final[Any] = _lib
"""pyOpenSSL's cffi binding (cryptography's OpenSSL 4). The relay calls ``SSL_read``,
``SSL_write``, ``BIO_read`` and ``BIO_write`` through it on its own buffers: pyOpenSSL's
``recv``/``send``/``bio_read``/``bio_write`` allocate a buffer or object and copy each record (or
read) once more; going around them took the proxy from ~1.6 to ~0.75 CPU-s/GiB encrypting and,
with the TLS side's reads into a reused buffer, from ~1.45 to ~0.8 decrypting (uvloop).
``tests/sidecar/proxy/test_relay_bytes.py`` checks that these private names still exist."""

TLS12_CIPHERS: Final = b"ECDHE+AESGCM:ECDHE+CHACHA20"
VERIFY_MODE: Final = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
SSL_MODE_NO_AUTO_CHAIN: Final = 0x00000008
"""OpenSSL's ``SSL_MODE_NO_AUTO_CHAIN`` (ssl.h; pyOpenSSL does not name it)."""
NO_CERTIFICATE: Final = "peer presented no certificate"

# The X509_V_ERR_* codes a peer most often trips over, in OpenSSL's words.
_X509_ERRORS: Final = {
    2: "unable to get issuer certificate",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate (no bundle holds its authority)",
    21: "unable to verify the first certificate",
    24: "invalid CA certificate",
    26: "unsupported certificate purpose",
}


def x509_error(code: int) -> str:
    return _X509_ERRORS.get(code, f"certificate verify error {code}")


@dataclass(slots=True)
class PeerCheck:
    """What the verify callback found out about one connection's peer."""

    verified: VerifiedX509SVID | None = None
    error: str | None = None
    chain: dict[int, crypto.X509] = field(default_factory=dict)

    def reason(self) -> str:
        return self.error or NO_CERTIFICATE


class _Snapshot:
    """One SVID and bundle set, and the OpenSSL context built from them."""

    __slots__ = ("authorizer", "bundles", "cache", "context", "svid")

    def __init__(
        self,
        svid: X509SVID,
        bundles: BundleSet,
        authorizer: Authorizer,
        cache: VerificationCache | None,
        *,
        server_side: bool,
    ) -> None:
        self.svid = svid
        self.bundles = bundles
        self.authorizer = authorizer
        self.cache = cache
        self.context = build_context(svid, bundles, self._verify, server_side=server_side)

    def _verify(self, conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
        check: PeerCheck = conn.get_app_data()
        if not ok:
            if check.error is None:
                check.error = f"x509: {x509_error(errno)}"
            return False
        check.chain[depth] = cert
        if depth != 0:
            return True
        chain = tuple(check.chain[d].to_cryptography() for d in sorted(check.chain))
        try:
            verified = verify_x509_svid(chain, self.bundles, at=datetime.now(UTC), cache=self.cache)
            self.authorizer(verified.id)
        except (VerificationError, AuthorizationError) as err:
            check.error = str(err)
            return False
        check.verified = verified
        return True


def build_context(
    svid: X509SVID,
    bundles: BundleSet,
    verify: SSL._VerifyCallback,
    *,
    server_side: bool,
) -> SSL.Context:
    """An OpenSSL context presenting ``svid``, trusting ``bundles``' roots, verifying with ``verify``."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_cipher_list(TLS12_CIPHERS)
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_TICKET)
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    # The SVID's chain is exactly what to send. Without this, OpenSSL builds a chain for a leaf with
    # no intermediates from the trust store on every handshake, verifying our own signature each
    # time: ~0.13 ms of a ~0.8 ms server handshake (bench/proxy.py).
    context.set_mode(SSL_MODE_NO_AUTO_CHAIN)
    try:
        context.use_certificate(svid.cert_chain[0])
        for cert in svid.cert_chain[1:]:
            context.add_extra_chain_cert(cert)
        context.use_privatekey(svid.private_key)
        context.check_privatekey()
    except SSL.Error as err:
        raise TLSConfigError(f"could not load the SVID into the TLS context ({err})", str(svid.id)) from err
    store = context.get_cert_store()
    assert store is not None
    store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
    roots = [root for td in bundles for root in bundles.x509_bundle_for(td).authorities]
    if not roots:
        raise TLSConfigError("the bundle set has no X.509 authorities; no peer could be verified")
    for root in roots:
        store.add_cert(crypto.X509.from_cryptography(root))
    context.set_verify(VERIFY_MODE, verify)
    return context


class ProxyTLS:
    """Hands out TLS connections (memory BIO) for one side of the proxy, always from the newest identity.

    ``server_side`` accepts handshakes; otherwise it initiates them. ``authorizer`` decides which
    peer IDs are allowed, on both sides; assign a new one to change the rules for new connections.
    """

    def __init__(
        self,
        source: X509SourceProtocol,
        authorizer: Authorizer,
        *,
        server_side: bool,
        cache: VerificationCache | None = None,
    ) -> None:
        self.source = source
        self.authorizer = authorizer
        self.server_side = server_side
        self.cache = cache if cache is not None else VerificationCache()
        self._snapshot: _Snapshot | None = None
        self.rotations = 0
        """How many times a new context was built for a changed SVID or bundle set."""

    def current(self) -> _Snapshot:
        """The context for the source's current SVID and bundles and the current authorizer, built
        again only if one of them changed."""
        svid = self.source.svid()
        bundles = self.source.bundles
        authorizer = self.authorizer
        old = self._snapshot
        rotated = old is not None and (old.svid is not svid or old.bundles is not bundles)
        if old is not None and not rotated and old.authorizer is authorizer:
            return old
        snapshot = _Snapshot(svid, bundles, authorizer, self.cache, server_side=self.server_side)
        if rotated:
            self.rotations += 1
        self._snapshot = snapshot
        return snapshot

    @property
    def svid(self) -> X509SVID:
        """The SVID new connections present."""
        return self.current().svid

    def connection(self) -> tuple[SSL.Connection, PeerCheck]:
        """A new memory-BIO connection in the right state, and the record of its peer check."""
        conn = SSL.Connection(self.current().context, None)
        check = PeerCheck()
        conn.set_app_data(check)
        if self.server_side:
            conn.set_accept_state()
        else:
            conn.set_connect_state()
        return conn, check
