"""The agent's sync tasks against real spiffe-server processes: watch, batch signing, rotation, outages."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from sidecar.agent.node import BUNDLE_FILE, AgentNode, NodeSettings, load_or_attest
from sidecar.agent.sync import AgentSync
from spiffecore import JWTSVID, BundleSet, SpiffeBundle, SpiffeID, TrustDomain, verify_x509_svid
from tests.support.server import STOP_TIMEOUT, ServerProcess, start_server

TD = TrustDomain.parse("example.org")
TD_ID = "spiffe://example.org"


def settings(server: ServerProcess, data_dir: Path, **options: object) -> NodeSettings:
    return NodeSettings(server_address=server.address, trust_domain=TD, data_dir=data_dir, **options)  # type: ignore[arg-type]


async def new_node(server: ServerProcess, tmp_path: Path, *token_args: str) -> AgentNode:
    bootstrap = tmp_path / "bootstrap.pem"
    bootstrap.write_bytes(server.roots_pem(fresh=True))
    config = settings(server, tmp_path / "agent", trust_bundle=bootstrap, join_token=await server.atoken(*token_args))
    return AgentNode(config, await load_or_attest(config))


async def create_entry(server: ServerProcess, parent: SpiffeID | str, path: str, *selectors: str, ttl: int = 0) -> str:
    argv = ["entry", "create", "--spiffe-id", f"{TD_ID}{path}", "--parent-id", str(parent)]
    for selector in selectors:
        argv += ["--selector", selector]
    if ttl:
        argv += ["--x509-ttl", str(ttl)]
    created: dict[str, Any] = await server.acli_json(*argv)
    return str(created["id"])


async def eventually(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``condition`` every 10 ms; return how long it took to hold."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def serial(sync: AgentSync, entry_id: str) -> int | None:
    cached = sync.cache.svid(entry_id)
    return None if cached is None else cached.svid.leaf.serial_number


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port: int = probe.getsockname()[1]
    return port


def fast_config(directory: Path) -> Path:
    """A server whose X.509-SVIDs live 30 s and agent SVIDs 90 s (plus the CA's 10 s backdating)."""
    config = directory / "server.yaml"
    config.write_text(
        "trust_domain: example.org\nca:\n  ttl: 10m\nsvid:\n  x509_ttl: 30s\n  jwt_ttl: 60s\n  agent_ttl: 90s\n"
    )
    return config


# --- against the shared server -----------------------------------------------------------------------


async def test_sync_signs_every_workload_entry_in_batches_and_becomes_ready(
    server: ServerProcess, tmp_path: Path
) -> None:
    alias = f"{TD_ID}/node/{tmp_path.name}"
    node = await new_node(server, tmp_path, "--spiffe-id", alias)
    agent_id = node.identity.svid.id
    ids = [await create_entry(server, agent_id, f"/ready/{i}", "unix:uid:1000", f"unix:gid:{i}") for i in range(4)]
    ids.append(await create_entry(server, alias, "/ready/via-alias", "unix:uid:1000"))
    async with AgentSync(node, batch_size=2) as sync:
        await asyncio.wait_for(sync.wait_ready(), 20)
        assert sync.cache.is_ready()
        assert set(sync.cache.workload_entries) == set(ids)  # the alias itself is not a workload entry
        assert len(sync.cache.entries) == len(ids) + 1
        assert sync.batches >= 3  # 5 entries in batches of 2
        now = datetime.now(UTC)
        for entry_id in ids:
            cached = sync.cache.svid(entry_id)
            assert cached is not None
            verify_x509_svid(cached.svid.cert_chain, sync.cache.bundle, at=now)
        context = sync.cache.x509_context(frozenset({"unix:uid:1000", "unix:gid:2"}))
        assert context is not None
        assert [str(s.id) for s in context.svids] == [f"{TD_ID}/ready/2", f"{TD_ID}/ready/via-alias"]
        assert sync.cache.x509_context(frozenset({"unix:uid:1"})) is None
    persisted = SpiffeBundle.parse(TD, (tmp_path / "agent" / BUNDLE_FILE).read_bytes())
    assert persisted.x509 == node.identity.bundle.x509


async def test_the_watch_applies_creates_and_deletes_within_a_second(server: ServerProcess, tmp_path: Path) -> None:
    node = await new_node(server, tmp_path)
    async with AgentSync(node) as sync:
        await asyncio.wait_for(sync.wait_ready(), 20)
        entry_id = await create_entry(server, node.identity.svid.id, "/watched", "unix:uid:7")
        to_svid = await eventually(lambda: sync.cache.svid(entry_id) is not None, 1.0, "SVID for a new entry")
        context = sync.cache.x509_context(frozenset({"unix:uid:7"}))
        assert context is not None
        assert [str(s.id) for s in context.svids] == [f"{TD_ID}/watched"]
        await server.acli("entry", "delete", entry_id)
        to_gone = await eventually(lambda: entry_id not in sync.cache.entries, 1.0, "entry deleted")
        assert sync.cache.svid(entry_id) is None
        assert sync.cache.x509_context(frozenset({"unix:uid:7"})) is None
    logging.getLogger(__name__).info(
        "entry to SVID in cache %.0f ms, delete to gone %.0f ms (from the CLI's exit)", to_svid * 1000, to_gone * 1000
    )


async def test_an_entry_the_server_will_not_sign_does_not_hold_up_the_others(
    server: ServerProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "sidecar.agent.sync")
    node = await new_node(server, tmp_path)
    agent_id = node.identity.svid.id
    good = await create_entry(server, agent_id, "/good", "unix:uid:8")
    too_long = await create_entry(server, agent_id, "/too-long", "unix:uid:8", ttl=30 * 86_400)  # outlives the CA
    async with AgentSync(node) as sync:
        await eventually(lambda: sync.cache.svid(good) is not None, 10, "the good entry's SVID")
        await asyncio.sleep(1.5)  # several retries of the refused one
        assert sync.cache.svid(too_long) is None
        assert not sync.ready.is_set()
        context = sync.cache.x509_context(frozenset({"unix:uid:8"}))
        assert context is not None
        assert [str(s.id) for s in context.svids] == [f"{TD_ID}/good"]
    refused = [r for r in caplog.records if "did not sign an SVID for an entry" in r.getMessage()]
    assert len(refused) == 1  # once per streak, not per retry
    assert refused[0].entry_id == too_long  # type: ignore[attr-defined]


async def test_jwt_svids_are_signed_by_the_server_and_cached(server: ServerProcess, tmp_path: Path) -> None:
    node = await new_node(server, tmp_path)
    await create_entry(server, node.identity.svid.id, "/jwt", "unix:uid:9")
    async with AgentSync(node) as sync:
        await asyncio.wait_for(sync.wait_ready(), 20)
        [svid] = await sync.cache.jwt_svids(frozenset({"unix:uid:9"}), ("service-a",), None)
        validated = JWTSVID.parse_and_validate(
            svid.token, BundleSet.of(sync.cache.bundle), "service-a", at=datetime.now(UTC)
        )
        assert str(validated.id) == f"{TD_ID}/jwt"
        [again] = await sync.cache.jwt_svids(frozenset({"unix:uid:9"}), ("service-a",), None)
        assert again.token == svid.token
        assert sync.cache.jwt.fetches == 1


async def test_svids_rotate_at_their_rotation_time(server: ServerProcess, tmp_path: Path) -> None:
    node = await new_node(server, tmp_path)
    entry_id = await create_entry(server, node.identity.svid.id, "/short", "unix:uid:10", ttl=20)
    async with AgentSync(node) as sync:
        await asyncio.wait_for(sync.wait_ready(), 20)
        first = sync.cache.svid(entry_id)
        assert first is not None
        lifetime = first.expires_at - first.svid.issued_at
        assert first.svid.issued_at + lifetime * 0.4 <= first.renew_at <= first.svid.issued_at + lifetime * 0.6
        generation = sync.cache.generation
        await eventually(lambda: serial(sync, entry_id) != first.svid.leaf.serial_number, 15, "rotation")
        assert datetime.now(UTC) >= first.renew_at
        assert sync.cache.generation > generation
        second = sync.cache.svid(entry_id)
        assert second is not None
        assert second.expires_at > first.expires_at
        assert second.svid.private_key.public_key() != first.svid.private_key.public_key()


# --- resilience: the server goes away and comes back; the agent restarts ------------------------------


@pytest.fixture
def outage_server(tmp_path: Path) -> Iterator[tuple[ServerProcess, Callable[[], ServerProcess]]]:
    """A short-TTL server on a fixed port, and a function that starts it again on the same data dir."""
    directory = tmp_path / "server"
    directory.mkdir()
    config = fast_config(directory)
    port = free_port()
    extra = ["--bind", f"127.0.0.1:{port}"]
    processes = [start_server(directory / "data", config=config, extra=extra)]

    def restart() -> ServerProcess:
        processes.append(start_server(directory / "data", config=config, extra=extra))
        return processes[-1]

    try:
        yield processes[0], restart
    finally:
        for process in processes:
            if process.process.poll() is None:
                process.stop(prompt=STOP_TIMEOUT)


async def test_workloads_keep_their_svids_through_an_outage_and_rotation_resumes(
    outage_server: tuple[ServerProcess, Callable[[], ServerProcess]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "sidecar.agent")
    server, restart = outage_server
    node = await new_node(server, tmp_path)
    agent_id = node.identity.svid.id
    # 40 s (50 s with backdating): due 10 to 20 s after it is signed, expired 40 s after.
    entry_id = await create_entry(server, agent_id, "/steady", "unix:uid:11", ttl=40)
    selectors = frozenset({"unix:uid:11"})
    async with AgentSync(node) as sync:
        await asyncio.wait_for(sync.wait_ready(), 20)
        before = sync.cache.svid(entry_id)
        assert before is not None

        # The server goes away for longer than half the rotation period: past the SVID's rotation time.
        # The server's graceful stop waits out its 5 s grace for the open watch stream (reported to the
        # control plane's owner); the agent must not care how the server goes away.
        await asyncio.to_thread(server.stop, prompt=STOP_TIMEOUT)
        outage_started = time.monotonic()
        while datetime.now(UTC) < before.renew_at or time.monotonic() - outage_started < 4:
            context = sync.cache.x509_context(selectors)
            assert context is not None
            assert [s.leaf.serial_number for s in context.svids] == [before.svid.leaf.serial_number]
            await asyncio.sleep(0.2)
        assert datetime.now(UTC) < before.expires_at
        assert sync.cache.due(datetime.now(UTC))  # due, and kept while it cannot be renewed

        # It comes back on the same data dir: the watch reconnects, deltas flow, rotation resumes.
        server = await asyncio.to_thread(restart)
        restarted = time.monotonic()
        await eventually(
            lambda: serial(sync, entry_id) not in (None, before.svid.leaf.serial_number), 18, "rotation after restart"
        )
        rotated_after = time.monotonic() - restarted
        assert datetime.now(UTC) < before.expires_at  # workloads never went without a valid SVID
        new_entry = await create_entry(server, agent_id, "/after-restart", "unix:uid:11")
        await eventually(lambda: sync.cache.svid(new_entry) is not None, 15, "SVID for an entry made after restart")
        context = sync.cache.x509_context(selectors)
        assert context is not None
        assert [str(s.id) for s in context.svids] == [f"{TD_ID}/after-restart", f"{TD_ID}/steady"]

    watch_lost = [r for r in caplog.records if r.getMessage().startswith("the entry watch stream ended")]
    assert len(watch_lost) == 1  # once per streak, however many retries
    assert any(r.getMessage() == "the entry watch is back" for r in caplog.records)
    logging.getLogger(__name__).info("rotation resumed %.1f s after the server restarted", rotated_after)

    # The agent restarts: no token, same agent ID, streams reconnect and it is ready again.
    resumed = await load_or_attest(settings(server, tmp_path / "agent"))
    assert resumed.svid.id == agent_id
    async with AgentSync(AgentNode(node.settings, resumed)) as sync:
        await asyncio.wait_for(sync.wait_ready(), 20)
        assert set(sync.cache.workload_entries) == {entry_id, new_entry}
        another = await create_entry(server, agent_id, "/after-agent-restart", "unix:uid:12")
        await eventually(lambda: sync.cache.svid(another) is not None, 5, "SVID after the agent restarted")
