"""What server and client mode share: a listening socket, the connections in flight, the drain.

Connections beyond ``max_connections`` are accepted and closed at once, with a log line, so a
flood cannot starve the ones in flight of file descriptors or memory (``0`` means no limit).
:meth:`Listener.drain` stops accepting, lets the connections in flight finish for up to a
deadline and then drops the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

from sidecar.proxy.address import Address
from sidecar.proxy.relay import Timeouts

_log = logging.getLogger(__name__)


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).abort()


class Listener:
    """A listening socket and the connections it has in flight. Use ``async with``."""

    def __init__(self, *, listen: Address, timeouts: Timeouts, max_connections: int, reuse_port: bool) -> None:
        if max_connections < 0:
            raise ValueError(f"max_connections must be 0 (no limit) or more, not {max_connections}")
        self.listen = listen
        self.timeouts = timeouts
        self.max_connections = max_connections
        self.reuse_port = reuse_port
        self.accepted = 0
        self.refused = 0
        self._server: asyncio.Server | None = None
        self._in_flight: set[object] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._bound: Address | None = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.drain(0.0)

    @property
    def connections(self) -> int:
        """Connections in flight, handshakes included."""
        return len(self._in_flight)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._server.sockets) if self._server is not None else ()

    @property
    def bound(self) -> Address:
        """The address actually listened on (the port chosen when 0 was asked for)."""
        if self._bound is None:
            raise RuntimeError("not listening: call start() first")
        return self._bound

    async def start(self) -> None:
        """Listen; returns once the socket accepts connections."""
        loop = asyncio.get_running_loop()
        if self.listen.is_unix:
            with contextlib.suppress(FileNotFoundError):
                if Path(self.listen.path).is_socket():
                    Path(self.listen.path).unlink()
            self._server = await loop.create_unix_server(self._factory, self.listen.path, backlog=1024)
        else:
            self._server = await loop.create_server(
                self._factory, self.listen.host, self.listen.port, backlog=1024, reuse_port=self.reuse_port or None
            )
        if self.listen.is_unix:
            self._bound = self.listen
        else:
            host, port = self._server.sockets[0].getsockname()[:2]
            self._bound = Address(host=host, port=port)

    async def drain(self, deadline: float) -> None:
        """Stop accepting, wait up to ``deadline`` seconds for connections in flight, drop the rest."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        if self._in_flight:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline):
                    await self._idle.wait()
        if self._in_flight:
            _log.warning(
                "dropping connections still open after the drain deadline", extra={"count": len(self._in_flight)}
            )
            for connection in list(self._in_flight):
                self._abort(connection)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()
        if self.listen.is_unix:
            with contextlib.suppress(FileNotFoundError):
                Path(self.listen.path).unlink()
        # Let the aborted transports deliver connection_lost before the loop goes away.
        for _ in range(3):
            await asyncio.sleep(0)

    def _factory(self) -> asyncio.BaseProtocol:
        if self.max_connections and len(self._in_flight) >= self.max_connections:
            self.refused += 1
            _log.warning("connection refused: too many connections", extra={"max_connections": self.max_connections})
            return _Refuse()
        self.accepted += 1
        return self.new_connection()

    def new_connection(self) -> asyncio.BaseProtocol:
        raise NotImplementedError

    def _abort(self, connection: object) -> None:
        raise NotImplementedError

    def track(self, connection: object) -> None:
        self._in_flight.add(connection)
        self._idle.clear()

    def untrack(self, connection: object) -> None:
        self._in_flight.discard(connection)
        if not self._in_flight:
            self._idle.set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
