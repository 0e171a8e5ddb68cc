"""Builders of entries and agents for the store's tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Final

from controlplane.model import AttestedAgent, RegistrationEntry, Selector, agent_id
from spiffecore import SpiffeID, TrustDomain

TD: Final = TrustDomain.parse("example.org")
FEDERATED: Final = TrustDomain.parse("other.org")
AGENT: Final = agent_id(TD, "join_token", "agent-1")
OTHER_AGENT: Final = agent_id(TD, "join_token", "agent-2")
NOW: Final = datetime(2026, 5, 9, 12, 0, 0, 123456, tzinfo=UTC)


def make_entry(
    name: str,
    *,
    parent: SpiffeID = AGENT,
    selectors: tuple[str, ...] = ("unix:uid:1000",),
    **fields: object,
) -> RegistrationEntry:
    return RegistrationEntry(
        spiffe_id=SpiffeID.from_segments(TD, "workload", name),
        parent_id=parent,
        selectors=tuple(Selector.parse(s) for s in selectors),
        **fields,  # type: ignore[arg-type]
    )


def full_entry(name: str = "full") -> RegistrationEntry:
    """An entry with every field set away from its default."""
    return make_entry(
        name,
        selectors=("k8s:ns:prod", "k8s:sa:web", "unix:uid:1000"),
        x509_svid_ttl=3600,
        jwt_svid_ttl=300,
        dns_names=("web.example.org", "*.web.example.org"),
        federates_with=(FEDERATED,),
        admin=True,
        downstream=True,
        hint="web ✓",
        expires_at=NOW + timedelta(days=30),
    )


def make_agent(spiffe_id: SpiffeID = AGENT, **fields: object) -> AttestedAgent:
    values: dict[str, object] = {
        "attestation_type": "join_token",
        "serial": "1234",
        "expires_at": NOW + timedelta(hours=1),
        "selectors": (Selector.parse("join_token:agent-1"),),
    }
    values.update(fields)
    return AttestedAgent(spiffe_id=spiffe_id, **values)  # type: ignore[arg-type]
