"""Fetching a foreign trust domain's bundle from its bundle endpoint, authenticated per profile.

:func:`fetch_bundle` is blocking (the poller runs it in a worker thread): one HTTPS GET of the
relationship's URL, bounded in time (:attr:`FetchLimits.timeout` for the whole fetch, connect
included) and in size (:attr:`FetchLimits.max_bytes`). Redirects are not followed: the
specification wants them temporary and the target to present the same identity, and an
endpoint that moves is better given a new URL by its operator.

Authentication of the endpoint, before the request is sent:

- ``https_spiffe``: the certificate chain must be an X509-SVID verified against the foreign trust
  domain's bundle alone (the last one stored; at first the operator's bootstrap bundle), by
  :func:`spiffecore.verify_x509_svid`, and its SPIFFE ID must be the relationship's endpoint
  SPIFFE ID. OpenSSL's handshake check uses that same bundle's roots only, never a pool mixed
  with other domains'. The host name is not checked: the SPIFFE ID is the identity.
- ``https_web``: ordinary web PKI, the system's roots (plus ``extra_roots`` when configured) and
  the URL's host name (RFC 6125, as :func:`ssl.create_default_context` does).

The answer must be HTTP 200 with a SPIFFE bundle (:meth:`spiffecore.SpiffeBundle.parse` for the
relationship's trust domain) that holds X.509 authorities. Every failure is a
:class:`BundleFetchError` that names what went wrong; nothing the endpoint sent is trusted before
these checks.
"""

from __future__ import annotations

import contextlib
import http.client
import ssl
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from controlplane.federation.relationship import (
    BundleEndpointProfile,
    FederationError,
    FederationRelationship,
    check_bundle,
)
from spiffecore import SpiffeBundle, SpiffeError, verify_x509_svid
from spiffecore.der import dump_pem_certificates
from spiffecore.tls import TLS12_CIPHERS, peer_chain

DEFAULT_TIMEOUT: Final = 10.0
DEFAULT_MAX_BYTES: Final = 4 * 1024 * 1024
USER_AGENT: Final = "spiffe-server"
_READ_SIZE: Final = 65536


class BundleFetchError(SpiffeError):
    """A bundle could not be fetched, or what was fetched cannot be trusted; the message says why."""

    layer = "federation"


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchLimits:
    """Bounds of one fetch: seconds for the whole of it, and bytes of the answer's body."""

    timeout: float = DEFAULT_TIMEOUT
    max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        if not self.timeout > 0 or not self.max_bytes > 0:
            raise ValueError("federation: fetch limits must be positive")


@dataclass(frozen=True, slots=True)
class Target:
    """Where a bundle endpoint URL points: host, port and the request target (path and query)."""

    host: str
    port: int
    path: str

    @classmethod
    def of(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.hostname is None:  # FederationRelationship checked it; a guard for direct callers
            raise FederationError("bundle endpoint URL must name a host", url)
        path = parts.path or "/"
        if parts.query:
            path = f"{path}?{parts.query}"
        return cls(host=parts.hostname, port=parts.port or 443, path=path)


def web_context(extra_roots: Path | None = None) -> ssl.SSLContext:
    """The ``https_web`` client context: system roots (and ``extra_roots``), host names checked."""
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if extra_roots is not None:
        try:
            context.load_verify_locations(cafile=str(extra_roots))
        except (OSError, ssl.SSLError) as err:
            raise FederationError(f"could not load the extra web CA file ({err})", str(extra_roots)) from err
    return context


def spiffe_context(bundle: SpiffeBundle) -> ssl.SSLContext:
    """The ``https_spiffe`` client context: the roots of this one trust domain's bundle, no host name check.

    The handshake's check is a first filter; :func:`fetch_bundle` verifies the chain and the ID after.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.load_verify_locations(cadata=dump_pem_certificates(bundle.x509.authorities).decode("ascii"))
    return context


def fetch_bundle(
    relationship: FederationRelationship,
    *,
    trusted: SpiffeBundle | None,
    now: datetime,
    web: ssl.SSLContext | None = None,
    limits: FetchLimits = FetchLimits(),
) -> SpiffeBundle:
    """GET the relationship's bundle endpoint; the foreign trust domain's bundle it serves.

    ``trusted`` is the foreign domain's last known bundle, which an ``https_spiffe`` endpoint is
    verified with (required for that profile); ``web`` the context for ``https_web`` (default:
    :func:`web_context`). ``now`` is the time the endpoint's SVID is judged at.
    """
    where = relationship.bundle_endpoint_url
    target = Target.of(where)
    deadline = time.monotonic() + limits.timeout
    if relationship.profile is BundleEndpointProfile.HTTPS_SPIFFE:
        if trusted is None or not trusted.x509.authorities:
            raise BundleFetchError(
                f"no bundle of {relationship.trust_domain} is known to verify its https_spiffe endpoint", where
            )
        context = spiffe_context(trusted)
    else:
        context = web if web is not None else web_context()
    connection = http.client.HTTPSConnection(target.host, target.port, context=context, timeout=limits.timeout)
    try:
        try:
            connection.connect()
        except ssl.SSLCertVerificationError as err:
            raise BundleFetchError(f"bundle endpoint's certificate was refused ({err.verify_message})", where) from err
        except (OSError, http.client.HTTPException) as err:
            raise BundleFetchError(f"could not connect to the bundle endpoint ({_reason(err)})", where) from err
        if relationship.profile is BundleEndpointProfile.HTTPS_SPIFFE:
            assert trusted is not None
            _check_endpoint_svid(connection, relationship, trusted, now)
        body = _get(connection, target, deadline, limits, where)
    finally:
        connection.close()
    return parse_fetched(relationship, body)


def parse_fetched(relationship: FederationRelationship, body: bytes) -> SpiffeBundle:
    """The bundle in an endpoint's answer, for the relationship's trust domain, with X.509 authorities."""
    try:
        bundle = SpiffeBundle.parse(relationship.trust_domain, body)
        check_bundle(bundle)
    except SpiffeError as err:
        raise BundleFetchError(
            f"bundle endpoint did not send a usable SPIFFE bundle ({err})", relationship.bundle_endpoint_url
        ) from err
    return bundle


def _check_endpoint_svid(
    connection: http.client.HTTPSConnection,
    relationship: FederationRelationship,
    trusted: SpiffeBundle,
    now: datetime,
) -> None:
    where = relationship.bundle_endpoint_url
    sock = connection.sock
    if not isinstance(sock, ssl.SSLSocket):  # pragma: no cover - HTTPSConnection always wraps
        raise BundleFetchError("bundle endpoint connection is not TLS", where)
    try:
        verified = verify_x509_svid(peer_chain(sock), trusted.x509, at=now)
    except SpiffeError as err:
        raise BundleFetchError(f"bundle endpoint's X509-SVID was refused ({err})", where) from err
    if verified.id != relationship.endpoint_spiffe_id:
        raise BundleFetchError(
            f"bundle endpoint presented {verified.id}, not the endpoint SPIFFE ID {relationship.endpoint_spiffe_id}",
            where,
        )


def _get(
    connection: http.client.HTTPSConnection, target: Target, deadline: float, limits: FetchLimits, where: str
) -> bytes:
    try:
        _set_timeout(connection, deadline, where)
        connection.request(
            "GET", target.path, headers={"Accept": "application/json", "User-Agent": USER_AGENT, "Connection": "close"}
        )
        with contextlib.closing(connection.getresponse()) as response:
            return _read_body(connection, response, deadline, limits, where)
    except (OSError, http.client.HTTPException) as err:
        raise BundleFetchError(f"could not read the bundle endpoint's answer ({_reason(err)})", where) from err


def _read_body(
    connection: http.client.HTTPSConnection,
    response: http.client.HTTPResponse,
    deadline: float,
    limits: FetchLimits,
    where: str,
) -> bytes:
    if response.status != http.HTTPStatus.OK:
        detail = " (redirects are not followed)" if 300 <= response.status < 400 else ""
        raise BundleFetchError(f"bundle endpoint answered HTTP {response.status}{detail}", where)
    length = response.getheader("Content-Length")
    if length is not None and length.isdigit() and int(length) > limits.max_bytes:
        raise BundleFetchError(f"bundle endpoint's answer is larger than {limits.max_bytes} bytes", where)
    chunks: list[bytes] = []
    size = 0
    while True:
        _set_timeout(connection, deadline, where)
        chunk = response.read1(_READ_SIZE)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limits.max_bytes:
            raise BundleFetchError(f"bundle endpoint's answer is larger than {limits.max_bytes} bytes", where)
        chunks.append(chunk)


def _set_timeout(connection: http.client.HTTPSConnection, deadline: float, where: str) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise BundleFetchError("bundle endpoint did not answer in time", where)
    if connection.sock is not None:
        connection.sock.settimeout(remaining)


def _reason(err: BaseException) -> str:
    if isinstance(err, TimeoutError):
        return "timed out"
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
