"""A plaintext HTTP/1.1 app for tests behind Envoy or ``spiffe-proxy``: one answer per connection.

Without ``answer`` it echoes the ``x-forwarded-client-cert`` header it received (what an Envoy
inbound sidecar says of the peer); with ``answer`` it sends that body. It counts the requests that
reached it, so a test can show that a refused caller never got through.
"""

from __future__ import annotations

import asyncio
import contextlib

XFCC_HEADER = "x-forwarded-client-cert:"


class HTTPApp:
    """Answers each request with ``answer`` (or the XFCC header it got) and closes the connection."""

    def __init__(self, answer: bytes | None = None) -> None:
        self.answer = answer
        self.requests = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        """Listen on 127.0.0.1 and return the port."""
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            body = self.answer if self.answer is not None else _xfcc(head)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def _xfcc(head: bytes) -> bytes:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return "".join(line.partition(":")[2].strip() for line in lines if line.lower().startswith(XFCC_HEADER)).encode()
