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

The callback is ours, through cffi (:class:`VerifyingContext`), not pyOpenSSL's ``set_verify``:
pyOpenSSL's wrapper returns 0 without setting an X.509 error, which OpenSSL 3+ records as
"unspecified" and answers with an ``internal_error`` alert, so a refused peer would see what looks
like a bug in the server. Ours sets the error, and OpenSSL turns it into the alert:

- a chain OpenSSL itself refuses keeps OpenSSL's error: ``certificate_expired``, ``unknown_ca``,
  ``bad_certificate``, ... (and ``certificate_required`` in TLS 1.3, or ``handshake_failure`` in
  TLS 1.2, for no certificate at all);
- a leaf that breaks the X509-SVID rules, or a chain that does not verify against the bundle of
  its own trust domain: ``X509_V_ERR_CERT_REJECTED``, alert ``bad_certificate``;
- a verified SVID whose ID the authorizer (``--allow-*``, the policy file) refuses: also
  ``X509_V_ERR_CERT_REJECTED``, ``bad_certificate``. TLS's ``access_denied`` would be the exact
  word, but no X.509 error maps to it in OpenSSL; ``handshake_failure``
  (``X509_V_ERR_APPLICATION_VERIFICATION``) is what a client also sees when no cipher suite or
  version is shared, and would send its operator looking at the wrong thing. ``bad_certificate``
  points at the client's certificate, and is what Go's TLS (ghostunnel) sends when its
  ``VerifyPeerCertificate`` refuses. (Envoy 1.40 sends ``certificate_unknown`` for a certificate
  that fails its SAN match, which OpenSSL only sends for an X.509 error it has no alert for.)
  The reason itself is logged by the proxy, never sent.

An exception that escapes the callback (a bug) is logged; the callback then returns 0 with no
error set, so the peer gets ``internal_error``, which is then the truth, and the connection's
:class:`PeerCheck` says the callback failed.

Per connection the callback does little: nothing at the levels above the leaf, and at the leaf
the chain OpenSSL built is read as DER and looked up among the chains this context verified
before (the same trust bundles, so the same answer while every certificate in it is within its
validity period); only a new chain is parsed and verified in Python.

Contexts: TLS 1.2 and 1.3 only, AEAD suites with forward secrecy only (TLS 1.3's are all AEAD),
no compression, no renegotiation, no resumption: no stateless tickets and no session cache (a
resumed session would skip the verify callback; tickets can come later, with verification of the
resumed peer). OpenSSL still sends two stateful TLS 1.3 tickets per handshake, which nothing here
can redeem; only ``SSL_CTX_set_num_tickets`` turns them off, and the binding does not have it.

Rotation: each new connection takes the context of the source's current SVID and bundles; when
either object changes a new context is built (once) and replaces the old one. Connections made
earlier keep theirs, untouched. A new policy (``--policy`` reloaded) is the same: assigning
:attr:`ProxyTLS.authorizer` is one reference swap, the next connection gets a context whose
verify callback holds the new authorizer, and a connection made earlier, mid-handshake or
relaying, keeps judging its peer by the rules it started with.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final

from cryptography import x509
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

_log = logging.getLogger(__name__)

ffi: Final[Any] = _ffi
lib: Final[Any] = _lib
"""pyOpenSSL's cffi binding (cryptography's OpenSSL 4). The relay calls ``SSL_read``,
``SSL_write``, ``BIO_read`` and ``BIO_write`` through it on its own buffers: pyOpenSSL's
``recv``/``send``/``bio_read``/``bio_write`` allocate a buffer or object and copy each record (or
read) once more; going around them took the proxy from ~1.6 to ~0.75 CPU-s/GiB encrypting and,
with the TLS side's reads into a reused buffer, from ~1.45 to ~0.8 decrypting (uvloop).
The verify callback (:class:`VerifyingContext`) goes through it too, and through pyOpenSSL's
``Connection._reverse_mapping`` (the connection of an ``SSL *``) and ``Context._context``.
``tests/sidecar/proxy/test_relay_bytes.py`` checks that these private names still exist."""

TLS12_CIPHERS: Final = b"ECDHE+AESGCM:ECDHE+CHACHA20"
VERIFY_MODE: Final = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
SSL_MODE_NO_AUTO_CHAIN: Final = 0x00000008
"""OpenSSL's ``SSL_MODE_NO_AUTO_CHAIN`` (ssl.h; pyOpenSSL does not name it)."""
NO_CERTIFICATE: Final = "peer presented no certificate"
CALLBACK_FAILED: Final = "tls: the verify callback failed (a bug; logged)"
X509_V_ERR_CERT_REJECTED: Final[int] = lib.X509_V_ERR_CERT_REJECTED
"""The error a refusal of ours sets: OpenSSL answers it with a ``bad_certificate`` alert."""
KNOWN_CHAINS: Final = 1024
"""Chains one context remembers as verified (by their DER): a new context starts empty."""

RawVerify = Callable[[int, Any], int]
"""A verify callback as OpenSSL calls it: ``(preverify_ok, X509_STORE_CTX *) -> 1 or 0``."""

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
    leaf: crypto.X509 | None = None
    """The peer's leaf certificate, kept when the peer is refused (to log the ID it claims)."""

    def reason(self) -> str:
        return self.error or NO_CERTIFICATE


@dataclass(frozen=True, slots=True)
class _Known:
    """A chain this context verified, and when every certificate in it is valid (unix seconds)."""

    verified: VerifiedX509SVID
    not_before: float
    not_after: float


class _Snapshot:
    """One SVID and bundle set, and the OpenSSL context built from them."""

    __slots__ = ("authorizer", "bundles", "cache", "context", "known", "svid")

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
        self.known: dict[tuple[bytes, ...], _Known] = {}
        self.context = build_context(svid, bundles, self._verify, server_side=server_side)

    def _verify(self, ok: int, store: Any) -> int:
        """OpenSSL's verify callback: 1 to go on, 0 (with an X.509 error set) to refuse."""
        if ok and lib.X509_STORE_CTX_get_error_depth(store) != 0:
            return 1  # the leaf is the last certificate OpenSSL calls back for
        ssl = lib.X509_STORE_CTX_get_ex_data(store, _SSL_INDEX)
        check: PeerCheck = SSL.Connection._reverse_mapping[ssl].get_app_data()
        if not ok:  # OpenSSL refused the chain, with its own error and alert
            if check.error is None:
                check.error = f"x509: {x509_error(lib.X509_STORE_CTX_get_error(store))}"
            check.leaf = _leaf(store)
            return 0
        check.error = CALLBACK_FAILED  # stays if what follows raises (cffi then returns 0)
        try:
            verified = self._verified(store)
            self.authorizer(verified.id)
        except (VerificationError, AuthorizationError) as err:
            check.error = str(err)
            check.leaf = _leaf(store)
            lib.X509_STORE_CTX_set_error(store, X509_V_ERR_CERT_REJECTED)
            return 0
        check.error = None
        check.verified = verified
        return 1

    def _verified(self, store: Any) -> VerifiedX509SVID:
        """The chain OpenSSL built, verified by the SPIFFE rules: remembered, or verified now."""
        chain = _chain_der(store)
        known = self.known.get(chain)
        now = time.time()
        if known is not None and known.not_before <= now <= known.not_after:
            return known.verified
        certs = tuple(x509.load_der_x509_certificate(der) for der in chain)
        verified = verify_x509_svid(certs, self.bundles, at=datetime.fromtimestamp(now, UTC), cache=self.cache)
        if len(self.known) >= KNOWN_CHAINS:
            del self.known[next(iter(self.known))]  # the oldest
        self.known[chain] = _Known(
            verified,
            max(cert.not_valid_before_utc for cert in verified.chain).timestamp(),
            min(cert.not_valid_after_utc for cert in verified.chain).timestamp(),
        )
        return verified


_SSL_INDEX: Final[int] = lib.SSL_get_ex_data_X509_STORE_CTX_idx()
"""Where an ``X509_STORE_CTX`` made by libssl keeps its ``SSL *`` (created once per process)."""


def _chain_der(store: Any) -> tuple[bytes, ...]:
    """The chain OpenSSL verified (leaf first, up to the trusted root), each certificate as DER."""
    stack = lib.X509_STORE_CTX_get1_chain(store)
    if stack == ffi.NULL:  # pragma: no cover - OpenSSL calls back for the leaf with a built chain
        raise VerificationError("x509: no verified chain")
    bio = lib.BIO_new(lib.BIO_s_mem())
    data = ffi.new("char **")
    ders = []
    try:
        for index in range(lib.sk_X509_num(stack)):
            cert = lib.sk_X509_value(stack, index)
            before = lib.BIO_get_mem_data(bio, data)
            if lib.i2d_X509_bio(bio, cert) != 1:  # pragma: no cover - a certificate OpenSSL parsed
                raise VerificationError("x509: could not encode a certificate of the chain")
            size = lib.BIO_get_mem_data(bio, data)  # the buffer may have moved: read the pointer after
            ders.append(ffi.buffer(data[0], size)[before:])
        return tuple(ders)
    finally:
        lib.BIO_free(bio)
        for index in range(lib.sk_X509_num(stack)):
            lib.X509_free(lib.sk_X509_value(stack, index))
        lib.sk_X509_free(stack)


def _leaf(store: Any) -> crypto.X509 | None:
    """The certificate being verified (the peer's leaf), for the log of a refusal."""
    cert = lib.X509_STORE_CTX_get0_cert(store)
    if cert == ffi.NULL:
        return None
    lib.X509_up_ref(cert)
    return crypto.X509._from_raw_x509_ptr(cert)


def _callback_failed(
    kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
) -> None:
    """cffi calls this for an exception that escapes the verify callback, which then returns 0."""
    _log.error("the TLS verify callback failed", exc_info=error)


class VerifyingContext(SSL.Context):
    """An OpenSSL context whose verify callback is ``verify``, called by OpenSSL through cffi.

    The cffi callback belongs to the context (every connection holds its context), so it lives as
    long as any connection that may call it.
    """

    def __init__(self, verify: RawVerify) -> None:
        super().__init__(SSL.TLS_METHOD)
        self.verify_callback: Any = ffi.callback(
            "int (*)(int, X509_STORE_CTX *)", verify, error=0, onerror=_callback_failed
        )
        lib.SSL_CTX_set_verify(self._context, VERIFY_MODE, self.verify_callback)


def build_context(
    svid: X509SVID,
    bundles: BundleSet,
    verify: RawVerify,
    *,
    server_side: bool,
) -> VerifyingContext:
    """An OpenSSL context presenting ``svid``, trusting ``bundles``' roots, verifying with ``verify``."""
    context = VerifyingContext(verify)
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
