"""The server's state survives: SIGKILL mid-burst loses no acknowledged entry; a restart keeps the CA.

The burst runs on SQLite and on PostgreSQL (a database made for the test, dropped after it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy.engine import URL

from sidecar.agent.serverapi import AgentAPIClient
from spiffeproto import registration_pb2, registration_pb2_grpc, types_pb2
from tests.controlplane.store.conftest import postgres_database
from tests.integration.support import TD_ID, create_entry, join
from tests.support.ca import new_key
from tests.support.server import ServerProcess, running_server, start_server

WRITERS = 4
KILL_AFTER = 200


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """``None`` for SQLite in the data dir, or a new PostgreSQL database's URL."""
    if request.param == "sqlite":
        yield None
        return
    server: URL = request.getfixturevalue("postgres_server")
    with postgres_database(server) as url:
        yield url.render_as_string(hide_password=False)


async def burst(server: ServerProcess, acknowledged: list[str], enough: asyncio.Event) -> None:
    """Create entries over the registration API until the server dies; record each acknowledged id."""
    async with grpc.aio.insecure_channel(f"unix:{server.admin_socket}") as channel:
        stub = registration_pb2_grpc.RegistrationAPIStub(channel)

        async def writer(worker: int) -> None:
            for i in range(1_000_000):
                entry = types_pb2.Entry(
                    spiffe_id=f"{TD_ID}/burst/{worker}/{i}",
                    parent_id=f"{TD_ID}/node",
                    selectors=[types_pb2.Selector(type="unix", value=f"uid:{i}")],
                )
                try:
                    created = await stub.CreateEntry(registration_pb2.CreateEntryRequest(entry=entry), timeout=10)
                except grpc.aio.AioRpcError:
                    if not enough.is_set():
                        raise
                    return  # the server was killed: this one was never acknowledged
                acknowledged.append(created.id)
                if len(acknowledged) >= KILL_AFTER:
                    enough.set()

        async with asyncio.TaskGroup() as group:
            for worker in range(WRITERS):
                group.create_task(writer(worker))


async def test_sigkill_mid_burst_loses_no_acknowledged_entry(tmp_path: Path, database_url: str | None) -> None:
    data_dir = tmp_path / "data"
    server = start_server(data_dir, database_url=database_url)
    acknowledged: list[str] = []
    enough = asyncio.Event()
    writers = asyncio.create_task(burst(server, acknowledged, enough))
    try:
        async with asyncio.timeout(60):
            await enough.wait()
        server.kill()
        async with asyncio.timeout(30):
            await writers
    finally:
        server.kill()
        writers.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writers
    assert server.process.returncode == -9
    assert len(acknowledged) >= KILL_AFTER

    with running_server(data_dir, database_url=database_url) as restarted:
        present = {entry["id"] for entry in restarted.cli_json("entry", "show")}
    missing = set(acknowledged) - present
    assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged entries were lost"
    kind = "SQLite" if database_url is None else "PostgreSQL"
    print(f"\n{len(acknowledged)} entries acknowledged before SIGKILL on {kind}: all present after the restart")


async def test_a_restart_keeps_the_ca_and_the_agents(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with running_server(data_dir) as first:
        roots = first.roots_pem()
        bundle = first.bundle()
        agent = await join(first)
        entry = await create_entry(first, agent.svid.id)
        server_id = (data_dir / "server-id").read_text()
    with running_server(data_dir) as second:
        assert second.roots_pem(fresh=True) == roots
        assert second.bundle().x509 == bundle.x509
        assert (data_dir / "server-id").read_text() == server_id
        async with AgentAPIClient(agent, second.address) as client:
            assert (await client.get_bundle()).x509 == bundle.x509
            (result,) = await client.batch_new_x509_svid([(entry["id"], new_key())])
        assert result.svid is not None
        assert str(result.svid.id) == entry["spiffe_id"]
