"""Change notification: NOTIFY reaches another server within a second; the re-check covers SQLite."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from controlplane.store import Change, ChangeFeed, ChangeListener, Store, StoreError, StoreVersion, sqlite_url
from tests.controlplane.store.conftest import postgres_database
from tests.controlplane.store.support import NOW, make_entry
from tests.support.ca import TestCA

ZERO = StoreVersion(entry_revision=0, bundle_sequence=0)


@pytest.fixture
def postgres_pair(postgres_server: URL) -> Iterator[tuple[Store, Store]]:
    """Two servers' stores on one PostgreSQL database."""
    with postgres_database(postgres_server) as url, Store.open(url) as first, Store.open(url) as second:
        yield first, second


def test_entry_change_on_one_server_reaches_another_within_a_second(postgres_pair: tuple[Store, Store]) -> None:
    watching, writing = postgres_pair
    # a re-check too slow to matter: only NOTIFY can be this fast
    with ChangeFeed(watching, recheck_interval=60) as feed:
        started = time.monotonic()
        entry = writing.create_entry(make_entry("a"))
        version = feed.wait(ZERO, timeout=1.0)
        elapsed = time.monotonic() - started

        assert version == StoreVersion(entry_revision=entry.revision, bundle_sequence=0)
        assert elapsed < 1.0

        writing.add_x509_authority("server-b", TestCA.create().cert)
        assert feed.wait(version, timeout=1.0) == StoreVersion(entry_revision=1, bundle_sequence=1)


def test_listener_calls_back_with_each_committed_change(postgres_pair: tuple[Store, Store]) -> None:
    watching, writing = postgres_pair
    changes: list[Change] = []
    done = threading.Event()

    def on_change(change: Change) -> None:
        changes.append(change)
        if len(changes) == 3:
            done.set()

    with ChangeListener(watching.url, on_change) as listener:
        listener.start()
        assert listener.listening
        a = writing.create_entry(make_entry("a"))
        writing.delete_entry(a.id)
        writing.remove_expired_authorities(NOW)  # nothing removed: no change, no notification
        writing.create_entries([make_entry("b"), make_entry("c")])
        assert done.wait(2.0)

    assert changes == [Change("entries", 1), Change("entries", 2), Change("entries", 4)]


def test_a_rolled_back_write_notifies_nobody(postgres_pair: tuple[Store, Store]) -> None:
    watching, writing = postgres_pair
    writing.create_entry(make_entry("a"))
    with ChangeFeed(watching, recheck_interval=60) as feed:
        seen = feed.version
        with pytest.raises(StoreError):
            writing.create_entry(make_entry("a"))

        assert feed.wait(seen, timeout=0.3) == seen


def test_recheck_finds_changes_without_notifications(store_url: str) -> None:
    with Store.open(store_url) as watching, Store.open(store_url) as writing:
        with ChangeFeed(watching, recheck_interval=0.05, listen=False) as feed:
            woken: list[StoreVersion] = []
            unsubscribe = feed.subscribe(woken.append)
            writing.create_entry(make_entry("a"))

            version = feed.wait(ZERO, timeout=2.0)

            unsubscribe()
        assert version.entry_revision == 1
        assert woken[-1] == version


def test_wait_times_out_with_the_version_unchanged(store: Store) -> None:
    store.create_entry(make_entry("a"))
    with ChangeFeed(store, recheck_interval=0.05) as feed:
        seen = feed.version

        started = time.monotonic()
        assert feed.wait(seen, timeout=0.2) == seen
        assert time.monotonic() - started >= 0.2
    assert seen == StoreVersion(entry_revision=1, bundle_sequence=0)


def test_sqlite_has_no_listener(tmp_path: Path) -> None:
    with Store.open(sqlite_url(tmp_path)) as store, pytest.raises(StoreError) as caught:
        ChangeListener(store.url, lambda change: None)

    assert str(caught.value) == "store: change listener needs PostgreSQL (SQLite has no LISTEN; poll instead)"


def test_listener_that_cannot_connect_says_so(postgres_server: URL) -> None:
    url = postgres_server.set(database="spiffe_store_no_such_database", password="hunter2")
    listener = ChangeListener(url, lambda change: None)

    with pytest.raises(StoreError) as caught:
        listener.start(timeout=5)

    assert str(caught.value).startswith('store: change listener could not listen: "OperationalError: ')
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("payload", "change"),
    [
        ("entries:12", Change("entries", 12)),
        ("bundle:3", Change("bundle", 3)),
        ("entries:", None),
        ("entries:-1", None),
        ("agents:1", None),
        ("", None),
    ],
)
def test_change_payloads(payload: str, change: Change | None) -> None:
    assert Change.parse(payload) == change
