"""This trust domain's SPIFFE bundle endpoint: ``GET /`` over HTTPS answers the current bundle.

The answer is the SPIFFE bundle JSON (keys with ``use`` ``x509-svid`` and ``jwt-svid``,
``spiffe_sequence``, ``spiffe_refresh_hint``), served with ``Content-Type: application/json``.
As SPIRE's endpoint does, only the path ``/`` exists (404 elsewhere) and only ``GET`` (and
``HEAD``) are allowed (405 otherwise, with ``Allow``). Clients are not asked for a certificate
(SPIFFE Federation 4.2).

TLS, per profile:

- ``https_spiffe``: the server's own X509-SVID (:class:`SVIDCredentials`), whose SPIFFE ID is the
  endpoint SPIFFE ID the other side pins. Each handshake takes the newest SVID: the context is
  swapped from the SNI callback, which OpenSSL runs for every ClientHello (SNI or not), and
  rebuilt once per renewal.
- ``https_web``: a certificate and key from files (:class:`FileCredentials`), re-read when either
  file changes (checked at most once a second); a bad new pair is logged and the old one kept.

Robustness: the TLS handshake and the request each have a deadline (:attr:`timeout`), the
request head is at most :data:`MAX_HEAD_BYTES`, every connection carries one request and is then
closed, and at most ``max_connections`` are served at once (more are closed at once). Every
request and every failure is counted in :class:`EndpointMetrics` by result, and failures are
logged at debug level (they are the client's, not ours).

The HTTP handling itself, :func:`respond`, is pure: request head in, response bytes out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from cryptography import x509

from controlplane.federation.relationship import FederationError
from spiffecore import SpiffeBundle
from spiffecore.der import dump_pem_certificates
from spiffecore.tls import TLS12_CIPHERS, private_pem_file

MAX_HEAD_BYTES: Final = 8192
DEFAULT_TIMEOUT: Final = 10.0
DEFAULT_MAX_CONNECTIONS: Final = 256
FILE_CHECK_INTERVAL: Final = 1.0

# Results, as counted (the label values of the requests metric).
OK: Final = "ok"
BAD_REQUEST: Final = "bad_request"
NOT_FOUND: Final = "not_found"
METHOD_NOT_ALLOWED: Final = "method_not_allowed"
UNAVAILABLE: Final = "unavailable"
TLS_ERROR: Final = "tls_error"
TIMEOUT: Final = "timeout"
TOO_LARGE: Final = "too_large"
DISCONNECTED: Final = "disconnected"
OVERLOADED: Final = "overloaded"
RESULTS: Final = (
    OK,
    BAD_REQUEST,
    NOT_FOUND,
    METHOD_NOT_ALLOWED,
    UNAVAILABLE,
    TLS_ERROR,
    TIMEOUT,
    TOO_LARGE,
    DISCONNECTED,
    OVERLOADED,
)

log = logging.getLogger("spiffe-server.federation.endpoint")


class EndpointMetrics(Protocol):
    """What the endpoint reports: one call per connection, with its result (see :data:`RESULTS`)."""

    def bundle_endpoint_request(self, result: str) -> None: ...


class NoMetrics:
    def bundle_endpoint_request(self, result: str) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Response:
    data: bytes
    result: str


_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


def _response(status: int, body: bytes, content_type: str, *, head: bool = False, allow: str = "") -> bytes:
    lines = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    if allow:
        lines.append(f"Allow: {allow}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + (b"" if head else body)


def _text(status: int, message: str, result: str, *, allow: str = "") -> Response:
    return Response(_response(status, message.encode() + b"\n", "text/plain; charset=utf-8", allow=allow), result)


def respond(head: bytes, document: bytes | None) -> Response:
    """The response to a request whose head (request line and headers, up to the blank line) is ``head``.

    ``document`` is the bundle JSON to serve, or None while there is none (503).
    """
    line, _, _ = head.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0") or not parts[0].isalpha():
        return _text(400, "bad request", BAD_REQUEST)
    method, target = parts[0], parts[1]
    path = target.partition(b"?")[0]
    if path != b"/":
        return _text(404, "not found", NOT_FOUND)
    if method not in (b"GET", b"HEAD"):
        return _text(405, "method not allowed", METHOD_NOT_ALLOWED, allow="GET, HEAD")
    if document is None:
        return _text(503, "no bundle yet", UNAVAILABLE)
    return Response(_response(200, document, "application/json", head=method == b"HEAD"), OK)


class BundleDocument:
    """The bundle JSON to serve, with the configured refresh hint; rebuilt only when the bundle changes.

    ``bundle`` returns the trust domain's current bundle (the same object until it changes).
    """

    def __init__(self, bundle: Callable[[], SpiffeBundle | None], *, refresh_hint: int) -> None:
        self._bundle = bundle
        self._refresh_hint = refresh_hint
        self._cached: tuple[SpiffeBundle, bytes] | None = None

    def __call__(self) -> bytes | None:
        bundle = self._bundle()
        if bundle is None:
            return None
        cached = self._cached
        if cached is not None and cached[0] is bundle:
            return cached[1]
        served = SpiffeBundle(
            x509=bundle.x509, jwt=bundle.jwt, sequence=bundle.sequence, refresh_hint=self._refresh_hint
        )
        document = served.to_json()
        self._cached = (bundle, document)
        return document


def serving_context() -> ssl.SSLContext:
    """A server context as the Mozilla intermediate profile has it: TLS 1.2 and 1.3, ECDHE AEAD suites."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.verify_mode = ssl.CERT_NONE  # clients are not asked for a certificate
    return context


def _load(context: ssl.SSLContext, chain_pem: bytes, key_pem: bytes, where: str) -> None:
    with private_pem_file(chain_pem + key_pem) as path:
        try:
            context.load_cert_chain(path)
        except ssl.SSLError as err:
            raise FederationError(
                f"could not load the bundle endpoint's certificate and key ({err.reason})", where
            ) from err


class ServingCredentials(Protocol):
    """The endpoint's certificate: a context to serve the next handshake with."""

    def context(self) -> ssl.SSLContext: ...


class SVIDCredentials:
    """The server's own X509-SVID (``https_spiffe``). ``current`` returns its chain (leaf first) and PEM key.

    The context is rebuilt when ``current`` returns other objects than last time (a renewal),
    so it must return the same objects until then, as the server's identity does.
    """

    def __init__(self, current: Callable[[], tuple[Sequence[x509.Certificate], bytes]]) -> None:
        self._current = current
        self._served: tuple[Sequence[x509.Certificate], bytes, ssl.SSLContext] | None = None

    def context(self) -> ssl.SSLContext:
        chain, key_pem = self._current()
        served = self._served
        if served is not None and served[0] is chain and served[1] is key_pem:
            return served[2]
        context = serving_context()
        _load(context, dump_pem_certificates(chain), key_pem, "server SVID")
        self._served = (chain, key_pem, context)
        return context


class FileCredentials:
    """A certificate chain and key in PEM files (``https_web``), re-read when either changes.

    The first load raises :class:`FederationError` (a server must not start without its
    certificate); a later bad pair (half-written, mismatched) is logged and the last good one kept.
    """

    def __init__(self, cert: Path, key: Path, *, check_interval: float = FILE_CHECK_INTERVAL) -> None:
        self._cert = cert
        self._key = key
        self._check_interval = check_interval
        self._checked = time.monotonic()
        self._stamp = self._file_stamp()
        self._context = self._read()

    def _file_stamp(self) -> tuple[tuple[int, int, int], ...]:
        stamps = []
        for path in (self._cert, self._key):
            try:
                stat = os.stat(path)  # noqa: PTH116 - one call for all three fields
            except OSError:
                stamps.append((0, 0, 0))
                continue
            stamps.append((stat.st_mtime_ns, stat.st_size, stat.st_ino))
        return tuple(stamps)

    def _read(self) -> ssl.SSLContext:
        try:
            chain_pem, key_pem = self._cert.read_bytes(), self._key.read_bytes()
        except OSError as err:
            raise FederationError(
                f"could not read the bundle endpoint's certificate or key ({err.strerror})", str(err.filename)
            ) from err
        context = serving_context()
        _load(context, chain_pem, key_pem, str(self._cert))
        return context

    def context(self) -> ssl.SSLContext:
        now = time.monotonic()
        if now - self._checked >= self._check_interval:
            self._checked = now
            stamp = self._file_stamp()
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._context = self._read()
                    log.info("bundle endpoint: certificate reloaded", extra={"cert": str(self._cert)})
                except FederationError as err:
                    log.warning(
                        "bundle endpoint: the changed certificate or key cannot be used; keeping the previous one",
                        extra={"error": str(err)},
                    )
        return self._context


class BundleEndpoint:
    """The bundle endpoint on ``host:port`` (port 0: any free port, see :attr:`port`)."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        credentials: ServingCredentials,
        document: Callable[[], bytes | None],
        metrics: EndpointMetrics | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._host = host
        self._port = port
        self._credentials = credentials
        self._document = document
        self._metrics = metrics if metrics is not None else NoMetrics()
        self._max_connections = max_connections
        self._timeout = timeout
        self._active = 0
        self._server: asyncio.Server | None = None
        self._base: ssl.SSLContext | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.port = 0

    def _tls_context(self) -> ssl.SSLContext:
        """The context every handshake starts with; it holds no certificate of its own.

        OpenSSL runs the SNI callback for every ClientHello, with a server name or without, and
        the callback swaps in the current credentials' context. Should no credentials be had, the
        handshake fails (and the failure is logged) rather than serving a stale certificate.
        """
        self._credentials.context()  # fail at start-up, not at the first handshake
        base = serving_context()
        base.sni_callback = self._select
        return base

    def _select(self, connection: ssl.SSLObject, server_name: str | None, base: ssl.SSLContext) -> None:
        try:
            connection.context = self._credentials.context()
        except (FederationError, ssl.SSLError, OSError):
            log.exception("bundle endpoint: no certificate to serve with")
            return  # the base context has no certificate: this handshake fails

    async def start(self) -> None:
        self._base = self._tls_context()
        self._server = await asyncio.start_server(self._accept, self._host, self._port, limit=MAX_HEAD_BYTES)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._handlers):
            task.cancel()
        for task in list(self._handlers):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await server.wait_closed()

    async def __aenter__(self) -> BundleEndpoint:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._active >= self._max_connections:
            self._count(OVERLOADED)
            writer.transport.abort()
            return
        self._active += 1
        self._handlers.add(task)
        try:
            self._count(await self._serve(reader, writer))
        finally:
            self._active -= 1
            self._handlers.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        peer = writer.get_extra_info("peername")
        assert self._base is not None, "started"
        try:
            async with asyncio.timeout(self._timeout):
                await writer.start_tls(self._base)
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as err:
            log.debug("bundle endpoint: TLS handshake failed", extra={"client": str(peer), "error": repr(err)})
            return TLS_ERROR
        try:
            async with asyncio.timeout(self._timeout):
                head = await reader.readuntil(b"\r\n\r\n")
                response = respond(head, self._document())
                writer.write(response.data)
                await writer.drain()
        except TimeoutError:
            result = TIMEOUT
        except asyncio.LimitOverrunError:
            writer.write(_text(400, "request head too large", TOO_LARGE).data)
            result = TOO_LARGE
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError):
            result = DISCONNECTED
        else:
            return response.result
        log.debug("bundle endpoint: request failed", extra={"client": str(peer), "result": result})
        return result

    def _count(self, result: str) -> None:
        self._metrics.bundle_endpoint_request(result)
