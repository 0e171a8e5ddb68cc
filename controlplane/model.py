"""The control plane's domain values: registration entries, selectors, attested agents, join tokens.

Pure and validated at construction, like ``spiffecore``: a malformed entry cannot exist, so the
store, the APIs and the CLI all reject the same input with the same message. Conventions follow
SPIRE's where users rely on them: the server is ``spiffe://<td>/spire/server``, agents live under
``spiffe://<td>/spire/agent/<attestor>/...``, an entry whose parent is the server ID is a node
(alias) entry, and workload IDs may not use the reserved ``/spire`` path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from spiffecore import SpiffeError, SpiffeID, SpiffeIDError, TrustDomain

MAX_HINT_LENGTH: Final = 1024
MAX_SELECTORS: Final = 64
MAX_DNS_NAMES: Final = 64
MAX_TTL_SECONDS: Final = 366 * 24 * 3600
RESERVED_SEGMENT: Final = "spire"
SERVER_DNS_NAME: Final = "spiffe-server.internal"
"""The DNS SAN of every server's own SVID. Agents check it (gRPC checks DNS names, not URIs)
against the trust domain's roots, so no registration entry may carry it."""

_SELECTOR_TYPE_RE: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_DNS_LABEL_RE: Final = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_JOIN_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9_-]{16,256}")


class ModelError(SpiffeError, ValueError):
    """A registration entry, selector, agent or token breaks a rule of the control plane."""

    layer = "entry"


def server_id(trust_domain: TrustDomain) -> SpiffeID:
    """``spiffe://<td>/spire/server``: the ID of every control-plane server and of node entries' parent."""
    return SpiffeID.from_segments(trust_domain, RESERVED_SEGMENT, "server")


def agent_id(trust_domain: TrustDomain, attestor: str, *parts: str) -> SpiffeID:
    """``spiffe://<td>/spire/agent/<attestor>/<parts...>``, the ID of an attested agent."""
    return SpiffeID.from_segments(trust_domain, RESERVED_SEGMENT, "agent", attestor, *parts)


def is_agent_id(spiffe_id: SpiffeID) -> bool:
    segments = spiffe_id.segments
    return len(segments) >= 3 and segments[0] == RESERVED_SEGMENT and segments[1] == "agent"


def is_reserved(spiffe_id: SpiffeID) -> bool:
    """True for IDs under ``/spire``, which only the control plane itself hands out."""
    segments = spiffe_id.segments
    return bool(segments) and segments[0] == RESERVED_SEGMENT


@dataclass(frozen=True, slots=True, order=True)
class Selector:
    """A ``type:value`` pair that a node or workload attestor yields, such as ``unix:uid:1000``.

    The type is everything before the first colon; the value may itself contain colons.
    """

    type: str
    value: str

    def __post_init__(self) -> None:
        if not _SELECTOR_TYPE_RE.fullmatch(self.type):
            raise ModelError(
                "selector type must be lower-case letters, digits, '_' or '-' (at most 64)", f"{self.type}:{self.value}"
            )
        if not self.value or len(self.value) > 1024 or not self.value.isprintable():
            raise ModelError("selector value must be 1 to 1024 printable characters", f"{self.type}:{self.value}")

    @classmethod
    def parse(cls, text: str) -> Selector:
        kind, colon, value = text.partition(":")
        if not colon:
            raise ModelError("selector must be TYPE:VALUE", text)
        return cls(type=kind, value=value)

    def __str__(self) -> str:
        return f"{self.type}:{self.value}"


def _check_ttl(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TTL_SECONDS:
        raise ModelError(
            f"{name} must be a whole number of seconds from 0 (server default) to {MAX_TTL_SECONDS}", value
        )


def _check_dns_name(name: str) -> None:
    labels = name.split(".")
    if labels[0] == "*":  # a wildcard is allowed as the whole leftmost label only
        labels = labels[1:]
    if len(name) > 253 or not labels or not all(_DNS_LABEL_RE.fullmatch(label) for label in labels):
        raise ModelError("DNS name must be lower-case labels of letters, digits and '-', at most 253 bytes", name)


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistrationEntry:
    """Who may have which SPIFFE ID: workloads matching all ``selectors`` under agent ``parent_id``.

    ``id`` and ``revision`` are assigned by the store (empty and 0 before it has the entry).
    ``x509_svid_ttl`` and ``jwt_svid_ttl`` of 0 mean the server's defaults.
    """

    spiffe_id: SpiffeID
    parent_id: SpiffeID
    selectors: tuple[Selector, ...]
    id: str = ""
    x509_svid_ttl: int = 0
    jwt_svid_ttl: int = 0
    dns_names: tuple[str, ...] = ()
    federates_with: tuple[TrustDomain, ...] = ()
    admin: bool = False
    downstream: bool = False
    hint: str = ""
    expires_at: datetime | None = None
    revision: int = 0
    created_at: datetime | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        quoted = str(self.spiffe_id)
        if not self.selectors:
            raise ModelError("entry must have at least one selector", quoted)
        if len(self.selectors) > MAX_SELECTORS:
            raise ModelError(f"entry must have at most {MAX_SELECTORS} selectors", quoted)
        object.__setattr__(self, "selectors", tuple(sorted(set(self.selectors))))
        if self.spiffe_id.is_trust_domain_id:
            raise ModelError("entry SPIFFE ID must have a path", quoted)
        if is_reserved(self.spiffe_id):
            raise ModelError("entry SPIFFE ID must not use the reserved path /spire", quoted)
        if self.parent_id.trust_domain != self.spiffe_id.trust_domain:
            raise ModelError(f"entry parent ID must be in the trust domain of its SPIFFE ID ({self.parent_id})", quoted)
        _check_ttl("x509_svid_ttl", self.x509_svid_ttl)
        _check_ttl("jwt_svid_ttl", self.jwt_svid_ttl)
        if len(self.dns_names) > MAX_DNS_NAMES:
            raise ModelError(f"entry must have at most {MAX_DNS_NAMES} DNS names", quoted)
        for name in self.dns_names:
            _check_dns_name(name)
            if name == SERVER_DNS_NAME:
                raise ModelError("entry DNS name is reserved for the control plane's servers", name)
        object.__setattr__(self, "dns_names", tuple(dict.fromkeys(self.dns_names)))
        if self.spiffe_id.trust_domain in self.federates_with:
            raise ModelError("entry cannot federate with its own trust domain", quoted)
        object.__setattr__(self, "federates_with", tuple(sorted(set(self.federates_with))))
        if len(self.hint) > MAX_HINT_LENGTH:
            raise ModelError(f"entry hint must be at most {MAX_HINT_LENGTH} characters", self.hint)
        if self.expires_at is not None and self.expires_at.tzinfo is None:
            raise ModelError("entry expiry must carry a time zone", self.expires_at.isoformat())

    @property
    def is_node_entry(self) -> bool:
        """A node (alias) entry: its parent is the server, and it matches agents by node selectors."""
        return self.parent_id == server_id(self.spiffe_id.trust_domain)

    def similarity_key(self) -> tuple[SpiffeID, SpiffeID, tuple[Selector, ...]]:
        """Two entries with the same key are duplicates (SPIRE: "similar entry already exists")."""
        return (self.parent_id, self.spiffe_id, self.selectors)


@dataclass(frozen=True, slots=True, kw_only=True)
class AttestedAgent:
    """An agent the control plane has attested, and the serial of the agent SVID it last issued."""

    spiffe_id: SpiffeID
    attestation_type: str
    serial: str
    expires_at: datetime
    selectors: tuple[Selector, ...] = ()
    banned: bool = False
    can_reattest: bool = False

    def __post_init__(self) -> None:
        if not is_agent_id(self.spiffe_id):
            raise ModelError("agent ID must be under /spire/agent/", str(self.spiffe_id))
        object.__setattr__(self, "selectors", tuple(sorted(set(self.selectors))))


@dataclass(frozen=True, slots=True, kw_only=True)
class JoinToken:
    """A single-use secret an agent attests with; ``alias`` becomes a node entry for that agent."""

    token: str
    expires_at: datetime
    alias: SpiffeID | None = field(default=None)

    def __post_init__(self) -> None:
        if not _JOIN_TOKEN_RE.fullmatch(self.token):
            raise ModelError("join token must be 16 to 256 characters of letters, digits, '-' or '_'")
        if self.alias is not None and is_reserved(self.alias):
            raise ModelError("join token alias must not use the reserved path /spire", str(self.alias))

    def __repr__(self) -> str:
        return f"JoinToken(token=<{len(self.token)} characters>, expires_at={self.expires_at!r}, alias={self.alias!r})"


def parse_spiffe_id(text: str, *, what: str) -> SpiffeID:
    """Parse an ID from user input, naming the field in the error."""
    try:
        return SpiffeID.parse(text)
    except SpiffeIDError as err:
        raise ModelError(f"{what} is not a valid SPIFFE ID ({err.rule})", text) from err
