"""The server's /metrics as Prometheus scrapes it: attestations by type and result, open watch
streams, X.509-SVIDs signed, from a real spiffe-server process with its status endpoint.
"""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.agent.serverapi import JOIN_TOKEN, X509POP, AgentAPIClient, ServerAPIError, SnapshotPage, attest
from tests.integration.support import create_entry, join, watching
from tests.support.ca import new_key
from tests.support.server import ServerProcess, running_server

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def status_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    """A server (join_token only) with its status endpoint; and that endpoint's address."""
    status = f"127.0.0.1:{_free_port()}"
    with running_server(tmp_path_factory.mktemp("metrics") / "data", extra=["--status", status]) as server:
        yield server, status


def _scrape(status: str) -> Samples:
    with urllib.request.urlopen(f"http://{status}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(status: str) -> Samples:
    return await asyncio.to_thread(_scrape, status)


def attestations(samples: Samples, attestation_type: str, result: str) -> float | None:
    labels = (("attestation_type", attestation_type), ("result", result))
    return samples.get(("spiffe_server_agent_attestations_total", labels))


def watch_streams(samples: Samples) -> float | None:
    return samples.get(("spiffe_server_watch_streams", ()))


async def until_watch_streams(status: str, expected: float) -> Samples:
    async with asyncio.timeout(5):
        while watch_streams(samples := await scrape(status)) != expected:
            await asyncio.sleep(0.02)
    return samples


async def test_attestations_are_counted_by_type_and_result(status_server: tuple[ServerProcess, str]) -> None:
    server, status = status_server
    before = await scrape(status)
    # Every result of every enabled type (and of unknown ones) is there from the start.
    for attestation_type in (JOIN_TOKEN, "unknown"):
        for result in ("success", "refused"):
            assert attestations(before, attestation_type, result) is not None

    await join(server)
    await join(server)
    with pytest.raises(ServerAPIError) as bad_token:
        await attest(server.address, roots_pem=server.roots_pem(), attestation_type=JOIN_TOKEN, payload=b"no-such")
    assert bad_token.value.code == grpc.StatusCode.PERMISSION_DENIED
    for unknown in (X509POP, "tpm-of-a-stranger"):  # x509pop is not enabled on this server
        with pytest.raises(ServerAPIError) as not_enabled:
            await attest(server.address, roots_pem=server.roots_pem(), attestation_type=unknown, payload=b"x")
        assert not_enabled.value.code == grpc.StatusCode.INVALID_ARGUMENT

    after = await scrape(status)

    def delta(attestation_type: str, result: str) -> float:
        return (attestations(after, attestation_type, result) or 0) - (
            attestations(before, attestation_type, result) or 0
        )

    assert delta(JOIN_TOKEN, "success") == 2
    assert delta(JOIN_TOKEN, "refused") == 1
    assert delta("unknown", "refused") == 2
    assert delta("unknown", "success") == 0
    assert not any(labels and ("attestation_type", "tpm-of-a-stranger") in labels for _, labels in after)


async def test_open_watch_streams_are_a_gauge(status_server: tuple[ServerProcess, str]) -> None:
    server, status = status_server
    agent = await join(server)
    await until_watch_streams(status, 0)
    async with AgentAPIClient(agent, server.address) as client:
        async with watching(client) as first:
            await first.next()  # the bundle
            await first.next()  # the federated bundles
            assert isinstance((await first.next())[1], SnapshotPage)
            await until_watch_streams(status, 1)
            async with watching(client) as second:
                await second.next()
                await until_watch_streams(status, 2)
            await until_watch_streams(status, 1)  # the client cancelled the second stream
        await until_watch_streams(status, 0)


async def test_signed_svids_are_counted(status_server: tuple[ServerProcess, str]) -> None:
    server, status = status_server
    agent = await join(server)
    entry = await create_entry(server, agent.svid.id)
    before = (await scrape(status))[("spiffe_server_x509_svids_signed_total", ())]
    async with AgentAPIClient(agent, server.address) as client:
        results = await client.batch_new_x509_svid(
            [(entry["id"], new_key()) for _ in range(5)] + [("not-my-entry", new_key())]
        )
    assert [result.ok for result in results] == [True] * 5 + [False]
    after = (await scrape(status))[("spiffe_server_x509_svids_signed_total", ())]
    assert after - before == 5
