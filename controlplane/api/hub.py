"""The entry hub: every registration entry in memory, current within milliseconds of a change.

One refresher task per server reads the store's entry events after the last revision it has
seen and applies them to an :class:`~controlplane.authorized.EntryIndex`, then wakes every watch
stream. It runs when poked (after a write on this server, or a database notification of a write
on another) and at least every ``recheck`` interval, so a lost notification delays a change by
that interval at most. The trust bundle is followed the same way, by its sequence number, and
the bundles of federated trust domains by the store's federation revision.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from datetime import timedelta
from types import MappingProxyType
from typing import Final

from controlplane.authorized import EntryIndex
from controlplane.store import Store
from controlplane.store.errors import EventsPrunedError, StoreError
from spiffecore import SpiffeBundle, TrustDomain

PAGE: Final = 5000
DEFAULT_RECHECK: Final = timedelta(seconds=1)

log = logging.getLogger(__name__)


class EntryHub:
    """Keeps :attr:`index`, :attr:`bundle` and :attr:`federated` current; watchers await :meth:`changed`.

    :attr:`federated` maps each federated trust domain with a known bundle to it; the mapping and
    its bundles are replaced, never changed, so a watcher can tell a change by identity.
    """

    def __init__(self, store: Store, trust_domain: TrustDomain, *, recheck: timedelta = DEFAULT_RECHECK) -> None:
        self._store = store
        self._trust_domain = trust_domain
        self._recheck = recheck.total_seconds()
        self.index = EntryIndex()
        self.revision = 0
        self.bundle: SpiffeBundle | None = None
        self.federated: Mapping[TrustDomain, SpiffeBundle] = MappingProxyType({})
        self.federation_revision = -1
        self.generation = 0
        self._poked = asyncio.Event()
        self._woken = False
        self._changed = asyncio.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ready = asyncio.Event()
        self.closing = False

    async def load(self) -> None:
        """Read every entry and the bundle: the starting point the events are applied to."""
        index, revision = await asyncio.to_thread(self._load_all)
        self.index, self.revision = index, revision
        self.bundle = await asyncio.to_thread(self._store.get_bundle, self._trust_domain)
        await self._load_federated()
        self._loop = asyncio.get_running_loop()
        self.ready.set()

    def _load_all(self) -> tuple[EntryIndex, int]:
        index = EntryIndex()
        revision = self._store.current_revision()
        after = ""
        while True:
            page, _ = self._store.snapshot_page(after, PAGE)
            index.apply(page, ())
            if len(page) < PAGE:
                return index, revision
            after = page[-1].id

    def poke(self) -> None:
        """Ask for a refresh now. Safe to call from any thread."""
        if self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._poked.set)

    def wake(self) -> None:
        """Wake every watcher although no entry changed, so each re-checks its agent (banned, evicted).

        Safe to call from any thread.
        """
        if self._loop is None:
            return

        def wake_now() -> None:
            self._woken = True
            self._poked.set()

        self._loop.call_soon_threadsafe(wake_now)

    async def run(self) -> None:
        """Refresh on every poke, and at least every ``recheck``; runs until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poked.wait(), timeout=self._recheck)
            self._poked.clear()
            woken, self._woken = self._woken, False
            try:
                changed = await self.refresh()
            except StoreError:
                log.warning("could not refresh entries from the store; retrying", exc_info=True)
                changed = False
            if changed or woken:
                async with self._changed:
                    self.generation += 1
                    self._changed.notify_all()

    async def refresh(self) -> bool:
        """Apply new entry events and a new bundle, if any. Returns whether anything changed."""
        changed = False
        while True:
            try:
                events = await asyncio.to_thread(self._store.events_since, self.revision, PAGE)
            except EventsPrunedError:
                log.warning("entry events were pruned past our revision; reloading every entry")
                index, revision = await asyncio.to_thread(self._load_all)
                self.index, self.revision, changed = index, revision, True
                continue
            if not events:
                break
            upserted = [event.entry for event in events if event.entry is not None]
            removed = [event.entry_id for event in events if event.entry is None]
            self.index.apply(upserted, removed)
            self.revision = events[-1].revision
            changed = True
            if len(events) < PAGE:
                break
        version = await asyncio.to_thread(self._store.version)
        if self.bundle is None or version.bundle_sequence != (self.bundle.sequence or 0):
            self.bundle = await asyncio.to_thread(self._store.get_bundle, self._trust_domain)
            changed = True
        if version.federation_revision != self.federation_revision:
            changed = await self._load_federated() or changed
        return changed

    async def _load_federated(self) -> bool:
        """Read the federated bundles; keep the objects of those that did not change. Whether any did."""
        revision = await asyncio.to_thread(self._store.federation_revision)
        loaded = await asyncio.to_thread(self._store.federated_bundles)
        previous = self.federated
        kept = {td: previous[td] if previous.get(td) == bundle else bundle for td, bundle in loaded.items()}
        self.federation_revision = revision
        if kept.keys() == previous.keys() and all(kept[td] is previous[td] for td in kept):
            return False
        self.federated = MappingProxyType(kept)
        return True

    async def changed(self, seen: int) -> int:
        """Wait until the generation moves past ``seen``; return the new generation.

        Once the hub is :attr:`closing`, returns at once: watchers end their streams.
        """
        async with self._changed:
            await self._changed.wait_for(lambda: self.generation > seen or self.closing)
            return self.generation

    async def close(self) -> None:
        """The server is stopping: wake every watcher so its stream ends now, not at the grace deadline."""
        async with self._changed:
            self.closing = True
            self._changed.notify_all()
