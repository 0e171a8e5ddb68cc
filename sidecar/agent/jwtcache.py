"""JWT-SVIDs the agent fetched from the control plane, reused until half their life is gone.

A JWT-SVID is signed by the server on demand (:meth:`AgentAPIClient.new_jwt_svid`) for one entry
and one audience. The cache keeps each one by ``(entry id, audience)``, the audience de-duplicated
and sorted (a token's ``aud`` is a set: ``["b", "a"]`` and ``["a", "b"]`` are the same request),
and hands it out again while more than half of its lifetime (from the moment the fetch began to
its expiry) remains; after that the next request fetches a new one. Concurrent requests for the
same key share one fetch. The cache is bounded: the least recently used token is forgotten first.

A token whose SPIFFE ID is no longer the entry's (the entry was changed) is never reused.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Container, Iterable, Sequence
from datetime import UTC, datetime
from typing import Final, TypeAlias

import grpc

from sidecar.agent.serverapi import Entry, JWTSVIDGrant, ServerAPIError
from spiffecore import JWTSVID, JWTSVIDError, SpiffeID

DEFAULT_MAX_SIZE: Final = 10_000

JWTFetch: TypeAlias = Callable[[str, tuple[str, ...]], Awaitable[JWTSVIDGrant]]
"""Fetches a new JWT-SVID for ``(entry id, audience)``: :meth:`AgentAPIClient.new_jwt_svid`."""
EntryMatcher: TypeAlias = Callable[[frozenset[str]], Sequence[Entry]]
"""The entries that apply to a workload with these selectors, in the order they are served."""
Key: TypeAlias = tuple[str, tuple[str, ...]]


def _utcnow() -> datetime:
    return datetime.now(UTC)


def audience_key(audience: Iterable[str]) -> tuple[str, ...]:
    """The audience as the cache keys it: each value once, sorted."""
    return tuple(sorted(set(audience)))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _Cached:
    svid: JWTSVID
    refresh_at: datetime


class JWTSVIDCache:
    """JWT-SVIDs by ``(entry id, audience)``; see the module's docstring."""

    def __init__(
        self,
        fetch: JWTFetch,
        *,
        entries_for: EntryMatcher,
        clock: Callable[[], datetime] = _utcnow,
        max_size: int = DEFAULT_MAX_SIZE,
    ) -> None:
        if max_size < 1:
            raise ValueError(f"jwtcache: max_size must be at least 1, got {max_size}")
        self._fetch = fetch
        self._entries_for = entries_for
        self._clock = clock
        self._max_size = max_size
        self._cached: OrderedDict[Key, _Cached] = OrderedDict()
        self._inflight: dict[Key, asyncio.Task[_Cached]] = {}
        self.fetches = 0
        """How many fetches were started (a counter for tests and metrics)."""

    def __len__(self) -> int:
        return len(self._cached)

    def retain(self, entry_ids: Container[str]) -> None:
        """Forget the tokens of every entry not in ``entry_ids`` (the entries that are gone)."""
        for key in [key for key in self._cached if key[0] not in entry_ids]:
            del self._cached[key]

    async def get(self, entry: Entry, audience: Iterable[str]) -> JWTSVID:
        """A JWT-SVID for ``entry`` and ``audience``, with the entry's hint: cached, or fetched now.

        Raises :class:`ServerAPIError` when the server cannot be reached or refuses.
        """
        key = (entry.id, audience_key(audience))
        cached = self._cached.get(key)
        if cached is not None:
            if cached.svid.id == entry.spiffe_id and self._clock() < cached.refresh_at:
                self._cached.move_to_end(key)
                return _with_hint(cached.svid, entry.hint)
            del self._cached[key]
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._fetch_one(key, entry.spiffe_id))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._settle(key, done))
            self.fetches += 1
        # shield: a caller that gives up does not cancel the fetch the others are waiting for.
        fetched = await asyncio.shield(task)
        return _with_hint(fetched.svid, entry.hint)

    async def jwt_svids(
        self, selectors: frozenset[str], audience: tuple[str, ...], spiffe_id: SpiffeID | None
    ) -> list[JWTSVID]:
        """The workload's JWT-SVIDs (only ``spiffe_id``'s when given), in the order its entries are served.

        Empty when no entry applies. The tokens of several entries are fetched concurrently.
        """
        entries = [e for e in self._entries_for(selectors) if spiffe_id is None or e.spiffe_id == spiffe_id]
        if not entries:
            return []
        if len(entries) == 1:
            return [await self.get(entries[0], audience)]
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self.get(entry, audience)) for entry in entries]
        return [task.result() for task in tasks]

    async def _fetch_one(self, key: Key, spiffe_id: SpiffeID) -> _Cached:
        started = self._clock()
        grant = await self._fetch(key[0], key[1])
        if grant.spiffe_id != spiffe_id:
            raise ServerAPIError(
                grpc.StatusCode.INTERNAL,
                f"the server sent a JWT-SVID for {grant.spiffe_id}, not for the entry's {spiffe_id}",
            )
        try:
            svid = JWTSVID.parse_insecure(grant.token, key[1], at=self._clock())
        except JWTSVIDError as err:
            raise ServerAPIError(grpc.StatusCode.INTERNAL, f"the server sent a malformed JWT-SVID ({err})") from err
        if svid.id != spiffe_id:
            raise ServerAPIError(
                grpc.StatusCode.INTERNAL, f"the server sent a JWT-SVID whose subject is {svid.id}, not {spiffe_id}"
            )
        expires_at = min(grant.expires_at, svid.expiry)
        return _Cached(svid=svid, refresh_at=started + (expires_at - started) / 2)

    def _settle(self, key: Key, task: asyncio.Task[_Cached]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if task.cancelled() or task.exception() is not None:  # exception() marks it retrieved
            return
        self._cached[key] = task.result()
        self._cached.move_to_end(key)
        while len(self._cached) > self._max_size:
            self._cached.popitem(last=False)


def _with_hint(svid: JWTSVID, hint: str) -> JWTSVID:
    return svid if svid.hint == hint else dataclasses.replace(svid, hint=hint)
