"""The node agent's state: entries, the trust bundle and the workloads' SVIDs. No network I/O.

:class:`AgentCache` is what the sync tasks (:mod:`sidecar.agent.sync`) write and what the
Workload API and SDS read, through :class:`~sidecar.workload.identities.IdentityProvider`.

**Entries.** The control plane's watch sends every entry authorized for this agent: its *aliases*
(node entries, whose parent is ``spiffe://<td>/spire/server``) and the entries parented by the
agent, by an alias, or (nesting) by another entry. A *workload entry* is one whose parent is the
agent's own ID or an alias's SPIFFE ID: those are the identities this node's workloads get, and the
only ones the cache keeps an X.509-SVID for. Node entries and more deeply nested entries are kept
(they decide which entries are workload entries) but never served. Snapshot pages are collected
until the last one, which then replaces the whole set at once; deltas apply as they come.

**Matching.** An entry applies to a workload when each of its selectors (``type:value``) is among
the workload's. An index from selector to entries keeps this proportional to the workload's
selectors, not to the number of entries.

**Order and hints.** A workload's identities are served sorted by the entry's SPIFFE ID, then by
entry ID: a stable order that does not depend on when the agent learnt of an entry, so the default
identity (the first) is the same on every agent and after every restart. Hints must be unique in a
response; when two applicable entries share a non-empty hint, only the oldest-created one is
served, as SPIRE does (the entry ID breaks a tie). An SVID carries its entry's current hint.

**SVIDs.** One per workload entry, renewed at its rotation time (:mod:`sidecar.agent.rotation`),
or at once when the entry's SPIFFE ID, DNS names or X.509 TTL are no longer those it was signed
for. An SVID is never served after it expires, nor for a SPIFFE ID the entry no longer has; while
the control plane is away, SVIDs keep being served until they expire.

**Federated bundles.** The control plane sends the bundles of the foreign trust domains that the
agent's entries federate with, as a whole set each time. A workload is given only those its own
served entries name in ``federates_with``; bundles of different trust domains are never merged,
and a bundle that did not change keeps its object, so the Workload API and SDS see no change.

**Generation.** A counter bumped on every change a workload could see: entries, bundles, SVIDs
stored or dropped. :meth:`AgentCache.changed` waits for it to move.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Final

from sidecar.agent import rotation
from sidecar.agent.jwtcache import DEFAULT_MAX_SIZE, JWTFetch, JWTSVIDCache
from sidecar.agent.serverapi import (
    BundleUpdate,
    Entry,
    EntryDeltas,
    FederatedBundlesUpdate,
    SnapshotPage,
    WatchEvent,
)
from sidecar.workload.identities import X509Context
from spiffecore import (
    JWTSVID,
    X509SVID,
    JWTBundle,
    SpiffeBundle,
    SpiffeError,
    SpiffeID,
    TrustDomain,
    X509Bundle,
)

logger = logging.getLogger("sidecar.agent.cache")

SERVER_PATH: Final = "/spire/server"
MIN_ROTATION_INTERVAL: Final = timedelta(seconds=1)
"""An SVID is never due sooner than this after it was stored, whatever its TTL: a TTL so short that
the SVID is past its rotation time when it arrives must not make the signer loop without pause."""


class CacheError(SpiffeError):
    """The cache was given something it cannot hold (a bundle of another trust domain, say)."""

    layer = "agent-cache"


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _order(entry: Entry) -> tuple[str, str]:
    return (str(entry.spiffe_id), entry.id)


@dataclass(frozen=True, slots=True, kw_only=True)
class CachedSVID:
    """A workload entry's X.509-SVID and what it was signed for."""

    svid: X509SVID
    spiffe_id: SpiffeID
    dns_names: tuple[str, ...]
    x509_svid_ttl: int
    renew_at: datetime
    expires_at: datetime

    def signed_for(self, entry: Entry) -> bool:
        """Whether this SVID still fits ``entry`` (same SPIFFE ID, DNS names and TTL)."""
        return (
            self.spiffe_id == entry.spiffe_id
            and self.dns_names == entry.dns_names
            and self.x509_svid_ttl == entry.x509_svid_ttl
        )


class _Index:
    """Workload entries by selector, for matching."""

    __slots__ = ("by_selector", "selectors", "unconditional")

    def __init__(self, entries: Iterable[Entry]) -> None:
        self.by_selector: dict[str, list[Entry]] = {}
        self.selectors: dict[str, frozenset[str]] = {}
        self.unconditional: list[Entry] = []
        for entry in entries:
            wanted = frozenset(entry.selectors)
            self.selectors[entry.id] = wanted
            if not wanted:
                self.unconditional.append(entry)
            for selector in wanted:
                self.by_selector.setdefault(selector, []).append(entry)

    def match(self, selectors: frozenset[str]) -> list[Entry]:
        found: dict[str, Entry] = {entry.id: entry for entry in self.unconditional}
        for selector in selectors:
            for entry in self.by_selector.get(selector, ()):
                if entry.id not in found and self.selectors[entry.id] <= selectors:
                    found[entry.id] = entry
        return sorted(found.values(), key=_order)


class AgentCache:
    """The agent's entries, bundle and SVIDs; an :class:`~sidecar.workload.identities.IdentityProvider`.

    ``jwt_fetch`` signs a JWT-SVID on the control plane (see :mod:`sidecar.agent.jwtcache`);
    ``clock`` gives the time SVIDs are judged at. No I/O happens here.
    """

    def __init__(
        self,
        *,
        agent_id: SpiffeID,
        bundle: SpiffeBundle,
        jwt_fetch: JWTFetch,
        clock: Callable[[], datetime] = _utcnow,
        jwt_cache_size: int = DEFAULT_MAX_SIZE,
    ) -> None:
        if bundle.trust_domain != agent_id.trust_domain:
            raise CacheError(f"the bundle must be of the agent's trust domain ({agent_id})", bundle.trust_domain.name)
        self._trust_domain = agent_id.trust_domain
        self._server_id = SpiffeID.from_path(self._trust_domain, SERVER_PATH)
        self._agent_id = agent_id
        self._bundle = bundle
        self._federated: dict[TrustDomain, SpiffeBundle] = {}
        self._clock = clock
        self._entries: dict[str, Entry] = {}
        self._workload: dict[str, Entry] = {}
        self._index: _Index | None = None
        self._pending: dict[str, Entry] | None = None
        self._snapshot_received = False
        self._revision = 0
        self._svids: dict[str, CachedSVID] = {}
        self._generation = 0
        self._event = asyncio.Event()
        self.jwt = JWTSVIDCache(jwt_fetch, entries_for=self.served_entries, clock=clock, max_size=jwt_cache_size)

    # --- IdentityProvider --------------------------------------------------------------------

    @property
    def trust_domain(self) -> TrustDomain:
        return self._trust_domain

    @property
    def generation(self) -> int:
        return self._generation

    async def changed(self, seen: int) -> int:
        while self._generation <= seen:
            event = self._event
            await event.wait()
        return self._generation

    def x509_context(self, selectors: frozenset[str]) -> X509Context | None:
        entries = self.served_entries(selectors)
        if not entries:
            return None
        now = self._clock()
        svids: list[X509SVID] = []
        for entry in entries:
            svid = self._served_svid(entry, now)
            if svid is not None:
                svids.append(svid)
        return X509Context(
            svids=tuple(svids),
            bundle=self._bundle.x509,
            federated=MappingProxyType({b.trust_domain: b.x509 for b in self._federated_for(entries)}),
        )

    def x509_bundles(self, selectors: frozenset[str]) -> Mapping[TrustDomain, X509Bundle] | None:
        entries = self.matching_entries(selectors)
        if not entries:
            return None
        return MappingProxyType(
            {self._trust_domain: self._bundle.x509, **{b.trust_domain: b.x509 for b in self._federated_for(entries)}}
        )

    def jwt_bundles(self, selectors: frozenset[str]) -> Mapping[TrustDomain, JWTBundle] | None:
        entries = self.matching_entries(selectors)
        if not entries:
            return None
        return MappingProxyType(
            {self._trust_domain: self._bundle.jwt, **{b.trust_domain: b.jwt for b in self._federated_for(entries)}}
        )

    async def jwt_svids(
        self, selectors: frozenset[str], audience: tuple[str, ...], spiffe_id: SpiffeID | None
    ) -> list[JWTSVID]:
        """See :meth:`JWTSVIDCache.jwt_svids`; raises :class:`ServerAPIError` if the server cannot sign."""
        return await self.jwt.jwt_svids(selectors, audience, spiffe_id)

    # --- reading -------------------------------------------------------------------------------

    @property
    def agent_id(self) -> SpiffeID:
        return self._agent_id

    @property
    def bundle(self) -> SpiffeBundle:
        return self._bundle

    @property
    def federated(self) -> Mapping[TrustDomain, SpiffeBundle]:
        """Bundles of the federated trust domains the agent's entries federate with."""
        return MappingProxyType(self._federated)

    @property
    def entries(self) -> Mapping[str, Entry]:
        """Every entry the control plane sent, by ID (aliases and nested entries included)."""
        return MappingProxyType(self._entries)

    @property
    def workload_entries(self) -> Mapping[str, Entry]:
        """The entries this node's workloads may get, by ID."""
        return MappingProxyType(self._workload)

    @property
    def snapshot_received(self) -> bool:
        """Whether a full snapshot of the entries has arrived (since the cache was made)."""
        return self._snapshot_received

    @property
    def revision(self) -> int:
        """The store revision of the latest snapshot or delta applied."""
        return self._revision

    def svid(self, entry_id: str) -> CachedSVID | None:
        return self._svids.get(entry_id)

    def svid_count(self) -> int:
        return len(self._svids)

    def matching_entries(self, selectors: frozenset[str]) -> list[Entry]:
        """The workload entries that apply to a workload with these selectors, in the served order."""
        index = self._index
        if index is None:
            index = self._index = _Index(self._workload.values())
        return index.match(selectors)

    def served_entries(self, selectors: frozenset[str]) -> list[Entry]:
        """:meth:`matching_entries` without the entries whose hint an older entry already has."""
        entries = self.matching_entries(selectors)
        keeper: dict[str, str] = {}  # hint -> the ID of the oldest entry that has it
        for entry in sorted((e for e in entries if e.hint), key=lambda e: (e.created_at, e.id)):
            keeper.setdefault(entry.hint, entry.id)
        return [entry for entry in entries if not entry.hint or keeper[entry.hint] == entry.id]

    def is_ready(self) -> bool:
        """A full snapshot arrived and every workload entry has a valid SVID that fits it."""
        if not self._snapshot_received:
            return False
        now = self._clock()
        for entry in self._workload.values():
            cached = self._svids.get(entry.id)
            if cached is None or now >= cached.expires_at or not cached.signed_for(entry):
                return False
        return True

    def due(self, now: datetime) -> list[Entry]:
        """Workload entries that need an SVID now: none, expired, past its rotation time, or stale."""
        due: list[Entry] = []
        for entry in self._workload.values():
            cached = self._svids.get(entry.id)
            if cached is None or now >= cached.renew_at or not cached.signed_for(entry):
                due.append(entry)
        return due

    def next_deadline(self, now: datetime) -> datetime | None:
        """The next moment an SVID comes due for rotation or expires (after ``now``), if any."""
        deadline: datetime | None = None
        for cached in self._svids.values():
            moment = cached.renew_at if cached.renew_at > now else cached.expires_at
            if moment > now and (deadline is None or moment < deadline):
                deadline = moment
        return deadline

    def _served_svid(self, entry: Entry, now: datetime) -> X509SVID | None:
        cached = self._svids.get(entry.id)
        if cached is None or now >= cached.expires_at or cached.spiffe_id != entry.spiffe_id:
            return None
        svid = cached.svid
        if svid.hint != entry.hint:  # the hint changed since: re-label once, keep the result
            svid = X509SVID.from_chain(svid.cert_chain, svid.private_key, hint=entry.hint)
            self._svids[entry.id] = CachedSVID(
                svid=svid,
                spiffe_id=cached.spiffe_id,
                dns_names=cached.dns_names,
                x509_svid_ttl=cached.x509_svid_ttl,
                renew_at=cached.renew_at,
                expires_at=cached.expires_at,
            )
        return svid

    def _federated_for(self, entries: Sequence[Entry]) -> list[SpiffeBundle]:
        """The federated bundles these entries name that the agent holds, by trust domain name."""
        if not self._federated:
            return []
        wanted = sorted({td for entry in entries for td in entry.federates_with}, key=lambda td: td.name)
        return [self._federated[td] for td in wanted if td in self._federated]

    # --- writing -------------------------------------------------------------------------------

    def apply(self, event: WatchEvent) -> bool:
        """Apply a watch event; return whether anything changed (the generation moved)."""
        if isinstance(event, BundleUpdate):
            return self.set_bundle(event.bundle)
        if isinstance(event, FederatedBundlesUpdate):
            return self.set_federated(event.bundles)
        if isinstance(event, SnapshotPage):
            pending = self._pending if self._pending is not None else {}
            pending.update((entry.id, entry) for entry in event.entries)
            if not event.last:
                self._pending = pending
                return False
            self._pending = None
            self._revision = event.revision
            first = not self._snapshot_received
            self._snapshot_received = True
            changed = pending != self._entries
            if changed:
                self._entries = pending
                self._entries_changed()
            elif first:
                self._bump()  # readiness may have changed
            return changed or first
        if isinstance(event, EntryDeltas):
            self._revision = max(self._revision, event.revision)
            changed = False
            for entry_id in event.removed_ids:
                changed = self._entries.pop(entry_id, None) is not None or changed
            for entry in event.upserted:
                if self._entries.get(entry.id) != entry:
                    self._entries[entry.id] = entry
                    changed = True
            if changed:
                self._entries_changed()
            return changed
        raise CacheError("unknown watch event", type(event).__name__)

    def set_bundle(self, bundle: SpiffeBundle) -> bool:
        """Replace the trust domain's bundle; return whether it differs from the one held."""
        if bundle.trust_domain != self._trust_domain:
            raise CacheError(
                f"the bundle must be of the agent's trust domain ({self._trust_domain})", bundle.trust_domain.name
            )
        if bundle == self._bundle:
            return False
        self._bundle = bundle
        self._bump()
        return True

    def set_federated(self, bundles: Mapping[TrustDomain, SpiffeBundle]) -> bool:
        """Replace the federated bundles with ``bundles``; return whether they differ from those held.

        A bundle equal to the one held keeps the held object (readers compare bundles by identity).
        """
        for trust_domain, bundle in bundles.items():
            if trust_domain == self._trust_domain or bundle.trust_domain != trust_domain:
                raise CacheError(
                    f"a federated bundle must be of a trust domain other than {self._trust_domain}, under its name",
                    trust_domain.name,
                )
        held = self._federated
        kept = {td: held[td] if held.get(td) == bundle else bundle for td, bundle in bundles.items()}
        if kept.keys() == held.keys() and all(kept[td] is held[td] for td in kept):
            return False
        self._federated = kept
        self._bump()
        return True

    def set_agent_id(self, agent_id: SpiffeID) -> None:
        """The agent's ID changed (it attested anew): re-derive the workload entries."""
        if agent_id.trust_domain != self._trust_domain:
            raise CacheError(f"the agent must stay in trust domain {self._trust_domain}", str(agent_id))
        if agent_id != self._agent_id:
            self._agent_id = agent_id
            self._entries_changed()

    def store(self, signed: Iterable[tuple[Entry, X509SVID]]) -> int:
        """Keep SVIDs signed for these entries (as they were when the CSR was sent); return how many.

        An SVID is dropped when its entry has since gone, or changed what it is signed for (the
        entry is then due again).
        """
        stored = 0
        earliest = self._clock() + MIN_ROTATION_INTERVAL
        for requested, signed_svid in signed:
            current = self._workload.get(requested.id)
            if current is None or signed_svid.id != current.spiffe_id:
                continue
            if (requested.dns_names, requested.x509_svid_ttl) != (current.dns_names, current.x509_svid_ttl):
                continue
            svid = signed_svid
            if svid.hint != current.hint:
                svid = X509SVID.from_chain(svid.cert_chain, svid.private_key, hint=current.hint)
            self._svids[current.id] = CachedSVID(
                svid=svid,
                spiffe_id=current.spiffe_id,
                dns_names=current.dns_names,
                x509_svid_ttl=current.x509_svid_ttl,
                renew_at=max(rotation.renew_at(svid.leaf), earliest),
                expires_at=svid.expires_at,
            )
            stored += 1
        if stored:
            self._bump()
        return stored

    def drop_expired(self, now: datetime) -> int:
        """Forget SVIDs that have expired (workloads stop seeing them); return how many."""
        expired = [entry_id for entry_id, cached in self._svids.items() if now >= cached.expires_at]
        for entry_id in expired:
            del self._svids[entry_id]
        if expired:
            self._bump()
        return len(expired)

    def _entries_changed(self) -> None:
        server_id = self._server_id
        parents = {self._agent_id}
        parents.update(entry.spiffe_id for entry in self._entries.values() if entry.parent_id == server_id)
        self._workload = {
            entry_id: entry
            for entry_id, entry in self._entries.items()
            if entry.parent_id in parents and entry.parent_id != server_id
        }
        self._index = None
        gone = [entry_id for entry_id in self._svids if entry_id not in self._workload]
        for entry_id in gone:
            del self._svids[entry_id]
        self.jwt.retain(self._workload)
        self._bump()

    def _bump(self) -> None:
        self._generation += 1
        self._event.set()
        self._event = asyncio.Event()
