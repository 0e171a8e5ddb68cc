"""Two servers, one PostgreSQL database, each with its own data dir and CA.

Both servers' roots reach the bundle either one serves; an entry created on one reaches an agent
watching on the other within a second (LISTEN/NOTIFY); an agent attested on one calls the other.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy.engine import URL

from sidecar.agent.serverapi import AgentAPIClient, BundleUpdate, EntryDeltas, FederatedBundlesUpdate, SnapshotPage
from spiffecore import SpiffeBundle
from spiffeproto import registration_pb2, registration_pb2_grpc, types_pb2
from tests.controlplane.store.conftest import postgres_database
from tests.integration.support import TD_ID, join, unique, watching
from tests.support.ca import new_key
from tests.support.server import ServerProcess, running_server


@pytest.fixture
def servers(tmp_path: Path, postgres_server: URL) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    with postgres_database(postgres_server) as url:
        database_url = url.render_as_string(hide_password=False)
        with (
            running_server(tmp_path / "a", database_url=database_url) as a,
            running_server(tmp_path / "b", database_url=database_url) as b,
        ):
            yield a, b


async def until_two_roots(client: AgentAPIClient) -> SpiffeBundle:
    async with asyncio.timeout(5):
        while True:
            bundle = await client.get_bundle()
            if len(bundle.x509.authorities) == 2:
                return bundle
            await asyncio.sleep(0.05)


async def test_two_servers_share_bundle_entries_and_agents(servers: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = servers
    assert a.bundle().x509 == b.bundle().x509
    assert len(a.bundle().x509.authorities) == 2  # each server's own root

    agent = await join(a)
    async with AgentAPIClient(agent, a.address) as on_a:
        bundle = await until_two_roots(on_a)  # A's agent API serves both roots
    agent = dataclasses.replace(agent, bundle=bundle)

    async with AgentAPIClient(agent, b.address) as on_b:  # attested on A, calling B
        assert (await on_b.get_bundle()).x509 == bundle.x509
        async with watching(on_b) as watcher, grpc.aio.insecure_channel(f"unix:{a.admin_socket}") as admin:
            assert isinstance((await watcher.next())[1], BundleUpdate)
            assert isinstance((await watcher.next())[1], FederatedBundlesUpdate)
            page = (await watcher.next())[1]
            assert isinstance(page, SnapshotPage)
            assert page.entries == ()

            entry = types_pb2.Entry(
                spiffe_id=f"{TD_ID}/{unique('shared')}",
                parent_id=str(agent.svid.id),
                selectors=[types_pb2.Selector(type="unix", value="uid:1")],
            )
            started = time.monotonic()
            created = await registration_pb2_grpc.RegistrationAPIStub(admin).CreateEntry(
                registration_pb2.CreateEntryRequest(entry=entry), timeout=10
            )
            acknowledged = time.monotonic()
            arrived, delta = await watcher.next(timeout=5)
            latency = arrived - started
            print(
                f"\nentry created on server A reached the watch on server B {latency * 1000:.0f} ms after the "
                f"request ({(arrived - acknowledged) * 1000:.0f} ms after A acknowledged it)"
            )
            assert isinstance(delta, EntryDeltas)
            assert [e.id for e in delta.upserted] == [created.id]
            assert latency < 1.0

        (result,) = await on_b.batch_new_x509_svid([(created.id, new_key())])
    assert result.svid is not None
    assert str(result.svid.id) == entry.spiffe_id
