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
from sidecar.proxy.relay import PlainSide, Relay, Timeouts, TLSSide
from sidecar.proxy.tls import ProxyTLS
from spiffecore import SpiffeError

_log = logging.getLogger(__name__)


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

    def new_connection(self) -> asyncio.BaseProtocol:
        try:
            conn, check = self.tls.connection()
        except SpiffeError as err:
            return _NotReady(str(err))
        side = TLSSide(conn, check, handshake_timeout=self.timeouts.handshake)
        self.track(side)
        side.on_lost = self.untrack
        self.spawn(self._serve(side))
        return side

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
            _log.warning("connection rejected", extra={"peer_address": _peer(side), "reason": err.rule})
            return
        peer = str(verified.id)
        relay = Relay(timeouts=self.timeouts, label=f"{_peer(side)} {peer}")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeouts.connect):
                if self.upstream.is_unix:
                    await loop.create_unix_connection(lambda: PlainSide(relay), self.upstream.path)
                else:
                    await loop.create_connection(lambda: PlainSide(relay), self.upstream.host, self.upstream.port)
        except (OSError, TimeoutError) as err:
            reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
            _log.error(
                "could not connect to the upstream",
                extra={
                    "peer_address": _peer(side),
                    "spiffe_id": peer,
                    "upstream": str(self.upstream),
                    "reason": reason,
                },
            )
            if side.transport is not None:
                side.transport.abort()
            return
        _log.info("connection accepted", extra={"peer_address": _peer(side), "spiffe_id": peer})
        if side.transport is None or side.transport.is_closing():
            relay.abort("peer left before the upstream connected")
            return
        relay.start(side)


def _peer(side: TLSSide) -> str:
    if side.transport is None:
        return ""
    peer = side.transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "unix")
