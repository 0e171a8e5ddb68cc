"""Which peers the proxy lets through: the ``--allow-*`` rules as a plain, comparable value.

The rules are OR-ed: a peer is allowed when any ``--allow-id``, ``--allow-trust-domain`` or
``--allow-pattern`` matches it. Allowing any verified peer must be said outright
(``--allow-any-id``) and cannot be combined with other rules, which it would make meaningless.
A rule set that allows nothing is refused when the proxy is built (fail closed): a server with
no rule would refuse everyone, so the operator has surely forgotten one; the client mode asks
for a rule too, since a server's SPIFFE ID is what SPIFFE authenticates, not a host name.

The policy file (``--policy``, :mod:`sidecar.proxy.policyfile`) maps onto this value:
:meth:`Policy.from_rules` takes the same strings as the flags, and :func:`parse_id`,
:func:`parse_trust_domain` and :func:`parse_pattern` parse one of them each.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sidecar.proxy.errors import ProxyConfigError
from spiffecore import (
    AuthorizeAny,
    AuthorizeAnyOf,
    AuthorizeMemberOf,
    AuthorizeOneOf,
    AuthorizePattern,
    Authorizer,
    IDPattern,
    SpiffeError,
    SpiffeID,
    TrustDomain,
)

NO_RULE = "at least one of --allow-id, --allow-trust-domain, --allow-pattern or --allow-any-id is required"
ANY_AND_RULES = "--allow-any-id cannot be combined with other --allow-* rules"
POLICY_AND_FLAGS = "--policy cannot be combined with --allow-* flags: put every rule in the policy file"


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """Allow rules for the peers of one listener."""

    ids: frozenset[SpiffeID] = frozenset()
    trust_domains: frozenset[TrustDomain] = frozenset()
    patterns: tuple[IDPattern, ...] = ()
    allow_any: bool = False

    def __post_init__(self) -> None:
        if self.allow_any and not self.is_empty_of_rules:
            raise ProxyConfigError(ANY_AND_RULES)

    @classmethod
    def from_rules(
        cls,
        *,
        allow_id: Iterable[str] = (),
        allow_trust_domain: Iterable[str] = (),
        allow_pattern: Iterable[str] = (),
        allow_any_id: bool = False,
    ) -> Policy:
        """Parse the ``--allow-*`` strings; a bad one is a :class:`ProxyConfigError` quoting it."""
        try:
            ids = frozenset(parse_id(text) for text in allow_id)
            trust_domains = frozenset(parse_trust_domain(text) for text in allow_trust_domain)
            patterns = tuple(dict.fromkeys(parse_pattern(text) for text in allow_pattern))
        except SpiffeError as err:
            raise ProxyConfigError(f"bad allow rule ({err})") from err
        return cls(ids=ids, trust_domains=trust_domains, patterns=patterns, allow_any=allow_any_id)

    @property
    def is_empty_of_rules(self) -> bool:
        return not (self.ids or self.trust_domains or self.patterns)

    def authorizer(self) -> Authorizer:
        """The OR of the rules; :class:`ProxyConfigError` if there is none (fail closed)."""
        if self.allow_any:
            return AuthorizeAny()
        rules: list[Authorizer] = []
        if self.ids:
            rules.append(AuthorizeOneOf(self.ids))
        if self.trust_domains:
            rules.append(AuthorizeMemberOf(self.trust_domains))
        rules.extend(AuthorizePattern(pattern) for pattern in self.patterns)
        if not rules:
            raise ProxyConfigError(NO_RULE)
        return rules[0] if len(rules) == 1 else AuthorizeAnyOf(tuple(rules))

    def __str__(self) -> str:
        try:
            return str(self.authorizer())
        except ProxyConfigError:
            return "nothing (no rule configured)"


def parse_id(text: str) -> SpiffeID:
    """One ``--allow-id``; :class:`SpiffeError` quoting it."""
    return SpiffeID.parse(text)


def parse_trust_domain(text: str) -> TrustDomain:
    """One ``--allow-trust-domain``, ``example.org`` or ``spiffe://example.org`` alike (as SPIRE's
    tools take it); :class:`SpiffeError` quoting it."""
    prefix = "spiffe://"
    return TrustDomain.parse(text[len(prefix) :] if text.startswith(prefix) else text)


def parse_pattern(text: str) -> IDPattern:
    """One ``--allow-pattern``; :class:`SpiffeError` quoting it."""
    return IDPattern.parse(text)
