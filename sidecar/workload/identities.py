"""What the Workload API (and SDS) serve from: the agent's identities, by workload selectors.

The agent's cache implements :class:`IdentityProvider`; the Workload API service only reads
through it, so it can be tested against any implementation and knows nothing of how SVIDs are
obtained. Selectors are ``type:value`` strings; an entry applies to a workload when every one
of its selectors is among the workload's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from spiffecore import JWTSVID, X509SVID, JWTBundle, SpiffeID, TrustDomain, X509Bundle


@dataclass(frozen=True, slots=True, kw_only=True)
class X509Context:
    """Everything FetchX509SVID sends a workload: its SVIDs and the bundles it may trust.

    ``svids`` are in a stable order, the first being the workload's default identity; each
    carries its entry's hint (unique within the tuple). ``bundle`` is the agent's own trust
    domain's; ``federated`` holds the bundles of trust domains the workload's entries federate with.
    """

    svids: tuple[X509SVID, ...]
    bundle: X509Bundle
    federated: Mapping[TrustDomain, X509Bundle]


class IdentityProvider(Protocol):
    """Read access to the agent's identities, and a way to wait for them to change."""

    @property
    def trust_domain(self) -> TrustDomain: ...

    @property
    def generation(self) -> int:
        """Increases whenever any SVID or bundle changes."""
        ...

    async def changed(self, seen: int) -> int:
        """Wait until :attr:`generation` is past ``seen``; return it."""
        ...

    def x509_context(self, selectors: frozenset[str]) -> X509Context | None:
        """The workload's X.509 context; ``None`` when no entry applies to it."""
        ...

    def x509_bundles(self, selectors: frozenset[str]) -> Mapping[TrustDomain, X509Bundle] | None:
        """Own and federated X.509 bundles the workload may see; ``None`` when no entry applies."""
        ...

    def jwt_bundles(self, selectors: frozenset[str]) -> Mapping[TrustDomain, JWTBundle] | None:
        """Own and federated JWT bundles the workload may see; ``None`` when no entry applies."""
        ...

    async def jwt_svids(
        self, selectors: frozenset[str], audience: tuple[str, ...], spiffe_id: SpiffeID | None
    ) -> list[JWTSVID]:
        """JWT-SVIDs for the workload's identities (only ``spiffe_id``'s when given), from the
        cache while they have more than half their life left, else freshly signed. Empty when no
        entry applies."""
        ...
