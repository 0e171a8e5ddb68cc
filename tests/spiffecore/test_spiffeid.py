"""SPIFFE ID and trust domain parsing, per the SPIFFE-ID specification."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spiffecore import SpiffeID, SpiffeIDError, TrustDomain

TD_CHARS = set(string.ascii_lowercase + string.digits + ".-_")
PATH_CHARS = set(string.ascii_letters + string.digits + ".-_")

TD_CHAR_RULE = "trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores"
PATH_CHAR_RULE = "path segment characters are limited to letters, numbers, dots, dashes, and underscores"

trust_domain_names = st.from_regex(r"[a-z0-9._-]{1,40}", fullmatch=True)
segments = st.from_regex(r"[a-zA-Z0-9._-]{1,20}", fullmatch=True).filter(lambda s: s not in {".", ".."})
spiffe_ids = st.builds(
    lambda td, segs: SpiffeID.from_segments(TrustDomain.parse(td), *segs),
    trust_domain_names,
    st.lists(segments, max_size=8),
)


@pytest.mark.parametrize(
    ("text", "trust_domain", "path"),
    [
        ("spiffe://example.org", "example.org", ""),
        ("spiffe://example.org/workload", "example.org", "/workload"),
        ("spiffe://example.org/ns/prod/sa/Web-1_x.y", "example.org", "/ns/prod/sa/Web-1_x.y"),
        ("spiffe://a", "a", ""),
        ("spiffe://1.2.3.4/x", "1.2.3.4", "/x"),
        ("spiffe://under_score-dash.dot/.../..a/a..", "under_score-dash.dot", "/.../..a/a.."),
    ],
)
def test_parse_valid_ids(text: str, trust_domain: str, path: str) -> None:
    spiffe_id = SpiffeID.parse(text)
    assert spiffe_id.trust_domain == TrustDomain.parse(trust_domain)
    assert spiffe_id.path == path
    assert str(spiffe_id) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", 'spiffeid: cannot be empty: ""'),
        ("example.org/x", 'spiffeid: scheme is missing or invalid: "example.org/x"'),
        ("SPIFFE://example.org/x", 'spiffeid: scheme is missing or invalid: "SPIFFE://example.org/x"'),
        ("spiffe:/example.org/x", 'spiffeid: scheme is missing or invalid: "spiffe:/example.org/x"'),
        ("https://example.org/x", 'spiffeid: scheme is missing or invalid: "https://example.org/x"'),
        ("spiffe://", 'spiffeid: trust domain is missing: "spiffe://"'),
        ("spiffe:///path", 'spiffeid: trust domain is missing: "spiffe:///path"'),
        ("spiffe://Example.org/x", f'spiffeid: {TD_CHAR_RULE}: "spiffe://Example.org/x"'),
        ("spiffe://exa mple.org", f'spiffeid: {TD_CHAR_RULE}: "spiffe://exa mple.org"'),
        ("spiffe://[::1]/x", 'spiffeid: trust domain must not include a port: "spiffe://[::1]/x"'),
        (
            "spiffe://example.org:8080/x",
            'spiffeid: trust domain must not include a port: "spiffe://example.org:8080/x"',
        ),
        (
            "spiffe://user@example.org/x",
            'spiffeid: trust domain must not include userinfo: "spiffe://user@example.org/x"',
        ),
        ("spiffe://ex%41mple.org", 'spiffeid: must not include percent-encoded characters: "spiffe://ex%41mple.org"'),
        (
            "spiffe://example.org/a%2Fb",
            'spiffeid: must not include percent-encoded characters: "spiffe://example.org/a%2Fb"',
        ),
        ("spiffe://example.org/x?q=1", 'spiffeid: must not include a query: "spiffe://example.org/x?q=1"'),
        ("spiffe://example.org?q", 'spiffeid: must not include a query: "spiffe://example.org?q"'),
        ("spiffe://example.org/x#frag", 'spiffeid: must not include a fragment: "spiffe://example.org/x#frag"'),
        ("spiffe://example.org/", 'spiffeid: path cannot have a trailing slash: "spiffe://example.org/"'),
        ("spiffe://example.org/a/", 'spiffeid: path cannot have a trailing slash: "spiffe://example.org/a/"'),
        ("spiffe://example.org//a", 'spiffeid: path cannot contain empty segments: "spiffe://example.org//a"'),
        ("spiffe://example.org/a//b", 'spiffeid: path cannot contain empty segments: "spiffe://example.org/a//b"'),
        ("spiffe://example.org/.", 'spiffeid: path cannot contain dot segments: "spiffe://example.org/."'),
        ("spiffe://example.org/a/../b", 'spiffeid: path cannot contain dot segments: "spiffe://example.org/a/../b"'),
        ("spiffe://example.org/a/..", 'spiffeid: path cannot contain dot segments: "spiffe://example.org/a/.."'),
        ("spiffe://example.org/a b", f'spiffeid: {PATH_CHAR_RULE}: "spiffe://example.org/a b"'),
        ("spiffe://example.org/caf\u00e9", f'spiffeid: {PATH_CHAR_RULE}: "spiffe://example.org/caf\\u00e9"'),
        ("spiffe://example.org/a\nb", f'spiffeid: {PATH_CHAR_RULE}: "spiffe://example.org/a\\nb"'),
    ],
)
def test_parse_rejects_with_the_broken_rule(text: str, message: str) -> None:
    with pytest.raises(SpiffeIDError) as caught:
        SpiffeID.parse(text)
    assert str(caught.value) == message
    assert caught.value.value == text


def _expected_trust_domain_error(char: str) -> str | None:
    """What ``spiffe://a<char>b`` breaks, or None when it is a valid ID."""
    if char in TD_CHARS or char == "/":
        return None
    return {
        "?": "must not include a query",
        "#": "must not include a fragment",
        "%": "must not include percent-encoded characters",
        "@": "trust domain must not include userinfo",
        ":": "trust domain must not include a port",
    }.get(char, TD_CHAR_RULE)


def _expected_path_error(char: str) -> str | None:
    """What ``spiffe://td/a<char>b`` breaks, or None when it is a valid ID."""
    if char in PATH_CHARS or char == "/":
        return None
    return {
        "?": "must not include a query",
        "#": "must not include a fragment",
        "%": "must not include percent-encoded characters",
    }.get(char, PATH_CHAR_RULE)


@pytest.mark.parametrize("byte", range(256))
def test_every_byte_value_in_the_trust_domain(byte: int) -> None:
    char = chr(byte)
    text = f"spiffe://a{char}b/x"
    expected = _expected_trust_domain_error(char)
    if expected is None:
        assert str(SpiffeID.parse(text)) == text
    else:
        with pytest.raises(SpiffeIDError) as caught:
            SpiffeID.parse(text)
        assert caught.value.rule == expected


@pytest.mark.parametrize("byte", range(256))
def test_every_byte_value_in_the_path(byte: int) -> None:
    char = chr(byte)
    text = f"spiffe://example.org/a{char}b"
    expected = _expected_path_error(char)
    if expected is None:
        assert str(SpiffeID.parse(text)) == text
    else:
        with pytest.raises(SpiffeIDError) as caught:
            SpiffeID.parse(text)
        assert caught.value.rule == expected


@pytest.mark.parametrize("byte", range(256))
def test_every_byte_value_in_a_trust_domain_name(byte: int) -> None:
    char = chr(byte)
    name = f"a{char}b"
    if char in TD_CHARS:
        assert TrustDomain.parse(name).name == name
        return
    with pytest.raises(SpiffeIDError) as caught:
        TrustDomain.parse(name)
    expected = {"@": "trust domain must not include userinfo", ":": "trust domain must not include a port"}
    fallback = "must not include percent-encoded characters" if char == "%" else TD_CHAR_RULE
    assert caught.value.rule == expected.get(char, fallback)


def test_length_limits() -> None:
    longest_path = "/" + "a" * (2048 - len("spiffe://td/"))
    assert len(str(SpiffeID.parse("spiffe://td" + longest_path))) == 2048
    too_long = "spiffe://td" + longest_path + "a"
    with pytest.raises(SpiffeIDError) as caught:
        SpiffeID.parse(too_long)
    assert caught.value.rule == "must not be longer than 2048 bytes"
    assert len(str(caught.value)) < 300, "a huge input must not be copied whole into the message"
    assert TrustDomain.parse("a" * 255).name == "a" * 255
    with pytest.raises(SpiffeIDError, match=r"^spiffeid: trust domain must not be longer than 255 bytes: "):
        TrustDomain.parse("a" * 256)
    with pytest.raises(SpiffeIDError, match=r"^spiffeid: trust domain must not be longer than 255 bytes: "):
        SpiffeID.parse("spiffe://" + "a" * 256 + "/x")


def test_length_counts_utf8_bytes_not_characters() -> None:
    text = "spiffe://td/" + "\u00e9" * 1100
    with pytest.raises(SpiffeIDError) as caught:
        SpiffeID.parse(text)
    assert caught.value.rule == "must not be longer than 2048 bytes"


def test_trust_domain_parse_accepts_name_or_trust_domain_id() -> None:
    assert TrustDomain.parse("example.org") == TrustDomain.parse("spiffe://example.org")
    assert TrustDomain.parse("example.org").id_string() == "spiffe://example.org"
    assert str(TrustDomain.parse("example.org").id) == "spiffe://example.org"
    assert str(TrustDomain.parse("example.org")) == "example.org"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", 'spiffeid: trust domain is missing: ""'),
        ("Example.org", f'spiffeid: {TD_CHAR_RULE}: "Example.org"'),
        ("spiffe://example.org/x", 'spiffeid: trust domain ID must not have a path: "spiffe://example.org/x"'),
        ("https://example.org", 'spiffeid: scheme is missing or invalid: "https://example.org"'),
        ("example.org:443", 'spiffeid: trust domain must not include a port: "example.org:443"'),
    ],
)
def test_trust_domain_parse_rejects(text: str, message: str) -> None:
    with pytest.raises(SpiffeIDError) as caught:
        TrustDomain.parse(text)
    assert str(caught.value) == message


def test_constructors_validate_too() -> None:
    with pytest.raises(SpiffeIDError, match="trust domain characters"):
        TrustDomain(name="Bad")
    td = TrustDomain.parse("example.org")
    with pytest.raises(SpiffeIDError, match="path must have a leading slash"):
        SpiffeID(trust_domain=td, path="no-slash")
    with pytest.raises(SpiffeIDError, match="path cannot contain dot segments"):
        SpiffeID.from_path(td, "/a/./b")
    with pytest.raises(SpiffeIDError, match="path cannot contain empty segments"):
        SpiffeID.from_segments(td, "a", "")
    with pytest.raises(SpiffeIDError, match="path segment characters"):
        SpiffeID.from_segments(td, "a/b")
    with pytest.raises(TypeError):
        SpiffeID(trust_domain="example.org", path="/x")  # type: ignore[arg-type]


def test_builders_and_accessors() -> None:
    td = TrustDomain.parse("example.org")
    spiffe_id = SpiffeID.from_segments(td, "ns", "prod")
    assert spiffe_id == SpiffeID.parse("spiffe://example.org/ns/prod") == SpiffeID.from_path(td, "/ns/prod")
    assert spiffe_id.segments == ("ns", "prod")
    assert not spiffe_id.is_trust_domain_id
    assert td.id.is_trust_domain_id
    assert td.id.segments == ()
    assert spiffe_id.member_of(td)
    assert not spiffe_id.member_of(TrustDomain.parse("example.com"))


def test_equal_only_to_own_type_and_hash_consistent() -> None:
    spiffe_id = SpiffeID.parse("spiffe://example.org/x")
    td = TrustDomain.parse("example.org")
    id_text: object = "spiffe://example.org/x"
    td_text: object = "example.org"
    td_id: object = td.id
    assert spiffe_id != id_text
    assert td != td_text
    assert td != td_id
    assert spiffe_id == SpiffeID.parse("spiffe://example.org/x")
    assert hash(spiffe_id) == hash(SpiffeID.parse("spiffe://example.org/x"))
    assert {spiffe_id: 1}[SpiffeID.parse("spiffe://example.org/x")] == 1
    assert len({td, TrustDomain.parse("spiffe://example.org")}) == 1


def test_ordering_is_by_trust_domain_then_path() -> None:
    ids = [SpiffeID.parse(s) for s in ("spiffe://b/a", "spiffe://a/z", "spiffe://a", "spiffe://a/b")]
    assert [str(i) for i in sorted(ids)] == ["spiffe://a", "spiffe://a/b", "spiffe://a/z", "spiffe://b/a"]
    assert sorted([TrustDomain.parse("b"), TrustDomain.parse("a")]) == [TrustDomain.parse("a"), TrustDomain.parse("b")]


def test_values_are_immutable() -> None:
    spiffe_id = SpiffeID.parse("spiffe://example.org/x")
    with pytest.raises(AttributeError):
        spiffe_id.path = "/y"  # type: ignore[misc]


@given(spiffe_ids)
def test_round_trip(spiffe_id: SpiffeID) -> None:
    assert SpiffeID.parse(str(spiffe_id)) == spiffe_id


@given(trust_domain_names)
def test_trust_domain_round_trip(name: str) -> None:
    td = TrustDomain.parse(name)
    assert TrustDomain.parse(str(td)) == td
    assert TrustDomain.parse(td.id_string()) == td


@given(st.text(max_size=300))
def test_arbitrary_text_is_parsed_exactly_or_rejected_with_our_error(text: str) -> None:
    try:
        spiffe_id = SpiffeID.parse(text)
    except SpiffeIDError as err:
        error: SpiffeIDError | None = err
    else:
        error = None
        assert str(spiffe_id) == text, "a valid ID is never normalised"
    if error is not None:
        assert error.value == text


@given(st.from_regex(r"spiffe://[a-zA-Z0-9._%:@/?#-]{0,40}", fullmatch=True))
def test_near_miss_ids_are_parsed_exactly_or_rejected(text: str) -> None:
    try:
        spiffe_id = SpiffeID.parse(text)
    except SpiffeIDError:
        return
    assert str(spiffe_id) == text
