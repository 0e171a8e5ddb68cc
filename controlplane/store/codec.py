"""Conversions between the domain values of ``controlplane.model`` and rows of the store's tables.

Pure functions. Parsing the IDs of a row goes through small caches: in a snapshot of 50,000
entries the same parent IDs and trust domains come back again and again, and the values are
immutable, so sharing them is safe.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

from sqlalchemy import Row

from controlplane.federation.relationship import BundleEndpointProfile, FederationRelationship
from controlplane.model import AttestedAgent, RegistrationEntry, Selector
from spiffecore import SpiffeID, TrustDomain


@lru_cache(maxsize=8192)
def parse_id(text: str) -> SpiffeID:
    return SpiffeID.parse(text)


@lru_cache(maxsize=1024)
def parse_trust_domain(text: str) -> TrustDomain:
    return TrustDomain.parse(text)


@lru_cache(maxsize=8192)
def make_selector(kind: str, value: str) -> Selector:
    return Selector(type=kind, value=value)


def selector_digest(selector: Selector) -> bytes:
    """SHA-256 of ``type:value`` (unambiguous: a type never contains a colon)."""
    return hashlib.sha256(str(selector).encode()).digest()


def similarity_key(entry: RegistrationEntry) -> bytes:
    """SHA-256 over :meth:`RegistrationEntry.similarity_key`: equal for duplicate entries only."""
    parent_id, spiffe_id, selectors = entry.similarity_key()
    # One line per part is unambiguous: IDs and selectors never contain a newline (a selector's
    # value is printable), and a selector's type never contains its colon.
    canonical = "\n".join([str(parent_id), str(spiffe_id), *map(str, selectors)])
    return hashlib.sha256(canonical.encode()).digest()


def _dump_list(items: Iterable[str]) -> str:
    listed = list(items)
    return json.dumps(listed, separators=(",", ":")) if listed else "[]"


def _load_list(text: str) -> tuple[str, ...]:
    return tuple(json.loads(text)) if text != "[]" else ()


def entry_row(entry: RegistrationEntry) -> dict[str, Any]:
    """The ``registration_entries`` row of a stored entry (with id, revision and created_at set)."""
    return {
        "id": entry.id,
        "spiffe_id": str(entry.spiffe_id),
        "parent_id": str(entry.parent_id),
        "similarity_key": similarity_key(entry),
        "x509_svid_ttl": entry.x509_svid_ttl,
        "jwt_svid_ttl": entry.jwt_svid_ttl,
        "dns_names": _dump_list(entry.dns_names),
        "federates_with": _dump_list(td.name for td in entry.federates_with),
        "admin": entry.admin,
        "downstream": entry.downstream,
        "hint": entry.hint,
        "expires_at": entry.expires_at,
        "revision": entry.revision,
        "created_at": entry.created_at,
    }


def selector_rows(entry: RegistrationEntry) -> list[dict[str, Any]]:
    return [
        {"entry_id": entry.id, "type": s.type, "value": s.value, "digest": selector_digest(s)} for s in entry.selectors
    ]


def entry_from_row(row: Row[Any], selectors: Sequence[Selector]) -> RegistrationEntry:
    return RegistrationEntry(
        id=row.id,
        spiffe_id=parse_id(row.spiffe_id),
        parent_id=parse_id(row.parent_id),
        selectors=tuple(selectors),
        x509_svid_ttl=row.x509_svid_ttl,
        jwt_svid_ttl=row.jwt_svid_ttl,
        dns_names=_load_list(row.dns_names),
        federates_with=tuple(parse_trust_domain(name) for name in _load_list(row.federates_with)),
        admin=row.admin,
        downstream=row.downstream,
        hint=row.hint,
        expires_at=row.expires_at,
        revision=row.revision,
        created_at=row.created_at,
    )


def entries_from_rows(rows: Sequence[Row[Any]], selectors: Mapping[str, list[Selector]]) -> list[RegistrationEntry]:
    return [entry_from_row(row, selectors.get(row.id, ())) for row in rows]


def agent_row(agent: AttestedAgent) -> dict[str, Any]:
    return {
        "spiffe_id": str(agent.spiffe_id),
        "attestation_type": agent.attestation_type,
        "serial": agent.serial,
        "expires_at": agent.expires_at,
        "selectors": _dump_list(str(s) for s in agent.selectors),
        "banned": agent.banned,
        "can_reattest": agent.can_reattest,
    }


def agent_from_row(row: Row[Any]) -> AttestedAgent:
    return AttestedAgent(
        spiffe_id=parse_id(row.spiffe_id),
        attestation_type=row.attestation_type,
        serial=row.serial,
        expires_at=row.expires_at,
        selectors=tuple(Selector.parse(text) for text in json.loads(row.selectors)),
        banned=row.banned,
        can_reattest=row.can_reattest,
    )


def relationship_row(relationship: FederationRelationship) -> dict[str, Any]:
    """The ``federation_relationships`` columns a relationship itself decides (not its fetch state)."""
    endpoint_id = relationship.endpoint_spiffe_id
    return {
        "trust_domain": relationship.trust_domain.name,
        "bundle_endpoint_url": relationship.bundle_endpoint_url,
        "profile": relationship.profile.value,
        "endpoint_spiffe_id": None if endpoint_id is None else str(endpoint_id),
    }


def relationship_from_row(row: Row[Any]) -> FederationRelationship:
    return FederationRelationship(
        trust_domain=parse_trust_domain(row.trust_domain),
        bundle_endpoint_url=row.bundle_endpoint_url,
        profile=BundleEndpointProfile(row.profile),
        endpoint_spiffe_id=None if row.endpoint_spiffe_id is None else parse_id(row.endpoint_spiffe_id),
        created_at=row.created_at,
    )
