"""A real spiffe-server process, administered through its CLI, and agents over real TLS gRPC.

One server serves this module (each test uses its own tokens, agents and entries); it is stopped
with SIGTERM at the end, which must be prompt and exit 0.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from datetime import UTC, datetime

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from sidecar.agent.serverapi import (
    JOIN_TOKEN,
    X509POP,
    AgentAPIClient,
    AgentIdentity,
    BundleUpdate,
    EntryDeltas,
    FederatedBundlesUpdate,
    ServerAPIError,
    SnapshotPage,
    attest,
    make_csr,
    x509pop_answerer,
    x509pop_payload,
)
from spiffecore import SpiffeID, verify_x509_svid
from tests.integration.support import TD_ID, Watcher, create_entry, join, unique, watching
from tests.support.ca import Minted, TestCA, new_key
from tests.support.server import ServerProcess

MAX_BATCH = 1000


def sha1(certificate: x509.Certificate) -> str:
    return hashlib.sha1(certificate.public_bytes(Encoding.DER), usedforsecurity=False).hexdigest()


async def assert_refused(client: AgentAPIClient, entry_id: str, message: str) -> None:
    """Every authenticated RPC of the agent API ends with PERMISSION_DENIED and ``message``."""
    calls = {
        "RenewAgent": client.renew(),
        "BatchNewX509SVID": client.batch_new_x509_svid([(entry_id, new_key())]),
        "NewJWTSVID": client.new_jwt_svid(entry_id, ["aud"]),
        "GetBundle": client.get_bundle(),
        "WatchEntries": anext(client.watch_entries()),
    }
    for name, call in calls.items():
        with pytest.raises(ServerAPIError) as caught:
            await call
        assert (name, caught.value.code, caught.value.message) == (name, grpc.StatusCode.PERMISSION_DENIED, message)


async def drain(watcher: Watcher) -> None:
    """Read watch events until the watch fails."""
    while True:
        await watcher.next()


# 1 -----------------------------------------------------------------------------------------------


async def test_join_token_agent_id_and_svid_verifies_against_the_cli_bundle(server: ServerProcess) -> None:
    token = await server.atoken()
    # 48 hex digits: never a leading '-' that a command line would take for a flag.
    assert re.fullmatch(r"[0-9a-f]{48}", token), token
    identity = await attest(
        server.address, roots_pem=server.roots_pem(), attestation_type=JOIN_TOKEN, payload=token.encode()
    )
    assert identity.svid.id == SpiffeID.parse(f"{TD_ID}/spire/agent/join_token/{token}")
    bundle = server.bundle()  # `bundle show --format spiffe`
    verified = verify_x509_svid(identity.svid.cert_chain, bundle, at=datetime.now(UTC))
    assert verified.id == identity.svid.id
    assert identity.bundle.x509 == bundle.x509


# 2 -----------------------------------------------------------------------------------------------


async def test_a_join_token_works_once(server: ServerProcess) -> None:
    token = await server.atoken()
    options = {"roots_pem": server.roots_pem(), "attestation_type": JOIN_TOKEN, "payload": token.encode()}
    await attest(server.address, **options)  # type: ignore[arg-type]
    with pytest.raises(ServerAPIError) as caught:
        await attest(server.address, **options)  # type: ignore[arg-type]
    assert caught.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.message == "attest: join token refused (join token is unknown or was already used)"


async def test_an_expired_join_token_is_refused(server: ServerProcess) -> None:
    token = await server.atoken("--ttl", "1")
    await asyncio.sleep(1.1)
    with pytest.raises(ServerAPIError) as caught:
        await attest(server.address, roots_pem=server.roots_pem(), attestation_type=JOIN_TOKEN, payload=token.encode())
    assert caught.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.message == "attest: join token refused (join token has expired)"


# 3 -----------------------------------------------------------------------------------------------


async def test_batch_signs_only_what_the_agent_is_authorized_for(server: ServerProcess) -> None:
    agent, other = await join(server), await join(server)
    mine = await create_entry(server, agent.svid.id, "--dns-name", "web.example.org", "--dns-name", "*.web.example.org")
    theirs = await create_entry(server, other.svid.id)
    count = server.entry_count()
    key = new_key()
    async with AgentAPIClient(agent, server.address) as client:
        signed, stolen, garbage = await client.batch_new_x509_svid(
            [(mine["id"], key), (theirs["id"], make_csr(new_key())), (mine["id"], b"not a CSR")]
        )
        with pytest.raises(ServerAPIError) as too_many:
            await client.batch_new_x509_svid([(mine["id"], make_csr(key))] * (MAX_BATCH + 1))

    assert signed.ok
    assert signed.svid is not None
    assert str(signed.svid.id) == mine["spiffe_id"]
    sans = signed.svid.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [mine["spiffe_id"]]
    assert sorted(sans.get_values_for_type(x509.DNSName)) == ["*.web.example.org", "web.example.org"]
    verify_x509_svid(signed.svid.cert_chain, server.bundle(), at=datetime.now(UTC))

    assert stolen.error is not None
    assert stolen.cert_chain == ()
    assert stolen.svid is None
    assert stolen.error.code is grpc.StatusCode.PERMISSION_DENIED
    assert stolen.error.message == f'agent-api: entry is not authorized for this agent: "{theirs["id"]}"'

    assert garbage.error is not None
    assert garbage.cert_chain == ()
    assert garbage.error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert garbage.error.message.startswith("ca: ")

    assert too_many.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert too_many.value.message == f'entry: a batch holds at most {MAX_BATCH} CSRs: "{MAX_BATCH + 1}"'
    assert server.entry_count() == count


# 4 -----------------------------------------------------------------------------------------------


async def test_a_join_token_alias_authorizes_the_entries_under_it(server: ServerProcess) -> None:
    alias = f"{TD_ID}/{unique('node')}"
    agent = await join(server, "--spiffe-id", alias)
    workload = await create_entry(server, alias)
    async with AgentAPIClient(agent, server.address) as client, watching(client) as watcher:
        _, bundle = await watcher.next()
        assert isinstance(bundle, BundleUpdate)
        assert (await watcher.next())[1] == FederatedBundlesUpdate(bundles={})
        _, page = await watcher.next()
        assert isinstance(page, SnapshotPage)
        assert page.last
        by_id = {str(entry.spiffe_id): entry for entry in page.entries}
        assert set(by_id) == {alias, workload["spiffe_id"]}
        assert by_id[alias].parent_id == SpiffeID.parse(f"{TD_ID}/spire/server")
        assert by_id[alias].selectors == (f"spiffe_id:{agent.svid.id}",)
        (result,) = await client.batch_new_x509_svid([(workload["id"], new_key())])
    assert result.svid is not None
    assert str(result.svid.id) == workload["spiffe_id"]


# 5 -----------------------------------------------------------------------------------------------


def node_identity(node_ca: TestCA, name: str) -> Minted:
    return node_ca.intermediate().mint(uris=[], subject=name)


async def attest_node(server: ServerProcess, node: Minted) -> AgentIdentity:
    return await attest(
        server.address,
        roots_pem=server.roots_pem(),
        attestation_type=X509POP,
        payload=x509pop_payload(node.chain),
        answer_challenge=x509pop_answerer(node.key),
    )


async def test_a_banned_agent_is_refused_everything_and_cannot_reattest(server: ServerProcess, node_ca: TestCA) -> None:
    node = node_identity(node_ca, unique("banned"))
    agent = await attest_node(server, node)
    entry = await create_entry(server, agent.svid.id)
    async with AgentAPIClient(agent, server.address) as client, watching(client) as watcher:
        await watcher.next()  # the bundle: the watch is open
        banned = await server.acli_json("agent", "ban", str(agent.svid.id))
        assert banned["banned"] is True
        message = f'agent-api: agent is banned: "{agent.svid.id}"'
        with pytest.raises(ServerAPIError) as ended:  # the open watch ends too
            await drain(watcher)
        assert (ended.value.code, ended.value.message) == (grpc.StatusCode.PERMISSION_DENIED, message)
        await assert_refused(client, entry["id"], message)
    with pytest.raises(ServerAPIError) as again:
        await attest_node(server, node)
    assert (again.value.code, again.value.message) == (grpc.StatusCode.PERMISSION_DENIED, message)


async def test_an_evicted_agent_is_refused_until_it_attests_again(server: ServerProcess, node_ca: TestCA) -> None:
    node = node_identity(node_ca, unique("evicted"))
    agent = await attest_node(server, node)
    entry = await create_entry(server, agent.svid.id)
    await server.acli("agent", "evict", str(agent.svid.id))
    async with AgentAPIClient(agent, server.address) as client:
        await assert_refused(
            client, entry["id"], f'agent-api: agent is not attested (or was evicted): "{agent.svid.id}"'
        )
    reattested = await attest_node(server, node)  # x509pop agents may attest again after an eviction
    assert reattested.svid.id == agent.svid.id
    async with AgentAPIClient(reattested, server.address) as client:
        (result,) = await client.batch_new_x509_svid([(entry["id"], new_key())])
    assert result.ok


# 6 -----------------------------------------------------------------------------------------------


async def test_renewal_supersedes_the_old_svid(server: ServerProcess) -> None:
    agent = await join(server)
    async with AgentAPIClient(agent, server.address) as client:
        renewed = await client.renew()
    assert renewed.id == agent.svid.id
    assert renewed.leaf.serial_number != agent.svid.leaf.serial_number
    shown = await server.acli_json("agent", "show", str(agent.svid.id))
    assert shown["serial"] == f"{renewed.leaf.serial_number:x}"
    async with AgentAPIClient(agent, server.address) as old:
        with pytest.raises(ServerAPIError) as caught:
            await old.get_bundle()
    assert caught.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.message == f'agent-api: this agent SVID was superseded by a newer one: "{agent.svid.id}"'


# 7 -----------------------------------------------------------------------------------------------


async def test_watch_sends_bundle_snapshot_pages_then_deltas(server: ServerProcess) -> None:
    agent, other = await join(server), await join(server)
    entries = [await create_entry(server, agent.svid.id) for _ in range(5)]
    async with AgentAPIClient(agent, server.address) as client, watching(client, page_size=2) as watcher:
        _, first = await watcher.next()
        assert isinstance(first, BundleUpdate)
        assert first.bundle.x509 == server.bundle().x509
        assert (await watcher.next())[1] == FederatedBundlesUpdate(bundles={})  # no entry federates
        pages = [(await watcher.next())[1] for _ in range(3)]
        assert all(isinstance(page, SnapshotPage) for page in pages)
        snapshot = [page for page in pages if isinstance(page, SnapshotPage)]
        assert [len(page.entries) for page in snapshot] == [2, 2, 1]
        assert [page.last for page in snapshot] == [False, False, True]
        assert len({page.revision for page in snapshot}) == 1
        assert snapshot[0].revision >= max(e["revision"] for e in entries)
        assert sorted(e.id for page in snapshot for e in page.entries) == sorted(e["id"] for e in entries)

        await create_entry(server, other.svid.id)  # another agent's: must never reach this watch
        started = time.monotonic()
        created = await create_entry(server, agent.svid.id)
        acknowledged = time.monotonic()
        arrived, delta = await watcher.next(timeout=5)
        print(
            f"\nentry created via the CLI (process ran {(acknowledged - started) * 1000:.0f} ms): "
            f"delta arrived {(arrived - started) * 1000:.0f} ms after the CLI started, "
            f"{(arrived - acknowledged) * 1000:.0f} ms after it exited"
        )
        assert isinstance(delta, EntryDeltas)
        assert [e.id for e in delta.upserted] == [created["id"]]
        assert delta.removed_ids == ()
        assert delta.revision >= created["revision"] > snapshot[0].revision
        assert arrived - acknowledged < 1.0

        await server.acli("entry", "delete", entries[0]["id"])
        _, removal = await watcher.next(timeout=5)
        assert isinstance(removal, EntryDeltas)
        assert removal.upserted == ()
        assert removal.removed_ids == (entries[0]["id"],)
        assert watcher.pending() == 0


# 8 -----------------------------------------------------------------------------------------------


async def test_x509pop_attestation(server: ServerProcess, node_ca: TestCA) -> None:
    intermediate = node_ca.intermediate()
    name = unique("node")
    node = intermediate.mint(uris=[], subject=name)
    with pytest.raises(ServerAPIError) as wrong:
        await attest(
            server.address,
            roots_pem=server.roots_pem(),
            attestation_type=X509POP,
            payload=x509pop_payload(node.chain),
            answer_challenge=x509pop_answerer(new_key()),
        )
    assert wrong.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert wrong.value.message == "attest: x509pop proof of possession failed: the challenge signature is not valid"

    agent = await attest_node(server, node)
    assert str(agent.svid.id) == f"{TD_ID}/spire/agent/x509pop/{sha1(node.leaf)}"
    assert agent.can_reattest is True
    shown = await server.acli_json("agent", "show", str(agent.svid.id))
    assert shown["attestation_type"] == "x509pop"
    assert sorted(shown["selectors"]) == sorted(
        [
            f"x509pop:ca:fingerprint:{sha1(intermediate.cert)}",
            f"x509pop:ca:fingerprint:{sha1(node_ca.cert)}",
            f"x509pop:serialnumber:{node.leaf.serial_number:x}",
            f"x509pop:subject:cn:{name}",
        ]
    )
