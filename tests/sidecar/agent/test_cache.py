"""The agent's cache: entries from the watch, matching, order and hints, SVID bookkeeping, generation.

Pure: no sockets. SVIDs are minted by a test CA; time is an injected clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import UTC, datetime, timedelta

import pytest

from sidecar.agent.cache import MIN_ROTATION_INTERVAL, AgentCache, CacheError
from sidecar.agent.rotation import renew_at
from sidecar.agent.serverapi import BundleUpdate, Entry, EntryDeltas, JWTSVIDGrant, SnapshotPage
from sidecar.workload.identities import IdentityProvider
from spiffecore import X509SVID, SpiffeID, TrustDomain
from tests.support.ca import TestCA

TD = "spiffe://example.org"
AGENT = SpiffeID.parse(f"{TD}/spire/agent/join_token/abc")
SERVER = SpiffeID.parse(f"{TD}/spire/server")
T0 = datetime(2030, 1, 1, tzinfo=UTC)
CA = TestCA.create("example.org", not_before=T0 - timedelta(days=1), not_after=T0 + timedelta(days=30))


class Clock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


async def no_jwt(entry_id: str, audience: tuple[str, ...]) -> JWTSVIDGrant:
    raise AssertionError("no JWT-SVID expected")


def entry(
    entry_id: str,
    path: str,
    *selectors: str,
    parent: SpiffeID = AGENT,
    hint: str = "",
    dns_names: tuple[str, ...] = (),
    ttl: int = 0,
    created_at: int = 0,
) -> Entry:
    return Entry(
        id=entry_id,
        spiffe_id=SpiffeID.parse(f"{TD}{path}"),
        parent_id=parent,
        selectors=selectors,
        hint=hint,
        dns_names=dns_names,
        x509_svid_ttl=ttl,
        created_at=created_at,
    )


def svid_for(e: Entry, *, start: datetime = T0, lifetime: timedelta = timedelta(hours=1)) -> X509SVID:
    return CA.mint(e.spiffe_id.path, not_before=start, not_after=start + lifetime, dns_names=e.dns_names).svid()


def new_cache(clock: Clock | None = None) -> AgentCache:
    return AgentCache(agent_id=AGENT, bundle=CA.bundle(), jwt_fetch=no_jwt, clock=clock or Clock())


def snapshot(*entries: Entry, revision: int = 1) -> SnapshotPage:
    return SnapshotPage(entries=entries, last=True, revision=revision)


def ids(svids: tuple[X509SVID, ...]) -> list[str]:
    return [str(s.id) for s in svids]


def test_the_cache_is_an_identity_provider() -> None:
    provider: IdentityProvider = new_cache()
    assert provider.trust_domain == TrustDomain.parse("example.org")
    assert provider.generation == 0


# --- entries -----------------------------------------------------------------------------------


def test_workload_entries_are_parented_by_the_agent_or_an_alias() -> None:
    cache = new_cache()
    alias = entry("n1", "/node/rack-1", "spiffe_id:" + str(AGENT), parent=SERVER)
    direct = entry("w1", "/web", "unix:uid:1")
    via_alias = entry("w2", "/db", "unix:uid:2", parent=alias.spiffe_id)
    nested = entry("w3", "/nested", "unix:uid:3", parent=direct.spiffe_id)
    cache.apply(snapshot(alias, direct, via_alias, nested))
    assert set(cache.entries) == {"n1", "w1", "w2", "w3"}
    assert set(cache.workload_entries) == {"w1", "w2"}
    assert cache.x509_context(frozenset({"spiffe_id:" + str(AGENT)})) is None  # an alias is not a workload identity
    assert cache.x509_context(frozenset({"unix:uid:3"})) is None
    assert [e.id for e in cache.due(T0)] == ["w1", "w2"]


def test_losing_an_alias_drops_the_entries_under_it_and_their_svids() -> None:
    cache = new_cache()
    alias = entry("n1", "/node/rack-1", "x:y", parent=SERVER)
    via_alias = entry("w2", "/db", "unix:uid:2", parent=alias.spiffe_id)
    cache.apply(snapshot(alias, via_alias))
    assert cache.store([(via_alias, svid_for(via_alias))]) == 1
    cache.apply(EntryDeltas(upserted=(), removed_ids=("n1",), revision=2))
    assert cache.workload_entries == {}
    assert cache.svid("w2") is None
    assert cache.x509_context(frozenset({"unix:uid:2"})) is None


def test_snapshot_pages_are_collected_and_the_last_replaces_everything() -> None:
    cache = new_cache()
    a, b, c = entry("a", "/a", "s:a"), entry("b", "/b", "s:b"), entry("c", "/c", "s:c")
    cache.apply(snapshot(a, b))
    cache.store([(a, svid_for(a)), (b, svid_for(b))])
    generation = cache.generation
    assert not cache.apply(SnapshotPage(entries=(b,), last=False, revision=5))
    assert set(cache.entries) == {"a", "b"}  # nothing changes before the last page
    assert cache.generation == generation
    assert cache.apply(SnapshotPage(entries=(c,), last=True, revision=5))
    assert set(cache.entries) == {"b", "c"}
    assert cache.revision == 5
    assert cache.svid("a") is None  # its entry is gone
    assert cache.svid("b") is not None  # kept across the reconnection
    assert cache.generation > generation


def test_an_identical_snapshot_after_a_reconnection_changes_nothing() -> None:
    cache = new_cache()
    a = entry("a", "/a", "s:a")
    assert cache.apply(snapshot(a))
    cache.store([(a, svid_for(a))])
    generation = cache.generation
    assert not cache.apply(snapshot(a, revision=9))
    assert cache.generation == generation
    assert cache.revision == 9


def test_deltas_upsert_and_remove() -> None:
    cache = new_cache()
    a, b = entry("a", "/a", "s:a"), entry("b", "/b", "s:b")
    cache.apply(snapshot(a))
    generation = cache.generation
    assert cache.apply(EntryDeltas(upserted=(b,), removed_ids=("a",), revision=3))
    assert set(cache.entries) == {"b"}
    assert cache.generation == generation + 1
    assert not cache.apply(EntryDeltas(upserted=(b,), removed_ids=("zzz",), revision=4))  # no change: no bump
    assert cache.generation == generation + 1
    assert cache.revision == 4


def test_the_bundle_is_replaced_and_must_be_of_the_trust_domain() -> None:
    cache = new_cache()
    assert not cache.apply(BundleUpdate(bundle=CA.bundle()))
    newer = CA.bundle(sequence=2)
    generation = cache.generation
    assert cache.apply(BundleUpdate(bundle=newer))
    assert cache.bundle == newer
    assert cache.generation == generation + 1
    assert cache.federated == {}
    other = TestCA.create("other.org")
    with pytest.raises(CacheError) as caught:
        cache.set_bundle(other.bundle())
    assert (
        str(caught.value) == 'agent-cache: the bundle must be of the agent\'s trust domain (example.org): "other.org"'
    )


# --- matching, order, hints ----------------------------------------------------------------------


def test_an_entry_applies_when_all_its_selectors_are_the_workloads() -> None:
    cache = new_cache()
    both = entry("e1", "/both", "unix:uid:1000", "unix:gid:50")
    one = entry("e2", "/one", "unix:uid:1000")
    cache.apply(snapshot(both, one))
    assert [e.id for e in cache.matching_entries(frozenset({"unix:uid:1000"}))] == ["e2"]
    assert [e.id for e in cache.matching_entries(frozenset({"unix:uid:1000", "unix:gid:50", "x:y"}))] == ["e1", "e2"]
    assert cache.matching_entries(frozenset({"unix:gid:50"})) == []
    assert cache.matching_entries(frozenset()) == []
    assert cache.x509_context(frozenset({"unix:gid:50"})) is None
    assert cache.x509_bundles(frozenset({"unix:gid:50"})) is None
    assert cache.jwt_bundles(frozenset({"unix:gid:50"})) is None


def test_entries_that_apply_without_svids_give_an_empty_context() -> None:
    cache = new_cache()
    cache.apply(snapshot(entry("e1", "/web", "unix:uid:1")))
    context = cache.x509_context(frozenset({"unix:uid:1"}))
    assert context is not None
    assert context.svids == ()
    assert context.bundle == CA.bundle().x509
    assert context.federated == {}


def test_svids_are_ordered_by_spiffe_id_then_entry_id() -> None:
    cache = new_cache()
    entries = [
        entry("9", "/b", "s:1"),
        entry("1", "/c", "s:1"),
        entry("5", "/a", "s:1"),
        entry("3", "/b", "s:1"),
    ]
    cache.apply(snapshot(*entries))
    cache.store([(e, svid_for(e)) for e in entries])
    context = cache.x509_context(frozenset({"s:1"}))
    assert context is not None
    assert ids(context.svids) == [f"{TD}/a", f"{TD}/b", f"{TD}/b", f"{TD}/c"]
    by_entry = {cache.svid(e.id).svid.leaf.serial_number: e.id for e in entries}  # type: ignore[union-attr]
    assert [by_entry[s.leaf.serial_number] for s in context.svids] == ["5", "3", "9", "1"]


def test_duplicate_hints_keep_the_oldest_entry_and_svids_carry_hints() -> None:
    cache = new_cache()
    first = entry("2", "/a", "s:1", hint="internal", created_at=100)
    duplicate = entry("1", "/z", "s:1", hint="internal", created_at=200)
    other = entry("3", "/m", "s:1", hint="external")
    plain = entry("4", "/n", "s:1")
    plain2 = entry("5", "/o", "s:1")
    cache.apply(snapshot(first, duplicate, other, plain, plain2))
    cache.store([(e, svid_for(e)) for e in (first, duplicate, other, plain, plain2)])
    context = cache.x509_context(frozenset({"s:1"}))
    assert context is not None
    assert [(str(s.id), s.hint) for s in context.svids] == [
        (f"{TD}/a", "internal"),
        (f"{TD}/m", "external"),
        (f"{TD}/n", ""),
        (f"{TD}/o", ""),  # empty hints are not duplicates
    ]
    assert [e.id for e in cache.served_entries(frozenset({"s:1"}))] == ["2", "3", "4", "5"]


def test_of_two_entries_sharing_a_hint_the_older_is_served_whatever_the_order() -> None:
    cache = new_cache()
    newer = entry("1", "/a", "s:1", hint="h", created_at=200)
    older = entry("2", "/b", "s:1", hint="h", created_at=100)
    cache.apply(snapshot(newer, older))
    cache.store([(e, svid_for(e)) for e in (newer, older)])
    assert [e.id for e in cache.served_entries(frozenset({"s:1"}))] == ["2"]


def test_a_changed_hint_relabels_the_svid_without_resigning() -> None:
    cache = new_cache()
    e = entry("e1", "/web", "s:1", hint="old")
    cache.apply(snapshot(e))
    cache.store([(e, svid_for(e))])
    serial = cache.svid("e1").svid.leaf.serial_number  # type: ignore[union-attr]
    cache.apply(EntryDeltas(upserted=(dataclasses.replace(e, hint="new", revision=2),), removed_ids=(), revision=2))
    assert cache.due(T0) == []  # a hint is not signed into the certificate
    context = cache.x509_context(frozenset({"s:1"}))
    assert context is not None
    assert [(s.hint, s.leaf.serial_number) for s in context.svids] == [("new", serial)]


def test_bundles_for_a_matching_workload() -> None:
    cache = new_cache()
    cache.apply(snapshot(entry("e1", "/web", "s:1")))
    td = TrustDomain.parse("example.org")
    assert cache.x509_bundles(frozenset({"s:1"})) == {td: CA.bundle().x509}
    assert cache.jwt_bundles(frozenset({"s:1"})) == {td: CA.bundle().jwt}


# --- SVIDs ------------------------------------------------------------------------------------------


def test_due_missing_rotation_and_changed_entries() -> None:
    clock = Clock()
    cache = new_cache(clock)
    a = entry("a", "/a", "s:1")
    b = entry("b", "/b", "s:1", dns_names=("b.example.org",))
    c = entry("c", "/c", "s:1", ttl=600)
    cache.apply(snapshot(a, b, c))
    assert [e.id for e in cache.due(T0)] == ["a", "b", "c"]  # missing
    cache.store([(a, svid_for(a)), (b, svid_for(b)), (c, svid_for(c))])
    assert cache.due(T0) == []
    assert cache.is_ready()
    rotate_a = cache.svid("a").renew_at  # type: ignore[union-attr]
    assert rotate_a == renew_at(cache.svid("a").svid.leaf)  # type: ignore[union-attr]
    assert T0 + timedelta(minutes=24) <= rotate_a < T0 + timedelta(minutes=36)
    assert "a" in [e.id for e in cache.due(rotate_a)]
    assert "a" not in [e.id for e in cache.due(rotate_a - timedelta(seconds=1))]
    changed = (
        dataclasses.replace(a, spiffe_id=SpiffeID.parse(f"{TD}/a2")),
        dataclasses.replace(b, dns_names=("b2.example.org",)),
        dataclasses.replace(c, x509_svid_ttl=60),
    )
    cache.apply(EntryDeltas(upserted=changed, removed_ids=(), revision=2))
    assert sorted(e.id for e in cache.due(T0)) == ["a", "b", "c"]
    context = cache.x509_context(frozenset({"s:1"}))
    assert context is not None
    assert ids(context.svids) == [f"{TD}/b", f"{TD}/c"]  # never an SVID for an ID the entry no longer has


def test_readiness_needs_the_snapshot_and_every_workload_svid() -> None:
    cache = new_cache()
    assert not cache.is_ready()
    a, b = entry("a", "/a", "s:1"), entry("b", "/b", "s:1")
    cache.apply(snapshot(a, b))
    assert not cache.is_ready()
    cache.store([(a, svid_for(a))])
    assert not cache.is_ready()
    cache.store([(b, svid_for(b))])
    assert cache.is_ready()
    empty = new_cache()
    empty.apply(snapshot())
    assert empty.is_ready()  # nothing to sign
    assert empty.generation == 1  # the first snapshot is news even when empty


def test_results_for_entries_that_changed_meanwhile_are_not_stored() -> None:
    cache = new_cache()
    a = entry("a", "/a", "s:1")
    b = entry("b", "/b", "s:1")
    cache.apply(snapshot(a, b))
    requested_a, requested_b = a, b
    cache.apply(
        EntryDeltas(upserted=(dataclasses.replace(a, dns_names=("a.example.org",)),), removed_ids=("b",), revision=2)
    )
    generation = cache.generation
    assert cache.store([(requested_a, svid_for(requested_a)), (requested_b, svid_for(requested_b))]) == 0
    assert cache.generation == generation
    assert [e.id for e in cache.due(T0)] == ["a"]


def test_an_svid_of_another_id_is_not_stored() -> None:
    cache = new_cache()
    a = entry("a", "/a", "s:1")
    cache.apply(snapshot(a))
    assert cache.store([(a, svid_for(entry("x", "/x")))]) == 0


def test_expired_svids_are_not_served_and_are_dropped() -> None:
    clock = Clock()
    cache = new_cache(clock)
    a = entry("a", "/a", "s:1")
    cache.apply(snapshot(a))
    cache.store([(a, svid_for(a, lifetime=timedelta(seconds=60)))])
    clock.advance(59)
    context = cache.x509_context(frozenset({"s:1"}))
    assert context is not None
    assert len(context.svids) == 1
    clock.advance(1)
    context = cache.x509_context(frozenset({"s:1"}))
    assert context is not None
    assert context.svids == ()
    assert not cache.is_ready()
    generation = cache.generation
    assert cache.drop_expired(clock.now) == 1
    assert cache.generation == generation + 1
    assert cache.drop_expired(clock.now) == 0


def test_next_deadline_is_the_next_rotation_or_expiry() -> None:
    clock = Clock()
    cache = new_cache(clock)
    a, b = entry("a", "/a", "s:1"), entry("b", "/b", "s:1")
    cache.apply(snapshot(a, b))
    assert cache.next_deadline(T0) is None
    cache.store([(a, svid_for(a)), (b, svid_for(b, lifetime=timedelta(minutes=90)))])
    rotations = sorted(cache.svid(x).renew_at for x in "ab")  # type: ignore[union-attr]
    assert cache.next_deadline(T0) == rotations[0]
    after_both = max(rotations) + timedelta(seconds=1)
    assert cache.next_deadline(after_both) == T0 + timedelta(hours=1)  # both due: a's expiry is next


def test_an_svid_due_on_arrival_waits_a_moment_before_it_is_due_again() -> None:
    clock = Clock(T0 + timedelta(seconds=50))
    cache = new_cache(clock)
    a = entry("a", "/a", "s:1", ttl=1)
    cache.apply(snapshot(a))
    cache.store([(a, svid_for(a, lifetime=timedelta(seconds=60)))])  # past 60% of its life already
    assert cache.svid("a").renew_at == clock.now + MIN_ROTATION_INTERVAL  # type: ignore[union-attr]
    assert cache.due(clock.now) == []


async def test_changed_wakes_waiters_on_every_visible_change() -> None:
    cache = new_cache()
    seen = cache.generation
    waiter = asyncio.create_task(cache.changed(seen))
    await asyncio.sleep(0)
    assert not waiter.done()
    a = entry("a", "/a", "s:1")
    cache.apply(snapshot(a))
    assert await asyncio.wait_for(waiter, 1) == seen + 1
    seen = cache.generation
    assert await asyncio.wait_for(cache.changed(seen - 1), 1) == seen  # already past: returns at once
    waiter = asyncio.create_task(cache.changed(seen))
    cache.store([(a, svid_for(a))])
    assert await asyncio.wait_for(waiter, 1) == seen + 1


def test_a_new_agent_id_rederives_the_workload_entries() -> None:
    cache = new_cache()
    other_agent = SpiffeID.parse(f"{TD}/spire/agent/x509pop/abc")
    mine, theirs = entry("a", "/a", "s:1"), entry("b", "/b", "s:1", parent=other_agent)
    cache.apply(snapshot(mine, theirs))
    assert set(cache.workload_entries) == {"a"}
    cache.set_agent_id(other_agent)
    assert set(cache.workload_entries) == {"b"}
    with pytest.raises(CacheError):
        cache.set_agent_id(SpiffeID.parse("spiffe://other.org/agent"))


def test_ten_thousand_entries_with_svids() -> None:
    cache = new_cache()
    entries = [entry(f"{i:05d}", f"/w/{i}", f"unix:uid:{i % 1000}", "k8s:ns:prod") for i in range(10_000)]
    cache.apply(snapshot(*entries))
    cache.store([(e, svid_for(e)) for e in entries])
    assert cache.svid_count() == 10_000
    assert cache.is_ready()
    started = time.perf_counter()
    for uid in range(200):
        context = cache.x509_context(frozenset({f"unix:uid:{uid}", "k8s:ns:prod", "unix:gid:1"}))
        assert context is not None
        assert len(context.svids) == 10
    per_lookup = (time.perf_counter() - started) / 200
    assert per_lookup < 0.005, f"{per_lookup * 1e6:.0f} µs per x509_context among 10,000 entries"
    started = time.perf_counter()
    assert cache.due(T0) == []
    assert time.perf_counter() - started < 0.1
