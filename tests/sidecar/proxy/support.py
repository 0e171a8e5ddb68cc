"""Real parts for the proxy's tests: a test CA's identities, an X.509 source fed by the test,
plaintext upstreams, and TLS clients built on the standard library in threads (so the client's
own TLS never depends on the loop under test)."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from sidecar.proxy.address import Address
from sidecar.workload.identities import X509Context
from sidecar.workload.source import X509Source
from spiffecore import X509SVID, BundleSet, X509Bundle
from spiffecore.tls import client_context
from tests.support.ca import TestCA


def context_of(svid: X509SVID, *bundles: X509Bundle) -> X509Context:
    own = next(b for b in bundles if b.trust_domain == svid.id.trust_domain)
    return X509Context(svids=(svid,), bundle=own, federated={b.trust_domain: b for b in bundles if b is not own})


@dataclass
class FedSource:
    """An :class:`X509Source` whose watch is a queue the test puts contexts into."""

    queue: asyncio.Queue[X509Context] = field(default_factory=asyncio.Queue)
    source: X509Source | None = None

    async def watch(self) -> AsyncIterator[X509Context]:
        while True:
            yield await self.queue.get()

    async def start(self, first: X509Context) -> X509Source:
        self.source = X509Source(self.watch)
        self.source.start()
        self.queue.put_nowait(first)
        await self.source.ready(5)
        return self.source

    async def publish(self, context: X509Context) -> None:
        assert self.source is not None
        self.queue.put_nowait(context)
        for _ in range(100):
            if self.source.context is context:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the source did not take the new context")


class EchoUpstream:
    """A plaintext server echoing every byte back, then ending with FIN after the client's."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.connections = 0

    async def start(self) -> Address:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        host, port = self.server.sockets[0].getsockname()[:2]
        return Address(host=host, port=port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while data := await reader.read(256 * 1024):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def tls_client(minted_svid: X509SVID | None, ca: TestCA, *extra: TestCA) -> ssl.SSLContext:
    bundles = BundleSet.of(ca.bundle(), *(other.bundle() for other in extra))
    return client_context(minted_svid, bundles)


def echo_once(address: Address, context: ssl.SSLContext, payload: bytes, *, timeout: float = 10.0) -> bytes:
    """Blocking: connect, send ``payload``, read back ``len(payload)`` bytes (or until the end)."""
    with (
        socket.create_connection((address.host, address.port), timeout=timeout) as raw,
        context.wrap_socket(raw) as tls,
    ):
        tls.sendall(payload)
        received = bytearray()
        while len(received) < len(payload):
            chunk = tls.recv(65536)
            if not chunk:
                break
            received += chunk
        return bytes(received)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
