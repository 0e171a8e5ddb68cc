"""The JWT-SVID cache: reuse until half-life, coalesced fetches, bounds. Injected clock, fake fetch."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from sidecar.agent.cache import AgentCache
from sidecar.agent.jwtcache import JWTSVIDCache, audience_key
from sidecar.agent.serverapi import Entry, EntryDeltas, JWTSVIDGrant, ServerAPIError, SnapshotPage
from spiffecore import SpiffeID
from tests.support.ca import TestCA

TD = "spiffe://example.org"
AGENT = SpiffeID.parse(f"{TD}/spire/agent/join_token/abc")
T0 = datetime.now(UTC).replace(microsecond=0)
CA = TestCA.create("example.org")
TTL = timedelta(minutes=5)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class FakeServer:
    """Signs JWT-SVIDs for known entries, counting calls; can be slowed down or made to fail."""

    def __init__(self, clock: Clock, entries: list[Entry]) -> None:
        self.clock = clock
        self.entries = {e.id: e for e in entries}
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self.gate: asyncio.Event | None = None
        self.error: ServerAPIError | None = None
        self.token: str | None = None

    async def fetch(self, entry_id: str, audience: tuple[str, ...]) -> JWTSVIDGrant:
        self.calls.append((entry_id, audience))
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        entry = self.entries[entry_id]
        now = self.clock()
        token = self.token or CA.mint_jwt(entry.spiffe_id.path, audience=audience, expires_in=TTL, now=now)
        return JWTSVIDGrant(entry.spiffe_id, token, now + TTL)


def entry(entry_id: str, path: str, *selectors: str, hint: str = "") -> Entry:
    return Entry(id=entry_id, spiffe_id=SpiffeID.parse(f"{TD}{path}"), parent_id=AGENT, selectors=selectors, hint=hint)


def setup(*entries: Entry, max_size: int = 100) -> tuple[Clock, FakeServer, JWTSVIDCache]:
    clock = Clock()
    server = FakeServer(clock, list(entries))
    cache = JWTSVIDCache(
        server.fetch,
        entries_for=lambda selectors: [e for e in entries if set(e.selectors) <= selectors],
        clock=clock,
        max_size=max_size,
    )
    return clock, server, cache


def test_audiences_are_keyed_as_sets() -> None:
    assert audience_key(["b", "a", "b"]) == ("a", "b")


async def test_a_token_is_reused_while_more_than_half_its_life_remains() -> None:
    web = entry("e1", "/web", "s:1", hint="h")
    clock, server, cache = setup(web)
    first = await cache.get(web, ["b", "a"])
    assert first.id == web.spiffe_id
    assert first.audience == ("a", "b")
    assert first.hint == "h"
    assert server.calls == [("e1", ("a", "b"))]
    clock.advance(TTL.total_seconds() / 2 - 1)
    assert (await cache.get(web, ["a", "b"])).token == first.token
    assert len(server.calls) == 1
    clock.advance(1)  # half its life gone: fetch a new one
    second = await cache.get(web, ["a", "b"])
    assert len(server.calls) == 2
    assert second.expiry > first.expiry


async def test_concurrent_requests_for_one_key_share_one_fetch() -> None:
    web = entry("e1", "/web", "s:1")
    _, server, cache = setup(web)
    server.gate = asyncio.Event()
    waiters = [asyncio.create_task(cache.get(web, ["x", "y"] if i % 2 else ["y", "x"])) for i in range(20)]
    await asyncio.sleep(0.01)
    assert len(server.calls) == 1
    server.gate.set()
    tokens = {(await w).token for w in waiters}
    assert len(tokens) == 1
    assert cache.fetches == 1
    other = await cache.get(web, ["z"])  # another audience is another key
    assert other.token not in tokens
    assert cache.fetches == 2


async def test_a_failed_fetch_reaches_every_waiter_and_is_not_cached() -> None:
    web = entry("e1", "/web", "s:1")
    _, server, cache = setup(web)
    server.gate = asyncio.Event()
    server.error = ServerAPIError(grpc.StatusCode.UNAVAILABLE, "connection refused")
    waiters = [asyncio.create_task(cache.get(web, ["a"])) for _ in range(3)]
    await asyncio.sleep(0.01)
    server.gate.set()
    for waiter in waiters:
        with pytest.raises(ServerAPIError) as caught:
            await waiter
        assert caught.value.code is grpc.StatusCode.UNAVAILABLE
    assert len(cache) == 0
    server.error = None
    await cache.get(web, ["a"])
    assert len(server.calls) == 2


async def test_a_waiter_that_gives_up_does_not_cancel_the_fetch_for_the_others() -> None:
    web = entry("e1", "/web", "s:1")
    _, server, cache = setup(web)
    server.gate = asyncio.Event()
    impatient = asyncio.create_task(cache.get(web, ["a"]))
    patient = asyncio.create_task(cache.get(web, ["a"]))
    await asyncio.sleep(0.01)
    impatient.cancel()
    await asyncio.sleep(0.01)
    server.gate.set()
    assert (await patient).id == web.spiffe_id
    assert impatient.cancelled()
    assert len(server.calls) == 1


async def test_the_cache_is_bounded_least_recently_used_first() -> None:
    entries = [entry(f"e{i}", f"/w{i}", "s:1") for i in range(3)]
    _, server, cache = setup(*entries, max_size=2)
    await cache.get(entries[0], ["a"])
    await cache.get(entries[1], ["a"])
    await cache.get(entries[0], ["a"])  # e0 is now the most recently used
    await cache.get(entries[2], ["a"])  # evicts e1
    assert len(cache) == 2
    await cache.get(entries[0], ["a"])
    assert len(server.calls) == 3
    await cache.get(entries[1], ["a"])
    assert len(server.calls) == 4


async def test_a_token_for_an_old_spiffe_id_is_not_reused() -> None:
    web = entry("e1", "/web", "s:1")
    _, server, cache = setup(web)
    await cache.get(web, ["a"])
    renamed = dataclasses.replace(web, spiffe_id=SpiffeID.parse(f"{TD}/web2"))
    server.entries["e1"] = renamed
    assert (await cache.get(renamed, ["a"])).id == renamed.spiffe_id
    assert len(server.calls) == 2


async def test_a_token_for_another_id_or_a_malformed_one_is_an_internal_error() -> None:
    web = entry("e1", "/web", "s:1")
    _, server, cache = setup(web)
    server.token = CA.mint_jwt("/intruder", audience=["a"], now=T0)
    with pytest.raises(ServerAPIError) as caught:
        await cache.get(web, ["a"])
    assert caught.value.code is grpc.StatusCode.INTERNAL
    assert caught.value.message == f"the server sent a JWT-SVID whose subject is {TD}/intruder, not {TD}/web"
    server.token = "not-a-jwt"
    with pytest.raises(ServerAPIError) as caught:
        await cache.get(web, ["a"])
    assert caught.value.message.startswith("the server sent a malformed JWT-SVID (jwtsvid: ")


async def test_jwt_svids_for_a_workload_by_selectors_and_spiffe_id() -> None:
    a, b = entry("e1", "/a", "s:1", hint="one"), entry("e2", "/b", "s:1", "s:2")
    _, server, cache = setup(a, b)
    assert await cache.jwt_svids(frozenset({"s:9"}), ("aud",), None) == []
    both = await cache.jwt_svids(frozenset({"s:1", "s:2"}), ("aud",), None)
    assert [(str(s.id), s.hint) for s in both] == [(f"{TD}/a", "one"), (f"{TD}/b", "")]
    only_b = await cache.jwt_svids(frozenset({"s:1", "s:2"}), ("aud",), SpiffeID.parse(f"{TD}/b"))
    assert [str(s.id) for s in only_b] == [f"{TD}/b"]
    assert len(server.calls) == 2  # b's token came from the cache
    assert await cache.jwt_svids(frozenset({"s:1"}), ("aud",), SpiffeID.parse(f"{TD}/b")) == []


async def test_through_the_agent_cache_removed_entries_lose_their_tokens() -> None:
    clock = Clock()
    a, b = entry("e1", "/a", "s:1", hint="h"), entry("e2", "/b", "s:1", hint="h")
    server = FakeServer(clock, [a, b])
    cache = AgentCache(agent_id=AGENT, bundle=CA.bundle(), jwt_fetch=server.fetch, clock=clock)
    assert await cache.jwt_svids(frozenset({"s:1"}), ("aud",), None) == []  # no entries yet
    cache.apply(SnapshotPage(entries=(a, b), last=True, revision=1))
    svids = await cache.jwt_svids(frozenset({"s:1"}), ("aud",), None)
    assert [str(s.id) for s in svids] == [f"{TD}/a"]  # duplicate hint: the first in order only
    assert len(cache.jwt) == 1
    cache.apply(EntryDeltas(upserted=(), removed_ids=("e1",), revision=2))
    assert len(cache.jwt) == 0
    assert [str(s.id) for s in await cache.jwt_svids(frozenset({"s:1"}), ("aud",), None)] == [f"{TD}/b"]


def test_max_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="jwtcache: max_size must be at least 1, got 0"):
        JWTSVIDCache(FakeServer(Clock(), []).fetch, entries_for=lambda s: [], max_size=0)
