"""Federation relationships: which foreign trust domain's bundle to fetch, from where, and how.

A relationship names three things the SPIFFE Federation specification (5.1, 7.2) says are never
inferred from each other: the foreign trust domain, the bundle endpoint's URL and the endpoint's
profile. The profiles (5.2):

- ``https_web``: the endpoint's certificate is checked as any web server's (public CAs, the host
  name in the URL).
- ``https_spiffe``: the endpoint presents an X509-SVID with the configured *endpoint SPIFFE ID*,
  verified against the foreign trust domain's own bundle: at first the one the operator supplied
  (so creating such a relationship needs that bundle, as in SPIRE), then the last one fetched.
  Only self-serving endpoints are supported: the endpoint SPIFFE ID must be in the foreign trust
  domain, whose bundle is the one that verifies it.

The URL must be ``https`` with a host, without user information or fragment. Pure values,
validated at construction, like :mod:`controlplane.model`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final
from urllib.parse import urlsplit

from spiffecore import SpiffeBundle, SpiffeError, SpiffeID, SpiffeIDError, TrustDomain

MAX_URL_LENGTH: Final = 2048
MAX_ERROR_LENGTH: Final = 1024


class FederationError(SpiffeError, ValueError):
    """A federation relationship breaks a rule; the message names it and quotes the input."""

    layer = "federation"


class BundleEndpointProfile(enum.Enum):
    """How a bundle endpoint authenticates itself (SPIFFE Federation 5.2)."""

    HTTPS_WEB = "https_web"
    HTTPS_SPIFFE = "https_spiffe"

    @classmethod
    def parse(cls, text: str) -> BundleEndpointProfile:
        try:
            return cls(text)
        except ValueError:
            raise FederationError("bundle endpoint profile must be https_web or https_spiffe", text) from None


def parse_trust_domain(text: str, *, what: str = "trust domain") -> TrustDomain:
    """Parse a trust domain name from user input, naming the field in the error."""
    try:
        return TrustDomain.parse(text)
    except SpiffeIDError as err:
        raise FederationError(f"{what} is not a valid trust domain name ({err.rule})", text) from err


def parse_endpoint_id(text: str) -> SpiffeID:
    try:
        return SpiffeID.parse(text)
    except SpiffeIDError as err:
        raise FederationError(f"endpoint SPIFFE ID is not valid ({err.rule})", text) from err


def check_url(url: str) -> None:
    """An ``https`` URL with a host and a valid port, no user information, no fragment."""
    if len(url) > MAX_URL_LENGTH or not url.isascii() or not url.isprintable() or " " in url:
        raise FederationError(
            f"bundle endpoint URL must be printable ASCII without spaces, at most {MAX_URL_LENGTH} characters", url
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise FederationError(f"bundle endpoint URL could not be parsed ({err})", url) from err
    if parts.scheme != "https":
        raise FederationError("bundle endpoint URL must use the https scheme", url)
    if not parts.hostname:
        raise FederationError("bundle endpoint URL must name a host", url)
    if parts.username is not None or parts.password is not None:
        raise FederationError("bundle endpoint URL must not carry user information", url)
    if parts.fragment or url.endswith("#"):
        raise FederationError("bundle endpoint URL must not have a fragment", url)
    if port == 0:
        raise FederationError("bundle endpoint URL port must be from 1 to 65535", url)


@dataclass(frozen=True, slots=True, kw_only=True)
class FederationRelationship:
    """This trust domain federates with ``trust_domain``, whose bundle is served at ``bundle_endpoint_url``.

    ``created_at`` is set by the store.
    """

    trust_domain: TrustDomain
    bundle_endpoint_url: str
    profile: BundleEndpointProfile
    endpoint_spiffe_id: SpiffeID | None = None
    created_at: datetime | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        check_url(self.bundle_endpoint_url)
        if self.profile is BundleEndpointProfile.HTTPS_SPIFFE:
            if self.endpoint_spiffe_id is None:
                raise FederationError("https_spiffe needs the endpoint SPIFFE ID", self.trust_domain.name)
            if self.endpoint_spiffe_id.trust_domain != self.trust_domain:
                raise FederationError(
                    f"endpoint SPIFFE ID must be in the federated trust domain {self.trust_domain} "
                    "(only self-serving bundle endpoints are supported)",
                    str(self.endpoint_spiffe_id),
                )
        elif self.endpoint_spiffe_id is not None:
            raise FederationError(
                "an endpoint SPIFFE ID is only for the https_spiffe profile", str(self.endpoint_spiffe_id)
            )
        if self.created_at is not None and self.created_at.tzinfo is None:
            raise FederationError("creation time must carry a time zone", self.created_at.isoformat())

    def check_for(self, own: TrustDomain, bundle: SpiffeBundle | None) -> None:
        """The rules that need this server's trust domain and the bundle given when creating.

        A trust domain does not federate with itself; ``https_spiffe`` needs the foreign domain's
        bundle to verify the endpoint's first answer; a bundle given must be of the foreign domain
        and hold X.509 authorities.
        """
        if self.trust_domain == own:
            raise FederationError("a trust domain cannot federate with itself", own.name)
        if bundle is None:
            if self.profile is BundleEndpointProfile.HTTPS_SPIFFE:
                raise FederationError(
                    "https_spiffe needs the federated trust domain's bundle to verify the endpoint's first answer",
                    self.trust_domain.name,
                )
            return
        if bundle.trust_domain != self.trust_domain:
            raise FederationError(
                f"the bundle given is of {bundle.trust_domain}, not of the federated trust domain",
                self.trust_domain.name,
            )
        check_bundle(bundle)


def check_bundle(bundle: SpiffeBundle) -> None:
    """A foreign bundle must hold X.509 authorities.

    An empty bundle is valid SPIFFE (nothing of that domain is trusted), but storing one would lock
    an ``https_spiffe`` relationship out for good: its endpoint could never be verified again.
    """
    if not bundle.x509.authorities:
        raise FederationError("a federated bundle must hold X.509 authorities", bundle.trust_domain.name)


@dataclass(frozen=True, slots=True, kw_only=True)
class FederationStatus:
    """A relationship with its foreign bundle as stored and how its last fetch went.

    ``bundle`` is None until a first bundle is known. ``refreshed_at`` is the last successful
    fetch; ``last_attempt_at`` the last fetch at all; ``last_error`` why it failed ("" if it did not).
    """

    relationship: FederationRelationship
    bundle: SpiffeBundle | None = None
    refreshed_at: datetime | None = None
    last_attempt_at: datetime | None = None
    last_error: str = ""

    @property
    def trust_domain(self) -> TrustDomain:
        return self.relationship.trust_domain


class StoreOutcome(enum.Enum):
    """What became of a fetched bundle handed to the store."""

    STORED = "stored"
    """It differed from the stored one and replaced it."""
    UNCHANGED = "unchanged"
    """The store already held the same bundle (another server may have stored it first)."""
    STALE = "stale"
    """Its sequence number is below the stored one's: an older answer that lost a race."""
    GONE = "gone"
    """The relationship was deleted meanwhile; nothing was stored."""


def short_error(error: object) -> str:
    """An error as stored with the relationship: one line, at most :data:`MAX_ERROR_LENGTH` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= MAX_ERROR_LENGTH else text[: MAX_ERROR_LENGTH - 3] + "..."
