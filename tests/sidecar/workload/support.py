"""Test doubles for the Workload API service: an in-memory identity provider, a caller, an attestor.

:class:`FakeIdentities` stands in for the agent's cache: registration entries (selectors, an
SVID, the trust domains they federate with) over a test CA, with methods that change them the way
rotation and bundle updates do, each bumping the generation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sidecar.agent.attestors.base import Caller, WorkloadAttestationError
from sidecar.workload.identities import X509Context
from spiffecore import JWTSVID, X509SVID, JWTBundle, SpiffeID, TrustDomain, X509Bundle
from tests.support.ca import TestCA

UID = 1000
SELECTORS = frozenset({f"unix:uid:{UID}", "unix:gid:1000"})
CALLER = Caller(pid=4242, uid=UID, gid=1000, start_time=123456)


@dataclass
class FakeEntry:
    path: str
    selectors: frozenset[str]
    svid: X509SVID
    federates_with: tuple[TrustDomain, ...] = ()
    pending: bool = False  # the entry applies but its SVID is still being signed

    @property
    def spiffe_id(self) -> SpiffeID:
        return self.svid.id


class FakeIdentities:
    """An IdentityProvider over registration entries kept in memory."""

    def __init__(self, ca: TestCA, federated: Mapping[TrustDomain, TestCA] | None = None) -> None:
        self.ca = ca
        self.federated_cas = dict(federated or {})
        self.entries: list[FakeEntry] = []
        self.x509_bundle = ca.x509_bundle()
        self.jwt_bundle = ca.bundle().jwt
        self._generation = 0
        self._event = asyncio.Event()
        self.waiting = 0
        self.jwt_requests: list[tuple[frozenset[str], tuple[str, ...], SpiffeID | None]] = []
        self.jwt_error: Exception | None = None

    # --- changes ---

    def add_entry(
        self,
        path: str,
        selectors: frozenset[str] = SELECTORS,
        *,
        hint: str = "",
        federates_with: tuple[str, ...] = (),
        pending: bool = False,
    ) -> FakeEntry:
        entry = FakeEntry(
            path=path,
            selectors=selectors,
            svid=self.ca.mint(path).svid(hint=hint),
            federates_with=tuple(TrustDomain.parse(td) for td in federates_with),
            pending=pending,
        )
        self.entries.append(entry)
        self.bump()
        return entry

    def rotate(self, index: int = 0) -> X509SVID:
        entry = self.entries[index]
        entry.svid = self.ca.mint(entry.path).svid(hint=entry.svid.hint)
        self.bump()
        return entry.svid

    def issue(self, entry: FakeEntry) -> None:
        """The pending SVID of ``entry`` has been signed."""
        entry.pending = False
        self.bump()

    def remove_entries(self) -> None:
        self.entries.clear()
        self.bump()

    def replace_federated(self, trust_domain: str, ca: TestCA) -> None:
        self.federated_cas[TrustDomain.parse(trust_domain)] = ca
        self.bump()

    def bump(self) -> None:
        """A change somewhere in the cache (possibly irrelevant to a given workload)."""
        self._generation += 1
        event, self._event = self._event, asyncio.Event()
        event.set()

    # --- IdentityProvider ---

    @property
    def trust_domain(self) -> TrustDomain:
        return self.ca.trust_domain

    @property
    def generation(self) -> int:
        return self._generation

    async def changed(self, seen: int) -> int:
        self.waiting += 1
        try:
            while self._generation <= seen:
                await self._event.wait()
            return self._generation
        finally:
            self.waiting -= 1

    def _matching(self, selectors: frozenset[str]) -> list[FakeEntry]:
        return [entry for entry in self.entries if entry.selectors <= selectors]

    def _federated(self, entries: list[FakeEntry]) -> dict[TrustDomain, TestCA]:
        return {td: self.federated_cas[td] for entry in entries for td in entry.federates_with}

    def x509_context(self, selectors: frozenset[str]) -> X509Context | None:
        entries = self._matching(selectors)
        if not entries:
            return None
        federated = {td: ca.x509_bundle() for td, ca in self._federated(entries).items()}
        svids = tuple(e.svid for e in entries if not e.pending)
        return X509Context(svids=svids, bundle=self.x509_bundle, federated=federated)

    def x509_bundles(self, selectors: frozenset[str]) -> Mapping[TrustDomain, X509Bundle] | None:
        entries = self._matching(selectors)
        if not entries:
            return None
        federated = {td: ca.x509_bundle() for td, ca in self._federated(entries).items()}
        return {self.trust_domain: self.x509_bundle, **federated}

    def jwt_bundles(self, selectors: frozenset[str]) -> Mapping[TrustDomain, JWTBundle] | None:
        entries = self._matching(selectors)
        if not entries:
            return None
        federated = {td: ca.bundle().jwt for td, ca in self._federated(entries).items()}
        return {self.trust_domain: self.jwt_bundle, **federated}

    async def jwt_svids(
        self, selectors: frozenset[str], audience: tuple[str, ...], spiffe_id: SpiffeID | None
    ) -> list[JWTSVID]:
        self.jwt_requests.append((selectors, audience, spiffe_id))
        if self.jwt_error is not None:
            raise self.jwt_error
        now = datetime.now(UTC)
        svids = []
        for entry in self._matching(selectors):
            if spiffe_id is not None and entry.spiffe_id != spiffe_id:
                continue
            token = self.ca.mint_jwt(entry.path, audience=audience, now=now)
            svids.append(JWTSVID.parse_insecure(token, audience, at=now, hint=entry.svid.hint))
        return svids


@dataclass
class CallerBox:
    """``caller_of`` for tests: always the same caller (or ``None``), whatever the peer."""

    caller: Caller | None = CALLER

    def __call__(self, context: object) -> Caller | None:
        return self.caller


@dataclass
class StaticAttestor:
    """A workload attestor returning configured selectors, or failing with ``error``."""

    selectors: frozenset[str] = SELECTORS
    error: WorkloadAttestationError | None = None
    attested: list[Caller] = field(default_factory=list)

    @property
    def name(self) -> str:
        return "static"

    async def attest(self, caller: Caller) -> frozenset[str]:
        self.attested.append(caller)
        if self.error is not None:
            raise self.error
        return self.selectors
