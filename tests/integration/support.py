"""Helpers of the integration tests: attest agents, create entries, collect watch events with times."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from sidecar.agent.serverapi import JOIN_TOKEN, AgentAPIClient, AgentIdentity, WatchEvent, attest
from tests.support.server import ServerProcess

TD_ID = "spiffe://example.org"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def join(server: ServerProcess, *token_args: str, address: str | None = None) -> AgentIdentity:
    """A new agent, attested by a join token the CLI generated."""
    token = await server.atoken(*token_args)
    return await attest(
        address or server.address,
        roots_pem=server.roots_pem(),
        attestation_type=JOIN_TOKEN,
        payload=token.encode(),
    )


async def create_entry(server: ServerProcess, parent: object, *extra: str, name: str | None = None) -> dict[str, Any]:
    """An entry under ``parent`` created through the CLI; its JSON document."""
    spiffe_id = f"{TD_ID}/{name or unique('workload')}"
    document: dict[str, Any] = await server.acli_json(
        "entry", "create", "--spiffe-id", spiffe_id, "--parent-id", str(parent), "--selector", "unix:uid:1000", *extra
    )
    return document


@dataclass
class Watcher:
    """Watch events as they arrive, each with its arrival time (``time.monotonic()``)."""

    queue: asyncio.Queue[tuple[float, WatchEvent | BaseException]] = field(default_factory=asyncio.Queue)

    async def next(self, timeout: float = 5.0) -> tuple[float, WatchEvent]:
        async with asyncio.timeout(timeout):
            at, event = await self.queue.get()
        if isinstance(event, BaseException):
            raise event
        return at, event

    def pending(self) -> int:
        return self.queue.qsize()


@asynccontextmanager
async def watching(client: AgentAPIClient, page_size: int = 0) -> AsyncIterator[Watcher]:
    """A task that reads ``client.watch_entries`` into a :class:`Watcher` for the ``with`` block."""
    watcher = Watcher()

    async def pump() -> None:
        try:
            async for event in client.watch_entries(page_size):
                watcher.queue.put_nowait((time.monotonic(), event))
        except Exception as err:  # noqa: BLE001 - handed to the test, which re-raises it
            watcher.queue.put_nowait((time.monotonic(), err))

    task = asyncio.create_task(pump())
    try:
        yield watcher
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
