"""The poller against a real store and real bundle endpoints: fetch, follow a foreign rotation, fail, recover."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from controlplane.federation.client import BundleFetchError, FetchLimits, fetch_bundle
from controlplane.federation.poller import BundlePoller
from controlplane.federation.relationship import FederationRelationship, FederationStatus
from controlplane.federation.schedule import RefreshPolicy
from controlplane.store import NotFoundError, Store, sqlite_url
from spiffecore import SpiffeBundle, TrustDomain
from tests.controlplane.federation.support import ForeignDomain, RecordingMetrics

FAST = RefreshPolicy(
    min_interval=timedelta(milliseconds=200),
    max_interval=timedelta(milliseconds=200),
    first_retry=timedelta(milliseconds=50),
)


def fetch(relationship: FederationRelationship, *, trusted: SpiffeBundle | None, now: datetime) -> SpiffeBundle:
    return fetch_bundle(relationship, trusted=trusted, now=now, limits=FetchLimits(timeout=5))


@dataclass
class Running:
    store: Store
    poller: BundlePoller
    metrics: RecordingMetrics
    changes: list[int]

    async def until(self, check: Callable[[FederationStatus], bool], trust_domain: TrustDomain) -> FederationStatus:
        async with asyncio.timeout(10):
            while True:
                status = await asyncio.to_thread(self.store.get_federation_relationship, trust_domain)
                if check(status):
                    return status
                await asyncio.sleep(0.02)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(sqlite_url(tmp_path)) as opened:
        yield opened


@pytest.fixture
async def running(store: Store) -> AsyncIterator[Running]:
    metrics = RecordingMetrics()
    changes: list[int] = []
    poller = BundlePoller(
        store=store,
        fetch=fetch,
        clock=lambda: datetime.now(UTC),
        on_change=lambda: changes.append(1),
        policy=FAST,
        recheck=0.1,
        metrics=metrics,
    )
    task = asyncio.create_task(poller.run())
    try:
        yield Running(store=store, poller=poller, metrics=metrics, changes=changes)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def domain() -> AsyncIterator[ForeignDomain]:
    foreign = ForeignDomain.create()
    endpoint = await foreign.start()
    try:
        yield foreign
    finally:
        await endpoint.close()


async def test_a_new_relationship_is_fetched_at_once_and_then_at_every_interval(
    running: Running, domain: ForeignDomain
) -> None:
    bootstrap = domain.ca.bundle(sequence=0, refresh_hint=None)
    running.store.create_federation_relationship(domain.relationship(), bootstrap)
    running.poller.poke()

    first = await running.until(lambda s: s.refreshed_at is not None, domain.ca.trust_domain)
    assert first.bundle is not None
    assert (first.bundle.sequence, first.bundle.refresh_hint) == (1, 300)
    assert first.last_error == ""
    assert running.changes == [1]

    domain.bundle = domain.ca.bundle(sequence=2)  # the next poll, 0.2 s later, picks it up
    second = await running.until(lambda s: s.bundle is not None and s.bundle.sequence == 2, domain.ca.trust_domain)
    assert second.refreshed_at is not None
    assert second.refreshed_at > first.refreshed_at  # type: ignore[operator]
    assert running.changes == [1, 1]
    assert set(running.metrics.fetches) == {"success"}


async def test_a_foreign_root_rotation_is_followed_through_the_bundle_it_announced(
    running: Running, domain: ForeignDomain
) -> None:
    running.store.create_federation_relationship(domain.relationship(), domain.bundle)
    running.poller.poke()
    await running.until(lambda s: s.refreshed_at is not None, domain.ca.trust_domain)

    # The foreign domain announces its next root first, then serves with an SVID under it.
    next_ca = ForeignDomain.create().ca
    domain.bundle = SpiffeBundle.create(
        domain.ca.trust_domain, x509_authorities=(domain.ca.cert, next_ca.cert), sequence=2
    )
    await running.until(lambda s: s.bundle is not None and s.bundle.sequence == 2, domain.ca.trust_domain)
    domain.present(next_ca.mint("/spire/server"))
    domain.bundle = SpiffeBundle.create(domain.ca.trust_domain, x509_authorities=(next_ca.cert,), sequence=3)
    rotated = await running.until(lambda s: s.bundle is not None and s.bundle.sequence == 3, domain.ca.trust_domain)
    assert rotated.bundle is not None
    assert rotated.bundle.x509.authorities == (next_ca.cert,)

    # A root it never announced is refused, and the last good bundle stays.
    domain.present(ForeignDomain.create().ca.mint("/spire/server"))
    failed = await running.until(lambda s: s.last_error != "", domain.ca.trust_domain)
    assert "bundle endpoint's certificate was refused" in failed.last_error
    assert failed.bundle == rotated.bundle


async def test_an_unreachable_endpoint_is_retried_and_recovers(running: Running, domain: ForeignDomain) -> None:
    unreachable = domain.relationship("https://127.0.0.1:1/")
    running.store.create_federation_relationship(unreachable, domain.bundle)
    running.poller.poke()
    failed = await running.until(lambda s: s.last_error != "", domain.ca.trust_domain)
    assert failed.last_error.startswith("federation: could not connect to the bundle endpoint (ConnectionRefusedError")
    assert failed.bundle == domain.bundle

    # The operator fixes the URL (delete and create again); the poller fetches the new one.
    running.store.delete_federation_relationship(domain.ca.trust_domain)
    running.store.create_federation_relationship(domain.relationship(), domain.bundle)
    running.poller.poke()
    recovered = await running.until(lambda s: s.refreshed_at is not None, domain.ca.trust_domain)
    assert recovered.last_error == ""
    assert running.metrics.fetches.count("failure") >= 1
    assert running.metrics.fetches[-1] == "success"


async def test_refresh_fetches_now_and_accepts_an_older_sequence(running: Running, domain: ForeignDomain) -> None:
    domain.bundle = domain.ca.bundle(sequence=1)
    running.store.create_federation_relationship(domain.relationship(), domain.ca.bundle(sequence=9))

    refreshed = await running.poller.refresh(domain.ca.trust_domain)
    assert refreshed.bundle is not None
    assert refreshed.bundle.sequence == 1  # the foreign domain started afresh; the operator's refresh takes it

    with pytest.raises(NotFoundError):
        await running.poller.refresh(TrustDomain.parse("unknown.org"))
    running.store.delete_federation_relationship(domain.ca.trust_domain)
    running.store.create_federation_relationship(domain.relationship("https://127.0.0.1:1/"), domain.bundle)
    with pytest.raises(BundleFetchError, match="could not connect to the bundle endpoint"):
        await running.poller.refresh(domain.ca.trust_domain)


async def test_servers_that_refreshed_recently_are_not_fetched_again_at_start(
    store: Store, domain: ForeignDomain
) -> None:
    """A relationship another server refreshed a moment ago is fetched one interval later, not at once."""
    store.create_federation_relationship(domain.relationship(), domain.bundle)
    store.store_federated_bundle(domain.ca.trust_domain, domain.ca.bundle(sequence=1), at=datetime.now(UTC))
    metrics = RecordingMetrics()
    slow = RefreshPolicy(min_interval=timedelta(seconds=30), max_interval=timedelta(seconds=30))
    poller = BundlePoller(
        store=store, fetch=fetch, clock=lambda: datetime.now(UTC), on_change=lambda: None, policy=slow, metrics=metrics
    )
    task = asyncio.create_task(poller.run())
    await asyncio.sleep(0.5)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert metrics.fetches == []
    assert domain.metrics.requests == []
