"""Authorization of a verified peer by its SPIFFE ID.

An authorizer is a plain, comparable value; calling it with a peer's ID returns ``None`` when the
peer is allowed and raises :class:`AuthorizationError` with the reason when it is not. Its ``str``
describes what it allows, for logs and for that reason. Combine rules with :class:`AuthorizeAnyOf`
(the OR of ``--allow-*`` flags).

ID patterns follow ghostunnel's grammar: ``*`` is exactly one path segment, ``**`` one or more
trailing segments and only at the end; a wildcard must be a whole segment. The trust domain is
always literal, so a pattern never reaches across trust domains.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Protocol

from spiffecore.errors import AuthorizationError, PolicyError, SpiffeIDError
from spiffecore.spiffeid import BAD_PATH_CHAR, SCHEME_PREFIX, SpiffeID, TrustDomain

ANY_SEGMENT: Final = "*"
ANY_TAIL: Final = "**"


class Authorizer(Protocol):
    """Allows a peer (returns ``None``) or refuses it (raises :class:`AuthorizationError`)."""

    def __call__(self, peer: SpiffeID) -> None: ...


def _q(value: object) -> str:
    return json.dumps(str(value))


@dataclass(frozen=True, slots=True)
class AuthorizeAny:
    """Allows every peer that verified. Must be chosen explicitly."""

    def __call__(self, peer: SpiffeID) -> None:
        return None

    def __str__(self) -> str:
        return "any SPIFFE ID"


@dataclass(frozen=True, slots=True)
class AuthorizeID:
    """Allows exactly one ID."""

    id: SpiffeID

    def __call__(self, peer: SpiffeID) -> None:
        if peer != self.id:
            raise AuthorizationError(peer, f"want {self}")

    def __str__(self) -> str:
        return f"ID {_q(self.id)}"


@dataclass(frozen=True, slots=True)
class AuthorizeOneOf:
    """Allows any of a set of IDs."""

    ids: frozenset[SpiffeID]

    @classmethod
    def of(cls, ids: Iterable[SpiffeID]) -> AuthorizeOneOf:
        return cls(frozenset(ids))

    def __call__(self, peer: SpiffeID) -> None:
        if peer not in self.ids:
            raise AuthorizationError(peer, f"want {self}")

    def __str__(self) -> str:
        return "one of IDs [" + ", ".join(_q(i) for i in sorted(self.ids)) + "]"


@dataclass(frozen=True, slots=True)
class AuthorizeMemberOf:
    """Allows every ID of the given trust domains."""

    trust_domains: frozenset[TrustDomain]

    @classmethod
    def of(cls, trust_domains: Iterable[TrustDomain]) -> AuthorizeMemberOf:
        return cls(frozenset(trust_domains))

    def __call__(self, peer: SpiffeID) -> None:
        if peer.trust_domain not in self.trust_domains:
            raise AuthorizationError(peer, f"want {self}")

    def __str__(self) -> str:
        return "member of trust domain [" + ", ".join(_q(t) for t in sorted(self.trust_domains)) + "]"


@dataclass(frozen=True, slots=True)
class AuthorizePathPrefix:
    """Allows the ID ``prefix`` and every ID below it, segment by segment.

    ``spiffe://td/ns/prod`` allows ``spiffe://td/ns/prod/web`` but not ``spiffe://td/ns/production``.
    """

    prefix: SpiffeID

    def __call__(self, peer: SpiffeID) -> None:
        if peer.trust_domain != self.prefix.trust_domain or not (
            peer.path == self.prefix.path or peer.path.startswith(self.prefix.path + "/")
        ):
            raise AuthorizationError(peer, f"want {self}")

    def __str__(self) -> str:
        return f"ID at or under {_q(self.prefix)}"


@dataclass(frozen=True, slots=True)
class IDPattern:
    """A parsed ID pattern such as ``spiffe://example.org/ns/*/sa/**``."""

    trust_domain: TrustDomain
    segments: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, TrustDomain):
            raise TypeError(f"trust_domain must be a TrustDomain, not {type(self.trust_domain)!r}")
        _check_pattern_segments(self.trust_domain, self.segments, str(self))

    @classmethod
    def parse(cls, text: str) -> IDPattern:
        if not text.startswith(SCHEME_PREFIX):
            raise PolicyError("ID pattern must start with spiffe://", text)
        authority, slash, path = text[len(SCHEME_PREFIX) :].partition("/")
        if "*" in authority:
            raise PolicyError("ID pattern trust domain must be literal (no wildcards)", text)
        try:
            trust_domain = TrustDomain.parse(authority)
        except SpiffeIDError as err:
            raise PolicyError(f"ID pattern trust domain is not valid ({err.rule})", text) from err
        # Every "/" starts a segment, so "spiffe://td/" has one empty segment (a trailing slash, refused).
        return cls(trust_domain, tuple(path.split("/")) if slash else ())

    def matches(self, spiffe_id: SpiffeID) -> bool:
        if spiffe_id.trust_domain != self.trust_domain:
            return False
        have = spiffe_id.segments
        want = self.segments
        if want and want[-1] == ANY_TAIL:
            fixed = want[:-1]
            if len(have) <= len(fixed):
                return False
        else:
            fixed = want
            if len(have) != len(fixed):
                return False
        return all(w in (ANY_SEGMENT, h) for w, h in zip(fixed, have, strict=False))

    def __str__(self) -> str:
        return SCHEME_PREFIX + self.trust_domain.name + "".join("/" + s for s in self.segments)


@dataclass(frozen=True, slots=True)
class AuthorizePattern:
    """Allows IDs that match an :class:`IDPattern`."""

    pattern: IDPattern

    @classmethod
    def parse(cls, text: str) -> AuthorizePattern:
        return cls(IDPattern.parse(text))

    def __call__(self, peer: SpiffeID) -> None:
        if not self.pattern.matches(peer):
            raise AuthorizationError(peer, f"want {self}")

    def __str__(self) -> str:
        return f"ID matching {_q(self.pattern)}"


@dataclass(frozen=True, slots=True)
class AuthorizeAnyOf:
    """Allows a peer that any of ``rules`` allows (OR). With no rules, nothing is allowed."""

    rules: tuple[Authorizer, ...]

    def __call__(self, peer: SpiffeID) -> None:
        for rule in self.rules:
            try:
                rule(peer)
            except AuthorizationError:
                continue
            return
        raise AuthorizationError(peer, f"want {self}")

    def __str__(self) -> str:
        if not self.rules:
            return "nothing (no rule configured)"
        return " or ".join(str(rule) for rule in self.rules)


def _check_pattern_segments(trust_domain: TrustDomain, segments: tuple[str, ...], quoted: str) -> None:
    """Refuse misplaced wildcards, then check the literal segments by the SPIFFE ID path rules."""
    for index, segment in enumerate(segments):
        if segment == ANY_TAIL:
            if index != len(segments) - 1:
                raise PolicyError("'**' may only be the last segment of an ID pattern", quoted)
        elif segment != ANY_SEGMENT and "*" in segment:
            raise PolicyError("a wildcard must be a whole segment of an ID pattern", quoted)
        elif "/" in segment:
            raise PolicyError(f"ID pattern is not valid ({BAD_PATH_CHAR})", quoted)
    # A wildcard stands for a one-character segment, the shortest it can match, so a pattern longer
    # than any ID could be is refused along with empty, dot and badly spelled segments.
    path = "".join("/" + ("x" if segment in {ANY_SEGMENT, ANY_TAIL} else segment) for segment in segments)
    try:
        SpiffeID.from_path(trust_domain, path)
    except SpiffeIDError as err:
        raise PolicyError(f"ID pattern is not valid ({err.rule})", quoted) from err
