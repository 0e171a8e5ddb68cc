"""Federation in the store: relationships, their foreign bundles, and idempotent storing of fetched bundles."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from controlplane.federation.relationship import (
    BundleEndpointProfile,
    FederationRelationship,
    FederationStatus,
    StoreOutcome,
)
from controlplane.store import FederationExistsError, NotFoundError, Store, StoreError
from spiffecore import SpiffeID, TrustDomain
from tests.controlplane.store.support import NOW
from tests.support.ca import TestCA

OTHER = TrustDomain.parse("other.org")
THIRD = TrustDomain.parse("third.org")


def spiffe_relationship(td: TrustDomain = OTHER) -> FederationRelationship:
    return FederationRelationship(
        trust_domain=td,
        bundle_endpoint_url=f"https://{td.name}:8443/",
        profile=BundleEndpointProfile.HTTPS_SPIFFE,
        endpoint_spiffe_id=SpiffeID.from_segments(td, "spire", "server"),
    )


def web_relationship(td: TrustDomain = THIRD) -> FederationRelationship:
    return FederationRelationship(
        trust_domain=td, bundle_endpoint_url=f"https://bundle.{td.name}/", profile=BundleEndpointProfile.HTTPS_WEB
    )


def test_a_relationship_is_stored_with_its_bootstrap_bundle(store: Store) -> None:
    bundle = TestCA.create("other.org").bundle(sequence=7)

    created = store.create_federation_relationship(spiffe_relationship(), bundle, at=NOW)

    assert created == FederationStatus(relationship=spiffe_relationship(), bundle=bundle)
    assert created.relationship.created_at == NOW
    found = store.get_federation_relationship(OTHER)
    assert found.relationship == spiffe_relationship()
    assert found.relationship.created_at == NOW
    assert found.bundle == bundle
    assert (found.refreshed_at, found.last_attempt_at, found.last_error) == (None, None, "")
    assert store.federated_bundles() == {OTHER: bundle}
    assert store.federation_revision() == 1
    assert store.version().federation_revision == 1


def test_relationships_are_listed_by_trust_domain_with_or_without_a_bundle(store: Store) -> None:
    store.create_federation_relationship(web_relationship())
    store.create_federation_relationship(spiffe_relationship(), TestCA.create("other.org").bundle())

    listed = store.list_federation_relationships()

    assert [status.trust_domain for status in listed] == [OTHER, THIRD]
    assert listed[1].bundle is None
    assert set(store.federated_bundles()) == {OTHER}


def test_a_second_relationship_with_the_same_trust_domain_is_refused(store: Store) -> None:
    store.create_federation_relationship(web_relationship(OTHER))

    with pytest.raises(FederationExistsError) as caught:
        store.create_federation_relationship(spiffe_relationship(), TestCA.create("other.org").bundle())

    assert str(caught.value) == 'store: a federation relationship with this trust domain already exists: "other.org"'
    assert store.federation_revision() == 1
    assert store.federated_bundles() == {}


def test_a_bundle_of_another_trust_domain_is_refused(store: Store) -> None:
    with pytest.raises(StoreError, match=r"bundle of third\.org given for the relationship with"):
        store.create_federation_relationship(spiffe_relationship(), TestCA.create("third.org").bundle())


def test_deleting_a_relationship_removes_its_bundle(store: Store) -> None:
    bundle = TestCA.create("other.org").bundle()
    store.create_federation_relationship(spiffe_relationship(), bundle)

    deleted = store.delete_federation_relationship(OTHER)

    assert deleted.bundle == bundle
    assert store.federated_bundles() == {}
    assert store.list_federation_relationships() == []
    assert store.federation_revision() == 2
    with pytest.raises(NotFoundError, match=r'no federation relationship with this trust domain: "other\.org"'):
        store.get_federation_relationship(OTHER)
    with pytest.raises(NotFoundError):
        store.delete_federation_relationship(OTHER)


def test_a_fetched_bundle_replaces_the_stored_one_once(store: Store) -> None:
    ca = TestCA.create("other.org")
    store.create_federation_relationship(spiffe_relationship(), ca.bundle(sequence=1))
    fetched = ca.bundle(sequence=2, refresh_hint=60)

    assert store.store_federated_bundle(OTHER, fetched, at=NOW) is StoreOutcome.STORED
    assert store.store_federated_bundle(OTHER, fetched, at=NOW + timedelta(minutes=1)) is StoreOutcome.UNCHANGED

    status = store.get_federation_relationship(OTHER)
    assert status.bundle == fetched
    assert status.bundle.refresh_hint == 60
    assert status.refreshed_at == NOW + timedelta(minutes=1)
    assert store.federation_revision() == 2  # created, then stored once


def test_an_older_sequence_loses_unless_forced(store: Store) -> None:
    ca = TestCA.create("other.org")
    store.create_federation_relationship(spiffe_relationship(), ca.bundle(sequence=5))
    older = TestCA.create("other.org").bundle(sequence=4)

    assert store.store_federated_bundle(OTHER, older, at=NOW) is StoreOutcome.STALE
    assert store.get_federation_relationship(OTHER).bundle == ca.bundle(sequence=5)

    assert store.store_federated_bundle(OTHER, older, at=NOW, force=True) is StoreOutcome.STORED
    assert store.get_federation_relationship(OTHER).bundle == older


def test_a_bundle_for_a_deleted_relationship_is_not_stored(store: Store) -> None:
    assert store.store_federated_bundle(OTHER, TestCA.create("other.org").bundle(), at=NOW) is StoreOutcome.GONE
    assert store.federated_bundles() == {}
    assert store.federation_revision() == 0


def test_failures_are_recorded_and_cleared_by_the_next_success(store: Store) -> None:
    ca = TestCA.create("other.org")
    store.create_federation_relationship(spiffe_relationship(), ca.bundle())

    assert store.record_federation_failure(OTHER, "connection refused", at=NOW)
    failed = store.get_federation_relationship(OTHER)
    assert (failed.last_attempt_at, failed.refreshed_at, failed.last_error) == (NOW, None, "connection refused")
    assert failed.bundle == ca.bundle()  # the last known bundle stays
    assert store.federation_revision() == 1  # agents see nothing new

    later = NOW + timedelta(minutes=5)
    store.store_federated_bundle(OTHER, ca.bundle(), at=later)
    recovered = store.get_federation_relationship(OTHER)
    assert (recovered.last_attempt_at, recovered.refreshed_at, recovered.last_error) == (later, later, "")
    assert not store.record_federation_failure(THIRD, "no such relationship", at=NOW)


def test_servers_storing_the_same_fetch_at_once_store_it_once(store_url: str) -> None:
    """Several servers on one database poll the same endpoint: exactly one of them stores the answer."""
    ca = TestCA.create("other.org")
    stores = [Store.open(store_url) for _ in range(4)]
    try:
        stores[0].create_federation_relationship(spiffe_relationship(), ca.bundle(sequence=1))
        fetched = ca.bundle(sequence=2)
        barrier = threading.Barrier(len(stores))
        outcomes: list[StoreOutcome] = []
        errors: list[BaseException] = []

        def fetch_and_store(store: Store) -> None:
            barrier.wait()
            try:
                outcomes.append(store.store_federated_bundle(OTHER, fetched, at=NOW))
            except StoreError as err:
                errors.append(err)

        threads = [threading.Thread(target=fetch_and_store, args=(store,)) for store in stores]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert errors == []
        assert sorted(outcome.value for outcome in outcomes) == ["stored", "unchanged", "unchanged", "unchanged"]
        assert stores[1].federation_revision() == 2
        assert stores[2].federated_bundles() == {OTHER: fetched}
    finally:
        for store in stores:
            store.close()


def test_a_delete_racing_a_fetch_leaves_no_bundle(store_url: str) -> None:
    ca = TestCA.create("other.org")
    with Store.open(store_url) as first, Store.open(store_url) as second:
        first.create_federation_relationship(spiffe_relationship(), ca.bundle(sequence=1))
        barrier = threading.Barrier(2)
        outcomes: list[StoreOutcome] = []

        def fetch() -> None:
            barrier.wait()
            outcomes.append(second.store_federated_bundle(OTHER, ca.bundle(sequence=2), at=NOW))

        thread = threading.Thread(target=fetch)
        thread.start()
        barrier.wait()
        first.delete_federation_relationship(OTHER)
        thread.join()

        assert outcomes[0] in (StoreOutcome.STORED, StoreOutcome.GONE)
        assert first.federated_bundles() == {}
        assert second.list_federation_relationships() == []
