"""Validation of registration entries, selectors, agents and join tokens."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from controlplane.model import (
    AttestedAgent,
    JoinToken,
    ModelError,
    RegistrationEntry,
    Selector,
    agent_id,
    is_agent_id,
    parse_spiffe_id,
    server_id,
)
from spiffecore import SpiffeID, TrustDomain

TD = TrustDomain.parse("example.org")
UNIX = (Selector.parse("unix:uid:1000"),)


def make(**overrides: Any) -> RegistrationEntry:
    fields: dict[str, Any] = {
        "spiffe_id": SpiffeID.parse("spiffe://example.org/web"),
        "parent_id": SpiffeID.parse("spiffe://example.org/spire/agent/x509pop/abc"),
        "selectors": UNIX,
    }
    fields.update(overrides)
    return RegistrationEntry(**fields)


def test_selector_parse_keeps_colons_in_the_value() -> None:
    assert Selector.parse("k8s:pod-label:app:web") == Selector(type="k8s", value="pod-label:app:web")
    assert str(Selector.parse("unix:uid:0")) == "unix:uid:0"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nocolon", 'entry: selector must be TYPE:VALUE: "nocolon"'),
        (":value", "entry: selector type must be lower-case letters, digits, '_' or '-' (at most 64): \":value\""),
        ("Unix:uid", "entry: selector type must be lower-case letters, digits, '_' or '-' (at most 64): \"Unix:uid\""),
        ("unix:", 'entry: selector value must be 1 to 1024 printable characters: "unix:"'),
        ("unix:a\nb", 'entry: selector value must be 1 to 1024 printable characters: "unix:a\\nb"'),
    ],
)
def test_bad_selectors(text: str, message: str) -> None:
    with pytest.raises(ModelError) as caught:
        Selector.parse(text)
    assert str(caught.value) == message


def test_entry_normalises_selectors_dns_names_and_federation() -> None:
    other = TrustDomain.parse("other.org")
    made = make(
        selectors=(Selector.parse("unix:uid:2"), Selector.parse("unix:uid:1"), Selector.parse("unix:uid:2")),
        dns_names=("a.example", "a.example", "*.b.example"),
        federates_with=(other, other),
    )
    assert [str(s) for s in made.selectors] == ["unix:uid:1", "unix:uid:2"]
    assert made.dns_names == ("a.example", "*.b.example")
    assert made.federates_with == (other,)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"selectors": ()}, 'entry: entry must have at least one selector: "spiffe://example.org/web"'),
        (
            {"spiffe_id": SpiffeID.parse("spiffe://example.org")},
            'entry: entry SPIFFE ID must have a path: "spiffe://example.org"',
        ),
        (
            {"spiffe_id": SpiffeID.parse("spiffe://example.org/spire/agent/x")},
            'entry: entry SPIFFE ID must not use the reserved path /spire: "spiffe://example.org/spire/agent/x"',
        ),
        (
            {"parent_id": SpiffeID.parse("spiffe://other.org/agent")},
            "entry: entry parent ID must be in the trust domain of its SPIFFE ID (spiffe://other.org/agent):"
            ' "spiffe://example.org/web"',
        ),
        (
            {"x509_svid_ttl": -1},
            'entry: x509_svid_ttl must be a whole number of seconds from 0 (server default) to 31622400: "-1"',
        ),
        (
            {"jwt_svid_ttl": True},
            'entry: jwt_svid_ttl must be a whole number of seconds from 0 (server default) to 31622400: "True"',
        ),
        (
            {"dns_names": ("UPPER.example",)},
            "entry: DNS name must be lower-case labels of letters, digits and '-',"
            ' at most 253 bytes: "UPPER.example"',
        ),
        (
            {"dns_names": ("a..b",)},
            "entry: DNS name must be lower-case labels of letters, digits and '-', at most 253 bytes: \"a..b\"",
        ),
        (
            {"dns_names": ("a.*.b",)},
            "entry: DNS name must be lower-case labels of letters, digits and '-', at most 253 bytes: \"a.*.b\"",
        ),
        (
            {"dns_names": ("spiffe-server.internal",)},
            'entry: entry DNS name is reserved for the control plane\'s servers: "spiffe-server.internal"',
        ),
        (
            {"federates_with": (TD,)},
            'entry: entry cannot federate with its own trust domain: "spiffe://example.org/web"',
        ),
        ({"hint": "h" * 1025}, "entry: entry hint must be at most 1024 characters: "),
        (
            {"expires_at": datetime(2030, 1, 1)},
            'entry: entry expiry must carry a time zone: "2030-01-01T00:00:00"',
        ),
    ],
)
def test_entry_rules(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelError) as caught:
        make(**overrides)
    assert str(caught.value).startswith(message)


def test_node_entries_and_similarity() -> None:
    node = make(parent_id=server_id(TD))
    assert node.is_node_entry
    assert not make().is_node_entry
    assert make(id="a", hint="x").similarity_key() == make(id="b").similarity_key()


def test_agent_and_server_ids() -> None:
    assert str(server_id(TD)) == "spiffe://example.org/spire/server"
    assert str(agent_id(TD, "join_token", "abc")) == "spiffe://example.org/spire/agent/join_token/abc"
    assert is_agent_id(agent_id(TD, "x509pop", "f"))
    assert not is_agent_id(server_id(TD))
    with pytest.raises(ModelError, match="agent ID must be under /spire/agent/"):
        AttestedAgent(
            spiffe_id=SpiffeID.parse("spiffe://example.org/web"),
            attestation_type="join_token",
            serial="1",
            expires_at=datetime.now(UTC),
        )


def test_join_tokens_are_never_shown() -> None:
    token = JoinToken(token="A" * 32, expires_at=datetime(2030, 1, 1, tzinfo=UTC))
    assert "AAAA" not in repr(token)
    with pytest.raises(ModelError, match="join token must be 16 to 256 characters"):
        JoinToken(token="short", expires_at=datetime(2030, 1, 1, tzinfo=UTC))
    with pytest.raises(ModelError, match="join token must be 16 to 256 characters"):
        JoinToken(token="a b" * 10, expires_at=datetime(2030, 1, 1, tzinfo=UTC))


def test_parse_spiffe_id_names_the_field() -> None:
    with pytest.raises(ModelError) as caught:
        parse_spiffe_id("spiffe://Bad", what="parent_id")
    assert str(caught.value).startswith("entry: parent_id is not a valid SPIFFE ID (trust domain characters")
