"""The agent's long-running work against the control plane: watch, sign, renew.

:class:`AgentSync` runs three tasks over one :class:`AgentAPIClient`:

1. **Watch.** It holds the ``WatchEntries`` stream and applies what arrives to the cache
   (:class:`~sidecar.agent.cache.AgentCache`): the bundle (also persisted in the data directory),
   the snapshot's pages, then deltas. The watch is the agent's view of whether the server is
   there: when the stream fails or ends, the whole *session* (client, channel and the three
   tasks) ends, and a new one starts after jittered exponential backoff. Each session opens a new
   channel, so gRPC's own reconnection backoff (which grows to two minutes) never delays the
   return, and the signer starts afresh the moment the server is back. The first failure of a
   streak is logged, and the recovery, not every retry; the backoff resets once a new stream has
   delivered a full snapshot, so a stream that connects and drops at once cannot make a tight loop.
2. **Sign.** Whenever the cache has workload entries without a fitting SVID, or with one past
   its rotation time, it makes EC P-256 keys and CSRs (in a thread), asks the server to sign them
   in batches of at most ``batch_size`` (500) and stores the results. It wakes on every cache
   change and on a timer set to the next rotation or expiry. When the server is unavailable it
   retries with backoff and drops nothing: SVIDs stay served until they expire. An entry the
   server refuses is logged and retried with its own backoff, without holding up the others.
3. **Renew** the agent's own SVID (:meth:`AgentNode.maintain`). If the agent had to attest again,
   the three tasks restart over a client with the new identity; the cache is kept.

**Readiness** (:attr:`AgentSync.ready`, set once): the first full snapshot arrived and every
workload entry has an SVID. :meth:`AgentSync.wait_ready` waits for it, or raises what stopped
the tasks.

Use ``async with AgentSync(node) as sync:`` (the tasks stop at the end of the block) or run
:meth:`AgentSync.run` in a task group of one's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Final, Self

import grpc

from sidecar.agent import rotation
from sidecar.agent.cache import AgentCache
from sidecar.agent.jwtcache import DEFAULT_MAX_SIZE
from sidecar.agent.node import AgentNode
from sidecar.agent.serverapi import (
    AgentAPIClient,
    BundleUpdate,
    Entry,
    JWTSVIDGrant,
    ServerAPIError,
    SnapshotPage,
    WatchEvent,
    generate_key,
    make_csr,
)
from spiffecore import X509SVID, PrivateKey, SpiffeError

logger = logging.getLogger("sidecar.agent.sync")

MAX_BATCH: Final = 500
"""The server's limit of CSRs per BatchNewX509SVID call."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


class _Reattested(Exception):  # noqa: N818 - a signal between tasks, not an error
    """The agent attested again: start a new session over a client with the new identity."""


class _StreamLost(Exception):  # noqa: N818 - a signal between tasks, not an error
    """The watch failed or ended: start a new session, with a new channel, after ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        super().__init__(delay)
        self.delay = delay


def _keys_and_csrs(count: int) -> list[tuple[PrivateKey, bytes]]:
    """``count`` new EC P-256 keys with their DER CSRs (CPU-bound: run in a thread)."""
    pairs: list[tuple[PrivateKey, bytes]] = []
    for _ in range(count):
        key = generate_key()
        pairs.append((key, make_csr(key)))
    return pairs


class AgentSync:
    """Keeps :attr:`cache` in step with the control plane; see the module's docstring."""

    def __init__(
        self,
        node: AgentNode,
        *,
        batch_size: int = MAX_BATCH,
        page_size: int = 0,
        clock: Callable[[], datetime] = _utcnow,
        rng: random.Random | None = None,
        jwt_cache_size: int = DEFAULT_MAX_SIZE,
    ) -> None:
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"sync: batch_size must be from 1 to {MAX_BATCH}, got {batch_size}")
        self.node = node
        identity = node.identity
        self.cache = AgentCache(
            agent_id=identity.svid.id,
            bundle=identity.bundle,
            jwt_fetch=self._new_jwt_svid,
            clock=clock,
            jwt_cache_size=jwt_cache_size,
        )
        self.ready = asyncio.Event()
        """Set once the first full snapshot arrived and every workload entry has an SVID."""
        self._batch_size = batch_size
        self._page_size = page_size
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 - jitter, not secrets
        self._client: AgentAPIClient | None = None
        self._retries: dict[str, tuple[rotation.Backoff, datetime]] = {}
        self._sign_backoff = rotation.Backoff(rng=self._rng)
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        """BatchNewX509SVID calls that succeeded (for tests and metrics)."""

    # --- lifecycle ---------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self.run(), name="agent-sync")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def wait_ready(self) -> None:
        """Wait for :attr:`ready`; raise whatever ended the tasks first, if they ended."""
        task = self._task
        if task is None:
            await self.ready.wait()
            return
        waiter = asyncio.ensure_future(self.ready.wait())
        try:
            await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not self.ready.is_set():
            task.result()  # raises what ended it
            raise RuntimeError("sync: the agent's tasks ended before it was ready")

    async def run(self) -> None:
        """Watch, sign and renew until cancelled, one session (client and tasks) at a time."""
        backoff = rotation.Backoff(rng=self._rng)
        while True:
            identity = self.node.identity
            self.cache.set_agent_id(identity.svid.id)
            delay: float | None = None
            async with AgentAPIClient(identity, self.node.settings.server_address) as client:
                self._client = client
                try:
                    async with asyncio.TaskGroup() as group:
                        group.create_task(self._watch(client, backoff), name="agent-watch")
                        group.create_task(self._sign(client), name="agent-sign")
                        group.create_task(self._renew(client), name="agent-renew")
                except* _Reattested:
                    logger.info("starting a new session with the new agent identity")
                    backoff.reset()
                except* _StreamLost as lost:
                    delay = max(getattr(signal, "delay", 0.0) for signal in lost.exceptions)
                finally:
                    self._client = None
            if delay is not None:
                await asyncio.sleep(delay)

    async def _renew(self, client: AgentAPIClient) -> None:
        await self.node.maintain(client)
        raise _Reattested

    # --- the watch -------------------------------------------------------------------------------

    async def _watch(self, client: AgentAPIClient, backoff: rotation.Backoff) -> None:
        """Hold the watch until it fails, then end the session (:class:`_StreamLost`)."""
        error: SpiffeError | None = None
        try:
            async for event in client.watch_entries(self._page_size):
                self._apply(event)
                if backoff.failing and isinstance(event, SnapshotPage) and event.last:
                    logger.info("the entry watch is back", extra={"attempts": backoff.attempts})
                    backoff.reset()
        except SpiffeError as err:  # ServerAPIError, or a malformed event
            error = err
        if not backoff.failing:
            logger.warning(
                "the entry watch stream ended; reconnecting with backoff",
                extra={"error": str(error) if error is not None else "closed by the server"},
            )
        raise _StreamLost(backoff.next_delay())

    def _apply(self, event: WatchEvent) -> None:
        if not self.cache.apply(event):
            return
        if isinstance(event, BundleUpdate):
            try:
                self.node.save_bundle(event.bundle)
            except OSError as err:
                logger.error("cannot persist the trust bundle", extra={"error": str(err)})
        self._check_ready()

    def _check_ready(self) -> None:
        if not self.ready.is_set() and self.cache.is_ready():
            self.ready.set()
            logger.info("ready: every workload entry has an SVID", extra={"entries": len(self.cache.workload_entries)})

    # --- the signer ------------------------------------------------------------------------------

    async def _sign(self, client: AgentAPIClient) -> None:
        backoff = self._sign_backoff  # kept across sessions: a failure streak is logged once
        while True:
            now = self._clock()
            if self.cache.drop_expired(now):
                logger.warning("workload SVIDs expired before they could be renewed")
            self._forget_retries()
            due = [entry for entry in self.cache.due(now) if self._may_try(entry.id, now)]
            if due:
                try:
                    await self._sign_batches(client, due)
                except ServerAPIError as err:
                    if not backoff.failing:
                        logger.warning(
                            "cannot sign workload SVIDs; retrying with backoff (valid SVIDs are still served)",
                            extra={"error": str(err), "due": len(due)},
                        )
                    await asyncio.sleep(backoff.next_delay())
                    continue
                if backoff.failing:
                    logger.info("signing workload SVIDs again", extra={"attempts": backoff.attempts})
                    backoff.reset()
                continue
            self._check_ready()
            seen = self.cache.generation
            timeout = self._until_next_deadline(now)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self.cache.changed(seen)

    def _until_next_deadline(self, now: datetime) -> float | None:
        deadlines = [moment for _, moment in self._retries.values()]
        next_svid = self.cache.next_deadline(now)
        if next_svid is not None:
            deadlines.append(next_svid)
        if not deadlines:
            return None
        # A little after the moment, so that the SVID is due (or expired) when the loop looks.
        return rotation.seconds_until(min(deadlines), now) + 0.01

    async def _sign_batches(self, client: AgentAPIClient, due: list[Entry]) -> None:
        for start in range(0, len(due), self._batch_size):
            chunk = due[start : start + self._batch_size]
            pairs = await asyncio.to_thread(_keys_and_csrs, len(chunk))
            results = await client.batch_new_x509_svid(
                [(entry.id, csr) for entry, (_, csr) in zip(chunk, pairs, strict=True)]
            )
            self.batches += 1
            signed: list[tuple[Entry, X509SVID]] = []
            now = self._clock()
            for entry, (key, _), result in zip(chunk, pairs, results, strict=True):
                if result.error is not None:
                    self._failed(entry, result.error, now)
                    continue
                try:
                    svid = X509SVID.from_chain(result.cert_chain, key, hint=entry.hint)
                except SpiffeError as err:
                    self._failed(entry, err, now)
                    continue
                if svid.id != entry.spiffe_id:
                    self._failed(
                        entry,
                        ServerAPIError(grpc.StatusCode.INTERNAL, f"the server signed {svid.id} for this entry"),
                        now,
                    )
                    continue
                if self._retries.pop(entry.id, None) is not None:
                    logger.info("signed an SVID for an entry that had failed", extra={"entry_id": entry.id})
                signed.append((entry, svid))
            self.cache.store(signed)
            self._check_ready()

    def _failed(self, entry: Entry, error: SpiffeError, now: datetime) -> None:
        backoff = self._retries[entry.id][0] if entry.id in self._retries else rotation.Backoff(rng=self._rng)
        if not backoff.failing:
            logger.warning(
                "the server did not sign an SVID for an entry; retrying it with backoff",
                extra={"entry_id": entry.id, "spiffe_id": str(entry.spiffe_id), "error": str(error)},
            )
        delay = backoff.next_delay()
        self._retries[entry.id] = (backoff, now + timedelta(seconds=delay))

    def _may_try(self, entry_id: str, now: datetime) -> bool:
        retry = self._retries.get(entry_id)
        return retry is None or now >= retry[1]

    def _forget_retries(self) -> None:
        workload = self.cache.workload_entries
        for entry_id in [entry_id for entry_id in self._retries if entry_id not in workload]:
            del self._retries[entry_id]

    # --- JWT-SVIDs -------------------------------------------------------------------------------

    async def _new_jwt_svid(self, entry_id: str, audience: tuple[str, ...]) -> JWTSVIDGrant:
        client = self._client
        if client is None:
            raise ServerAPIError(grpc.StatusCode.UNAVAILABLE, "the agent is not connected to the server")
        return await client.new_jwt_svid(entry_id, audience)
