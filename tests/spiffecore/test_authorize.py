"""Tests for spiffecore.authorize: authorizers, their refusals, and the ID pattern grammar."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spiffecore.authorize import (
    AuthorizeAny,
    AuthorizeAnyOf,
    AuthorizeID,
    AuthorizeMemberOf,
    AuthorizeOneOf,
    AuthorizePathPrefix,
    AuthorizePattern,
    Authorizer,
    IDPattern,
)
from spiffecore.errors import AuthorizationError, PolicyError, SpiffeError
from spiffecore.spiffeid import SpiffeID, TrustDomain

TD = TrustDomain.parse("example.org")
OTHER = TrustDomain.parse("other.org")


def sid(text: str) -> SpiffeID:
    return SpiffeID.parse(text)


def refusal(authorizer: Authorizer, peer: str) -> str:
    """The message of the AuthorizationError ``authorizer`` raises for ``peer``."""
    with pytest.raises(AuthorizationError) as caught:
        authorizer(sid(peer))
    return str(caught.value)


def policy_error(text: str) -> str:
    with pytest.raises(PolicyError) as caught:
        IDPattern.parse(text)
    return str(caught.value)


# --- the authorizers ---------------------------------------------------------------------------

WEB = AuthorizeID(sid("spiffe://example.org/web"))
ONE_OF = AuthorizeOneOf.of([sid("spiffe://example.org/b"), sid("spiffe://other.org/a"), sid("spiffe://example.org/a")])
MEMBER_OF = AuthorizeMemberOf.of([OTHER, TD])
PREFIX = AuthorizePathPrefix(sid("spiffe://example.org/ns/prod"))
PATTERN = AuthorizePattern.parse("spiffe://example.org/ns/*/sa/**")
ANY_OF = AuthorizeAnyOf((WEB, PATTERN))


@pytest.mark.parametrize(
    ("authorizer", "peer"),
    [
        (AuthorizeAny(), "spiffe://example.org/web"),
        (AuthorizeAny(), "spiffe://other.org"),
        (WEB, "spiffe://example.org/web"),
        (ONE_OF, "spiffe://example.org/a"),
        (ONE_OF, "spiffe://example.org/b"),
        (ONE_OF, "spiffe://other.org/a"),
        (MEMBER_OF, "spiffe://example.org"),
        (MEMBER_OF, "spiffe://example.org/web"),
        (MEMBER_OF, "spiffe://other.org/a/b/c"),
        (PREFIX, "spiffe://example.org/ns/prod"),
        (PREFIX, "spiffe://example.org/ns/prod/web"),
        (PREFIX, "spiffe://example.org/ns/prod/a/b/c"),
        (PATTERN, "spiffe://example.org/ns/prod/sa/web"),
        (PATTERN, "spiffe://example.org/ns/dev/sa/web/v2"),
        (ANY_OF, "spiffe://example.org/web"),
        (ANY_OF, "spiffe://example.org/ns/prod/sa/api"),
    ],
)
def test_authorizer_allows(authorizer: Authorizer, peer: str) -> None:
    authorizer(sid(peer))  # returns None, raises nothing


@pytest.mark.parametrize(
    ("authorizer", "peer", "message"),
    [
        (
            WEB,
            "spiffe://example.org/api",
            'authorize: "spiffe://example.org/api" is not allowed: want ID "spiffe://example.org/web"',
        ),
        (
            WEB,
            "spiffe://other.org/web",
            'authorize: "spiffe://other.org/web" is not allowed: want ID "spiffe://example.org/web"',
        ),
        (
            WEB,
            "spiffe://example.org/web/v2",
            'authorize: "spiffe://example.org/web/v2" is not allowed: want ID "spiffe://example.org/web"',
        ),
        (
            WEB,
            "spiffe://example.org/Web",
            'authorize: "spiffe://example.org/Web" is not allowed: want ID "spiffe://example.org/web"',
        ),
        (
            ONE_OF,
            "spiffe://other.org/b",
            'authorize: "spiffe://other.org/b" is not allowed: want one of IDs '
            '["spiffe://example.org/a", "spiffe://example.org/b", "spiffe://other.org/a"]',
        ),
        (
            AuthorizeOneOf.of([]),
            "spiffe://example.org/a",
            'authorize: "spiffe://example.org/a" is not allowed: want one of IDs []',
        ),
        (
            MEMBER_OF,
            "spiffe://third.org/a",
            'authorize: "spiffe://third.org/a" is not allowed: '
            'want member of trust domain ["example.org", "other.org"]',
        ),
        (
            AuthorizeMemberOf.of([TD]),
            "spiffe://example.org.evil/a",
            'authorize: "spiffe://example.org.evil/a" is not allowed: want member of trust domain ["example.org"]',
        ),
        (
            PREFIX,
            "spiffe://example.org/ns/production",
            'authorize: "spiffe://example.org/ns/production" is not allowed: '
            'want ID at or under "spiffe://example.org/ns/prod"',
        ),
        (
            PREFIX,
            "spiffe://example.org/ns",
            'authorize: "spiffe://example.org/ns" is not allowed: want ID at or under "spiffe://example.org/ns/prod"',
        ),
        (
            PREFIX,
            "spiffe://other.org/ns/prod",
            'authorize: "spiffe://other.org/ns/prod" is not allowed: want ID at or under "spiffe://example.org/ns/prod"',
        ),
        (
            PREFIX,
            "spiffe://example.org/ns/prod.web",
            'authorize: "spiffe://example.org/ns/prod.web" is not allowed: '
            'want ID at or under "spiffe://example.org/ns/prod"',
        ),
        (
            PATTERN,
            "spiffe://example.org/ns/prod/sa",
            'authorize: "spiffe://example.org/ns/prod/sa" is not allowed: '
            'want ID matching "spiffe://example.org/ns/*/sa/**"',
        ),
        (
            PATTERN,
            "spiffe://other.org/ns/prod/sa/web",
            'authorize: "spiffe://other.org/ns/prod/sa/web" is not allowed: '
            'want ID matching "spiffe://example.org/ns/*/sa/**"',
        ),
        (
            ANY_OF,
            "spiffe://example.org/api",
            'authorize: "spiffe://example.org/api" is not allowed: '
            'want ID "spiffe://example.org/web" or ID matching "spiffe://example.org/ns/*/sa/**"',
        ),
        (
            AuthorizeAnyOf(()),
            "spiffe://example.org/web",
            'authorize: "spiffe://example.org/web" is not allowed: want nothing (no rule configured)',
        ),
    ],
)
def test_authorizer_refuses_with_exact_message(authorizer: Authorizer, peer: str, message: str) -> None:
    assert refusal(authorizer, peer) == message


def test_authorization_error_carries_peer_and_reason() -> None:
    with pytest.raises(AuthorizationError) as caught:
        WEB(sid("spiffe://example.org/api"))
    assert isinstance(caught.value, SpiffeError)
    assert caught.value.value == "spiffe://example.org/api"
    assert caught.value.rule == 'want ID "spiffe://example.org/web"'


@pytest.mark.parametrize(
    ("authorizer", "text"),
    [
        (AuthorizeAny(), "any SPIFFE ID"),
        (WEB, 'ID "spiffe://example.org/web"'),
        (ONE_OF, 'one of IDs ["spiffe://example.org/a", "spiffe://example.org/b", "spiffe://other.org/a"]'),
        (AuthorizeOneOf.of([]), "one of IDs []"),
        (MEMBER_OF, 'member of trust domain ["example.org", "other.org"]'),
        (PREFIX, 'ID at or under "spiffe://example.org/ns/prod"'),
        (AuthorizePathPrefix(sid("spiffe://example.org")), 'ID at or under "spiffe://example.org"'),
        (PATTERN, 'ID matching "spiffe://example.org/ns/*/sa/**"'),
        (ANY_OF, 'ID "spiffe://example.org/web" or ID matching "spiffe://example.org/ns/*/sa/**"'),
        (AuthorizeAnyOf((WEB,)), 'ID "spiffe://example.org/web"'),
        (AuthorizeAnyOf(()), "nothing (no rule configured)"),
    ],
)
def test_authorizer_str_describes_what_it_allows(authorizer: Authorizer, text: str) -> None:
    assert str(authorizer) == text


def test_authorize_path_prefix_of_a_trust_domain_id_allows_the_whole_trust_domain() -> None:
    everything = AuthorizePathPrefix(sid("spiffe://example.org"))
    everything(sid("spiffe://example.org"))
    everything(sid("spiffe://example.org/a/b"))
    assert refusal(everything, "spiffe://other.org/a") == (
        'authorize: "spiffe://other.org/a" is not allowed: want ID at or under "spiffe://example.org"'
    )


def test_authorize_any_of_allows_when_any_rule_allows() -> None:
    rules = AuthorizeAnyOf((AuthorizeID(sid("spiffe://example.org/a")), AuthorizeMemberOf.of([OTHER])))
    rules(sid("spiffe://example.org/a"))
    rules(sid("spiffe://other.org/anything"))
    assert refusal(rules, "spiffe://example.org/b") == (
        'authorize: "spiffe://example.org/b" is not allowed: '
        'want ID "spiffe://example.org/a" or member of trust domain ["other.org"]'
    )


def test_authorize_any_of_nests() -> None:
    inner = AuthorizeAnyOf((AuthorizeID(sid("spiffe://example.org/a")),))
    outer = AuthorizeAnyOf((inner, AuthorizeID(sid("spiffe://example.org/b"))))
    outer(sid("spiffe://example.org/a"))
    outer(sid("spiffe://example.org/b"))
    with pytest.raises(AuthorizationError):
        outer(sid("spiffe://example.org/c"))


def test_authorize_any_of_does_not_swallow_errors_other_than_refusals() -> None:
    def broken(peer: SpiffeID) -> None:
        raise RuntimeError("policy engine down")

    with pytest.raises(RuntimeError, match="policy engine down"):
        AuthorizeAnyOf((broken,))(sid("spiffe://example.org/a"))


def test_authorizers_are_comparable_values() -> None:
    assert AuthorizeID(sid("spiffe://example.org/web")) == WEB
    assert AuthorizeOneOf.of([sid("spiffe://example.org/a")]) == AuthorizeOneOf(
        frozenset({sid("spiffe://example.org/a")})
    )
    assert AuthorizeMemberOf.of([TD, OTHER]) == MEMBER_OF
    assert AuthorizePattern.parse("spiffe://example.org/ns/*/sa/**") == PATTERN
    assert hash(AuthorizePattern.parse("spiffe://example.org/ns/*/sa/**")) == hash(PATTERN)
    assert AuthorizeAny() == AuthorizeAny()


@settings(max_examples=200)
@given(
    prefix=st.lists(st.sampled_from(["a", "b", "ab"]), max_size=3),
    peer=st.lists(st.sampled_from(["a", "b", "ab"]), max_size=4),
    same_trust_domain=st.booleans(),
)
def test_authorize_path_prefix_is_segment_aware(prefix: list[str], peer: list[str], same_trust_domain: bool) -> None:
    rule = AuthorizePathPrefix(SpiffeID.from_segments(TD, *prefix))
    peer_id = SpiffeID.from_segments(TD if same_trust_domain else OTHER, *peer)
    allowed = same_trust_domain and peer[: len(prefix)] == prefix
    try:
        rule(peer_id)
    except AuthorizationError:
        assert not allowed
    else:
        assert allowed


# --- ID patterns -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "peer", "matches"),
    [
        # "*" is exactly one non-empty segment
        ("spiffe://example.org/*", "spiffe://example.org/a", True),
        ("spiffe://example.org/*", "spiffe://example.org/a/b", False),
        ("spiffe://example.org/*", "spiffe://example.org", False),
        ("spiffe://example.org/ns/*/sa/web", "spiffe://example.org/ns/prod/sa/web", True),
        ("spiffe://example.org/ns/*/sa/web", "spiffe://example.org/ns/prod/sa/api", False),
        ("spiffe://example.org/ns/*/sa/web", "spiffe://example.org/ns/sa/web", False),
        ("spiffe://example.org/ns/*/sa/web", "spiffe://example.org/ns/a/b/sa/web", False),
        ("spiffe://example.org/*/*", "spiffe://example.org/a/b", True),
        ("spiffe://example.org/*/*", "spiffe://example.org/a", False),
        # "**" is one or more trailing segments
        ("spiffe://example.org/**", "spiffe://example.org/a", True),
        ("spiffe://example.org/**", "spiffe://example.org/a/b/c", True),
        ("spiffe://example.org/**", "spiffe://example.org", False),
        ("spiffe://example.org/ns/prod/**", "spiffe://example.org/ns/prod/web", True),
        ("spiffe://example.org/ns/prod/**", "spiffe://example.org/ns/prod/a/b", True),
        ("spiffe://example.org/ns/prod/**", "spiffe://example.org/ns/prod", False),
        ("spiffe://example.org/ns/prod/**", "spiffe://example.org/ns/production/web", False),
        ("spiffe://example.org/*/**", "spiffe://example.org/a/b", True),
        ("spiffe://example.org/*/**", "spiffe://example.org/a", False),
        # literal segments are compared exactly, case-sensitively
        ("spiffe://example.org/a/b", "spiffe://example.org/a/b", True),
        ("spiffe://example.org/a/b", "spiffe://example.org/a/b/c", False),
        ("spiffe://example.org/a/b", "spiffe://example.org/a", False),
        ("spiffe://example.org/web", "spiffe://example.org/Web", False),
        ("spiffe://example.org/a.b", "spiffe://example.org/aXb", False),
        ("spiffe://example.org", "spiffe://example.org", True),
        ("spiffe://example.org", "spiffe://example.org/a", False),
        # the trust domain is always literal
        ("spiffe://example.org/**", "spiffe://other.org/a", False),
        ("spiffe://example.org/*", "spiffe://other.org/a", False),
        ("spiffe://example.org", "spiffe://other.org", False),
        ("spiffe://example.org/**", "spiffe://example.org.evil/a", False),
        ("spiffe://example.org/**", "spiffe://sub.example.org/a", False),
    ],
)
def test_id_pattern_matching(pattern: str, peer: str, matches: bool) -> None:
    assert IDPattern.parse(pattern).matches(sid(peer)) is matches


@pytest.mark.parametrize(
    ("pattern", "segments"),
    [
        ("spiffe://example.org", ()),
        ("spiffe://example.org/a", ("a",)),
        ("spiffe://example.org/*", ("*",)),
        ("spiffe://example.org/**", ("**",)),
        ("spiffe://example.org/ns/*/sa/**", ("ns", "*", "sa", "**")),
        ("spiffe://1.2.3.4/A-b_c.d", ("A-b_c.d",)),
    ],
)
def test_id_pattern_parses_to_trust_domain_and_segments(pattern: str, segments: tuple[str, ...]) -> None:
    parsed = IDPattern.parse(pattern)
    assert parsed.segments == segments
    assert str(parsed) == pattern
    assert IDPattern(parsed.trust_domain, segments) == parsed


def _too_long(text: str) -> tuple[str, str]:
    quoted = json.dumps(text[:200]) + f"... ({len(text)} characters)"
    return text, f"authorize: ID pattern is not valid (must not be longer than 2048 bytes): {quoted}"


WHOLE = "a wildcard must be a whole segment of an ID pattern"
TAIL = "'**' may only be the last segment of an ID pattern"
LITERAL_TD = "ID pattern trust domain must be literal (no wildcards)"
BAD_TD_CHAR = "trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores"
BAD_PATH_CHAR = "path segment characters are limited to letters, numbers, dots, dashes, and underscores"
BAD_PATH = f"ID pattern is not valid ({BAD_PATH_CHAR})"


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("", 'authorize: ID pattern must start with spiffe://: ""'),
        ("example.org/a", 'authorize: ID pattern must start with spiffe://: "example.org/a"'),
        ("SPIFFE://example.org/a", 'authorize: ID pattern must start with spiffe://: "SPIFFE://example.org/a"'),
        ("spiffe:/example.org/a", 'authorize: ID pattern must start with spiffe://: "spiffe:/example.org/a"'),
        ("*", 'authorize: ID pattern must start with spiffe://: "*"'),
        # wildcards in the trust domain
        ("spiffe://*/a", f'authorize: {LITERAL_TD}: "spiffe://*/a"'),
        ("spiffe://**", f'authorize: {LITERAL_TD}: "spiffe://**"'),
        ("spiffe://*.example.org/a", f'authorize: {LITERAL_TD}: "spiffe://*.example.org/a"'),
        ("spiffe://example.*/a", f'authorize: {LITERAL_TD}: "spiffe://example.*/a"'),
        # invalid trust domains
        ("spiffe://", 'authorize: ID pattern trust domain is not valid (trust domain is missing): "spiffe://"'),
        ("spiffe:///a", 'authorize: ID pattern trust domain is not valid (trust domain is missing): "spiffe:///a"'),
        (
            "spiffe://Example.org/a",
            f'authorize: ID pattern trust domain is not valid ({BAD_TD_CHAR}): "spiffe://Example.org/a"',
        ),
        (
            "spiffe://example.org:443/a",
            "authorize: ID pattern trust domain is not valid (trust domain must not include a port): "
            '"spiffe://example.org:443/a"',
        ),
        (
            "spiffe://user@example.org/a",
            "authorize: ID pattern trust domain is not valid (trust domain must not include userinfo): "
            '"spiffe://user@example.org/a"',
        ),
        (
            "spiffe://ex%41mple.org/a",
            "authorize: ID pattern trust domain is not valid (must not include percent-encoded characters): "
            '"spiffe://ex%41mple.org/a"',
        ),
        (
            "spiffe://example.org?q=1",
            f'authorize: ID pattern trust domain is not valid ({BAD_TD_CHAR}): "spiffe://example.org?q=1"',
        ),
        # a wildcard inside a literal segment
        ("spiffe://example.org/a*", f'authorize: {WHOLE}: "spiffe://example.org/a*"'),
        ("spiffe://example.org/*a", f'authorize: {WHOLE}: "spiffe://example.org/*a"'),
        ("spiffe://example.org/ns/prod-*/sa", f'authorize: {WHOLE}: "spiffe://example.org/ns/prod-*/sa"'),
        ("spiffe://example.org/***", f'authorize: {WHOLE}: "spiffe://example.org/***"'),
        ("spiffe://example.org/a/b**", f'authorize: {WHOLE}: "spiffe://example.org/a/b**"'),
        # "**" only at the end
        ("spiffe://example.org/**/a", f'authorize: {TAIL}: "spiffe://example.org/**/a"'),
        ("spiffe://example.org/**/**", f'authorize: {TAIL}: "spiffe://example.org/**/**"'),
        ("spiffe://example.org/a/**/*", f'authorize: {TAIL}: "spiffe://example.org/a/**/*"'),
        ("spiffe://example.org/**/", f'authorize: {TAIL}: "spiffe://example.org/**/"'),
        # segments that no SPIFFE ID may have
        (
            "spiffe://example.org/",
            'authorize: ID pattern is not valid (path cannot have a trailing slash): "spiffe://example.org/"',
        ),
        (
            "spiffe://example.org/a/",
            'authorize: ID pattern is not valid (path cannot have a trailing slash): "spiffe://example.org/a/"',
        ),
        (
            "spiffe://example.org/*/",
            'authorize: ID pattern is not valid (path cannot have a trailing slash): "spiffe://example.org/*/"',
        ),
        (
            "spiffe://example.org//a",
            'authorize: ID pattern is not valid (path cannot contain empty segments): "spiffe://example.org//a"',
        ),
        (
            "spiffe://example.org/a//**",
            'authorize: ID pattern is not valid (path cannot contain empty segments): "spiffe://example.org/a//**"',
        ),
        (
            "spiffe://example.org/a/../b",
            'authorize: ID pattern is not valid (path cannot contain dot segments): "spiffe://example.org/a/../b"',
        ),
        (
            "spiffe://example.org/./*",
            'authorize: ID pattern is not valid (path cannot contain dot segments): "spiffe://example.org/./*"',
        ),
        ("spiffe://example.org/a b", f'authorize: {BAD_PATH}: "spiffe://example.org/a b"'),
        ("spiffe://example.org/a?x", f'authorize: {BAD_PATH}: "spiffe://example.org/a?x"'),
        ("spiffe://example.org/a#x", f'authorize: {BAD_PATH}: "spiffe://example.org/a#x"'),
        ("spiffe://example.org/é", f'authorize: {BAD_PATH}: "spiffe://example.org/\\u00e9"'),
        (
            "spiffe://example.org/a%2Fb",
            "authorize: ID pattern is not valid (must not include percent-encoded characters): "
            '"spiffe://example.org/a%2Fb"',
        ),
        # longer than any ID it could match (a wildcard matches at least one character)
        _too_long("spiffe://example.org/" + "a" * 2030),
        _too_long("spiffe://example.org" + "/a" * 1020),
        _too_long("spiffe://example.org" + "/*" * 1014 + "/**"),
    ],
)
def test_id_pattern_rejects_with_exact_message(pattern: str, message: str) -> None:
    assert policy_error(pattern) == message


def test_authorize_pattern_parse_raises_policy_error() -> None:
    with pytest.raises(PolicyError) as caught:
        AuthorizePattern.parse("spiffe://example.org/a*")
    assert str(caught.value) == f'authorize: {WHOLE}: "spiffe://example.org/a*"'
    assert isinstance(caught.value, SpiffeError)
    assert isinstance(caught.value, ValueError)


def test_id_pattern_as_long_as_the_longest_id_is_accepted() -> None:
    text = "spiffe://example.org/" + "a" * (2048 - len("spiffe://example.org/"))
    assert IDPattern.parse(text).matches(sid(text))
    longest = "spiffe://example.org" + "/a" * 1014
    assert len(longest) == 2048
    wildcards = IDPattern.parse("spiffe://example.org" + "/*" * 1013 + "/**")  # one wildcard per segment
    assert wildcards.matches(sid(longest))


@pytest.mark.parametrize(
    ("segments", "message"),
    [
        (("**", "a"), f'authorize: {TAIL}: "spiffe://example.org/**/a"'),
        (("a*",), f'authorize: {WHOLE}: "spiffe://example.org/a*"'),
        (("",), 'authorize: ID pattern is not valid (path cannot have a trailing slash): "spiffe://example.org/"'),
        (
            ("a", "", "b"),
            'authorize: ID pattern is not valid (path cannot contain empty segments): "spiffe://example.org/a//b"',
        ),
        (("a/b",), f'authorize: {BAD_PATH}: "spiffe://example.org/a/b"'),
        (("*", "a/b"), f'authorize: {BAD_PATH}: "spiffe://example.org/*/a/b"'),
    ],
)
def test_id_pattern_constructor_validates_like_parse(segments: tuple[str, ...], message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        IDPattern(TD, segments)
    assert str(caught.value) == message


def test_id_pattern_constructor_wants_a_trust_domain() -> None:
    with pytest.raises(TypeError):
        IDPattern("example.org", ("a",))  # type: ignore[arg-type]


# --- ID pattern properties ---------------------------------------------------------------------

_literals = st.sampled_from(["a", "b", "web", "A-b_c.d"])
_pattern_segments = st.lists(st.one_of(_literals, st.just("*")), max_size=4)
_id_segments = st.lists(st.sampled_from(["a", "b", "web", "A-b_c.d", "x"]), max_size=6)


def _reference_regex(pattern: IDPattern) -> re.Pattern[str]:
    """ghostunnel's wildcard matcher: ``*`` is ``[^/]+``, a trailing ``**`` is ``/.+``."""
    parts = [re.escape("spiffe://" + pattern.trust_domain.name)]
    for segment in pattern.segments:
        if segment == "**":
            parts.append("/.+")
        elif segment == "*":
            parts.append("/[^/]+")
        else:
            parts.append("/" + re.escape(segment))
    return re.compile("".join(parts))


@settings(max_examples=300)
@given(
    fixed=_pattern_segments,
    tail=st.booleans(),
    peer_segments=_id_segments,
    peer_trust_domain=st.sampled_from([TD, OTHER]),
)
def test_id_pattern_matches_like_ghostunnels_wildcard_matcher(
    fixed: list[str], tail: bool, peer_segments: list[str], peer_trust_domain: TrustDomain
) -> None:
    pattern = IDPattern.parse("spiffe://example.org" + "".join("/" + s for s in [*fixed, *(["**"] if tail else [])]))
    peer = SpiffeID.from_segments(peer_trust_domain, *peer_segments)
    expected = _reference_regex(pattern).fullmatch(str(peer)) is not None
    assert pattern.matches(peer) is expected
    if peer_trust_domain != TD:
        assert not pattern.matches(peer)


@settings(max_examples=200)
@given(fixed=_pattern_segments, tail=st.booleans())
def test_id_pattern_round_trips_through_str(fixed: list[str], tail: bool) -> None:
    text = "spiffe://example.org" + "".join("/" + s for s in [*fixed, *(["**"] if tail else [])])
    pattern = IDPattern.parse(text)
    assert str(pattern) == text
    assert IDPattern.parse(str(pattern)) == pattern


@settings(max_examples=300)
@given(text=st.text(max_size=60) | st.text(max_size=40).map(lambda rest: "spiffe://" + rest))
def test_id_pattern_parse_on_arbitrary_text_raises_only_policy_error(text: str) -> None:
    try:
        pattern = IDPattern.parse(text)
    except PolicyError:
        return
    assert str(pattern) == text


@settings(max_examples=300)
@given(
    segments=st.lists(
        st.sampled_from(["*", "**", "", ".", "..", "a", "a*", "%41"]) | st.text(alphabet="ab*./%?", max_size=4),
        max_size=5,
    )
)
def test_id_pattern_parse_on_wildcard_soup_raises_only_policy_error(segments: list[str]) -> None:
    text = "spiffe://example.org/" + "/".join(segments)
    try:
        pattern = IDPattern.parse(text)
    except PolicyError:
        return
    assert str(pattern) == text
    assert "**" not in pattern.segments[:-1]
    assert all(segment in {"*", "**"} or "*" not in segment for segment in pattern.segments)
