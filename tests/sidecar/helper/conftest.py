"""Fixtures of the helper's tests: a real Workload API on a unix socket over in-memory identities,
and a helper running against it in the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from sidecar.helper.config import HelperConfig
from sidecar.helper.run import Helper
from sidecar.workload.service import WorkloadAPIService
from spiffecore import JWTSVID, SpiffeID, TrustDomain
from spiffeproto import workload_pb2_grpc
from tests.sidecar.workload.support import CallerBox, FakeIdentities, StaticAttestor
from tests.support.ca import TestCA

PARTNER = "partner.org"
WAIT = 20.0


class ShortJWTIdentities(FakeIdentities):
    """Identities whose JWT-SVIDs live ``jwt_lifetime`` (a few seconds, so refreshes show quickly)."""

    jwt_lifetime = timedelta(seconds=4)

    async def jwt_svids(
        self, selectors: frozenset[str], audience: tuple[str, ...], spiffe_id: SpiffeID | None
    ) -> list[JWTSVID]:
        self.jwt_requests.append((selectors, audience, spiffe_id))
        if self.jwt_error is not None:
            raise self.jwt_error
        now = datetime.now(UTC)
        return [
            JWTSVID.parse_insecure(
                self.ca.mint_jwt(entry.path, audience=audience, now=now, expires_in=self.jwt_lifetime),
                audience,
                at=now,
                hint=entry.svid.hint,
            )
            for entry in self._matching(selectors)
            if spiffe_id is None or entry.spiffe_id == spiffe_id
        ]


async def start_server(socket: Path, service: WorkloadAPIService) -> grpc.aio.Server:
    server = grpc.aio.server()
    workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(service, server)
    server.add_insecure_port(f"unix:{socket}")
    await server.start()
    return server


@dataclass
class Served:
    socket: Path
    identities: ShortJWTIdentities
    server: grpc.aio.Server
    service: WorkloadAPIService

    @property
    def address(self) -> str:
        return f"unix://{self.socket}"

    async def restart(self) -> None:
        """Start serving again on the same socket after ``server.stop``."""
        self.socket.unlink(missing_ok=True)
        self.server = await start_server(self.socket, self.service)


@pytest.fixture
def identities() -> ShortJWTIdentities:
    ca = TestCA.create("example.org")
    fake = ShortJWTIdentities(ca, {TrustDomain.parse(PARTNER): TestCA.create(PARTNER)})
    fake.add_entry("/web", federates_with=(PARTNER,))
    return fake


@pytest.fixture
async def served(tmp_path: Path, identities: ShortJWTIdentities) -> AsyncIterator[Served]:
    socket = tmp_path / "api.sock"
    service = WorkloadAPIService(identities, CallerBox(), StaticAttestor())
    running = Served(socket=socket, identities=identities, server=await start_server(socket, service), service=service)
    yield running
    await running.server.stop(None)


@pytest.fixture
def cert_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "certs"
    directory.mkdir()
    return directory


@pytest.fixture
def config(served: Served, cert_dir: Path) -> HelperConfig:
    return HelperConfig(socket=served.address, cert_dir=cert_dir, combined_file_name="combined.pem")


@dataclass
class Running:
    helper: Helper
    stop: asyncio.Event
    task: asyncio.Task[None]
    lines: list[str]

    async def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        await wait_for(condition, what, timeout)

    async def updates_past(self, count: int) -> None:
        await self.wait_for(lambda: self.helper.x509_updates > count, f"X.509 update number {count + 1}")


async def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.01)


RunHelper = Callable[..., Awaitable[Running]]


@pytest.fixture
async def run_helper(config: HelperConfig) -> AsyncIterator[RunHelper]:
    """Start a helper (``config`` with the given changes); stopped, as by SIGTERM, at the end."""
    started: list[Running] = []

    async def start(**changes: Any) -> Running:
        helper = Helper(replace(config, **changes))
        stop = asyncio.Event()
        lines: list[str] = []
        task = asyncio.create_task(helper.run(announce=lines.append, stop=stop))
        running = Running(helper=helper, stop=stop, task=task, lines=lines)
        started.append(running)
        await running.wait_for(lambda: bool(lines) or task.done(), "the helper to start")
        return running

    yield start
    for running in started:
        running.stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(running.task, WAIT)
