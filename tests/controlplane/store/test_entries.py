"""Registration entries: create, read, update, delete, duplicates, listing, revisions and events."""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from controlplane.model import RegistrationEntry, Selector
from controlplane.store import (
    EntryEvent,
    EntryExistsError,
    EventsPrunedError,
    NotFoundError,
    Store,
    StoreError,
)
from spiffecore import SpiffeError, SpiffeID
from tests.controlplane.store.support import AGENT, OTHER_AGENT, TD, full_entry, make_entry


def test_create_assigns_id_revision_and_created_at(store: Store) -> None:
    created = store.create_entry(full_entry())

    assert str(uuid.UUID(created.id)) == created.id
    assert created.revision == 1
    assert created.created_at is not None
    assert created.created_at.tzinfo is not None
    assert store.current_revision() == 1


def test_every_field_survives_a_round_trip(store: Store) -> None:
    created = store.create_entry(full_entry())

    read = store.get_entry(created.id)

    assert read == created
    assert read.created_at == created.created_at
    assert read.dns_names == ("web.example.org", "*.web.example.org")  # order kept: the first is the CN
    assert read.hint == "web ✓"


def test_an_id_given_by_the_caller_is_kept(store: Store) -> None:
    created = store.create_entry(make_entry("a", id="my-entry"))

    assert created.id == "my-entry"
    assert store.get_entry("my-entry") == created


def test_duplicate_entry_is_refused(store: Store) -> None:
    store.create_entry(make_entry("web", selectors=("unix:uid:1", "unix:gid:2")))

    with pytest.raises(EntryExistsError) as caught:
        store.create_entry(make_entry("web", selectors=("unix:gid:2", "unix:uid:1")))

    assert str(caught.value) == 'store: similar entry already exists: "spiffe://example.org/workload/web"'
    assert isinstance(caught.value, SpiffeError)
    assert store.count_entries() == 1
    assert store.current_revision() == 1  # the failed write took no revision


@pytest.mark.parametrize(
    "different",
    [
        make_entry("web", parent=OTHER_AGENT),
        make_entry("other"),
        make_entry("web", selectors=("unix:uid:1000", "unix:gid:1")),
    ],
    ids=["parent", "spiffe-id", "selectors"],
)
def test_entries_differing_in_one_key_part_are_not_duplicates(store: Store, different: RegistrationEntry) -> None:
    store.create_entry(make_entry("web"))

    store.create_entry(different)

    assert store.count_entries() == 2


def test_duplicate_id_is_refused(store: Store) -> None:
    store.create_entry(make_entry("a", id="same"))

    with pytest.raises(EntryExistsError):
        store.create_entry(make_entry("b", id="same"))


def test_update_replaces_the_entry_and_keeps_created_at(store: Store) -> None:
    created = store.create_entry(make_entry("web"))
    changed = dataclasses.replace(created, selectors=(Selector.parse("k8s:sa:web"),), x509_svid_ttl=60, hint="new")

    updated = store.update_entry(changed)

    assert updated.revision == 2
    assert updated.created_at == created.created_at
    assert store.get_entry(created.id) == updated
    assert store.list_entries(selector=Selector.parse("unix:uid:1000")) == []
    assert store.list_entries(selector=Selector.parse("k8s:sa:web")) == [updated]


def test_update_of_an_unknown_entry_is_not_found(store: Store) -> None:
    with pytest.raises(NotFoundError) as caught:
        store.update_entry(make_entry("web", id="missing"))

    assert str(caught.value) == 'store: no entry with this ID: "missing"'
    assert store.current_revision() == 0


def test_update_into_a_duplicate_is_refused(store: Store) -> None:
    store.create_entry(make_entry("a"))
    other = store.create_entry(make_entry("b"))

    with pytest.raises(EntryExistsError):
        store.update_entry(dataclasses.replace(other, spiffe_id=SpiffeID.from_segments(TD, "workload", "a")))

    assert store.get_entry(other.id) == other


def test_delete_returns_the_entry_and_removes_it(store: Store) -> None:
    created = store.create_entry(full_entry())

    deleted = store.delete_entry(created.id)

    assert deleted == created
    with pytest.raises(NotFoundError):
        store.get_entry(created.id)
    with pytest.raises(NotFoundError):
        store.delete_entry(created.id)
    assert store.count_entries() == 0
    assert store.list_entries(selector=Selector.parse("k8s:sa:web")) == []
    # the similarity key is free again
    store.create_entry(full_entry())


def test_list_filters_by_spiffe_id_parent_and_selector(store: Store) -> None:
    a = store.create_entry(make_entry("a", selectors=("unix:uid:1", "k8s:ns:prod")))
    b = store.create_entry(make_entry("b", selectors=("unix:uid:1",), parent=OTHER_AGENT))
    c = store.create_entry(make_entry("a", selectors=("unix:uid:2",), parent=OTHER_AGENT))

    def ids(entries: list[RegistrationEntry]) -> set[str]:
        return {e.id for e in entries}

    assert ids(store.list_entries()) == {a.id, b.id, c.id}
    assert ids(store.list_entries(spiffe_id=a.spiffe_id)) == {a.id, c.id}
    assert ids(store.list_entries(parent_id=OTHER_AGENT)) == {b.id, c.id}
    assert ids(store.list_entries(selector=Selector.parse("unix:uid:1"))) == {a.id, b.id}
    assert ids(store.list_entries(selector=Selector.parse("unix:uid:1"), parent_id=AGENT)) == {a.id}
    assert store.list_entries(selector=Selector.parse("unix:uid:3")) == []
    assert [e.selectors for e in store.list_entries(spiffe_id=a.spiffe_id, parent_id=AGENT)] == [a.selectors]


def test_list_pages_in_id_order(store: Store) -> None:
    created = store.create_entries([make_entry(f"w{i}") for i in range(25)])
    expected = sorted(e.id for e in created)

    seen: list[str] = []
    after = ""
    while page := store.list_entries(after_id=after, limit=10):
        seen.extend(e.id for e in page)
        after = page[-1].id

    assert seen == expected
    assert [e.id for e in store.list_entries(parent_id=AGENT, after_id=expected[9], limit=5)] == expected[10:15]


def test_create_entries_is_all_or_nothing(store: Store) -> None:
    store.create_entry(make_entry("taken"))

    with pytest.raises(EntryExistsError):
        store.create_entries([make_entry("new"), make_entry("taken")])

    assert store.count_entries() == 1
    assert store.current_revision() == 1


def test_every_change_takes_the_next_revision_and_records_an_event(store: Store) -> None:
    a = store.create_entry(make_entry("a"))
    b = store.create_entry(make_entry("b"))
    a2 = store.update_entry(dataclasses.replace(a, hint="changed"))
    store.delete_entry(b.id)

    events = store.events_since(0)

    assert [(e.revision, e.entry_id, e.kind) for e in events] == [
        (1, a.id, "create"),
        (2, b.id, "create"),
        (3, a.id, "update"),
        (4, b.id, "delete"),
    ]
    assert events[0].entry == a2  # events carry the entry as it is now
    assert events[1].entry is None  # b no longer exists
    assert store.events_since(2) == events[2:]
    assert store.events_since(1, limit=2) == events[1:3]
    assert store.events_since(4) == []
    assert store.current_revision() == 4


def test_snapshot_then_events_reconstructs_the_store(store: Store) -> None:
    for i in range(10):
        store.create_entry(make_entry(f"w{i}"))
    first_page, revision = store.snapshot_page("", 4)
    # changes while the snapshot is being paged
    changed = store.update_entry(dataclasses.replace(first_page[0], hint="changed"))
    store.delete_entry(first_page[1].id)
    added = store.create_entry(make_entry("late"))

    replica = {e.id: e for e in first_page}
    after = first_page[-1].id
    while True:
        page, _ = store.snapshot_page(after, 4)
        if not page:
            break
        replica.update((e.id, e) for e in page)
        after = page[-1].id
    for event in store.events_since(revision):
        apply(replica, event)

    assert revision == 10
    assert replica == {e.id: e for e in store.list_entries()}
    assert replica[changed.id] == changed
    assert added.id in replica


def apply(replica: dict[str, RegistrationEntry], event: EntryEvent) -> None:
    if event.entry is None:
        replica.pop(event.entry_id, None)
    else:
        replica[event.entry_id] = event.entry


def test_snapshot_page_rejects_an_empty_page(store: Store) -> None:
    with pytest.raises(StoreError):
        store.snapshot_page("", 0)


def test_pruned_events_are_reported_not_skipped(store: Store) -> None:
    for i in range(5):
        store.create_entry(make_entry(f"w{i}"))

    assert store.prune_events(4) == 3

    assert [e.revision for e in store.events_since(3)] == [4, 5]
    with pytest.raises(EventsPrunedError) as caught:
        store.events_since(2)
    assert str(caught.value) == ("store: entry events after revision 2 are gone (pruned before 4): take a new snapshot")
    assert store.prune_events(2) == 0  # the horizon never moves back
    with pytest.raises(EventsPrunedError):
        store.events_since(2)


def test_pruning_past_the_current_revision_keeps_future_events(store: Store) -> None:
    store.create_entry(make_entry("a"))

    store.prune_events(100)
    b = store.create_entry(make_entry("b"))

    assert [e.entry for e in store.events_since(1)] == [b]


def test_store_is_safe_to_share_between_threads(store: Store) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=8) as pool:
        created = list(pool.map(lambda i: store.create_entry(make_entry(f"t{i}")), range(80)))

    assert sorted(e.revision for e in created) == list(range(1, 81))
    assert [e.revision for e in store.events_since(0, limit=100)] == list(range(1, 81))
    assert store.count_entries() == 80
