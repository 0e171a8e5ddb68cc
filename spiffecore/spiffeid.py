"""SPIFFE IDs and trust domain names, parsed strictly per the SPIFFE-ID specification.

Values are built only by parsers: an invalid ID cannot exist. Input is rejected, never normalised
(an upper-case trust domain is an error, not lower-cased). Both types are hashable, ordered, and
equal only to values of their own type: ``SpiffeID.parse(s) == s`` is ``False`` for a string ``s``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from spiffecore.errors import SpiffeIDError

SCHEME_PREFIX: Final = "spiffe://"
MAX_ID_BYTES: Final = 2048
MAX_TRUST_DOMAIN_BYTES: Final = 255

_TRUST_DOMAIN_RE: Final = re.compile(r"[a-z0-9._-]+")
_PATH_RE: Final = re.compile(r"(?:/[a-zA-Z0-9._-]+)*")
_ID_RE: Final = re.compile(r"spiffe://([a-z0-9._-]+)((?:/[a-zA-Z0-9._-]+)*)")
_SEGMENT_RE: Final = re.compile(r"[a-zA-Z0-9._-]+")

# Rules, worded as go-spiffe words them so messages are familiar to SPIFFE users.
EMPTY: Final = "cannot be empty"
TOO_LONG: Final = f"must not be longer than {MAX_ID_BYTES} bytes"
BAD_SCHEME: Final = "scheme is missing or invalid"
NO_TRUST_DOMAIN: Final = "trust domain is missing"
TRUST_DOMAIN_TOO_LONG: Final = f"trust domain must not be longer than {MAX_TRUST_DOMAIN_BYTES} bytes"
BAD_TRUST_DOMAIN_CHAR: Final = (
    "trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores"
)
USERINFO: Final = "trust domain must not include userinfo"
PORT: Final = "trust domain must not include a port"
QUERY: Final = "must not include a query"
FRAGMENT: Final = "must not include a fragment"
PERCENT: Final = "must not include percent-encoded characters"
BAD_PATH_CHAR: Final = "path segment characters are limited to letters, numbers, dots, dashes, and underscores"
EMPTY_SEGMENT: Final = "path cannot contain empty segments"
DOT_SEGMENT: Final = "path cannot contain dot segments"
TRAILING_SLASH: Final = "path cannot have a trailing slash"
NO_LEADING_SLASH: Final = "path must have a leading slash"
TRUST_DOMAIN_ID_WITH_PATH: Final = "trust domain ID must not have a path"


@dataclass(frozen=True, slots=True, order=True)
class TrustDomain:
    """A trust domain name such as ``example.org``."""

    name: str

    def __post_init__(self) -> None:
        _check_trust_domain_name(self.name)

    @classmethod
    def parse(cls, text: str) -> TrustDomain:
        """Parse a trust domain name (``example.org``) or trust domain ID (``spiffe://example.org``)."""
        if ":/" in text:
            spiffe_id = SpiffeID.parse(text)
            if spiffe_id.path:
                raise SpiffeIDError(TRUST_DOMAIN_ID_WITH_PATH, text)
            return spiffe_id.trust_domain
        _check_trust_domain_name(text)
        return _new_trust_domain(text)

    @property
    def id(self) -> SpiffeID:
        """The SPIFFE ID of the trust domain itself, ``spiffe://<name>``."""
        return _new_id(self, "")

    def id_string(self) -> str:
        """``spiffe://<name>``: the key of this trust domain in Workload API bundle maps."""
        return SCHEME_PREFIX + self.name

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True, order=True)
class SpiffeID:
    """A SPIFFE ID: a trust domain and a path (empty for the trust domain's own ID)."""

    trust_domain: TrustDomain
    path: str

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, TrustDomain):
            raise TypeError(f"trust_domain must be a TrustDomain, not {type(self.trust_domain)!r}")
        _check_path(self.path)
        if len(self.trust_domain.name) + len(self.path) + len(SCHEME_PREFIX) > MAX_ID_BYTES:
            raise SpiffeIDError(TOO_LONG, SCHEME_PREFIX + self.trust_domain.name + self.path)

    @classmethod
    def parse(cls, text: str) -> SpiffeID:
        """Parse ``spiffe://<trust-domain>[/<path>]``, rejecting anything the spec forbids."""
        if len(text) <= MAX_ID_BYTES:
            match = _ID_RE.fullmatch(text)
            if match is not None:
                name, path = match.group(1, 2)
                if "/." not in path or not _has_dot_segment(path):
                    if len(name) > MAX_TRUST_DOMAIN_BYTES:
                        raise SpiffeIDError(TRUST_DOMAIN_TOO_LONG, text)
                    return _new_id(_new_trust_domain(name), path)
        raise SpiffeIDError(_diagnose_id(text), text)

    @classmethod
    def from_path(cls, trust_domain: TrustDomain, path: str) -> SpiffeID:
        """Build an ID from a trust domain and a path such as ``/ns/prod/sa/web`` (may be empty)."""
        return cls(trust_domain=trust_domain, path=path)

    @classmethod
    def from_segments(cls, trust_domain: TrustDomain, *segments: str) -> SpiffeID:
        """Build an ID from path segments; each must be a valid, non-empty segment."""
        for segment in segments:
            _check_segment(segment)
        return cls(trust_domain=trust_domain, path="".join("/" + s for s in segments))

    @property
    def segments(self) -> tuple[str, ...]:
        """The path split into its segments; empty for a trust domain ID."""
        return tuple(self.path.split("/")[1:]) if self.path else ()

    @property
    def is_trust_domain_id(self) -> bool:
        """True for ``spiffe://<td>`` itself, the ID of signing authorities (no path)."""
        return not self.path

    def member_of(self, trust_domain: TrustDomain) -> bool:
        """True when this ID belongs to ``trust_domain``."""
        return self.trust_domain == trust_domain

    def __str__(self) -> str:
        return SCHEME_PREFIX + self.trust_domain.name + self.path


def _new_trust_domain(name: str) -> TrustDomain:
    """Build an already validated trust domain without validating it again."""
    trust_domain = object.__new__(TrustDomain)
    object.__setattr__(trust_domain, "name", name)
    return trust_domain


def _new_id(trust_domain: TrustDomain, path: str) -> SpiffeID:
    """Build an already validated ID without validating it again."""
    spiffe_id = object.__new__(SpiffeID)
    object.__setattr__(spiffe_id, "trust_domain", trust_domain)
    object.__setattr__(spiffe_id, "path", path)
    return spiffe_id


def _has_dot_segment(path: str) -> bool:
    return any(segment in {".", ".."} for segment in path.split("/"))


def _check_trust_domain_name(name: str) -> None:
    if not isinstance(name, str):
        raise TypeError(f"trust domain name must be a str, not {type(name)!r}")
    if _TRUST_DOMAIN_RE.fullmatch(name) is not None:
        if len(name) > MAX_TRUST_DOMAIN_BYTES:
            raise SpiffeIDError(TRUST_DOMAIN_TOO_LONG, name)
        return
    raise SpiffeIDError(_diagnose_trust_domain(name), name)


def _check_segment(segment: str) -> None:
    if not segment:
        raise SpiffeIDError(EMPTY_SEGMENT, segment)
    if segment in {".", ".."}:
        raise SpiffeIDError(DOT_SEGMENT, segment)
    if _SEGMENT_RE.fullmatch(segment) is None:
        raise SpiffeIDError(PERCENT if "%" in segment else BAD_PATH_CHAR, segment)


def _check_path(path: str) -> None:
    """Check an ID's path; the empty path (a trust domain ID) is valid."""
    if not isinstance(path, str):
        raise TypeError(f"path must be a str, not {type(path)!r}")
    if not path or (_PATH_RE.fullmatch(path) is not None and not _has_dot_segment(path)):
        return
    raise SpiffeIDError(_diagnose_path(path), path)


def _diagnose_trust_domain(name: str) -> str:
    """The first rule a trust domain name breaks (called only once it is known to be invalid)."""
    if not name:
        return NO_TRUST_DOMAIN
    if "@" in name:
        return USERINFO
    if ":" in name:
        return PORT
    if "%" in name:
        return PERCENT
    return BAD_TRUST_DOMAIN_CHAR


def _diagnose_path(path: str) -> str:
    """The first rule a non-empty path breaks (called only once it is known to be invalid)."""
    if not path.startswith("/"):
        return NO_LEADING_SLASH
    segments = path.split("/")[1:]
    for index, segment in enumerate(segments):
        if not segment:
            return TRAILING_SLASH if index == len(segments) - 1 else EMPTY_SEGMENT
        if segment in {".", ".."}:
            return DOT_SEGMENT
        if _SEGMENT_RE.fullmatch(segment) is None:
            return PERCENT if "%" in segment else BAD_PATH_CHAR
    raise AssertionError(f"path {path!r} was reported invalid but breaks no rule")


def _diagnose_id(text: str) -> str:
    """The first rule an ID string breaks (called only once it is known to be invalid)."""
    if not text:
        return EMPTY
    if len(text.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        return TOO_LONG
    if not text.startswith(SCHEME_PREFIX):
        return BAD_SCHEME
    rest = text[len(SCHEME_PREFIX) :]
    if "?" in rest:
        return QUERY
    if "#" in rest:
        return FRAGMENT
    authority, slash, path = rest.partition("/")
    if _TRUST_DOMAIN_RE.fullmatch(authority) is None:
        return _diagnose_trust_domain(authority)
    if len(authority) > MAX_TRUST_DOMAIN_BYTES:
        return TRUST_DOMAIN_TOO_LONG
    return _diagnose_path(slash + path)
