"""The federation poller: fetches every relationship's bundle in time and stores it.

One task per server. It reads the relationships from the store (at once when poked, after a
relationship was created or deleted here, and at least every ``recheck`` seconds, which is how
it learns of another server's changes), fetches each bundle that is due (:mod:`.schedule`) in a
worker thread, at most one fetch per trust domain at a time, and hands the result to the store,
which keeps it only if it is new (:meth:`~controlplane.store.Store.store_federated_bundle`): with
several servers on one database each polls, and the first to store a new bundle wins.

The fetch of an ``https_spiffe`` endpoint is verified with the foreign domain's bundle as last
stored, so after the first fetch the endpoint is trusted by what it served itself, as the
specification's self-serving endpoints are. A failure is recorded with the relationship (its
``last_error``), logged once per streak, and retried with backoff; the last good bundle stays
in use meanwhile.

A relationship the store already refreshed recently (another server did) is first fetched one
interval after that refresh, not at once, so servers starting together do not all fetch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, Protocol

from controlplane.federation.client import BundleFetchError
from controlplane.federation.relationship import FederationRelationship, FederationStatus, StoreOutcome, short_error
from controlplane.federation.schedule import RefreshPolicy
from controlplane.store import Store
from controlplane.store.errors import StoreError
from spiffecore import SpiffeBundle, TrustDomain

DEFAULT_RECHECK: Final = 5.0
# Fetch results, as counted.
SUCCESS: Final = "success"
FAILURE: Final = "failure"

log = logging.getLogger("spiffe-server.federation")


class Fetcher(Protocol):
    """Fetches a relationship's bundle (blocking; run in a thread), verified with ``trusted``."""

    def __call__(
        self, relationship: FederationRelationship, *, trusted: SpiffeBundle | None, now: datetime
    ) -> SpiffeBundle: ...


class PollerMetrics(Protocol):
    def federation_fetch(self, result: str) -> None: ...


class NoMetrics:
    def federation_fetch(self, result: str) -> None:
        pass


@dataclass(slots=True)
class _State:
    due: datetime
    failures: int = 0
    fetching: asyncio.Task[FederationStatus] | None = field(default=None, repr=False)


class BundlePoller:
    """Keeps every federated bundle in the store fresh; see the module's docstring."""

    def __init__(
        self,
        *,
        store: Store,
        fetch: Fetcher,
        clock: Callable[[], datetime],
        on_change: Callable[[], None],
        policy: RefreshPolicy | None = None,
        recheck: float = DEFAULT_RECHECK,
        metrics: PollerMetrics | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self._fetch = fetch
        self._clock = clock
        self._on_change = on_change
        self._policy = policy if policy is not None else RefreshPolicy()
        self._recheck = recheck
        self._metrics = metrics if metrics is not None else NoMetrics()
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 - jitter, not secrets
        self._states: dict[TrustDomain, _State] = {}
        self._poked = asyncio.Event()

    def poke(self) -> None:
        """Re-read the relationships now (call on the poller's loop)."""
        self._poked.set()

    async def run(self) -> None:
        """Poll until cancelled."""
        try:
            while True:
                wait = self._recheck
                self._poked.clear()  # before reading: a poke while reading means "read again"
                try:
                    statuses = await asyncio.to_thread(self._store.list_federation_relationships)
                except StoreError:
                    log.warning("federation: could not read the relationships; retrying", exc_info=True)
                    statuses = None
                if statuses is not None:
                    wait = min(wait, self._start_due(statuses))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._poked.wait(), timeout=max(wait, 0.01))
        finally:
            await self._cancel_fetches()

    def _start_due(self, statuses: list[FederationStatus]) -> float:
        """Start the fetches that are due; return the seconds until the next one is."""
        now = self._clock()
        present = {status.trust_domain for status in statuses}
        for gone in [td for td in self._states if td not in present]:
            state = self._states.pop(gone)
            if state.fetching is not None:
                state.fetching.cancel()
        wait = self._recheck
        for status in statuses:
            state = self._states.setdefault(status.trust_domain, _State(due=self._first_due(status, now)))
            if state.fetching is not None:
                continue
            if state.due <= now:
                self._start_fetch(status, state)
                continue
            wait = min(wait, (state.due - now).total_seconds())
        return wait

    def _start_fetch(self, status: FederationStatus, state: _State) -> None:
        task = asyncio.create_task(
            self._fetch_and_store(status, state, force=False), name=f"federation-fetch-{status.trust_domain}"
        )
        state.fetching = task

        def done(finished: asyncio.Task[FederationStatus]) -> None:
            self._fetched(state, finished)

        task.add_done_callback(done)

    def _first_due(self, status: FederationStatus, now: datetime) -> datetime:
        if status.refreshed_at is None or status.bundle is None or status.last_error:
            return now
        return self._policy.after_success(status.refreshed_at, status.bundle.refresh_hint)

    def _fetched(self, state: _State, task: asyncio.Task[FederationStatus]) -> None:
        if state.fetching is task:
            state.fetching = None
        if not task.cancelled():
            task.exception()  # retrieved: _fetch_and_store logged and recorded any failure
        self._poked.set()  # plan the next fetch

    async def refresh(self, trust_domain: TrustDomain) -> FederationStatus:
        """Fetch ``trust_domain``'s bundle now, accepting a lower sequence number than the stored one's.

        Returns the relationship as stored afterwards. Raises :class:`NotFoundError` for an unknown
        trust domain and :class:`BundleFetchError` when the fetch fails.
        """
        status = await asyncio.to_thread(self._store.get_federation_relationship, trust_domain)
        state = self._states.setdefault(trust_domain, _State(due=self._clock()))
        await self._fetch_and_store(status, state, force=True)
        self._poked.set()
        return await asyncio.to_thread(self._store.get_federation_relationship, trust_domain)

    async def _fetch_and_store(self, status: FederationStatus, state: _State, *, force: bool) -> FederationStatus:
        relationship = status.relationship
        td = relationship.trust_domain
        now = self._clock()
        try:
            bundle = await asyncio.to_thread(self._fetch, relationship, trusted=status.bundle, now=now)
        except BundleFetchError as err:
            await self._failed(status, state, err, now)
            raise
        try:
            outcome = await asyncio.to_thread(self._store.store_federated_bundle, td, bundle, at=now, force=force)
        except StoreError as err:
            await self._failed(status, state, err, now, record=False)
            raise
        self._metrics.federation_fetch(SUCCESS)
        if state.failures:
            log.info("federation: fetching the bundle works again", extra={"trust_domain": td.name})
        state.failures = 0
        state.due = self._policy.after_success(now, bundle.refresh_hint)
        if outcome is StoreOutcome.STORED:
            log.info(
                "federation: stored a new bundle",
                extra={"trust_domain": td.name, "sequence": bundle.sequence, "refresh_hint": bundle.refresh_hint},
            )
            self._on_change()
        elif outcome is StoreOutcome.STALE:
            log.info(
                "federation: fetched an older bundle than the stored one; kept the stored one",
                extra={"trust_domain": td.name, "sequence": bundle.sequence},
            )
        return status

    async def _failed(
        self, status: FederationStatus, state: _State, err: Exception, now: datetime, *, record: bool = True
    ) -> None:
        td = status.trust_domain
        self._metrics.federation_fetch(FAILURE)
        state.failures += 1
        hint = status.bundle.refresh_hint if status.bundle is not None else None
        delay = self._policy.retry_delay(state.failures, hint, jitter=self._rng.random())
        state.due = now + delay
        log.log(
            logging.WARNING if state.failures == 1 else logging.DEBUG,
            "federation: could not fetch the bundle; the last known one stays in use",
            extra={"trust_domain": td.name, "error": str(err), "retry_in": round(delay.total_seconds(), 1)},
        )
        if not record:
            return
        try:
            await asyncio.to_thread(self._store.record_federation_failure, td, short_error(err), at=now)
        except StoreError:
            log.warning("federation: could not record a failed fetch", exc_info=True)

    async def _cancel_fetches(self) -> None:
        tasks = [state.fetching for state in self._states.values() if state.fetching is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, BundleFetchError, StoreError):
                await task
