"""Client mode: plaintext in on loopback or a unix socket, mTLS out to the upstream.

Per connection: the plaintext connection is accepted with reading paused; the proxy connects to
the upstream (connect timeout), performs the handshake (handshake timeout), checks the server's
SPIFFE ID with the same allow rules as server mode, and only then relays. A server that is not
allowed gets an alert and the local client a closed connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging

from sidecar.proxy.address import Address, check_plaintext
from sidecar.proxy.errors import HandshakeError
from sidecar.proxy.listener import Listener
from sidecar.proxy.metrics import Direction, ProxyMetrics, Reason
from sidecar.proxy.relay import PlainSide, Relay, Timeouts, TLSSide
from sidecar.proxy.server import claimed_id, handshake_reason
from sidecar.proxy.tls import ProxyTLS
from spiffecore import SpiffeError

_log = logging.getLogger(__name__)


class ProxyClient(Listener):
    """Accepts plaintext on ``listen`` and relays it over mTLS to ``upstream``, a TCP address.

    ``metrics`` (optional) receives the connection, handshake, rejection and byte events.
    """

    def __init__(
        self,
        *,
        listen: Address,
        upstream: Address,
        tls: ProxyTLS,
        timeouts: Timeouts | None = None,
        max_connections: int = 0,
        allow_unsafe_listen: bool = False,
        reuse_port: bool = False,
        metrics: ProxyMetrics | None = None,
    ) -> None:
        if tls.server_side:
            raise ValueError("client mode needs a client-side ProxyTLS")
        check_plaintext(listen, role="listen address", unsafe_flag="--unsafe-listen", allow_unsafe=allow_unsafe_listen)
        super().__init__(
            listen=listen, timeouts=timeouts or Timeouts(), max_connections=max_connections, reuse_port=reuse_port
        )
        self.upstream = upstream
        self.tls = tls
        self.rejected = 0
        self.metrics = metrics
        self._server_name = _server_name(upstream)

    def new_connection(self) -> asyncio.BaseProtocol:
        relay = Relay(timeouts=self.timeouts, label=str(self.upstream))
        self.track(relay)
        if self.metrics is not None:
            self.metrics.connection_opened()
        relay.on_done = self._done
        self.spawn(self._serve(relay))
        return PlainSide(relay)

    def _done(self, relay: Relay) -> None:
        if relay not in self._in_flight:
            return  # already counted (given up before the relay started)
        self.untrack(relay)
        if self.metrics is not None:
            self.metrics.add_bytes(Direction.TO_UPSTREAM, relay.to_tls)
            self.metrics.add_bytes(Direction.TO_DOWNSTREAM, relay.from_tls)
            self.metrics.connection_closed()

    def _abort(self, connection: object) -> None:
        assert isinstance(connection, Relay)
        connection.abort("drain deadline reached")

    async def _serve(self, relay: Relay) -> None:
        await asyncio.sleep(0)  # connection_made has run: the plaintext transport is set
        try:
            conn, check = self.tls.connection()
        except SpiffeError as err:
            if self.metrics is not None:
                self.metrics.rejected(Reason.OTHER)
            self._give_up(relay, "no identity", str(err))
            return
        if self._server_name is not None:
            conn.set_tlsext_host_name(self._server_name)
        side = TLSSide(conn, check, handshake_timeout=self.timeouts.handshake)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeouts.connect):
                if self.upstream.is_unix:
                    await loop.create_unix_connection(lambda: side, self.upstream.path)
                else:
                    await loop.create_connection(lambda: side, self.upstream.host, self.upstream.port)
        except (OSError, TimeoutError) as err:
            if self.metrics is not None:
                self.metrics.upstream_connect_failed()
            self._give_up(
                relay, "could not connect to the upstream", "timed out" if isinstance(err, TimeoutError) else str(err)
            )
            return
        try:
            verified = await side.handshake
        except HandshakeError as err:
            self.rejected += 1
            if self.metrics is not None:
                self.metrics.handshake_failed(handshake_reason(err.rule))
            self._give_up(relay, "upstream rejected", err.rule, spiffe_id=claimed_id(side.check))
            return
        if self.metrics is not None:
            self.metrics.handshake_ok()
        if relay.plain is None or relay.plain.is_closing():
            if side.transport is not None:
                side.transport.abort()
            self._give_up(relay, "local client left", "before the upstream was verified")
            return
        relay.label = f"{self.upstream} {verified.id}"
        _log.info("upstream connected", extra={"upstream": str(self.upstream), "spiffe_id": str(verified.id)})
        relay.start(side)

    def _give_up(self, relay: Relay, what: str, reason: str, *, spiffe_id: str = "") -> None:
        extra = {"upstream": str(self.upstream), "reason": reason}
        if spiffe_id:
            extra["spiffe_id"] = spiffe_id
        _log.warning(what, extra=extra)
        if relay.plain is not None:
            relay.plain.abort()
        else:
            self._done(relay)


def _server_name(upstream: Address) -> bytes | None:
    """SNI for a host name (not for IP addresses or unix sockets)."""
    if upstream.is_unix:
        return None
    try:
        ipaddress.ip_address(upstream.host)
    except ValueError:
        return upstream.host.encode("idna")
    return None
