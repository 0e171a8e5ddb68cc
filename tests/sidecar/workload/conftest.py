"""A real Workload API server on a unix socket, serving test doubles of the agent's parts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from sidecar.workload.service import WorkloadAPIService
from spiffecore import TrustDomain
from spiffeproto import workload_pb2_grpc
from tests.sidecar.workload.support import CallerBox, FakeIdentities, StaticAttestor
from tests.support.ca import TestCA

PARTNER = "partner.org"


@dataclass
class Served:
    """A running Workload API server and the doubles behind it."""

    socket: Path
    identities: FakeIdentities
    caller: CallerBox
    attestor: StaticAttestor
    server: grpc.aio.Server

    @property
    def address(self) -> str:
        return f"unix://{self.socket}"


async def start_server(socket: Path, service: WorkloadAPIService) -> grpc.aio.Server:
    server = grpc.aio.server()
    workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(service, server)
    server.add_insecure_port(f"unix:{socket}")
    await server.start()
    return server


@pytest.fixture
def ca() -> TestCA:
    return TestCA.create("example.org")


@pytest.fixture
def partner_ca() -> TestCA:
    return TestCA.create(PARTNER)


@pytest.fixture
def identities(ca: TestCA, partner_ca: TestCA) -> FakeIdentities:
    """The caller has two identities: /web (hint "internal") and /web-ext (hint "external", federated)."""
    fake = FakeIdentities(ca, {TrustDomain.parse(PARTNER): partner_ca})
    fake.add_entry("/web", hint="internal")
    fake.add_entry("/web-ext", hint="external", federates_with=(PARTNER,))
    return fake


@pytest.fixture
async def served(tmp_path: Path, identities: FakeIdentities) -> AsyncIterator[Served]:
    caller = CallerBox()
    attestor = StaticAttestor()
    socket = tmp_path / "api.sock"
    server = await start_server(socket, WorkloadAPIService(identities, caller, attestor))
    running = Served(socket=socket, identities=identities, caller=caller, attestor=attestor, server=server)
    yield running
    await running.server.stop(None)  # a test may have restarted it
