"""Client mode in front of server mode, end to end, and large transfers through both.

Topology: a plaintext test client -> ProxyClient (plaintext in, mTLS out) -> ProxyServer (mTLS in,
plaintext out) -> a plaintext test upstream. Both proxies' TLS readers sit behind a slow
plaintext reader, so they are paused most of the time, and each stream ends with close_notify
and FIN arriving while the reader is paused: the case in which uvloop 0.23's own TLS transport
loses the tail (ARCHITECTURE.md section 5). Every byte is checked.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import pytest

from sidecar.proxy.address import Address
from sidecar.proxy.client import ProxyClient
from sidecar.proxy.policy import Policy
from sidecar.proxy.relay import Timeouts
from sidecar.proxy.server import ProxyServer
from sidecar.proxy.tls import ProxyTLS
from sidecar.workload.source import X509Source
from tests.sidecar.proxy.support import FedSource, context_of
from tests.support.ca import TestCA

MIB: Final = 1024 * 1024
BLOCK: Final = os.urandom(MIB + 7)  # not a multiple of any buffer size

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Chain:
    client: ProxyClient
    server: ProxyServer
    sources: list[X509Source]

    @property
    def entry(self) -> Address:
        return self.client.bound


@dataclass
class Tally:
    size: int = 0
    sha256: str = ""


async def send(writer: asyncio.StreamWriter, total: int) -> str:
    """Write ``total`` bytes of the pattern, then FIN; return their SHA-256."""
    digest = hashlib.sha256()
    sent = 0
    while sent < total:
        chunk = BLOCK[: min(len(BLOCK), total - sent)]
        writer.write(chunk)
        digest.update(chunk)
        sent += len(chunk)
        await writer.drain()
    writer.write_eof()
    await writer.drain()
    return digest.hexdigest()


async def receive(reader: asyncio.StreamReader, tally: Tally, *, stall: float, pace: float) -> None:
    """Read to the end slowly: wait ``stall`` seconds first, then ``pace`` seconds after each read."""
    digest = hashlib.sha256()
    await asyncio.sleep(stall)
    while data := await reader.read(256 * 1024):
        tally.size += len(data)
        digest.update(data)
        if pace:
            await asyncio.sleep(pace)
    tally.sha256 = digest.hexdigest()


async def start_upstream(handler: Handler) -> tuple[asyncio.Server, Address]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    return server, Address(host=host, port=port)


@pytest.fixture
async def ca() -> TestCA:
    return TestCA.create("example.org")


async def build_chain(
    ca: TestCA,
    upstream: Address,
    *,
    client_allows: str = "spiffe://example.org/server",
    timeouts: Timeouts | None = None,
) -> Chain:
    timeouts = timeouts or Timeouts(handshake=5.0, connect=5.0, close=30.0)
    server_source = await FedSource().start(context_of(ca.mint("/server").svid(), ca.x509_bundle()))
    client_source = await FedSource().start(context_of(ca.mint("/client").svid(), ca.x509_bundle()))
    server = ProxyServer(
        listen=Address.parse("127.0.0.1:0"),
        upstream=upstream,
        tls=ProxyTLS(
            server_source, Policy.from_rules(allow_id=["spiffe://example.org/client"]).authorizer(), server_side=True
        ),
        timeouts=timeouts,
    )
    await server.start()
    client = ProxyClient(
        listen=Address.parse("127.0.0.1:0"),
        upstream=server.bound,
        tls=ProxyTLS(client_source, Policy.from_rules(allow_id=[client_allows]).authorizer(), server_side=False),
        timeouts=timeouts,
    )
    await client.start()
    return Chain(client, server, [server_source, client_source])


async def close_chain(chain: Chain) -> None:
    await chain.client.drain(2.0)
    await chain.server.drain(2.0)
    for source in chain.sources:
        await source.close()


@pytest.fixture
async def echo_chain(ca: TestCA) -> AsyncIterator[Chain]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    upstream, address = await start_upstream(echo)
    chain = await build_chain(ca, address)
    try:
        yield chain
    finally:
        await close_chain(chain)
        upstream.close()
        await upstream.wait_closed()


async def test_client_mode_to_server_mode_end_to_end(echo_chain: Chain) -> None:
    for _ in range(3):
        reader, writer = await asyncio.open_connection(echo_chain.entry.host, echo_chain.entry.port)
        writer.write(b"hello through two proxies")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b"hello through two proxies"
        writer.close()
        await writer.wait_closed()
    assert echo_chain.server.rejected == 0
    assert echo_chain.client.rejected == 0


async def test_client_mode_checks_the_server_id(ca: TestCA, caplog: pytest.LogCaptureFixture) -> None:
    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise AssertionError("the upstream must not be reached")

    upstream, address = await start_upstream(never)
    chain = await build_chain(ca, address, client_allows="spiffe://example.org/someone-else")
    try:
        with caplog.at_level(logging.INFO, logger="sidecar.proxy"):
            reader, writer = await asyncio.open_connection(chain.entry.host, chain.entry.port)
            writer.write(b"secret")
            try:
                got = await asyncio.wait_for(reader.read(), 10)
            except ConnectionResetError:
                got = b""
            writer.close()
        assert got == b""
        assert chain.client.rejected == 1
        reasons = [getattr(r, "reason", "") for r in caplog.records if r.getMessage() == "upstream rejected"]
        assert reasons == [
            'authorize: "spiffe://example.org/server" is not allowed: want one of IDs ["spiffe://example.org/someone-else"]'
        ]
    finally:
        await close_chain(chain)
        upstream.close()
        await upstream.wait_closed()


@pytest.mark.parametrize(
    ("up_mib", "down_mib", "stall", "pace"),
    [
        (64, 64, 0.3, 0.0005),  # both ways at once, slow readers all along
        (8, 0, 1.0, 0.0),  # the whole stream and its close_notify + FIN queue up before any read
        (0, 8, 1.0, 0.0),
    ],
)
async def test_large_transfers_arrive_complete_byte_for_byte(
    ca: TestCA, up_mib: int, down_mib: int, stall: float, pace: float
) -> None:
    at_upstream = Tally()
    sent_down: list[str] = []

    async def upstream_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        results = await asyncio.gather(
            receive(reader, at_upstream, stall=stall, pace=pace), send(writer, down_mib * MIB)
        )
        sent_down.append(results[1])
        writer.close()

    upstream, address = await start_upstream(upstream_handler)
    chain = await build_chain(ca, address)
    try:
        reader, writer = await asyncio.open_connection(chain.entry.host, chain.entry.port)
        at_client = Tally()
        sent_up, _ = await asyncio.wait_for(
            asyncio.gather(send(writer, up_mib * MIB), receive(reader, at_client, stall=stall, pace=pace)), 90
        )
        writer.close()
        await writer.wait_closed()
        for _ in range(500):
            if sent_down:
                break
            await asyncio.sleep(0.01)
        assert (at_upstream.size, at_upstream.sha256) == (up_mib * MIB, sent_up)
        assert (at_client.size, at_client.sha256) == (down_mib * MIB, sent_down[0])
    finally:
        await close_chain(chain)
        upstream.close()
        await upstream.wait_closed()


async def test_close_timeout_ends_a_half_closed_connection(ca: TestCA) -> None:
    release = asyncio.Event()
    finished = asyncio.Event()

    async def sits(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # to the client's end, then keeps its own side open until released
        await release.wait()
        writer.close()
        finished.set()

    upstream, address = await start_upstream(sits)
    chain = await build_chain(ca, address, timeouts=Timeouts(handshake=5.0, connect=5.0, close=0.3))
    try:
        reader, writer = await asyncio.open_connection(chain.entry.host, chain.entry.port)
        writer.write(b"bye")
        writer.write_eof()
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            got = await asyncio.wait_for(reader.read(), 10)
        except ConnectionResetError:
            got = b""
        assert got == b""
        assert loop.time() - began < 5
        writer.close()
    finally:
        release.set()
        await asyncio.wait_for(finished.wait(), 5)
        await close_chain(chain)
        upstream.close()
        await upstream.wait_closed()
