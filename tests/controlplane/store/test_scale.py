"""50,000 entries: bulk creation, snapshot paging and indexed lookups stay fast on both databases.

The agent's entry watch starts with a full snapshot in pages; 50,000 entries is the target. The
timings are printed (run with ``-s``) and bounded loosely, to catch a lost index or a quadratic
path rather than to benchmark.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from controlplane.model import Selector, agent_id
from controlplane.store import Store
from tests.controlplane.store.conftest import DATABASES, empty_store_url
from tests.controlplane.store.support import TD, make_entry

ENTRIES = 50_000
AGENTS = 500
BATCH = 5_000
PAGE = 1_000


@pytest.fixture(scope="module", params=DATABASES)
def big_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """A store of 50,000 entries, built once per database for this module's (read-only) tests."""
    with empty_store_url(request, tmp_path_factory.mktemp("big")) as url, Store.open(url) as store:
        fill(store)
        yield store


def fill(store: Store) -> None:
    for start in range(0, ENTRIES, BATCH):
        store.create_entries(
            [
                make_entry(
                    f"w{i}",
                    parent=agent_id(TD, "k8s_psat", f"node-{i % AGENTS}"),
                    selectors=(f"k8s:ns:ns-{i % 100}", f"k8s:pod-uid:{i}"),
                )
                for i in range(start, start + BATCH)
            ]
        )


def test_snapshot_pages_of_50k_entries(big_store: Store) -> None:
    started = time.perf_counter()
    seen: set[str] = set()
    revisions: set[int] = set()
    after = ""
    pages = 0
    while True:
        page, revision = big_store.snapshot_page(after, PAGE)
        if not page:
            break
        pages += 1
        revisions.add(revision)
        seen.update(e.id for e in page)
        after = page[-1].id
    elapsed = time.perf_counter() - started

    print(f"\n[{big_store.dialect}] snapshot of {ENTRIES} entries in {pages} pages of {PAGE}: {elapsed:.2f} s")
    assert len(seen) == ENTRIES
    assert pages == ENTRIES // PAGE
    assert revisions == {ENTRIES}
    assert elapsed < 15


def test_lookups_among_50k_entries_use_indexes(big_store: Store) -> None:
    started = time.perf_counter()
    for i in range(100):
        by_selector = big_store.list_entries(selector=Selector.parse(f"k8s:pod-uid:{i * 7}"))
        by_parent = big_store.list_entries(parent_id=agent_id(TD, "k8s_psat", f"node-{i}"))
        assert [e.spiffe_id.path for e in by_selector] == [f"/workload/w{i * 7}"]
        assert len(by_parent) == ENTRIES // AGENTS
    elapsed = time.perf_counter() - started

    print(f"\n[{big_store.dialect}] 100 lookups by selector and 100 by parent (100 entries each): {elapsed:.2f} s")
    assert len(big_store.list_entries(selector=Selector.parse("k8s:ns:ns-3"))) == ENTRIES // 100
    assert elapsed < 10
