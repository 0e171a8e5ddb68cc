"""Server mode: TLS in, authorized by SPIFFE ID, plaintext out to the upstream.

Per connection: the handshake (bounded by the handshake timeout; the peer is verified and
authorized inside it), then the upstream connection (bounded by the connect timeout), then the
relay. A peer is never connected to the upstream before it is authorized (fail closed: a
handshake that completes without a verified peer is refused too). Every accept and reject is
logged with the peer's address, its SPIFFE ID when known, and the reason.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from sidecar.proxy.address import Address, check_plaintext
from sidecar.proxy.errors import HandshakeError
from sidecar.proxy.listener import Listener
from sidecar.proxy.metrics import Direction, ProxyMetrics, Reason
from sidecar.proxy.proxyproto import ProxyProtocolError, connection_tlvs, encode
from sidecar.proxy.relay import PlainSide, Relay, Timeouts, TLSSide
from sidecar.proxy.tls import NO_CERTIFICATE, PeerCheck, ProxyTLS
from spiffecore import SpiffeError, SpiffeID, id_from_cert

_log = logging.getLogger(__name__)


def handshake_reason(rule: str) -> Reason:
    """The metrics label of a failed handshake, from the reason :class:`TLSSide` gives."""
    if rule.startswith("handshake timed out"):
        return Reason.HANDSHAKE_TIMEOUT
    # Ours, or OpenSSL's own when it refuses the handshake before the proxy looks at the peer.
    if rule == NO_CERTIFICATE or "did not return a certificate" in rule:
        return Reason.NO_CLIENT_CERT
    if "expired" in rule:
        return Reason.EXPIRED
    if "is not allowed" in rule:
        return Reason.NOT_ALLOWED
    if rule.startswith(("x509", "x509svid", "bundle")) or "verif" in rule or "certificate" in rule:
        return Reason.UNTRUSTED
    if rule.startswith("tls:") or "handshake" in rule:
        return Reason.PROTOCOL_ERROR
    return Reason.OTHER


def claimed_id(check: PeerCheck) -> str:
    """The SPIFFE ID the peer's leaf claims (verified or not), or "" when there is none."""
    leaf = check.leaf
    if leaf is None:
        return ""
    try:
        return str(id_from_cert(leaf.to_cryptography()))
    except SpiffeError:
        return ""


class _NotReady(asyncio.Protocol):
    def __init__(self, reason: str) -> None:
        self.reason = reason

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _log.warning("connection refused: no identity", extra={"reason": self.reason})
        cast(asyncio.Transport, transport).abort()


class ProxyServer(Listener):
    """Accepts mTLS on ``listen`` and relays authorized peers to the plaintext ``upstream``.

    ``tls`` must be server-side (:class:`ProxyTLS` with ``server_side=True``); its authorizer
    is the policy. The upstream must be a unix socket or loopback unless ``allow_unsafe_upstream``.
    ``metrics`` (optional) receives the connection, handshake, rejection and byte events;
    ``proxy_protocol`` sends a PROXY protocol v2 header to the upstream first, with the client's
    address and its SPIFFE ID as a TLV.
    """

    def __init__(
        self,
        *,
        listen: Address,
        upstream: Address,
        tls: ProxyTLS,
        timeouts: Timeouts | None = None,
        max_connections: int = 0,
        allow_unsafe_upstream: bool = False,
        reuse_port: bool = False,
        metrics: ProxyMetrics | None = None,
        proxy_protocol: bool = False,
    ) -> None:
        if not tls.server_side:
            raise ValueError("server mode needs a server-side ProxyTLS")
        check_plaintext(upstream, role="upstream", unsafe_flag="--unsafe-upstream", allow_unsafe=allow_unsafe_upstream)
        super().__init__(
            listen=listen, timeouts=timeouts or Timeouts(), max_connections=max_connections, reuse_port=reuse_port
        )
        self.upstream = upstream
        self.tls = tls
        self.rejected = 0
        self.metrics = metrics
        self.proxy_protocol = proxy_protocol

    def new_connection(self) -> asyncio.BaseProtocol:
        try:
            conn, check = self.tls.connection()
        except SpiffeError as err:
            if self.metrics is not None:
                self.metrics.rejected(Reason.OTHER)
            return _NotReady(str(err))
        side = TLSSide(conn, check, handshake_timeout=self.timeouts.handshake)
        self.track(side)
        if self.metrics is not None:
            self.metrics.connection_opened()
        side.on_lost = self._lost
        self.spawn(self._serve(side))
        return side

    def _lost(self, side: TLSSide) -> None:
        self.untrack(side)
        if self.metrics is not None:
            self.metrics.connection_closed()

    def _count_bytes(self, relay: Relay) -> None:
        assert self.metrics is not None
        self.metrics.add_bytes(Direction.TO_UPSTREAM, relay.from_tls)
        self.metrics.add_bytes(Direction.TO_DOWNSTREAM, relay.to_tls)

    def _abort(self, connection: object) -> None:
        assert isinstance(connection, TLSSide)
        if connection.relay is not None:
            connection.relay.abort("drain deadline reached")
        elif connection.transport is not None:
            connection.transport.abort()

    async def _serve(self, side: TLSSide) -> None:
        try:
            verified = await side.handshake
        except HandshakeError as err:
            self.rejected += 1
            if self.metrics is not None:
                self.metrics.handshake_failed(handshake_reason(err.rule))
            _log.warning(
                "connection rejected",
                extra={"peer_address": _peer(side), "spiffe_id": claimed_id(side.check), "reason": err.rule},
            )
            return
        if self.metrics is not None:
            self.metrics.handshake_ok()
        peer = str(verified.id)
        address = _peer(side)
        relay = Relay(timeouts=self.timeouts, label=f"{address} {peer}")
        if self.metrics is not None:
            relay.on_done = self._count_bytes
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeouts.connect):
                if self.upstream.is_unix:
                    await loop.create_unix_connection(lambda: PlainSide(relay), self.upstream.path)
                else:
                    await loop.create_connection(lambda: PlainSide(relay), self.upstream.host, self.upstream.port)
        except (OSError, TimeoutError) as err:
            reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
            if self.metrics is not None:
                self.metrics.upstream_connect_failed()
            _log.error(
                "could not connect to the upstream",
                extra={
                    "peer_address": address,
                    "spiffe_id": peer,
                    "upstream": str(self.upstream),
                    "reason": reason,
                },
            )
            if side.transport is not None:
                side.transport.abort()
            return
        _log.info("connection accepted", extra={"peer_address": address, "spiffe_id": peer})
        if side.transport is None or side.transport.is_closing():
            relay.abort("peer left before the upstream connected")
            return
        if self.proxy_protocol and relay.plain is not None:
            relay.plain.write(proxy_header(side, verified.id))
        relay.start(side)


def proxy_header(side: TLSSide, peer_id: SpiffeID) -> bytes:
    """The PROXY protocol v2 header for an accepted connection: the client's address and the
    listener's, the TLS version and cipher, and the peer's SPIFFE ID as a TLV."""
    tlvs = connection_tlvs(
        peer_id=peer_id, tls_version=side.conn.get_protocol_version_name(), cipher=side.conn.get_cipher_name() or ""
    )
    transport = side.transport
    source = transport.get_extra_info("peername") if transport is not None else None
    destination = transport.get_extra_info("sockname") if transport is not None else None
    try:
        if isinstance(source, tuple) and isinstance(destination, tuple):
            return encode(source, destination, tlvs=tlvs)
    except ProxyProtocolError:
        pass
    return encode(None, None, tlvs=tlvs)  # a unix listener, or an address that cannot be encoded: LOCAL


def _peer(side: TLSSide) -> str:
    if side.transport is None:
        return ""
    peer = side.transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "unix")
