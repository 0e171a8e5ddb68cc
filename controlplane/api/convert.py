"""Conversions between the control plane's values and the wire messages of its APIs.

The only module besides the servicers that touches generated code. Messages from the wire are
validated on the way in: a malformed ID, selector or TTL becomes a :class:`ModelError` naming the
field and quoting the value.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from controlplane.federation.relationship import (
    BundleEndpointProfile,
    FederationError,
    FederationRelationship,
    FederationStatus,
    parse_endpoint_id,
    parse_trust_domain,
)
from controlplane.model import AttestedAgent, ModelError, RegistrationEntry, Selector, parse_spiffe_id
from spiffecore import SpiffeBundle, SpiffeError, SpiffeIDError, TrustDomain
from spiffeproto import types_pb2


def to_unix(moment: datetime | None) -> int:
    return 0 if moment is None else int(moment.timestamp())


def from_unix(seconds: int) -> datetime | None:
    if seconds == 0:
        return None
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError) as err:
        raise ModelError("time is out of range", seconds) from err


def selector_to_proto(selector: Selector) -> types_pb2.Selector:
    return types_pb2.Selector(type=selector.type, value=selector.value)


def selector_from_proto(message: types_pb2.Selector) -> Selector:
    return Selector(type=message.type, value=message.value)


def entry_to_proto(entry: RegistrationEntry) -> types_pb2.Entry:
    return types_pb2.Entry(
        id=entry.id,
        spiffe_id=str(entry.spiffe_id),
        parent_id=str(entry.parent_id),
        selectors=[selector_to_proto(s) for s in entry.selectors],
        x509_svid_ttl=entry.x509_svid_ttl,
        jwt_svid_ttl=entry.jwt_svid_ttl,
        dns_names=list(entry.dns_names),
        federates_with=[td.name for td in entry.federates_with],
        admin=entry.admin,
        downstream=entry.downstream,
        hint=entry.hint,
        expires_at=to_unix(entry.expires_at),
        revision=entry.revision,
        created_at=to_unix(entry.created_at),
    )


def _trust_domains(names: Iterable[str]) -> tuple[TrustDomain, ...]:
    domains = []
    for name in names:
        try:
            domains.append(TrustDomain.parse(name))
        except SpiffeIDError as err:
            raise ModelError(f"federates_with is not a trust domain ({err.rule})", name) from err
    return tuple(domains)


def entry_from_proto(message: types_pb2.Entry) -> RegistrationEntry:
    return RegistrationEntry(
        id=message.id,
        spiffe_id=parse_spiffe_id(message.spiffe_id, what="spiffe_id"),
        parent_id=parse_spiffe_id(message.parent_id, what="parent_id"),
        selectors=tuple(selector_from_proto(s) for s in message.selectors),
        x509_svid_ttl=message.x509_svid_ttl,
        jwt_svid_ttl=message.jwt_svid_ttl,
        dns_names=tuple(message.dns_names),
        federates_with=_trust_domains(message.federates_with),
        admin=message.admin,
        downstream=message.downstream,
        hint=message.hint,
        expires_at=from_unix(message.expires_at),
        revision=message.revision,
        created_at=from_unix(message.created_at),
    )


def agent_to_proto(agent: AttestedAgent) -> types_pb2.Agent:
    return types_pb2.Agent(
        spiffe_id=str(agent.spiffe_id),
        attestation_type=agent.attestation_type,
        serial=agent.serial,
        expires_at=to_unix(agent.expires_at),
        selectors=[selector_to_proto(s) for s in agent.selectors],
        banned=agent.banned,
        can_reattest=agent.can_reattest,
    )


def bundle_to_proto(bundle: SpiffeBundle) -> types_pb2.Bundle:
    return types_pb2.Bundle(
        trust_domain=bundle.trust_domain.name, spiffe_bundle=bundle.to_json(), sequence=bundle.sequence or 0
    )


def bundle_from_proto(message: types_pb2.Bundle) -> SpiffeBundle:
    try:
        trust_domain = TrustDomain.parse(message.trust_domain)
    except SpiffeIDError as err:
        raise ModelError(f"bundle trust domain is not valid ({err.rule})", message.trust_domain) from err
    return SpiffeBundle.parse(trust_domain, message.spiffe_bundle)


def x509_svid_to_proto(spiffe_id: str, chain: Iterable[x509.Certificate]) -> types_pb2.X509SVID:
    certificates = list(chain)
    return types_pb2.X509SVID(
        spiffe_id=spiffe_id,
        cert_chain=[cert.public_bytes(Encoding.DER) for cert in certificates],
        expires_at=to_unix(certificates[0].not_valid_after_utc),
    )


def federation_to_proto(status: FederationStatus) -> types_pb2.FederationRelationship:
    relationship = status.relationship
    message = types_pb2.FederationRelationship(
        trust_domain=relationship.trust_domain.name,
        bundle_endpoint_url=relationship.bundle_endpoint_url,
        bundle_endpoint_profile=relationship.profile.value,
        endpoint_spiffe_id="" if relationship.endpoint_spiffe_id is None else str(relationship.endpoint_spiffe_id),
        created_at=to_unix(relationship.created_at),
        refreshed_at=to_unix(status.refreshed_at),
        last_attempt_at=to_unix(status.last_attempt_at),
        last_error=status.last_error,
    )
    if status.bundle is not None:
        message.trust_domain_bundle.CopyFrom(bundle_to_proto(status.bundle))
    return message


def federation_from_proto(
    message: types_pb2.FederationRelationship,
) -> tuple[FederationRelationship, SpiffeBundle | None]:
    """The relationship and the bundle given with it (None when none was)."""
    trust_domain = parse_trust_domain(message.trust_domain)
    relationship = FederationRelationship(
        trust_domain=trust_domain,
        bundle_endpoint_url=message.bundle_endpoint_url,
        profile=BundleEndpointProfile.parse(message.bundle_endpoint_profile),
        endpoint_spiffe_id=parse_endpoint_id(message.endpoint_spiffe_id) if message.endpoint_spiffe_id else None,
    )
    bundle = None
    if message.HasField("trust_domain_bundle"):
        given = message.trust_domain_bundle
        if given.trust_domain and given.trust_domain != trust_domain.name:
            raise FederationError(
                f"the bundle given is of {given.trust_domain}, not of the federated trust domain", trust_domain.name
            )
        try:
            bundle = SpiffeBundle.parse(trust_domain, given.spiffe_bundle)
        except SpiffeError as err:
            raise FederationError(f"the bundle given does not parse ({err})", trust_domain.name) from err
    return relationship, bundle
