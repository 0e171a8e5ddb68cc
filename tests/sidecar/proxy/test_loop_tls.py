"""Why the proxy never uses the event loop's own TLS transport: uvloop 0.23's loses data.

A server built on the loop's TLS (``create_server(ssl=...)``) reads a stream that ends with
close_notify then FIN while its protocol keeps pausing reading. On the default loop every byte
arrives; on uvloop 0.23 the tail is lost (ARCHITECTURE.md section 5). The proxy moves records
over plain transports instead (``sidecar/proxy/relay.py``), and its own byte-for-byte tests
cover the same ending. If uvloop stops losing data here, this test is skipped with a note, so
the decision can be revisited.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time

import pytest

from spiffecore import BundleSet
from spiffecore.tls import client_context, server_context
from tests.support.ca import TestCA

TOTAL = 8 * 1024 * 1024


class PausingCounter(asyncio.Protocol):
    """Counts bytes, pausing reading for a millisecond after every chunk."""

    def __init__(self, done: asyncio.Future[int]) -> None:
        self.count = 0
        self.done = done
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.count += len(data)
        self.transport.pause_reading()
        asyncio.get_running_loop().call_later(0.001, self.transport.resume_reading)

    def eof_received(self) -> None:
        self._finish()

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(self.count)


def send_then_close_notify_and_fin(port: int, context: ssl.SSLContext) -> None:
    """Blocking TLS client on a memory BIO: ``TOTAL`` bytes, close_notify, FIN at once."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                raw.sendall(outgoing.read())
                incoming.write(raw.recv(65536))
        raw.sendall(outgoing.read())
        block = b"x" * 262144
        for _ in range(TOTAL // len(block)):
            tls.write(block)
            raw.sendall(outgoing.read())
        with contextlib.suppress(ssl.SSLWantReadError):  # close_notify sent; not waiting for the server's
            tls.unwrap()
        raw.sendall(outgoing.read())
        raw.shutdown(socket.SHUT_WR)
        time.sleep(0.5)  # keep the socket until the server has read everything


async def test_loop_tls_transport_with_close_notify_and_fin_while_paused() -> None:
    ca = TestCA.create()
    bundles = BundleSet.of(ca.bundle())
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()
    server = await loop.create_server(
        lambda: PausingCounter(done), "127.0.0.1", 0, ssl=server_context(ca.mint("/server").svid(), bundles)
    )
    try:
        port = server.sockets[0].getsockname()[1]
        client = asyncio.create_task(
            asyncio.to_thread(send_then_close_notify_and_fin, port, client_context(ca.mint("/c").svid(), bundles))
        )
        received = await asyncio.wait_for(done, 60)
        await client
    finally:
        server.close()
        await server.wait_closed()
    if type(loop).__module__.startswith("uvloop"):
        if received == TOTAL:
            pytest.skip("uvloop's TLS transport delivered every byte this time: reconsider using it")
        assert received < TOTAL  # the known loss: the reason the proxy does its own TLS
    else:
        assert received == TOTAL
